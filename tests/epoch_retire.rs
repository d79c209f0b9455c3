//! Shredding with destroyable key-encryption keys (contract 6, and the store must always
//! open, contract 10): after every shred the provider is asked to retire the epochs no
//! live key needs, and "live" must include the keystore's own meta key as written on
//! disk. Otherwise an epoch that wraps only the keystore meta (a keystore written just
//! before an epoch boundary) is destroyed, and that keystore can never be opened again.
//! A retire that fails part way is audited for what it destroyed and retried; a provider
//! a master-key rotation moved away from retires all its epochs; a key that outlives its
//! epoch is moved into the current one, so it does not keep the old one alive.
//! A provider with epochs over a key file stands in for the HSM here.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cinder::crypto::Dek;
use cinder::format::keystore::KeystoreImage;
use cinder::{AuditEvent, Clock, Error, FileKeyProvider, KeyProvider, ManualClock, Options, Store};

/// Wraps with a file key, tagged with the epoch (hour of the clock) it was wrapped in;
/// records, at every `retire`, whether `live` holds the on-disk keystore's meta key.
#[derive(Debug)]
struct Epochs {
    inner: FileKeyProvider,
    clock: Arc<ManualClock>,
    dir: PathBuf,
    retires: Mutex<Vec<bool>>,
    /// `retire` fails (the first failing call destroys epoch `FAKE_EPOCH` first).
    fail_retire: AtomicBool,
    failed_once: AtomicBool,
    retire_all_calls: AtomicUsize,
    /// `retire_all` fails (a token rotated away from, unreachable).
    fail_retire_all: AtomicBool,
}

/// An epoch id no real wrap uses, "destroyed" by the failing retire and by `retire_all`.
const FAKE_EPOCH: u64 = 7;

impl Epochs {
    fn new(tmp: &std::path::Path, clock: &Arc<ManualClock>, dir: &std::path::Path) -> Self {
        Epochs {
            inner: FileKeyProvider::create(tmp.join("key")).unwrap(),
            clock: clock.clone(),
            dir: dir.to_path_buf(),
            retires: Mutex::new(Vec::new()),
            fail_retire: AtomicBool::new(false),
            failed_once: AtomicBool::new(false),
            retire_all_calls: AtomicUsize::new(0),
            fail_retire_all: AtomicBool::new(false),
        }
    }
}

const EPOCH_MS: u64 = 3_600_000;

impl KeyProvider for Epochs {
    fn kek_id(&self) -> u64 {
        self.inner.kek_id()
    }

    fn wrap(&self, dek: &Dek, context: &[u8]) -> cinder::Result<Vec<u8>> {
        let mut w = (self.clock.now_ms() / EPOCH_MS).to_le_bytes().to_vec();
        w.extend(self.inner.wrap(dek, context)?);
        Ok(w)
    }

    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> cinder::Result<Option<Dek>> {
        match wrapped.get(8..) {
            Some(w) => self.inner.unwrap(w, context),
            None => Ok(None),
        }
    }

    fn epoch_of(&self, wrapped: &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(wrapped.get(..8)?.try_into().ok()?))
    }

    fn current_epoch(&self) -> Option<u64> {
        Some(self.clock.now_ms() / EPOCH_MS)
    }

    fn retire(&self, live: &[&[u8]], destroyed: &mut Vec<u64>) -> cinder::Result<()> {
        let img = KeystoreImage::decode(&std::fs::read(self.dir.join("KEYS")).unwrap()).unwrap();
        let kept = live.contains(&img.meta_wrapped_key.as_slice());
        self.retires.lock().unwrap().push(kept);
        if self.fail_retire.load(Ordering::SeqCst) {
            if !self.failed_once.swap(true, Ordering::SeqCst) {
                destroyed.push(FAKE_EPOCH);
            }
            return Err(Error::KeyProvider("the token went away".into()));
        }
        Ok(())
    }

    fn retire_all(&self, destroyed: &mut Vec<u64>) -> cinder::Result<()> {
        self.retire_all_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_retire_all.load(Ordering::SeqCst) {
            return Err(Error::KeyProvider("the old token is unreachable".into()));
        }
        destroyed.push(FAKE_EPOCH);
        Ok(())
    }
}

#[test]
fn retire_is_told_the_keystore_meta_key_is_live() {
    let (_tmp, clock, _dir, p, store) = setup();
    for round in 0..3 {
        let ids: Vec<_> = (0..80)
            .map(|_| {
                store
                    .append(b"q", &[round; 1000], Duration::from_secs(3600))
                    .unwrap()
            })
            .collect();
        store.ack_batch(b"q", &ids).unwrap();
        // Into the next epoch: what shreds now is written in it, the old keys are not.
        clock.advance(Duration::from_millis(EPOCH_MS / 2));
        store.maintain().unwrap();
        store.maintain().unwrap();
    }
    let retires = p.retires.lock().unwrap().clone();
    assert!(!retires.is_empty(), "shreds ran");
    assert!(
        retires.iter().all(|&kept| kept),
        "retire was not told the on-disk keystore's meta key is live: {retires:?}"
    );
}

fn options(p: &Arc<Epochs>, clock: &Arc<ManualClock>) -> Options {
    let mut o = Options::new(p.clone());
    o.clock = clock.clone();
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.max_shred_delay = Duration::from_secs(2);
    o.background_reaper = false;
    o
}

/// A store on an `Epochs` provider: (temp dir, clock, data dir, provider, store).
fn setup() -> (
    tempfile::TempDir,
    Arc<ManualClock>,
    PathBuf,
    Arc<Epochs>,
    Store,
) {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000 * EPOCH_MS);
    let dir = tmp.path().join("data");
    let p = Arc::new(Epochs::new(tmp.path(), &clock, &dir));
    let store = Store::open(&dir, options(&p, &clock)).unwrap();
    (tmp, clock, dir, p, store)
}

/// Fills a segment and a half, acks it all, and moves past the deadline.
fn let_segments_die(store: &Store, clock: &Arc<ManualClock>) {
    let ids: Vec<_> = (0..80)
        .map(|_| {
            store
                .append(b"q", &[1; 1000], Duration::from_secs(3600))
                .unwrap()
        })
        .collect();
    store.ack_batch(b"q", &ids).unwrap();
    clock.advance(Duration::from_secs(10));
}

fn destroyed_in_log(dir: &std::path::Path, key_id: u64) -> Vec<u64> {
    cinder::key_audit_log(dir, None)
        .unwrap()
        .records
        .iter()
        .filter(|r| r.event == AuditEvent::EpochKeyDestroyed && r.key_id == key_id)
        .map(|r| r.subject)
        .collect()
}

/// A retire that destroys an epoch and then fails: the destroyed epoch is in the key
/// audit log all the same, and once the token answers again, the next maintenance pass
/// calls retire again although nothing new died. Before the fix, the keyring took
/// nothing from a failed retire (no audit record) and skipped retire when no key was
/// removed, so the epochs it should have destroyed stayed in the token.
#[test]
fn a_retire_that_fails_part_way_is_audited_and_retried() {
    let (_tmp, clock, dir, p, store) = setup();
    let_segments_die(&store, &clock);
    // The token fails every retire for a while: passes until nothing more dies.
    p.fail_retire.store(true, Ordering::SeqCst);
    let mut failed = 0;
    for _ in 0..6 {
        if let Err(e) = store.maintain() {
            assert!(matches!(e, Error::KeyProvider(_)), "{e:?}");
            failed += 1;
        }
    }
    assert!(failed > 0, "a shred ran into the failing retire");
    // The shred itself completed: the dead segments' files are gone although the
    // retirement after it keeps failing.
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count();
    assert!(
        files <= 3,
        "{files} segment files: shredded segments were left behind by the failing retire"
    );
    assert_eq!(
        destroyed_in_log(&dir, p.kek_id()),
        vec![FAKE_EPOCH],
        "the epoch destroyed before the error is audited"
    );
    // The token is back; nothing new dies in this pass.
    p.fail_retire.store(false, Ordering::SeqCst);
    let calls = p.retires.lock().unwrap().len();
    store.maintain().unwrap();
    assert!(
        p.retires.lock().unwrap().len() > calls,
        "the failed retire is retried"
    );
    store.maintain().unwrap();
    let calls = p.retires.lock().unwrap().len();
    store.maintain().unwrap();
    assert_eq!(
        p.retires.lock().unwrap().len(),
        calls,
        "once it succeeded, an idle pass does not call retire"
    );
    store.close().unwrap();
}

/// A master-key rotation away from a provider with epochs asks it to retire every
/// epoch key it holds (no live key is under it any more), and audits what it destroyed
/// under its key id. Before the fix, the old provider's epoch keys were never destroyed.
#[test]
fn rotating_away_from_a_provider_retires_all_its_epochs() {
    let (tmp, _clock, dir, p, store) = setup();
    store
        .append(b"q", b"kept", Duration::from_secs(3600))
        .unwrap();
    let next: Arc<dyn KeyProvider> =
        Arc::new(FileKeyProvider::create(tmp.path().join("next")).unwrap());
    store.rotate_master_key(next).unwrap();
    assert_eq!(p.retire_all_calls.load(Ordering::SeqCst), 1);
    assert_eq!(destroyed_in_log(&dir, p.kek_id()), vec![FAKE_EPOCH]);
    assert_eq!(store.read(b"q", None, 10).unwrap().len(), 1);
    store.close().unwrap();
}

/// A provider rotated away from whose `retire_all` keeps failing stays on the list of
/// providers to retire; rotating back to it must take it off that list, or the next
/// shred destroys the epoch keys that wrap every live key (the store would not open
/// again). Before the fix, `retire_all` was called on the provider in use.
#[test]
fn rotating_back_to_a_provider_stops_retiring_it() {
    let (tmp, clock, dir, p, store) = setup();
    p.fail_retire_all.store(true, Ordering::SeqCst);
    let next: Arc<dyn KeyProvider> =
        Arc::new(FileKeyProvider::create(tmp.path().join("next")).unwrap());
    store.rotate_master_key(next).unwrap();
    assert_eq!(p.retire_all_calls.load(Ordering::SeqCst), 1);
    store.rotate_master_key(p.clone()).unwrap();
    let calls = p.retire_all_calls.load(Ordering::SeqCst);
    let_segments_die(&store, &clock);
    for _ in 0..3 {
        store.maintain().unwrap();
    }
    assert_eq!(
        p.retire_all_calls.load(Ordering::SeqCst),
        calls,
        "retire_all was called on the provider in use"
    );
    store.close().unwrap();
    drop(store);
    Store::open(&dir, options(&p, &clock)).unwrap();
}

/// The epochs of the live data keys in the keystore on disk, and of its meta key.
fn key_epochs(dir: &std::path::Path, p: &Epochs) -> (Vec<u64>, Option<u64>) {
    let img = KeystoreImage::decode(&std::fs::read(dir.join("KEYS")).unwrap()).unwrap();
    let epochs = img
        .entries
        .iter()
        .map(|e| p.epoch_of(&e.wrapped).unwrap())
        .collect();
    (epochs, p.epoch_of(&img.meta_wrapped_key))
}

/// A key that lives longer than its epoch (a long TTL) is re-wrapped into the current
/// epoch at the first maintenance pass after its own is over, so that epoch can be
/// retired: otherwise one long-lived key keeps its whole epoch, and every key shredded in
/// it, openable from an old keystore copy for as long as that key lives. Before epochs
/// rolled, the keystore still held the key in its creation epoch an hour later.
#[test]
fn a_long_lived_key_leaves_its_epoch_once_that_is_over() {
    let (_tmp, clock, dir, p, store) = setup();
    store
        .append(b"long", b"kept for days", Duration::from_secs(100 * 3600))
        .unwrap();
    store.flush().unwrap();
    let first = p.current_epoch().unwrap();
    clock.advance(Duration::from_millis(EPOCH_MS));
    store.maintain().unwrap();
    let now = p.current_epoch().unwrap();
    assert_eq!(now, first + 1);
    let (epochs, meta_epoch) = key_epochs(&dir, &p);
    assert!(
        !epochs.is_empty() && epochs.iter().all(|&e| e == now),
        "live keys still in an epoch that is over: {epochs:?} (now {now})"
    );
    assert_eq!(meta_epoch, Some(now));
    let rolled: Vec<(u64, u64)> = cinder::key_audit_log(&dir, None)
        .unwrap()
        .records
        .iter()
        .filter(|r| r.event == AuditEvent::EpochRolled)
        .map(|r| (r.subject, r.key_id))
        .collect();
    assert_eq!(rolled, vec![(first, now)]);
    // Nothing more to move within the epoch: no keystore write per pass.
    let records = cinder::key_audit_log(&dir, None).unwrap().records.len();
    clock.advance(Duration::from_secs(1));
    store.maintain().unwrap();
    assert_eq!(
        cinder::key_audit_log(&dir, None).unwrap().records.len(),
        records
    );
    // The message reads, before and after a reopen.
    assert_eq!(store.read(b"long", None, 10).unwrap().len(), 1);
    store.close().unwrap();
    drop(store);
    let store = Store::open(&dir, options(&p, &clock)).unwrap();
    assert_eq!(store.read(b"long", None, 10).unwrap().len(), 1);
}

/// A store closed when its keys' epoch ends moves them at the open itself, before any
/// maintenance pass (the embedder may run none for a while). Before the open rolled,
/// the keys stayed in the old epoch until the first `maintain`.
#[test]
fn keys_of_an_epoch_that_ended_while_the_store_was_closed_move_at_open() {
    let (_tmp, clock, dir, p, store) = setup();
    store
        .append(b"long", b"kept for days", Duration::from_secs(100 * 3600))
        .unwrap();
    store.close().unwrap();
    drop(store);
    clock.advance(Duration::from_millis(EPOCH_MS));
    let now = p.current_epoch().unwrap();
    let store = Store::open(&dir, options(&p, &clock)).unwrap();
    let (epochs, _) = key_epochs(&dir, &p);
    assert!(
        epochs.iter().all(|&e| e == now),
        "keys left in an epoch that is over after the open: {epochs:?} (now {now})"
    );
    assert_eq!(store.read(b"long", None, 10).unwrap().len(), 1);
}

/// A keystore write whose rename landed but whose directory fsync failed (here: a
/// master-key rotation's) leaves a keystore on disk that memory does not describe: its
/// meta key is wrapped in an epoch memory does not list. A retirement on the word of
/// memory alone could destroy the epoch that keystore needs. The keyring writes memory out
/// again before it retires anything. Before, the next retirement (a pending one, run by the
/// next maintenance pass) was told a stale meta key.
#[test]
fn a_keystore_write_whose_dir_fsync_failed_is_redone_before_any_retirement() {
    use cinder::vfs::{Fault, FaultFs, FaultKind, Op};
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000 * EPOCH_MS);
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let fs = Arc::new(FaultFs::new(&dir).unwrap());
    let p = Arc::new(Epochs::new(tmp.path(), &clock, &dir));
    let mut o = options(&p, &clock);
    o.file_system = fs.clone();
    let store = Store::open(&dir, o).unwrap();
    // A retirement that fails leaves one pending for the next pass.
    let_segments_die(&store, &clock);
    p.fail_retire.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        let _ = store.maintain();
        clock.advance(Duration::from_secs(10));
    }
    let _ = store.maintain();
    store.flush().unwrap();
    let other = tempfile::tempdir().unwrap();
    let p2 = Arc::new(Epochs::new(other.path(), &clock, &dir));
    // The rotation's keystore is renamed into place; its directory fsync fails.
    fs.inject(Fault::nth(Op::SyncDir, 1, FaultKind::Io));
    assert!(store.rotate_master_key(p2.clone()).is_err());
    let img = KeystoreImage::decode(&std::fs::read(dir.join("KEYS")).unwrap()).unwrap();
    assert_eq!(img.kek_id, p2.kek_id(), "the rename landed");
    store.maintain().unwrap();
    let retires = p2.retires.lock().unwrap().clone();
    assert!(!retires.is_empty(), "the pending retirement ran");
    assert!(
        retires.iter().all(|&kept| kept),
        "retire was not told the on-disk keystore's meta key is live: {retires:?}"
    );
}
