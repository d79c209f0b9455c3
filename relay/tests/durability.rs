//! Restarts, SIGKILL during sends, graceful shutdown with requests in flight.

// Tests name the relay r, the client c, a queue q and its token t.
#![allow(clippy::many_single_char_names)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use parking_lot::Mutex;
use serde_json::{json, Value};

async fn ack_ids(c: &reqwest::Client, r: &Relay, q: &str, t: &str, ids: &[String]) -> u64 {
    let resp = c
        .post(r.url(&format!("/v1/queues/{q}/ack")))
        .bearer_auth(t)
        .json(&json!({ "ids": ids }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json::<Value>().await.unwrap()["acked"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_unacked_and_drops_acked() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut r = Relay::start(dir.path(), NO_LIMITS);
    let (q, t) = account(&c, &r).await;
    let (q2, t2) = account(&c, &r).await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let p = format!("message {i}").into_bytes();
        sent.push((send_ok(&c, &r, &q, &p).await, p));
    }
    send_ok(&c, &r, &q2, b"other queue").await;
    let acked: Vec<String> = sent.iter().step_by(2).map(|m| m.0.clone()).collect();
    assert_eq!(ack_ids(&c, &r, &q, &t, &acked).await, 10);
    let want: Vec<(String, Vec<u8>)> = sent.iter().skip(1).step_by(2).cloned().collect();

    // Graceful stop, restart: the same accounts and tokens, unacked messages only.
    let st = r.signal_and_wait("TERM", Duration::from_secs(15));
    assert!(st.success(), "{st:?}: {}", r.stderr());
    let mut r = Relay::start(dir.path(), NO_LIMITS);
    assert!(
        r.stdout_lines.iter().any(|l| l.contains("(2 accounts)")),
        "{:?}",
        r.stdout_lines
    );
    assert_eq!(read_all(&c, &r, &q, &t).await, want);
    assert_eq!(read_all(&c, &r, &q2, &t2).await.len(), 1);

    // Ack more, then SIGKILL: acks are durable records too.
    let (first, _) = &want[0];
    assert_eq!(
        c.delete(r.url(&format!("/v1/queues/{q}/messages/{first}")))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let resp = c
        .post(r.url(&format!("/v1/queues/{q}/ack")))
        .bearer_auth(&t)
        .json(&json!({ "through": want[4].0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["acked"], 4);
    let resp = c
        .delete(r.url(&format!("/v1/accounts/{q2}")))
        .bearer_auth(&t2)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    r.kill();
    let r = Relay::start(dir.path(), NO_LIMITS);
    assert_eq!(read_all(&c, &r, &q, &t).await, want[5..]);
    let resp = c
        .get(r.url(&format!("/v1/queues/{q2}/messages")))
        .bearer_auth(&t2)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "deleted account came back");
}

/// id -> payload of every send that got a 201.
type Confirmed = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;
type IdSet = Arc<Mutex<BTreeSet<String>>>;

/// A sender task: sends until `n` messages or the first failure (the relay is gone),
/// recording each 201.
fn spawn_sender(
    base: String,
    queue: String,
    tag: String,
    n: usize,
    confirmed: Confirmed,
    oks: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        for i in 0..n {
            let payload = format!("{tag}-{i}-{}", "x".repeat(i % 300)).into_bytes();
            let Ok(resp) = c
                .put(format!("{base}/v1/queues/{queue}/messages"))
                .body(payload.clone())
                .send()
                .await
            else {
                return;
            };
            if resp.status() != 201 {
                return;
            }
            let Ok(v) = resp.json::<Value>().await else {
                return;
            };
            let id = v["id"].as_str().unwrap().to_string();
            confirmed.lock().insert(id, payload);
            oks.fetch_add(1, Ordering::SeqCst);
        }
    })
}

/// An acker task: reads and acks the queue until the relay is gone. Records the ids it
/// tried to ack, and those whose ack was answered with a 200.
fn spawn_acker(
    base: String,
    queue: String,
    token: String,
    tried: IdSet,
    acked: IdSet,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        for _ in 0..1000 {
            let Ok(resp) = c
                .get(format!("{base}/v1/queues/{queue}/messages?limit=20"))
                .bearer_auth(&token)
                .send()
                .await
            else {
                return;
            };
            let Ok(v) = resp.json::<Value>().await else {
                return;
            };
            let ids: Vec<String> = v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            if ids.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            tried.lock().extend(ids.iter().cloned());
            let Ok(resp) = c
                .post(format!("{base}/v1/queues/{queue}/ack"))
                .bearer_auth(&token)
                .json(&json!({ "ids": ids }))
                .send()
                .await
            else {
                return;
            };
            if resp.status() == 200 && resp.json::<Value>().await.is_ok() {
                acked.lock().extend(ids);
            }
        }
    })
}

/// Senders hammer the relay (`--durability sync`) while it is SIGKILLed; every message
/// that got a 201 must be there after a restart, with its id, and nothing acked may come
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_sends_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let args = [NO_LIMITS, &["--durability", "sync"]].concat();
    let c = client();
    let mut r = Relay::start(dir.path(), &args);
    let mut accounts = Vec::new();
    for _ in 0..4 {
        accounts.push(account(&c, &r).await);
    }
    let confirmed: Vec<Confirmed> = accounts.iter().map(|_| Confirmed::default()).collect();
    // Acks confirmed by a 200, and acks sent whose answer the kill may have cut off.
    let (acked, ack_tried) = (IdSet::default(), IdSet::default());
    let oks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let qi = w % accounts.len();
        tasks.push(spawn_sender(
            r.base.clone(),
            accounts[qi].0.clone(),
            format!("w{w}"),
            5000,
            Arc::clone(&confirmed[qi]),
            Arc::clone(&oks),
        ));
    }
    // An acker acks what it reads on queue 0 while the sends go on.
    tasks.push(spawn_acker(
        r.base.clone(),
        accounts[0].0.clone(),
        accounts[0].1.clone(),
        Arc::clone(&ack_tried),
        Arc::clone(&acked),
    ));
    let start = Instant::now();
    while oks.load(Ordering::SeqCst) < 400 && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    r.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let total = oks.load(Ordering::SeqCst);
    assert!(total >= 400, "only {total} sends confirmed before the kill");
    let acked = acked.lock().clone();
    let ack_tried = ack_tried.lock().clone();
    assert!(!acked.is_empty(), "the acker acked nothing");

    let r = Relay::start(dir.path(), &args);
    for (qi, (q, t)) in accounts.iter().enumerate() {
        let got: BTreeMap<String, Vec<u8>> = read_all(&c, &r, q, t).await.into_iter().collect();
        for (id, payload) in confirmed[qi].lock().iter() {
            if acked.contains(id) {
                assert!(!got.contains_key(id), "acked message {id} came back");
            } else if ack_tried.contains(id) {
                // Its ack may or may not have landed before the kill.
                if let Some(p) = got.get(id) {
                    assert_eq!(p, payload);
                }
            } else {
                assert_eq!(got.get(id), Some(payload), "201 message {id} lost");
            }
        }
    }
    eprintln!("{total} confirmed sends, {} acked, all intact", acked.len());
}

/// SIGTERM while sends are in flight: the server stops accepting, finishes what it
/// accepted (each 201 durable), and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_sends() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut r = Relay::start(dir.path(), NO_LIMITS);
    let (q, t) = account(&c, &r).await;
    let confirmed = Confirmed::default();
    let oks = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            spawn_sender(
                r.base.clone(),
                q.clone(),
                format!("g{w}"),
                5000,
                Arc::clone(&confirmed),
                Arc::clone(&oks),
            )
        })
        .collect();
    while oks.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (st, r) = tokio::task::spawn_blocking(move || {
        let st = r.signal_and_wait("TERM", Duration::from_secs(15));
        (st, r)
    })
    .await
    .unwrap();
    assert!(st.success(), "{st:?}: {}", r.stderr());
    for t in tasks {
        t.await.unwrap();
    }
    let log = r.stderr();
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert!(log.contains("store flushed and closed"), "{log}");
    drop(r);
    let r = Relay::start(dir.path(), NO_LIMITS);
    let got: BTreeMap<String, Vec<u8>> = read_all(&c, &r, &q, &t).await.into_iter().collect();
    for (id, p) in confirmed.lock().iter() {
        assert_eq!(got.get(id), Some(p), "201 message {id} lost in shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_also_shuts_down_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut r = Relay::start(dir.path(), NO_LIMITS);
    let (_q, t) = account(&c, &r).await;
    assert!(
        r.stderr().contains("Production wants an HSM"),
        "{}",
        r.stderr()
    );
    let st = r.signal_and_wait("INT", Duration::from_secs(15));
    assert!(st.success());
    for f in ["accounts", "master.key"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let accounts = std::fs::read_to_string(dir.path().join("accounts")).unwrap();
    assert!(!accounts.contains(&t), "token stored in the clear");
    // The second start reuses the key and says nothing about generating one.
    let r = Relay::start(dir.path(), NO_LIMITS);
    assert!(!r.stderr().contains("generated"), "{}", r.stderr());
}
