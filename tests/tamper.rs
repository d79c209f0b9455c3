//! Invariant: authenticated records and "bad bytes are errors, not crashes" — every altered, moved, swapped, replayed, truncated, rolled-back or renamed byte of a data dir is a typed `Error` (corruption names the exact file and byte offset), never a panic and never wrong data.
//!
//! Each test builds a small store (several sealed 64 KiB segments across a few queues),
//! closes it, copies the data dir, damages the copy in one precise way and opens it.
//!
//! Offsets the engine reports: a frame's checksum, framing and truncation errors name the
//! frame's first byte; a failed AEAD tag names the first byte of the sealed part that did
//! not open (the meta part starts 16 bytes into the frame, the body part right after the
//! meta part); a segment header error names the field (magic 0, checksum 60, id 16); a
//! sealed segment of the wrong length names the shorter of its length and its sealed length.

use std::collections::BTreeMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cinder::format::frame::{FrameHeader, FrameKind};
use cinder::format::keystore::KeystoreImage;
use cinder::{
    CorruptionKind, Durability, Error, FileKeyProvider, KeyProvider, ManualClock, MessageId,
    Options, RecoveryMode, Store,
};

/// The (manual) clock of every store here: nothing expires, nothing is retired by age.
const T0: u64 = 1_700_000_000_000;
const TTL: Duration = Duration::from_secs(3600);
const SEGMENT_HEADER_LEN: usize = 64;
const SEGMENT_HEADER_CRC_AT: u64 = 60;
const SEGMENT_ID_AT: u64 = 16;
const KEYSTORE_HEADER_LEN: usize = 48;
const KEYSTORE_HEADER_CRC_AT: u64 = 44;
/// Sealed meta block of the keystore: 56 bytes of plaintext + a 16-byte tag.
const KEYSTORE_META_SEALED_LEN: usize = cinder::format::keystore::META_SEALED_LEN;
const QUEUES: usize = 4;
const MESSAGES: usize = 320;
/// Equal payload and queue-id lengths make every message frame the same length, so frames
/// can be swapped and replayed over each other.
const PAYLOAD_LEN: usize = 400;

type Expected = BTreeMap<Vec<u8>, Vec<(MessageId, Vec<u8>)>>;

fn queue(i: usize) -> Vec<u8> {
    format!("queue-{i}").into_bytes()
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("message {i:05} ").into_bytes();
    p.extend((0..PAYLOAD_LEN).map(|j| (i * 31 + j * 7) as u8 ^ 0x5a));
    p.truncate(PAYLOAD_LEN);
    p
}

fn options(key: &Arc<FileKeyProvider>, durability: Durability) -> Options {
    let mut o = Options::new(Arc::clone(key) as Arc<dyn KeyProvider>);
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.durability = durability;
    o.clock = ManualClock::new(T0);
    o
}

/// Opens a store; a panic anywhere in recovery fails the test with a clear message.
fn open(dir: &Path, opts: Options) -> Result<Store, Error> {
    let r = catch_unwind(AssertUnwindSafe(|| Store::open(dir, opts)))
        .expect("Store::open panicked: damage must be a typed error, never a panic");
    if let Err(Error::InvalidOptions(m)) = &r {
        // Recovery reports a panicking scan thread as InvalidOptions: a disguised panic.
        panic!("recovery failed with InvalidOptions (a panic inside the engine?): {m}");
    }
    r
}

/// Reads a whole queue; a panic fails the test.
fn read_all(store: &Store, q: &[u8]) -> Result<Vec<cinder::Message>, Error> {
    catch_unwind(AssertUnwindSafe(|| store.read(q, None, 100_000)))
        .expect("Store::read panicked: damage must be a typed error, never a panic")
}

/// Asserts that every expected message reads back exactly, and nothing else.
fn assert_intact(store: &Store, expected: &Expected) {
    for (q, msgs) in expected {
        let got = read_all(store, q).expect("read of an undamaged queue");
        let got: Vec<(MessageId, Vec<u8>)> = got.into_iter().map(|m| (m.id, m.payload)).collect();
        assert_eq!(&got, msgs, "queue {}", String::from_utf8_lossy(q));
        assert_eq!(store.len(q).unwrap(), msgs.len() as u64);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The path the engine names in its errors (it canonicalizes the data dir).
fn engine_path(dir: &Path, name: &str) -> PathBuf {
    dir.canonicalize().unwrap().join(name)
}

/// A segment file and its frames, found with the public decoders.
#[derive(Debug)]
struct Seg {
    id: u64,
    path: PathBuf,
    bytes: Vec<u8>,
    /// (offset, header) of every frame before the seal.
    frames: Vec<(usize, FrameHeader)>,
    /// Offset of the seal frame, if the segment is sealed.
    seal: Option<usize>,
}

impl Seg {
    fn messages(&self) -> Vec<(usize, FrameHeader)> {
        self.frames
            .iter()
            .copied()
            .filter(|(_, h)| h.kind == FrameKind::Message)
            .collect()
    }
}

fn walk(bytes: &[u8]) -> (Vec<(usize, FrameHeader)>, Option<usize>) {
    let mut frames = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    while pos < bytes.len() {
        let Ok(h) = FrameHeader::decode(&bytes[pos..]) else {
            break; // the zeros of a preallocated, unsealed segment
        };
        if pos + h.frame_len() > bytes.len() {
            break;
        }
        if h.kind == FrameKind::Seal {
            return (frames, Some(pos));
        }
        frames.push((pos, h));
        pos += h.frame_len();
    }
    (frames, None)
}

/// Every segment of `dir`, by id.
fn segments(dir: &Path) -> Vec<Seg> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_suffix(".seg") else {
            continue;
        };
        let id = u64::from_str_radix(hex, 16).unwrap();
        let path = engine_path(dir, &name);
        let bytes = fs::read(&path).unwrap();
        let (frames, seal) = walk(&bytes);
        out.push(Seg {
            id,
            path,
            bytes,
            frames,
            seal,
        });
    }
    out.sort_by_key(|s| s.id);
    out
}

/// Sealed segments holding at least 8 message frames, by id.
fn sealed_message_segments(dir: &Path) -> Vec<Seg> {
    let v: Vec<Seg> = segments(dir)
        .into_iter()
        .filter(|s| s.seal.is_some() && s.messages().len() >= 8)
        .collect();
    assert!(
        v.len() >= 2,
        "the fixture must hold several sealed segments: {v:?}"
    );
    v
}

/// The one unsealed segment (of a live copy) that holds message frames.
fn unsealed_message_segment(dir: &Path) -> Seg {
    let mut v: Vec<Seg> = segments(dir)
        .into_iter()
        .filter(|s| s.seal.is_none() && !s.messages().is_empty())
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

/// Recomputes the frame checksum of the frame at `off` (CRC-32 of frame[4..], LE at 0..4).
fn fix_frame_crc(bytes: &mut [u8], off: usize, h: FrameHeader) {
    let crc = crc32fast::hash(&bytes[off + 4..off + h.frame_len()]);
    bytes[off..off + 4].copy_from_slice(&crc.to_le_bytes());
}

fn stored_crc(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Offset of the meta part of the frame at `off`.
fn meta_at(off: usize) -> u64 {
    (off + FrameHeader::serialized_len()) as u64
}

/// Offset of the body part of the frame at `off`.
fn body_at(off: usize, h: FrameHeader) -> u64 {
    (off + h.body_range().start) as u64
}

/// Asserts `r` is `Error::Corruption` naming `file` at `offset`, and returns its kind.
fn corruption(r: Result<Store, Error>, file: &Path, offset: u64) -> CorruptionKind {
    let err = r.expect_err("opening a damaged data dir must fail");
    assert!(
        matches!(&err, Error::Corruption { file: f, offset: o, .. } if f == file && *o == offset),
        "expected corruption in {} at {offset}, got {err:?}",
        file.display()
    );
    let Error::Corruption { kind, .. } = err else {
        unreachable!()
    };
    kind
}

/// Asserts that opening failed with `AuthenticationFailed` in `file` at `offset`.
fn expect_auth_failure(r: Result<Store, Error>, file: &Path, offset: u64) {
    let kind = corruption(r, file, offset);
    assert!(
        matches!(kind, CorruptionKind::AuthenticationFailed),
        "{kind:?}"
    );
}

/// A closed store with `MESSAGES` messages over `QUEUES` queues, a few of them acked.
struct Fixture {
    tmp: tempfile::TempDir,
    key: Arc<FileKeyProvider>,
    pristine: PathBuf,
    expected: Expected,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
        let pristine = tmp.path().join("pristine");
        let mut expected = Expected::new();
        let store = Store::open(&pristine, options(&key, Durability::Async)).unwrap();
        for i in 0..MESSAGES {
            let q = queue(i % QUEUES);
            let p = payload(i);
            let id = store.append(&q, &p, TTL).unwrap();
            expected.entry(q).or_default().push((id, p));
        }
        // Some acks, so that ack frames are on disk too.
        let q = queue(QUEUES - 1);
        let acked: Vec<MessageId> = expected[&q][..3].iter().map(|m| m.0).collect();
        assert_eq!(store.ack_batch(&q, &acked).unwrap(), 3);
        expected.get_mut(&q).unwrap().drain(..3);
        store.close().unwrap();
        drop(store);
        Fixture {
            tmp,
            key,
            pristine,
            expected,
        }
    }

    fn opts(&self) -> Options {
        options(&self.key, Durability::Async)
    }

    /// A fresh copy of the closed data dir.
    fn copy(&self, name: &str) -> PathBuf {
        let to = self.tmp.path().join(name);
        copy_dir(&self.pristine, &to);
        to
    }
}

/// A store kept open while its data dir is copied: the copy holds unsealed segments
/// (preallocated, zeros after the last frame), as after a crash.
struct LiveCopy {
    tmp: tempfile::TempDir,
    key: Arc<FileKeyProvider>,
    copy: PathBuf,
    messages: Vec<(MessageId, Vec<u8>)>,
}

const LIVE_QUEUE: &[u8] = b"live-queue";
const LIVE_MESSAGES: usize = 20;

impl LiveCopy {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
        let live = tmp.path().join("live");
        let copy = tmp.path().join("copy");
        let store = Store::open(&live, options(&key, Durability::Sync)).unwrap();
        let mut messages = Vec::new();
        for i in 0..LIVE_MESSAGES {
            let p = payload(i);
            messages.push((store.append(LIVE_QUEUE, &p, TTL).unwrap(), p));
        }
        // Every append returned after its fsync: the copy sees every frame.
        copy_dir(&live, &copy);
        store.close().unwrap();
        LiveCopy {
            tmp,
            key,
            copy,
            messages,
        }
    }

    fn opts(&self, recovery: RecoveryMode) -> Options {
        let mut o = options(&self.key, Durability::Async);
        o.recovery = recovery;
        o
    }

    /// Another copy of the (possibly damaged) copy, for a second open.
    fn copy_again(&self, name: &str) -> PathBuf {
        let to = self.tmp.path().join(name);
        copy_dir(&self.copy, &to);
        to
    }
}

#[test]
fn undamaged_copy_opens_and_reads_back_everything() {
    let f = Fixture::new();
    let dir = f.copy("copy");
    assert!(sealed_message_segments(&dir).len() >= 2);
    let store = open(&dir, f.opts()).unwrap();
    assert!(store.recovery_report().truncated.is_empty());
    assert!(store.recovery_report().unknown_files.is_empty());
    assert_intact(&store, &f.expected);
}

#[test]
fn payload_byte_flip_in_sealed_segment_is_checksum_mismatch_at_frame() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[0];
    let (off, h) = seg.messages()[2];
    let mut b = seg.bytes.clone();
    b[off + h.body_range().start + 7] ^= 0x01;
    let stored = stored_crc(&b, off);
    let actual = crc32fast::hash(&b[off + 4..off + h.frame_len()]);
    fs::write(&seg.path, &b).unwrap();
    let kind = corruption(open(&dir, f.opts()), &seg.path, off as u64);
    assert!(
        matches!(kind, CorruptionKind::ChecksumMismatch { expected, got } if expected == stored && got == actual),
        "{kind:?}"
    );
}

#[test]
fn payload_byte_flip_with_fixed_frame_crc_in_sealed_segment_breaks_the_seal() {
    // The frame checksum is recomputed, but the seal authenticates a CRC over every frame
    // byte of the segment, and it cannot be recomputed without the segment's key: recovery
    // refuses the segment at its seal before any read can see the frame.
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[0];
    let (off, h) = seg.messages()[2];
    let mut b = seg.bytes.clone();
    b[off + h.body_range().start + 7] ^= 0x01;
    fix_frame_crc(&mut b, off, h);
    fs::write(&seg.path, &b).unwrap();
    let seal = seg.seal.unwrap() as u64;
    let kind = corruption(open(&dir, f.opts()), &seg.path, seal);
    assert!(matches!(kind, CorruptionKind::MissingSeal), "{kind:?}");
}

#[test]
fn payload_byte_flip_with_fixed_frame_crc_fails_authentication_on_read() {
    // An unsealed segment (a crash copy) has no seal CRC over its frames: the frame passes
    // recovery (which opens meta parts only) and the body's tag fails on read.
    let lc = LiveCopy::new();
    let seg = unsealed_message_segment(&lc.copy);
    let k = 5;
    let (off, h) = seg.messages()[k];
    let mut b = seg.bytes.clone();
    b[off + h.body_range().start + 3] ^= 0x80;
    fix_frame_crc(&mut b, off, h);
    fs::write(&seg.path, &b).unwrap();

    let store = open(&lc.copy, lc.opts(RecoveryMode::TolerateTornTail)).unwrap();
    assert!(store.recovery_report().truncated.is_empty());
    assert_eq!(store.len(LIVE_QUEUE).unwrap(), LIVE_MESSAGES as u64);
    let err = read_all(&store, LIVE_QUEUE).unwrap_err();
    assert!(
        matches!(&err, Error::Corruption { file, offset, kind: CorruptionKind::AuthenticationFailed }
            if *file == seg.path && *offset == body_at(off, h)),
        "{err:?}"
    );
    // The frames around it are untouched and still read back.
    let before = store.read(LIVE_QUEUE, None, k).unwrap();
    let before: Vec<_> = before.into_iter().map(|m| (m.id, m.payload)).collect();
    assert_eq!(before, lc.messages[..k]);
    let after = store.read(LIVE_QUEUE, Some(lc.messages[k].0), 100).unwrap();
    let after: Vec<_> = after.into_iter().map(|m| (m.id, m.payload)).collect();
    assert_eq!(after, lc.messages[k + 1..]);
}

#[test]
fn meta_byte_flip_with_fixed_frame_crc_fails_authentication_at_open() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[1];
    let (off, h) = seg.messages()[4];
    let mut b = seg.bytes.clone();
    b[off + h.meta_range().start + 2] ^= 0x10;
    fix_frame_crc(&mut b, off, h);
    fs::write(&seg.path, &b).unwrap();
    expect_auth_failure(open(&dir, f.opts()), &seg.path, meta_at(off));
}

#[test]
fn swapped_frames_fail_authentication_at_the_first() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[0];
    let msgs = seg.messages();
    let (first, first_h) = msgs[3];
    let (second, second_h) = msgs[6];
    assert_eq!(first_h.frame_len(), second_h.frame_len());
    let len = first_h.frame_len();
    let mut bytes = seg.bytes.clone();
    let first_frame = bytes[first..first + len].to_vec();
    let second_frame = bytes[second..second + len].to_vec();
    bytes[first..first + len].copy_from_slice(&second_frame);
    bytes[second..second + len].copy_from_slice(&first_frame);
    fs::write(&seg.path, &bytes).unwrap();
    expect_auth_failure(open(&dir, f.opts()), &seg.path, meta_at(first));
}

#[test]
fn replayed_frame_fails_authentication_at_the_replay() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[0];
    let msgs = seg.messages();
    let (early, he) = msgs[1];
    let (late, hl) = msgs[msgs.len() - 2];
    assert_eq!(he.frame_len(), hl.frame_len());
    let n = he.frame_len();
    let mut b = seg.bytes.clone();
    let copy = b[early..early + n].to_vec();
    b[late..late + n].copy_from_slice(&copy);
    fs::write(&seg.path, &b).unwrap();
    expect_auth_failure(open(&dir, f.opts()), &seg.path, meta_at(late));
}

#[test]
fn frame_moved_to_another_segment_fails_authentication() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let segs = sealed_message_segments(&dir);
    let (src, dst) = (&segs[0], &segs[1]);
    let (off, h) = dst.messages()[2];
    assert_eq!(src.messages()[2], (off, h), "same offset, same length");
    let n = h.frame_len();
    let mut b = dst.bytes.clone();
    b[off..off + n].copy_from_slice(&src.bytes[off..off + n]);
    fs::write(&dst.path, &b).unwrap();
    expect_auth_failure(open(&dir, f.opts()), &dst.path, meta_at(off));
}

#[test]
fn sealed_segment_truncated_mid_frame_is_truncated() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[0];
    let (off, h) = seg.messages()[5];
    let cut = (off + h.frame_len() / 2) as u64;
    let sealed = seg.bytes.len() as u64;
    fs::OpenOptions::new()
        .write(true)
        .open(&seg.path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let kind = corruption(open(&dir, f.opts()), &seg.path, cut);
    assert!(
        matches!(kind, CorruptionKind::Truncated { needed, available } if needed == sealed && available == cut),
        "{kind:?}"
    );
}

#[test]
fn sealed_segment_without_its_seal_is_truncated() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[1];
    let seal = seg.seal.unwrap() as u64;
    let sealed = seg.bytes.len() as u64;
    fs::write(&seg.path, &seg.bytes[..seal as usize]).unwrap();
    let kind = corruption(open(&dir, f.opts()), &seg.path, seal);
    assert!(
        matches!(kind, CorruptionKind::Truncated { needed, available } if needed == sealed && available == seal),
        "{kind:?}"
    );
}

#[test]
fn bytes_appended_after_the_seal_are_refused() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[0];
    let sealed = seg.bytes.len() as u64;
    let mut b = seg.bytes.clone();
    b.extend_from_slice(&seg.bytes[seg.frames[0].0..seg.frames[1].0]); // a replayed frame
    fs::write(&seg.path, &b).unwrap();
    let kind = corruption(open(&dir, f.opts()), &seg.path, sealed);
    assert!(matches!(kind, CorruptionKind::MissingSeal), "{kind:?}");
}

#[test]
fn older_copy_of_a_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let snapshot = tmp.path().join("snapshot.seg");
    let seg_path;
    {
        let store = Store::open(&dir, options(&key, Durability::Sync)).unwrap();
        for i in 0..10 {
            store.append(b"q", &payload(i), TTL).unwrap();
        }
        let seg = unsealed_message_segment(&dir);
        assert_eq!(seg.messages().len(), 10);
        fs::copy(&seg.path, &snapshot).unwrap();
        seg_path = seg.path;
        for i in 10..20 {
            store.append(b"q", &payload(i), TTL).unwrap();
        }
        store.close().unwrap();
    }
    let current = segments(&dir)
        .into_iter()
        .find(|s| s.path == seg_path)
        .unwrap();
    assert_eq!(current.messages().len(), 20);
    assert!(current.seal.is_some());
    let sealed_len = current.bytes.len() as u64;
    assert!(fs::metadata(&snapshot).unwrap().len() > sealed_len);
    fs::copy(&snapshot, &seg_path).unwrap();
    let kind = corruption(
        open(&dir, options(&key, Durability::Async)),
        &seg_path,
        sealed_len,
    );
    assert!(matches!(kind, CorruptionKind::MissingSeal), "{kind:?}");
}

#[test]
fn older_keystore_is_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    {
        let store = Store::open(&dir, options(&key, Durability::Async)).unwrap();
        for i in 0..10 {
            store.append(b"q", &payload(i), TTL).unwrap();
        }
        store.close().unwrap();
    }
    let keys = dir.join("KEYS");
    let old = fs::read(&keys).unwrap();
    let old_next = KeystoreImage::decode(&old).unwrap().next_segment_id;
    {
        let store = Store::open(&dir, options(&key, Durability::Async)).unwrap();
        for i in 10..20 {
            store.append(b"q", &payload(i), TTL).unwrap();
        }
        store.close().unwrap();
    }
    let newer: Vec<u64> = segments(&dir)
        .iter()
        .map(|s| s.id)
        .filter(|&id| id >= old_next)
        .collect();
    assert!(!newer.is_empty(), "the second session created segments");
    fs::write(&keys, &old).unwrap();
    // The key audit log sees it first: it has records of the keystore writes since.
    // (Without the log, the newer segment files give it away: `StaleKeystore`, checked
    // when the keystore predates the log, as a version-2 one does.)
    match open(&dir, options(&key, Durability::Async)) {
        Err(Error::Corruption {
            file,
            kind: CorruptionKind::KeystoreRolledBack { .. },
            ..
        }) => assert_eq!(file, engine_path(&dir, "KEYS.audit")),
        other => panic!("a stale keystore opened or got another error: {other:?}"),
    }
}

#[test]
fn segment_copied_under_another_name_is_an_id_mismatch() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let segs = sealed_message_segments(&dir);
    let (a, b) = (&segs[0], &segs[1]);
    fs::copy(&a.path, &b.path).unwrap();
    let kind = corruption(open(&dir, f.opts()), &b.path, SEGMENT_ID_AT);
    assert!(
        matches!(kind, CorruptionKind::SegmentIdMismatch { expected, got } if expected == b.id && got == a.id),
        "{kind:?}"
    );
}

#[test]
fn segment_header_byte_flip_is_checksum_mismatch() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[0];
    let mut b = seg.bytes.clone();
    b[20] ^= 0x01; // inside the segment id
    let stored = stored_crc(&b, 60);
    let actual = crc32fast::hash(&b[..60]);
    fs::write(&seg.path, &b).unwrap();
    let kind = corruption(open(&dir, f.opts()), &seg.path, SEGMENT_HEADER_CRC_AT);
    assert!(
        matches!(kind, CorruptionKind::ChecksumMismatch { expected, got } if expected == stored && got == actual),
        "{kind:?}"
    );
}

#[test]
fn segment_header_magic_flip_is_bad_magic() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let seg = &sealed_message_segments(&dir)[1];
    let mut b = seg.bytes.clone();
    b[0] ^= 0x20;
    fs::write(&seg.path, &b).unwrap();
    let kind = corruption(open(&dir, f.opts()), &seg.path, 0);
    assert!(matches!(kind, CorruptionKind::BadMagic), "{kind:?}");
}

#[test]
fn keystore_header_byte_flip_is_checksum_mismatch() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let keys = engine_path(&dir, "KEYS");
    let mut b = fs::read(&keys).unwrap();
    b[16] ^= 0x01; // generation
    fs::write(&keys, &b).unwrap();
    let kind = corruption(open(&dir, f.opts()), &keys, KEYSTORE_HEADER_CRC_AT);
    assert!(
        matches!(kind, CorruptionKind::ChecksumMismatch { .. }),
        "{kind:?}"
    );
}

#[test]
fn keystore_body_byte_flip_is_checksum_mismatch() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let keys = engine_path(&dir, "KEYS");
    let mut b = fs::read(&keys).unwrap();
    b[KEYSTORE_HEADER_LEN + 40] ^= 0x01; // inside the first entry's wrapped key
    let crc_at = b.len() - 4;
    let stored = stored_crc(&b, crc_at);
    let actual = crc32fast::hash(&b[KEYSTORE_HEADER_LEN..crc_at]);
    fs::write(&keys, &b).unwrap();
    let kind = corruption(open(&dir, f.opts()), &keys, crc_at as u64);
    assert!(
        matches!(kind, CorruptionKind::ChecksumMismatch { expected, got } if expected == stored && got == actual),
        "{kind:?}"
    );
}

#[test]
fn keystore_entry_flip_with_fixed_crc_fails_authentication() {
    // An attacker edits a sealed length and fixes the body CRC: the sealed meta block's
    // tag covers every entry.
    let f = Fixture::new();
    let dir = f.copy("t");
    let keys = engine_path(&dir, "KEYS");
    let mut b = fs::read(&keys).unwrap();
    b[KEYSTORE_HEADER_LEN + 24] ^= 0x01; // first entry's sealed length
    let crc_at = b.len() - 4;
    let crc = crc32fast::hash(&b[KEYSTORE_HEADER_LEN..crc_at]);
    b[crc_at..].copy_from_slice(&crc.to_le_bytes());
    fs::write(&keys, &b).unwrap();
    let meta_at = (crc_at - KEYSTORE_META_SEALED_LEN) as u64;
    let kind = corruption(open(&dir, f.opts()), &keys, meta_at);
    assert!(
        matches!(kind, CorruptionKind::AuthenticationFailed),
        "{kind:?}"
    );
}

#[test]
fn removed_keystore_is_missing_keystore() {
    let f = Fixture::new();
    let dir = f.copy("t");
    assert!(!segments(&dir).is_empty());
    fs::remove_file(dir.join("KEYS")).unwrap();
    let kind = corruption(open(&dir, f.opts()), &engine_path(&dir, "KEYS"), 0);
    assert!(matches!(kind, CorruptionKind::MissingKeystore), "{kind:?}");
}

#[test]
fn stray_file_is_reported_and_left_alone() {
    let f = Fixture::new();
    let dir = f.copy("t");
    fs::write(dir.join("notes.txt"), b"not cinder's").unwrap();
    let store = open(&dir, f.opts()).unwrap();
    assert_eq!(
        store.recovery_report().unknown_files,
        vec![engine_path(&dir, "notes.txt")]
    );
    assert_intact(&store, &f.expected);
    drop(store);
    assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"not cinder's");
}

#[test]
fn different_master_key_is_wrong_master_key() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let other = Arc::new(FileKeyProvider::create(f.tmp.path().join("other-key")).unwrap());
    assert_ne!(other.kek_id(), f.key.kek_id());
    let err = open(&dir, options(&other, Durability::Async)).unwrap_err();
    assert!(
        matches!(err, Error::WrongMasterKey { expected, got } if expected == f.key.kek_id() && got == other.kek_id()),
        "{err:?}"
    );
    // Nothing was harmed: the right key still opens everything.
    let store = open(&dir, f.opts()).unwrap();
    assert_intact(&store, &f.expected);
}

#[test]
fn torn_tail_of_an_unsealed_segment_is_cut_and_reported() {
    let lc = LiveCopy::new();
    let seg = unsealed_message_segment(&lc.copy);
    let msgs = seg.messages();
    assert_eq!(msgs.len(), LIVE_MESSAGES);
    let (last, h) = *msgs.last().unwrap();
    let end = last + h.frame_len();
    let mut b = seg.bytes.clone();
    b[end - 10..end].fill(0); // the last 10 bytes never reached the disk
    let dropped = b[last..].iter().filter(|&&x| x != 0).count() as u64;
    fs::write(&seg.path, &b).unwrap();
    let strict = lc.copy_again("strict");

    let store = open(&lc.copy, lc.opts(RecoveryMode::TolerateTornTail)).unwrap();
    assert_eq!(
        store.recovery_report().truncated,
        vec![(seg.path.clone(), last as u64, dropped)]
    );
    let got: Vec<_> = read_all(&store, LIVE_QUEUE)
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.payload))
        .collect();
    assert_eq!(got, lc.messages[..LIVE_MESSAGES - 1]);
    drop(store);

    let strict_seg = engine_path(&strict, seg.path.file_name().unwrap().to_str().unwrap());
    let kind = corruption(
        open(&strict, lc.opts(RecoveryMode::Strict)),
        &strict_seg,
        last as u64,
    );
    assert!(
        matches!(kind, CorruptionKind::ChecksumMismatch { .. }),
        "{kind:?}"
    );
}

#[test]
fn unsealed_segment_truncated_mid_frame_is_cut_and_reported() {
    let lc = LiveCopy::new();
    let seg = unsealed_message_segment(&lc.copy);
    let (last, h) = *seg.messages().last().unwrap();
    let cut = last + h.frame_len() / 2;
    let dropped = seg.bytes[last..cut].iter().filter(|&&x| x != 0).count() as u64;
    fs::write(&seg.path, &seg.bytes[..cut]).unwrap();
    let strict = lc.copy_again("strict");

    let store = open(&lc.copy, lc.opts(RecoveryMode::TolerateTornTail)).unwrap();
    assert_eq!(
        store.recovery_report().truncated,
        vec![(seg.path.clone(), last as u64, dropped)]
    );
    let got: Vec<_> = read_all(&store, LIVE_QUEUE)
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.payload))
        .collect();
    assert_eq!(got, lc.messages[..LIVE_MESSAGES - 1]);
    drop(store);
    // Recovery sealed the cut segment: it reopens cleanly with the same messages.
    let store = open(&lc.copy, lc.opts(RecoveryMode::TolerateTornTail)).unwrap();
    assert!(store.recovery_report().truncated.is_empty());
    assert_eq!(store.len(LIVE_QUEUE).unwrap(), LIVE_MESSAGES as u64 - 1);
    drop(store);

    let strict_seg = engine_path(&strict, seg.path.file_name().unwrap().to_str().unwrap());
    let kind = corruption(
        open(&strict, lc.opts(RecoveryMode::Strict)),
        &strict_seg,
        last as u64,
    );
    let available = (cut - last) as u64;
    assert!(
        matches!(kind, CorruptionKind::Truncated { needed, available: a }
            if needed == h.frame_len() as u64 && a == available),
        "{kind:?}"
    );
}

#[test]
fn every_sampled_byte_flip_of_a_sealed_segment_is_refused_at_its_structure() {
    let f = Fixture::new();
    let base = f.copy("base");
    let seg = &sealed_message_segments(&base)[0];
    let name = seg.path.file_name().unwrap().to_str().unwrap().to_owned();
    let seal = seg.seal.unwrap();
    let len = seg.bytes.len();
    // Every header byte, the first three frames densely, a stride over the rest, and
    // every byte of the seal frame.
    let mut positions: Vec<usize> = (0..SEGMENT_HEADER_LEN).collect();
    let third = seg.frames[3].0;
    positions.extend((SEGMENT_HEADER_LEN..third).step_by(7));
    positions.extend((third..seal).step_by(499));
    positions.extend(seal..len);
    for (n, &p) in positions.iter().enumerate() {
        let dir = f.tmp.path().join(format!("flip-{n}"));
        copy_dir(&base, &dir);
        let path = engine_path(&dir, &name);
        let mut b = seg.bytes.clone();
        b[p] ^= 0x04;
        fs::write(&path, &b).unwrap();
        let expected_offset = if p < 8 {
            0 // magic
        } else if p < SEGMENT_HEADER_LEN {
            SEGMENT_HEADER_CRC_AT
        } else if p >= seal {
            len as u64 // the file does not end with a valid seal
        } else {
            seg.frames.iter().rev().find(|(o, _)| *o <= p).unwrap().0 as u64
        };
        let err = open(&dir, f.opts()).expect_err(&format!("flip at byte {p} was accepted"));
        assert!(
            matches!(&err, Error::Corruption { file, offset, .. } if *file == path && *offset == expected_offset),
            "flip at byte {p}: expected corruption at {expected_offset}, got {err:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn cleanly_closed_store_reopens_in_strict_mode() {
    let f = Fixture::new();
    let dir = f.copy("t");
    let mut o = f.opts();
    o.recovery = RecoveryMode::Strict;
    let store = open(&dir, o).unwrap();
    assert_intact(&store, &f.expected);
}

#[test]
fn crash_copy_without_torn_bytes_opens_in_strict_mode() {
    // Every append returned after its fsync and nothing is torn: the bytes after the last
    // frame are the zeros of the preallocation (engine-format.md, "Segment file"), which
    // are not damage. TolerateTornTail reports nothing truncated here.
    let lc = LiveCopy::new();
    let tolerant = lc.copy_again("tolerant");
    let store = open(&tolerant, lc.opts(RecoveryMode::TolerateTornTail)).unwrap();
    assert!(store.recovery_report().truncated.is_empty());
    assert_eq!(store.recovery_report().unsealed, 2);
    drop(store);
    let store = open(&lc.copy, lc.opts(RecoveryMode::Strict)).unwrap();
    let got: Vec<_> = read_all(&store, LIVE_QUEUE)
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.payload))
        .collect();
    assert_eq!(got, lc.messages);
}

#[test]
fn every_byte_flip_of_the_keystore_is_refused_at_its_checksum() {
    let f = Fixture::new();
    let base = f.copy("base");
    let original = fs::read(base.join("KEYS")).unwrap();
    let body_crc_at = original.len() - 4;
    let dir = f.tmp.path().join("flip");
    copy_dir(&base, &dir);
    let keys = engine_path(&dir, "KEYS");
    for p in 0..original.len() {
        let mut b = original.clone();
        b[p] ^= 0x40;
        fs::write(&keys, &b).unwrap();
        // The keystore is checked before anything is written: one copy serves every flip.
        let expected_offset = if p < 8 {
            0 // magic
        } else if p < KEYSTORE_HEADER_LEN {
            KEYSTORE_HEADER_CRC_AT
        } else {
            body_crc_at as u64
        };
        let kind = corruption(open(&dir, f.opts()), &keys, expected_offset);
        assert!(
            matches!(
                kind,
                CorruptionKind::BadMagic | CorruptionKind::ChecksumMismatch { .. }
            ),
            "flip at byte {p}: {kind:?}"
        );
    }
    fs::write(&keys, &original).unwrap();
    let store = open(&dir, f.opts()).unwrap();
    assert_intact(&store, &f.expected);
}

#[test]
fn crash_inside_segment_creation_is_recovered() {
    // Segment creation persists the key, then builds the file under `<name>.tmp` (header,
    // preallocation, fsync) and renames it into place. A kill -9 before the rename leaves
    // a keyed segment id with no file and a temp file that is empty or all zeros:
    // recovery drops both (engine-format.md, "Segment creation").
    let lc = LiveCopy::new();
    let spare = segments(&lc.copy)
        .into_iter()
        .find(|s| s.seal.is_none() && s.frames.is_empty())
        .expect("the live copy holds the writer's spare segment");
    let zeros = lc.copy_again("zeros");
    let empty = lc.copy_again("empty");
    let name = spare.path.file_name().unwrap().to_str().unwrap().to_owned();
    let tmp_name = format!("{name}.tmp");
    fs::remove_file(zeros.join(&name)).unwrap();
    fs::remove_file(empty.join(&name)).unwrap();
    fs::write(zeros.join(&tmp_name), vec![0u8; spare.bytes.len()]).unwrap();
    fs::write(empty.join(&tmp_name), b"").unwrap();
    for dir in [zeros, empty] {
        let store = open(&dir, lc.opts(RecoveryMode::Strict)).unwrap_or_else(|e| {
            panic!(
                "{}: a crash inside segment creation made the dir unopenable: {e:?}",
                dir.display()
            )
        });
        assert!(store.recovery_report().orphan_keys >= 1);
        assert!(
            !dir.join(&tmp_name).exists(),
            "the temp segment was not removed"
        );
        let got: Vec<_> = read_all(&store, LIVE_QUEUE)
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.payload))
            .collect();
        assert_eq!(got, lc.messages);
    }
}

#[test]
fn restored_copy_of_a_shredded_segment_is_deleted_not_resurrected() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
    let dir = tmp.path().join("data");
    let clock = ManualClock::new(T0);
    let mut opts = options(&key, Durability::Sync);
    opts.clock = clock.clone();
    opts.background_reaper = false;
    let store = Store::open(&dir, opts.clone()).unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(store.append(b"gone", &payload(i), TTL).unwrap());
    }
    let seg = unsealed_message_segment(&dir);
    assert_eq!(store.ack_through(b"gone", ids[9]).unwrap(), 10);
    clock.advance(Duration::from_secs(5)); // the segment is idle and dead: retire it
    store.maintain().unwrap();
    store.maintain().unwrap();
    assert!(!seg.path.exists(), "the dead segment was shredded");
    store.close().unwrap();
    drop(store);
    fs::write(&seg.path, &seg.bytes).unwrap(); // an old copy of the shredded file
                                               // verify: the key audit log records the shred, so the keyless file is the moment
                                               // between a shred's two steps (a note), not a lost key (a problem).
    let v = cinder::verify(&dir, &*key).unwrap();
    assert!(v.is_clean(), "{v:#?}");
    assert!(
        v.notes
            .iter()
            .any(|n| n.file == seg.path && n.what.contains("shred in progress or interrupted")),
        "{v:#?}"
    );
    let store = open(&dir, opts).unwrap();
    assert_eq!(
        store.recovery_report().deleted_unkeyed,
        vec![seg.path.clone()]
    );
    assert!(!seg.path.exists());
    assert!(read_all(&store, b"gone").unwrap().is_empty());
}

#[test]
fn a_deleted_sealed_segment_fails_the_open_unless_salvage_is_asked_for() {
    let f = Fixture::new();
    for victim in [0, 1] {
        let dir = f.copy(&format!("deleted-{victim}"));
        // The fixture acks in its last queue: the ack records are in a sealed segment
        // too, and deleting either kind of file is refused.
        let segs: Vec<Seg> = segments(&dir)
            .into_iter()
            .filter(|s| s.seal.is_some() && !s.frames.is_empty())
            .collect();
        let seg = if victim == 0 {
            segs.iter().find(|s| !s.messages().is_empty()).unwrap()
        } else {
            segs.iter()
                .find(|s| s.frames.iter().any(|(_, h)| h.kind == FrameKind::Acks))
                .unwrap()
        };
        fs::remove_file(&seg.path).unwrap();
        let kind = corruption(open(&dir, f.opts()), &seg.path, 0);
        assert!(
            matches!(kind, CorruptionKind::SegmentMissing { segment_id, sealed_len }
                if segment_id == seg.id && sealed_len == seg.bytes.len() as u64),
            "{kind:?}"
        );
        // Refusing changed nothing: the same open fails again, the same way.
        assert!(open(&dir, f.opts()).is_err());
        let mut o = f.opts();
        o.recovery = RecoveryMode::SalvageMissingSegments;
        let store = open(&dir, o).unwrap();
        assert_eq!(
            store.recovery_report().missing_segments,
            vec![seg.path.clone()]
        );
        drop(store);
        // Salvaged: the key is gone with the file; the store opens normally again.
        let store = open(&dir, f.opts()).unwrap();
        assert!(store.recovery_report().missing_segments.is_empty());
    }
}

#[test]
fn bit_rot_in_a_middle_frame_of_an_unsealed_segment_is_corruption_not_a_torn_tail() {
    let lc = LiveCopy::new();
    let seg = unsealed_message_segment(&lc.copy);
    let msgs = seg.messages();
    let (mid, h) = msgs[msgs.len() / 2];
    let mut b = seg.bytes.clone();
    b[mid + h.frame_len() - 20] ^= 0x01; // one bit of a durable frame, later frames intact
    fs::write(&seg.path, &b).unwrap();
    for mode in [RecoveryMode::TolerateTornTail, RecoveryMode::Strict] {
        let kind = corruption(open(&lc.copy, lc.opts(mode)), &seg.path, mid as u64);
        assert!(
            matches!(kind, CorruptionKind::ChecksumMismatch { .. }),
            "{kind:?}"
        );
    }
    // Nothing was cut: the file is as it was. `verify` calls it damage too (what it
    // passes, recovery opens).
    assert_eq!(fs::read(&seg.path).unwrap(), b);
    let v = cinder::verify(&lc.copy, &*lc.key).unwrap();
    assert!(!v.is_clean(), "{v:?}");
}
