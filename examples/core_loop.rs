//! A benchmark experiment, not part of the product: the least an HTTP/1
//! proxy loop on pingora-core's own sessions and connector does (read the
//! request, send it upstream on a pooled connection, stream the response
//! back), without pingora-proxy's `HttpProxy`. It tells how much of
//! pingora's cost per request is the proxy layer and how much is the core
//! under it (issue 5, benches/HISTORY.md round 9). Requests without a body only;
//! no retries, no error pages, no upgrades.
//!
//! ```sh
//! cargo run --release --example core_loop -- 127.0.0.1:8080 127.0.0.1:8000
//! ```

mod baseline;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::connectors::http::Connector;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

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
    let (listen, upstream) = baseline::command_line("core_loop");
    let mut server = baseline::server();
    let app = CoreLoop {
        connector: Connector::new(None),
        peer: baseline::peer(upstream),
    };
    let mut service = pingora::services::listening::Service::new("core loop".to_string(), app);
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
