//! What the run counts: sends by outcome, deliveries, and two latencies — a send's
//! request to its `201`, and a message's acceptance (its `201` reaching the sender) to
//! its delivery on the recipient's socket.
//!
//! A delivery can reach its socket before the `201` reaches the sender (the relay
//! pushes once the message is durable, the moment it answers): the two events meet in
//! a sharded map keyed by message id, and such a delivery counts as latency 0.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

const SHARDS: usize = 64;

/// The first of the two events seen for a message.
enum Seen {
    Accepted(Instant),
    Delivered,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub send_errors: AtomicU64,
}

pub struct Tally {
    pub counters: Counters,
    pending: Vec<Mutex<HashMap<u64, Seen>>>,
    /// Microseconds: request → `201`, and acceptance → delivery.
    send_latency: Mutex<Histogram<u64>>,
    e2e_latency: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            counters: Counters::default(),
            pending: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            send_latency: Mutex::new(histogram()),
            e2e_latency: Mutex::new(histogram()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Percentiles of one latency, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    Percentiles {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

impl Tally {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Seen>> {
        &self.pending[(id as usize) % SHARDS]
    }

    /// A `201` for message `id`, `took` after its request was sent.
    pub fn accepted(&self, id: u64, took: Duration) {
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        let _ = self.send_latency.lock().record(micros(took));
        let now = Instant::now();
        let mut m = self.shard(id).lock();
        match m.remove(&id) {
            Some(Seen::Delivered) => {
                drop(m);
                let _ = self.e2e_latency.lock().record(1);
            }
            _ => {
                m.insert(id, Seen::Accepted(now));
            }
        }
    }

    /// Message `id` arrived on a recipient's socket.
    pub fn delivered(&self, id: u64) {
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut m = self.shard(id).lock();
        match m.remove(&id) {
            Some(Seen::Accepted(at)) => {
                drop(m);
                let _ = self
                    .e2e_latency
                    .lock()
                    .record(micros(now.saturating_duration_since(at)));
            }
            Some(Seen::Delivered) | None => {
                // Before its 201, or delivered twice (a reconnect's redelivery).
                m.insert(id, Seen::Delivered);
            }
        }
    }

    /// A send that did not get its `201`: by status (or by transport error).
    pub fn send_failed(&self, what: String) {
        self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
        *self.errors.lock().entry(what).or_default() += 1;
    }

    /// Accepted messages not delivered (yet).
    pub fn undelivered(&self) -> u64 {
        self.pending
            .iter()
            .map(|m| {
                m.lock()
                    .values()
                    .filter(|s| matches!(s, Seen::Accepted(_)))
                    .count() as u64
            })
            .sum()
    }

    pub fn send_percentiles(&self) -> Percentiles {
        percentiles(&self.send_latency.lock())
    }

    pub fn e2e_percentiles(&self) -> Percentiles {
        percentiles(&self.e2e_latency.lock())
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceptance_and_delivery_meet_in_either_order() {
        let t = Tally::default();
        t.accepted(1, Duration::from_millis(2));
        std::thread::sleep(Duration::from_millis(5));
        t.delivered(1);
        t.delivered(2);
        t.accepted(2, Duration::from_millis(1));
        t.accepted(3, Duration::from_millis(1));
        let e = t.e2e_percentiles();
        assert_eq!(e.count, 2);
        assert!(e.max_us >= 5_000, "{e:?}");
        assert_eq!(t.undelivered(), 1, "message 3");
        assert_eq!(t.send_percentiles().count, 3);
    }
}
