//! Arbitrary operation sequences against an in-memory model, like `tests/model.rs` but
//! driven by libFuzzer: append / append_batch / read with a cursor / wait / ack /
//! ack_batch / ack of another queue's id / ack_through / purge / advance a ManualClock /
//! maintain (which compacts: the shred deadline is 4 s) / reopen, plus invalid calls that
//! must fail with their typed error and change nothing. Reads, `len`, `wait`, ack counts
//! and the live-message count must equal the model; after `maintain` nothing dead for
//! longer than the deadline is openable (`Stats::oldest_dead_openable_age`); at the end
//! every queue is checked again after a reopen, and once everything has expired and
//! maintenance ran, no dead record may be left.
//!
//! Not covered: injected I/O failures (the public API has no hook for them).
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use cinder::{Clock, Error, FileKeyProvider, ManualClock, MessageId, NewMessage, Store};
use cinder_fuzz::{key_provider, options, scratch_dir, CLOCK_BASE_MS, MAX_MESSAGE_SIZE};
use libfuzzer_sys::fuzz_target;

const QUEUES: u8 = 4;
const MAX_OPS: usize = 96;
/// Longest TTL used (s); the final check advances the clock past it.
const MAX_TTL_S: u64 = 600;
/// A short shred deadline (as in tests/model.rs), so `Advance` + `Maintain` compact
/// partly dead segments.
const SHRED_DELAY: Duration = Duration::from_secs(4);

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Append { q: u8, len: u16, seed: u8, ttl: u16 },
    Batch { q: u8, n: u8, ttl: u16 },
    Read { q: u8, after: Option<u16>, max: u8 },
    ReadRawCursor { q: u8, after: u64, max: u8 },
    Wait { q: u8, after: Option<u16> },
    Ack { q: u8, pick: u16 },
    AckBatch { q: u8, picks: [u16; 3] },
    AckForeign { q: u8, pick: u16 },
    AckRaw { q: u8, id: u64 },
    AckThrough { q: u8, pick: u16 },
    Purge { q: u8 },
    Advance { ms: u32 },
    Maintain,
    Reopen,
    Invalid { what: u8, q: u8 },
}

#[derive(Default)]
struct Model {
    /// queue → id → (payload, expires_at_ms)
    queues: BTreeMap<u8, BTreeMap<u64, (Vec<u8>, u64)>>,
    /// Every id ever issued per queue (acked ones too), for picking.
    issued: BTreeMap<u8, Vec<u64>>,
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

    fn live_total(&self, now: u64) -> u64 {
        (0..QUEUES).map(|q| self.live(q, now).len() as u64).sum()
    }

    fn pick(&self, q: u8, i: u16) -> Option<u64> {
        let v = self.issued.get(&q)?;
        (!v.is_empty()).then(|| v[usize::from(i) % v.len()])
    }

    fn all_issued(&self) -> impl Iterator<Item = u64> + '_ {
        self.issued.values().flatten().copied()
    }

    /// Removes the ids matching `pred`; returns how many were live.
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

    fn add(&mut self, q: u8, id: u64, payload: Vec<u8>, expires: u64) {
        let m = self.queues.entry(q).or_default();
        assert!(
            m.insert(id, (payload, expires)).is_none(),
            "id {id} issued twice"
        );
        self.issued.entry(q).or_default().push(id);
    }
}

fn qname(q: u8) -> Vec<u8> {
    format!("queue-{}", q % QUEUES).into_bytes()
}

fn ttl_of(t: u16) -> Duration {
    // 1 ms ..= MAX_TTL_S s, with short TTLs common enough to expire within a run.
    Duration::from_millis(1 + u64::from(t) * 1000 * MAX_TTL_S / u64::from(u16::MAX))
}

struct Ctx {
    dir: PathBuf,
    key: Arc<FileKeyProvider>,
    clock: Arc<ManualClock>,
}

impl Ctx {
    fn open(&self) -> Store {
        let mut o = options(self.key.clone(), self.clock.clone());
        o.max_shred_delay = SHRED_DELAY;
        Store::open(&self.dir, o).expect("open")
    }
}

fn read_all(store: &Store, q: u8) -> Vec<(u64, Vec<u8>)> {
    store
        .read(&qname(q), None, 100_000)
        .expect("read")
        .into_iter()
        .map(|m| (m.id.0, m.payload))
        .collect()
}

fn apply(op: &Op, store: &mut Store, model: &mut Model, cx: &Ctx) {
    let now = cx.clock.now_ms();
    match *op {
        Op::Append { q, len, seed, ttl } => {
            let q = q % QUEUES;
            let len = usize::from(len) % (MAX_MESSAGE_SIZE + 1);
            let payload: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
            let ttl = ttl_of(ttl);
            let id = store.append(&qname(q), &payload, ttl).expect("append");
            model.add(q, id.0, payload, now + ttl.as_millis() as u64);
        }
        Op::Batch { q, n, ttl } => {
            let q = q % QUEUES;
            let payloads: Vec<Vec<u8>> = (0..n % 9).map(|i| vec![i; usize::from(i) * 7]).collect();
            let name = qname(q);
            let ttl = ttl_of(ttl);
            let items: Vec<_> = payloads
                .iter()
                .map(|p| NewMessage {
                    queue: &name,
                    payload: p,
                    ttl,
                })
                .collect();
            let ids = store.append_batch(&items).expect("append_batch");
            assert_eq!(ids.len(), payloads.len());
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "batch ids not increasing"
            );
            for (id, p) in ids.iter().zip(payloads) {
                model.add(q, id.0, p, now + ttl.as_millis() as u64);
            }
        }
        Op::Read { q, after, max } => {
            let q = q % QUEUES;
            let after_id = after.and_then(|i| model.pick(q, i));
            check_read(store, model, q, after_id, max, now);
        }
        Op::ReadRawCursor { q, after, max } => {
            check_read(store, model, q % QUEUES, Some(after), max, now)
        }
        Op::Wait { q, after } => {
            let q = q % QUEUES;
            let after_id = after.and_then(|i| model.pick(q, i));
            let want = model
                .live(q, now)
                .iter()
                .any(|(id, _)| after_id.is_none_or(|a| *id > a));
            let got = store
                .wait(&qname(q), after_id.map(MessageId), Duration::ZERO)
                .expect("wait");
            assert_eq!(got, want, "wait(queue {q}, after {after_id:?})");
        }
        Op::Ack { q, pick } => {
            let q = q % QUEUES;
            if let Some(id) = model.pick(q, pick) {
                let want = model.remove(q, now, |k| k == id) == 1;
                assert_eq!(
                    store.ack(&qname(q), MessageId(id)).expect("ack"),
                    want,
                    "ack {id}"
                );
            }
        }
        Op::AckBatch { q, picks } => {
            let q = q % QUEUES;
            let ids: Vec<u64> = picks.iter().filter_map(|&p| model.pick(q, p)).collect();
            let mut want = 0;
            for &id in &ids {
                want += model.remove(q, now, |k| k == id);
            }
            let ids: Vec<MessageId> = ids.into_iter().map(MessageId).collect();
            assert_eq!(store.ack_batch(&qname(q), &ids).expect("ack_batch"), want);
        }
        Op::AckForeign { q, pick } => {
            let q = q % QUEUES;
            let other = (q + 1) % QUEUES;
            if let Some(id) = model.pick(other, pick) {
                assert!(
                    !store.ack(&qname(q), MessageId(id)).expect("ack"),
                    "acked another queue's message"
                );
            }
        }
        Op::AckRaw { q, id } => {
            let q = q % QUEUES;
            // An id this queue never had must not ack anything.
            if !model.all_issued().any(|i| i == id) {
                assert!(!store.ack(&qname(q), MessageId(id)).expect("ack"));
            }
        }
        Op::AckThrough { q, pick } => {
            let q = q % QUEUES;
            if let Some(id) = model.pick(q, pick) {
                let want = model.remove(q, now, |k| k <= id);
                assert_eq!(
                    store
                        .ack_through(&qname(q), MessageId(id))
                        .expect("ack_through"),
                    want
                );
            }
        }
        Op::Purge { q } => {
            let q = q % QUEUES;
            let want = model.remove(q, now, |_| true);
            assert_eq!(store.purge(&qname(q)).expect("purge"), want);
        }
        Op::Advance { ms } => cx
            .clock
            .advance(Duration::from_millis(u64::from(ms % 120_000))),
        Op::Maintain => {
            store.maintain().expect("maintain");
            let s = store.stats();
            // A full maintenance pass removes every expired message from the index.
            assert_eq!(s.live_messages, model.live_total(now), "{s:?}");
            // ...and leaves no record dead for longer than the shred deadline openable.
            if let Some(age) = s.oldest_dead_openable_age {
                assert!(
                    age <= SHRED_DELAY,
                    "dead record openable after maintain: {s:?}"
                );
            }
        }
        Op::Reopen => {
            store.close().expect("close");
            *store = cx.open();
        }
        Op::Invalid { what, q } => {
            let name = qname(q);
            let long_q = vec![b'x'; 256];
            let big = vec![0u8; MAX_MESSAGE_SIZE + 1];
            let hour = Duration::from_secs(3600);
            let r = match what % 6 {
                0 => store.append(b"", b"x", hour),
                1 => store.append(&long_q, b"x", hour),
                2 => store.append(&name, &big, hour),
                3 => store.append(&name, b"x", Duration::ZERO),
                4 => store.append(&name, b"x", Duration::from_secs(400 * 86_400)),
                _ => {
                    // One bad item refuses the whole batch.
                    let items = [
                        NewMessage {
                            queue: &name,
                            payload: b"ok",
                            ttl: hour,
                        },
                        NewMessage {
                            queue: &name,
                            payload: &big,
                            ttl: hour,
                        },
                    ];
                    store.append_batch(&items).map(|v| v[0])
                }
            };
            match r {
                Err(Error::InvalidQueueId { .. })
                | Err(Error::MessageTooLarge { .. })
                | Err(Error::InvalidTtl { .. }) => {}
                other => panic!("invalid call #{} gave {other:?}", what % 6),
            }
            assert!(matches!(
                store.read(b"", None, 1),
                Err(Error::InvalidQueueId { .. })
            ));
            assert!(matches!(
                store.ack(&long_q, MessageId(1)),
                Err(Error::InvalidQueueId { .. })
            ));
        }
    }
}

fn check_read(store: &Store, model: &Model, q: u8, after: Option<u64>, max: u8, now: u64) {
    let max = usize::from(max % 12);
    let want: Vec<(u64, Vec<u8>)> = model
        .live(q, now)
        .into_iter()
        .filter(|(id, _)| after.is_none_or(|a| *id > a))
        .take(max)
        .collect();
    let got: Vec<(u64, Vec<u8>)> = store
        .read(&qname(q), after.map(MessageId), max)
        .expect("read")
        .into_iter()
        .map(|m| (m.id.0, m.payload))
        .collect();
    assert_eq!(got, want, "read(queue {q}, after {after:?}, max {max})");
    assert_eq!(
        store.len(&qname(q)).expect("len"),
        model.live(q, now).len() as u64,
        "len(queue {q})"
    );
}

fn run(ops: &[Op], dir: &Path, key: Arc<FileKeyProvider>) {
    let cx = Ctx {
        dir: dir.to_path_buf(),
        key,
        clock: ManualClock::new(CLOCK_BASE_MS),
    };
    let mut store = cx.open();
    let mut model = Model::default();
    for op in ops {
        apply(op, &mut store, &mut model, &cx);
    }
    // Every queue, before and after a reopen.
    for _ in 0..2 {
        let now = cx.clock.now_ms();
        for q in 0..QUEUES {
            assert_eq!(
                read_all(&store, q),
                model.live(q, now),
                "final read of queue {q}"
            );
        }
        store.close().expect("close");
        drop(store);
        store = cx.open();
    }
    // Everything expired: after maintenance and a reopen, no dead data is left.
    cx.clock.advance(Duration::from_secs(MAX_TTL_S + 3600));
    store.maintain().expect("maintain");
    store.close().expect("close");
    drop(store);
    let store = cx.open();
    let s = store.stats();
    assert_eq!(s.live_messages, 0, "{s:?}");
    assert_eq!(
        s.dead_records, 0,
        "dead records left after everything expired: {s:?}"
    );
    store.close().expect("close");
}

fuzz_target!(|ops: Vec<Op>| {
    let ops = &ops[..ops.len().min(MAX_OPS)];
    let scratch = scratch_dir();
    let key = key_provider(&scratch.path().join("master.key"));
    run(ops, &scratch.path().join("data"), key);
});
