//! Master keys of the relay: a key directory whose keys rotate online
//! (`--key-dir`, `--rotate-master-every`), the replaced keys destroyed while the data
//! stays readable, across a restart; the flags refused in combinations that cannot
//! work; and a PKCS#11 token (SoftHSM2) through `--pkcs11-*` (a SKIP line without it).

// Tests name the relay r, the client c, a queue q and its token t.
#![allow(clippy::many_single_char_names)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn key_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("master-"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_directory_rotates_online_and_destroys_the_replaced_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let keys_arg = keys.to_str().unwrap().to_string();
    let flags: Vec<&str> = [
        NO_LIMITS,
        &["--key-dir", &keys_arg, "--rotate-master-every", "3s"],
    ]
    .concat();
    let mut r = Relay::start(dir.path(), &flags);
    assert!(
        r.stdout_lines.iter().any(|l| l.contains("key directory")),
        "{:?}",
        r.stdout_lines
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(send_ok(&c, &r, &q, format!("before {i}").as_bytes()).await);
    }
    // Two rotations, each replaced key destroyed: one key file left, the current one.
    let data = dir.path().join("data");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = cinder::key_status(&data).unwrap();
        let files = key_files(&keys);
        if st.rotations >= 2 && files.len() == 1 {
            let current = st.master_keys.iter().find(|m| m.current).unwrap().kek_id;
            let k = cinder::FileKeyProvider::open(keys.join(&files[0])).unwrap();
            assert_eq!(cinder::KeyProvider::kek_id(&k), current);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotations {}, key files {files:?}",
            st.rotations
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sent.push(send_ok(&c, &r, &q, b"after the rotations").await);
    let ids: Vec<String> = read_all(&c, &r, &q, &t)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(ids, sent);
    let log = r.stderr();
    assert!(log.contains("destroyed master key"), "{log}");
    // A restart opens with what is left in the directory.
    let st = r.signal_and_wait("TERM", Duration::from_secs(15));
    assert!(st.success(), "{st:?}: {}", r.stderr());
    let r = Relay::start(dir.path(), &flags);
    let got: Vec<String> = read_all(&c, &r, &q, &t)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(got, sent);
}

#[test]
fn key_flags_that_cannot_work_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(d.join("data"))
            .arg("--accounts")
            .arg(d.join("accounts"))
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        // Rotation needs somewhere to make new keys.
        &["--rotate-master-every", "7d"][..],
        &["--key-file", "k", "--key-dir", "kd"],
        &["--pkcs11-module", "/nonexistent.so"],
        &[
            "--key-dir",
            "kd",
            "--pkcs11-module",
            "/x.so",
            "--pkcs11-token-label",
            "t",
            "--pkcs11-pin-file",
            "p",
        ],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} was accepted");
    }
    // A key directory inside the data dir is refused before anything is made.
    let data = d.join("data2");
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .arg("--accounts")
        .arg(d.join("accounts2"))
        .arg("--key-dir")
        .arg(data.join("keys"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!data.join("keys").exists(), "a key directory was made");
}

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pkcs11_token_holds_the_keys() {
    if !Path::new(MODULE).exists() {
        eprintln!(
            "SKIP: the PKCS#11 relay test needs SoftHSM2 ({MODULE}; apt-get install softhsm2)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    // The relay (a child) inherits it; only this test in this binary uses SoftHSM.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let init = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "relay",
            "--pin",
            "1234-pin",
            "--so-pin",
            "so-pin-99",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "1234-pin\n").unwrap();
    std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let pin_arg = pin.to_str().unwrap().to_string();
    let flags: Vec<&str> = [
        NO_LIMITS,
        &[
            "--pkcs11-module",
            MODULE,
            "--pkcs11-token-label",
            "relay",
            "--pkcs11-pin-file",
            &pin_arg,
        ],
    ]
    .concat();
    let mut r = Relay::start(dir.path(), &flags);
    assert!(
        r.stdout_lines.iter().any(|l| l.contains("PKCS#11 token")),
        "{:?}",
        r.stdout_lines
    );
    assert!(
        !dir.path().join("master.key").exists(),
        "a key file was made"
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let id = send_ok(&c, &r, &q, b"wrapped in the token").await;
    let st = r.signal_and_wait("TERM", Duration::from_secs(15));
    assert!(st.success(), "{}", r.stderr());
    let status = cinder::key_status(&dir.path().join("data")).unwrap();
    assert!(
        status.master_keys.iter().any(|m| m.provider == "pkcs11"),
        "{status:?}"
    );
    let r = Relay::start(dir.path(), &flags);
    let got = read_all(&c, &r, &q, &t).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, id);
    assert_eq!(got[0].1, b"wrapped in the token");
}
