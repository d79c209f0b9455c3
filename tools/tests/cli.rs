//! The `cinder` binary on real stores: exit codes 0 / 1 / 2, and for every kind of damage
//! the reported file and byte offset.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cinder::format::frame::FrameHeader;
use cinder::format::segment_header::HEADER_LEN;
use cinder::{Durability, FileKeyProvider, KeyProvider, Options, Store};
use serde_json::Value;

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
}

fn opts(key: &Path) -> Options {
    let mut o = Options::new(Arc::new(FileKeyProvider::open(key).unwrap()));
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.durability = Durability::Sync;
    o
}

impl Fixture {
    /// A closed store with several sealed segments, some acked messages.
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key");
        FileKeyProvider::create(&key).unwrap();
        let dir = tmp.path().join("data");
        let store = Store::open(&dir, opts(&key)).unwrap();
        for i in 0..120u32 {
            let q = format!("recipient-{}", i % 3);
            let id = store
                .append(q.as_bytes(), &vec![i as u8; 1500], Duration::from_hours(1))
                .unwrap();
            if i % 4 == 0 {
                store.ack(q.as_bytes(), id).unwrap();
            }
        }
        store.close().unwrap();
        Fixture {
            _tmp: tmp,
            dir,
            key,
        }
    }

    fn segments(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    /// The first segment holding message frames, and the offsets of its frames.
    fn message_segment(&self) -> (PathBuf, Vec<(usize, FrameHeader)>) {
        for p in self.segments() {
            let b = fs::read(&p).unwrap();
            let mut pos = HEADER_LEN;
            let mut frames = Vec::new();
            while pos < b.len() {
                let h = FrameHeader::decode(&b[pos..]).unwrap();
                frames.push((pos, h));
                pos += h.frame_len();
            }
            if frames
                .iter()
                .filter(|f| f.1.kind == cinder::format::frame::FrameKind::Message)
                .count()
                > 5
            {
                return (p, frames);
            }
        }
        panic!("no message segment");
    }

    fn verify_json(&self) -> (i32, Value) {
        let (code, out, err) = run(&[
            "verify",
            self.dir.to_str().unwrap(),
            "--key-file",
            self.key.to_str().unwrap(),
            "--json",
        ]);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out} {err}"));
        (code, v)
    }
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cinder"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts verify exits 1 with a problem naming `file` at `offset` whose text contains `what`.
fn expect_problem(f: &Fixture, file: &Path, offset: Option<u64>, what: &str) {
    let (code, v) = f.verify_json();
    assert_eq!(code, 1, "{v:#}");
    let problems = v["problems"].as_array().unwrap();
    let hit = problems.iter().any(|p| {
        Path::new(p["file"].as_str().unwrap()).file_name() == file.file_name()
            && (offset.is_none() || p["offset"].as_u64() == offset)
            && p["what"].as_str().unwrap().contains(what)
    });
    assert!(
        hit,
        "no problem at {} offset {offset:?} with {what:?}: {v:#}",
        file.display()
    );
}

fn patch(path: &Path, at: usize, f: impl FnOnce(&mut u8)) {
    let mut b = fs::read(path).unwrap();
    f(&mut b[at]);
    fs::write(path, b).unwrap();
}

#[test]
fn clean_store_is_ok_and_text_output_is_one_line_per_problem() {
    let f = Fixture::new();
    let (code, v) = f.verify_json();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], Value::Bool(true));
    assert_eq!(v["messages"].as_u64(), Some(120));
    let (code, out, _) = run(&["inspect", f.dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("sealed"), "{out}");
}

#[test]
fn inspect_without_key_shows_only_plaintext_and_queue_ids_only_when_asked() {
    let f = Fixture::new();
    let d = f.dir.to_str().unwrap();
    let k = f.key.to_str().unwrap();
    let (_, plain, _) = run(&["inspect", d, "--json"]);
    let v: Value = serde_json::from_str(&plain).unwrap();
    assert!(v["queues"].is_null() && v["live_messages"].is_null());
    assert!(!plain.contains("recipient-"));
    let (code, keyed, _) = run(&["inspect", d, "--key-file", k, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&keyed).unwrap();
    assert_eq!(v["live_messages"].as_u64(), Some(90));
    assert_eq!(v["queues"]["queues"].as_u64(), Some(3));
    assert_eq!(v["dead_but_openable"].as_u64(), Some(30));
    assert!(v["oldest_live_age_ms"].as_u64().is_some());
    assert!(
        !keyed.contains("recipient-"),
        "queue ids printed without --show-queues"
    );
    let (_, shown, _) = run(&["inspect", d, "--key-file", k, "--show-queues"]);
    assert!(shown.contains("recipient-1"), "{shown}");
}

#[test]
fn flipped_payload_byte_is_a_checksum_problem_at_the_frame() {
    let f = Fixture::new();
    let (seg, frames) = f.message_segment();
    let (off, h) = frames[2];
    patch(&seg, off + h.body_range().start + 5, |b| *b ^= 0x01);
    expect_problem(&f, &seg, Some(off as u64), "checksum mismatch");
}

#[test]
fn flipped_checksum_byte_is_reported_at_the_frame() {
    let f = Fixture::new();
    let (seg, frames) = f.message_segment();
    let (off, _) = frames[3];
    patch(&seg, off, |b| *b ^= 0x80);
    expect_problem(&f, &seg, Some(off as u64), "checksum mismatch");
}

#[test]
fn flipped_header_byte_is_reported_at_the_header_checksum() {
    let f = Fixture::new();
    let (seg, _) = f.message_segment();
    patch(&seg, 20, |b| *b ^= 0x01);
    expect_problem(&f, &seg, Some(60), "checksum mismatch");
}

#[test]
fn tampered_body_with_fixed_checksum_fails_authentication() {
    let f = Fixture::new();
    let (seg, frames) = f.message_segment();
    let (off, h) = frames[1];
    let mut b = fs::read(&seg).unwrap();
    b[off + h.body_range().start] ^= 0x01;
    let crc = crc32fast::hash(&b[off + 4..off + h.frame_len()]);
    b[off..off + 4].copy_from_slice(&crc.to_le_bytes());
    fs::write(&seg, b).unwrap();
    expect_problem(
        &f,
        &seg,
        Some((off + h.body_range().start) as u64),
        "authentication failed",
    );
}

#[test]
fn truncation_mid_frame_is_reported() {
    let f = Fixture::new();
    let (seg, frames) = f.message_segment();
    let (off, _) = frames[4];
    let b = fs::read(&seg).unwrap();
    fs::write(&seg, &b[..off + 10]).unwrap();
    expect_problem(&f, &seg, Some((off + 10) as u64), "sealed at");
    expect_problem(&f, &seg, Some(off as u64), "truncated");
}

#[test]
fn removed_keystore_is_reported() {
    let f = Fixture::new();
    fs::remove_file(f.dir.join("KEYS")).unwrap();
    expect_problem(&f, &f.dir.join("KEYS"), Some(0), "keystore missing");
}

#[test]
fn keystore_from_an_older_generation_is_reported() {
    let f = Fixture::new();
    let old = fs::read(f.dir.join("KEYS")).unwrap();
    // More sessions: new segments and keys the old keystore does not know.
    let store = Store::open(&f.dir, opts(&f.key)).unwrap();
    store
        .append(b"later", b"x", Duration::from_mins(1))
        .unwrap();
    store.close().unwrap();
    drop(store);
    let newest = f.segments().pop().unwrap();
    fs::write(f.dir.join("KEYS"), old).unwrap();
    expect_problem(&f, &newest, None, "newer than the keystore");
}

#[test]
fn segment_copied_under_another_name_is_an_id_mismatch() {
    let f = Fixture::new();
    let segs = f.segments();
    fs::copy(&segs[0], &segs[1]).unwrap();
    expect_problem(&f, &segs[1], Some(16), "segment id mismatch");
}

#[test]
fn stray_file_is_reported() {
    let f = Fixture::new();
    let stray = f.dir.join("notes.txt");
    fs::write(&stray, b"hello").unwrap();
    expect_problem(&f, &stray, None, "unknown file");
}

#[test]
fn missing_segment_file_leaves_an_orphan_key() {
    let f = Fixture::new();
    let segs = f.segments();
    fs::remove_file(&segs[0]).unwrap();
    expect_problem(&f, &f.dir.join("KEYS"), None, "orphan key");
}

#[test]
fn flipped_keystore_byte_is_reported_in_the_keystore() {
    let f = Fixture::new();
    patch(&f.dir.join("KEYS"), 50, |b| *b ^= 0x04);
    expect_problem(&f, &f.dir.join("KEYS"), None, "checksum mismatch");
}

#[test]
fn wrong_key_missing_dir_and_bad_usage_exit_2() {
    let f = Fixture::new();
    let other = f.dir.parent().unwrap().join("other-key");
    FileKeyProvider::create(&other).unwrap();
    let d = f.dir.to_str().unwrap();
    let (code, _, err) = run(&["verify", d, "--key-file", other.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("wrong master key"), "{err}");
    let (code, _, err) = run(&[
        "verify",
        "/nonexistent/cinder",
        "--key-file",
        f.key.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(&["verify", d]);
    assert_eq!(code, 2, "missing --key-file is a usage error");
    let (code, _, _) = run(&["frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn a_store_open_elsewhere_is_in_flight_not_corrupt_and_is_not_modified() {
    let f = Fixture::new();
    let mut o = opts(&f.key);
    // No reaper or compactor: the files may change only if verify or inspect changed them.
    o.background_reaper = false;
    let store = Store::open(&f.dir, o).unwrap();
    for i in 0..50u32 {
        store
            .append(b"live", &i.to_le_bytes(), Duration::from_mins(1))
            .unwrap();
    }
    let before: Vec<(PathBuf, Vec<u8>)> = f
        .segments()
        .into_iter()
        .map(|p| (p.clone(), fs::read(&p).unwrap()))
        .collect();
    let (code, v) = f.verify_json();
    assert_eq!(code, 0, "{v:#}");
    assert!(
        !v["notes"].as_array().unwrap().is_empty(),
        "active segments should be noted as in flight: {v:#}"
    );
    let (code, _, _) = run(&[
        "inspect",
        f.dir.to_str().unwrap(),
        "--key-file",
        f.key.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    for (p, b) in before {
        assert_eq!(fs::read(&p).unwrap(), b, "{} changed", p.display());
    }
    assert_eq!(store.read(b"live", None, 100).unwrap().len(), 50);
}

#[test]
fn keys_status_rotate_and_audit() {
    let f = Fixture::new();
    let dir = f.dir.to_str().unwrap();
    let old_id = FileKeyProvider::open(&f.key).unwrap().kek_id();
    let (code, out, _) = run(&["keys", "status", dir, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["master_keys"][0]["kek_id"], format!("{old_id:016x}"));
    assert_eq!(v["master_keys"][0]["provider"], "file");
    assert_eq!(v["rotations"], 0);
    // No secret material: the status names ids and counts only.
    let key_bytes = fs::read(&f.key).unwrap();
    let key_hex: String = key_bytes.iter().fold(String::new(), |mut s, b| {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    });
    assert!(!out.contains(&key_hex[..16]));

    let new_key = f.key.with_file_name("new-key");
    let new = new_key.to_str().unwrap();
    let k = f.key.to_str().unwrap();
    let rotate = |extra: &[&str]| {
        let mut a = vec![
            "keys",
            "rotate",
            dir,
            "--key-file",
            k,
            "--new-key-file",
            new,
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    let (code, _, err) = rotate(&[]);
    assert_eq!(code, 2, "rotated to a key file that does not exist: {err}");
    let (code, out, err) = rotate(&["--create"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("re-wrapped"), "{out}");
    let new_id = FileKeyProvider::open(&new_key).unwrap().kek_id();
    let (_, out, _) = run(&["keys", "status", dir, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rotations"], 1);
    assert_eq!(v["master_keys"][0]["kek_id"], format!("{new_id:016x}"));
    // The old key no longer opens it; verify with the new one is clean.
    let (code, _, _) = run(&["verify", dir, "--key-file", k]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&["verify", dir, "--key-file", new]);
    assert_eq!(code, 0);

    let (code, out, _) = run(&["keys", "audit", dir, "--key-file", new, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["matches_keystore"], true);
    let events: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert!(events.contains(&"master-key-rotated"), "{events:?}");
    assert!(events.contains(&"dek-rewrapped"), "{events:?}");

    assert_eq!(v["verified"], true);
    // An edited record (the key id of record 1): with the master key, `keys audit` and
    // `verify` both say where; without it the macs cannot be checked, and it says so.
    let log = f.dir.join("KEYS.audit");
    let mut b = fs::read(&log).unwrap();
    let (header, record) = (
        cinder::format::audit::HEADER_LEN,
        cinder::format::audit::RECORD_LEN,
    );
    b[header + record + 34] ^= 1;
    fs::write(&log, &b).unwrap();
    let (code, out, _) = run(&["keys", "audit", dir]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("macs not checked"), "{out}");
    let (code, _, err) = run(&["keys", "audit", dir, "--key-file", new]);
    assert_eq!(code, 1);
    assert!(
        err.contains("KEYS.audit") && err.contains("chain broken"),
        "{err}"
    );
    let (code, out, _) = run(&["verify", dir, "--key-file", new]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("KEYS.audit"), "{out}");
}

#[test]
fn keys_export_and_import_round_trip() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let tmp = f.key.parent().unwrap();
    let pass = tmp.join("pass");
    fs::write(&pass, "a long enough passphrase\n").unwrap();
    let backup = tmp.join("backup");
    let args = |p: &Path| {
        vec![
            "keys".to_string(),
            "export".into(),
            "--key-file".into(),
            f.key.display().to_string(),
            "--passphrase-file".into(),
            p.display().to_string(),
            "--out".into(),
            backup.display().to_string(),
        ]
    };
    let run_s = |a: &[String]| run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    fs::set_permissions(&pass, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run_s(&args(&pass));
    assert_eq!(code, 2, "a world-readable passphrase file was used: {err}");
    fs::set_permissions(&pass, fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = run_s(&args(&pass));
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("a long enough"),
        "the passphrase was echoed: {out}"
    );
    assert_eq!(
        fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Never overwritten.
    assert_eq!(run_s(&args(&pass)).0, 2);

    let restored = tmp.join("restored.key");
    let import = |p: &Path| {
        run(&[
            "keys",
            "import",
            "--backup",
            backup.to_str().unwrap(),
            "--passphrase-file",
            p.to_str().unwrap(),
            "--key-file",
            restored.to_str().unwrap(),
        ])
    };
    let wrong = tmp.join("wrong");
    fs::write(&wrong, "another long passphrase").unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = import(&wrong);
    assert_eq!(code, 2);
    assert!(err.contains("passphrase"), "{err}");
    let (code, _, err) = import(&pass);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read(&restored).unwrap(), fs::read(&f.key).unwrap());
    let (code, _, _) = run(&[
        "verify",
        f.dir.to_str().unwrap(),
        "--key-file",
        restored.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
}
