//! Compaction policy: a mostly dead segment that recipients are still acking through is
//! left to die whole (copying its last live messages would be thrown away a moment later);
//! once acks into it stop, it is compacted for space; the shred deadline is never delayed.

use std::sync::Arc;
use std::time::Duration;

use cinder::{FileKeyProvider, ManualClock, MessageId, Options, Store};

const PAYLOAD: usize = 1000;

fn store(clock: &Arc<ManualClock>) -> (tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let mut o = Options::new(key);
    o.clock = clock.clone();
    o.segment_size = 64 << 10;
    o.max_message_size = 4 << 10;
    o.max_shred_delay = Duration::from_secs(60);
    o.background_reaper = false;
    let s = Store::open(tmp.path().join("data"), o).unwrap();
    (tmp, s)
}

/// Appends 150 messages of 1 KiB, in order: the first ~60 fill the first segment, which
/// is then closed (only closed segments are compacted).
fn fill(s: &Store) -> Vec<MessageId> {
    (0..150)
        .map(|_| {
            s.append(b"q", &[0x33; PAYLOAD], Duration::from_secs(3600))
                .unwrap()
        })
        .collect()
}

#[test]
fn a_segment_being_acked_through_is_not_compacted_until_acks_settle() {
    let clock = ManualClock::new(1_700_000_000_000);
    let (_tmp, s) = store(&clock);
    let ids = fill(&s);
    // Ack through 50 of the first segment's ~60 messages: it is mostly dead.
    assert_eq!(s.ack_through(b"q", ids[49]).unwrap(), 50);
    s.maintain().unwrap();
    assert_eq!(
        s.stats().bytes_copied,
        0,
        "acks are still arriving: no copy"
    );
    clock.advance(Duration::from_secs(2));
    s.ack(b"q", ids[50]).unwrap();
    s.maintain().unwrap();
    assert_eq!(s.stats().bytes_copied, 0, "an ack 0 s ago: still no copy");
    // No ack for longer than max_shred_delay / 8 (5 s here): compacted for space.
    clock.advance(Duration::from_secs(6));
    s.maintain().unwrap();
    assert!(
        s.stats().bytes_copied > 0,
        "settled and mostly dead: copied"
    );
    // Everything not acked still reads back, once.
    let left = s.read(b"q", None, 1000).unwrap();
    assert_eq!(left.len(), 150 - 51);
    assert_eq!(left[0].id, ids[51]);
}

#[test]
fn the_shred_deadline_compacts_even_while_acks_keep_arriving() {
    let clock = ManualClock::new(1_700_000_000_000);
    let (_tmp, s) = store(&clock);
    let ids = fill(&s);
    // One dead record in the first segment, then an ack every few seconds elsewhere in
    // it: never settled, but the first death's deadline (3/4 of 60 s) still compacts.
    s.ack(b"q", ids[0]).unwrap();
    for i in 0..12 {
        clock.advance(Duration::from_secs(4));
        s.ack(b"q", ids[1 + i]).unwrap();
        s.maintain().unwrap();
    }
    assert!(
        s.stats().bytes_copied > 0,
        "48 s after the first ack the segment is compacted"
    );
    assert_eq!(s.read(b"q", None, 1000).unwrap().len(), 150 - 13);
}
