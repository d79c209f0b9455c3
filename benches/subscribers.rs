//! Memory and wake-up cost of pending subscriptions (`Store::subscribe`): 100,000
//! subscribers, each on its own queue (a relay's idle recipients), then on one queue.
//!
//! `cargo bench --bench subscribers` (a few seconds). Prints RSS per subscriber and the
//! time one append takes to wake them; results go to BENCHMARKS.md.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use cinder::{Durability, FileKeyProvider, Options, Store};

const N: usize = 100_000;

struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

fn run(store: &Store, queue_of: impl Fn(usize) -> String, label: &str) {
    let counter = Arc::new(Counter(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&counter));
    let mut cx = Context::from_waker(&waker);
    let (rss0, threads0) = (rss_bytes(), threads());
    let t = Instant::now();
    let mut subs = Vec::with_capacity(N);
    for i in 0..N {
        let mut s = store.subscribe(queue_of(i).as_bytes(), None).unwrap();
        assert!(Pin::new(&mut s).poll(&mut cx).is_pending());
        subs.push(s);
    }
    let made = t.elapsed();
    let (rss1, threads1) = (rss_bytes(), threads());
    let per = (rss1.saturating_sub(rss0)) as f64 / N as f64;
    let t = Instant::now();
    let distinct: std::collections::HashSet<String> = (0..N).map(&queue_of).collect();
    for q in &distinct {
        store
            .append(q.as_bytes(), b"x", Duration::from_secs(60))
            .unwrap();
    }
    let woke = t.elapsed();
    assert_eq!(counter.0.load(Ordering::Relaxed), N);
    println!(
        "{label}: {N} pending subscriptions: {per:.0} B RSS each ({:.1} MiB), threads {threads0} -> {threads1}, \
         made in {:.0} ms ({:.2} us each); {} appends woke all in {:.0} ms",
        (rss1 - rss0) as f64 / 1_048_576.0,
        made.as_secs_f64() * 1e3,
        made.as_secs_f64() * 1e6 / N as f64,
        distinct.len(),
        woke.as_secs_f64() * 1e3,
    );
    drop(subs);
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let mut o = Options::new(key);
    o.durability = Durability::Async;
    let store = Store::open(tmp.path().join("data"), o).unwrap();
    // Warm the allocator and the index so the first run does not pay for both.
    run(
        &store,
        |i| format!("warm-{i:06}"),
        "warm-up (queue per subscriber)",
    );
    run(
        &store,
        |i| format!("recipient-{i:06}"),
        "queue per subscriber",
    );
    run(&store, |_| "shared".to_string(), "one shared queue");
}
