//! Assembles the running proxy: the store (on a runtime of its own, which
//! also runs the sweeper), the pingora proxy service, the admin service,
//! and a shutdown that drains in-flight requests for at most
//! `grace_period`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::net::TcpSocket;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::Admin;
use crate::config::Config;
use crate::limits::{ClientTimeouts, Clocked};
use crate::metrics::Metrics;
use crate::proxy::SessionProxy;
use crate::store::{self, Expiry, Store};
use crate::tls::ListenerCertificate;

/// Runs the proxy until SIGTERM or SIGINT; exits the process when drained.
pub fn run(config: Config) -> Result<(), String> {
    let store_runtime = store_runtime()?;
    store_runtime.block_on(async { can_listen(&config) })?;
    let store = store_runtime
        .block_on(store::open(&config))
        .map_err(|e| e.to_string())?;
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

    let proxy = SessionProxy::new(&config, store.clone(), metrics.clone())?;
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
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, pingora_conf);
    server.bootstrap();
    let pingora_conf = server.configuration.clone();

    // Every client connection on a clock: slow heads and idle connections end.
    let timeouts = ClientTimeouts {
        header: Duration::from_secs(config.server.header_timeout),
        keepalive: Duration::from_secs(config.server.keepalive_timeout),
        send: Duration::from_secs(config.server.send_timeout),
    };
    let mut proxy_service = pingora::services::listening::Service::new(
        "session-proxy".to_string(),
        Clocked::new(pingora::proxy::http_proxy(&pingora_conf, proxy), timeouts),
    );
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
    store_runtime.spawn(reload_on_sighup(certificate.clone(), metrics.clone()));
    for address in &config.server.listen {
        match &certificate {
            Some(certificate) => proxy_service.add_tls_with_settings(
                &address.to_string(),
                None,
                certificate.listener_settings()?,
            ),
            None => proxy_service.add_tcp(&address.to_string()),
        }
    }
    server.add_service(proxy_service);

    if let Some(address) = config.server.admin_listen {
        let admin = Admin::new(store, metrics);
        let mut admin_service = pingora::services::listening::Service::new(
            "session-proxy admin".to_string(),
            Clocked::new(
                pingora::apps::http_app::HttpServer::new_app(admin),
                timeouts,
            ),
        );
        admin_service.add_tcp(&address.to_string());
        server.add_service(admin_service);
    }

    info!(
        "session-proxy listening on {:?}, upstream {:?}, {:?} store",
        config.server.listen, config.upstream.addresses, config.store.kind
    );
    let drain = DrainOnSignal {
        in_flight,
        grace: Duration::from_secs(config.server.grace_period),
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(drain),
    });
    // pingora returns only after its own backstop grace period.
    drop(store_runtime);
    Ok(())
}

/// Whether every listen and admin address can be bound now.
fn can_listen(config: &Config) -> Result<(), String> {
    let admin = config.server.admin_listen.iter();
    config
        .server
        .listen
        .iter()
        .chain(admin)
        .try_for_each(can_listen_on)
}

/// Whether `address` can be bound now. pingora binds in a task of its
/// own, and a failure there ends only that task: the process would go on
/// serving nothing, its /healthz saying ok. As pingora's listeners do, the
/// check reuses an address in TIME_WAIT (a restart), but not one that a
/// listening socket holds.
fn can_listen_on(address: &SocketAddr) -> Result<(), String> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(*address)
        })
        .map_err(|e| format!("cannot listen on {address}: {e}"))
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

/// On SIGTERM or SIGINT: pingora stops accepting, and we exit as soon as
/// no request is in flight, or when `grace` has passed. pingora alone
/// would always sleep its whole grace period, even when idle.
struct DrainOnSignal {
    in_flight: Arc<AtomicUsize>,
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut terminate), Ok(mut interrupt)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            warn!("cannot watch SIGTERM/SIGINT; stop the proxy with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: draining for at most {:?}", self.grace),
            _ = interrupt.recv() => info!("SIGINT: draining for at most {:?}", self.grace),
        }
        let in_flight = self.in_flight.clone();
        let deadline = Instant::now() + self.grace;
        std::thread::spawn(move || {
            // Let pingora close the listeners before counting.
            std::thread::sleep(Duration::from_millis(50));
            while in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let left = in_flight.load(Ordering::Acquire);
            if left > 0 {
                warn!("grace period over with {left} request(s) in flight; exiting");
            } else {
                info!("drained; exiting");
            }
            log::logger().flush();
            std::process::exit(0);
        });
        ShutdownSignal::GracefulTerminate
    }
}

/// SIGHUP reads the listeners' certificate and key again (and nothing
/// else of the config). Without TLS it does nothing: a stray hangup must
/// not kill the proxy, as SIGHUP's default would.
async fn reload_on_sighup(certificate: Option<Arc<ListenerCertificate>>, metrics: Arc<Metrics>) {
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        warn!("cannot watch SIGHUP: a renewed certificate will take a restart");
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
