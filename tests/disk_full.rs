//! Bounded resources (contract 9) under a full disk: a refused segment is a clear
//! `DiskFull` error for the call that needed it, nothing already stored is harmed, the
//! store keeps serving, and once space frees it works again without a restart. Faults go
//! through the I/O seam (`cinder::vfs::FaultFs`).

use std::time::{Duration, Instant};

mod common;

use cinder::vfs::{Fault, FaultKind, Op};
use cinder::{Durability, Error, MessageId, NewMessage, Store};
use common::rig::Rig;

const TTL: Duration = Duration::from_secs(3600);

/// Appends `n` one-byte messages to `q` in batches; returns their ids.
fn fill(store: &Store, q: &[u8], n: usize) -> Vec<MessageId> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<NewMessage<'_>> = chunk
            .iter()
            .map(|_| NewMessage {
                queue: q,
                payload: b"x",
                ttl: TTL,
            })
            .collect();
        ids.extend(store.append_batch(&batch).unwrap());
    }
    ids
}

/// Acks `ids` of queue `q` a thousand at a time until one batch is refused: the ids
/// acked, and the refusal with the refused batch.
fn ack_until_refused(
    store: &Store,
    ids: &[MessageId],
) -> (Vec<MessageId>, (Error, Vec<MessageId>)) {
    let mut acked = Vec::new();
    for chunk in ids.chunks(1000) {
        match store.ack_batch(b"q", chunk) {
            Ok(n) => {
                assert_eq!(n, chunk.len() as u64);
                acked.extend_from_slice(chunk);
            }
            Err(e) => return (acked, (e, chunk.to_vec())),
        }
    }
    panic!("no ack was refused: the ack segment never needed a new segment");
}

/// Every id queue `q` holds.
fn queued(store: &Store) -> Vec<MessageId> {
    store
        .read(b"q", None, 100_000)
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect()
}

/// Retries `f` until it succeeds (the writer retries a refused segment after a pause).
fn eventually<T>(mut f: impl FnMut() -> cinder::Result<T>) -> T {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < give_up => {
                assert!(matches!(e, Error::DiskFull { .. }), "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("still failing after space was freed: {e}"),
        }
    }
}

#[test]
fn disk_full_while_the_ack_segment_rotates_refuses_the_ack_and_the_store_keeps_serving() {
    let rig = Rig::new(Durability::default(), Duration::from_secs(60));
    let store = Store::open(&rig.dir, rig.faulty()).unwrap();
    let ids = fill(&store, b"q", 20_000);
    // From now on no segment can be preallocated: the spare made after the last rotation
    // is the only new segment left.
    rig.fs
        .inject(Fault::from_nth(Op::Allocate, 1, FaultKind::NoSpace));
    let (acked, (err, pending)) = ack_until_refused(&store, &ids);
    assert!(matches!(err, Error::DiskFull { .. }), "{err}");
    assert!(rig.fs.injected() > 0);
    // The refused ack took its messages out of memory; retrying it must not report
    // success (nothing left to remove) while its records are not written.
    let again = store.ack_batch(b"q", &pending);
    assert!(matches!(again, Err(Error::DiskFull { .. })), "{again:?}");
    // The store still serves: reads work, other acks are refused the same clear way.
    let rest = store.read(b"q", None, 10).unwrap();
    assert!(!rest.is_empty());
    let more = store.ack(b"q", rest[0].id);
    assert!(matches!(more, Err(Error::DiskFull { .. })), "{more:?}");
    // Space frees: acks and appends work again without a restart.
    rig.fs.clear_faults();
    eventually(|| store.flush());
    let next = store.read(b"q", None, 1).unwrap()[0].id;
    assert!(eventually(|| store.ack(b"q", next)));
    store.append(b"q", b"after", TTL).unwrap();
    store.close().unwrap();
    drop(store);
    // Every ack that returned, and the refused ones written once space freed, are final.
    let store = Store::open(&rig.dir, rig.real()).unwrap();
    let left = queued(&store);
    for id in acked.iter().chain(&pending).chain([&rest[0].id, &next]) {
        assert!(!left.contains(id), "acked message {id} came back");
    }
    assert_eq!(left.len(), ids.len() - acked.len() - pending.len() - 2 + 1);
}

#[test]
fn a_batch_of_acks_larger_than_a_segment_is_split_across_segments() {
    let rig = Rig::new(Durability::default(), Duration::from_secs(60));
    let store = Store::open(&rig.dir, rig.real()).unwrap();
    let ids = fill(&store, b"q", 20_000);
    // 20,000 ack ids take 160 KB: more than one 64 KiB segment can hold.
    assert_eq!(store.ack_batch(b"q", &ids).unwrap(), ids.len() as u64);
    store.close().unwrap();
    drop(store);
    let store = Store::open(&rig.dir, rig.real()).unwrap();
    assert_eq!(store.len(b"q").unwrap(), 0);
}

#[test]
fn closing_while_acks_wait_for_space_says_so_and_the_acks_are_not_final() {
    let rig = Rig::new(Durability::default(), Duration::from_secs(60));
    let store = Store::open(&rig.dir, rig.faulty()).unwrap();
    let ids = fill(&store, b"q", 20_000);
    rig.fs
        .inject(Fault::from_nth(Op::Allocate, 1, FaultKind::NoSpace));
    let (_, (_, pending)) = ack_until_refused(&store, &ids);
    // The disk is still full at close: the queued acks cannot be written.
    let closed = store.close();
    assert!(matches!(closed, Err(Error::DiskFull { .. })), "{closed:?}");
    drop(store);
    // As the error said: those messages are back after the reopen.
    let store = Store::open(&rig.dir, rig.real()).unwrap();
    let left = queued(&store);
    assert!(pending.iter().all(|id| left.contains(id)));
}
