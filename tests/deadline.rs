//! Bounded deletion: with a relay-shaped workload (most messages acked within a second, a
//! few recipients offline for long, some messages expiring) and the clock moved by hand,
//! after every step no message that has been dead (acked or expired) for longer than
//! `max_shred_delay` can still be decrypted with any key that exists.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

mod common;

use cinder::{Clock, FileKeyProvider, ManualClock, MessageId, Options, Store};

const DEADLINE: Duration = Duration::from_secs(10);
const STEP: Duration = Duration::from_millis(250);

struct Sent {
    queue: Vec<u8>,
    id: MessageId,
    ack_at: Option<u64>,
    expires: u64,
    died: Option<u64>,
}

#[test]
fn no_dead_message_is_decryptable_past_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let clock = ManualClock::new(1_770_000_000_000);
    let mut o = Options::new(key.clone());
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.max_shred_delay = DEADLINE;
    o.clock = clock.clone();
    o.background_reaper = false;
    let store = Store::open(&dir, o).unwrap();
    let mut sent: Vec<Sent> = Vec::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut checked = 0;
    for step in 0..400u64 {
        let now = clock.now_ms();
        // Traffic: 6 messages per step; 5% go to offline recipients (acked after 40-90 s),
        // 10% are never acked and expire after 20-40 s, the rest are acked within 1 s.
        for _ in 0..6 {
            let r = next();
            let queue = format!("user-{}", r % 40).into_bytes();
            let (ack_at, ttl) = match r % 100 {
                0..=4 => (Some(now + 40_000 + r % 50_000), 3_600_000),
                5..=14 => (None, 20_000 + r % 20_000),
                _ => (Some(now + 200 + r % 800), 3_600_000),
            };
            let payload = vec![(r >> 8) as u8; 200 + (r % 1500) as usize];
            let id = store
                .append(&queue, &payload, Duration::from_millis(ttl))
                .unwrap();
            sent.push(Sent {
                queue,
                id,
                ack_at,
                expires: now + ttl,
                died: None,
            });
        }
        for s in sent.iter_mut().filter(|s| s.died.is_none()) {
            if s.ack_at.is_some_and(|t| t <= now) && s.expires > now {
                assert!(
                    store.ack(&s.queue, s.id).unwrap(),
                    "ack of a live message failed"
                );
                s.died = Some(now);
            } else if s.expires <= now {
                s.died = Some(s.expires);
            }
        }
        store.maintain().unwrap();
        if step % 4 == 0 {
            let died: HashMap<u64, u64> = sent
                .iter()
                .filter_map(|s| Some((s.id.0, s.died?)))
                .collect();
            for (seg, id) in common::openable::openable_messages(&dir, &[&*key]) {
                if let Some(&d) = died.get(&id) {
                    let dead_for = now.saturating_sub(d);
                    assert!(
                        dead_for <= DEADLINE.as_millis() as u64,
                        "step {step}: message {id} dead for {dead_for} ms is still decryptable in segment {seg}"
                    );
                }
            }
            checked += 1;
        }
        clock.advance(STEP);
    }
    assert!(checked > 50);
    let st = store.stats();
    assert!(st.last_gc_error.is_none(), "{st:?}");
    assert!(st.bytes_copied > 0, "compaction never ran: {st:?}");
    assert!(st.shred_latency_max.unwrap() <= DEADLINE + STEP, "{st:?}");
    // Every message acked or expired by now reads back as gone; the others are all there.
    let now = clock.now_ms();
    let mut by_queue: HashMap<Vec<u8>, Vec<u64>> = HashMap::new();
    for s in &sent {
        if s.died.is_none() && s.expires > now {
            by_queue.entry(s.queue.clone()).or_default().push(s.id.0);
        }
    }
    for (q, want) in by_queue {
        let got: Vec<u64> = store
            .read(&q, None, 10_000)
            .unwrap()
            .iter()
            .map(|m| m.id.0)
            .collect();
        assert_eq!(got, want, "queue {}", String::from_utf8_lossy(&q));
    }
    eprintln!(
        "write amplification {:.3}, shred latency p50 {:?} p99 {:?} max {:?}",
        st.write_amplification, st.shred_latency_p50, st.shred_latency_p99, st.shred_latency_max
    );
}
