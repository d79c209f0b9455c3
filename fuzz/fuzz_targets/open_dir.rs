//! Recovery of a hostile data dir: the input is a small directory image (a keystore and
//! up to 4 segment files, see `cinder_fuzz::image`), written to a fresh dir, audited with
//! the read-only `cinder::inspect` and `cinder::verify`, and opened with `Store::open`
//! under the fixed master key. Open must return `Ok` or a typed `Err` and never panic,
//! hang or allocate by an untrusted length; a dir that `verify` finds clean must open.
//!
//! When it opens, the store must also behave: every known queue reads the same whole and
//! paged by cursor, `len` agrees with `read`, nothing expired is returned, read messages
//! ack once, a probe message appends, reads back and acks, `maintain` succeeds or reports
//! `Corruption`, `close` succeeds, and reopening the cleanly closed dir succeeds and reads
//! exactly what was readable before the close.
#![no_main]

use std::time::Duration;

use cinder::{Error, ManualClock, Message, MessageId, RecoveryMode, Store};
use cinder_fuzz::image::DirImage;
use cinder_fuzz::{key_provider, options, scratch_dir, CLOCK_BASE_MS, KNOWN_QUEUES};
use libfuzzer_sys::fuzz_target;

const PROBE: &[u8] = b"fuzz-probe";

/// Errors an open of a damaged dir may return. Anything else is a harness or engine bug.
fn expected_open_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Corruption { .. }
            | Error::UnsupportedVersion { .. }
            | Error::WrongMasterKey { .. }
            | Error::Io { .. }
    )
}

type Snapshot = Vec<Result<Vec<(u64, Vec<u8>, u64)>, String>>;

fn summary(r: cinder::Result<Vec<Message>>) -> Result<Vec<(u64, Vec<u8>, u64)>, String> {
    r.map(|v| {
        v.into_iter()
            .map(|m| (m.id.0, m.payload, m.expires_at_ms))
            .collect()
    })
    .map_err(|e| format!("{e:?}"))
}

fn snapshot(store: &Store) -> Snapshot {
    KNOWN_QUEUES
        .iter()
        .chain(std::iter::once(&PROBE))
        .map(|q| summary(store.read(q, None, 100_000)))
        .collect()
}

/// Reads a queue whole and by pages; both must agree, be FIFO and unexpired.
fn check_queue(store: &Store, q: &[u8], now: u64) -> Option<Vec<Message>> {
    let full = store.read(q, None, 100_000).ok()?;
    assert!(full.windows(2).all(|w| w[0].id < w[1].id), "read not FIFO");
    assert!(
        full.iter().all(|m| m.expires_at_ms > now),
        "read an expired message"
    );
    assert_eq!(
        store.len(q).expect("len"),
        full.len() as u64,
        "len disagrees with read"
    );
    let mut paged: Vec<Message> = Vec::new();
    let mut after: Option<MessageId> = None;
    loop {
        let Ok(page) = store.read(q, after, 3) else {
            return Some(full);
        };
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        paged.extend(page);
        assert!(
            paged.len() <= full.len(),
            "paging returned more than a whole read"
        );
    }
    assert_eq!(paged, full, "paged read differs from whole read");
    Some(full)
}

fuzz_target!(|data: &[u8]| {
    let img = DirImage::decode(data);
    let scratch = scratch_dir();
    let dir = scratch.path().join("data");
    img.write_to(&dir).expect("write dir image");
    let key = key_provider(&scratch.path().join("master.key"));
    let clock = ManualClock::new(CLOCK_BASE_MS + img.clock_advance_ms());
    let mut opts = options(key.clone(), clock);
    opts.recovery = img.recovery_mode();

    // The read-only audits first (they must not change the dir): `inspect` without and
    // with the key, then `verify`.
    let now = CLOCK_BASE_MS + img.clock_advance_ms();
    let _ = cinder::inspect(&dir, None, now, true);
    let _ = cinder::inspect(&dir, Some(&*key), now, true);
    let verified = cinder::verify(&dir, &*key);

    let store = match Store::open(&dir, opts.clone()) {
        Ok(s) => s,
        Err(e) => {
            assert!(expected_open_error(&e), "unexpected open error: {e:?}");
            // What `verify` passes, recovery must open.
            if let Ok(v) = &verified {
                assert!(
                    !(v.is_clean() && img.recovery_mode() == RecoveryMode::TolerateTornTail),
                    "verify found nothing wrong but open failed: {e:?}; notes {:?}",
                    v.notes
                );
            }
            return;
        }
    };
    let report = store.recovery_report().clone();
    let stats = store.stats();
    assert_eq!(
        stats.live_messages, report.live,
        "index differs from recovery report"
    );
    // Known queues: whole and paged reads; ack the first readable message, ack_through
    // the second.
    for q in KNOWN_QUEUES {
        if let Some(msgs) = check_queue(&store, q, now) {
            if let Some(m) = msgs.first() {
                assert!(
                    store.ack(q, m.id).expect("ack"),
                    "could not ack a read message"
                );
                assert!(!store.ack(q, m.id).expect("ack"), "acked twice");
            }
            if let Some(m) = msgs.get(1) {
                assert_eq!(store.ack_through(q, m.id).expect("ack_through"), 1);
            }
        }
    }

    // A probe message: append, read back, ack.
    let id = store
        .append(PROBE, b"probe payload", Duration::from_secs(3600))
        .expect("append to a freshly opened store");
    let got = store.read(PROBE, None, 10).expect("read probe");
    assert!(got
        .iter()
        .any(|m| m.id == id && m.payload == b"probe payload"));
    assert!(store.ack(PROBE, id).expect("ack probe"));
    // One more message that stays, to be found again after the reopen.
    store
        .append(PROBE, b"kept", Duration::from_secs(7200))
        .expect("append");
    // Maintenance may meet the damage recovery does not look at (message bodies are
    // only opened on read): a typed `Corruption` is fine, anything else is not.
    match store.maintain() {
        Ok(_) | Err(Error::Corruption { .. }) => {}
        Err(e) => panic!("maintain: {e:?}"),
    }
    let before = snapshot(&store);
    store.close().expect("close after a successful open");
    drop(store);

    // A dir this store closed cleanly must reopen, with the same contents.
    let store = Store::open(&dir, opts).expect("reopen after a clean close");
    let after = snapshot(&store);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        match (b, a) {
            (Ok(b), Ok(a)) => assert_eq!(b, a, "queue #{i} changed across a clean reopen"),
            (Err(_), Err(_)) => {}
            _ => panic!("queue #{i} readable once only: before {b:?}, after {a:?}"),
        }
    }
    store.close().expect("close");
    drop(store);
    // The audit of a dir the engine itself closed cleanly must run.
    cinder::verify(&dir, &*key).expect("verify after a clean close");
});
