//! Recovery is crash-idempotent (contract 10), durable means durable (5) and deletion is
//! bounded (6), at every crash point: a reference workload (appends, acks, ack_through,
//! purge, segment rotation, compaction, shredding, a master-key rotation, in each
//! durability mode) runs once to count its I/O calls; then, for every call index k, it
//! runs again cut at call k, as a process crash (every call before k took effect) and as
//! a power cut (every byte and directory change not covered by a successful fsync is
//! dropped, `cinder::vfs::FaultFs`); the store is reopened with the real recovery, and
//! the invariants are checked:
//! - the store opens;
//! - every append that returned under Sync/Group (or before a flush that returned, under
//!   Async) is readable, with its payload, unless an ack of it was attempted;
//! - no message whose ack returned (durably) is ever readable again;
//! - no record dead for longer than `max_shred_delay` at the last completed maintenance
//!   pass is openable with any key in the crash image's keystore, and after the reopened
//!   store's first maintenance pass no durably acked message is openable at all.
//!
//! Crashes inside recovery: for a sample of crash points, the reopen itself is cut at
//! each of its own I/O calls, and the store must still open afterwards.
//!
//! The default run takes every 16th crash point, and cuts the reopen at each of its calls
//! for every 8th of those; `CINDER_CRASH_POINTS=all` takes every crash point, and cuts
//! the reopen after every 8th (see RELIABILITY.md).

mod common;

use common::rig::Rig;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cinder::vfs::{CrashImage, FaultFs};
use cinder::{Clock, Durability, Error, MessageId, Store};

const DEADLINE: Duration = Duration::from_secs(8);
const QUEUES: [&[u8]; 3] = [b"alice", b"bob", b"carol"];
const TTL: Duration = Duration::from_secs(3600);

fn payload(n: u64) -> Vec<u8> {
    let mut p = format!("payload-{n}-").into_bytes();
    p.resize(600 + (n as usize * 53) % 500, b'.');
    p
}

/// What the workload was told, and so what the store promised.
#[derive(Debug, Default, Clone)]
struct Ledger {
    /// Appends whose durability was promised: id → (queue, n).
    durable: BTreeMap<u64, (usize, u64)>,
    /// Async appends not yet covered by a flush.
    unflushed: Vec<(u64, (usize, u64))>,
    /// Appends that returned, per queue, not yet acked (the workload's model of a queue).
    live: [Vec<u64>; 3],
    /// Acks whose durability was promised: id → clock when acked.
    acked: BTreeMap<u64, u64>,
    /// Async acks not yet covered by a flush.
    acks_unflushed: Vec<(u64, u64)>,
    /// Every id an ack, ack_through or purge may have removed.
    ack_tried: HashSet<u64>,
    /// Clock at the end of the last maintenance pass that returned.
    maintained_at: Option<u64>,
    /// The master-key rotation was started.
    rotation_started: bool,
}

/// The reference workload. Stops at the first error (after a power cut every call fails).
fn workload(rig: &Rig, fs: &Arc<FaultFs>, l: &mut Ledger) -> cinder::Result<()> {
    let store = Store::open(&rig.dir, rig.options(Some(Arc::clone(fs)), false))?;
    let r = steps(rig, &store, l);
    // After a power cut close fails too; what it did not write is lost.
    let closed = store.close();
    r.and(closed)
}

fn steps(rig: &Rig, store: &Store, l: &mut Ledger) -> cinder::Result<()> {
    let is_async = rig.mode == Durability::Async;
    let mut n = 0u64;
    let mut append = |store: &Store, l: &mut Ledger, q: usize| -> cinder::Result<()> {
        n += 1;
        let id = store.append(QUEUES[q], &payload(n), TTL)?.0;
        l.live[q].push(id);
        if is_async {
            l.unflushed.push((id, (q, n)));
        } else {
            l.durable.insert(id, (q, n));
        }
        Ok(())
    };
    let ack_done = |l: &mut Ledger, ids: Vec<u64>, now: u64| {
        for id in ids {
            if is_async {
                l.acks_unflushed.push((id, now));
            } else {
                l.acked.insert(id, now);
            }
        }
    };
    let flush = |store: &Store, l: &mut Ledger| -> cinder::Result<()> {
        store.flush()?;
        for (id, v) in l.unflushed.drain(..) {
            l.durable.insert(id, v);
        }
        for (id, t) in l.acks_unflushed.drain(..) {
            l.acked.insert(id, t);
        }
        Ok(())
    };
    let maintain = |store: &Store, l: &mut Ledger| -> cinder::Result<()> {
        store.maintain()?;
        l.maintained_at = Some(rig.clock.now_ms());
        Ok(())
    };
    // 1. Fill a segment and a half across three queues.
    for i in 0..60 {
        append(store, l, i % 3)?;
    }
    // 2. Acks: every other message of alice one by one, bob through his 8th.
    let alice: Vec<u64> = l.live[0].iter().step_by(2).copied().collect();
    for id in alice {
        l.ack_tried.insert(id);
        if store.ack(QUEUES[0], MessageId(id))? {
            l.live[0].retain(|&x| x != id);
            ack_done(l, vec![id], rig.clock.now_ms());
        }
    }
    let through = l.live[1][7];
    let upto: Vec<u64> = l.live[1]
        .iter()
        .copied()
        .filter(|&x| x <= through)
        .collect();
    l.ack_tried.extend(&upto);
    store.ack_through(QUEUES[1], MessageId(through))?;
    l.live[1].retain(|&x| x > through);
    ack_done(l, upto, rig.clock.now_ms());
    flush(store, l)?;
    // 3. Acks settle; active segments close by age; a maintenance pass seals and shreds.
    rig.clock.advance(Duration::from_secs(3));
    maintain(store, l)?;
    // 4. More appends (a rotation by size), then carol's account is removed.
    for i in 0..40 {
        append(store, l, i % 2)?;
    }
    let carol = std::mem::take(&mut l.live[2]);
    l.ack_tried.extend(&carol);
    store.purge(QUEUES[2])?;
    ack_done(l, carol, rig.clock.now_ms());
    flush(store, l)?;
    // 5. A master-key rotation.
    l.rotation_started = true;
    store.rotate_master_key(rig.key2.clone())?;
    // 6. Past the compaction deadline of the partly dead segments: compaction copies
    //    their survivors, and everything dead is shredded.
    let bob: Vec<u64> = l.live[1].iter().take(5).copied().collect();
    l.ack_tried.extend(&bob);
    store.ack_batch(
        QUEUES[1],
        &bob.iter().map(|&i| MessageId(i)).collect::<Vec<_>>(),
    )?;
    l.live[1].retain(|x| !bob.contains(x));
    ack_done(l, bob, rig.clock.now_ms());
    flush(store, l)?;
    rig.clock.advance(DEADLINE);
    maintain(store, l)?;
    rig.clock.advance(Duration::from_secs(1));
    maintain(store, l)?;
    for _ in 0..5 {
        append(store, l, 0)?;
    }
    flush(store, l)
}

/// Checks the image a power cut left (already written to the dir) against the ledger.
fn check_image(rig: &Rig, l: &Ledger, k: u64) -> Result<(), String> {
    // Deadline at the cut: what was dead for `DEADLINE` at the last completed pass is
    // not openable by any key in the keystore.
    let openable: HashSet<u64> = common::openable::openable_messages(&rig.dir, &rig.keys())
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    if let Some(t) = l.maintained_at {
        for (id, acked_at) in &l.acked {
            if acked_at + DEADLINE.as_millis() as u64 <= t && openable.contains(id) {
                return Err(format!(
                    "k={k}: message {id} acked at {acked_at} is openable after the pass at {t}"
                ));
            }
        }
    }
    Ok(())
}

/// Reopens the dir with the real file system and checks the queues.
fn check_reopen(rig: &Rig, l: &Ledger, k: u64, what: &str) -> Result<(), String> {
    let store = Store::open(&rig.dir, rig.options(None, l.rotation_started))
        .map_err(|e| format!("{what} k={k}: the store does not open after the crash: {e}"))?;
    for (q, name) in QUEUES.iter().enumerate() {
        let got = store
            .read(name, None, 10_000)
            .map_err(|e| format!("{what} k={k}: read: {e}"))?;
        let ids: HashSet<u64> = got.iter().map(|m| m.id.0).collect();
        for m in &got {
            if l.acked.contains_key(&m.id.0) {
                return Err(format!("{what} k={k}: acked message {} came back", m.id));
            }
        }
        for (id, (qq, n)) in &l.durable {
            if *qq != q || l.ack_tried.contains(id) {
                continue;
            }
            let Some(m) = got.iter().find(|m| m.id.0 == *id) else {
                return Err(format!(
                    "{what} k={k}: durable message {id} of queue {q} is lost ({} read)",
                    ids.len()
                ));
            };
            if m.payload != payload(*n) {
                return Err(format!("{what} k={k}: message {id} has the wrong payload"));
            }
        }
    }
    // The reopened store meets the deadline for everything acked before the cut.
    rig.clock.advance(Duration::from_secs(1));
    store
        .maintain()
        .and_then(|_| store.maintain())
        .map_err(|e| format!("{what} k={k}: maintain after reopen: {e}"))?;
    let openable: HashSet<u64> = common::openable::openable_messages(&rig.dir, &rig.keys())
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    if let Some(id) = l.acked.keys().find(|id| openable.contains(id)) {
        return Err(format!(
            "{what} k={k}: acked message {id} still openable after the first passes"
        ));
    }
    store
        .close()
        .map_err(|e| format!("{what} k={k}: close: {e}"))?;
    Ok(())
}

/// Crashes the reopen at each of its own I/O calls (process crash and power cut), then
/// checks a real reopen.
fn crash_recovery(rig: &Rig, img: &CrashImage, l: &Ledger, k: u64) -> Result<u64, String> {
    let mut explored = 0;
    for j in 1.. {
        img.write_to(&rig.dir).unwrap();
        let fs = Arc::new(FaultFs::new(&rig.dir).unwrap());
        fs.crash_at(j);
        let opened = Store::open(
            &rig.dir,
            rig.options(Some(Arc::clone(&fs)), l.rotation_started),
        );
        if let Ok(s) = opened {
            // Let the open's own background work (a spare segment) reach the cut.
            let _ = s.flush();
            let _ = s.close();
        }
        if !fs.crashed() {
            break; // the open and its aftermath did fewer than j calls
        }
        explored += 1;
        let process = CrashImage::read_from(&rig.dir).unwrap();
        for (what, cut) in [("process", process), ("power", fs.crash_image())] {
            cut.write_to(&rig.dir).unwrap();
            check_reopen(rig, l, k, &format!("recovery {what} crash j={j}"))?;
        }
    }
    Ok(explored)
}

fn every() -> u64 {
    match std::env::var("CINDER_CRASH_POINTS").as_deref() {
        Ok("all") => 1,
        _ => 16,
    }
}

fn enumerate(mode: Durability) -> (u64, u64) {
    let rig = Rig::new(mode, DEADLINE);
    // Dry run: count the I/O calls.
    let fs = Arc::new(FaultFs::new(&rig.dir).unwrap());
    let mut l = Ledger::default();
    workload(&rig, &fs, &mut l).expect("the workload runs without faults");
    let total = fs.calls();
    assert!(total > 100, "the workload does I/O: {total}");
    let step = every();
    let mut explored = 0;
    let mut recovery_points = 0;
    let mut failures = Vec::new();
    let mut k = 1;
    while k <= total {
        rig.reset();
        let fs = Arc::new(FaultFs::new(&rig.dir).unwrap());
        fs.crash_at(k);
        let mut l = Ledger::default();
        let r = workload(&rig, &fs, &mut l);
        if fs.crashed() {
            assert!(r.is_err(), "k={k}: a workload cut short reports an error");
            if let Err(e) = &r {
                assert!(
                    !matches!(e, Error::Corruption { .. }),
                    "k={k}: a power cut is not corruption: {e}"
                );
            }
            explored += 1;
            let recent = fs.recent_calls();
            let process = CrashImage::read_from(&rig.dir).unwrap();
            for (what, img) in [("process", process), ("power", fs.crash_image())] {
                img.write_to(&rig.dir).unwrap();
                let checked = check_image(&rig, &l, k)
                    .and_then(|()| check_reopen(&rig, &l, k, &format!("{what} crash")))
                    .and_then(|()| {
                        if k % (step * 8) == 1 {
                            crash_recovery(&rig, &img, &l, k).map(|n| recovery_points += n)
                        } else {
                            Ok(())
                        }
                    });
                if let Err(e) = checked {
                    failures.push(format!("{e}\n  last calls: {recent:#?}"));
                }
            }
            if failures.len() >= 3 {
                break;
            }
        }
        k += step;
    }
    eprintln!(
        "crash points ({mode:?}): {explored} of {total} explored, {recovery_points} crashes inside recovery, {} violations",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(explored > 0);
    (explored, recovery_points)
}

#[test]
fn every_crash_point_of_the_reference_workload_sync() {
    enumerate(Durability::Sync);
}

#[test]
fn every_crash_point_of_the_reference_workload_group() {
    enumerate(Durability::default());
}

#[test]
fn every_crash_point_of_the_reference_workload_async() {
    enumerate(Durability::Async);
}
