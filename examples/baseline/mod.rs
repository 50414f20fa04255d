//! What the two pingora baselines (`bare_pingora`, `core_loop`) share with
//! each other and with the proxy: the allocator, the server settings and
//! the upstream peer's options, so that only the proxying differs.

use std::net::SocketAddr;
use std::time::Duration;

use pingora::prelude::HttpPeer;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;

#[global_allocator]
static GLOBAL: session_proxy::allocator::MiMalloc = session_proxy::allocator::MiMalloc;

/// `PROGRAM LISTEN_ADDR UPSTREAM_ADDR`, or exit 2 with a usage line.
pub fn command_line(program: &str) -> (String, SocketAddr) {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: {program} LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("{program}: not an address: {upstream}");
        std::process::exit(2);
    };
    (listen, upstream)
}

/// The upstream with the timeouts the proxy sets by default.
pub fn peer(upstream: SocketAddr) -> HttpPeer {
    let mut peer = HttpPeer::new(upstream, false, String::new());
    peer.options.connection_timeout = Some(Duration::from_secs(2));
    peer.options.read_timeout = Some(Duration::from_secs(30));
    peer.options.write_timeout = Some(Duration::from_secs(30));
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    peer
}

/// As `server::run` sets it up: one current-thread runtime, no stealing.
pub fn server() -> Server {
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server
}
