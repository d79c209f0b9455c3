//! Criterion micro-benchmarks of the hot paths (one thread): append per durability mode
//! and size, read, and ack at several queue lengths. The report bench (`benches/report.rs`)
//! puts these next to the machine's limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::{Durability, FileKeyProvider, MessageId, Options, Store};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn store(dir: &std::path::Path, key: &Arc<FileKeyProvider>, d: Durability) -> Store {
    let mut o = Options::new(key.clone());
    o.durability = d;
    o.max_message_size = 64 << 10;
    o.max_queue_len = u64::MAX;
    o.max_queue_bytes = u64::MAX;
    o.max_disk_bytes = 1 << 40;
    Store::open(dir, o).unwrap()
}

fn append(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(".").unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let mut grp = c.benchmark_group("append");
    for (name, d) in [
        ("async", Durability::Async),
        ("group", Durability::default()),
        ("sync", Durability::Sync),
    ] {
        for size in [64usize, 1024, 65536] {
            let dir = tempfile::tempdir_in(tmp.path()).unwrap();
            let st = store(dir.path(), &key, d);
            let payload = vec![1u8; size];
            grp.throughput(Throughput::Bytes(size as u64));
            grp.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| {
                b.iter(|| {
                    st.append(b"bench", &payload, Duration::from_secs(3600))
                        .unwrap()
                });
            });
        }
    }
    grp.finish();
}

fn read(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(".").unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let st = store(&tmp.path().join("d"), &key, Durability::Async);
    let payload = vec![1u8; 1024];
    for _ in 0..10_000 {
        st.append(b"bench", &payload, Duration::from_secs(3600))
            .unwrap();
    }
    st.flush().unwrap();
    let mut grp = c.benchmark_group("read");
    grp.throughput(Throughput::Elements(100));
    grp.bench_function("page_of_100_1KiB", |b| {
        b.iter(|| st.read(b"bench", None, 100).unwrap());
    });
    grp.finish();
}

fn ack(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(".").unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let mut grp = c.benchmark_group("ack_async");
    for len in [1_000usize, 100_000] {
        let st = store(&tmp.path().join(format!("d{len}")), &key, Durability::Async);
        let mut ids: Vec<MessageId> = (0..len)
            .map(|_| st.append(b"q", b"x", Duration::from_secs(3600)).unwrap())
            .collect();
        grp.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(len as u64 / 2) as usize;
                    let batch: Vec<MessageId> = ids.drain(..n).collect();
                    let t = Instant::now();
                    for id in &batch {
                        st.ack(b"q", *id).unwrap();
                    }
                    total += t.elapsed();
                    left -= n as u64;
                    ids.extend(
                        (0..n).map(|_| st.append(b"q", b"x", Duration::from_secs(3600)).unwrap()),
                    );
                }
                total
            });
        });
    }
    grp.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = append, read, ack
}
criterion_main!(benches);
