//! Quotas and rate limits: 429 / 507, and the messages stored before are intact.

// Tests name the relay r, the client c, a queue q and its token t.
#![allow(clippy::many_single_char_names)]

mod common;

use common::*;

/// Sends `payload` until a non-201; returns the accepted ids and the refusing status.
async fn fill(
    c: &reqwest::Client,
    r: &Relay,
    q: &str,
    payload: &[u8],
    max: usize,
) -> (Vec<String>, u16) {
    let mut ids = Vec::new();
    for _ in 0..max {
        let (s, v) = send(c, r, q, payload, None).await;
        if s != 201 {
            assert!(v["error"].is_string(), "{v}");
            return (ids, s);
        }
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    panic!("no refusal after {max} sends");
}

async fn assert_intact(
    c: &reqwest::Client,
    r: &Relay,
    q: &str,
    t: &str,
    ids: &[String],
    payload: &[u8],
) {
    let got = read_all(c, r, q, t).await;
    let got_ids: Vec<String> = got.iter().map(|m| m.0.clone()).collect();
    assert_eq!(got_ids, ids);
    assert!(got.iter().all(|m| m.1 == payload));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_message_quota_is_429_and_frees_on_ack() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--queue-quota-messages", "5"]].concat(),
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let (other, _) = account(&c, &r).await;
    let (ids, status) = fill(&c, &r, &q, b"quota", 100).await;
    assert_eq!((ids.len(), status), (5, 429));
    assert_intact(&c, &r, &q, &t, &ids, b"quota").await;
    // Other queues are not affected; an ack makes room.
    send_ok(&c, &r, &other, b"fine").await;
    let resp = c
        .delete(r.url(&format!("/v1/queues/{q}/messages/{}", ids[0])))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    send_ok(&c, &r, &q, b"quota").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_byte_quota_is_429() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--queue-quota-bytes", "8KiB"]].concat(),
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let payload = vec![0xabu8; 1000];
    let (ids, status) = fill(&c, &r, &q, &payload, 100).await;
    assert_eq!(status, 429);
    assert!((6..=8).contains(&ids.len()), "{} accepted", ids.len());
    assert_intact(&c, &r, &q, &t, &ids, &payload).await;
    // A smaller message may still fit; a big one never does.
    let (s, _) = send(&c, &r, &q, &[1u8; 4000], None).await;
    assert_eq!(s, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_quota_is_507() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[
            NO_LIMITS,
            &[
                "--disk-quota-bytes",
                "1MiB",
                "--segment-size",
                "64KiB",
                "--max-message-bytes",
                "16KiB",
            ],
        ]
        .concat(),
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let payload = vec![0x5au8; 16 << 10];
    let (ids, status) = fill(&c, &r, &q, &payload, 100).await;
    assert_eq!(status, 507);
    assert!(ids.len() >= 8, "only {} accepted", ids.len());
    assert_intact(&c, &r, &q, &t, &ids, &payload).await;
    let m = c
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("status=\"507\"} 1"), "{m}");
    // Health says sends would fail, and why.
    let resp = c.get(r.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "degraded", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("disk quota"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_send_rate_is_429() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[
            "--send-rate",
            "0.01",
            "--send-burst",
            "5",
            "--accounts-per-minute",
            "0",
        ],
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let (ids, status) = fill(&c, &r, &q, b"rate", 100).await;
    assert_eq!((ids.len(), status), (5, 429));
    assert_intact(&c, &r, &q, &t, &ids, b"rate").await;
    // Refused sends also count against the bucket (even to unknown queues).
    assert_eq!(send(&c, &r, "unknown", b"x", None).await.0, 429);
    let m = c
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("cinder_relay_rate_limited_client_total 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_recipient_inbound_budget_is_429() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[
            "--send-rate",
            "0",
            "--accounts-per-minute",
            "0",
            "--recipient-bytes-per-minute",
            "256KiB",
        ],
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let (q2, t2) = account(&c, &r).await;
    let payload = vec![3u8; 60 << 10];
    let (ids, status) = fill(&c, &r, &q, &payload, 100).await;
    assert_eq!((ids.len(), status), (4, 429));
    assert_intact(&c, &r, &q, &t, &ids, &payload).await;
    // The budget is per recipient: another queue still takes messages.
    let id = send_ok(&c, &r, &q2, &payload).await;
    assert_intact(&c, &r, &q2, &t2, &[id], &payload).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_creation_rate_is_429() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), &["--accounts-per-minute", "3"]);
    let c = client();
    for _ in 0..3 {
        account(&c, &r).await;
    }
    let resp = c.post(r.url("/v1/accounts")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
}

#[test]
fn bad_flags_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(d.join("data"))
            .arg("--key-file")
            .arg(d.join("key"))
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["--durability", "sometimes"][..],
        &["--default-ttl", "31d"],
        &["--max-message-bytes", "17MiB"],
        &["--max-ttl", "forever"],
        &[
            "--accounts",
            d.join("data").join("accounts").to_str().unwrap(),
        ],
        &["--recipient-bytes-per-minute", "1KiB"],
        // Zero caps would refuse every request: refused at start (0 is "off" only for
        // the rate limits).
        &["--queue-quota-messages", "0"],
        &["--queue-quota-bytes", "0"],
        &["--max-connections", "0"],
        &["--header-timeout", "0"],
        &["--max-shred-delay", "0"],
        // A quota that cannot hold the segments being written.
        &["--disk-quota-bytes", "512MiB"],
        &["--segment-size", "1KiB"],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty());
    }
    // A data dir with data and no key: refuse, never generate a key that cannot read it.
    std::fs::create_dir_all(d.join("data2")).unwrap();
    std::fs::write(d.join("data2").join("KEYS"), b"x").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(d.join("data2"))
        .arg("--key-file")
        .arg(d.join("key2"))
        .arg("--accounts")
        .arg(d.join("accounts2"))
        .arg("--accept-new-accounts-file")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("restore the key"));
    assert!(!d.join("key2").exists());

    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--listen",
        "[default: 127.0.0.1:7878]",
        "--data",
        "--key-file",
        "--durability",
        "--max-message-bytes",
        "--default-ttl",
        "--max-ttl",
        "--queue-quota-bytes",
        "--disk-quota-bytes",
        "--max-shred-delay",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn paths_are_checked_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |data: &str, key: &str, accounts: &str, extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(d.join(data))
            .arg("--key-file")
            .arg(d.join(key))
            .arg("--accounts")
            .arg(d.join(accounts))
            .args(extra)
            .output()
            .unwrap()
    };
    // A key inside the data dir is refused before it is generated (and before the data
    // dir is made).
    let out = run("fresh", "fresh/master.key", "acc", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inside the data dir"), "{err}");
    assert!(!d.join("fresh/master.key").exists(), "a key was generated");
    assert!(!d.join("acc").exists());

    // A data dir that holds data with its accounts file gone: refused, nothing created;
    // with --accept-new-accounts-file it starts (and says what that means).
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::write(d.join("data").join("KEYS"), b"x").unwrap();
    std::fs::write(d.join("key"), [7u8; 32]).unwrap();
    let out = run("data", "key", "gone", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("accounts file") && err.contains("missing"),
        "{err}"
    );
    assert!(!d.join("gone").exists(), "an accounts file was created");
    let out = run("data", "key", "gone", &["--accept-new-accounts-file"]);
    // The made-up KEYS does not open, but the accounts check let it through to the store.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("is missing"), "{err}");
}
