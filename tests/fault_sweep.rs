//! Bad I/O is an error, never a crash or wrong data (contracts 5, 8, 9): a reference
//! workload (appends, acks, ack_through, purge, segment rotation and sealing,
//! compaction, shredding, a master-key rotation) runs once to count its I/O calls; then
//! for each call index k it runs again with call k failing once with ENOSPC, and again
//! with EIO (through `cinder::vfs::FaultFs`). Every run must:
//! - not panic, and return only typed errors: `DiskFull` for a full disk (or
//!   `WriterFailed { cause: DiskFull }` once the store stopped), `Io` or
//!   `WriterFailed { cause: Io }` for a failed device;
//! - never return wrong data: every message read has the payload it was appended with,
//!   and no message whose ack returned is read again;
//! - either keep serving or be stopped with `WriterFailed` (a failed fsync stops it,
//!   never retried);
//! - reopen with the real file system and hold every durable append not acked, and no
//!   acked message.
//!
//! The default run takes every 4th call (and checks that appends resume without a
//! restart once the fault is gone for every 8th); `CINDER_FAULT_SWEEP=all` takes every one.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::vfs::{FaultFs, FaultKind};
use cinder::{Durability, Error, FailureCause, MessageId, Store};
use common::rig::Rig;

const DEADLINE: Duration = Duration::from_secs(8);
const TTL: Duration = Duration::from_secs(3600);
const QUEUES: [&[u8]; 3] = [b"alice", b"bob", b"carol"];

fn payload(n: u64) -> Vec<u8> {
    let mut p = format!("sweep-{n}-").into_bytes();
    p.resize(500 + (n as usize * 71) % 700, b'~');
    p
}

#[derive(Default)]
struct Ledger {
    /// Appends that returned: id → n (all durable: Group mode).
    appended: BTreeMap<u64, u64>,
    live: [Vec<u64>; 3],
    acked: HashSet<u64>,
    ack_tried: HashSet<u64>,
    errors: Vec<Error>,
    wrong: Vec<String>,
    rotation_started: bool,
}

/// Whether an error is of the kind the injected fault should produce.
fn typed(e: &Error, kind: FaultKind) -> bool {
    match kind {
        FaultKind::NoSpace => matches!(
            e,
            Error::DiskFull { .. }
                | Error::WriterFailed {
                    cause: FailureCause::DiskFull,
                    ..
                }
        ),
        _ => matches!(
            e,
            Error::Io { .. }
                | Error::WriterFailed {
                    cause: FailureCause::Io,
                    ..
                }
        ),
    }
}

/// Checks a page read from `q` against the ledger.
fn check_read(l: &Ledger, got: &[cinder::Message]) -> Result<(), String> {
    for m in got {
        if l.acked.contains(&m.id.0) {
            return Err(format!("acked message {} was read", m.id));
        }
        match l.appended.get(&m.id.0) {
            Some(n) if m.payload == payload(*n) => {}
            Some(_) => return Err(format!("message {} has the wrong payload", m.id)),
            // An append that failed may still have been written: it is not in the
            // ledger, and its payload cannot be checked here.
            None => {}
        }
    }
    Ok(())
}

/// The workload: every step runs whatever the previous ones returned.
fn workload(rig: &Rig, store: &Store, l: &mut Ledger) {
    let mut n = 0u64;
    let note = |l: &mut Ledger, r: Result<(), Error>| {
        if let Err(e) = r {
            l.errors.push(e);
        }
    };
    for round in 0..2 {
        for i in 0..45 {
            n += 1;
            let q = i % 3;
            let r = store.append(QUEUES[q], &payload(n), TTL).map(|id| {
                l.appended.insert(id.0, n);
                l.live[q].push(id.0);
            });
            note(l, r);
        }
        let victims: Vec<u64> = l.live[0].iter().step_by(2).copied().collect();
        for id in victims {
            l.ack_tried.insert(id);
            let r = store.ack(QUEUES[0], MessageId(id)).map(|ok| {
                if ok {
                    l.acked.insert(id);
                    l.live[0].retain(|&x| x != id);
                }
            });
            note(l, r);
        }
        if let Some(&through) = l.live[1].get(4) {
            let upto: Vec<u64> = l.live[1]
                .iter()
                .copied()
                .filter(|&x| x <= through)
                .collect();
            l.ack_tried.extend(&upto);
            let r = store.ack_through(QUEUES[1], MessageId(through)).map(|_| {
                l.acked.extend(&upto);
                l.live[1].retain(|&x| x > through);
            });
            note(l, r);
        }
        let page = store.read(QUEUES[2], None, 1000);
        match page {
            Ok(p) => {
                if let Err(e) = check_read(l, &p) {
                    l.wrong.push(e);
                }
            }
            Err(e) => l.errors.push(e),
        }
        if round == 1 {
            let carol = l.live[2].clone();
            l.ack_tried.extend(&carol);
            let r = store.purge(QUEUES[2]).map(|_| {
                l.acked.extend(&carol);
                l.live[2].clear();
            });
            note(l, r);
            l.rotation_started = true;
            let r = store.rotate_master_key(rig.key2.clone()).map(|_| ());
            note(l, r);
        }
        rig.clock.advance(DEADLINE);
        let r = store.maintain().map(|_| ());
        note(l, r);
    }
    let r = store.flush();
    note(l, r);
}

/// After the fault is gone: appends work again, or the store says it stopped.
fn resumes(store: &Store) -> Result<(), String> {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        match store.append(b"resume", b"after the fault", TTL) {
            // Resumed, or stopped (a reopen recovers): both are clear outcomes.
            Ok(_) | Err(Error::WriterFailed { .. }) => return Ok(()),
            Err(Error::DiskFull { .. }) if Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("appends do not resume after the fault: {e}")),
        }
    }
}

fn check_reopen(rig: &Rig, l: &Ledger) -> Result<(), String> {
    let store = Store::open(&rig.dir, rig.options(None, l.rotation_started))
        .map_err(|e| format!("the store does not reopen: {e}"))?;
    for (q, name) in QUEUES.iter().enumerate() {
        let got = store
            .read(name, None, 10_000)
            .map_err(|e| format!("read after reopen: {e}"))?;
        check_read(l, &got)?;
        let ids: HashSet<u64> = got.iter().map(|m| m.id.0).collect();
        for id in &l.live[q] {
            if !l.ack_tried.contains(id) && !ids.contains(id) {
                return Err(format!("durable message {id} lost"));
            }
        }
    }
    store.close().map_err(|e| format!("close: {e}"))
}

fn sweep(kind: FaultKind) {
    let rig = Rig::new(Durability::default(), DEADLINE);
    let fs = Arc::new(FaultFs::new(&rig.dir).unwrap());
    let store = Store::open(&rig.dir, rig.options(Some(fs.clone()), false)).unwrap();
    let mut l = Ledger::default();
    workload(&rig, &store, &mut l);
    store.close().unwrap();
    assert!(l.errors.is_empty() && l.wrong.is_empty(), "{:?}", l.errors);
    let total = fs.calls();
    let step = match std::env::var("CINDER_FAULT_SWEEP").as_deref() {
        Ok("all") => 1,
        _ => 4,
    };
    let (mut runs, mut faulted, mut stopped) = (0, 0, 0);
    let mut failures = Vec::new();
    for k in (1..=total).step_by(step) {
        rig.reset();
        let fs = Arc::new(FaultFs::new(&rig.dir).unwrap());
        fs.fail_call(k, kind);
        let mut l = Ledger::default();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let store = match Store::open(&rig.dir, rig.options(Some(fs.clone()), false)) {
                Ok(s) => s,
                Err(e) => {
                    l.errors.push(e);
                    return (Ok(()), false);
                }
            };
            workload(&rig, &store, &mut l);
            fs.clear_faults();
            let resumed = if k % (step as u64 * 8) == 1 {
                resumes(&store)
            } else {
                Ok(())
            };
            let halted = matches!(store.flush(), Err(Error::WriterFailed { .. }));
            let _ = store.close();
            (resumed, halted)
        }));
        runs += 1;
        let Ok((resumed, halted)) = outcome else {
            failures.push(format!("k={k}: panicked"));
            continue;
        };
        faulted += u64::from(fs.injected() > 0);
        stopped += u64::from(halted);
        for e in &l.errors {
            // A call that ran into the fault names its kind; later calls may find the
            // store closed by the workload's own close.
            if !typed(e, kind) && !matches!(e, Error::Closed) {
                failures.push(format!("k={k}: untyped error for {kind:?}: {e:?}"));
            }
        }
        failures.extend(l.wrong.iter().map(|w| format!("k={k}: wrong data: {w}")));
        if let Err(e) = resumed {
            failures.push(format!("k={k}: {e}"));
        }
        if let Err(e) = check_reopen(&rig, &l) {
            failures.push(format!("k={k}: {e}\n  calls: {:#?}", fs.recent_calls()));
        }
        if failures.len() >= 5 {
            break;
        }
    }
    eprintln!(
        "fault sweep ({kind:?}): {runs} runs over {total} I/O calls, {faulted} faults fired, {stopped} left the store stopped, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(faulted > runs / 2, "most runs hit their fault");
}

#[test]
fn every_io_call_failing_with_enospc_gives_typed_errors_and_loses_nothing_durable() {
    sweep(FaultKind::NoSpace);
}

#[test]
fn every_io_call_failing_with_eio_gives_typed_errors_and_loses_nothing_durable() {
    sweep(FaultKind::Io);
}
