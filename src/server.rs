//! Assembles the running proxy: the store (on a runtime of its own, which
//! also runs the sweeper), the pingora proxy service, the admin service,
//! and a shutdown that drains in-flight requests for at most
//! `grace_period`, after handing the listening sockets to a new process
//! (`run --upgrade`) on SIGQUIT where `upgrade_sock` is set.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use prometheus::IntGauge;
use tokio::net::TcpSocket;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::broadcast;

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::config::Config;
use crate::limits::{self, ClientTimeouts, Clocked, LAST_CALL};
use crate::metrics::Metrics;
use crate::proxy::SessionProxy;
use crate::store::{self, Expiry, Store};
use crate::tls::ListenerCertificate;

/// Runs the proxy until SIGTERM or SIGINT, or until it has handed its
/// listeners to a new process; exits the process when drained. With
/// `upgrade`, it takes its listeners from the running proxy instead of
/// binding them.
pub fn run(config: Config, upgrade: bool) -> Result<(), String> {
    open_files_for(config.server.threads)?;
    let store_runtime = store_runtime()?;
    store_runtime.block_on(async { can_listen(&config, upgrade) })?;
    let store = store_runtime
        .block_on(store::open(&config))
        .map_err(|e| e.to_string())?;
    // Every signal the proxy answers is watched from here on, before
    // pingora binds the listeners: a signal nobody watches yet has its
    // default action, and SIGTERM, SIGHUP or SIGUSR1 sent the moment a
    // client could connect killed the process (pingora asks for the stop
    // signals only once its listeners run). Until here, while the store
    // is reached, a signal still stops the process at once.
    let signals = {
        let _runtime = store_runtime.enter();
        Signals::watch()
    };
    let expiry = Expiry {
        timeout: config.session.timeout,
        absolute: config.session.absolute_timeout,
    };
    let metrics = Arc::new(Metrics::new());
    store_runtime.spawn(store::sweep_forever(
        store.clone(),
        expiry,
        Duration::from_secs(config.store.sweep_interval),
        metrics.clone(),
    ));

    let mut proxy = SessionProxy::new(&config, store.clone(), metrics.clone())?;
    let access_log = match &config.server.access_log {
        Some(destination) => Some(Arc::new(AccessLog::start(
            destination,
            metrics.access_log_dropped.clone(),
        )?)),
        None => None,
    };
    if let Some(log) = &access_log {
        proxy = proxy.with_access_log(log.clone());
    }
    store_runtime.spawn(reopen_on_sigusr1(signals.usr1, access_log.clone()));
    let in_flight = proxy.in_flight();

    let pingora_conf = ServerConf {
        threads: config.server.threads,
        // A current-thread runtime per thread: cheaper per request than
        // tokio's work-stealing pool (issue 5, BENCHMARKS.md). Connections
        // are spread over the threads at random and stay there.
        work_stealing: false,
        // Our own drain (below) ends the process first; these are backstops.
        grace_period_seconds: Some(config.server.grace_period + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        // The CAs for the upstream's certificate; None: the system's (checked
        // when the config was loaded). None at all for a plain-HTTP upstream.
        ca_file: match (&config.upstream.ca_file, config.upstream.tls) {
            (Some(path), _) => Some(path.display().to_string()),
            (None, true) => None,
            (None, false) => Some(crate::tls::NO_CA_FILE.to_string()),
        },
        upgrade_sock: config
            .server
            .upgrade_sock
            .as_ref()
            .map_or_else(String::new, |path| path.display().to_string()),
        ..ServerConf::default()
    };
    let options = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(options), pingora_conf);
    // The listeners wait for it: with `upgrade`, it receives their sockets
    // from the old process (and closes any the config no longer names).
    let bootstrap = server.bootstrap_as_a_service();
    let pingora_conf = server.configuration.clone();

    // Every client connection on a clock: slow heads and idle connections end.
    let timeouts = ClientTimeouts {
        header: Duration::from_secs(config.server.header_timeout),
        keepalive: Duration::from_secs(config.server.keepalive_timeout),
        send: Duration::from_secs(config.server.send_timeout),
        body: Duration::from_secs(config.server.body_timeout),
    };
    let mut proxy_app = pingora::proxy::http_proxy(&pingora_conf, proxy);
    // HTTP/2 only where ALPN can choose it: TLS listeners (no h2c).
    if config.server.tls.is_some() && config.server.http2 {
        proxy_app.server_options = Some(limits::h2_server_options(timeouts));
        proxy_app.h2_options = Some(limits::h2_options());
    }
    let mut clocked_app = Clocked::new(proxy_app, timeouts).with_metrics(metrics.clone());
    if let Some(log) = &access_log {
        clocked_app = clocked_app.with_access_log(log.clone());
    }
    let mut proxy_service =
        pingora::services::listening::Service::new("session-proxy".to_string(), clocked_app);
    let certificate = match &config.server.tls {
        Some(files) => Some(ListenerCertificate::load(files)?),
        None => None,
    };
    if let Some(certificate) = &certificate {
        report_expiry(certificate, &metrics);
    }
    if certificate.is_some() && !config.session.cookie.secure {
        warn!("HTTPS listeners with session.secure = false: browsers will send the session cookie over plain HTTP too; set secure = true");
    }
    store_runtime.spawn(reload_on_sighup(
        signals.hangup,
        certificate.clone(),
        metrics.clone(),
    ));
    if let Some(sock) = &config.server.upgrade_sock {
        warn_if_others_can_reach(sock);
    }
    for address in &config.server.listen {
        match &certificate {
            Some(certificate) => proxy_service.add_tls_with_settings(
                &address.to_string(),
                None,
                certificate.listener_settings(config.server.http2)?,
            ),
            None => proxy_service.add_tcp(&address.to_string()),
        }
    }
    server.add_service(proxy_service).add_dependency(&bootstrap);

    if !config.server.admin_listen.is_empty() {
        let admin = Admin::new(store, metrics);
        let mut admin_service = pingora::services::listening::Service::new(
            "session-proxy admin".to_string(),
            Clocked::new(
                pingora::apps::http_app::HttpServer::new_app(admin),
                timeouts,
            ),
        );
        for address in &config.server.admin_listen {
            admin_service.add_tcp(&address.to_string());
        }
        server.add_service(admin_service).add_dependency(&bootstrap);
    }

    info!(
        "session-proxy listening on {:?}, admin on {:?}, upstream {:?}, {:?} store",
        config.server.listen,
        config.server.admin_listen,
        config.upstream.addresses,
        config.store.kind
    );
    // A new process holds no listeners until the running one hands them
    // over: a SIGQUIT sent to it meanwhile is a mistake, named in the log.
    let listening = Arc::new(AtomicBool::new(!upgrade));
    if let (true, Some(sock)) = (upgrade, &config.server.upgrade_sock) {
        info!(
            "waiting about 6 s on {} for the listeners of the running proxy: send it SIGQUIT",
            sock.display()
        );
        store_runtime.spawn(answer_signals_while_waiting(
            sock.clone(),
            listening.clone(),
            server.watch_execution_phase(),
        ));
    }
    let drain = DrainOnSignal {
        signals: Mutex::new(signals.stop),
        in_flight,
        access_log,
        grace: Duration::from_secs(config.server.grace_period),
        upgrade_sock: config.server.upgrade_sock.clone(),
        listening,
        phases: Mutex::new(Some(server.watch_execution_phase())),
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(drain),
    });
    // pingora returns only after its own backstop grace period.
    drop(store_runtime);
    Ok(())
}

/// Files pingora opens per thread at start (a runtime per thread and
/// service, each with its epoll and wake-up descriptors), with room.
const FILES_PER_THREAD: u64 = 8;
/// Files for everything else: the store, the listeners, the logs.
const FILES_BESIDES_THREADS: u64 = 64;

/// Raises the soft limit on open files to the hard one, as Go and nginx's
/// `worker_rlimit_nofile` do, and refuses a thread count the limit cannot
/// take: pingora panics when a thread's runtime cannot open its files.
/// Under systemd the soft limit is 1024, which `threads = 0` on a machine
/// of 128 CPUs passes.
fn open_files_for(threads: usize) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and keeps no pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Ok(());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given and keeps no pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let needed = FILES_BESIDES_THREADS + FILES_PER_THREAD * threads as u64;
    if limit.rlim_cur != libc::RLIM_INFINITY && limit.rlim_cur < needed {
        return Err(format!(
            "server.threads = {threads} needs about {needed} open files to start, and this process \
             may open {}; lower server.threads or raise the limit (LimitNOFILE= in systemd, ulimit -n)",
            limit.rlim_cur
        ));
    }
    Ok(())
}

/// Whether every listen and admin address can be bound now. When
/// upgrading, the old process holds them: only an address this host does
/// not have is an error then.
fn can_listen(config: &Config, upgrade: bool) -> Result<(), String> {
    let admin = config.server.admin_listen.iter();
    config
        .server
        .listen
        .iter()
        .chain(admin)
        .try_for_each(|address| match can_listen_on(address) {
            Err(e) if upgrade && e.kind() == std::io::ErrorKind::AddrInUse => Ok(()),
            result => result.map_err(|e| format!("cannot listen on {address}: {e}")),
        })
}

/// Whether `address` can be bound now. pingora binds in a task of its
/// own, and a failure there ends only that task: the process would go on
/// serving nothing, its /healthz saying ok. As pingora's listeners do, the
/// check reuses an address in TIME_WAIT (a restart), but not one that a
/// listening socket holds.
fn can_listen_on(address: &SocketAddr) -> std::io::Result<()> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(*address)
}

/// The store's connections and the sweeper live here, apart from
/// pingora's per-service runtimes, so they outlive none of them and are
/// shared by all.
fn store_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("session-store")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the store runtime: {e}"))
}

/// The signals the proxy answers, each watched from the moment it is
/// made (tokio installs the handler then); `None` where that failed, said
/// once in the log.
struct Signals {
    stop: Option<StopSignals>,
    hangup: Option<Signal>,
    usr1: Option<Signal>,
}

/// SIGTERM, SIGINT and SIGQUIT, answered by `DrainOnSignal`.
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
    quit: Signal,
}

impl Signals {
    /// Must run inside a tokio runtime that outlives the watch.
    fn watch() -> Signals {
        let stop = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) {
            (Ok(terminate), Ok(interrupt), Ok(quit)) => Some(StopSignals {
                terminate,
                interrupt,
                quit,
            }),
            _ => {
                warn!("cannot watch SIGTERM/SIGINT/SIGQUIT; stop the proxy with SIGKILL");
                None
            }
        };
        Signals {
            stop,
            hangup: watch_or_say(
                SignalKind::hangup(),
                "cannot watch SIGHUP: a renewed certificate will take a restart",
            ),
            usr1: watch_or_say(
                SignalKind::user_defined1(),
                "cannot watch SIGUSR1: a rotated access log will take a restart",
            ),
        }
    }
}

fn watch_or_say(kind: SignalKind, failure: &str) -> Option<Signal> {
    signal(kind).map_err(|_| warn!("{failure}")).ok()
}

/// On SIGTERM or SIGINT: pingora stops accepting, and we exit as soon as
/// no request is in flight, or when `grace` has passed. pingora alone
/// would always sleep its whole grace period, even when idle.
///
/// On SIGQUIT, with `upgrade_sock` set and a new process waiting there
/// (`run --upgrade`): pingora hands it the listening sockets, both accept
/// for 5 s, then this one stops accepting and drains as above. Without a
/// new process waiting, SIGQUIT changes nothing: stopping would leave
/// the port closed.
struct DrainOnSignal {
    /// Taken by the one call of `recv`.
    signals: Mutex<Option<StopSignals>>,
    in_flight: IntGauge,
    /// Flushed before the process exits.
    access_log: Option<Arc<AccessLog>>,
    grace: Duration,
    upgrade_sock: Option<PathBuf>,
    /// False while a new process (`run --upgrade`) waits for its listeners:
    /// it has none to hand over.
    listening: Arc<AtomicBool>,
    /// pingora's phases, to start draining only once it stops accepting.
    phases: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
}

/// How long SIGQUIT waits for a new process to open the upgrade socket;
/// pingora's own wait for it to answer is about as long.
const NEW_PROCESS_WAIT: Duration = Duration::from_secs(5);

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let taken = self
            .signals
            .lock()
            .ok()
            .and_then(|mut signals| signals.take());
        let Some(StopSignals {
            mut terminate,
            mut interrupt,
            mut quit,
        }) = taken
        else {
            return std::future::pending().await;
        };
        loop {
            let upgrade = tokio::select! {
                _ = terminate.recv() => {
                    info!("SIGTERM: draining for at most {:?}", self.grace);
                    false
                }
                _ = interrupt.recv() => {
                    info!("SIGINT: draining for at most {:?}", self.grace);
                    false
                }
                _ = quit.recv() => {
                    if !self.hand_over().await {
                        continue;
                    }
                    true
                }
            };
            self.drain_then_exit(upgrade);
            return match upgrade {
                true => ShutdownSignal::GracefulUpgrade,
                false => ShutdownSignal::GracefulTerminate,
            };
        }
    }
}

impl DrainOnSignal {
    /// Whether the listeners can go to a new process now.
    async fn hand_over(&self) -> bool {
        let Some(sock) = &self.upgrade_sock else {
            warn!("SIGQUIT ignored: set [server] upgrade_sock for upgrades without downtime; SIGTERM stops the proxy");
            return false;
        };
        // Named in the log by `answer_signals_while_waiting`.
        if !self.listening.load(Ordering::Acquire) {
            return false;
        }
        let waited_since = Instant::now();
        while !someone_listens_on(sock) {
            if waited_since.elapsed() >= NEW_PROCESS_WAIT {
                warn!(
                    "SIGQUIT: no new process waits on {} (start one with `session-proxy run --upgrade`, then send SIGQUIT); still serving",
                    sock.display()
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(
            "SIGQUIT: handing the listeners to the new process over {}; draining for at most {:?} once it has them",
            sock.display(),
            self.grace
        );
        true
    }

    /// Exits once no request is in flight, or `grace` has passed, counted
    /// from when pingora stops accepting: at once on SIGTERM or SIGINT,
    /// and after an upgrade's hand-over once both processes have accepted
    /// for a while, so that no connection waits in a queue nobody reads.
    fn drain_then_exit(&self, after_hand_over: bool) {
        let phases = match after_hand_over {
            true => self.phases.lock().ok().and_then(|mut phases| phases.take()),
            false => None,
        };
        let in_flight = self.in_flight.clone();
        let access_log = self.access_log.clone();
        let grace = self.grace;
        std::thread::spawn(move || {
            if let Some(mut phases) = phases {
                loop {
                    match phases.blocking_recv() {
                        Ok(ExecutionPhase::ShutdownStarted) => break,
                        Err(broadcast::error::RecvError::Closed) => break,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    }
                }
            }
            drain(&in_flight, grace, access_log.as_deref());
        });
    }
}

/// Until this new process has its listeners (pingora's bootstrap done),
/// answers each SIGQUIT with a warning: the upgrade recipe sends it to the
/// running proxy, and sent here it would otherwise make this process hand
/// its own upgrade socket the listeners it does not have yet.
///
/// And SIGTERM or SIGINT ends the wait at once. pingora reads them only
/// once the listeners have come: a new process told to stop while it
/// waited took them over and then stopped, as the old one did, and
/// nothing was left listening.
async fn answer_signals_while_waiting(
    sock: PathBuf,
    listening: Arc<AtomicBool>,
    mut phases: broadcast::Receiver<ExecutionPhase>,
) {
    let (Ok(mut quit), Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::quit()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        listening.store(true, Ordering::Release);
        return;
    };
    loop {
        tokio::select! {
            _ = quit.recv() => warn!(
                "SIGQUIT ignored: this is the new process, still waiting on {} for the listeners; send SIGQUIT to the running proxy",
                sock.display()
            ),
            _ = terminate.recv() => stop_waiting(&sock, "SIGTERM"),
            _ = interrupt.recv() => stop_waiting(&sock, "SIGINT"),
            phase = phases.recv() => match phase {
                Ok(ExecutionPhase::BootstrapComplete) | Err(broadcast::error::RecvError::Closed) => {
                    listening.store(true, Ordering::Release);
                    return;
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            },
        }
    }
}

/// Exits a new process that holds no listeners yet, its upgrade socket
/// removed first, so that a SIGQUIT to the running proxy finds no one to
/// hand them to and leaves it serving.
fn stop_waiting(sock: &Path, signal: &str) -> ! {
    let _ = std::fs::remove_file(sock);
    info!(
        "{signal}: stopped waiting on {} for the listeners; the running proxy keeps them",
        sock.display()
    );
    log::logger().flush();
    std::process::exit(0);
}

/// Waits until no request is in flight, or `grace` has passed, and exits,
/// with the access log's lines written out.
fn drain(in_flight: &IntGauge, grace: Duration, access_log: Option<&AccessLog>) {
    let deadline = Instant::now() + grace;
    // Let pingora close the listeners, and the clients that keep sending
    // take their last call, before counting.
    std::thread::sleep(LAST_CALL.min(grace).max(Duration::from_millis(50)));
    while in_flight.get() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = in_flight.get();
    if left > 0 {
        warn!("grace period over with {left} request(s) in flight; exiting");
    } else {
        info!("drained; exiting");
    }
    // A request's line is queued before it stops counting as in flight.
    if let Some(log) = access_log {
        log.flush();
    }
    log::logger().flush();
    std::process::exit(0);
}

/// pingora opens the upgrade socket to everyone: its directory must keep
/// other users out (SECURITY.md, "Local users").
fn warn_if_others_can_reach(sock: &Path) {
    let directory = crate::config::directory_of(sock);
    let Ok(metadata) = std::fs::metadata(directory) else {
        return;
    };
    if metadata.permissions().mode() & 0o011 != 0 {
        warn!(
            "the directory of [server] upgrade_sock, {}, can be opened by other users (mode {:o}): during an upgrade, one of them could hand the new process listeners of their own; make it 0700",
            directory.display(),
            metadata.permissions().mode() & 0o7777
        );
    }
}

/// Whether a process listens on the Unix socket at `path`: a new process
/// waiting for the listeners. A socket file alone is not one: a new
/// process killed while it waited leaves its file behind, and pingora,
/// finding no one there, would stop accepting all the same, with no one
/// to take over. Read from `/proc/net/unix` (a connection to try it would
/// be taken for the hand-over); without it, the file has to do.
fn someone_listens_on(path: &Path) -> bool {
    match std::fs::read_to_string("/proc/net/unix") {
        Ok(table) => {
            let absolute = std::env::current_dir().map(|cwd| cwd.join(path)).ok();
            listening_unix_paths(&table).any(|listening| {
                Path::new(listening) == path || Some(Path::new(listening)) == absolute.as_deref()
            })
        }
        Err(_) => is_socket(path),
    }
}

/// The paths of the listening sockets in `/proc/net/unix`'s table (`Num
/// RefCount Protocol Flags Type St Inode Path`; `__SO_ACCEPTCON` in `Flags`).
fn listening_unix_paths(table: &str) -> impl Iterator<Item = &str> {
    const ACCEPTING: u32 = 0x0001_0000;
    table.lines().skip(1).filter_map(|line| {
        let mut fields = [""; 7];
        let mut rest = line;
        for field in &mut fields {
            rest = rest.trim_start();
            (*field, rest) = rest.split_at(rest.find(' ').unwrap_or(rest.len()));
        }
        // The path is the rest of the line after one space, spaces and all.
        let path = rest.strip_prefix(' ').unwrap_or_default();
        let flags = u32::from_str_radix(fields[3], 16).ok()?;
        (flags & ACCEPTING != 0 && !path.is_empty()).then_some(path)
    })
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_socket())
}

/// SIGHUP reads the listeners' certificate and key again (and nothing
/// else of the config). Without TLS it does nothing: a stray hangup must
/// not kill the proxy, as SIGHUP's default would.
async fn reload_on_sighup(
    hangups: Option<Signal>,
    certificate: Option<Arc<ListenerCertificate>>,
    metrics: Arc<Metrics>,
) {
    let Some(mut hangups) = hangups else {
        return;
    };
    while hangups.recv().await.is_some() {
        match &certificate {
            None => info!("SIGHUP: no TLS listener, nothing to reload"),
            Some(certificate) => match certificate.reload() {
                Ok(()) => {
                    info!("SIGHUP: listeners' certificate reloaded");
                    report_expiry(certificate, &metrics);
                }
                Err(problem) => warn!("SIGHUP: certificate kept, cannot reload: {problem}"),
            },
        }
    }
}

/// SIGUSR1 reopens the access log file, as nginx does: logrotate moves
/// the file away, then signals (`postrotate`). Watched even without an
/// access log: a stray SIGUSR1 must not kill the proxy, as its default
/// would. (pingora uses SIGUSR1 only in daemon mode, which is off.)
async fn reopen_on_sigusr1(signals: Option<Signal>, access_log: Option<Arc<AccessLog>>) {
    let Some(mut signals) = signals else {
        return;
    };
    while signals.recv().await.is_some() {
        match &access_log {
            None => info!("SIGUSR1: no access log, nothing to reopen"),
            Some(log) => log.reopen(),
        }
    }
}

/// How long before its expiry a certificate gets a WARN line.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// Puts the listeners' certificate's expiry in the metrics, and warns when
/// it is near or past: rustls serves an expired certificate as any other,
/// and clients refuse it.
fn report_expiry(certificate: &ListenerCertificate, metrics: &Metrics) {
    let Some(not_after) = certificate.not_after() else {
        warn!("cannot read the expiry date of the listeners' certificate");
        return;
    };
    metrics.certificate_expires(not_after);
    let left = not_after.saturating_sub(crate::session::now() as i64);
    if left <= 0 {
        warn!("the listeners' TLS certificate has EXPIRED: clients will refuse it; renew it and send SIGHUP");
    } else if left < EXPIRY_WARNING.as_secs() as i64 {
        warn!(
            "the listeners' TLS certificate expires in {} day(s); renew it and send SIGHUP",
            left / 86_400
        );
    }
}

/// For `session-proxy check`: the config is valid and the store answers.
pub fn check_store(config: &Config) -> Result<(), String> {
    let runtime = store_runtime()?;
    runtime.block_on(async {
        let store: Arc<dyn Store> = store::open(config).await.map_err(|e| e.to_string())?;
        store.ping().await.map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listening_sockets_with_a_path_are_read_from_proc_net_unix() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path
0000000079d90bfd: 00000002 00000000 00010000 0001 01  4794 /run/session-proxy/upgrade.sock
000000008f81adb6: 00000002 00000000 00000000 0001 01 10478 /run/stale.sock
00000000ecbd1cb3: 00000003 00000000 00000000 0001 03  1146
000000001322f49f: 00000002 00000000 00010000 0001 01 41146 /tmp/a dir/up grade.sock
00000000aa22f49f: 00000002 00000000 00010000 0001 01 41147 @abstract
";
        let listening: Vec<&str> = listening_unix_paths(table).collect();
        assert_eq!(
            listening,
            [
                "/run/session-proxy/upgrade.sock",
                "/tmp/a dir/up grade.sock",
                "@abstract"
            ]
        );
    }
}
