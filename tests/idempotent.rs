//! Idempotent appends (`Store::append_once`): a repeat of a client message id in the
//! same queue stores nothing and returns the first message's id — while the record is
//! on disk (an ack does not end it, its shred does; a compaction moves it), within the
//! window, until a purge, across a reopen (for messages still queued), under concurrent
//! repeats — and the client id is never on disk in the clear.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use cinder::{Appended, ClientMessageId, Durability, FileKeyProvider, ManualClock, Options, Store};

const TTL: Duration = Duration::from_secs(3600);
const T0: u64 = 1_700_000_000_000;

struct Env {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    key: Arc<FileKeyProvider>,
    clock: Arc<ManualClock>,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
        Env {
            dir: tmp.path().join("data"),
            _tmp: tmp,
            key,
            clock: ManualClock::new(T0),
        }
    }

    fn open(&self) -> Store {
        let mut o = Options::new(self.key.clone());
        o.segment_size = 64 << 10;
        o.max_message_size = 4096;
        o.clock = self.clock.clone();
        o.background_reaper = false;
        o.max_shred_delay = Duration::from_secs(4);
        o.dedupe_window = Duration::from_secs(600);
        o.durability = Durability::Group {
            max_delay: Duration::ZERO,
        };
        Store::open(&self.dir, o).unwrap()
    }

    /// Past the shred deadline, with maintenance run: dead records are shredded.
    fn shred_what_is_dead(&self, store: &Store) {
        for _ in 0..4 {
            self.clock.advance(Duration::from_secs(3));
            store.maintain().unwrap();
        }
    }
}

fn cid(b: u8) -> ClientMessageId {
    ClientMessageId([b; 16])
}

fn ids(store: &Store, q: &[u8]) -> Vec<u64> {
    store
        .read(q, None, 1000)
        .unwrap()
        .iter()
        .map(|m| m.id.0)
        .collect()
}

#[test]
fn a_repeat_stores_nothing_and_returns_the_first_id_per_queue() {
    let env = Env::new();
    let store = env.open();
    let first = store.append_once(b"q", cid(1), b"hello", TTL).unwrap();
    let Appended::Stored(id) = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        store
            .append_once(b"q", cid(1), b"hello again", TTL)
            .unwrap(),
        Appended::Duplicate(id)
    );
    assert_eq!(ids(&store, b"q"), vec![id.0]);
    assert_eq!(store.read(b"q", None, 10).unwrap()[0].payload, b"hello");
    // The same client id in another queue is another message; another id is too.
    assert!(matches!(
        store.append_once(b"other", cid(1), b"x", TTL).unwrap(),
        Appended::Stored(_)
    ));
    assert!(matches!(
        store.append_once(b"q", cid(2), b"y", TTL).unwrap(),
        Appended::Stored(_)
    ));
    assert_eq!(store.len(b"q").unwrap(), 2);
}

#[test]
fn an_acked_message_is_remembered_until_its_record_is_shredded() {
    let env = Env::new();
    let store = env.open();
    let id = store.append_once(b"q", cid(1), b"m", TTL).unwrap().id();
    assert!(store.ack(b"q", id).unwrap());
    // Acked, its record still on disk: a sender's retry is still a duplicate.
    assert_eq!(
        store.append_once(b"q", cid(1), b"m", TTL).unwrap(),
        Appended::Duplicate(id)
    );
    assert!(
        store.read(b"q", None, 10).unwrap().is_empty(),
        "not redelivered"
    );
    // Shredded: the record and the store's memory of the client id are gone.
    env.shred_what_is_dead(&store);
    assert!(store.stats().shreds > 0);
    assert!(matches!(
        store.append_once(b"q", cid(1), b"m", TTL).unwrap(),
        Appended::Stored(new) if new != id
    ));
}

#[test]
fn the_window_and_a_purge_end_it() {
    let env = Env::new();
    let store = env.open();
    let id = store.append_once(b"q", cid(1), b"m", TTL).unwrap().id();
    env.clock.advance(Duration::from_secs(599));
    assert_eq!(
        store.append_once(b"q", cid(1), b"m", TTL).unwrap(),
        Appended::Duplicate(id)
    );
    env.clock.advance(Duration::from_secs(1));
    let again = store.append_once(b"q", cid(1), b"m", TTL).unwrap();
    assert!(
        matches!(again, Appended::Stored(new) if new != id),
        "{again:?}"
    );
    // A purge forgets every client id of the queue.
    store.purge(b"q").unwrap();
    assert!(matches!(
        store.append_once(b"q", cid(1), b"m", TTL).unwrap(),
        Appended::Stored(_)
    ));
}

#[test]
fn a_reopen_rebuilds_it_for_live_messages_only() {
    let env = Env::new();
    let store = env.open();
    let live = store.append_once(b"q", cid(1), b"live", TTL).unwrap().id();
    let acked = store.append_once(b"q", cid(2), b"acked", TTL).unwrap().id();
    store.ack(b"q", acked).unwrap();
    store.close().unwrap();
    drop(store);
    let store = env.open();
    assert_eq!(
        store.append_once(b"q", cid(1), b"live", TTL).unwrap(),
        Appended::Duplicate(live)
    );
    // Acked before the restart: its ack record cannot tell an ack from a purge (which
    // must forget it), so it is forgotten; a retry now stores it again (at-least-once).
    let again = store.append_once(b"q", cid(2), b"acked", TTL).unwrap();
    assert!(
        matches!(again, Appended::Stored(new) if new != acked),
        "{again:?}"
    );
    assert_eq!(ids(&store, b"q").len(), 2);
}

/// The model test's minimized failure with the compaction's move of the client id left
/// out: a purge leaves a segment partly dead, maintenance compacts it, and the repeat
/// of the live message that moved must still be a duplicate.
#[test]
fn a_compaction_moves_it_with_the_message() {
    let env = Env::new();
    let store = env.open();
    store.append(b"q2", b"", Duration::from_secs(23)).unwrap();
    store.purge(b"q2").unwrap();
    env.clock.advance(Duration::from_secs(3));
    let id = store
        .append_once(b"q1", cid(3), b"m", Duration::from_secs(20))
        .unwrap()
        .id();
    let copied = store.stats().bytes_copied;
    env.shred_what_is_dead(&store);
    let s = store.stats();
    assert!(s.bytes_copied > copied, "no compaction ran: {s:?}");
    assert!(s.shreds > 0);
    assert_eq!(ids(&store, b"q1"), vec![id.0]);
    assert_eq!(
        store
            .append_once(b"q1", cid(3), b"m", Duration::from_secs(1))
            .unwrap(),
        Appended::Duplicate(id)
    );
    // And after a reopen, from the copy's record.
    store.close().unwrap();
    drop(store);
    let store = env.open();
    assert_eq!(
        store
            .append_once(b"q1", cid(3), b"m", Duration::from_secs(1))
            .unwrap(),
        Appended::Duplicate(id)
    );
}

#[test]
fn concurrent_repeats_store_one_message() {
    let env = Env::new();
    let store = Arc::new(env.open());
    let threads = 8;
    for round in 0..20u8 {
        let barrier = Arc::new(Barrier::new(threads));
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    store.append_once(b"q", cid(round), b"m", TTL).unwrap()
                })
            })
            .collect();
        let got: Vec<Appended> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let stored: Vec<_> = got
            .iter()
            .filter(|a| matches!(a, Appended::Stored(_)))
            .collect();
        assert_eq!(stored.len(), 1, "round {round}: {got:?}");
        let id = stored[0].id();
        assert!(got.iter().all(|a| a.id() == id), "round {round}: {got:?}");
    }
    assert_eq!(store.len(b"q").unwrap(), 20);
}

#[test]
fn the_client_id_is_never_on_disk_in_the_clear() {
    let env = Env::new();
    let store = env.open();
    let canary = ClientMessageId(*b"CANARY-CLIENT-ID");
    store.append_once(b"q", canary, b"payload", TTL).unwrap();
    store.close().unwrap();
    drop(store);
    for e in std::fs::read_dir(&env.dir).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(16).any(|w| w == canary.0),
            "client id in the clear in {}",
            path.display()
        );
    }
    // It is in the record, though: the reopened store still knows it.
    let store = env.open();
    assert!(matches!(
        store.append_once(b"q", canary, b"payload", TTL).unwrap(),
        Appended::Duplicate(_)
    ));
}

#[test]
fn a_refused_append_leaves_no_client_id_behind() {
    let env = Env::new();
    let mut o = Options::new(env.key.clone());
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.clock = env.clock.clone();
    o.background_reaper = false;
    o.max_disk_bytes = 256 << 10;
    let store = Store::open(&env.dir, o).unwrap();
    let big = vec![7u8; 4000];
    let mut n = 0u32;
    let refused = loop {
        n += 1;
        let c = ClientMessageId([
            (n % 251) as u8,
            (n / 251) as u8,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
            10,
            11,
            12,
            13,
            14,
        ]);
        match store.append_once(b"q", c, &big, TTL) {
            Ok(Appended::Stored(_)) => assert!(n < 1000, "the quota never refused"),
            Ok(dup) => panic!("{dup:?}"),
            Err(e) => {
                assert!(matches!(e, cinder::Error::DiskQuotaExceeded { .. }), "{e}");
                break c;
            }
        }
    };
    // Its id and slot were issued before the quota refused the write: the retry (space
    // freed meanwhile) must store it, not call it a duplicate of nothing.
    let all: Vec<_> = store
        .read(b"q", None, 1000)
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    store.ack_batch(b"q", &all).unwrap();
    env.shred_what_is_dead(&store);
    let again = store.append_once(b"q", refused, &big, TTL).unwrap();
    assert!(matches!(again, Appended::Stored(_)), "{again:?}");
    assert_eq!(store.len(b"q").unwrap(), 1);
}

/// The model test's minimized failure: a purge, then a reopen, must not bring the purged
/// message's client id back from its (acked) record.
#[test]
fn a_purge_is_not_undone_by_a_reopen() {
    let env = Env::new();
    let store = env.open();
    store.append_once(b"q1", cid(1), b"m", TTL).unwrap();
    store
        .append(b"q0", b"keeps the segment alive", TTL)
        .unwrap();
    store.purge(b"q1").unwrap();
    store.close().unwrap();
    drop(store);
    let store = env.open();
    assert!(matches!(
        store.append_once(b"q1", cid(1), b"m", TTL).unwrap(),
        Appended::Stored(_)
    ));
}

/// Holds the writer thread's next data fsync once armed, until released.
#[derive(Debug, Default)]
struct HoldSync {
    state: parking_lot::Mutex<(bool, bool, bool)>, // (armed, holding, released)
    cv: parking_lot::Condvar,
}

impl cinder::vfs::FileSystem for HoldSync {
    fn sync_data(&self, file: &std::fs::File, _path: &std::path::Path) -> std::io::Result<()> {
        if std::thread::current().name() == Some("cinder-writer") {
            let mut s = self.state.lock();
            if s.0 && !s.2 {
                s.1 = true;
                self.cv.notify_all();
                while !s.2 {
                    self.cv.wait(&mut s);
                }
            }
        }
        file.sync_data()
    }
}

/// A repeat waiting on an append still being written is woken by a purge of its queue
/// (which forgets the client id) and stores its message; it used to wait forever.
#[test]
fn a_purge_wakes_a_repeat_waiting_on_the_first_append() {
    let env = Env::new();
    let gate = Arc::new(HoldSync::default());
    let mut o = Options::new(env.key.clone());
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.clock = env.clock.clone();
    o.background_reaper = false;
    o.durability = Durability::Sync;
    o.file_system = gate.clone();
    let store = Arc::new(Store::open(&env.dir, o).unwrap());
    gate.state.lock().0 = true;
    let first = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.append_once(b"q", cid(1), b"first", TTL).unwrap())
    };
    {
        let mut s = gate.state.lock();
        while !s.1 {
            gate.cv.wait_for(&mut s, Duration::from_secs(60));
            assert!(s.1, "the writer never reached its fsync");
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let repeat = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let r = store.append_once(b"q", cid(1), b"repeat", TTL).unwrap();
            tx.send(r).unwrap();
        })
    };
    // Let the repeat find the pending entry and wait on it.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        store.purge(b"q").unwrap(),
        0,
        "nothing committed to purge yet"
    );
    {
        let mut s = gate.state.lock();
        s.2 = true;
        gate.cv.notify_all();
    }
    let second = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the repeat still waits after the purge");
    let first = first.join().unwrap();
    repeat.join().unwrap();
    assert!(
        matches!(second, Appended::Stored(id) if id != first.id()),
        "{second:?}"
    );
    let left = ids(&store, b"q");
    assert_eq!(
        left,
        vec![second.id().0],
        "the purged first message is gone"
    );
}
