//! The key audit log against a keystore that someone (or a crash) put out of step with
//! it: a keystore rolled back alone is detected; a store of format version 3 (unkeyed
//! log) is upgraded to a keyed log, also when the upgrade is cut short. The version-3 store is
//! written from `engine-format.md` with the public format types, not by old code.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cinder::crypto::{Dek, SealKey};
use cinder::format::audit::v1;
use cinder::format::keystore::{decode_meta, encode_meta, KeystoreImage, META_PLAIN_LEN_V3};
use cinder::vfs::{Fault, FaultFs, FaultKind, Op};
use cinder::{AuditEvent, CorruptionKind, Durability, Error, KeyProvider, MessageId, Store};
use common::rig::Rig;

const TTL: Duration = Duration::from_secs(3600);
const DEADLINE: Duration = Duration::from_secs(60);
const META_CONTEXT: &[u8] = b"cinder keystore meta";

fn rig() -> Rig {
    Rig::new(Durability::default(), DEADLINE)
}

/// Two full segments of messages and a clean close.
fn fill(rig: &Rig) -> Vec<MessageId> {
    let s = Store::open(&rig.dir, rig.real()).unwrap();
    let ids: Vec<MessageId> = (0..100)
        .map(|_| s.append(b"q", &[3u8; 1000], TTL).unwrap())
        .collect();
    s.close().unwrap();
    ids
}

/// Acks the first 60 messages (the whole first segment, so a maintenance pass after the
/// deadline shreds it); returns them.
fn ack_first_segment(s: &Store, ids: &[MessageId]) -> Vec<MessageId> {
    s.ack_batch(b"q", &ids[..60]).unwrap();
    s.flush().unwrap();
    ids[..60].to_vec()
}

/// Everything in the data dir but the key audit log: what an old backup holds.
type Snapshot = Vec<(std::ffi::OsString, Vec<u8>)>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        if !name.to_string_lossy().starts_with("KEYS.audit") && name != "LOCK" {
            files.push((name.clone(), std::fs::read(dir.join(&name)).unwrap()));
        }
    }
    files
}

/// Puts an old backup back (keystore and segment files, the shredded ones included)
/// and deletes the segment files created since, leaving the log alone: what someone
/// who wants shredded messages back would do.
fn put_back(dir: &Path, old: &Snapshot) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        if name.to_string_lossy().ends_with(".seg") {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
    }
    for (name, bytes) in old {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn assert_rolled_back(opened: cinder::Result<Store>) {
    match opened {
        Err(Error::Corruption {
            kind:
                CorruptionKind::KeystoreRolledBack {
                    generation,
                    log_generation,
                },
            ..
        }) => assert!(log_generation >= generation + 2),
        Err(e) => panic!("wrong error for a rolled-back keystore: {e}"),
        Ok(_) => panic!("a keystore rolled back alone was accepted"),
    }
}

/// Someone puts back an older copy of `KEYS` (one that still holds keys shredded since)
/// and leaves the log alone. The log has records of keystore writes after the copy's:
/// `Store::open` and `verify` both say so. Before records carried the keystore
/// generation, the open accepted the old keystore (its anchor is a prefix of the log).
#[test]
fn a_keystore_rolled_back_alone_is_detected_against_the_log() {
    let rig = rig();
    let ids = fill(&rig);
    let s = Store::open(&rig.dir, rig.real()).unwrap();
    ack_first_segment(&s, &ids);
    // The backup is taken while the store runs, once every segment it will have exists:
    // what catches the rollback is the log, not a segment file the copy has no key for.
    let old = snapshot(&rig.dir);
    rig.clock.advance(DEADLINE);
    s.maintain().unwrap();
    assert!(s.stats().shreds > 0, "{:?}", s.stats());
    s.close().unwrap();
    drop(s);
    put_back(&rig.dir, &old);
    assert!(!cinder::verify(&rig.dir, &*rig.key1).unwrap().is_clean());
    assert_rolled_back(Store::open(&rig.dir, rig.real()));
}

/// Rewrites a closed store of this build as format version 3 wrote it, from the spec:
/// the log as version 1 (16-byte header, 72-byte records, unkeyed BLAKE3 chain), the
/// keystore as version 3 (56-byte sealed meta: floors and the log's anchor, no audit
/// key), sealed under a fresh meta key.
fn downgrade_to_v3(dir: &Path, k: &dyn KeyProvider) {
    let log = cinder::key_audit_log(dir, Some(k)).unwrap();
    let mut old_log = v1::encode_header().to_vec();
    let mut head = [0u8; 32];
    // Version 3 wrote no "keystore written" records.
    let kept = log
        .records
        .iter()
        .filter(|r| r.event != AuditEvent::KeystoreWritten);
    for (seq, r) in kept.enumerate() {
        let rec = v1::encode_record(&head, seq as u64, r.time_ms, r.event, r.subject, r.key_id);
        head.copy_from_slice(&rec[40..]);
        old_log.extend_from_slice(&rec);
    }
    let records = ((old_log.len() - v1::HEADER_LEN) / v1::RECORD_LEN) as u64;

    let mut img = KeystoreImage::decode(&std::fs::read(dir.join("KEYS")).unwrap()).unwrap();
    let meta_key = k
        .unwrap(&img.meta_wrapped_key, META_CONTEXT)
        .unwrap()
        .unwrap();
    let plain_len = img.meta_sealed.len() - 16;
    let mut plain = img.meta_sealed[..plain_len].to_vec();
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&img.meta_sealed[plain_len..]);
    assert!(SealKey::new(&meta_key).open([0; 12], &img.meta_aad(), &mut plain, &tag));
    let mut meta = decode_meta(&plain);
    meta.audit = Some((records, head));
    meta.audit_key = None;
    img.version = 3;
    let mut plain = encode_meta(&meta)[..META_PLAIN_LEN_V3].to_vec();
    let meta_key = Dek::generate().unwrap();
    img.meta_wrapped_key = k.wrap(&meta_key, META_CONTEXT).unwrap();
    let tag = SealKey::new(&meta_key).seal([0; 12], &img.meta_aad(), &mut plain);
    img.meta_sealed = [plain, tag.to_vec()].concat();
    std::fs::write(dir.join("KEYS"), img.encode()).unwrap();
    std::fs::write(dir.join("KEYS.audit"), &old_log).unwrap();
    let _ = std::fs::remove_file(dir.join("KEYS.audit.v1"));
    assert_eq!(
        cinder::key_audit_log(dir, Some(k)).unwrap().version,
        1,
        "the rewritten log reads as version 1"
    );
}

/// A store of format version 3 opens: its unkeyed log is checked against the anchor,
/// archived as `KEYS.audit.v1` and continued by a keyed log whose header names the
/// archive's end; the keystore is written as version 4 with the audit key. Nothing is
/// lost, `verify` is clean, and the next open is an ordinary one.
#[test]
fn a_store_of_format_version_3_is_upgraded_to_a_keyed_log() {
    let rig = rig();
    fill(&rig);
    downgrade_to_v3(&rig.dir, &*rig.key1);
    let v1_records = cinder::key_audit_log(&rig.dir, None).unwrap().records.len();
    let s = Store::open(&rig.dir, rig.real()).unwrap();
    assert!(s.recovery_report().audit_log_upgraded);
    assert_eq!(s.len(b"q").unwrap(), 100);
    s.close().unwrap();
    drop(s);
    let archive = v1::decode_log(&std::fs::read(rig.dir.join("KEYS.audit.v1")).unwrap()).unwrap();
    assert_eq!(archive.records.len(), v1_records);
    let log = cinder::key_audit_log(&rig.dir, Some(&*rig.key1)).unwrap();
    assert_eq!((log.version, log.verified), (2, true));
    assert_eq!(log.matches_keystore, Some(true));
    let img = KeystoreImage::decode(&std::fs::read(rig.dir.join("KEYS")).unwrap()).unwrap();
    assert_eq!(img.version, cinder::format::FORMAT_VERSION);
    let v = cinder::verify(&rig.dir, &*rig.key1).unwrap();
    assert!(v.is_clean(), "{v:?}");
    let s = Store::open(&rig.dir, rig.real()).unwrap();
    assert!(!s.recovery_report().audit_log_upgraded);
    assert_eq!(s.len(b"q").unwrap(), 100);
}

/// The upgrade's keystore write fails (the power goes right after): the old log is
/// archived, a keyed log is in place whose key was never persisted, the keystore is
/// still version 3. The next open does the upgrade again from the archive.
#[test]
fn an_upgrade_cut_short_before_its_keystore_write_is_done_again() {
    let rig = rig();
    fill(&rig);
    downgrade_to_v3(&rig.dir, &*rig.key1);
    let fs = Arc::new(FaultFs::new(&rig.dir).unwrap());
    fs.inject(Fault::from_nth(Op::Write, 1, FaultKind::Io).on("KEYS.tmp"));
    assert!(Store::open(&rig.dir, rig.options(Some(fs.clone()), false)).is_err());
    fs.crash_now();
    fs.crash_image().write_to(&rig.dir).unwrap();
    assert!(
        rig.dir.join("KEYS.audit.v1").exists(),
        "archived before the cut"
    );
    // A state a crash leaves is no problem for the offline tools either.
    let v = cinder::verify(&rig.dir, &*rig.key1).unwrap();
    assert!(v.is_clean(), "{v:?}");
    let log = cinder::key_audit_log(&rig.dir, Some(&*rig.key1)).unwrap();
    assert_eq!(log.matches_keystore, None);
    let s = Store::open(&rig.dir, rig.real()).unwrap();
    assert!(s.recovery_report().audit_log_upgraded);
    assert_eq!(s.len(b"q").unwrap(), 100);
    s.close().unwrap();
    assert!(cinder::verify(&rig.dir, &*rig.key1).unwrap().is_clean());
}

/// A copy of the version-3 keystore from before the upgrade, put back after the store
/// has run under the keyed log: the keyed log's macs cannot be checked (the old
/// keystore has no audit key), but its generations show the keystore is behind.
#[test]
fn a_keystore_put_back_to_a_copy_from_before_the_upgrade_is_detected() {
    let rig = rig();
    let ids = fill(&rig);
    downgrade_to_v3(&rig.dir, &*rig.key1);
    let old = snapshot(&rig.dir);
    let s = Store::open(&rig.dir, rig.real()).unwrap();
    ack_first_segment(&s, &ids);
    rig.clock.advance(DEADLINE);
    s.maintain().unwrap();
    s.close().unwrap();
    drop(s);
    put_back(&rig.dir, &old);
    assert_rolled_back(Store::open(&rig.dir, rig.real()));
}
