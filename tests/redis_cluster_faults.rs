//! End to end: the `redis` store on a Redis Cluster (SPEC [6]: "a Redis
//! Cluster when `url` lists several nodes") under faults of its nodes,
//! through the built proxy with the test upstream. A private three-master
//! cluster per test (tests/support/redis_cluster.rs) has one master killed
//! and restarted, hung and continued, a slot moved from one master to
//! another, and a master killed while a `lock = true` lease is held there.
//!
//! SPEC [5]: a store unreachable on load or on write is a 503 `session
//! store unavailable`, the session unchanged; README: with the server hung
//! every request has its answer within twice the store timeout. On a
//! cluster that holds per master: the sessions whose keys the other masters
//! serve are served as if nothing happened, while `/healthz` says 503
//! (README: the proxy cannot serve every session).
//!
//! Needs `redis-server` and `redis-cli`; without them each test is skipped
//! loudly, unless `SESSION_PROXY_REQUIRE_SERVICES=1`.

mod support;

use std::time::{Duration, Instant};

use support::redis_cluster::{Cluster, TlsFiles, NODE_TIMEOUT_MS};
use support::test_ca::TestCa;
use support::*;

/// The store timeout of these tests (`[store] timeout = 1`).
const TIMEOUT: Duration = Duration::from_secs(1);

/// README: "with the server hung every request has its answer within twice
/// the timeout"; plus slack for a busy 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_millis(2 * 1000 + 1500);

/// A proxy on a private cluster, its store timeout 1 s.
struct Setup {
    proxy: Process,
    config: ProxyConfig,
    _upstream: Process,
    cluster: Cluster,
    prefix: String,
}

fn setup(session: &[&str]) -> Option<Setup> {
    setup_on(Cluster::start(), session)
}

fn setup_on(cluster: Option<Cluster>, session: &[&str]) -> Option<Setup> {
    let cluster = cluster?;
    let upstream = start_upstream();
    let prefix = format!("s{:08x}:", rand::random::<u32>());
    let mut config = ProxyConfig::new(upstream.port)
        .store("kind = \"redis\"")
        .store(&format!("url = \"{}\"", cluster.urls()))
        .store(&format!("key_prefix = \"{prefix}\""))
        .store(&format!("timeout = {}", TIMEOUT.as_secs()))
        .session("timeout = 600");
    for line in session {
        config = config.session(line);
    }
    // A cluster over TLS: its CA is the proxy's (README, TLS).
    if let Some(ca) = cluster.ca_file() {
        config
            .env
            .push(("SSL_CERT_FILE".into(), ca.display().to_string()));
    }
    let proxy = config.start_logging("info", &config.dir.path().join("proxy.log"));
    Some(Setup {
        proxy,
        config,
        _upstream: upstream,
        cluster,
        prefix,
    })
}

impl Setup {
    fn log(&self) -> String {
        std::fs::read_to_string(self.config.dir.path().join("proxy.log")).unwrap_or_default()
    }

    fn key_of(&self, browser: &Browser) -> String {
        format!(
            "{}{}",
            self.prefix,
            handle_of(browser.cookie.as_deref().expect("a session"))
        )
    }

    /// New sessions, each at count 1, until every master serves at least
    /// `per_node` of them; each with the port of its master.
    fn sessions_on_every_node(&self, per_node: usize) -> Vec<(Browser, u16)> {
        let mut sessions: Vec<(Browser, u16)> = Vec::new();
        let enough = |sessions: &[(Browser, u16)]| {
            self.cluster
                .ports
                .iter()
                .all(|port| sessions.iter().filter(|(_, p)| p == port).count() >= per_node)
        };
        while !enough(&sessions) {
            assert!(sessions.len() < 100, "keys never spread over the masters");
            let mut browser = Browser::new(self.proxy.port);
            let response = browser.get("/count", &[]);
            assert_eq!(
                (response.status, response.text().as_str()),
                (200, "1"),
                "a new session"
            );
            let owner = self.cluster.owner_of(&self.key_of(&browser));
            sessions.push((browser, owner));
        }
        sessions
    }
}

/// One `/count` of `browser`, timed.
fn timed_count(browser: &mut Browser) -> (Response, Duration) {
    let started = Instant::now();
    let response = browser.get("/count", &[]);
    (response, started.elapsed())
}

/// One round of `/count` over every session, all at once (a thread each)
/// or one after another, in an order that has a session on `down` before
/// each of the others: those on `down` get the 503 and the others their
/// next count, each within the bound; `counts` is what each session holds.
fn round_with_a_node_down(
    setup: &Setup,
    sessions: &mut [(Browser, u16)],
    counts: &mut [u64],
    down: u16,
    what: &str,
) {
    let answers: Vec<(Response, Duration)> = std::thread::scope(|scope| {
        let threads: Vec<_> = sessions
            .iter_mut()
            .map(|(browser, _)| scope.spawn(move || timed_count(browser)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    check_round(setup, sessions, counts, down, &answers, what);
    // One by one: each session on `down` followed at once by one of the
    // others, on the proxy's connection that just gave up on `down`.
    let failing: Vec<usize> = (0..sessions.len())
        .filter(|&i| sessions[i].1 == down)
        .collect();
    let others: Vec<usize> = (0..sessions.len())
        .filter(|&i| sessions[i].1 != down)
        .collect();
    let mut answers: Vec<Option<(Response, Duration)>> = vec![None; sessions.len()];
    for (n, &i) in others.iter().enumerate() {
        if let Some(&j) = failing.get(n) {
            answers[j] = Some(timed_count(&mut sessions[j].0));
        }
        answers[i] = Some(timed_count(&mut sessions[i].0));
    }
    for &j in failing.iter().skip(others.len()) {
        answers[j] = Some(timed_count(&mut sessions[j].0));
    }
    let answers: Vec<(Response, Duration)> = answers.into_iter().map(Option::unwrap).collect();
    check_round(
        setup,
        sessions,
        counts,
        down,
        &answers,
        &format!("{what}, one by one"),
    );
    // Not healthy while a master is out, though most sessions are served.
    let started = Instant::now();
    let health = get(setup.config.admin_port, "/healthz", &[]);
    assert_eq!(
        (health.status, health.text()),
        (503, "session store unavailable".to_owned()),
        "{what}: /healthz"
    );
    assert!(
        started.elapsed() < ANSWER_BOUND,
        "{what}: /healthz took {:?}",
        started.elapsed()
    );
}

fn check_round(
    setup: &Setup,
    sessions: &[(Browser, u16)],
    counts: &mut [u64],
    down: u16,
    answers: &[(Response, Duration)],
    what: &str,
) {
    for (i, ((response, took), (_, owner))) in answers.iter().zip(sessions.iter()).enumerate() {
        let what = format!("{what}: session {i} on node {owner} (node {down} down)");
        assert!(
            *took < ANSWER_BOUND,
            "{what}: answered after {took:?}; the proxy's log:\n{}",
            setup.log()
        );
        if *owner == down {
            assert_store_unavailable(response, &what);
        } else {
            assert_eq!(
                (response.status, response.text()),
                (200, (counts[i] + 1).to_string()),
                "{what}; the proxy's log:\n{}",
                setup.log()
            );
            counts[i] += 1;
        }
    }
}

/// After a node came back: every session is served again, by the same
/// proxy, with every count it acknowledged (the restarted node read its
/// data back).
fn all_served_again(setup: &Setup, sessions: &mut [(Browser, u16)], counts: &mut [u64]) {
    for (i, (browser, owner)) in sessions.iter_mut().enumerate() {
        let cookie = browser.cookie.clone();
        let mut last = (0, String::new());
        let back = eventually(Duration::from_secs(10), || {
            let response = browser.get("/count", &[]);
            last = (response.status, response.text());
            response.status == 200
        });
        assert!(
            back,
            "session {i} on node {owner}: not served again: {last:?}; the proxy's log:\n{}",
            setup.log()
        );
        assert_eq!(
            last.1,
            (counts[i] + 1).to_string(),
            "session {i} on node {owner}: a change lost"
        );
        assert_eq!(browser.cookie, cookie, "session {i}: replaced");
        counts[i] += 1;
    }
    // Healthy again once the admin's connections reach the master too.
    let healthy = eventually(Duration::from_secs(5), || {
        get(setup.config.admin_port, "/healthz", &[]).status == 200
    });
    assert!(
        healthy,
        "/healthz not 200 again; the proxy's log:\n{}",
        setup.log()
    );
}

/// One master of the three killed under a running proxy (no replicas):
/// the sessions the other two serve are served, before and after the
/// cluster marks the node failed; those on the dead node get the 503
/// within twice the store timeout, never a hang; once the node is started
/// again (its nodes.conf, its port) every session is served again by the
/// same proxy, and no acknowledged change is lost.
#[test]
fn a_master_killed_fails_only_its_sessions_and_they_come_back_with_it() {
    let Some(mut setup) = setup(&[]) else {
        return;
    };
    let mut sessions = setup.sessions_on_every_node(2);
    let mut counts = vec![1u64; sessions.len()];
    let victim = setup.cluster.ports[1];

    setup.cluster.kill(victim);
    round_with_a_node_down(&setup, &mut sessions, &mut counts, victim, "just killed");
    // The others mark it failed after the node timeout: still the same.
    let marked = eventually(Duration::from_millis(10 * NODE_TIMEOUT_MS), || {
        setup.cluster.is_marked_failed(victim)
    });
    assert!(marked, "the cluster never marked node {victim} failed");
    round_with_a_node_down(&setup, &mut sessions, &mut counts, victim, "marked failed");

    setup.cluster.restart(victim);
    all_served_again(&setup, &mut sessions, &mut counts);
    assert!(!setup.log().contains("panicked"), "{}", setup.log());
}

/// With a replica for each master, as clusters run in production: a
/// master killed under a running proxy is replaced by its replica once the
/// cluster fails it over. Its sessions and `/healthz` get the 503 until
/// then; afterwards the same proxy serves every session again, with every
/// change it acknowledged, and `/healthz` is 200 (its connection learnt
/// the new master too).
#[test]
fn a_master_failed_over_to_its_replica_is_followed_without_a_restart() {
    let Some(mut setup) = setup_on(Cluster::start_with_replicas(), &[]) else {
        return;
    };
    let mut sessions = setup.sessions_on_every_node(2);
    let mut counts = vec![1u64; sessions.len()];
    let victim = setup.cluster.ports[1];
    let slot = setup.cluster.first_slot_of(victim);
    // Replication is asynchronous: the acknowledged changes reach the
    // replica before the crash, or the failover loses them (README).
    setup.cluster.wait_replicated(victim);

    setup.cluster.kill(victim);
    let health = get(setup.config.admin_port, "/healthz", &[]);
    assert_eq!(health.status, 503, "/healthz with a master just killed");
    let promoted = eventually(Duration::from_millis(20 * NODE_TIMEOUT_MS), || {
        setup.cluster.owner_of_slot(slot) != victim
    });
    assert!(promoted, "no replica took over node {victim}'s slots");
    all_served_again(&setup, &mut sessions, &mut counts);
    assert!(!setup.log().contains("panicked"), "{}", setup.log());
}

/// A cluster over TLS whose masters announce host names, as TLS
/// deployments do so that certificates can name hosts: the proxy reaches
/// each master by its name (`rediss://`, the certificate checked against
/// the name), which `CLUSTER NODES` does not give (it names the IP).
/// Sessions are served, and survive a master's restart; `/healthz` is 200,
/// and 503 while a master is down; `sessions list` (the sweep's walk, SCAN
/// on each master) lists every master's sessions. `/healthz` and the walk
/// failed on such a cluster while masters were found by `CLUSTER NODES`.
#[test]
fn a_cluster_over_tls_by_host_name_is_served_listed_and_health_checked() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("redis-cluster", &["localhost", "127.0.0.1"]);
    let files = TlsFiles {
        ca: ca.ca_file(),
        cert,
        key,
    };
    let Some(mut setup) = setup_on(Cluster::start_over_tls_by_host_name(files), &[]) else {
        return;
    };
    let mut sessions = setup.sessions_on_every_node(1);
    let mut counts = vec![1u64; sessions.len()];
    assert_eq!(get(setup.config.admin_port, "/healthz", &[]).status, 200);
    let path = setup.config.path();
    let ca = setup.cluster.ca_file().unwrap().display().to_string();
    let list = run_cli(
        &["sessions", "list", "-c", path.to_str().unwrap()],
        &[("SSL_CERT_FILE", &ca)],
    );
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let listed = String::from_utf8_lossy(&list.stdout);
    for (browser, owner) in &sessions {
        let handle = handle_of(browser.cookie.as_deref().unwrap());
        assert!(listed.contains(&handle), "the session on {owner}: {listed}");
    }
    let victim = setup.cluster.ports[0];
    setup.cluster.kill(victim);
    assert_eq!(get(setup.config.admin_port, "/healthz", &[]).status, 503);
    setup.cluster.restart(victim);
    all_served_again(&setup, &mut sessions, &mut counts);
}

/// One master hung (SIGSTOP: connections accepted, nothing answered):
/// the sessions on it get the 503 within twice the timeout, the others
/// are served, the proxy's connections to the live masters included; once
/// it is continued, all are served again.
#[test]
fn a_master_hung_fails_only_its_sessions_within_twice_the_timeout() {
    let Some(mut setup) = setup(&[]) else {
        return;
    };
    let mut sessions = setup.sessions_on_every_node(2);
    let mut counts = vec![1u64; sessions.len()];
    let victim = setup.cluster.ports[2];

    setup.cluster.hang(victim);
    round_with_a_node_down(&setup, &mut sessions, &mut counts, victim, "just hung");
    // New sessions meanwhile: those on the live masters are stored (a
    // third of them land on the hung one: none of 9 on the others is a
    // chance of 1 in 20000).
    let mut stored = 0;
    for _ in 0..9 {
        let mut browser = Browser::new(setup.proxy.port);
        let (response, took) = timed_count(&mut browser);
        assert!(took < ANSWER_BOUND, "a new session: {took:?}");
        if response.status == 200 {
            let owner = setup.cluster.owner_of(&setup.key_of(&browser));
            assert_ne!(owner, victim, "a session stored on the hung node");
            assert_eq!(browser.get("/count", &[]).text(), "2");
            stored += 1;
        } else {
            assert_store_unavailable(&response, "a new session");
        }
    }
    assert!(stored > 0, "no new session stored while one master hangs");

    // A proxy started while the node hangs: it connects to the others, and
    // its threads, each opening its connections now, serve their sessions.
    let late = {
        let mut config = ProxyConfig::new(setup._upstream.port);
        config.store = setup.config.store.clone();
        config.session = setup.config.session.clone();
        let log = config.dir.path().join("proxy.log");
        (config.start_logging("info", &log), config)
    };
    for (browser, _) in sessions.iter_mut() {
        browser.port = late.0.port;
    }
    round_with_a_node_down(
        &setup,
        &mut sessions,
        &mut counts,
        victim,
        "through a proxy started meanwhile",
    );

    setup.cluster.resume(victim);
    all_served_again(&setup, &mut sessions, &mut counts);
    assert!(!setup.log().contains("panicked"), "{}", setup.log());
}

/// The slot of a live session's key moved from one master to another
/// while the proxy runs (SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT
/// NODE, as `redis-cli --cluster reshard` does, but telling the old
/// master before the new one), with the session in use all along: the
/// proxy follows the ASK and MOVED redirections, and waits out the time
/// the two masters send it back and forth; every request is served, and
/// no change is lost.
#[test]
fn a_slot_moved_under_a_running_proxy_loses_no_change() {
    let Some(setup) = setup(&[]) else {
        return;
    };
    let mut sessions = setup.sessions_on_every_node(1);
    let (mut browser, from) = sessions.remove(0);
    let key = setup.key_of(&browser);
    let slot = setup.cluster.slot_of(&key);
    let to = *setup
        .cluster
        .ports
        .iter()
        .find(|&&port| port != from)
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);

    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || answers.len() < 10 {
                let response = browser.get("/count", &[]);
                answers.push((response.status, response.text()));
                std::thread::sleep(Duration::from_millis(20));
            }
            // A few after the move, on the new master.
            for _ in 0..5 {
                let response = browser.get("/count", &[]);
                answers.push((response.status, response.text()));
            }
            answers
        });
        let pause = || std::thread::sleep(Duration::from_millis(400));
        pause();
        setup.cluster.begin_slot_move(slot, from, to);
        pause();
        for key in setup.cluster.keys_in_slot(from, slot) {
            setup.cluster.migrate_key(&key, from, to);
        }
        pause();
        setup
            .cluster
            .end_slot_move(slot, from, to, Duration::from_millis(150));
        pause();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        client.join().unwrap()
    });
    assert_eq!(setup.cluster.owner_of(&key), to, "the slot moved");
    assert_eq!(setup.cluster.keys_in_slot(to, slot), vec![key.clone()]);
    for (i, (status, text)) in answers.iter().enumerate() {
        assert_eq!(
            (*status, text.as_str()),
            (200, (i + 2).to_string().as_str()),
            "request {i} of {} during the move; the proxy's log:\n{}",
            answers.len(),
            setup.log()
        );
    }
}

/// `lock = true` on the cluster: the master holding a session's lease is
/// killed while a request holds it. The request ends within its bounds;
/// while the node is down the session's requests get the 503; once the
/// node is back (with the lease it saved) the session is served again
/// within the lease's TTL: no lease is left stuck, and the change the
/// first request stored is there.
#[test]
fn with_lock_a_master_killed_under_a_held_lease_leaves_no_lease_stuck() {
    let Some(mut setup) = setup(&["lock = true"]) else {
        return;
    };
    // A session whose lease and record are on different masters, so that
    // the record stays reachable while the lease's master is down.
    let (mut browser, lease_node, record_node) = loop {
        let mut browser = Browser::new(setup.proxy.port);
        assert_eq!(browser.get("/count", &[]).text(), "1");
        let handle = handle_of(browser.cookie.as_deref().unwrap());
        let lease_node = setup
            .cluster
            .owner_of(&format!("{}lock:{handle}", setup.prefix));
        let record_node = setup.cluster.owner_of(&setup.key_of(&browser));
        if lease_node != record_node {
            break (browser, lease_node, record_node);
        }
    };
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());
    let port = setup.proxy.port;

    let (first, took) = std::thread::scope(|scope| {
        let request = scope.spawn(|| {
            let started = Instant::now();
            let response = get(
                port,
                "/count",
                &[("Cookie", &cookie), ("X-Test-Sleep-Ms", "1500")],
            );
            (response, started.elapsed())
        });
        // The lease is taken before the app is called.
        std::thread::sleep(Duration::from_millis(500));
        setup.cluster.kill(lease_node);
        request.join().unwrap()
    });
    // Its change is stored (the record's master is up, the lease was not
    // found lost) or refused; either way within the app's time and the
    // store's bounds.
    assert!(
        took < Duration::from_millis(1500) + ANSWER_BOUND,
        "the request holding the lease: {took:?}"
    );
    let mut count = match first.status {
        200 => {
            assert_eq!(first.text(), "2");
            2
        }
        _ => {
            assert_eq!(first.status, 503, "{}", first.text());
            1
        }
    };
    let (response, took) = timed_count(&mut browser);
    assert!(
        took < ANSWER_BOUND,
        "while the lease's node is down: {took:?}"
    );
    assert_store_unavailable(&response, "while the lease's node is down");

    setup.cluster.restart(lease_node);
    let started = Instant::now();
    let mut last = (0, String::new());
    let back = eventually(Duration::from_secs(10), || {
        let response = browser.get("/count", &[]);
        last = (response.status, response.text());
        response.status == 200
    });
    assert!(
        back,
        "the session is not served again (lease stuck?): {last:?}; record on {record_node}, \
         lease on {lease_node}; the proxy's log:\n{}",
        setup.log()
    );
    count += 1;
    assert_eq!(last.1, count.to_string(), "a change lost");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "served again only after {:?}",
        started.elapsed()
    );
    // And the lease is let go at the end of each request again.
    for _ in 0..3 {
        let (response, took) = timed_count(&mut browser);
        count += 1;
        assert_eq!((response.status, response.text()), (200, count.to_string()));
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}

/// The store itself (no proxy) connected while a master hangs (a proxy
/// started or restarted then; each proxy thread's first connection is
/// opened then too): it connects within the timeout and serves the keys of
/// the other masters, one call after another, the calls that gave up on
/// the hung master included. Each connection waited for the hung master
/// as long as the whole timeout, so the proxy did not start.
#[test]
fn a_store_connected_while_a_master_hangs_serves_the_others() {
    use session_proxy::store::redis::RedisStore;
    use session_proxy::store::{Handle, Store};
    let Some(mut cluster) = Cluster::start() else {
        return;
    };
    let victim = cluster.ports[0];
    let handles: Vec<(Handle, bool)> = (0..12)
        .map(|n| {
            let handle = Handle::of_id(&format!("session-{n}"));
            let on_victim = cluster.owner_of(&format!("s:{handle}")) == victim;
            (handle, on_victim)
        })
        .collect();
    assert!(handles.iter().any(|(_, on_victim)| *on_victim));
    assert!(handles.iter().any(|(_, on_victim)| !*on_victim));
    cluster.hang(victim);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let store = runtime
        .block_on(RedisStore::connect(&cluster.urls(), "s:", TIMEOUT, 600))
        .expect("connected while a master hangs");
    assert!(started.elapsed() < ANSWER_BOUND, "{:?}", started.elapsed());
    for round in 0..2 {
        for (handle, on_victim) in &handles {
            let started = Instant::now();
            let loaded = runtime.block_on(store.load(handle));
            let took = started.elapsed();
            assert!(took < ANSWER_BOUND, "round {round}: {took:?}");
            assert_eq!(
                loaded.is_ok(),
                !on_victim,
                "round {round}, a key {} the hung master: {loaded:?}",
                if *on_victim { "on" } else { "off" }
            );
        }
    }
    cluster.resume(victim);
    for (handle, _) in &handles {
        runtime.block_on(store.load(handle)).unwrap();
    }
}
