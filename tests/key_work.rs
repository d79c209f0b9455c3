//! Key work never sits between a caller and its durability (issue 12, item 5): while a
//! keystore write hangs (a slow disk, an HSM that does not answer) or a master-key
//! rotation is re-wrapping keys, appends and acks that need no new segment still
//! commit, and a rotation still re-wraps every key, including those created meanwhile.
//!
//! A gate holds the thread that reaches it (a keystore rename through the I/O seam, or
//! the old key provider's unwrap during a rotation) until the test releases it; the
//! appends run on another thread and must finish while the gate is shut. They are given
//! a minute: a stall is a failure, not a hang.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::crypto::Dek;
use cinder::vfs::FileSystem;
use cinder::{Durability, FileKeyProvider, KeyProvider, Options, Result, Store};
use parking_lot::{Condvar, Mutex};

/// Long enough for any real commit on a loaded machine; a stalled one never ends.
const STALL: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(bool, bool, bool)>, // (armed, holding, released)
    cv: Condvar,
}

impl Gate {
    fn arm(&self) {
        self.state.lock().0 = true;
    }
    fn pass(&self) {
        let mut s = self.state.lock();
        if s.0 && !s.2 {
            s.1 = true;
            self.cv.notify_all();
            while !s.2 {
                self.cv.wait(&mut s);
            }
        }
    }
    fn wait_holding(&self) {
        let give_up = Instant::now() + STALL;
        let mut s = self.state.lock();
        while !s.1 {
            assert!(
                !self.cv.wait_until(&mut s, give_up).timed_out(),
                "nothing reached the gate"
            );
        }
    }
    fn release(&self) {
        self.state.lock().2 = true;
        self.cv.notify_all();
    }
}

/// Opens the gate when dropped, so a failing assertion does not leave a thread held.
struct Release(Arc<Gate>);
impl Drop for Release {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The real file system, with a gate on the keystore's rename into place, and a count
/// of segment files created (renamed into place).
#[derive(Debug, Default)]
struct KeystoreGate {
    gate: Arc<Gate>,
    segments_made: AtomicUsize,
}

impl FileSystem for KeystoreGate {
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        if to.file_name().is_some_and(|n| n == "KEYS") {
            self.gate.pass();
        }
        std::fs::rename(from, to)?;
        if to.extension().is_some_and(|e| e == "seg") {
            self.segments_made.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl KeystoreGate {
    /// Waits until `n` segment files exist (the key worker makes spares on its own time).
    fn wait_segments(&self, n: usize) {
        let give_up = Instant::now() + STALL;
        while self.segments_made.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < give_up, "the spare segment never came");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A file key provider whose unwrap waits at a gate once armed.
#[derive(Debug)]
struct SlowUnwrap {
    inner: FileKeyProvider,
    gate: Arc<Gate>,
}

impl KeyProvider for SlowUnwrap {
    fn kek_id(&self) -> u64 {
        self.inner.kek_id()
    }
    fn wrap(&self, dek: &Dek, context: &[u8]) -> Result<Vec<u8>> {
        self.inner.wrap(dek, context)
    }
    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Option<Dek>> {
        self.gate.pass();
        self.inner.unwrap(wrapped, context)
    }
}

fn options(key: Arc<dyn KeyProvider>) -> Options {
    let mut o = Options::new(key);
    o.durability = Durability::Sync;
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.zero_fill_segments = false;
    o.background_reaper = false;
    o
}

/// Runs `f` on a thread and returns its result, failing if it does not finish in time.
fn finishes<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(STALL)
        .unwrap_or_else(|_| panic!("{what} stalled behind key work"))
}

/// A keystore write hangs (inside a master-key rotation, which holds the keyring
/// throughout): appends that fill a segment, seal it and move into the spare still
/// commit, and so do acks. Before the fix the writer thread recorded the sealed length
/// (a keystore write under the keyring lock) inline and made the next spare in its
/// round, so every Sync append stalled until the rotation finished.
#[test]
fn commits_go_on_while_a_keystore_write_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let key_a: Arc<dyn KeyProvider> =
        Arc::new(FileKeyProvider::create(tmp.path().join("a")).unwrap());
    let key_b: Arc<dyn KeyProvider> =
        Arc::new(FileKeyProvider::create(tmp.path().join("b")).unwrap());
    let fs = Arc::new(KeystoreGate::default());
    let dir = tmp.path().join("data");
    let mut o = options(Arc::clone(&key_a));
    o.file_system = fs.clone();
    let store = Arc::new(Store::open(&dir, o).unwrap());
    fs.wait_segments(1);
    let first = store
        .append(b"q", b"first", Duration::from_secs(3600))
        .unwrap();
    // The first ack opens the ack segment (an ack that needs a new segment waits for
    // the key worker's spare, like an appender that finds none).
    let dummy = store
        .append(b"d", b"dummy", Duration::from_secs(3600))
        .unwrap();
    assert!(store.ack(b"d", dummy).unwrap());
    // Messages and acks each took a spare; wait for the next one before shutting the
    // gate.
    fs.wait_segments(3);

    let _release = Release(Arc::clone(&fs.gate));
    fs.gate.arm();
    let s = Arc::clone(&store);
    let rotation = std::thread::spawn(move || s.rotate_master_key(key_b));
    fs.gate.wait_holding();

    // 16 of these fill a 64 KiB segment: 20 seal the current one and move into the
    // spare (one rotation: the next would need the spare the held keyring cannot make).
    let s = Arc::clone(&store);
    let ids = finishes("appends", move || {
        let body = vec![7u8; 3900];
        let ids: Vec<_> = (0..20)
            .map(|_| s.append(b"q", &body, Duration::from_secs(3600)).unwrap())
            .collect();
        assert!(s.ack(b"q", first).unwrap());
        ids
    });
    assert_eq!(store.len(b"q").unwrap(), 20);

    fs.gate.release();
    rotation.join().unwrap().unwrap();
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();

    let mut o = options(Arc::new(
        FileKeyProvider::open(tmp.path().join("b")).unwrap(),
    ));
    o.previous_key_provider = Some(key_a);
    let store = Store::open(&dir, o).unwrap();
    let back: Vec<_> = store
        .read(b"q", None, 100)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(back, ids, "every append kept, the acked one gone");
}

/// A rotation re-wraps with the keyring free: appends that open new segments (fresh
/// keys, wrapped under the old master key meanwhile) commit while its provider calls
/// are held, and when it completes, those keys are under the new master key too: the
/// store opens with the new key alone and every message reads.
#[test]
fn a_rotation_rewraps_keys_created_while_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let old: Arc<dyn KeyProvider> = Arc::new(SlowUnwrap {
        inner: FileKeyProvider::create(tmp.path().join("a")).unwrap(),
        gate: Arc::clone(&gate),
    });
    let new: Arc<dyn KeyProvider> =
        Arc::new(FileKeyProvider::create(tmp.path().join("b")).unwrap());
    let dir = tmp.path().join("data");
    let store = Arc::new(Store::open(&dir, options(Arc::clone(&old))).unwrap());
    store
        .append(b"q", b"before", Duration::from_secs(3600))
        .unwrap();
    let live_before = store.stats().live_keys;

    let _release = Release(Arc::clone(&gate));
    gate.arm();
    let s = Arc::clone(&store);
    let rotation = std::thread::spawn(move || s.rotate_master_key(new));
    gate.wait_holding();

    // Each TTL an hour and more apart lands in an expiry bucket (a segment) of its own.
    let s = Arc::clone(&store);
    finishes("appends opening new segments", move || {
        for i in 1..=10u64 {
            s.append(b"q", b"during", Duration::from_secs(3600 * (i + 1)))
                .unwrap();
        }
    });
    let live_during = store.stats().live_keys;
    assert!(
        live_during > live_before + 5,
        "{live_during} live keys: the appends did not open new segments"
    );

    gate.release();
    let report = rotation.join().unwrap().unwrap();
    assert!(report.rewrapped as u64 >= live_during, "{report:?}");
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();

    // The new key alone: a key left under the old one would not open.
    let store = Store::open(
        &dir,
        options(Arc::new(
            FileKeyProvider::open(tmp.path().join("b")).unwrap(),
        )),
    )
    .unwrap();
    assert_eq!(store.read(b"q", None, 100).unwrap().len(), 11);
}
