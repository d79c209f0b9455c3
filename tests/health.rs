//! `Store::health` says when appends would fail, and why — the disk quota reached for a
//! largest-size message, a disk that refused the segment the store needed, a writer
//! stopped by a failed fsync, a closed store — and says `Ok` again once space frees.
//! Faults go through the I/O seam (`cinder::vfs::FaultFs`).

use std::time::{Duration, Instant};

mod common;

use cinder::vfs::{Fault, FaultKind, Op};
use cinder::{Durability, Error, FailureCause, Health, NewMessage, Store};
use common::rig::Rig;

const TTL: Duration = Duration::from_secs(3600);

/// Appends one-byte messages to `q` until an append fails; returns the error.
fn fill_until_refused(store: &Store, q: &[u8]) -> Error {
    for _ in 0..1000 {
        let batch: Vec<NewMessage<'_>> = (0..200)
            .map(|_| NewMessage {
                queue: q,
                payload: b"x",
                ttl: TTL,
            })
            .collect();
        if let Err(e) = store.append_batch(&batch) {
            return e;
        }
    }
    panic!("nothing refused the appends");
}

fn until(mut ok: impl FnMut() -> bool) -> bool {
    let give_up = Instant::now() + Duration::from_secs(30);
    while Instant::now() < give_up {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_reached_disk_quota_is_reported_and_clears_once_space_frees() {
    let rig = Rig::new(Durability::default(), Duration::from_secs(60));
    let mut opts = rig.real();
    opts.max_disk_bytes = 512 << 10;
    let store = Store::open(&rig.dir, opts).unwrap();
    assert_eq!(store.health(), Health::Ok);
    let err = fill_until_refused(&store, b"q");
    assert!(matches!(err, Error::DiskQuotaExceeded { .. }), "{err}");
    match store.health() {
        Health::DiskQuotaReached { used, quota } => {
            assert_eq!(quota, 512 << 10);
            assert!(used <= quota + (64 << 10), "{used}");
        }
        other => panic!("{other:?}"),
    }
    // Everything acked and shredded: the space comes back, and so does Ok.
    let ids: Vec<_> = store
        .read(b"q", None, 1_000_000)
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    store.ack_batch(b"q", &ids).unwrap();
    rig.clock.advance(Duration::from_secs(120));
    assert!(
        until(|| {
            let _ = store.maintain();
            store.health() == Health::Ok
        }),
        "{:?}",
        store.health()
    );
    store.append(b"q", b"again", TTL).unwrap();
}

#[test]
fn a_disk_that_refused_the_next_segment_is_disk_full_until_it_takes_one() {
    let rig = Rig::new(Durability::default(), Duration::from_secs(60));
    let store = Store::open(&rig.dir, rig.faulty()).unwrap();
    rig.fs
        .inject(Fault::from_nth(Op::Allocate, 1, FaultKind::NoSpace));
    let err = fill_until_refused(&store, b"q");
    assert!(matches!(err, Error::DiskFull { .. }), "{err}");
    assert!(
        until(|| store.health() == Health::DiskFull),
        "{:?}",
        store.health()
    );
    rig.fs.clear_faults();
    assert!(
        until(|| store.health() == Health::Ok),
        "{:?}",
        store.health()
    );
    assert!(until(|| store.append(b"q", b"after", TTL).is_ok()));
}

#[test]
fn a_failed_fsync_stops_the_writer_and_health_says_reopen() {
    let rig = Rig::new(Durability::Sync, Duration::from_secs(60));
    let store = Store::open(&rig.dir, rig.faulty()).unwrap();
    store.append(b"q", b"before", TTL).unwrap();
    rig.fs.inject(Fault::from_nth(Op::Sync, 1, FaultKind::Io));
    let err = store.append(b"q", b"lost?", TTL).unwrap_err();
    assert!(
        matches!(err, Error::WriterFailed { .. } | Error::Io { .. }),
        "{err}"
    );
    match store.health() {
        Health::Failed { cause, .. } => assert_eq!(cause, FailureCause::Io),
        other => panic!("{other:?}"),
    }
    rig.fs.clear_faults();
    // Still failed: only a reopen clears it (a retried fsync proves nothing).
    assert!(matches!(store.health(), Health::Failed { .. }));
    let _ = store.close();
    assert_eq!(store.health(), Health::Closed);
}
