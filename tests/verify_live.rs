//! `verify` on a store that is open and compacting finds no problem: the moments between
//! a compaction's durable copies and the shred of their original (two copies of a
//! message; recovery keeps the newer) and the segments being written are notes, not
//! damage. Compaction runs in a loop on one thread while another verifies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::{FileKeyProvider, ManualClock, Options, Store};

#[test]
fn verify_of_a_compacting_store_reports_notes_not_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let clock = ManualClock::new(1_700_000_000_000);
    let mut o = Options::new(key.clone());
    o.clock = clock.clone();
    o.segment_size = 64 << 10;
    o.max_message_size = 4 << 10;
    o.max_shred_delay = Duration::from_secs(4);
    o.background_reaper = false;
    let store = Arc::new(Store::open(&dir, o).unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let compactor = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let payload = vec![0x61u8; 1000];
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Half of each round's messages acked: every segment is partly dead and
                // is compacted once its dead records near the shred deadline.
                for i in 0..40 {
                    let id = store
                        .append(b"q", &payload, Duration::from_secs(3600))
                        .unwrap();
                    if i % 2 == 0 {
                        store.ack(b"q", id).unwrap();
                    }
                }
                clock.advance(Duration::from_secs(2));
                store.maintain().unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    let start = Instant::now();
    let (mut verifies, mut copies_seen) = (0, 0);
    while start.elapsed() < Duration::from_secs(3) {
        let r = cinder::verify(&dir, &*key).unwrap();
        assert!(r.problems.is_empty(), "problems in a live store: {r:#?}");
        copies_seen += r
            .notes
            .iter()
            .filter(|n| n.what.contains("compaction copy"))
            .count();
        verifies += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = compactor.join().unwrap();
    assert!(
        verifies > 5 && rounds > 5,
        "{verifies} verifies, {rounds} rounds"
    );
    eprintln!("{verifies} verifies over {rounds} compaction rounds; {copies_seen} copy notes");
    // Once settled, nothing is noted twice and everything is readable.
    store.close().unwrap();
    let r = cinder::verify(&dir, &*key).unwrap();
    assert!(r.is_clean(), "{r:#?}");
}
