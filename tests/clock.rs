//! Time never runs backwards for the engine, and a clock set back after a forward jump
//! does not freeze expiry (contract 6: expired messages are removed and shredded on
//! time). The latest clock reading is persisted with every keystore write; a store
//! reopened with an earlier clock goes on from that time at the clock's own pace.

use std::sync::Arc;
use std::time::Duration;

use cinder::{FileKeyProvider, ManualClock, Options, Store};

#[test]
fn a_clock_set_back_after_a_persisted_forward_jump_does_not_freeze_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let t0 = 1_770_000_000_000;
    let clock = ManualClock::new(t0);
    let opts = || {
        let mut o = Options::new(key.clone());
        o.clock = clock.clone();
        o.background_reaper = false;
        o
    };
    let store = Store::open(&dir, opts()).unwrap();
    store
        .append(b"q", b"before the jump", Duration::from_secs(3600))
        .unwrap();
    // The clock jumps a year ahead and the store persists it (every close does).
    clock.advance(Duration::from_secs(365 * 86_400));
    store.close().unwrap();
    drop(store);
    // The clock is corrected; the store reopens.
    clock.set(t0);
    let store = Store::open(&dir, opts()).unwrap();
    // Everything appended before the jump expired in the engine's time, recovery's
    // included: it is not even loaded as live.
    assert_eq!(store.stats().live_messages, 0, "{:?}", store.stats());
    assert_eq!(store.len(b"q").unwrap(), 0);
    store
        .append(b"q", b"after the correction", Duration::from_secs(10))
        .unwrap();
    assert_eq!(store.len(b"q").unwrap(), 1);
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        store.len(b"q").unwrap(),
        0,
        "a 10 s message must expire 11 s later, whatever the clock did before"
    );
    // Set back again while open: the engine's time does not run backwards.
    store
        .append(b"q", b"monotonic", Duration::from_secs(10))
        .unwrap();
    clock.set(t0);
    assert_eq!(store.len(b"q").unwrap(), 1);
}
