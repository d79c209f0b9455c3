//! An ack is final (contract 5): an ack record keeps protecting every durable copy of
//! what it acks, compaction copies included, until every such copy is shredded. These
//! tests force an ack into the middle of a compaction through the I/O seam, then shred
//! what the ack no longer seems to protect, and reopen.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cinder::format::segment_header::HEADER_LEN;
use cinder::vfs::FileSystem;
use cinder::{FileKeyProvider, ManualClock, MessageId, Options, Store};
use parking_lot::{Condvar, Mutex};

/// Holds the writer thread at its first write into a fresh segment (the compaction's
/// survivor) once armed, until released: the compaction then waits for its copies while
/// the test acks.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    armed: bool,
    holding: bool,
    released: bool,
}

impl Gate {
    fn arm(&self) {
        self.state.lock().armed = true;
    }
    /// Waits (a minute at most: a test that cannot set up its interleaving fails, it
    /// does not hang) until the writer is held.
    fn wait_holding(&self) {
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        let mut s = self.state.lock();
        while !s.holding {
            assert!(
                !self.cv.wait_until(&mut s, give_up).timed_out(),
                "the compaction never wrote into a fresh segment"
            );
        }
    }
    fn release(&self) {
        let mut s = self.state.lock();
        s.released = true;
        self.cv.notify_all();
    }
}

impl FileSystem for Gate {
    fn write_at(&self, file: &File, _path: &Path, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let writer = std::thread::current().name() == Some("cinder-writer");
        if writer && offset == HEADER_LEN as u64 {
            let mut s = self.state.lock();
            if s.armed && !s.released {
                s.holding = true;
                self.cv.notify_all();
                while !s.released {
                    self.cv.wait(&mut s);
                }
            }
        }
        file.write_all_at(buf, offset)
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    key: Arc<FileKeyProvider>,
    clock: Arc<ManualClock>,
    gate: Arc<Gate>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
        Fixture {
            dir: tmp.path().join("data"),
            _tmp: tmp,
            key,
            clock: ManualClock::new(1_770_000_000_000),
            gate: Arc::new(Gate::default()),
        }
    }

    fn options(&self) -> Options {
        let mut o = Options::new(self.key.clone());
        o.segment_size = 64 << 10;
        o.max_message_size = 4096;
        o.max_shred_delay = Duration::from_secs(60);
        o.clock = self.clock.clone();
        o.background_reaper = false;
        o.file_system = self.gate.clone();
        o
    }
}

const TTL: Duration = Duration::from_secs(3600);

/// Fills a first segment of queue `q` and acks all of it but `keep` (so it is mostly
/// dead: compacted for space once acks settle). Returns the ids appended.
fn mostly_dead_segment(store: &Store, keep: &[usize]) -> Vec<MessageId> {
    let ids: Vec<MessageId> = (0..100)
        .map(|i: u8| store.append(b"q", &[b'a' + i % 26; 1000], TTL).unwrap())
        .collect();
    // The first ~60 fill the first segment; ack all of them but `keep`.
    let acked: Vec<MessageId> = (0..60)
        .filter(|i| !keep.contains(i))
        .map(|i| ids[i])
        .collect();
    assert_eq!(store.ack_batch(b"q", &acked).unwrap(), acked.len() as u64);
    ids
}

/// Runs a maintenance pass on another thread and acks `victim` while the pass's
/// compaction waits for its copies to be written.
fn ack_during_compaction(fx: &Fixture, store: &Arc<Store>, victim: MessageId) {
    // Whatever happens (a failed assertion included), the writer is let go, so that the
    // store can close instead of hanging the test.
    struct Release<'a>(&'a Gate);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.release();
        }
    }
    let _release = Release(&fx.gate);
    fx.gate.arm();
    let s = Arc::clone(store);
    let maint = std::thread::spawn(move || s.maintain());
    fx.gate.wait_holding();
    let s = Arc::clone(store);
    let before = store.len(b"q").unwrap();
    let acker = std::thread::spawn(move || s.ack(b"q", victim));
    // The ack has taken the message out of the index before the copy is switched to.
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    while store.len(b"q").unwrap() == before {
        assert!(std::time::Instant::now() < give_up, "the ack never ran");
        std::thread::yield_now();
    }
    fx.gate.release();
    assert!(acker.join().unwrap().unwrap(), "the ack found the message");
    maint.join().unwrap().unwrap();
}

#[test]
fn an_ack_that_lands_while_compaction_copies_its_message_stays_final_after_reopen() {
    let fx = Fixture::new();
    let store = Arc::new(Store::open(&fx.dir, fx.options()).unwrap());
    let ids = mostly_dead_segment(&store, &[3, 17, 41]);
    let victim = ids[17];
    // The acks settle: the mostly dead segment is due for compaction (for space).
    fx.clock.advance(Duration::from_secs(6));
    ack_during_compaction(&fx, &store, victim);
    // Long enough for the active segments (the ack segment included) to be closed by age
    // and everything dead to be shredded; short of the compaction deadline of the
    // survivor, which keeps the other two copies live.
    fx.clock.advance(Duration::from_secs(16));
    store.maintain().unwrap();
    store.maintain().unwrap();
    // The compacted segment (the store's first) is shredded: only the copies are left.
    assert!(
        !fx.dir.join("0000000000000001.seg").exists(),
        "{:?}",
        store.stats()
    );
    let live: Vec<MessageId> = store
        .read(b"q", None, 1000)
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert!(!live.contains(&victim));
    assert!(live.contains(&ids[3]) && live.contains(&ids[41]));
    store.close().unwrap();
    drop(store);

    let store = Store::open(&fx.dir, fx.options()).unwrap();
    let after: Vec<MessageId> = store
        .read(b"q", None, 1000)
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert!(
        !after.contains(&victim),
        "an acked message came back after a clean reopen"
    );
    assert_eq!(after, live, "the reopened store serves what it served");
}
