//! The admin listener: `GET /healthz` and `GET /metrics` (SPEC \[7\]).
//! `HEAD` answers the same head without the body; any other method is a
//! 405 naming the two: neither path changes anything, and a 200 to a
//! `DELETE /metrics` would suggest it had.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::limits;
use crate::metrics::Metrics;
use crate::store::Store;

pub struct Admin {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Admin {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Admin {
        Admin { store, metrics }
    }
}

/// A health check must answer even when the store hangs.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the store answers, within [`PING_TIMEOUT`]. The check runs to
/// its end in a task of its own, bounded by the store's own timeout
/// (`[store] timeout`, which may be longer): one cut off here would not
/// reach that timeout, where a Redis or PostgreSQL store gives up the
/// connection it found silent (a black hole, a firewall that dropped the
/// flow). That connection stayed the thread's, and `/healthz` said 503 for
/// good while requests, which do reach the timeout, were served again.
async fn store_answers(store: &Arc<dyn Store>) -> bool {
    let store = store.clone();
    let check = tokio::spawn(async move { store.health().await });
    matches!(
        tokio::time::timeout(PING_TIMEOUT, check).await,
        Ok(Ok(Ok(())))
    )
}

#[async_trait]
impl ServeHttp for Admin {
    /// Its connections are on the proxy's clocks (`limits`, wrapped in
    /// `server`): a slow head is cut off, an idle connection closed.
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        limits::head_received(session);
        let request = session.req_header();
        let path = request.uri.path().to_owned();
        let readable = request.method == Method::GET || request.method == Method::HEAD;
        let (status, content_type, body) = match path.as_str() {
            "/healthz" | "/metrics" if !readable => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                format!("method not allowed: {path} answers GET and HEAD").into_bytes(),
            ),
            "/healthz" => match store_answers(&self.store).await {
                true => (StatusCode::OK, "text/plain", b"ok".to_vec()),
                false => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    b"session store unavailable".to_vec(),
                ),
            },
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render().into_bytes(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: try /healthz or /metrics".to_vec(),
            ),
        };
        // The answer is a few KB, written at once: the idle clock can start.
        limits::await_next_request(session);
        let mut response = Response::builder().status(status);
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response = response.header(http::header::ALLOW, "GET, HEAD");
        }
        response
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}
