//! Relay-shaped workload with compaction on and off: a steady append rate, 95% of messages
//! acked within a second, 5% whose recipients come back much later. Reports shred latency
//! against `max_shred_delay`, write amplification, and append latency.
//!
//! `cargo bench --bench compaction` runs it in full (~50 s); `cargo test --benches` runs a
//! short smoke.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cinder::{FileKeyProvider, MessageId, Options, Store};

struct Cfg {
    run: Duration,
    rate: u64,
    offline_for: Duration,
    deadline: Duration,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let cfg = if full {
        Cfg {
            run: Duration::from_secs(20),
            rate: 2000,
            offline_for: Duration::from_secs(8),
            deadline: Duration::from_secs(2),
        }
    } else {
        Cfg {
            run: Duration::from_millis(600),
            rate: 500,
            offline_for: Duration::from_millis(300),
            deadline: Duration::from_millis(200),
        }
    };
    println!(
        "relay workload: {} msg/s of 1 KiB for {:?}; 95% acked within 1 s, 5% after {:?}; Group durability",
        cfg.rate, cfg.run, cfg.offline_for
    );
    println!("| compaction | max_shred_delay | shred latency p50 / p99 / max | write amplification | append p50 / p99 | dead records left | data bytes left |");
    println!("|---|---|---|---|---|---|---|");
    for on in [true, false] {
        run(&cfg, on);
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Due(std::cmp::Reverse<Instant>, Vec<u8>, u64);

fn run(cfg: &Cfg, compaction: bool) {
    let (label, deadline) = (if compaction { "on" } else { "off" }, cfg.deadline);
    let tmp =
        tempfile::tempdir_in(std::env::var("CINDER_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let mut opts = Options::new(key);
    opts.max_shred_delay = deadline;
    opts.compaction = compaction;
    opts.segment_size = 4 << 20;
    let store = Arc::new(Store::open(tmp.path().join("data"), opts).unwrap());
    let acks: Arc<Mutex<BinaryHeap<Due>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acker = {
        let (store, acks, stop) = (Arc::clone(&store), Arc::clone(&acks), Arc::clone(&stop));
        std::thread::spawn(move || loop {
            let due = {
                let mut h = acks.lock().unwrap();
                match h.peek() {
                    Some(d) if d.0 .0 <= Instant::now() => h.pop(),
                    _ => None,
                }
            };
            match due {
                Some(Due(_, q, id)) => {
                    store.ack(&q, MessageId(id)).unwrap();
                }
                None if stop.load(Ordering::SeqCst) && acks.lock().unwrap().is_empty() => return,
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        })
    };
    let payload = vec![0x5au8; 1024];
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut n = 0u64;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    while start.elapsed() < cfg.run {
        let target = start + Duration::from_secs_f64(n as f64 / cfg.rate as f64);
        if let Some(wait) = target.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let q = format!("recipient-{}", rng % 200).into_bytes();
        let t = Instant::now();
        let id = store
            .append(&q, &payload, Duration::from_secs(86_400))
            .unwrap();
        lat.push(t.elapsed());
        let later = if rng % 100 < 5 {
            cfg.offline_for
        } else {
            Duration::from_millis(rng % 1000)
        };
        acks.lock()
            .unwrap()
            .push(Due(std::cmp::Reverse(Instant::now() + later), q, id.0));
        n += 1;
    }
    stop.store(true, Ordering::SeqCst);
    acker.join().unwrap();
    // Let the background compactor and reaper catch up with the last acks.
    std::thread::sleep(deadline.min(Duration::from_secs(3)) + Duration::from_millis(500));
    let st = store.stats();
    lat.sort();
    let pct = |q: usize| lat[(lat.len() - 1) * q / 100];
    let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{} ms", d.as_millis()));
    println!(
        "| {label} | {deadline:?} | {} / {} / {} | {:.3} | {:?} / {:?} | {} | {} |",
        ms(st.shred_latency_p50),
        ms(st.shred_latency_p99),
        ms(st.shred_latency_max),
        st.write_amplification,
        pct(50),
        pct(99),
        st.dead_records,
        st.bytes_on_disk,
    );
}
