//! The benchmark report: engine throughput next to the machine's own limits, measured in
//! the same run, printed as Markdown tables (copied into BENCHMARKS.md).
//!
//! `cargo bench --bench report` runs it in full (a few minutes, ~2 GB of disk in a temp
//! dir); `cargo test --benches` runs a seconds-long smoke of the same code.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/machine.rs"]
mod machine;

use cinder::{Durability, FileKeyProvider, MessageId, Options, Store};

struct Cfg {
    /// Wall time per throughput measurement.
    secs: f64,
    recovery_bytes: u64,
    ack_lens: Vec<usize>,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let cfg = if full {
        Cfg {
            secs: 1.5,
            recovery_bytes: 1 << 30,
            ack_lens: vec![1_000, 100_000, 1_000_000],
        }
    } else {
        Cfg {
            secs: 0.05,
            recovery_bytes: 4 << 20,
            ack_lens: vec![1_000],
        }
    };
    let tmp =
        tempfile::tempdir_in(std::env::var("CINDER_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    println!("## Machine limits (same run)\n");
    let seal = seal_limits(&cfg);
    let (fsync_p50, fsync_p99) =
        machine::fsync_latency(tmp.path(), if full { 2000 } else { 20 }).unwrap();
    let (fsync_p50, fsync_p99) = (fsync_p50 * 1e6, fsync_p99 * 1e6);
    let seq_bw = machine::seq_write(tmp.path(), if full { 1 << 30 } else { 8 << 20 }).unwrap();
    println!("| limit | value |\n|---|---|");
    for (size, (ring, rc)) in [64usize, 1024, 65536].iter().zip(&seal) {
        println!(
            "| ChaCha20-Poly1305 seal {size} B, one core | ring {:.0} msg/s ({:.2} GB/s); RustCrypto {:.0} msg/s ({:.2} GB/s) |",
            ring,
            ring * *size as f64 / 1e9,
            rc,
            rc * *size as f64 / 1e9
        );
    }
    println!("| fdatasync after a 4 KiB append | p50 {fsync_p50:.0} µs, p99 {fsync_p99:.0} µs |");
    println!(
        "| sequential write, fdatasync every 4 MiB | {:.0} MB/s |\n",
        seq_bw / 1e6
    );

    append_tables(tmp.path(), &key, &cfg, &seal, fsync_p50, seq_bw);

    println!("\n## Read and ack\n");
    let (read_rate, read_size) = read_rate(tmp.path(), &key, cfg.secs);
    println!("| op | msgs/s |\n|---|---|");
    println!("| read, 1 KiB, pages of 100, one thread | {read_rate:.0} (payload {read_size} B) |");
    for &n in &cfg.ack_lens {
        let fifo = ack_rate(tmp.path(), &key, n, cfg.secs, false);
        let random = ack_rate(tmp.path(), &key, n, cfg.secs, true);
        println!("| ack (Async), queue length {n}, FIFO order | {fifo:.0} |");
        println!("| ack (Async), queue length {n}, random order | {random:.0} |");
    }
    let g = ack_group_rate(tmp.path(), &key, 8, cfg.secs);
    println!("| ack (Group), 8 threads | {g:.0} |");

    println!("\n## Recovery and memory\n");
    let (secs, bytes, msgs, index_bytes) = recovery(tmp.path(), &key, cfg.recovery_bytes);
    println!("| measure | value |\n|---|---|");
    println!(
        "| reopen with {:.2} GB live ({msgs} msgs of 1 KiB) | {secs:.2} s ({:.2} s per GB) |",
        bytes as f64 / 1e9,
        secs / (bytes as f64 / 1e9)
    );
    println!(
        "| index memory per queued message | {:.1} bytes |",
        index_bytes as f64 / msgs as f64
    );
}

fn append_tables(
    dir: &std::path::Path,
    key: &Arc<FileKeyProvider>,
    cfg: &Cfg,
    seal: &[(f64, f64)],
    fsync_p50: f64,
    seq_bw: f64,
) {
    println!("## Append throughput\n");
    println!("| payload | mode | threads | msgs/s | MB/s | vs seal limit | msgs per fsync latency | vs seq. write |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut sync1 = 0.0;
    for (si, size) in [64usize, 1024, 65536].into_iter().enumerate() {
        for (mode, dur) in [
            ("Sync", Durability::Sync),
            ("Group", Durability::default()),
            ("Async", Durability::Async),
        ] {
            let threads: &[usize] = if mode == "Group" {
                &[1, 4, 32]
            } else {
                &[1, 4]
            };
            for &t in threads {
                let rate = append_rate(dir, key, dur, size, (t, 1), cfg.secs);
                if size == 1024 && mode == "Sync" && t == 1 {
                    sync1 = rate;
                }
                let extra = if size == 1024 && mode == "Group" && t == 32 && sync1 > 0.0 {
                    format!(" ({:.1}x Sync, 1 thread)", rate / sync1)
                } else {
                    String::new()
                };
                println!(
                    "| {size} B | {mode} | {t} | {rate:.0}{extra} | {:.1} | {:.2} | {:.2} | {:.2} |",
                    rate * size as f64 / 1e6,
                    rate / seal[si].0,
                    rate * fsync_p50 / 1e6,
                    rate * size as f64 / seq_bw,
                );
            }
        }
    }

    let batched = append_rate(dir, key, Durability::default(), 1024, (32, 8), cfg.secs);
    println!(
        "| 1024 B | Group, append_batch of 8 | 32 | {batched:.0} ({:.1}x Sync, 1 thread) | {:.1} | {:.2} | {:.2} | {:.2} |",
        batched / sync1.max(1.0),
        batched * 1024.0 / 1e6,
        batched / seal[1].0,
        batched * fsync_p50 / 1e6,
        batched * 1024.0 / seq_bw,
    );
}

fn opts(key: &Arc<FileKeyProvider>, d: Durability) -> Options {
    let mut o = Options::new(key.clone());
    o.durability = d;
    o.max_disk_bytes = 1 << 40;
    o.max_queue_len = u64::MAX;
    o.max_queue_bytes = u64::MAX;
    o
}

fn seal_limits(cfg: &Cfg) -> Vec<(f64, f64)> {
    use chacha20poly1305::aead::{AeadInOut, KeyInit};
    let mut out = Vec::new();
    for size in [64usize, 1024, 65536] {
        let key = [7u8; 32];
        let mut buf = vec![1u8; size];
        let ring_key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key).unwrap(),
        );
        let ring_rate = machine::rate_for(cfg.secs, |i| {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&i.to_le_bytes());
            let t = ring_key
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(n),
                    ring::aead::Aad::from(b"aad"),
                    &mut buf,
                )
                .unwrap();
            let _ = std::hint::black_box(t);
        });
        let rc = chacha20poly1305::ChaCha20Poly1305::new(&key.into());
        let mut buf2 = vec![1u8; size];
        let rc_rate = machine::rate_for(cfg.secs, |i| {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&i.to_le_bytes());
            let nonce = chacha20poly1305::Nonce::try_from(&n[..]).unwrap();
            let t = rc
                .encrypt_inout_detached(&nonce, b"aad", (&mut buf2[..]).into())
                .unwrap();
            let _ = std::hint::black_box(t);
        });
        out.push((ring_rate, rc_rate));
    }
    out
}

fn append_rate(
    dir: &std::path::Path,
    key: &Arc<FileKeyProvider>,
    d: Durability,
    size: usize,
    (threads, batch): (usize, usize),
    secs: f64,
) -> f64 {
    let data = tempfile::tempdir_in(dir).unwrap();
    let mut o = opts(key, d);
    o.max_message_size = 64 << 10;
    let store = Arc::new(Store::open(data.path(), o).unwrap());
    let count = Arc::new(AtomicU64::new(0));
    let payload = vec![0x42u8; size];
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(&store);
            let count = Arc::clone(&count);
            let payload = payload.clone();
            std::thread::spawn(move || {
                let q = format!("queue-{t}");
                let mut n = 0u64;
                let items: Vec<cinder::NewMessage<'_>> = (0..batch)
                    .map(|_| cinder::NewMessage {
                        queue: q.as_bytes(),
                        payload: &payload,
                        ttl: Duration::from_secs(3600),
                    })
                    .collect();
                while start.elapsed().as_secs_f64() < secs {
                    for _ in 0..16 {
                        store.append_batch(&items).unwrap();
                        n += batch as u64;
                    }
                }
                count.fetch_add(n, Ordering::SeqCst);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let rate = count.load(Ordering::SeqCst) as f64 / start.elapsed().as_secs_f64();
    drop(store);
    rate
}

fn fill(store: &Store, q: &[u8], n: usize, size: usize) -> Vec<MessageId> {
    let payload = vec![7u8; size];
    (0..n)
        .map(|_| {
            store
                .append(q, &payload, Duration::from_secs(3600))
                .unwrap()
        })
        .collect()
}

fn read_rate(dir: &std::path::Path, key: &Arc<FileKeyProvider>, secs: f64) -> (f64, usize) {
    let data = tempfile::tempdir_in(dir).unwrap();
    let store = Store::open(data.path(), opts(key, Durability::Async)).unwrap();
    fill(&store, b"r", 20_000, 1024);
    store.flush().unwrap();
    let mut cursor = None;
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let page = store.read(b"r", cursor, 100).unwrap();
        n += page.len() as u64;
        cursor = if page.len() < 100 {
            None
        } else {
            page.last().map(|m| m.id)
        };
    }
    (n as f64 / start.elapsed().as_secs_f64(), 1024)
}

/// Acks from a queue kept at length `len` (topped up between timed rounds), in a
/// scattered order so the index is not walked front to back.
fn ack_rate(
    dir: &std::path::Path,
    key: &Arc<FileKeyProvider>,
    len: usize,
    secs: f64,
    random: bool,
) -> f64 {
    let data = tempfile::tempdir_in(dir).unwrap();
    let store = Store::open(data.path(), opts(key, Durability::Async)).unwrap();
    let mut ids = fill(&store, b"a", len, 16);
    let round = (len / 2).clamp(1, 200_000);
    let mut acked = 0u64;
    let mut timed = Duration::ZERO;
    while timed.as_secs_f64() < secs {
        let batch: Vec<MessageId> = if random {
            scatter(&mut ids);
            ids.drain(ids.len() - round..).collect()
        } else {
            ids.drain(..round).collect()
        };
        let t = Instant::now();
        for id in &batch {
            store.ack(b"a", *id).unwrap();
        }
        timed += t.elapsed();
        acked += batch.len() as u64;
        ids.extend(fill(&store, b"a", round, 16));
    }
    acked as f64 / timed.as_secs_f64()
}

fn ack_group_rate(
    dir: &std::path::Path,
    key: &Arc<FileKeyProvider>,
    threads: usize,
    secs: f64,
) -> f64 {
    let data = tempfile::tempdir_in(dir).unwrap();
    let store = Arc::new(Store::open(data.path(), opts(key, Durability::default())).unwrap());
    let per = 20_000usize;
    let pre: Vec<Vec<MessageId>> = (0..threads)
        .map(|t| {
            let q = format!("g{t}");
            let s = Store::append_batch(
                &store,
                &(0..per)
                    .map(|_| cinder::NewMessage {
                        queue: q.as_bytes(),
                        payload: b"x",
                        ttl: Duration::from_secs(600),
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    let total = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = pre
        .into_iter()
        .enumerate()
        .map(|(t, ids)| {
            let store = Arc::clone(&store);
            let total = Arc::clone(&total);
            std::thread::spawn(move || {
                let q = format!("g{t}");
                let mut n = 0;
                for id in ids {
                    if start.elapsed().as_secs_f64() >= secs {
                        break;
                    }
                    store.ack(q.as_bytes(), id).unwrap();
                    n += 1;
                }
                total.fetch_add(n, Ordering::SeqCst);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    total.load(Ordering::SeqCst) as f64 / start.elapsed().as_secs_f64()
}

/// Deterministic shuffle.
fn scatter(v: &mut [MessageId]) {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

fn recovery(
    dir: &std::path::Path,
    key: &Arc<FileKeyProvider>,
    bytes: u64,
) -> (f64, u64, u64, usize) {
    let data = tempfile::tempdir_in(dir).unwrap();
    let n = bytes / 1024;
    {
        let store = Store::open(data.path(), opts(key, Durability::Async)).unwrap();
        let payload = vec![3u8; 1024];
        for i in 0..n {
            let q = format!("user-{}", i % 10_000);
            store
                .append(q.as_bytes(), &payload, Duration::from_secs(3600))
                .unwrap();
        }
        store.close().unwrap();
    }
    let t = Instant::now();
    let store = Store::open(data.path(), opts(key, Durability::Async)).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(store.stats().live_messages, n);
    let index_bytes = store.index_memory();
    let _ = std::io::stdout().flush();
    (secs, n * 1024, n, index_bytes)
}
