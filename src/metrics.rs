//! The Prometheus metrics of SPEC \[7\], served by the admin listener.

use prometheus::{
    Encoder, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry, TextEncoder,
};

/// Every metric the proxy exports. Cheap to update from the request path:
/// label values are resolved once, here.
pub struct Metrics {
    registry: Registry,
    pub requests_session: IntCounter,
    pub requests_bypass: IntCounter,
    /// Answers by status class, `1xx` to `5xx`: the rate of errors to
    /// alert on, the proxy's own 502, 503 and 504 among them.
    responses_by_class: [IntCounter; 5],
    /// Requests being served now; shutdown waits for this to reach zero.
    pub requests_in_flight: IntGauge,
    pub sessions_created: IntCounter,
    expired: IntCounterVec,
    /// Expired records the background sweep deleted.
    pub sessions_swept: IntCounter,
    pub forged_cookies: IntCounter,
    pub store_errors: IntCounter,
    pub invalid_updates: IntCounter,
    /// Access log lines dropped because its writer could not keep up.
    pub access_log_dropped: IntCounter,
    store_latency: HistogramVec,
    /// `store_latency` by op, resolved once: no label lookup per request.
    latency_by_op: [Histogram; 3],
    /// Exported only with TLS listeners: see [`Metrics::certificate_expires`].
    certificate_not_after: IntGauge,
}

/// A store operation, as the `op` label of the latency histogram.
#[derive(Debug, Clone, Copy)]
pub enum StoreOp {
    Load = 0,
    Save = 1,
    Delete = 2,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            prometheus::Opts::new(
                "session_proxy_requests_total",
                "Requests received, by path kind",
            ),
            &["path"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let responses = IntCounterVec::new(
            prometheus::Opts::new(
                "session_proxy_responses_total",
                "Requests answered, by status class (499, the client left first, is a 4xx)",
            ),
            &["class"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let expired = IntCounterVec::new(
            prometheus::Opts::new(
                "session_proxy_sessions_expired_total",
                "Signed cookies whose session could not be used, by reason",
            ),
            &["reason"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let store_latency = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "session_proxy_store_latency_seconds",
                "Latency of session store operations",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ]),
            &["op"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help)
                .unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
        };
        let metrics = Metrics {
            requests_session: requests.with_label_values(&["session"]),
            requests_bypass: requests.with_label_values(&["bypass"]),
            responses_by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| responses.with_label_values(&[class])),
            requests_in_flight: IntGauge::new(
                "session_proxy_requests_in_flight",
                "Requests being served now, from their head read to their log line",
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            sessions_created: counter(
                "session_proxy_sessions_created_total",
                "Sessions stored for the first time",
            ),
            sessions_swept: counter(
                "session_proxy_sessions_swept_total",
                "Expired sessions deleted by the background sweep",
            ),
            forged_cookies: counter(
                "session_proxy_forged_cookies_total",
                "Requests whose session cookie was malformed or wrongly signed",
            ),
            store_errors: counter(
                "session_proxy_store_errors_total",
                "Session store operations that failed",
            ),
            invalid_updates: counter(
                "session_proxy_invalid_updates_total",
                "Upstream responses refused for an invalid session update or action",
            ),
            access_log_dropped: counter(
                "session_proxy_access_log_dropped_total",
                "Access log lines dropped because the log's writer could not keep up",
            ),
            latency_by_op: ["load", "save", "delete"]
                .map(|op| store_latency.with_label_values(&[op])),
            certificate_not_after: IntGauge::new(
                "session_proxy_tls_certificate_not_after_seconds",
                "Unix time at which the listeners' TLS certificate expires",
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            expired,
            store_latency,
            registry,
        };
        for collector in [
            Box::new(requests) as Box<dyn prometheus::core::Collector>,
            Box::new(responses),
            Box::new(metrics.requests_in_flight.clone()),
            Box::new(metrics.expired.clone()),
            Box::new(metrics.sessions_created.clone()),
            Box::new(metrics.sessions_swept.clone()),
            Box::new(metrics.forged_cookies.clone()),
            Box::new(metrics.store_errors.clone()),
            Box::new(metrics.invalid_updates.clone()),
            Box::new(metrics.access_log_dropped.clone()),
            Box::new(metrics.store_latency.clone()),
        ] {
            let _ = metrics.registry.register(collector);
        }
        for reason in ["idle", "absolute", "ip", "missing"] {
            metrics.expired.with_label_values(&[reason]);
        }
        metrics
    }

    /// Counts an answer of `status` in its class; none outside 100..=599.
    pub fn responded(&self, status: u16) {
        let class = usize::from(status / 100).wrapping_sub(1);
        if let Some(counter) = self.responses_by_class.get(class) {
            counter.inc();
        }
    }

    pub fn expired(&self, reason: &str) {
        self.expired.with_label_values(&[reason]).inc();
    }

    /// The listeners' certificate expires at `unix` seconds: exported from
    /// the first call on, for alerts before it does.
    pub fn certificate_expires(&self, unix: i64) {
        // A second registration fails, harmlessly: the gauge is in already.
        let _ = self
            .registry
            .register(Box::new(self.certificate_not_after.clone()));
        self.certificate_not_after.set(unix);
    }

    pub fn observe_store(&self, op: StoreOp, seconds: f64) {
        self.latency_by_op[op as usize].observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
