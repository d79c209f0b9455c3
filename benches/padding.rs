//! What size padding costs: append throughput (Async, one thread) and bytes stored per
//! message, for payload sizes spread over 100..=2000 bytes, per `Padding` mode.
//!
//! `cargo bench --bench padding` (about 10 s); `cargo test --benches` runs a short smoke.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::{Durability, FileKeyProvider, Options, Padding, Store};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let secs = if full { 2.0 } else { 0.05 };
    let tmp =
        tempfile::tempdir_in(std::env::var("CINDER_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    // Deterministic payload sizes, uniform over 100..=2000.
    let sizes: Vec<usize> = (0..4096u64)
        .map(|i| 100 + ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 1901) as usize)
        .collect();
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    let buf = vec![0x5au8; 2000];
    println!("| padding | msgs/s (Async, 1 thread) | vs none | stored bytes per message | vs none | payload bytes per message |");
    println!("|---|---|---|---|---|---|");
    let mut base = (0.0, 0.0);
    for (name, mode) in [
        ("None", Padding::None),
        ("Padme", Padding::Padme),
        ("PowerOfTwo", Padding::PowerOfTwo),
    ] {
        let mut o = Options::new(key.clone());
        o.durability = Durability::Async;
        o.padding = mode;
        o.max_queue_len = u64::MAX;
        o.max_queue_bytes = u64::MAX;
        o.max_disk_bytes = 1 << 40;
        let store = Store::open(tmp.path().join(name), o).unwrap();
        let t = Instant::now();
        let mut n = 0usize;
        while t.elapsed().as_secs_f64() < secs {
            for s in &sizes[..256] {
                let len = sizes[(n + s) % sizes.len()];
                store
                    .append(b"q", &buf[..len], Duration::from_secs(3600))
                    .unwrap();
                n += 1;
            }
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        let per_msg = store.stats().bytes_appended as f64 / n as f64;
        if mode == Padding::None {
            base = (rate, per_msg);
        }
        println!(
            "| {name} | {rate:.0} | {:.2} | {per_msg:.0} | {:.3} | {mean:.0} |",
            rate / base.0,
            per_msg / base.1
        );
        drop(store);
    }
}
