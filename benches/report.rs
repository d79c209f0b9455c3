//! The benchmark report: engine throughput next to the machine's own limits, measured in
//! the same run, printed as Markdown tables (copied into BENCHMARKS.md).
//!
//! `cargo bench --bench report` runs it in full (a few minutes, ~2 GB of disk in a temp
//! dir); `cargo bench --bench report -- ceilings` only the machine limits and the
//! ceilings section; `cargo test --benches` runs a seconds-long smoke of the same code.

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

    if std::env::args().any(|a| a == "ceilings") {
        // `cargo bench --bench report -- ceilings`: only the ceilings section.
        let sync1 = append_rate(tmp.path(), &key, Durability::Sync, 1024, (1, 1), cfg.secs);
        let group32 = append_rate(
            tmp.path(),
            &key,
            Durability::default(),
            1024,
            (32, 1),
            cfg.secs,
        );
        ceilings(tmp.path(), &key, &cfg, seal[1].0, (sync1, group32));
        return;
    }
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
    let (mut sync1, mut group32) = (0.0, 0.0);
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
                if size == 1024 && mode == "Group" && t == 32 {
                    group32 = rate;
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
    ceilings(dir, key, cfg, seal[1].0, (sync1, group32));
}

/// What bounds the two append targets this machine misses, measured in the same run:
/// the best case of a Group round of 32 messages, and Async appends that the page cache
/// absorbs (so the disk is not what is measured).
fn ceilings(
    dir: &std::path::Path,
    key: &Arc<FileKeyProvider>,
    cfg: &Cfg,
    seal_1k: f64,
    (sync1, group_32_fresh): (f64, f64),
) {
    println!("\n## Ceilings of the two append targets (1 KiB)\n");
    // Async, one thread, a burst small enough for the page cache (closing not timed).
    let n = if cfg.secs > 1.0 { 250_000 } else { 2_000 };
    let (burst, frame) = async_burst(dir, key, n);
    // On warmed stores, with and without zero-filled segments: Sync one at a time, Sync
    // 32 per call (a Group round of 32 with no threads to gather), Group with 32 threads.
    let warm = |d, zero_fill, shape| {
        let (_data, store) = bench_store(dir, key, d, zero_fill, cfg.secs > 1.0);
        append_rate_in(&store, 1024, shape, cfg.secs)
    };
    let rows: Vec<(bool, [f64; 3])> = [true, false]
        .into_iter()
        .map(|z| {
            (
                z,
                [
                    warm(Durability::Sync, z, (1, 1)),
                    warm(Durability::Sync, z, (1, 32)),
                    warm(Durability::default(), z, (32, 1)),
                ],
            )
        })
        .collect();
    let commits = if cfg.secs > 1.0 { 500 } else { 10 };
    let mut dev = Vec::new();
    for layout in [machine::Layout::Fallocated, machine::Layout::Zeroed] {
        let one = machine::commit_latency_on(dir, frame, commits, layout).unwrap();
        let many = machine::commit_latency_on(dir, 32 * frame, commits, layout).unwrap();
        dev.push((layout, one * 1e6, many * 1e6));
    }
    println!("| measure | value |\n|---|---|");
    println!(
        "| Async, one thread, burst of {n} ({:.0} MB, fits in the page cache) | {burst:.0} msg/s = {:.2} of the seal rate ({:.2} µs per append; seal alone {:.2} µs) |",
        n as f64 * frame as f64 / 1e6,
        burst / seal_1k,
        1e6 / burst,
        1e6 / seal_1k,
    );
    for (layout, one, many) in &dev {
        println!(
            "| device: write + fdatasync of 1 frame ({frame} B) vs 32 frames, {layout:?} file | p50 {one:.0} µs vs {many:.0} µs ({:.2}x) |",
            many / one
        );
    }
    println!(
        "| fresh store: Group 32 threads / Sync 1 thread | {:.1}x |",
        group_32_fresh / sync1.max(1.0)
    );
    for (zero_fill, [sync_1, round_32, group_32]) in rows {
        let w = format!("warmed store, zero_fill_segments = {zero_fill}");
        println!("| {w}: Sync, one thread | {sync_1:.0} msg/s |");
        println!(
            "| {w}: Sync, one thread, `append_batch` of 32 (a Group round of 32, nothing to gather) | {round_32:.0} msg/s = {:.1}x Sync 1 thread: the ceiling of Group with 32 threads |",
            round_32 / sync_1
        );
        println!(
            "| {w}: Group, 32 threads | {group_32:.0} msg/s = **{:.1}x Sync 1 thread** = {:.2} of the ceiling |",
            group_32 / sync_1,
            group_32 / round_32
        );
    }
}

/// Async appends from one thread, `n` of 1 KiB, timed until the last call returns:
/// (messages per second, bytes per stored message).
fn async_burst(dir: &std::path::Path, key: &Arc<FileKeyProvider>, n: usize) -> (f64, usize) {
    let (_data, store) = bench_store(dir, key, Durability::Async, false, false);
    let payload = vec![0x42u8; 1024];
    let start = Instant::now();
    for _ in 0..n {
        store
            .append(b"queue-0", &payload, Duration::from_secs(3600))
            .unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    store.flush().unwrap();
    let frame = store.stats().bytes_on_disk as usize / n;
    (rate, frame)
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
    shape: (usize, usize),
    secs: f64,
) -> f64 {
    let (_data, store) = bench_store(dir, key, d, true, false);
    append_rate_in(&store, size, shape, secs)
}

/// A store in a new temp dir. `warm`: first fill three segments (and purge them), so that
/// the store is past its first rotations and writes into segments made while it was
/// busy (zero-filled in Sync and Group), as a long-running store does.
fn bench_store(
    dir: &std::path::Path,
    key: &Arc<FileKeyProvider>,
    d: Durability,
    zero_fill: bool,
    warm: bool,
) -> (tempfile::TempDir, Arc<Store>) {
    let data = tempfile::tempdir_in(dir).unwrap();
    let mut o = opts(key, d);
    o.max_message_size = 64 << 10;
    o.zero_fill_segments = zero_fill;
    let segment = o.segment_size;
    let store = Arc::new(Store::open(data.path(), o).unwrap());
    if warm {
        let payload = vec![0x17u8; 1024];
        // Rounds of 32 messages, like the measurements (the writer zero-fills spares only
        // while its fsync rounds are small).
        let batch: Vec<cinder::NewMessage<'_>> = (0..32)
            .map(|_| cinder::NewMessage {
                queue: b"warm-up",
                payload: &payload,
                ttl: Duration::from_secs(3600),
            })
            .collect();
        for _ in 0..3 * segment / (32 * 1024) {
            store.append_batch(&batch).unwrap();
        }
        store.purge(b"warm-up").unwrap();
        // Let the zero-filling of the next spare and the writeback settle.
        std::thread::sleep(Duration::from_secs(1));
    }
    (data, store)
}

/// Appends from `threads` threads, each `batch` messages per call, for `secs`: msgs/s.
fn append_rate_in(
    store: &Arc<Store>,
    size: usize,
    (threads, batch): (usize, usize),
    secs: f64,
) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let payload = vec![0x42u8; size];
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(store);
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
    count.load(Ordering::SeqCst) as f64 / start.elapsed().as_secs_f64()
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
