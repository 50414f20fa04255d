//! A benchmark baseline, not part of the product: pingora's reverse proxy
//! with nothing of ours in it but the allocator and the server settings.
//! `benches/run.sh` runs it as the `pingora` target, so that one run shows
//! how far the bypassed path is from the engine it is built on, and how far
//! the engine is from nginx (issue 5).
//!
//! ```sh
//! cargo run --release --example bare_pingora -- 127.0.0.1:8080 127.0.0.1:8000
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::Result;

// The same allocator as the proxy's binary, so that only the proxying differs.
#[global_allocator]
static GLOBAL: session_proxy::allocator::MiMalloc = session_proxy::allocator::MiMalloc;

/// Every request to one upstream, with the peer options the proxy sets.
struct Bare {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: bare_pingora LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("bare_pingora: not an address: {upstream}");
        std::process::exit(2);
    };
    let mut peer = HttpPeer::new(upstream, false, String::new());
    peer.options.connection_timeout = Some(Duration::from_secs(2));
    peer.options.read_timeout = Some(Duration::from_secs(30));
    peer.options.write_timeout = Some(Duration::from_secs(30));
    peer.options.idle_timeout = Some(Duration::from_secs(60));

    // As `server::run` sets them: one current-thread runtime, no stealing.
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, Bare { peer });
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
