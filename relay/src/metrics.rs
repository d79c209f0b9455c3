//! Metrics in the OpenMetrics text format, by `prometheus-client` (the official Rust
//! client: typed families whose label sets are Rust types, so nothing a client sends can
//! add a label value beyond the route templates and the standard methods).
//!
//! What is kept: request counts and latencies by method, route template (never a queue
//! id) and status; the relay's counters; and at each scrape a snapshot of the listener's
//! counters, the account count and the engine's `stats()`.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::routes::AppState;

/// The exposition's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

/// The relay's own metrics (counters are shared handles: cloning one counts into the same
/// series).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    pub accounts_created: Counter,
    pub accounts_deleted: Counter,
    pub tokens_rotated: Counter,
    pub messages_sent: Counter,
    pub messages_deduplicated: Counter,
    pub bytes_sent: Counter,
    pub messages_acked: Counter,
    pub messages_pushed_ws: Counter,
    pub limited_client: Counter,
    pub limited_recipient: Counter,
    pub limited_accounts: Counter,
    pub ws_open: Gauge,
    pub ws_refused: Counter,
    /// Sessions closed because a newer one for the same queue took their place.
    pub ws_displaced: Counter,
}

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

pub fn inc(c: &Counter, n: u64) {
    c.inc_by(n);
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "cinder_relay_http_requests",
            "HTTP requests by method (a standard one or `other`), route template and status",
            requests.clone(),
        );
        let latency =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "cinder_relay_http_request_duration_seconds",
            "HTTP request latency by method and route template (WebSocket: until the upgrade)",
            latency.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let accounts_created = counter(
            "cinder_relay_accounts_created",
            "Accounts created since start",
        );
        let accounts_deleted = counter(
            "cinder_relay_accounts_deleted",
            "Accounts deleted since start",
        );
        let tokens_rotated = counter(
            "cinder_relay_tokens_rotated",
            "Account tokens replaced since start",
        );
        let messages_sent = counter(
            "cinder_relay_messages_sent",
            "Messages accepted (201) since start",
        );
        let messages_deduplicated = counter(
            "cinder_relay_messages_deduplicated",
            "Sends answered 200 with an earlier message's id: their Idempotency-Key repeated one on record",
        );
        let bytes_sent = counter(
            "cinder_relay_message_bytes_sent",
            "Payload bytes accepted since start",
        );
        let messages_acked = counter(
            "cinder_relay_messages_acked",
            "Messages acked (HTTP and WebSocket) since start",
        );
        let messages_pushed_ws = counter(
            "cinder_relay_messages_pushed",
            "Messages pushed over WebSocket since start",
        );
        let limited_client = counter(
            "cinder_relay_rate_limited_client",
            "Sends refused by the per-client rate limit",
        );
        let limited_recipient = counter(
            "cinder_relay_rate_limited_recipient",
            "Sends refused by the per-recipient inbound-bytes budget",
        );
        let limited_accounts = counter(
            "cinder_relay_rate_limited_accounts",
            "Account creations refused by the per-client limit",
        );
        let ws_refused = counter(
            "cinder_relay_websockets_refused",
            "WebSocket sessions refused at the session cap",
        );
        let ws_displaced = counter(
            "cinder_relay_websockets_displaced",
            "WebSocket sessions closed (4001) because a newer one took their queue's place",
        );
        let ws_open = Gauge::default();
        registry.register(
            "cinder_relay_websockets_open",
            "Open WebSocket sessions",
            ws_open.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            accounts_created,
            accounts_deleted,
            tokens_rotated,
            messages_sent,
            messages_deduplicated,
            bytes_sent,
            messages_acked,
            messages_pushed_ws,
            limited_client,
            limited_recipient,
            limited_accounts,
            ws_open,
            ws_refused,
            ws_displaced,
        }
    }
}

/// What a scrape reads at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub stats: cinder::Stats,
    pub accounts: u64,
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
}

impl Metrics {
    pub fn observe(&self, method: &'static str, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                method,
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The exposition text.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut o = String::with_capacity(16 << 10);
        let scraped = scrape_registry(snap);
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut o, &self.registry);
        let _ = encode_registry(&mut o, &scraped);
        let _ = encode_eof(&mut o);
        o
    }
}

/// The values read at scrape time, as constant metrics of a registry of their own.
fn scrape_registry(snap: &Snapshot) -> Registry {
    let mut r = Registry::default();
    scrape_gauges(&mut r, snap);
    scrape_counters(&mut r, snap);
    scrape_times(&mut r, &snap.stats);
    r
}

fn scrape_gauges(r: &mut Registry, snap: &Snapshot) {
    let s = &snap.stats;
    let gauges: [(&str, &str, u64); 9] = [
        ("cinder_relay_accounts", "Accounts (recipient queues) registered", snap.accounts),
        (
            "cinder_relay_connections_open",
            "Open client sockets (HTTP and WebSocket)",
            snap.connections_open,
        ),
        ("cinder_queues", "Queues in the engine's index", s.queues),
        ("cinder_segments", "Segment files, each with its own key", s.segments),
        (
            "cinder_bytes_on_disk",
            "Bytes the data dir occupies on disk (segments, preallocation included, and the key files)",
            s.bytes_on_disk,
        ),
        (
            "cinder_live_messages",
            "Messages stored, not acked, not yet removed as expired (all queues)",
            s.live_messages,
        ),
        (
            "cinder_dead_records",
            "Acked or expired records still on disk, awaiting shredding",
            s.dead_records,
        ),
        ("cinder_live_keys", "Data keys in the keystore", s.live_keys),
        (
            "cinder_uncompactable_segments",
            "Segments no compaction can empty (a record that does not open)",
            s.uncompactable_segments,
        ),
    ];
    for (name, help, v) in gauges {
        r.register(name, help, ConstGauge::new(v));
    }
}

fn scrape_counters(r: &mut Registry, snap: &Snapshot) {
    let s = &snap.stats;
    let counters: [(&str, &str, u64); 6] = [
        (
            "cinder_relay_connections_accepted",
            "Client sockets accepted",
            snap.connections_accepted,
        ),
        (
            "cinder_relay_connections_refused",
            "Client sockets refused (503) at the connection cap",
            snap.connections_refused,
        ),
        (
            "cinder_shreds",
            "Segments shredded (key destroyed, file removed) since start",
            s.shreds,
        ),
        ("cinder_bytes_appended", "Frame bytes appended since start", s.bytes_appended),
        (
            "cinder_compaction_bytes_copied",
            "Frame bytes copied by compaction since start",
            s.bytes_copied,
        ),
        (
            "cinder_compaction_retries",
            "Compactions that failed for a reason that may pass (disk full, key provider) and were retried",
            s.compaction_retries,
        ),
    ];
    for (name, help, v) in counters {
        r.register(name, help, ConstCounter::new(v));
    }
}

fn scrape_times(r: &mut Registry, s: &cinder::Stats) {
    let secs = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    let times: [(&str, &str, f64); 8] = [
        (
            "cinder_oldest_live_segment_age_seconds",
            "Age of the oldest segment holding a live message (0 when none)",
            secs(s.oldest_live_age),
        ),
        (
            "cinder_shred_latency_p50_seconds",
            "Median time from a segment's first dead record to its key's destruction, over recent shreds",
            secs(s.shred_latency_p50),
        ),
        (
            "cinder_shred_latency_p99_seconds",
            "99th percentile of that time over recent shreds",
            secs(s.shred_latency_p99),
        ),
        (
            "cinder_shred_latency_max_seconds",
            "The longest of that time over recent shreds",
            secs(s.shred_latency_max),
        ),
        (
            "cinder_oldest_dead_openable_age_seconds",
            "How long the oldest still-decryptable dead record has been dead (0 when none)",
            secs(s.oldest_dead_openable_age),
        ),
        (
            "cinder_shred_overrun_max_seconds",
            "The most by which any dead record outlived max_shred_delay since start (0 while the deadline holds)",
            s.shred_overrun_max.as_secs_f64(),
        ),
        (
            "cinder_write_amplification",
            "Bytes written per byte appended (appends plus compaction copies)",
            s.write_amplification,
        ),
        (
            "cinder_gc_error",
            "1 if the engine's last background maintenance failed",
            f64::from(u8::from(s.last_gc_error.is_some())),
        ),
    ];
    for (name, help, v) in times {
        r.register(name, help, ConstGauge::new(v));
    }
}

/// The `method` label: the standard methods by name, anything else `other`, so made-up
/// methods cannot grow the label set.
fn method_label(m: &axum::http::Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    KNOWN
        .iter()
        .find(|k| **k == m.as_str())
        .copied()
        .unwrap_or("other")
}

/// Middleware: counts and times every request under its route template, and writes the
/// access log line (method, route template, status, latency: never a queue id, token or
/// client address).
pub async fn track(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    app.metrics.observe(method, &route, status, elapsed);
    tracing::info!(
        target: "cinder_relay::access",
        method,
        route = %route,
        status,
        micros = elapsed.as_micros() as u64,
        "request"
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_routes_relay_counters_and_engine_stats() {
        let m = Metrics::default();
        m.observe(
            "PUT",
            "/v1/queues/{queue}/messages",
            201,
            Duration::from_millis(3),
        );
        m.observe(
            "PUT",
            "/v1/queues/{queue}/messages",
            404,
            Duration::from_millis(1),
        );
        inc(&m.messages_sent, 3);
        let snap = Snapshot {
            stats: cinder::Stats {
                segments: 3,
                shreds: 2,
                ..cinder::Stats::default()
            },
            accounts: 5,
            ..Snapshot::default()
        };
        let text = m.render(&snap);
        assert!(
            text.contains(
                "cinder_relay_http_requests_total{method=\"PUT\",route=\"/v1/queues/{queue}/messages\",status=\"201\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("cinder_relay_http_request_duration_seconds_count{method=\"PUT\",route=\"/v1/queues/{queue}/messages\"} 2"));
        assert!(text.contains("cinder_relay_messages_sent_total 3\n"));
        assert!(text.contains("cinder_segments 3\n"));
        assert!(text.contains("cinder_shreds_total 2\n"));
        assert!(text.contains("cinder_relay_accounts 5\n"));
        assert!(text.ends_with("# EOF\n"));
        // One EOF only, at the end: two registries are written as one exposition.
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
