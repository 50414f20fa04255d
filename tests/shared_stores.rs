//! End to end on the shared stores (issue 3): two proxy processes on one
//! PostgreSQL table or one Redis key space behave as one proxy.
//!
//! Needs the real services on 127.0.0.1 (PostgreSQL 5432, database
//! `test`; Redis 6379). Without them each test is skipped loudly, unless
//! `SESSION_PROXY_REQUIRE_SERVICES=1`, where they fail.

mod support;

use support::shared::{redis_run, sql, Shared};
use support::*;

/// Two proxies in front of one upstream, sharing one store.
struct Pair {
    _upstream: Process,
    a: Process,
    b: Process,
    _configs: (ProxyConfig, ProxyConfig),
}

fn pair(shared: Shared, tag: &str, session: &[&str]) -> Option<Pair> {
    if !shared.available() {
        return None;
    }
    let upstream = start_upstream();
    let store = shared.store_lines(tag);
    let configure = || {
        let mut config = ProxyConfig::new(upstream.port);
        config.store = store.clone();
        for line in session {
            config = config.session(line);
        }
        config
    };
    let (config_a, config_b) = (configure(), configure());
    let a = config_a.start();
    let b = config_b.start();
    Some(Pair {
        _upstream: upstream,
        a,
        b,
        _configs: (config_a, config_b),
    })
}

fn a_session_continues_through_the_other_proxy(shared: Shared) {
    let Some(pair) = pair(shared, "continue", &[]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    browser.port = pair.b.port;
    assert_eq!(browser.get("/count", &[]).text(), "2");
    browser.port = pair.a.port;
    assert_eq!(browser.get("/count", &[]).text(), "3");
}

fn a_kill_through_one_proxy_ends_the_session_for_both(shared: Shared) {
    let Some(pair) = pair(shared, "kill", &[]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    let first = browser.get("/count", &[]);
    let cookie = browser.cookie.clone().unwrap_or_else(|| {
        panic!(
            "no session cookie from the first request: {} {}",
            first.status,
            first.text()
        )
    });
    let cookie = format!("session_id={cookie}");
    assert_eq!(
        get(pair.b.port, "/", &[("Cookie", &cookie)]).session()["new"],
        false
    );
    get(
        pair.a.port,
        "/",
        &[("Cookie", &cookie), ("X-Test-Action", "kill")],
    );
    assert_eq!(
        get(pair.b.port, "/", &[("Cookie", &cookie)]).session()["new"],
        true
    );
}

fn concurrent_writes_of_different_keys_through_both_proxies_all_survive(shared: Shared) {
    let Some(pair) = pair(shared, "keys", &[]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    browser.get("/", &[("X-Test-Update", r#"{"start": true}"#)]);
    let ports = [pair.a.port, pair.b.port];
    let statuses = concurrent_key_writes(&ports, browser.cookie.as_ref().unwrap(), 20);
    assert!(statuses.iter().all(|&status| status == 200), "{statuses:?}");
    let data = browser.get("/", &[]).session()["data"].clone();
    for i in 0..20 {
        assert_eq!(data[format!("key{i}")], i, "key{i} lost: {data}");
    }
}

fn with_lock_increments_through_both_proxies_lose_nothing(shared: Shared) {
    let Some(pair) = pair(shared, "lock", &["lock = true"]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());
    let ports = [pair.a.port, pair.b.port];
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let cookie = cookie.clone();
            let port = ports[i % 2];
            std::thread::spawn(move || get(port, "/count", &[("Cookie", &cookie)]).status)
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap(), 200);
    }
    assert_eq!(browser.get("/count", &[]).text(), "52");
}

/// The lease of `lock = true` ends when the change is stored, before the
/// response head leaves: a download its client reads slowly held it to the
/// body's end, and the session's requests through the other proxy waited.
fn with_lock_a_response_body_read_slowly_does_not_hold_up_the_session(shared: Shared) {
    let Some(pair) = pair(shared, "slowbody", &["lock = true"]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let download = stalled_download(pair.a.port, browser.cookie.as_ref().unwrap());

    let started = std::time::Instant::now();
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());
    let response = get(pair.b.port, "/count", &[("Cookie", &cookie)]);
    let waited = started.elapsed();
    assert_eq!((response.status, response.text().as_str()), (200, "2"));
    assert!(
        waited < std::time::Duration::from_secs(2),
        "waited {waited:?}"
    );
    drop(download);
}

on_each_shared_store!(
    a_session_continues_through_the_other_proxy,
    a_kill_through_one_proxy_ends_the_session_for_both,
    concurrent_writes_of_different_keys_through_both_proxies_all_survive,
    with_lock_increments_through_both_proxies_lose_nothing,
    with_lock_a_response_body_read_slowly_does_not_hold_up_the_session,
    with_lock_requests_of_different_sessions_run_side_by_side,
    a_store_that_goes_away_is_a_503_and_comes_back_without_a_restart,
    the_sessions_command_works_on_the_shared_store,
    a_burst_of_parallel_writes_to_one_session_all_succeed,
    an_oversized_record_is_skipped_by_sessions_list_and_purge_expired,
);

/// The store behind a relay the test cuts: 503 within the store timeout,
/// then normal service again without a restart.
fn a_store_that_goes_away_is_a_503_and_comes_back_without_a_restart(shared: Shared) {
    if !shared.available() {
        return;
    }
    let mut relay = Relay::start(&format!("127.0.0.1:{}", shared.port()));
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    config.store = shared
        .store_lines("relay")
        .into_iter()
        .map(|line| {
            line.replace(
                &format!("127.0.0.1:{}", shared.port()),
                &format!("127.0.0.1:{}", relay.port),
            )
        })
        .collect();
    config = config.store("timeout = 1");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");

    relay.stop();
    let started = std::time::Instant::now();
    let response = browser.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (503, "session store unavailable")
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    relay.resume();
    let mut last = String::new();
    let back = eventually(std::time::Duration::from_secs(10), || {
        last = browser.get("/count", &[]).text();
        last != "session store unavailable"
    });
    assert!(back, "still failing after the store came back: {last}");
    assert_eq!(last, "2", "the session survived the outage");
}

fn the_sessions_command_works_on_the_shared_store(shared: Shared) {
    let Some(pair) = pair(shared, "cli", &["timeout = 100"]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    let handle = browser
        .get("/", &[("X-Test-Update", r#"{"secret": "not-listed"}"#)])
        .session()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    let path = pair._configs.0.path();
    let path = path.to_str().unwrap();
    let run = |args: &[&str]| run_cli(args, &[]);
    let list = run(&["sessions", "list", "-c", path]);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.status.success() && listed.contains(&handle),
        "{listed}"
    );
    assert!(!listed.contains("not-listed"));
    let show = run(&["sessions", "show", &handle, "-c", path]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("not-listed"));
    assert!(run(&["sessions", "kill", &handle, "-c", path])
        .status
        .success());
    assert_eq!(
        run(&["sessions", "show", &handle, "-c", path])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        browser.get("/", &[]).session()["new"],
        true,
        "killed for both proxies"
    );
    assert!(run(&["sessions", "purge-expired", "-c", path])
        .status
        .success());
}

/// The length of the record another program writes in the test below:
/// far past the bound of a stored record (4 MiB for the default
/// `max_data_bytes` of 4,096).
const OVERSIZED: usize = 128 << 20;

/// The most memory `sessions list` and `purge-expired` may hold in the
/// test below: less than the oversized record alone, so that they cannot
/// have read it whole, and more than twice what they hold reading a
/// record of the bound's length (a debug build: 30 MiB with PostgreSQL,
/// 55 MiB with Redis, 28 MiB listing an empty store; 240 and 300 MiB
/// reading a record of 64 MiB whole).
const PEAK_LIMIT: u64 = OVERSIZED as u64;

/// A record as the proxy writes it, `pad` in its data.
fn record_text(created: u64, atime: u64, pad: &str) -> String {
    format!(
        r#"{{"data":{{"pad":"{pad}"}},"created":{created},"atime":{atime},"ip":"127.0.0.1","ver":1}}"#
    )
}

/// The quoted value of `name` in a config section's `lines`.
fn setting(lines: &[String], name: &str) -> String {
    lines
        .iter()
        .find_map(|line| line.strip_prefix(&format!("{name} = \"")))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
        .to_owned()
}

/// What the test below wrote into a shared store, removed even when it
/// fails: its table, or its keys (which also expire).
struct Written {
    table: Option<String>,
    keys: Vec<String>,
}

impl Drop for Written {
    fn drop(&mut self) {
        if let Some(table) = &self.table {
            sql(&format!("DROP TABLE IF EXISTS {table}"));
        }
        for key in &self.keys {
            redis_run::<i64>(&::redis::cmd("DEL").arg(key).to_owned());
        }
    }
}

/// A record far larger than the bound, written into the store by another
/// program, is never read whole (the commands' memory stays far below its
/// size) by `sessions list` or `purge-expired`: each skips it with one
/// WARN naming its handle, and lists or sweeps the others. The sweep
/// leaves it, though its `created` is long past the absolute timeout: it
/// cannot be read, as a record that does not parse. Both read it whole
/// before (PostgreSQL listed it and swept it).
fn an_oversized_record_is_skipped_by_sessions_list_and_purge_expired(shared: Shared) {
    if !shared.available() {
        return;
    }
    let mut config = ProxyConfig::new(free_port());
    config.store = shared.store_lines("oversized");
    config = config.session("absolute_timeout = 60");
    let path = config.write();
    let path = path.to_str().unwrap();
    let handle = |id: &str| session_proxy::store::Handle::of_id(id).as_str().to_owned();
    let (young, old, huge) = (handle("young"), handle("old"), handle("huge"));
    let (now, long_ago) = (session_proxy::session::now(), 1_000_000_000);
    let records = [
        (&young, record_text(now, now, "a")),
        (&old, record_text(long_ago, now, "b")),
    ];
    let huge_text = record_text(long_ago, now, "PAD");
    let (head, tail) = huge_text.split_once("PAD").unwrap();
    let _written = match shared {
        Shared::Postgres => {
            let table = setting(&config.store, "table");
            let written = Written {
                table: Some(table.clone()),
                keys: vec![],
            };
            let mut rows: Vec<String> = records
                .iter()
                .map(|(handle, text)| format!("('{handle}', now() AT TIME ZONE 'UTC', '{text}')"))
                .collect();
            rows.push(format!(
                "('{huge}', now() AT TIME ZONE 'UTC', \
                 '{head}' || repeat('x', {OVERSIZED}) || '{tail}')"
            ));
            sql(&format!(
                "CREATE TABLE {table} (session_id char(128) UNIQUE NOT NULL, \
                 atime timestamp NOT NULL default current_timestamp, data text); \
                 INSERT INTO {table} (session_id, atime, data) VALUES {}",
                rows.join(", ")
            ));
            written
        }
        Shared::Redis => {
            let prefix = setting(&config.store, "key_prefix");
            let key = |handle: &str| format!("{prefix}{handle}");
            let written = Written {
                table: None,
                keys: vec![key(&young), key(&old), key(&huge)],
            };
            let huge_text = format!("{head}{}{tail}", "x".repeat(OVERSIZED));
            for (handle, text) in records
                .iter()
                .map(|(h, t)| (h.as_str(), t))
                .chain([(huge.as_str(), &huge_text)])
            {
                let set = ::redis::cmd("SET")
                    .arg(key(handle))
                    .arg(text)
                    .arg("EX")
                    .arg(600)
                    .to_owned();
                redis_run::<()>(&set);
            }
            written
        }
    };
    let short = &huge[..8];
    // One WARN line naming the oversized record by its short handle.
    let warned_once = |stderr: &str| {
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|line| line.contains("larger than"))
            .collect();
        lines.len() == 1 && lines[0].contains(short) && !lines[0].contains(&huge)
    };

    let (list, peak) = run_cli_peak(&["sessions", "list", "-c", path]);
    let (listed, stderr) = (
        String::from_utf8_lossy(&list.stdout),
        String::from_utf8_lossy(&list.stderr),
    );
    assert!(list.status.success(), "{stderr}");
    assert!(listed.contains(&young) && listed.contains(&old), "{listed}");
    assert!(
        !listed.contains(&huge),
        "the oversized record is listed: {listed}"
    );
    assert!(
        warned_once(&stderr),
        "not one WARN naming {short}: {stderr}"
    );
    assert!(peak < PEAK_LIMIT, "sessions list held {} MiB", peak >> 20);

    let (purge, peak) = run_cli_peak(&["sessions", "purge-expired", "-c", path]);
    let (purged, stderr) = (
        String::from_utf8_lossy(&purge.stdout),
        String::from_utf8_lossy(&purge.stderr),
    );
    assert!(purge.status.success(), "{stderr}");
    assert_eq!(purged.trim(), "deleted 1 expired session(s)", "{stderr}");
    assert!(
        warned_once(&stderr),
        "not one WARN naming {short}: {stderr}"
    );
    assert!(
        peak < PEAK_LIMIT,
        "sessions purge-expired held {} MiB",
        peak >> 20
    );

    let listed = run_cli(&["sessions", "list", "-c", path], &[]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&young) && !listed.contains(&old),
        "{listed}"
    );
    let stored_length = match shared {
        Shared::Postgres => {
            let table = setting(&config.store, "table");
            let query =
                format!("SELECT octet_length(data) FROM {table} WHERE session_id = '{huge}'");
            support::shared::rows(&query)[0][0]
                .clone()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        }
        Shared::Redis => {
            let key = format!("{}{huge}", setting(&config.store, "key_prefix"));
            redis_run::<usize>(&::redis::cmd("STRLEN").arg(key).to_owned())
        }
    };
    assert_eq!(
        stored_length,
        huge_text.len() - 3 + OVERSIZED,
        "the sweep left it"
    );
}

/// Many requests of one proxy writing one session at the same moment, for
/// a while, wait their turn instead of exhausting the store's retries.
fn a_burst_of_parallel_writes_to_one_session_all_succeed(shared: Shared) {
    let Some(pair) = pair(shared, "burst", &[]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    browser.get("/", &[("X-Test-Update", r#"{"start": true}"#)]);
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());
    let port = pair.a.port;
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let cookie = cookie.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|n| {
                        let update = format!(r#"{{"key{i}": {n}}}"#);
                        get(
                            port,
                            "/",
                            &[("Cookie", &cookie), ("X-Test-Update", &update)],
                        )
                        .status
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let statuses: Vec<u16> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let failed = statuses.iter().filter(|&&s| s != 200).count();
    assert_eq!(failed, 0, "{failed} of {} writes failed", statuses.len());
    let data = browser.get("/", &[]).session()["data"].clone();
    for i in 0..32 {
        assert_eq!(data[format!("key{i}")], 24, "{data}");
    }
}

/// SPEC [4.6]: `lock = true` makes the requests of one session take turns;
/// the requests of different sessions still run side by side. Twelve
/// sessions, each with one request the app holds, are all at the app at
/// once, not in waves of a few sessions at a time. (Timed, with 1.5 s
/// requests done within 3 s, a loaded machine failed it, and a proxy
/// that let two waves through could pass.)
fn with_lock_requests_of_different_sessions_run_side_by_side(shared: Shared) {
    let Some(pair) = pair(shared, "side", &["lock = true"]) else {
        return;
    };
    let port = pair.a.port;
    let cookies: Vec<String> = (0..12)
        .map(|_| {
            let mut browser = Browser::new(port);
            assert_eq!(browser.get("/count", &[]).text(), "1");
            format!("session_id={}", browser.cookie.unwrap())
        })
        .collect();
    let held: Vec<Held> = cookies
        .iter()
        .map(|cookie| Held::get(port, "/count", &[("Cookie", cookie.as_str())]))
        .collect();
    for request in &held {
        request.at_the_app();
    }
    for request in held {
        let response = request.answer();
        assert_eq!((response.status, response.text().as_str()), (200, "2"));
    }
}

/// A table name of this test's own, dropped with the guard.
struct WebPyTable(String);

impl WebPyTable {
    /// A table name of this test's own, dropped with it.
    fn unique(prefix: &str) -> WebPyTable {
        WebPyTable(format!("{prefix}_{}_{}", std::process::id(), free_port()))
    }
}

impl Drop for WebPyTable {
    fn drop(&mut self) {
        sql(&format!("DROP TABLE IF EXISTS {}", self.0));
    }
}

/// SPEC [6] takes web.py's DBStore table as is, so a table web.py filled
/// keeps web.py's rows (sha1 ids, pickled data) when the proxy takes over,
/// until they go idle. With an absolute timeout the sweep reads every row:
/// it must neither fail on those rows nor log a WARN line for each of them
/// at every round (500 rows and a round a minute, the default, is 720 000
/// lines a day).
#[test]
fn postgres_web_py_rows_left_in_the_table_do_not_flood_the_log() {
    if !Shared::Postgres.available() {
        return;
    }
    let table = WebPyTable::unique("sessions_webpy");
    sql(&format!(
        "CREATE TABLE {t} (session_id char(128) UNIQUE NOT NULL, \
         atime timestamp NOT NULL default current_timestamp, data text); \
         INSERT INTO {t} (session_id, data) \
         SELECT left(md5(n::text) || md5(n::text), 40), 'KGRwMApTJ2NvdW50JwpwMQpJMQpzLg==' \
         FROM generate_series(1, 500) AS n",
        t = table.0
    ));
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    config.store = vec![
        "kind = \"postgres\"".into(),
        "url = \"postgres://postgres@127.0.0.1:5432/test\"".into(),
        format!("table = \"{}\"", table.0),
        "sweep_interval = 1".into(),
    ];
    config = config.session("absolute_timeout = 3600");
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("warn", &log);
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert_eq!(
        browser.get("/count", &[]).text(),
        "2",
        "sessions still work"
    );
    drop(proxy);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let per_row = text
        .lines()
        .filter(|line| line.contains("not a handle") || line.contains("not session-proxy records"))
        .count();
    assert!(
        per_row <= 10,
        "{per_row} WARN lines in 3.5 s about the 500 rows web.py left; first: {:?}",
        text.lines().next()
    );
}

/// A regenerate copies the session to its new id, then removes the old
/// one. A kill landing between the two (here: held back by a row lock
/// until the regenerate waits on the old row, then committed) left the
/// copy as it was, so the killed session's data lived on under the new
/// id. A killed session stays dead: the new id starts afresh, with the
/// response's update only, as an update of a killed session does.
#[test]
fn postgres_a_regenerate_does_not_bring_back_a_session_killed_during_its_copy() {
    if !Shared::Postgres.available() {
        return;
    }
    let table = WebPyTable::unique("sessions_regen_kill");
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    config.store = vec![
        "kind = \"postgres\"".into(),
        "url = \"postgres://postgres@127.0.0.1:5432/test\"".into(),
        format!("table = \"{}\"", table.0),
        "timeout = 10".into(),
    ];
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"user":"guest","cart":3}"#)]);
    let old = handle_of(&browser.cookie.clone().unwrap());

    // Another request's kill, which takes the old row first.
    let (runtime, killer) = support::shared::test_database();
    let lock = format!(
        "BEGIN; SELECT 1 FROM {} WHERE session_id = '{old}' FOR UPDATE",
        table.0
    );
    runtime.block_on(killer.batch_execute(&lock)).unwrap();

    let (port, cookie) = (proxy.port, browser.cookie.clone().unwrap());
    let regenerate = std::thread::spawn(move || {
        get(
            port,
            "/",
            &[
                ("Cookie", &format!("session_id={cookie}")),
                ("X-Test-Action", "regenerate"),
                ("X-Test-Update", r#"{"user":"ann"}"#),
            ],
        )
    });
    // The copy is made; the regenerate now waits for the old row.
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%{}%FOR UPDATE%'",
        table.0
    );
    let waits = || {
        let rows = support::shared::rows(&waiting);
        rows[0][0].as_deref() == Some("1")
    };
    assert!(eventually(std::time::Duration::from_secs(5), waits));
    let kill = format!("DELETE FROM {} WHERE session_id = '{old}'; COMMIT", table.0);
    runtime.block_on(killer.batch_execute(&kill)).unwrap();

    let response = regenerate.join().unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let new = response.set_cookie("session_id").expect("a new cookie");
    assert_ne!(handle_of(&new), old);
    browser.cookie = Some(new);
    let claims = browser.get("/", &[]).session();
    assert_eq!(
        claims["data"],
        serde_json::json!({"user": "ann"}),
        "the killed session's data came back under the new id"
    );
    assert_eq!(claims["ver"], 1);
}

/// The key prefix of a Redis pair's store.
fn redis_prefix(pair: &Pair) -> String {
    pair._configs.0.store[2]
        .trim_start_matches("key_prefix = \"")
        .trim_end_matches('"')
        .to_string()
}

#[test]
fn redis_a_record_at_the_last_version_number_is_answered() {
    let Some(pair) = pair(Shared::Redis, "lastver", &[]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let cookie = browser.cookie.clone().unwrap();
    let key = redis_prefix(&pair) + &handle_of(&cookie);
    let value: String = redis_run(::redis::cmd("GET").arg(&key));
    let mut record: serde_json::Value = serde_json::from_str(&value).unwrap();
    record["ver"] = serde_json::json!(u64::MAX);
    let _: () = redis_run(
        ::redis::cmd("SET")
            .arg(&key)
            .arg(record.to_string())
            .arg("EX")
            .arg(600),
    );
    let cookie_header = format!("session_id={cookie}");
    let answer = try_request(
        pair.a.port,
        "GET",
        "/count",
        &[("Cookie", &cookie_header)],
        b"",
    );
    assert!(answer.is_ok(), "no answer: {answer:?}");
    assert_eq!(
        get(pair.a.port, "/", &[]).status,
        200,
        "the proxy serves on"
    );
}

/// Sleeps until the wall clock reads `at` (since the Unix epoch).
fn sleep_until(at: std::time::Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(at.saturating_sub(now));
}

/// SPEC [4.3]: a session is idle-expired once `now - atime > timeout` in
/// whole seconds, so it serves through the whole second `atime + timeout`.
/// Its Redis key's TTL of `timeout` ran from the write, made during the
/// second `atime`, and took the session away up to a second before that.
#[test]
fn redis_a_session_is_served_through_the_last_second_of_its_idle_timeout() {
    let session = ["timeout = 2", "touch_interval = 1", "ignore_expiry = false"];
    let Some(pair) = pair(Shared::Redis, "boundary", &session) else {
        return;
    };
    // Written early in a second, so that the second `atime + timeout`
    // has most of its time left once the write's TTL of `timeout` is over.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    sleep_until(std::time::Duration::from_secs(now.as_secs() + 1));
    let mut browser = Browser::new(pair.a.port);
    browser.get("/", &[("X-Test-Update", r#"{"user":"ann"}"#)]);
    let written = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let cookie = browser.cookie.clone().unwrap();
    let key = redis_prefix(&pair) + &handle_of(&cookie);
    let value: String = redis_run(::redis::cmd("GET").arg(&key));
    let record: serde_json::Value = serde_json::from_str(&value).unwrap();
    let atime = record["atime"].as_u64().unwrap();

    // In the second `atime + 2` (`now - atime` is the timeout, not past
    // it), just after a TTL of `timeout` from the write would have run
    // out, which leaves most of the second for the request to arrive in
    // (a fixed 750 ms into it left 250 ms). Never later than half a
    // second before its end, a slow write notwithstanding.
    let ttl_from_write = written + std::time::Duration::from_millis(2000 + 150);
    let last_second_ends = std::time::Duration::from_secs(atime + 3);
    sleep_until(ttl_from_write.min(last_second_ends - std::time::Duration::from_millis(500)));
    let response = browser.get("/", &[]);
    assert_ne!(
        response.text(),
        "Session expired",
        "expired {} ms into the second atime + timeout",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            .saturating_sub(u128::from(atime + 2) * 1000)
    );
    assert_eq!(response.session()["data"]["user"], "ann");
    assert_eq!(browser.cookie.as_deref(), Some(cookie.as_str()));
}

/// `lock = true` promises the app the session to itself. A lease found
/// taken over while its request is at the upstream (its refreshes failed,
/// and another proxy took it) stores nothing: another proxy may have served
/// the session meanwhile. The lease's refresher noticed, and nothing read it.
#[test]
fn redis_a_lease_lost_during_its_request_stores_nothing() {
    let Some(pair) = pair(Shared::Redis, "lostlease", &["lock = true"]) else {
        return;
    };
    let mut browser = Browser::new(pair.a.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let cookie = browser.cookie.clone().unwrap();
    let lease_key = format!("{}lock:{}", redis_prefix(&pair), handle_of(&cookie));
    let port = pair.a.port;
    let header = format!("session_id={cookie}");
    // The lease is refreshed every third of its 5 s: within the 3 s here.
    let slow = std::thread::spawn(move || {
        get(
            port,
            "/count",
            &[("Cookie", &header), ("X-Test-Sleep-Ms", "3000")],
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _: () = redis_run(
        ::redis::cmd("SET")
            .arg(&lease_key)
            .arg("another proxy's token")
            .arg("PX")
            .arg(10_000),
    );
    let response = slow.join().unwrap();
    assert_eq!(response.status, 503, "{}", response.text());
    let _: () = redis_run(::redis::cmd("DEL").arg(&lease_key));
    assert_eq!(browser.get("/count", &[]).text(), "2", "nothing was stored");
}

/// `lock = true` on Redis: a proxy cut off from Redis while its request is
/// at the app cannot refresh its lease, which expires after its 5 s TTL;
/// the other proxy then takes it and serves the session. When the first
/// proxy reaches Redis again, its request's change is decided on the
/// version it loaded before: it must store nothing (`503 session busy`),
/// as README promises for a lease "taken over after its refreshes failed".
/// Its refresher, which only fails meanwhile, had not yet seen the lease
/// gone (it would at its next round, a third of the TTL later), so the
/// change was stored and one of the two acknowledged increments was lost.
#[test]
fn redis_a_lease_expired_while_its_proxy_was_cut_off_stores_nothing() {
    if !Shared::Redis.available() {
        return;
    }
    let mut relay = Relay::start("127.0.0.1:6379");
    let upstream = start_upstream();
    let store = Shared::Redis.store_lines("cutlease");
    let configure = |store: Vec<String>| {
        let mut config = ProxyConfig::new(upstream.port)
            .session("lock = true")
            .upstream("read_timeout = 10");
        config.store = store;
        config
    };
    let via_relay = store
        .iter()
        .map(|line| line.replace("127.0.0.1:6379", &format!("127.0.0.1:{}", relay.port)))
        .collect();
    let (config_a, config_b) = (configure(via_relay), configure(store));
    let (a, b) = (config_a.start(), config_b.start());
    let mut browser = Browser::new(a.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let header = format!("session_id={}", browser.cookie.clone().unwrap());

    // A takes the lease and is at the app for 6 s, cut off from Redis from
    // the start: its lease expires after 5 s.
    let started = std::time::Instant::now();
    let (port_a, port_b) = (a.port, b.port);
    let cookie = header.clone();
    let slow = std::thread::spawn(move || {
        get(
            port_a,
            "/count",
            &[("Cookie", &cookie), ("X-Test-Sleep-Ms", "6000")],
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    relay.stop();
    // B waits for the lease, gets it once A's has expired, and counts.
    let cookie = header.clone();
    let other = std::thread::spawn(move || get(port_b, "/count", &[("Cookie", &cookie)]));
    std::thread::sleep(std::time::Duration::from_millis(5500).saturating_sub(started.elapsed()));
    relay.resume();
    let (slow, other) = (slow.join().unwrap(), other.join().unwrap());

    assert_eq!((other.status, other.text().as_str()), (200, "2"));
    assert_eq!(
        (slow.status, slow.text().as_str()),
        (
            503,
            "session busy: an earlier request of this session has not finished"
        ),
        "a change decided while another proxy held the lease was stored"
    );
    assert_eq!(browser.get("/count", &[]).text(), "3");
    drop(config_a);
}
