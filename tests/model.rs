//! Model-based test: random sequences of append / read / ack / ack_through / purge /
//! advance clock / maintain (which compacts) / reopen behave exactly like a simple
//! in-memory model (FIFO per queue, acks scoped to their queue, nothing expired or acked
//! ever returned, nothing live ever lost by a compaction). Idempotent appends
//! (`append_once`) are checked for soundness — a duplicate is only ever reported for the
//! message an earlier append with that client id stored in that queue, within the window,
//! not purged since — and completeness — while that message is live, a repeat is always
//! a duplicate, across compactions and reopens.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cinder::{Durability, FileKeyProvider, ManualClock, MessageId, Options, Store};
use proptest::prelude::*;
use proptest::sample::Index;

#[derive(Debug, Clone)]
enum Op {
    Append {
        q: u8,
        len: u16,
        seed: u8,
        ttl_s: u16,
    },
    Batch {
        q: u8,
        n: u8,
        ttl_s: u16,
    },
    AppendOnce {
        q: u8,
        cid: u8,
        seed: u8,
        ttl_s: u16,
    },
    Read {
        q: u8,
        after: Option<Index>,
        max: u8,
    },
    Ack {
        q: u8,
        pick: Index,
    },
    AckForeign {
        q: u8,
        pick: Index,
    },
    AckThrough {
        q: u8,
        pick: Index,
    },
    Purge {
        q: u8,
    },
    Advance {
        ms: u32,
    },
    Maintain,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..4u8, 0..600u16, any::<u8>(), 1..120u16).prop_map(|(q, len, seed, ttl_s)| Op::Append { q, len, seed, ttl_s }),
        2 => (0..4u8, 1..6u8, 1..120u16).prop_map(|(q, n, ttl_s)| Op::Batch { q, n, ttl_s }),
        6 => (0..4u8, 0..5u8, any::<u8>(), 1..120u16).prop_map(|(q, cid, seed, ttl_s)| Op::AppendOnce { q, cid, seed, ttl_s }),
        4 => (0..4u8, proptest::option::of(any::<Index>()), 1..10u8).prop_map(|(q, after, max)| Op::Read { q, after, max }),
        4 => (0..4u8, any::<Index>()).prop_map(|(q, pick)| Op::Ack { q, pick }),
        1 => (0..4u8, any::<Index>()).prop_map(|(q, pick)| Op::AckForeign { q, pick }),
        1 => (0..4u8, any::<Index>()).prop_map(|(q, pick)| Op::AckThrough { q, pick }),
        1 => (0..4u8).prop_map(|q| Op::Purge { q }),
        2 => (0..40_000u32).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Maintain),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    /// queue → id → (payload, expires_at_ms)
    queues: BTreeMap<u8, BTreeMap<u64, (Vec<u8>, u64)>>,
    /// Every id ever issued per queue (acked ones too), for picking.
    issued: BTreeMap<u8, Vec<u64>>,
    /// (queue, client id) → (the message the last `append_once` stored, when). Removed
    /// by a purge of the queue.
    cids: BTreeMap<(u8, u8), (u64, u64)>,
}

impl Model {
    fn live(&self, q: u8, now: u64) -> Vec<(u64, Vec<u8>)> {
        self.queues
            .get(&q)
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v.1 > now)
                    .map(|(k, v)| (*k, v.0.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn pick(&self, q: u8, i: Index) -> Option<u64> {
        let v = self.issued.get(&q)?;
        (!v.is_empty()).then(|| v[i.index(v.len())])
    }

    /// Removes ids (<= through, or exactly `id`); returns how many were live.
    fn remove(&mut self, q: u8, now: u64, pred: impl Fn(u64) -> bool) -> u64 {
        let Some(m) = self.queues.get_mut(&q) else {
            return 0;
        };
        let ids: Vec<u64> = m.keys().copied().filter(|&k| pred(k)).collect();
        let mut n = 0;
        for id in ids {
            if m.remove(&id).is_some_and(|v| v.1 > now) {
                n += 1;
            }
        }
        n
    }
}

/// Short enough that `Advance` passes it now and then.
const DEDUPE_WINDOW: Duration = Duration::from_secs(90);

fn qname(q: u8) -> Vec<u8> {
    format!("queue-{q}").into_bytes()
}

fn open(dir: &Path, key: &Arc<FileKeyProvider>, clock: &Arc<ManualClock>) -> Store {
    let mut o = Options::new(key.clone());
    o.segment_size = 64 << 10;
    o.max_message_size = 8 << 10;
    o.clock = clock.clone();
    o.background_reaper = false;
    // A short shred deadline, so `Advance` + `Maintain` compact partly dead segments.
    o.max_shred_delay = Duration::from_secs(4);
    o.durability = Durability::Group {
        max_delay: Duration::ZERO,
    };
    o.dedupe_window = DEDUPE_WINDOW;
    Store::open(dir, o).expect("open")
}

struct Ctx {
    dir: std::path::PathBuf,
    key: Arc<FileKeyProvider>,
    clock: Arc<ManualClock>,
}

fn apply(op: &Op, store: &mut Store, model: &mut Model, cx: &Ctx) -> Result<(), TestCaseError> {
    let clock = &cx.clock;
    let now = clock.now_ms_for_test();
    match op {
        Op::Append {
            q,
            len,
            seed,
            ttl_s,
        } => {
            let payload: Vec<u8> = (0..*len).map(|i| seed.wrapping_add(i as u8)).collect();
            let ttl = Duration::from_secs(u64::from(*ttl_s));
            let id = store.append(&qname(*q), &payload, ttl).unwrap();
            model
                .queues
                .entry(*q)
                .or_default()
                .insert(id.0, (payload, now + ttl.as_millis() as u64));
            model.issued.entry(*q).or_default().push(id.0);
        }
        Op::Batch { q, n, ttl_s } => batch(store, model, *q, *n, *ttl_s, now)?,
        Op::AppendOnce {
            q,
            cid,
            seed,
            ttl_s,
        } => append_once(store, model, (*q, *cid), (*seed, *ttl_s), now)?,
        Op::Read { q, after, max } => {
            let live = model.live(*q, now);
            let after_id = after.and_then(|i| model.pick(*q, i));
            let want: Vec<(u64, Vec<u8>)> = live
                .into_iter()
                .filter(|(id, _)| after_id.is_none_or(|a| *id > a))
                .take(usize::from(*max))
                .collect();
            let got = store
                .read(&qname(*q), after_id.map(MessageId), usize::from(*max))
                .unwrap();
            let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|m| (m.id.0, m.payload)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(
                store.len(&qname(*q)).unwrap(),
                model.live(*q, now).len() as u64
            );
        }
        Op::Ack { q, pick } => {
            if let Some(id) = model.pick(*q, *pick) {
                let want = model.remove(*q, now, |k| k == id) == 1;
                prop_assert_eq!(store.ack(&qname(*q), MessageId(id)).unwrap(), want);
            }
        }
        Op::AckForeign { q, pick } => {
            let other = (q + 1) % 4;
            if let Some(id) = model.pick(other, *pick) {
                prop_assert!(
                    !store.ack(&qname(*q), MessageId(id)).unwrap(),
                    "acked another queue's message"
                );
            }
        }
        Op::AckThrough { q, pick } => {
            if let Some(id) = model.pick(*q, *pick) {
                let want = model.remove(*q, now, |k| k <= id);
                prop_assert_eq!(store.ack_through(&qname(*q), MessageId(id)).unwrap(), want);
            }
        }
        Op::Purge { q } => {
            let want = model.remove(*q, now, |_| true);
            model.cids.retain(|(mq, _), _| mq != q);
            prop_assert_eq!(store.purge(&qname(*q)).unwrap(), want);
        }
        Op::Advance { ms } => clock.advance(Duration::from_millis(u64::from(*ms))),
        Op::Maintain => {
            store.maintain().unwrap();
        }
        Op::Reopen => {
            store.close().unwrap();
            *store = open(&cx.dir, &cx.key, &cx.clock);
        }
    }
    Ok(())
}

/// `append_batch` of `n` messages: ids increase, and all are stored.
fn batch(
    store: &Store,
    model: &mut Model,
    q: u8,
    n: u8,
    ttl_s: u16,
    now: u64,
) -> Result<(), TestCaseError> {
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| vec![i; usize::from(i) * 7]).collect();
    let name = qname(q);
    let ttl = Duration::from_secs(u64::from(ttl_s));
    let items: Vec<_> = payloads
        .iter()
        .map(|p| cinder::NewMessage {
            queue: &name,
            payload: p,
            ttl,
        })
        .collect();
    let ids = store.append_batch(&items).unwrap();
    prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
    for (id, p) in ids.iter().zip(payloads) {
        model
            .queues
            .entry(q)
            .or_default()
            .insert(id.0, (p, now + ttl.as_millis() as u64));
        model.issued.entry(q).or_default().push(id.0);
    }
    Ok(())
}

/// `append_once` against the model: a duplicate only of what an earlier `append_once`
/// stored here within the window (not purged since); never a second store of a message
/// that is still live.
fn append_once(
    store: &Store,
    model: &mut Model,
    (q, cid): (u8, u8),
    (seed, ttl_s): (u8, u16),
    now: u64,
) -> Result<(), TestCaseError> {
    let payload = vec![seed; 1 + usize::from(cid) * 40];
    let ttl = Duration::from_secs(u64::from(ttl_s));
    let client_id = cinder::ClientMessageId([cid; 16]);
    let r = store
        .append_once(&qname(q), client_id, &payload, ttl)
        .unwrap();
    let before = model.cids.get(&(q, cid)).copied();
    let window = DEDUPE_WINDOW.as_millis() as u64;
    let in_window = before.filter(|&(_, at)| now - at < window);
    let live = in_window.is_some_and(|(id, _)| {
        model
            .queues
            .get(&q)
            .and_then(|m| m.get(&id))
            .is_some_and(|v| v.1 > now)
    });
    match r {
        cinder::Appended::Duplicate(id) => {
            prop_assert_eq!(
                Some(id.0),
                in_window.map(|x| x.0),
                "a duplicate of a message no append_once stored here within the window"
            );
        }
        cinder::Appended::Stored(id) => {
            prop_assert!(!live, "a repeat of a live message was stored again");
            model
                .queues
                .entry(q)
                .or_default()
                .insert(id.0, (payload, now + ttl.as_millis() as u64));
            model.issued.entry(q).or_default().push(id.0);
            model.cids.insert((q, cid), (id.0, now));
        }
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let clock = ManualClock::new(1_700_000_000_000);
    let mut store = open(&dir, &key, &clock);
    let mut model = Model::default();
    let cx = Ctx {
        dir: dir.clone(),
        key: key.clone(),
        clock: clock.clone(),
    };
    for op in ops {
        apply(op, &mut store, &mut model, &cx)?;
    }
    // Final check of every queue, after a reopen too.
    for round in 0..2 {
        let now = clock.now_ms_for_test();
        for q in 0..4u8 {
            let got: Vec<(u64, Vec<u8>)> = store
                .read(&qname(q), None, 10_000)
                .unwrap()
                .into_iter()
                .map(|m| (m.id.0, m.payload))
                .collect();
            prop_assert_eq!(got, model.live(q, now), "queue {} round {}", q, round);
        }
        store.close().unwrap();
        drop(store);
        store = open(&dir, &key, &clock);
    }
    // Everything acked and expired: after maintenance, no dead data is left but the
    // segments still being written.
    clock.advance(Duration::from_secs(3600));
    store.maintain().unwrap();
    store.close().unwrap();
    drop(store);
    let store = open(&dir, &key, &clock);
    let s = store.stats();
    prop_assert_eq!(s.live_messages, 0);
    prop_assert_eq!(
        s.dead_records,
        0,
        "dead records left after everything expired: {:?}",
        s
    );
    Ok(())
}

trait NowForTest {
    fn now_ms_for_test(&self) -> u64;
}

impl NowForTest for ManualClock {
    fn now_ms_for_test(&self) -> u64 {
        cinder::Clock::now_ms(self)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops)?;
    }
}
