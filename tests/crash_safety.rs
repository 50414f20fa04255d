//! End to end: the disk store survives SIGKILL. Clients count (`/count`,
//! web.py's counter) while the proxy is killed with SIGKILL at random
//! moments and restarted on the same directory. Afterwards every record
//! file parses, and, with `fsync = true`, every count a client was told
//! (a 200) is in the store: for each session the stored count is at least
//! the last acknowledged one and at most that plus the requests that got
//! no answer since (each may or may not have landed before the kill).
//! With `fsync = false` only the first holds as a requirement (a process
//! kill does not lose the page cache; a machine crash would).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use support::*;

const CLIENTS: usize = 4;
const KILLS: usize = 10;

/// One client's view of its session.
#[derive(Debug, Default, Clone)]
struct Client {
    cookie: Option<String>,
    /// The count of the last 200 for the current session.
    acked: u64,
    /// Requests sent since that 200 that got no answer.
    unanswered: u64,
    /// Requests sent, and those answered 200.
    requests: u64,
    answered: u64,
    /// Answers that contradict the store's history: a count lower than one
    /// already acknowledged (a lost write) or higher than the requests sent
    /// could give.
    violations: Vec<String>,
}

impl Client {
    fn count_once(&mut self, port: u16) {
        let cookie = self.cookie.as_ref().map(|c| format!("session_id={c}"));
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", c.as_str())).collect();
        let response = match try_request(port, "GET", "/count", &headers, b"") {
            Ok(response) if response.status == 200 => response,
            // Down between a kill and its restart: nothing was sent.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::thread::sleep(Duration::from_millis(5));
                return;
            }
            // Killed mid-request: it may or may not have been stored.
            _ => {
                self.requests += 1;
                self.unanswered += 1;
                return;
            }
        };
        self.requests += 1;
        self.answered += 1;
        let count: u64 = response.text().trim().parse().unwrap();
        match response.set_cookie("session_id") {
            Some(new) if self.cookie.is_none() => {
                self.cookie = Some(new);
                self.acked = count;
                self.unanswered = 0;
                return;
            }
            Some(_) => self.violations.push(format!(
                "session replaced by a new one at count {count} (acknowledged {})",
                self.acked
            )),
            None => {}
        }
        if self.cookie.is_none() {
            return; // a new session the upstream did not write to: not stored
        }
        let lowest = self.acked + 1;
        let highest = self.acked + 1 + self.unanswered;
        if !(lowest..=highest).contains(&count) {
            self.violations.push(format!(
                "count {count} after acknowledged {} and {} unanswered",
                self.acked, self.unanswered
            ));
        }
        self.acked = count;
        self.unanswered = 0;
    }
}

struct Outcome {
    clients: Vec<Client>,
    config: ProxyConfig,
    _upstream: Process,
}

fn count_while_killing(fsync: bool) -> Outcome {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).store(&format!("fsync = {fsync}"));
    let mut proxy = config.start();
    let port = proxy.port;
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash_safety: fsync = {fsync}, seed {seed}");
    let mut rng = Rng(seed);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<Arc<Mutex<Client>>> = (0..CLIENTS)
        .map(|_| Arc::new(Mutex::new(Client::default())))
        .collect();
    let threads: Vec<_> = clients
        .iter()
        .map(|client| {
            let (client, stop) = (client.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    client.lock().unwrap().count_once(port);
                }
            })
        })
        .collect();

    let began = Instant::now();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(200 + rng.next(600)));
        proxy.child.kill().unwrap(); // SIGKILL
        proxy.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(rng.next(100)));
        proxy = config.start();
    }
    // A last stretch with no kill, so every client ends on an answer.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        thread.join().unwrap();
    }
    drop(proxy);
    eprintln!("crash_safety: {KILLS} kills in {:?}", began.elapsed());
    let clients = clients
        .iter()
        .map(|client| client.lock().unwrap().clone())
        .collect();
    Outcome {
        clients,
        config,
        _upstream: upstream,
    }
}

/// Every record file parses; returns the stored count of each client's session.
fn stored_counts(outcome: &Outcome) -> Vec<Option<u64>> {
    let dir = outcome.config.sessions_dir();
    let records = parsed_records(&dir);
    assert!(!records.is_empty());
    outcome
        .clients
        .iter()
        .map(|client| {
            let cookie = client.cookie.as_ref()?;
            let bytes = std::fs::read(record_path(&dir, cookie)).ok()?;
            let record: session_proxy::store::Record = serde_json::from_slice(&bytes).unwrap();
            record
                .data
                .to_map()
                .unwrap()
                .get("count")
                .and_then(|c| c.as_u64())
        })
        .collect()
}

fn report(fsync: bool, outcome: &Outcome, lost: u64) {
    let requests: u64 = outcome.clients.iter().map(|c| c.requests).sum();
    let answered: u64 = outcome.clients.iter().map(|c| c.answered).sum();
    eprintln!(
        "crash_safety: fsync = {fsync}: {requests} requests ({answered} answered 200), {} sessions, {KILLS} SIGKILLs, {lost} lost writes",
        outcome.clients.len()
    );
}

#[test]
fn with_fsync_every_acknowledged_count_survives_sigkill() {
    let outcome = count_while_killing(true);
    let counts = stored_counts(&outcome);
    let mut lost = 0;
    for (client, stored) in outcome.clients.iter().zip(&counts) {
        assert!(
            client.cookie.is_some(),
            "a client never got a session: {client:?}"
        );
        assert!(client.acked > 0, "{client:?}");
        assert!(client.violations.is_empty(), "{:?}", client.violations);
        let stored = stored.unwrap_or_else(|| panic!("session lost: {client:?}"));
        lost += client.acked.saturating_sub(stored);
        assert!(
            (client.acked..=client.acked + client.unanswered).contains(&stored),
            "stored count {stored} for {client:?}"
        );
    }
    report(true, &outcome, lost);
    assert_eq!(lost, 0);
}

#[test]
fn without_fsync_no_record_is_torn_by_sigkill() {
    let outcome = count_while_killing(false);
    let counts = stored_counts(&outcome);
    // Not required without fsync, only reported.
    let lost: u64 = outcome
        .clients
        .iter()
        .zip(&counts)
        .map(|(client, stored)| client.acked.saturating_sub(stored.unwrap_or(0)))
        .sum();
    report(false, &outcome, lost);
}
