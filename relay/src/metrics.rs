//! Prometheus text exposition: request counts and latencies by route (the route
//! template, never a queue id), relay totals, and the engine's `stats()`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use parking_lot::Mutex;

use crate::routes::AppState;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
struct RouteStats {
    by_status: BTreeMap<u16, u64>,
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters of the relay itself.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), RouteStats>>,
    pub accounts_created: AtomicU64,
    pub accounts_deleted: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_acked: AtomicU64,
    pub messages_pushed_ws: AtomicU64,
    pub limited_client: AtomicU64,
    pub limited_recipient: AtomicU64,
    pub limited_accounts: AtomicU64,
    pub ws_open: AtomicU64,
    pub ws_refused: AtomicU64,
    /// Sessions closed because a newer one for the same queue took their place.
    pub ws_displaced: AtomicU64,
}

pub fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut routes = self.routes.lock();
        let r = routes
            .entry((method.to_string(), route.to_string()))
            .or_default();
        *r.by_status.entry(status).or_default() += 1;
        r.count += 1;
        r.sum += secs;
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                r.buckets[i] += 1;
            }
        }
    }

    /// The exposition text.
    pub fn render(
        &self,
        stats: &cinder::Stats,
        accounts: usize,
        conn: &crate::server::ConnStats,
    ) -> String {
        let mut o = String::with_capacity(8192);
        self.render_routes(&mut o);
        self.render_relay(&mut o, accounts);
        render_connections(&mut o, conn);
        render_engine(&mut o, stats);
        o
    }

    fn render_routes(&self, o: &mut String) {
        let routes = self.routes.lock();
        header(
            o,
            "cinder_relay_http_requests_total",
            "counter",
            "HTTP requests by method, route template and status.",
        );
        for ((m, r), s) in routes.iter() {
            for (status, n) in &s.by_status {
                let _ = writeln!(
                    o,
                    "cinder_relay_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                    esc(m),
                    esc(r)
                );
            }
        }
        let name = "cinder_relay_http_request_duration_seconds";
        header(
            o,
            name,
            "histogram",
            "HTTP request latency by method and route template (WebSocket: until the upgrade).",
        );
        for ((m, r), s) in routes.iter() {
            let labels = format!("method=\"{}\",route=\"{}\"", esc(m), esc(r));
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{le}\"}} {}", s.buckets[i]);
            }
            let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", s.count);
            let _ = writeln!(o, "{name}_sum{{{labels}}} {}", s.sum);
            let _ = writeln!(o, "{name}_count{{{labels}}} {}", s.count);
        }
    }

    fn render_relay(&self, o: &mut String, accounts: usize) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let samples: [(&str, &str, &str, u64); 13] = [
            (
                "cinder_relay_accounts",
                "gauge",
                "Accounts (recipient queues) registered.",
                accounts as u64,
            ),
            (
                "cinder_relay_accounts_created_total",
                "counter",
                "Accounts created since start.",
                get(&self.accounts_created),
            ),
            (
                "cinder_relay_accounts_deleted_total",
                "counter",
                "Accounts deleted since start.",
                get(&self.accounts_deleted),
            ),
            (
                "cinder_relay_messages_sent_total",
                "counter",
                "Messages accepted (201) since start.",
                get(&self.messages_sent),
            ),
            (
                "cinder_relay_message_bytes_sent_total",
                "counter",
                "Payload bytes accepted since start.",
                get(&self.bytes_sent),
            ),
            (
                "cinder_relay_messages_acked_total",
                "counter",
                "Messages acked (HTTP and WebSocket) since start.",
                get(&self.messages_acked),
            ),
            (
                "cinder_relay_messages_pushed_total",
                "counter",
                "Messages pushed over WebSocket since start.",
                get(&self.messages_pushed_ws),
            ),
            (
                "cinder_relay_rate_limited_client_total",
                "counter",
                "Sends refused by the per-client rate limit.",
                get(&self.limited_client),
            ),
            (
                "cinder_relay_rate_limited_recipient_total",
                "counter",
                "Sends refused by the per-recipient inbound-bytes budget.",
                get(&self.limited_recipient),
            ),
            (
                "cinder_relay_rate_limited_accounts_total",
                "counter",
                "Account creations refused by the per-client limit.",
                get(&self.limited_accounts),
            ),
            (
                "cinder_relay_websockets_open",
                "gauge",
                "Open WebSocket sessions.",
                get(&self.ws_open),
            ),
            (
                "cinder_relay_websockets_refused_total",
                "counter",
                "WebSocket sessions refused at the connection cap.",
                get(&self.ws_refused),
            ),
            (
                "cinder_relay_websockets_displaced_total",
                "counter",
                "WebSocket sessions closed (4001) because a newer one took their queue's place.",
                get(&self.ws_displaced),
            ),
        ];
        for (name, kind, help, v) in samples {
            header(o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
        }
    }
}

/// The listener's counters.
fn render_connections(o: &mut String, conn: &crate::server::ConnStats) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "cinder_relay_connections_open",
            "gauge",
            "Open client sockets (HTTP and WebSocket).",
            get(&conn.open),
        ),
        (
            "cinder_relay_connections_accepted_total",
            "counter",
            "Client sockets accepted.",
            get(&conn.accepted),
        ),
        (
            "cinder_relay_connections_refused_total",
            "counter",
            "Client sockets refused (503) at the connection cap.",
            get(&conn.refused),
        ),
    ] {
        header(o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
}

/// The engine's `stats()`.
fn render_engine(o: &mut String, stats: &cinder::Stats) {
    let samples: [(&str, &str, &str, u64); 11] = [
        (
            "cinder_queues",
            "gauge",
            "Queues in the engine's index.",
            stats.queues,
        ),
        (
            "cinder_segments",
            "gauge",
            "Segment files, each with its own key.",
            stats.segments,
        ),
        (
            "cinder_bytes_on_disk",
            "gauge",
            "Bytes of segment data and keystore on disk.",
            stats.bytes_on_disk,
        ),
        (
            "cinder_live_messages",
            "gauge",
            "Messages stored, not acked, not yet removed as expired (all queues).",
            stats.live_messages,
        ),
        (
            "cinder_dead_records",
            "gauge",
            "Acked or expired records still on disk, awaiting shredding.",
            stats.dead_records,
        ),
        (
            "cinder_live_keys",
            "gauge",
            "Data keys in the keystore.",
            stats.live_keys,
        ),
        (
            "cinder_shreds_total",
            "counter",
            "Segments shredded (key destroyed, file removed) since start.",
            stats.shreds,
        ),
        (
            "cinder_bytes_appended_total",
            "counter",
            "Frame bytes appended since start.",
            stats.bytes_appended,
        ),
        (
            "cinder_compaction_bytes_copied_total",
            "counter",
            "Frame bytes copied by compaction since start.",
            stats.bytes_copied,
        ),
        (
            "cinder_compaction_retries_total",
            "counter",
            "Compactions that failed for a reason that may pass (disk full, key provider) and were retried.",
            stats.compaction_retries,
        ),
        (
            "cinder_uncompactable_segments",
            "gauge",
            "Segments no compaction can empty (a record that does not open).",
            stats.uncompactable_segments,
        ),
    ];
    for (name, kind, help, v) in samples {
        header(o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    render_engine_times(o, stats);
    header(
        o,
        "cinder_gc_error",
        "gauge",
        "1 if the engine's last background maintenance failed.",
    );
    let _ = writeln!(
        o,
        "cinder_gc_error {}",
        u8::from(stats.last_gc_error.is_some())
    );
}

/// The engine's ages and latencies, in seconds.
fn render_engine_times(o: &mut String, stats: &cinder::Stats) {
    header(
        o,
        "cinder_oldest_live_segment_age_seconds",
        "gauge",
        "Age of the oldest segment holding a live message (0 when none).",
    );
    let _ = writeln!(
        o,
        "cinder_oldest_live_segment_age_seconds {}",
        stats.oldest_live_age.map_or(0.0, |d| d.as_secs_f64())
    );
    header(
        o,
        "cinder_shred_latency_seconds",
        "gauge",
        "Time from a segment's first dead record to its key's destruction, over recent shreds (quantile 0.5, 0.99, 1 = max).",
    );
    for (q, v) in [
        ("0.5", stats.shred_latency_p50),
        ("0.99", stats.shred_latency_p99),
        ("1", stats.shred_latency_max),
    ] {
        let _ = writeln!(
            o,
            "cinder_shred_latency_seconds{{quantile=\"{q}\"}} {}",
            v.map_or(0.0, |d| d.as_secs_f64())
        );
    }
    header(
        o,
        "cinder_oldest_dead_openable_age_seconds",
        "gauge",
        "How long the oldest still-decryptable dead record has been dead (0 when none).",
    );
    let _ = writeln!(
        o,
        "cinder_oldest_dead_openable_age_seconds {}",
        stats
            .oldest_dead_openable_age
            .map_or(0.0, |d| d.as_secs_f64())
    );
    header(
        o,
        "cinder_shred_overrun_max_seconds",
        "gauge",
        "The most by which any dead record outlived max_shred_delay since start (0 while the deadline holds).",
    );
    let _ = writeln!(
        o,
        "cinder_shred_overrun_max_seconds {}",
        stats.shred_overrun_max.as_secs_f64()
    );
    header(
        o,
        "cinder_write_amplification",
        "gauge",
        "Bytes written per byte appended (appends plus compaction copies).",
    );
    let _ = writeln!(
        o,
        "cinder_write_amplification {}",
        stats.write_amplification
    );
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Middleware: counts and times every request under its route template.
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

pub async fn track(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method()).to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    app.metrics
        .observe(&method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_routes_and_engine_stats() {
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
        let s = cinder::Stats {
            segments: 3,
            shreds: 2,
            ..cinder::Stats::default()
        };
        let text = m.render(&s, 5, &crate::server::ConnStats::default());
        assert!(text.contains(
            "cinder_relay_http_requests_total{method=\"PUT\",route=\"/v1/queues/{queue}/messages\",status=\"201\"} 1"
        ));
        assert!(text.contains("cinder_relay_http_request_duration_seconds_count{method=\"PUT\",route=\"/v1/queues/{queue}/messages\"} 2"));
        assert!(text.contains("cinder_segments 3\n"));
        assert!(text.contains("cinder_shreds_total 2\n"));
        assert!(text.contains("cinder_relay_accounts 5\n"));
    }
}
