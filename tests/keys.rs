//! Key management: the key audit log (every key event, hash-chained, anchored in the
//! keystore) and master-key rotation (online, crash-safe, resumable with the previous key,
//! automatic).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cinder::vfs::{Fault, FaultFs, FaultKind, Op};
use cinder::{
    AuditEvent, AutoRotation, CorruptionKind, Error, FileKeyProvider, KeyProvider, ManualClock,
    Options, Store,
};

const HOUR: Duration = Duration::from_secs(3600);

/// Automatic rotation every hour to fresh key files under `dir` (k-0, k-1, ...), and the
/// count of keys it made.
fn hourly_rotation(dir: PathBuf) -> (AutoRotation, Arc<std::sync::atomic::AtomicU64>) {
    let made = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = made.clone();
    let auto = AutoRotation {
        every: HOUR,
        next_key: Arc::new(move || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p: Arc<dyn KeyProvider> =
                Arc::new(FileKeyProvider::create(dir.join(format!("k-{n}")))?);
            Ok(p)
        }),
    };
    (auto, made)
}

fn key(dir: &Path, name: &str) -> Arc<FileKeyProvider> {
    Arc::new(FileKeyProvider::open_or_create(dir.join(name), true).unwrap())
}

fn opts(k: &Arc<FileKeyProvider>) -> Options {
    let mut o = Options::new(k.clone());
    o.segment_size = 64 << 10;
    o.max_message_size = 8 << 10;
    o.max_shred_delay = Duration::from_secs(2);
    o.background_reaper = false;
    o
}

fn events(dir: &Path) -> Vec<AuditEvent> {
    cinder::key_audit_log(dir, None)
        .unwrap()
        .records
        .iter()
        .map(|r| r.event)
        .collect()
}

/// A store with a few segments created, some shredded, and one reopen.
fn busy_store(tmp: &Path, k: &Arc<FileKeyProvider>) -> PathBuf {
    let data = tmp.join("data");
    let s = Store::open(&data, opts(k)).unwrap();
    let mut ids = Vec::new();
    for i in 0..200u32 {
        ids.push(s.append(b"q", &[i as u8; 700], HOUR).unwrap());
    }
    assert_eq!(s.ack_batch(b"q", &ids[..150]).unwrap(), 150);
    s.maintain().unwrap();
    s.close().unwrap();
    Store::open(&data, opts(k)).unwrap().close().unwrap();
    data
}

#[test]
fn the_audit_log_records_every_key_event_and_matches_the_keystore() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let data = busy_store(tmp.path(), &k);
    let ev = events(&data);
    for want in [
        AuditEvent::DekCreated,
        AuditEvent::DekShredded,
        AuditEvent::DekUnwrapped,
    ] {
        assert!(ev.contains(&want), "no {want:?} in {ev:?}");
    }
    let log = cinder::key_audit_log(&data, Some(&*k as &dyn KeyProvider)).unwrap();
    assert_eq!(log.matches_keystore, Some(true));
    // Subjects are segment ids and key ids only; the key id is the master key's.
    assert!(log
        .records
        .iter()
        .filter(|r| r.event == AuditEvent::DekCreated)
        .all(|r| r.key_id == k.kek_id()));
    assert!(cinder::verify(&data, &*k).unwrap().is_clean());
}

const HEADER: usize = cinder::format::audit::HEADER_LEN;
const RECORD: usize = cinder::format::audit::RECORD_LEN;

fn record_range(i: usize) -> std::ops::Range<usize> {
    HEADER + i * RECORD..HEADER + (i + 1) * RECORD
}

fn assert_open_refuses(data: &Path, k: &Arc<FileKeyProvider>, what: &str) {
    match Store::open(data, opts(k)) {
        Err(Error::Corruption { file, kind, .. }) => {
            assert!(
                file.ends_with("KEYS.audit"),
                "{what}: blamed {}",
                file.display()
            );
            assert!(
                matches!(
                    kind,
                    CorruptionKind::AuditChainBroken { .. }
                        | CorruptionKind::AuditLogBehindKeystore { .. }
                ),
                "{what}: {kind:?}"
            );
        }
        other => panic!("{what}: open gave {other:?}"),
    }
    assert!(
        !cinder::verify(data, &**k).unwrap().is_clean(),
        "{what}: verify found nothing"
    );
}

#[test]
fn edits_removals_reordering_and_truncation_of_the_audit_log_are_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let data = busy_store(tmp.path(), &k);
    let path = data.join("KEYS.audit");
    let good = std::fs::read(&path).unwrap();
    let n = (good.len() - HEADER) / RECORD;
    assert!(n >= 6, "only {n} records");
    let rec = |i: usize| good[record_range(i)].to_vec();

    let mut edited = good.clone();
    edited[record_range(2).start + 24] ^= 1; // the subject of record 2
    let mut removed = good[..HEADER].to_vec();
    let mut swapped = good[..HEADER].to_vec();
    for i in 0..n {
        if i != 3 {
            removed.extend(rec(i));
        }
        swapped.extend(rec(match i {
            1 => 2,
            2 => 1,
            i => i,
        }));
    }
    let truncated = good[..record_range(n - 2).start].to_vec();
    for (what, bytes) in [
        ("edit", &edited),
        ("removal", &removed),
        ("reordering", &swapped),
        ("truncation", &truncated),
    ] {
        std::fs::write(&path, bytes).unwrap();
        if what == "truncation" {
            // The chain of what is left is fine; the keystore's anchor shows the loss.
            let log = cinder::key_audit_log(&data, Some(&*k as &dyn KeyProvider)).unwrap();
            assert_eq!(log.matches_keystore, Some(false), "{what}");
        } else {
            // The macs show it, with the master key (which opens the audit key).
            assert!(
                cinder::key_audit_log(&data, Some(&*k as &dyn KeyProvider)).is_err(),
                "{what}: chain still verifies"
            );
            // Without a key the sequence numbers still show a removal or a reordering.
            if what != "edit" {
                assert!(cinder::key_audit_log(&data, None).is_err(), "{what}");
            }
        }
        assert_open_refuses(&data, &k, what);
    }
    std::fs::write(&path, &good).unwrap();
    Store::open(&data, opts(&k)).unwrap().close().unwrap();
}

#[test]
fn a_torn_last_audit_record_is_cut_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let data = busy_store(tmp.path(), &k);
    let path = data.join("KEYS.audit");
    let mut b = std::fs::read(&path).unwrap();
    b.extend_from_slice(&[0xab; 40]);
    std::fs::write(&path, &b).unwrap();
    let s = Store::open(&data, opts(&k)).unwrap();
    assert_eq!(s.recovery_report().audit_torn_tail_cut, 40);
}

#[test]
fn rotation_rewraps_every_key_online_and_the_old_key_no_longer_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(tmp.path(), "k1"), key(tmp.path(), "k2"));
    let data = tmp.path().join("data");
    let s = Store::open(&data, opts(&k1)).unwrap();
    let mut ids = Vec::new();
    for i in 0..120u32 {
        ids.push(s.append(b"q", &i.to_le_bytes(), HOUR).unwrap());
    }
    let r = s.rotate_master_key(k2.clone()).unwrap();
    assert_eq!((r.old_kek_id, r.new_kek_id), (k1.kek_id(), k2.kek_id()));
    assert!(r.rewrapped > 1);
    assert_eq!(s.master_key_id(), k2.kek_id());
    // The store goes on: reads, appends (new segments under the new key), acks.
    assert_eq!(s.read(b"q", None, 1000).unwrap().len(), 120);
    for i in 0..100u32 {
        s.append(b"q", &[i as u8; 900], HOUR).unwrap();
    }
    assert!(s.ack(b"q", ids[0]).unwrap());
    assert!(matches!(
        s.rotate_master_key(k2.clone()),
        Err(Error::InvalidOptions(_))
    ));
    s.close().unwrap();

    match Store::open(&data, opts(&k1)) {
        Err(Error::WrongMasterKey { expected, got }) => {
            assert_eq!((expected, got), (k2.kek_id(), k1.kek_id()));
        }
        other => panic!("old key opened the rotated store: {other:?}"),
    }
    let s = Store::open(&data, opts(&k2)).unwrap();
    assert_eq!(s.len(b"q").unwrap(), 219);
    drop(s);
    let st = cinder::key_status(&data).unwrap();
    assert_eq!(st.rotations, 1);
    assert!(st.master_keys.iter().all(|m| m.kek_id == k2.kek_id()));
    let ev = events(&data);
    assert!(ev.contains(&AuditEvent::MasterKeyRotated));
    assert_eq!(
        ev.iter()
            .filter(|e| **e == AuditEvent::DekRewrapped)
            .count(),
        r.rewrapped
    );
    assert!(cinder::verify(&data, &*k2).unwrap().is_clean());
}

/// The keystore is replaced by one rename: a crash before it leaves the old keystore
/// (and maybe a `KEYS.tmp` under the new key, and audit records of the rotation).
#[test]
fn a_rotation_interrupted_before_its_rename_resumes_with_the_previous_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (k1, k2) = (key(tmp.path(), "k1"), key(tmp.path(), "k2"));
    let data = tmp.path().join("data");
    let s = Store::open(&data, opts(&k1)).unwrap();
    for i in 0..50u32 {
        s.append(b"q", &i.to_le_bytes(), HOUR).unwrap();
    }
    s.close().unwrap();
    drop(s);
    // The state "crashed after writing KEYS.tmp and the audit records, before the rename",
    // made through the I/O seam: the rotation's keystore rename fails, then the power goes.
    let fs = Arc::new(FaultFs::new(&data).unwrap());
    let mut o = opts(&k1);
    o.file_system = fs.clone();
    let s = Store::open(&data, o).unwrap();
    s.flush().unwrap(); // the key worker's own keystore writes (a spare) are done
                        // During a rotation the only rename under a `KEYS` name is the keystore's.
    fs.inject(Fault::nth(Op::Rename, 1, FaultKind::Io).on("KEYS"));
    assert!(s.rotate_master_key(k2.clone()).is_err());
    fs.crash_now();
    drop(s);
    fs.crash_image().write_to(&data).unwrap();
    let rotated = cinder::key_audit_log(&data, None).unwrap().records;
    assert!(
        rotated
            .iter()
            .any(|r| r.event == AuditEvent::MasterKeyRotated),
        "the rotation's records reached the log before the cut"
    );

    // With the new key alone: a clear error naming the key the keystore expects.
    match Store::open(&data, opts(&k2)) {
        Err(Error::WrongMasterKey { expected, .. }) => assert_eq!(expected, k1.kek_id()),
        other => panic!("{other:?}"),
    }
    // With the old key: opens (the rotation never happened).
    Store::open(&data, opts(&k1)).unwrap().close().unwrap();
    // With the new key and the old one as previous: opens and finishes the rotation.
    let mut o = opts(&k2);
    o.previous_key_provider = Some(k1.clone());
    let s = Store::open(&data, o).unwrap();
    assert_eq!(
        s.recovery_report().master_key_rotated,
        Some((k1.kek_id(), k2.kek_id()))
    );
    assert_eq!(s.len(b"q").unwrap(), 50);
    drop(s);
    Store::open(&data, opts(&k2)).unwrap().close().unwrap();
    assert!(cinder::verify(&data, &*k2).unwrap().is_clean());
}

#[test]
fn automatic_rotation_follows_its_interval_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let k1 = key(tmp.path(), "k1");
    let data = tmp.path().join("data");
    let clock = ManualClock::new(1_000_000);
    let keys_dir = tmp.path().join("rotated");
    let (auto, made) = hourly_rotation(keys_dir.clone());
    let mut o = opts(&k1);
    o.clock = clock.clone();
    o.auto_rotation = Some(auto.clone());
    let s = Store::open(&data, o).unwrap();
    s.append(b"q", b"m", HOUR * 100).unwrap();
    s.maintain().unwrap();
    assert_eq!(s.master_key_id(), k1.kek_id(), "rotated before its time");
    clock.advance(HOUR + Duration::from_secs(1));
    s.maintain().unwrap();
    let k_0 = FileKeyProvider::open(keys_dir.join("k-0")).unwrap();
    assert_eq!(s.master_key_id(), k_0.kek_id());
    s.close().unwrap();
    drop(s);
    // Reopened half an interval later: not due yet (the last rotation is in the log).
    clock.advance(HOUR / 2);
    let mut o = opts(&k1);
    o.key_provider = Arc::new(k_0);
    o.clock = clock.clone();
    o.auto_rotation = Some(auto);
    let s = Store::open(&data, o).unwrap();
    s.maintain().unwrap();
    assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1);
    clock.advance(HOUR);
    s.maintain().unwrap();
    assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(s.read(b"q", None, 10).unwrap().len(), 1);
}

// ----- SIGKILL during rotations under load -----

/// Child: one thread appends (printing `@@A id` after each append returned), another
/// rotates back and forth between two keys (printing `@@R kek` after each rotation).
#[test]
fn child_rotator() {
    let Ok(spec) = std::env::var("CINDER_ROTATE_CHILD") else {
        return;
    };
    let (dir, ka, kb) = {
        let p: Vec<&str> = spec.split('|').collect();
        (
            PathBuf::from(p[0]),
            PathBuf::from(p[1]),
            PathBuf::from(p[2]),
        )
    };
    let a: Arc<dyn KeyProvider> = Arc::new(FileKeyProvider::open(&ka).unwrap());
    let b: Arc<dyn KeyProvider> = Arc::new(FileKeyProvider::open(&kb).unwrap());
    // Opening leaves the keystore under `a`; rotate to `b`, back to `a`, and so on.
    let store = Arc::new(open_either(&dir, &a, &b));
    let mut next = false;
    let appender = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || loop {
            let id = store.append(b"q", &[5u8; 3000], HOUR).unwrap();
            println!("@@A {}", id.0);
        })
    };
    loop {
        let k = if next { &a } else { &b };
        store.rotate_master_key(Arc::clone(k)).unwrap();
        println!("@@R {:016x}", k.kek_id());
        next = !next;
        std::thread::sleep(Duration::from_millis(2));
        assert!(!appender.is_finished(), "appender died");
    }
}

/// Opens with `a`, `b` given as previous: works whether the keystore is under `a` or
/// under `b` (then the open finishes the rotation to `a`).
fn open_either(dir: &Path, a: &Arc<dyn KeyProvider>, b: &Arc<dyn KeyProvider>) -> Store {
    let mut o = Options::new(Arc::clone(a));
    o.segment_size = 256 << 10;
    o.max_message_size = 8 << 10;
    o.previous_key_provider = Some(Arc::clone(b));
    Store::open(dir, o).expect("open with a (b as previous)")
}

#[test]
fn sigkill_during_rotations_under_load_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (ka, kb) = (tmp.path().join("ka"), tmp.path().join("kb"));
    let a: Arc<dyn KeyProvider> = Arc::new(FileKeyProvider::create(&ka).unwrap());
    let b: Arc<dyn KeyProvider> = Arc::new(FileKeyProvider::create(&kb).unwrap());
    let dir = tmp.path().join("data");
    let mut appended: Vec<u64> = Vec::new();
    let mut rotations = 0;
    for cycle in 0..8u64 {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([
                "child_rotator",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "CINDER_ROTATE_CHILD",
                format!("{}|{}|{}", dir.display(), ka.display(), kb.display()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(150 + (cycle * 37) % 200));
        child.kill().unwrap();
        assert!(!child.wait().unwrap().success());
        for l in reader.join().unwrap() {
            if let Some(id) = l.strip_prefix("@@A ") {
                appended.push(id.parse().unwrap());
            } else if l.starts_with("@@R ") {
                rotations += 1;
            }
        }
        // Opens (under either key, finishing an interrupted rotation), nothing lost,
        // and the audit log still checks against the keystore.
        let s = open_either(&dir, &a, &b);
        let have: std::collections::HashSet<u64> = s
            .read(b"q", None, usize::MAX)
            .unwrap()
            .iter()
            .map(|m| m.id.0)
            .collect();
        for id in &appended {
            assert!(have.contains(id), "cycle {cycle}: append {id} lost");
        }
        assert_eq!(s.master_key_id(), a.kek_id());
        drop(s);
        let log = cinder::key_audit_log(&dir, Some(&*a)).unwrap();
        assert_eq!(log.matches_keystore, Some(true), "cycle {cycle}");
    }
    assert!(rotations > 8, "only {rotations} rotations ran");
}

// ----- master-key backup -----

#[test]
fn a_restored_key_backup_opens_the_store_and_a_wrong_passphrase_is_a_clear_error() {
    use cinder::keys::backup::BackupParams;
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let data = busy_store(tmp.path(), &k);
    let fast = BackupParams {
        memory_kib: 8 << 10,
        passes: 1,
        lanes: 1,
    };
    let backup = k.export_backup(b"a long enough passphrase", fast).unwrap();
    assert_eq!(backup.len(), 96);
    // The backup holds no copy of the key in the clear.
    let raw = std::fs::read(tmp.path().join("k1")).unwrap();
    assert!(!backup.windows(8).any(|w| raw.windows(8).any(|r| r == w)));
    let restored_path = tmp.path().join("restored");
    assert!(matches!(
        FileKeyProvider::import_backup(&backup, b"a long enough passphrasE", &restored_path),
        Err(Error::WrongPassphrase)
    ));
    assert!(!restored_path.exists());
    let restored = Arc::new(
        FileKeyProvider::import_backup(&backup, b"a long enough passphrase", &restored_path)
            .unwrap(),
    );
    assert_eq!(restored.kek_id(), k.kek_id());
    drop(k);
    std::fs::remove_file(tmp.path().join("k1")).unwrap();
    let s = Store::open(&data, opts(&restored)).unwrap();
    // The 150 acked messages stay gone: their segments' keys were shredded, and the
    // backup holds only the master key.
    assert_eq!(s.len(b"q").unwrap(), 50);
}

// ----- key memory -----

/// A limit from /proc/self/limits ("Max locked memory", ...): (soft, hard) in bytes or
/// `u64::MAX` for unlimited.
fn proc_limit(name: &str) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let mut v = line[name.len()..].split_whitespace().map(|x| {
        if x == "unlimited" {
            u64::MAX
        } else {
            x.parse().unwrap_or(0)
        }
    });
    Some((v.next()?, v.next()?))
}

#[test]
fn key_memory_is_locked_and_left_out_of_core_dumps() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let data = busy_store(tmp.path(), &k);
    // While a store is open, its master key and every live data key sit in locked slots
    // (other tests in this binary may hold more, never fewer of these).
    let s = Store::open(&data, opts(&k)).unwrap();
    s.append(b"q", b"one more segment's key", HOUR).unwrap();
    let live_keys = s.stats().live_keys;
    assert!(live_keys >= 2, "{live_keys}");
    let st = cinder::crypto::locked::status();
    assert!(
        st.slots_in_use > live_keys as usize, // the data keys and the master key
        "{live_keys} keys: {st:?}"
    );
    assert!(st.excluded_from_core_dumps, "{st:?}");
    // mlock works whenever the memlock limit leaves room for the key arena.
    if proc_limit("Max locked memory").is_some_and(|(soft, _)| soft >= st.bytes_reserved as u64 * 2)
    {
        assert!(st.locked, "{st:?}");
    }
}

#[test]
fn child_core_dumps_disabled() {
    if std::env::var("CINDER_COREDUMP_CHILD").is_err() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let mut o = opts(&k);
    o.core_dumps = cinder::CoreDumps::Disable;
    let _s = Store::open(tmp.path().join("data"), o).unwrap();
    let (soft, hard) = proc_limit("Max core file size").unwrap();
    println!("@@CORE {soft} {hard}");
}

#[test]
fn core_dumps_can_be_disabled_for_the_process() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child_core_dumps_disabled", "--exact", "--nocapture"])
        .env("CINDER_COREDUMP_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("@@CORE 0 0"), "{stdout}");
}

#[test]
fn damage_past_what_the_keystore_vouches_for_is_cut_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let data = busy_store(tmp.path(), &k);
    let path = data.join("KEYS.audit");
    let good = std::fs::read(&path).unwrap();
    // Two whole records of garbage after the anchored ones: an append whose pages landed
    // out of order before a power loss.
    let mut b = good.clone();
    b.extend_from_slice(&[0x5a; 144]);
    std::fs::write(&path, &b).unwrap();
    let s = Store::open(&data, opts(&k)).unwrap();
    assert_eq!(s.recovery_report().audit_torn_tail_cut, 144);
    drop(s);
    let log = cinder::key_audit_log(&data, Some(&*k as &dyn KeyProvider)).unwrap();
    assert_eq!(log.matches_keystore, Some(true));
    // Strict refuses the same damage.
    let mut b = std::fs::read(&path).unwrap();
    b.extend_from_slice(&[0x5a; 72]);
    std::fs::write(&path, &b).unwrap();
    let mut o = opts(&k);
    o.recovery = cinder::RecoveryMode::Strict;
    assert!(Store::open(&data, o).is_err());
}

#[test]
fn a_failing_automatic_rotation_does_not_hold_up_shredding() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key(tmp.path(), "k1");
    let clock = ManualClock::new(1_000_000);
    let mut o = opts(&k);
    o.clock = clock.clone();
    o.auto_rotation = Some(AutoRotation {
        every: HOUR,
        next_key: Arc::new(|| Err(Error::KeyProvider("the key service is down".into()))),
    });
    let s = Store::open(tmp.path().join("data"), o).unwrap();
    let mut ids = Vec::new();
    for i in 0..200u32 {
        ids.push(s.append(b"q", &[i as u8; 700], HOUR).unwrap());
    }
    s.ack_batch(b"q", &ids).unwrap();
    clock.advance(HOUR * 2);
    let err = s.maintain().unwrap_err();
    assert!(err.to_string().contains("key service"), "{err}");
    assert!(s.stats().shreds > 0, "rotation failure stopped shredding");
}

/// A master-key rotation record dated far in the future, appended to the key audit log
/// by someone who can write the data dir but cannot read the keystore (so not the audit
/// key: the record is chained under a key of their own), must not put automatic
/// rotation off. Before the chain was keyed, such a record past the anchor was taken as
/// genuine (then anchored by the next keystore write) and the store waited 100 days for
/// its next rotation; now it does not verify: cut at open, refused in strict mode.
#[test]
fn a_rotation_record_from_the_future_does_not_suppress_automatic_rotation() {
    use cinder::format::audit::{decode_log, encode_record, RecordFields};
    let tmp = tempfile::tempdir().unwrap();
    let k1 = key(tmp.path(), "k1");
    let data = tmp.path().join("data");
    let clock = ManualClock::new(1_000_000);
    let (auto, made) = hourly_rotation(tmp.path().join("rotated"));
    let mut o = opts(&k1);
    o.clock = clock.clone();
    o.auto_rotation = Some(auto.clone());
    let s = Store::open(&data, o).unwrap();
    s.append(b"q", b"m", HOUR * 100).unwrap();
    s.close().unwrap();
    drop(s);
    let log_path = data.join("KEYS.audit");
    let mut bytes = std::fs::read(&log_path).unwrap();
    let log = decode_log(&bytes, None).unwrap();
    let last = log.records.last().unwrap();
    let future = cinder::Clock::now_ms(&*clock) + 100 * 24 * 3_600_000;
    let forged = RecordFields {
        seq: log.records.len() as u64,
        time_ms: future,
        event: AuditEvent::MasterKeyRotated,
        subject: k1.kek_id(),
        key_id: k1.kek_id(),
        generation: last.generation + 1,
    };
    bytes.extend_from_slice(&encode_record(&[0x42; 32], &last.hash, &forged));
    std::fs::write(&log_path, &bytes).unwrap();
    // Strict mode refuses a record past the anchor that does not verify.
    let mut o = opts(&k1);
    o.clock = clock.clone();
    o.recovery = cinder::RecoveryMode::Strict;
    match Store::open(&data, o) {
        Err(Error::Corruption {
            kind: CorruptionKind::AuditChainBroken { seq },
            ..
        }) => assert_eq!(seq, forged.seq),
        other => panic!("strict open took the forged record: {other:?}"),
    }
    let mut o = opts(&k1);
    o.clock = clock.clone();
    o.auto_rotation = Some(auto);
    let s = Store::open(&data, o).unwrap();
    assert_eq!(
        s.recovery_report().audit_torn_tail_cut,
        RECORD,
        "cut at open"
    );
    clock.advance(HOUR + Duration::from_secs(1));
    s.maintain().unwrap();
    assert_eq!(
        made.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the forged future rotation record put automatic rotation off"
    );
}
