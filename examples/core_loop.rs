//! A benchmark experiment, not part of the product: the least an HTTP/1
//! proxy loop on pingora-core's own sessions and connector does (read the
//! request, send it upstream on a pooled connection, stream the response
//! back), without pingora-proxy's `HttpProxy`. It tells how much of
//! pingora's cost per request is the proxy layer and how much is the core
//! under it (issue 5, BENCHMARKS.md round 9). Requests without a body only;
//! no retries, no error pages, no upgrades.
//!
//! ```sh
//! cargo run --release --example core_loop -- 127.0.0.1:8080 127.0.0.1:8000
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::connectors::http::Connector;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};

#[global_allocator]
static GLOBAL: session_proxy::allocator::MiMalloc = session_proxy::allocator::MiMalloc;

struct CoreLoop {
    connector: Connector,
    peer: HttpPeer,
}

impl CoreLoop {
    /// One request; `None` when the connection cannot be reused.
    async fn proxy(&self, session: &mut ServerSession) -> Option<()> {
        if !session.read_request().await.ok()? {
            return None;
        }
        let request = Box::new(session.req_header().clone());
        let (mut upstream, _) = self.connector.get_http_session(&self.peer).await.ok()?;
        upstream.write_request_header(request).await.ok()?;
        upstream.finish_request_body().await.ok()?;
        upstream.read_response_header().await.ok()?;
        let response = Box::new(upstream.response_header()?.clone());
        session.write_response_header(response).await.ok()?;
        while let Some(chunk) = upstream.read_response_body().await.ok()? {
            session.write_response_body(chunk, false).await.ok()?;
        }
        session.finish_body().await.ok()?;
        self.connector
            .release_http_session(upstream, &self.peer, self.peer.options.idle_timeout)
            .await;
        Some(())
    }
}

#[async_trait]
impl HttpServerApp for CoreLoop {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        self.proxy(&mut session).await?;
        let settings = HttpPersistentSettings::for_session(&session);
        let reusable = session.finish().await.ok()??;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: core_loop LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("core_loop: not an address: {upstream}");
        std::process::exit(2);
    };
    let mut peer = HttpPeer::new(upstream, false, String::new());
    peer.options.connection_timeout = Some(Duration::from_secs(2));
    peer.options.read_timeout = Some(Duration::from_secs(30));
    peer.options.write_timeout = Some(Duration::from_secs(30));
    peer.options.idle_timeout = Some(Duration::from_secs(60));

    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let app = CoreLoop {
        connector: Connector::new(None),
        peer,
    };
    let mut service = pingora::services::listening::Service::new("core loop".to_string(), app);
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
