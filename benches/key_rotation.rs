//! Append latency while the keyring is busy: Group appends from several threads into a
//! store holding many live data keys, first alone, then while master-key rotations
//! (every live key re-wrapped, the keystore rewritten) run back to back.
//!
//! `cargo bench --bench key_rotation` runs it in full (10,000 live keys; about a minute
//! to build them, then two measured phases); `cargo test --benches` runs a smoke of the
//! same code with 200 keys. Results go in BENCHMARKS.md ("Appends during key work").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/machine.rs"]
mod machine;

use cinder::{Durability, FileKeyProvider, KeyProvider, Options, Store};

struct Cfg {
    keys: usize,
    secs: f64,
    threads: usize,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let cfg = if full {
        Cfg {
            keys: 10_000,
            secs: 5.0,
            threads: 8,
        }
    } else {
        Cfg {
            keys: 200,
            secs: 0.3,
            threads: 4,
        }
    };
    let tmp =
        tempfile::tempdir_in(std::env::var("CINDER_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .unwrap();
    let (fsync_p50, fsync_p99) =
        machine::fsync_latency(tmp.path(), if full { 2000 } else { 20 }).unwrap();
    let key_a: Arc<dyn KeyProvider> =
        Arc::new(FileKeyProvider::create(tmp.path().join("key-a")).unwrap());
    let key_b: Arc<dyn KeyProvider> =
        Arc::new(FileKeyProvider::create(tmp.path().join("key-b")).unwrap());
    let dir = tmp.path().join("store");
    let opts = |k: &Arc<dyn KeyProvider>| {
        let mut o = Options::new(Arc::clone(k));
        o.durability = Durability::Group {
            max_delay: Duration::from_millis(1),
        };
        o.segment_size = 1 << 20;
        o
    };
    let store = Arc::new(Store::open(&dir, opts(&key_a)).unwrap());
    let t = Instant::now();
    build_live_keys(&store, cfg.keys);
    let built = t.elapsed().as_secs_f64();
    let live = store.stats().live_keys;

    println!("## Appends during key work\n");
    println!(
        "{} threads, Group (max_delay 1 ms), 1 KiB appends, 1 MiB segments, {live} live data \
         keys (built in {built:.1} s); machine: fdatasync p50 {:.0} µs, p99 {:.0} µs.\n",
        cfg.threads,
        fsync_p50 * 1e6,
        fsync_p99 * 1e6
    );
    println!("| phase | appends/s | p50 | p99 | p99.9 | max | master-key rotations |");
    println!("|---|---|---|---|---|---|---|");
    for rotating in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let rotations = Arc::new(AtomicU64::new(0));
        let rotator = rotating.then(|| {
            let (store, stop, rotations) = (
                Arc::clone(&store),
                Arc::clone(&stop),
                Arc::clone(&rotations),
            );
            let keys = [Arc::clone(&key_b), Arc::clone(&key_a)];
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    store.rotate_master_key(Arc::clone(&keys[i % 2])).unwrap();
                    rotations.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                i
            })
        });
        let (n, lat) = measure(&store, &cfg);
        stop.store(true, Ordering::Relaxed);
        let rotated = rotator.map_or(0, |h| h.join().unwrap());
        // Leave the store under key A for the next phase.
        if rotated % 2 == 1 {
            store.rotate_master_key(Arc::clone(&key_a)).unwrap();
        }
        println!(
            "| {} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {} |",
            if rotating {
                "rotating the master key"
            } else {
                "no key work"
            },
            n as f64 / cfg.secs,
            pct(&lat, 0.50),
            pct(&lat, 0.99),
            pct(&lat, 0.999),
            lat.last().copied().unwrap_or(0.0),
            rotations.load(Ordering::Relaxed),
        );
    }
    println!();
    Arc::try_unwrap(store).unwrap().close().unwrap();
}

/// Gives the store `n` live data keys: one message per segment, each in an expiry bucket
/// of its own among 16 used round robin (more than the 8 segments kept open at once, so
/// every append closes the least recently used one and opens a new one).
fn build_live_keys(store: &Store, n: usize) {
    let day = Duration::from_secs(86_400);
    let window = Duration::from_secs(1 << 13); // wider than the widest expiry bucket
    let mut i = 0u32;
    while (store.stats().live_keys as usize) < n {
        let ttl = 20 * day + window * (i % 16);
        store.append(b"backlog", b"kept", ttl).unwrap();
        i += 1;
    }
}

/// Appends 1 KiB messages from `cfg.threads` threads for `cfg.secs`; returns how many
/// and every latency in µs, sorted.
fn measure(store: &Arc<Store>, cfg: &Cfg) -> (usize, Vec<f64>) {
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.secs);
    let handles: Vec<_> = (0..cfg.threads)
        .map(|t| {
            let store = Arc::clone(store);
            std::thread::spawn(move || {
                let payload = vec![t as u8; 1024];
                let queue = format!("live-{t}");
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let s = Instant::now();
                    store
                        .append(queue.as_bytes(), &payload, Duration::from_secs(3600))
                        .unwrap();
                    lat.push(s.elapsed().as_secs_f64() * 1e6);
                }
                // Leave the queue empty for the next phase (queue length is capped).
                store.purge(queue.as_bytes()).unwrap();
                lat
            })
        })
        .collect();
    let mut all: Vec<f64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_by(f64::total_cmp);
    (all.len(), all)
}

#[expect(clippy::cast_sign_loss, reason = "the rank is at least 1")]
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank: the smallest value with at least `p` of the samples at or below it.
    let rank = (sorted.len() as f64 * p).ceil().max(1.0);
    sorted[(rank as usize).min(sorted.len()) - 1]
}
