//! Regression tests for what the fuzzers (`fuzz/`, see fuzz/README.md) found. Each replays
//! the finding through the public API and asserts a typed result, never a panic.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cinder::format::frame::{FrameHeader, FrameKind};
use cinder::{
    CorruptionKind, Durability, Error, FileKeyProvider, KeyProvider, ManualClock, Options, Store,
};

/// The fuzzers' fixed master key (`fuzz/src/lib.rs`, `MASTER_KEY`): the seed store images
/// were written under it.
const FUZZ_MASTER_KEY: [u8; 32] = *b"cinder fuzz: not a secret key!!!";
/// The fuzzers' clock base (`CLOCK_BASE_MS`).
const FUZZ_CLOCK_BASE_MS: u64 = 1_700_000_000_000;

/// `open_dir` input: a keystore and three segments, where segment 4's header carries DEK
/// id 0xffff_ffff_ffff_0004 (flags ask the harness to recompute that header's CRC).
/// `cinder::verify` reported the dir clean while `Store::open` refused it (`segment dek
/// id`); fixed in 557e4a3 (verify checks the header's DEK id like recovery).
const OPEN_DIR_DEK_ID_MISMATCH: &[&str] = &[
    "07dc0143494e44524b455902000000030000000d0000000000000006000000000000007d3ffe1991a9d281ac0100004b",
    "71be7e020000000000000002000000000000007d3ffe1991a9d281dc000000000000004800c20e44e30275022554c0bb",
    "f16eaccb21f4b489d69346ab14ad2dc25608adf5f3eb9c5ebe896027caa9c390f3d26a5597ddc785190470eb29aa4fbf",
    "08efa1de6d8f2b298cda93db73040000000000000004000000000000007d3ffe1991a9d281dc000000000000004800dc",
    "ac9fc6fd5c01140ea30b1d7ae53e9e4534f3d7dd2d15ba167f0e7dacb838ca6b64c7ef22a51e02e16bfd35d6d68c359c",
    "fd0efc34d1fd087558d58dc02fa0b60e0c542a7e995df0050000000000000005000000000000007d3ffe1991a9d28180",
    "000000000000004800ab2ab3c131b701189b0320f5cc9b3aeb242ba1de3921434a2c261fd0a928bace8621522be1eb82",
    "67c02c6ef0e81ccb075c6c68fcb4d55acc4457290dc0684c743d7647edc7e55d194800c9452fc0bd73ce5bc2bae72d41",
    "8339d4e92b2177724950f9237d7540951ed57a09fbd25d89dc888ed0ef6ee9d817f4841087e37cbd4d4b88ccfc8da85e",
    "76c33da211afdc94a1e6266c9f3dc7c9c873a6698cddd82520ac5bf71c969254cd135020c86c8329c7f1eab5fa8ab200",
    "0000dc0043494e44525345470200000040000000020000000000000002000000000000007d3ffe1991a9d28100000000",
    "00000000000000000000000000000000be27aa24e94324d1010032001a000000000000004ad544e02e8023d7f2a42b2c",
    "344418fac4a119f90fd652785918125bef229324546346e2bd8b0b7a7d8d08f54c43582830d0295d1e96655939650d53",
    "6680f08a89497f35f380b50acae1219a880d350403003000000000000000000001000000000000009c00000000000000",
    "aa703391000000007a5a1311dcf7ade0190ef7a7bbde75d4e7a1f13c71f65709000000dc0043494e4452534547020000",
    "004000000004000000000000000400fffffffffffffffffe1991a9d28100000000000000000000000000000000000000",
    "000e419a11cba792df010032001a0000000000000071fa5753edfe6ecc0a38013f06bb65546ad4fcdb2e00c6e23fdbf6",
    "6534abab951431c36ec0e12ec4f15b7d5d8b8cb99c62dfddf5271a07bb03774d27a6ccba856861a9ce144a1a58efb9a9",
    "7f14ecb39203003000000000000000000001000000000000009c000000000000007b430f0300000000e9fe702f938b4b",
    "58e55403726e8ae8cec2cd1094c716bbce000000800043494e4452534547020000004000000005000000000000000500",
    "0000000000007d3ffe1991a9d2810000000000000000000000000000000000000000f9adc2ae3ab38f07030030000000",
    "00000000000000000000000000004000000000000000000000000000000076cdff8a6ee13db019a955bc26bba9432669",
    "86fe0c0108e5",
];

fn unhex(parts: &[&str]) -> Vec<u8> {
    let s: String = parts.concat();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn put_crc(b: &mut [u8], covered: std::ops::Range<usize>, at: usize) {
    let crc = crc32fast::hash(&b[covered]);
    b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn write_private(path: &Path, bytes: &[u8]) {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// Writes an `open_dir` input as the fuzz harness does (`cinder_fuzz::image`): flags u8,
/// keystore (len u16 LE + bytes), then up to 4 × (name u8, zero pad u16 LE, len u16 LE,
/// bytes); flag bits 0/1/2 recompute the segment header, frame and keystore CRCs.
/// Only what this file's inputs use is supported (name 0: named by the header's id).
fn write_open_dir_image(input: &[u8], dir: &Path) {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (a, rest) = b.split_at(n.min(b.len()));
        *b = rest;
        a
    }
    fn u16le(b: &mut &[u8]) -> usize {
        let x = take(b, 2);
        usize::from(x.first().copied().unwrap_or(0))
            | usize::from(x.get(1).copied().unwrap_or(0)) << 8
    }
    let mut r = input;
    let flags = take(&mut r, 1)[0];
    let klen = u16le(&mut r);
    let mut keystore = take(&mut r, klen).to_vec();
    fs::DirBuilder::new().mode(0o700).create(dir).unwrap();
    if flags & 4 != 0 {
        put_crc(&mut keystore, 0..44, 44);
        let end = keystore.len() - 4;
        put_crc(&mut keystore, 48..end, end);
    }
    write_private(&dir.join("KEYS"), &keystore);
    while !r.is_empty() {
        assert_eq!(
            take(&mut r, 1)[0],
            0,
            "only header-named segments are supported"
        );
        let pad = u16le(&mut r);
        let len = u16le(&mut r);
        let mut seg = take(&mut r, len).to_vec();
        if flags & 1 != 0 {
            put_crc(&mut seg, 0..60, 60);
        }
        if flags & 2 != 0 {
            let mut pos = 64;
            while let Ok(h) = FrameHeader::decode(&seg[pos.min(seg.len())..]) {
                if pos + h.frame_len() > seg.len() {
                    break;
                }
                put_crc(&mut seg, pos + 4..pos + h.frame_len(), pos);
                pos += h.frame_len();
            }
        }
        seg.resize(seg.len() + pad, 0);
        let id = u64::from_le_bytes(seg[16..24].try_into().unwrap());
        write_private(&dir.join(format!("{id:016x}.seg")), &seg);
    }
}

fn fuzz_key(dir: &Path) -> Arc<FileKeyProvider> {
    let p = dir.join("master.key");
    write_private(&p, &FUZZ_MASTER_KEY);
    Arc::new(FileKeyProvider::open(&p).unwrap())
}

fn fuzz_options(key: &Arc<FileKeyProvider>) -> Options {
    let mut o = Options::new(Arc::clone(key) as Arc<dyn KeyProvider>);
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.clock = ManualClock::new(FUZZ_CLOCK_BASE_MS);
    o.background_reaper = false;
    o
}

fn is_dek_id_refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::Corruption {
            offset: 24,
            kind: CorruptionKind::BadField {
                field: "segment dek id",
                ..
            },
            ..
        }
    )
}

/// The fuzz input itself: the audits run, `verify` reports the header's DEK id, and open
/// refuses it with a typed error naming that field.
#[test]
fn open_dir_dek_id_mismatch_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let key = fuzz_key(tmp.path());
    let dir = tmp.path().join("data");
    write_open_dir_image(&unhex(OPEN_DIR_DEK_ID_MISMATCH), &dir);
    let _ = cinder::inspect(&dir, Some(&*key), FUZZ_CLOCK_BASE_MS, true).unwrap();
    let v = cinder::verify(&dir, &*key).unwrap();
    assert!(v.problems.iter().any(|f| f.offset == Some(24)), "{v:?}");
    let e = Store::open(&dir, fuzz_options(&key)).unwrap_err();
    assert!(is_dek_id_refusal(&e), "{e:?}");
}

/// A store's own segment whose header names another DEK id (CRC recomputed, as an
/// attacker or a buggy tool would): recovery refuses it at the field's offset.
fn store_with_dek_id_mismatch(tmp: &Path) -> (std::path::PathBuf, Arc<FileKeyProvider>) {
    let key = Arc::new(FileKeyProvider::create(tmp.join("key")).unwrap());
    let dir = tmp.join("data");
    let store = Store::open(&dir, fuzz_options(&key)).unwrap();
    store
        .append(b"alice", b"hello", Duration::from_secs(3600))
        .unwrap();
    store.close().unwrap();
    drop(store);
    let seg = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .min()
        .unwrap();
    let mut b = fs::read(&seg).unwrap();
    b[24..32].copy_from_slice(&0xffff_ffff_ffff_0001u64.to_le_bytes());
    put_crc(&mut b, 0..60, 60);
    fs::write(&seg, &b).unwrap();
    (dir, key)
}

#[test]
fn open_refuses_segment_dek_id_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = store_with_dek_id_mismatch(tmp.path());
    let e = Store::open(&dir, fuzz_options(&key)).unwrap_err();
    assert!(is_dek_id_refusal(&e), "{e:?}");
}

/// Found by the `open_dir` fuzz target at 1d234f1: `cinder::verify` did not compare a
/// segment header's DEK id with the segment id, while recovery (`check_header`) refuses
/// the mismatch, so `verify` called clean a dir that `Store::open` would not open.
#[test]
fn verify_flags_segment_dek_id_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = store_with_dek_id_mismatch(tmp.path());
    let v = cinder::verify(&dir, &*key).unwrap();
    assert!(
        v.problems.iter().any(|f| f.offset == Some(24)),
        "verify found no problem at the header's DEK id: {v:?}"
    );
}

/// A data dir copied while its store was open (what a crash leaves: segments not sealed),
/// in which the body of the last message was altered and its frame CRC recomputed (an
/// attacker, or a tool that "repairs" checksums). Recovery accepts it: it checks frame
/// CRCs and meta tags, bodies are opened on read. One message of the segment is acked,
/// so the segment is partly dead and (with compaction) due at once after recovery.
/// Returns the copy and its key.
fn crashed_copy_with_altered_body(tmp: &Path) -> (std::path::PathBuf, Arc<FileKeyProvider>) {
    let key = Arc::new(FileKeyProvider::create(tmp.join("key")).unwrap());
    let dir = tmp.join("data");
    let mut o = fuzz_options(&key);
    o.durability = Durability::Sync;
    let store = Store::open(&dir, o).unwrap();
    let ids: Vec<_> = (0..4)
        .map(|i| {
            store
                .append(
                    b"alice",
                    format!("payload {i}").as_bytes(),
                    Duration::from_secs(3600),
                )
                .unwrap()
        })
        .collect();
    assert!(store.ack(b"alice", ids[0]).unwrap());
    let copy = tmp.join("copy");
    fs::DirBuilder::new().mode(0o700).create(&copy).unwrap();
    for e in fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        // The key worker may rename a new spare into place meanwhile: a file gone
        // since the listing is one a crash copy would not hold either.
        if e.file_name() != "LOCK" {
            match fs::copy(e.path(), copy.join(e.file_name())) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                r => {
                    r.unwrap();
                }
            }
        }
    }
    store.close().unwrap();
    drop(store);
    let mut altered = 0;
    for e in fs::read_dir(&copy).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "seg") {
            continue;
        }
        let mut b = fs::read(&p).unwrap();
        let (mut pos, mut last) = (64, None);
        while let Ok(h) = FrameHeader::decode(&b[pos..]) {
            if pos + h.frame_len() > b.len() {
                break;
            }
            if h.kind == FrameKind::Message {
                last = Some((pos, h));
            }
            pos += h.frame_len();
        }
        if let Some((pos, h)) = last {
            b[pos + h.body_range().start] ^= 1;
            put_crc(&mut b, pos + 4..pos + h.frame_len(), pos);
            fs::write(&p, &b).unwrap();
            altered += 1;
        }
    }
    assert_eq!(altered, 1, "expected the messages in one segment");
    (copy, key)
}

fn is_auth_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Corruption {
            kind: CorruptionKind::AuthenticationFailed,
            ..
        }
    )
}

/// Found by `open_dir` (an unsealed segment with a body altered under a valid CRC): the
/// store opens; reading the queue and maintenance report `Corruption`, never panic.
#[test]
fn altered_body_is_a_typed_error_for_read_and_maintain() {
    let tmp = tempfile::tempdir().unwrap();
    let (copy, key) = crashed_copy_with_altered_body(tmp.path());
    let store = Store::open(&copy, fuzz_options(&key)).unwrap();
    let e = store.read(b"alice", None, 10).unwrap_err();
    assert!(is_auth_failure(&e), "{e:?}");
    for _ in 0..3 {
        match store.maintain() {
            Ok(_) => {}
            Err(e) => assert!(is_auth_failure(&e), "{e:?}"),
        }
    }
    store.close().unwrap();
}

/// ENGINE BUG found from the `open_dir` finding above: compaction of a segment holding a
/// message whose body does not open (src/gc/compact.rs, `compact_one`) fails at that
/// message after it has already reserved, written and counted as live the copies of the
/// messages before it; the copies are never relocated nor counted dead, and the next
/// attempt (every `maintain`, every compactor tick) writes them again. Disk use grows
/// without bound (compaction bypasses the disk quota) until the messages expire.
/// Also, `compact_due` stops at the first error, and the failing segment sorts first
/// (oldest death) on every pass, so no later segment is compacted either.
/// Un-ignore once a failed compaction leaves no copies behind (or skips the segment).
#[test]

fn failed_compaction_does_not_rewrite_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let (copy, key) = crashed_copy_with_altered_body(tmp.path());
    let store = Store::open(&copy, fuzz_options(&key)).unwrap();
    let _ = store.maintain();
    store.flush().unwrap();
    let first = store.stats();
    for _ in 0..6 {
        let _ = store.maintain();
    }
    store.flush().unwrap();
    let later = store.stats();
    assert_eq!(
        later.bytes_on_disk, first.bytes_on_disk,
        "every maintenance pass wrote the same copies again: {first:?} then {later:?}"
    );
    store.close().unwrap();
}
