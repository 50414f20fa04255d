//! A benchmark baseline, not part of the product: pingora's reverse proxy
//! with nothing of ours in it but the allocator and the server settings.
//! `benches/run.sh` runs it as the `pingora` target, so that one run shows
//! how far the bypassed path is from the engine it is built on, and how far
//! the engine is from nginx (issue 5).
//!
//! ```sh
//! cargo run --release --example bare_pingora -- 127.0.0.1:8080 127.0.0.1:8000
//! ```

mod baseline;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::Result;

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
    let (listen, upstream) = baseline::command_line("bare_pingora");
    let mut server = baseline::server();
    let bare = Bare {
        peer: baseline::peer(upstream),
    };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, bare);
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
