//! Bounded deletion (contract 6) and background work (contract 11) under transient
//! faults: a compaction that fails for a reason that passes (here the disk refusing the
//! survivor segment) is retried, not given up until restart, so the dead records it was
//! to free still meet `max_shred_delay`; `stats()` reports the retry and no overrun.
//! Faults go through the I/O seam (`cinder::vfs::FaultFs`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cinder::vfs::{Fault, FaultKind, Op};
use cinder::{Durability, Error, MessageId, Store};
use common::rig::Rig;

const TTL: Duration = Duration::from_secs(3600);
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_compaction_refused_a_segment_is_retried_and_the_deadline_holds() {
    let su = Rig::new(Durability::default(), DEADLINE);
    let (dir, key, fs, clock) = (&su.dir, &su.key1, &su.fs, &su.clock);
    let store = Store::open(dir, su.faulty()).unwrap();
    let body = [7u8; 1000];
    // A full first segment (about 60 frames) and the start of a second.
    let ids: Vec<MessageId> = (0..80)
        .map(|_| store.append(b"q", &body, TTL).unwrap())
        .collect();
    // The first segment becomes mostly dead: all but three acked.
    let keep = [ids[5], ids[30], ids[50]];
    let acked: Vec<MessageId> = ids[..60]
        .iter()
        .copied()
        .filter(|i| !keep.contains(i))
        .collect();
    store.ack_batch(b"q", &acked).unwrap();
    // A writer round makes the spare segment for the next rotation; from then on the
    // disk refuses new segments, and one more rotation uses up the spare.
    store.flush().unwrap();
    assert_eq!(
        store.stats().segments,
        4,
        "two message segments, acks, a spare"
    );
    fs.inject(Fault::from_nth(Op::Allocate, 1, FaultKind::NoSpace));
    for _ in 0..45 {
        store.append(b"q", &body, TTL).unwrap();
    }
    // Acks settled: the compaction of the first segment is due, and needs a survivor
    // segment the disk refuses.
    clock.advance(Duration::from_secs(6));
    let e = store.maintain().unwrap_err();
    assert!(matches!(e, Error::DiskFull { .. }), "{e}");
    assert!(store.stats().compaction_retries >= 1, "{:?}", store.stats());
    assert_eq!(store.stats().uncompactable_segments, 0);
    // The fault passes; the retry comes within the deadline, unprompted by a restart.
    fs.clear_faults();
    clock.advance(Duration::from_secs(3));
    store.maintain().unwrap();
    clock.advance(DEADLINE);
    store.maintain().unwrap();
    let openable: HashSet<u64> = common::openable::openable_messages(dir, &[&**key])
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    for id in &acked {
        assert!(
            !openable.contains(&id.0),
            "acked message {id} is still decryptable past the deadline"
        );
    }
    let s = store.stats();
    assert_eq!(s.shred_overrun_max, Duration::ZERO, "{s:?}");
    assert_eq!(store.len(b"q").unwrap(), 3 + 20 + 45);
}

/// A compaction that fails part way leaves copies it will not switch to in one survivor;
/// its retry copies the same messages into another. When those messages are acked later,
/// the ack must protect every survivor holding a copy (the copy links are transitive),
/// or the ack segment is shredded with the second survivor while the first still holds a
/// durable copy, and the messages come back after a reopen.
#[test]
fn acks_protect_every_copy_a_retried_compaction_left_behind() {
    let su = Rig::new(Durability::default(), DEADLINE);
    let (dir, fs, clock) = (&su.dir, &su.fs, &su.clock);
    let store = Store::open(dir, su.faulty()).unwrap();
    // First segment: 60 frames of ~1 KB, two acked: its 58 survivors nearly fill one
    // survivor segment.
    let first: Vec<MessageId> = (0..60)
        .map(|_| store.append(b"q", &[1u8; 1000], TTL).unwrap())
        .collect();
    store.ack_batch(b"q", &first[..2]).unwrap();
    // Second segment: four small messages, a large one, then fillers, all acked.
    let mut late: Vec<MessageId> = (0..4)
        .map(|_| store.append(b"q", &[2u8; 200], TTL).unwrap())
        .collect();
    late.push(store.append(b"q", &[3u8; 3500], TTL).unwrap());
    let fillers: Vec<MessageId> = (0..58)
        .map(|_| store.append(b"q", &[4u8; 1000], TTL).unwrap())
        .collect();
    store.ack_batch(b"q", &fillers).unwrap();
    store.flush().unwrap();
    // No new segment from here: the first compaction takes the spare for its survivor,
    // the second copies the small messages there too and needs a new segment for the
    // large one, which the disk refuses.
    fs.inject(Fault::from_nth(Op::Allocate, 1, FaultKind::NoSpace));
    clock.advance(Duration::from_secs(46));
    let e = store.maintain().unwrap_err();
    assert!(matches!(e, Error::DiskFull { .. }), "{e}");
    fs.clear_faults();
    // The retry copies the late messages into a second survivor.
    clock.advance(Duration::from_secs(2));
    store.maintain().unwrap();
    // They are all acked: the second survivor dies whole and is shredded, and so is any
    // ack segment that protects nothing else.
    assert_eq!(store.ack_batch(b"q", &late).unwrap(), late.len() as u64);
    // Past the age at which the second survivor and the ack segment are closed (D/4),
    // short of the compaction deadline of the first survivor, whose dead copies of the
    // late messages are still on disk.
    clock.advance(Duration::from_secs(20));
    store.maintain().unwrap();
    store.maintain().unwrap();
    let ids = |s: &Store| -> Vec<MessageId> {
        s.read(b"q", None, 1000)
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect()
    };
    assert_eq!(ids(&store), first[2..]);
    store.close().unwrap();
    drop(store);
    let store = Store::open(dir, su.real()).unwrap();
    assert_eq!(
        ids(&store),
        first[2..],
        "acked messages came back after a reopen"
    );
}
