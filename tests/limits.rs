//! Invariant: bounded resources and distinct errors for bad input — every limit and every bad key, file or option is refused with its own `Error` variant, stores nothing, and harms nothing already stored.
//!
//! After each refused call the messages stored before it still read back intact and every
//! queue's `len` is unchanged; refused opens leave the data dir openable with the right
//! inputs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cinder::format::{FORMAT_VERSION, MIN_READ_VERSION};
use cinder::{
    Durability, Error, FileKeyProvider, KeyProvider, ManualClock, MessageId, NewMessage, Options,
    Store,
};

const T0: u64 = 1_700_000_000_000;
const TTL: Duration = Duration::from_secs(3600);
const MAX_MESSAGE: usize = 4096;
/// Frame bytes around a payload: header + fixed meta + two tags (plus the queue id).
const FRAME_OVERHEAD: usize = cinder::format::frame::FRAME_HEADER_LEN
    + cinder::format::frame::MESSAGE_META_FIXED
    + 2 * cinder::format::frame::TAG_LEN;

type Expected = BTreeMap<Vec<u8>, Vec<(MessageId, Vec<u8>)>>;

fn frame_len(queue: &[u8], payload_len: usize) -> u64 {
    (FRAME_OVERHEAD + queue.len() + payload_len) as u64
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 131 + j * 7) as u8 ^ 0xa5).collect()
}

fn options(key: &Arc<FileKeyProvider>) -> Options {
    let mut o = Options::new(Arc::clone(key) as Arc<dyn KeyProvider>);
    o.segment_size = 64 << 10;
    o.max_message_size = MAX_MESSAGE;
    o.durability = Durability::Async;
    o.clock = ManualClock::new(T0);
    o
}

struct Env {
    tmp: tempfile::TempDir,
    key: Arc<FileKeyProvider>,
    dir: PathBuf,
}

impl Env {
    /// A temp dir with the key file outside the data dir (`<tmp>/data`, not yet created).
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
        let dir = tmp.path().join("data");
        Env { tmp, key, dir }
    }

    fn opts(&self) -> Options {
        options(&self.key)
    }

    fn open(&self) -> Store {
        Store::open(&self.dir, self.opts()).unwrap()
    }
}

/// Stores a few messages in two queues and returns them.
fn seed(store: &Store) -> Expected {
    let mut e = Expected::new();
    for i in 0..6 {
        let q: &[u8] = if i % 2 == 0 { b"alice" } else { b"bob" };
        let p = payload(i, 100 + i * 50);
        let id = store.append(q, &p, TTL).unwrap();
        e.entry(q.to_vec()).or_default().push((id, p));
    }
    e
}

/// Every expected message reads back exactly, and `len` matches.
fn assert_intact(store: &Store, expected: &Expected) {
    for (q, msgs) in expected {
        let got: Vec<(MessageId, Vec<u8>)> = store
            .read(q, None, 100_000)
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.payload))
            .collect();
        assert_eq!(&got, msgs, "queue {}", String::from_utf8_lossy(q));
        assert_eq!(store.len(q).unwrap(), msgs.len() as u64);
    }
}

/// Closes, reopens with `opts` and checks everything again (nothing refused hit the disk).
fn assert_intact_after_reopen(dir: &Path, opts: Options, store: Store, expected: &Expected) {
    store.close().unwrap();
    drop(store);
    let store = Store::open(dir, opts).unwrap();
    assert_intact(&store, expected);
}

#[test]
fn payload_over_max_message_size_is_message_too_large() {
    let env = Env::new();
    let store = env.open();
    let mut expected = seed(&store);
    let err = store
        .append(b"alice", &payload(9, MAX_MESSAGE + 1), TTL)
        .unwrap_err();
    assert!(
        matches!(err, Error::MessageTooLarge { size, max } if size == MAX_MESSAGE + 1 && max == MAX_MESSAGE),
        "{err:?}"
    );
    assert_intact(&store, &expected);
    // The limit itself is accepted.
    let p = payload(10, MAX_MESSAGE);
    let id = store.append(b"alice", &p, TTL).unwrap();
    expected.get_mut(&b"alice"[..]).unwrap().push((id, p));
    assert_intact(&store, &expected);
    assert_intact_after_reopen(&env.dir, env.opts(), store, &expected);
}

#[test]
fn empty_and_overlong_queue_ids_are_invalid_queue_id() {
    let env = Env::new();
    let store = env.open();
    let mut expected = seed(&store);
    let queues_before = store.stats().queues;
    let long = vec![b'q'; 256];
    for q in [&b""[..], &long[..]] {
        let n = q.len();
        let is_bad = |e: &Error| matches!(e, Error::InvalidQueueId { len } if *len == n);
        let err = store.append(q, b"x", TTL).unwrap_err();
        assert!(is_bad(&err), "append: {err:?}");
        let err = store.read(q, None, 10).unwrap_err();
        assert!(is_bad(&err), "read: {err:?}");
        let err = store.ack(q, MessageId(1)).unwrap_err();
        assert!(is_bad(&err), "ack: {err:?}");
        let err = store.len(q).unwrap_err();
        assert!(is_bad(&err), "len: {err:?}");
        let err = store.purge(q).unwrap_err();
        assert!(is_bad(&err), "purge: {err:?}");
        let err = store.wait(q, None, Duration::ZERO).unwrap_err();
        assert!(is_bad(&err), "wait: {err:?}");
        assert_eq!(store.stats().queues, queues_before, "no queue was created");
        assert_intact(&store, &expected);
    }
    // 255 bytes is the longest accepted id.
    let q = vec![b'q'; 255];
    let id = store.append(&q, b"longest id", TTL).unwrap();
    expected.insert(q, vec![(id, b"longest id".to_vec())]);
    assert_intact_after_reopen(&env.dir, env.opts(), store, &expected);
}

#[test]
fn zero_and_overlong_ttl_are_invalid_ttl() {
    let env = Env::new();
    let opts = env.opts();
    let max = opts.max_ttl;
    let store = Store::open(&env.dir, opts).unwrap();
    let mut expected = seed(&store);
    for (ttl, ms) in [
        (Duration::ZERO, 0),
        (Duration::from_micros(999), 0), // rounds to 0 ms
        (max + Duration::from_millis(1), max.as_millis() + 1),
    ] {
        let err = store.append(b"alice", b"x", ttl).unwrap_err();
        assert!(
            matches!(err, Error::InvalidTtl { ttl_ms, max_ms } if ttl_ms == ms && max_ms == max.as_millis()),
            "ttl {ttl:?}: {err:?}"
        );
        assert_intact(&store, &expected);
    }
    let id = store.append(b"alice", b"max ttl", max).unwrap();
    expected
        .get_mut(&b"alice"[..])
        .unwrap()
        .push((id, b"max ttl".to_vec()));
    assert_intact_after_reopen(&env.dir, env.opts(), store, &expected);
}

#[test]
fn max_queue_len_is_queue_full_until_an_ack() {
    let env = Env::new();
    let mut opts = env.opts();
    opts.max_queue_len = 8;
    let store = Store::open(&env.dir, opts.clone()).unwrap();
    let mut expected = seed(&store);
    let q = b"full".to_vec();
    for i in 0..8 {
        let p = payload(i, 64);
        let id = store.append(&q, &p, TTL).unwrap();
        expected.entry(q.clone()).or_default().push((id, p));
    }
    let err = store.append(&q, b"one too many", TTL).unwrap_err();
    assert!(
        matches!(err, Error::QueueFull { len: 8, max: 8 }),
        "{err:?}"
    );
    assert_intact(&store, &expected);
    // The quota is per queue: others still take messages.
    let id = store.append(b"bob", b"bob is not full", TTL).unwrap();
    expected
        .get_mut(&b"bob"[..])
        .unwrap()
        .push((id, b"bob is not full".to_vec()));
    // Acking one makes room for one.
    let first = expected[&q][0].0;
    assert!(store.ack(&q, first).unwrap());
    expected.get_mut(&q).unwrap().remove(0);
    let id = store.append(&q, b"fits again", TTL).unwrap();
    expected
        .get_mut(&q)
        .unwrap()
        .push((id, b"fits again".to_vec()));
    let err = store.append(&q, b"full again", TTL).unwrap_err();
    assert!(
        matches!(err, Error::QueueFull { len: 8, max: 8 }),
        "{err:?}"
    );
    assert_intact(&store, &expected);
    assert_intact_after_reopen(&env.dir, opts, store, &expected);
}

#[test]
fn max_queue_bytes_is_queue_bytes_exceeded() {
    let env = Env::new();
    let q = b"heavy".to_vec();
    let one = frame_len(&q, 1000);
    let mut opts = env.opts();
    opts.max_queue_bytes = 3 * one + 10;
    let store = Store::open(&env.dir, opts.clone()).unwrap();
    let mut expected = seed(&store);
    for i in 0..3 {
        let p = payload(i, 1000);
        let id = store.append(&q, &p, TTL).unwrap();
        expected.entry(q.clone()).or_default().push((id, p));
    }
    let err = store.append(&q, &payload(3, 1000), TTL).unwrap_err();
    assert!(
        matches!(err, Error::QueueBytesExceeded { bytes, adding, max }
            if bytes == 3 * one && adding == one && max == 3 * one + 10),
        "{err:?}"
    );
    assert_intact(&store, &expected);
    // Acking frees the bytes.
    let first = expected[&q][0].0;
    assert!(store.ack(&q, first).unwrap());
    expected.get_mut(&q).unwrap().remove(0);
    let p = payload(4, 1000);
    let id = store.append(&q, &p, TTL).unwrap();
    expected.get_mut(&q).unwrap().push((id, p));
    assert_intact(&store, &expected);
    assert_intact_after_reopen(&env.dir, opts, store, &expected);
}

/// (sum of file sizes, sum of allocated blocks in bytes) of the files in `dir`.
fn dir_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(std::fs::Metadata::is_file)
        .fold((0, 0), |(s, b), m| (s + m.len(), b + m.blocks() * 512))
}

#[test]
fn max_disk_bytes_is_disk_quota_exceeded() {
    let env = Env::new();
    let quota = 256 << 10;
    let mut opts = env.opts();
    opts.max_disk_bytes = quota;
    let store = Store::open(&env.dir, opts.clone()).unwrap();
    let mut expected = seed(&store);
    let q = b"bulk".to_vec();
    let adding_one = frame_len(&q, MAX_MESSAGE);
    let mut refused = None;
    for i in 0..200 {
        let p = payload(i, MAX_MESSAGE);
        match store.append(&q, &p, TTL) {
            Ok(id) => expected.entry(q.clone()).or_default().push((id, p)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("a 256 KiB quota must refuse 200 messages of 4 KiB");
    // `used` counts preallocation, so the spare segment the key worker makes ahead (for
    // acks and compaction, which the quota never refuses) can take it one segment over.
    let seg = opts.segment_size;
    assert!(
        matches!(err, Error::DiskQuotaExceeded { used, adding, quota: q }
            if adding == adding_one && q == quota && used + adding > quota && used <= quota + seg),
        "{err:?}"
    );
    // The quota counts what the files occupy, a segment's preallocation included: the
    // data stored is below it by at most the segments being written (and their spare).
    let stored = expected[&q].len() as u64;
    assert!(
        stored * adding_one <= quota && stored * adding_one + 3 * seg > quota,
        "{stored} messages stored under the quota"
    );
    assert_intact(&store, &expected);
    // Settled (flush seals what is being written and a segment made twice by a race
    // is shredded, which frees preallocated space), the quota refuses again once that
    // space is used, and goes on refusing: nothing refused is stored.
    store.flush().unwrap();
    for i in 1000.. {
        let p = payload(i, MAX_MESSAGE);
        match store.append(&q, &p, TTL) {
            Ok(id) => expected.entry(q.clone()).or_default().push((id, p)),
            Err(e) => {
                assert!(matches!(e, Error::DiskQuotaExceeded { .. }), "{e:?}");
                break;
            }
        }
        assert!(i < 1100, "the quota no longer refuses");
    }
    let err = store
        .append(&q, &payload(999, MAX_MESSAGE), TTL)
        .unwrap_err();
    assert!(matches!(err, Error::DiskQuotaExceeded { .. }), "{err:?}");
    assert_intact(&store, &expected);
    // Stats count exactly what the files hold, and at most one spare segment made
    // ahead (plus the key files) goes past the quota.
    store.flush().unwrap();
    let (size, blocks) = dir_usage(&env.dir);
    assert_eq!(
        store.stats().bytes_on_disk,
        size,
        "stats vs the files' sizes"
    );
    assert!(
        blocks <= quota + seg + (64 << 10),
        "the data dir occupies {blocks} bytes under a quota of {quota}"
    );
    assert_intact_after_reopen(&env.dir, opts, store, &expected);
}

#[test]
fn append_batch_with_one_bad_item_stores_none() {
    let env = Env::new();
    let mut opts = env.opts();
    opts.max_queue_len = 8;
    let store = Store::open(&env.dir, opts.clone()).unwrap();
    let mut expected = seed(&store);
    let big = payload(1, MAX_MESSAGE + 1);
    let good = |q: &'static [u8]| NewMessage {
        queue: q,
        payload: b"good",
        ttl: TTL,
    };
    let bad_items = [
        NewMessage {
            queue: b"alice",
            payload: &big,
            ttl: TTL,
        },
        NewMessage {
            queue: b"",
            payload: b"x",
            ttl: TTL,
        },
        NewMessage {
            queue: b"alice",
            payload: b"x",
            ttl: Duration::ZERO,
        },
    ];
    for (i, bad) in bad_items.into_iter().enumerate() {
        let batch = [good(b"alice"), good(b"bob"), good(b"carol"), bad];
        let err = store.append_batch(&batch).unwrap_err();
        let right = match i {
            0 => matches!(err, Error::MessageTooLarge { .. }),
            1 => matches!(err, Error::InvalidQueueId { len: 0 }),
            _ => matches!(err, Error::InvalidTtl { ttl_ms: 0, .. }),
        };
        assert!(right, "bad item {i}: {err:?}");
        assert_intact(&store, &expected);
        assert_eq!(store.len(b"carol").unwrap(), 0);
    }
    // A quota refusal in the middle of a batch rolls the whole batch back too.
    for i in 0..7 {
        let p = payload(i, 10);
        let id = store.append(b"dave", &p, TTL).unwrap();
        expected.entry(b"dave".to_vec()).or_default().push((id, p));
    }
    let batch = [good(b"alice"), good(b"dave"), good(b"dave")];
    let err = store.append_batch(&batch).unwrap_err();
    assert!(
        matches!(err, Error::QueueFull { len: 8, max: 8 }),
        "{err:?}"
    );
    assert_intact(&store, &expected);
    // And a good batch is stored whole.
    let ids = store
        .append_batch(&[good(b"alice"), good(b"dave")])
        .unwrap();
    expected
        .get_mut(&b"alice"[..])
        .unwrap()
        .push((ids[0], b"good".to_vec()));
    expected
        .get_mut(&b"dave"[..])
        .unwrap()
        .push((ids[1], b"good".to_vec()));
    assert_intact(&store, &expected);
    assert_intact_after_reopen(&env.dir, opts, store, &expected);
}

#[test]
fn wrong_master_key_is_wrong_master_key() {
    let env = Env::new();
    let store = env.open();
    let expected = seed(&store);
    drop(store);
    let other = Arc::new(FileKeyProvider::create(env.tmp.path().join("other")).unwrap());
    let err = Store::open(&env.dir, options(&other)).unwrap_err();
    assert!(
        matches!(err, Error::WrongMasterKey { expected, got }
            if expected == env.key.kek_id() && got == other.kek_id()),
        "{err:?}"
    );
    assert_intact(&env.open(), &expected);
}

#[test]
fn missing_key_file_is_key_file_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("no-such-key");
    let err = FileKeyProvider::open(&path).unwrap_err();
    assert!(
        matches!(&err, Error::KeyFileMissing { path: p } if *p == path),
        "{err:?}"
    );
    assert!(!path.exists(), "open never creates a key");
    let err = FileKeyProvider::open_or_create(&path, false).unwrap_err();
    assert!(matches!(err, Error::KeyFileMissing { .. }), "{err:?}");
}

#[test]
fn group_or_world_readable_key_file_is_key_file_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("key");
    FileKeyProvider::create(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for mode in [0o644, 0o640, 0o604] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = FileKeyProvider::open(&path).unwrap_err();
        assert!(
            matches!(&err, Error::KeyFileInsecure { path: p, mode: m } if *p == path && *m == mode),
            "mode {mode:o}: {err:?}"
        );
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    FileKeyProvider::open(&path).unwrap();
}

#[test]
fn key_file_inside_the_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let key_path = dir.join("master.key");
    let key = Arc::new(FileKeyProvider::create(&key_path).unwrap());
    let err = Store::open(&dir, options(&key)).unwrap_err();
    let canonical = key_path.canonicalize().unwrap();
    assert!(
        matches!(&err, Error::KeyFileInsideDataDir { path } if *path == canonical),
        "{err:?}"
    );
    // Refused before anything was written: no lock file, no keystore, no segment.
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["master.key".to_string()]);
    // The explicit opt-in works.
    let mut opts = options(&key);
    opts.allow_key_in_data_dir = true;
    let store = Store::open(&dir, opts).unwrap();
    store.append(b"q", b"x", TTL).unwrap();
}

#[test]
fn second_open_of_an_open_dir_is_locked() {
    let env = Env::new();
    let store = env.open();
    let mut expected = seed(&store);
    let err = Store::open(&env.dir, env.opts()).unwrap_err();
    let canonical = env.dir.canonicalize().unwrap();
    assert!(
        matches!(&err, Error::Locked { dir } if *dir == canonical),
        "{err:?}"
    );
    // The first store is unharmed and keeps working.
    assert_intact(&store, &expected);
    let id = store.append(b"alice", b"after", TTL).unwrap();
    expected
        .get_mut(&b"alice"[..])
        .unwrap()
        .push((id, b"after".to_vec()));
    // Closing releases the lock.
    assert_intact_after_reopen(&env.dir, env.opts(), store, &expected);
}

/// Rewrites a u32 LE field at `at` and the header CRC at `crc_at` (CRC-32 of 0..crc_at).
fn set_version(path: &Path, at: usize, crc_at: usize, version: u32) -> Vec<u8> {
    let original = fs::read(path).unwrap();
    let mut b = original.clone();
    b[at..at + 4].copy_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&b[..crc_at]);
    b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    fs::write(path, &b).unwrap();
    original
}

#[test]
fn keystore_of_another_version_is_unsupported_version() {
    let env = Env::new();
    let store = env.open();
    let expected = seed(&store);
    drop(store);
    let keys = env.dir.canonicalize().unwrap().join("KEYS");
    let newer = FORMAT_VERSION + 1;
    let original = set_version(&keys, 8, 44, newer);
    let err = Store::open(&env.dir, env.opts()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedVersion { file, expected: FORMAT_VERSION, got } if *file == keys && *got == newer),
        "{err:?}"
    );
    // Older than the oldest version read: refused too.
    set_version(&keys, 8, 44, MIN_READ_VERSION - 1);
    assert!(matches!(
        Store::open(&env.dir, env.opts()),
        Err(Error::UnsupportedVersion { .. })
    ));
    fs::write(&keys, &original).unwrap();
    assert_intact(&env.open(), &expected);
}

#[test]
fn segment_of_another_version_is_unsupported_version() {
    let env = Env::new();
    let store = env.open();
    let expected = seed(&store);
    drop(store);
    let dir = env.dir.canonicalize().unwrap();
    let mut segs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let seg = segs.first().expect("a segment file").clone();
    let newer = FORMAT_VERSION + 1;
    let original = set_version(&seg, 8, 60, newer);
    let err = Store::open(&env.dir, env.opts()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedVersion { file, expected: FORMAT_VERSION, got } if *file == seg && *got == newer),
        "{err:?}"
    );
    fs::write(&seg, &original).unwrap();
    assert_intact(&env.open(), &expected);
}

fn assert_private(dir: &Path) {
    let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", e.path().display());
        n += 1;
    }
    assert!(n >= 3, "LOCK, KEYS and segments expected, found {n} files");
}

#[test]
fn data_dir_is_0700_and_every_file_0600() {
    let env = Env::new();
    let store = env.open();
    let expected = seed(&store);
    store.flush().unwrap();
    assert_private(&env.dir);
    let mode = fs::metadata(env.tmp.path().join("key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "key file mode {mode:o}");
    drop(store);
    assert_private(&env.dir);
    let store = env.open();
    assert_intact(&store, &expected);
    assert_private(&env.dir);
}

#[test]
fn inconsistent_options_are_invalid_options() {
    type Change = Box<dyn Fn(&mut Options)>;
    let env = Env::new();
    let cases: Vec<(&str, Change)> = vec![
        (
            "segment_size below 64 KiB",
            Box::new(|o| o.segment_size = (64 << 10) - 1),
        ),
        (
            "segment_size above 1 GiB",
            Box::new(|o| o.segment_size = (1 << 30) + 1),
        ),
        ("max_message_size 0", Box::new(|o| o.max_message_size = 0)),
        (
            "two maximum messages do not fit a segment",
            Box::new(|o| o.max_message_size = 32 << 10),
        ),
        ("max_ttl 0", Box::new(|o| o.max_ttl = Duration::ZERO)),
    ];
    for (what, change) in &cases {
        let mut o = env.opts();
        change(&mut o);
        let err = Store::open(&env.dir, o).unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{what}: {err:?}");
        assert!(!env.dir.exists(), "{what}: refused options created the dir");
    }
    // The smallest segment with the test's message size is fine.
    let store = env.open();
    let expected = seed(&store);
    assert_intact(&store, &expected);
}
