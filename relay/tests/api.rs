//! The HTTP API over real HTTP: flows, auth, acks, paging, bad input, operational routes.

// Tests name the relay r, the client c, a queue q and its token t.
#![allow(clippy::many_single_char_names)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_account_send_read_ack_empty() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    assert_eq!(q.len(), 22);
    assert!(t.len() >= 22, "token carries at least 128 bits");

    let id1 = send_ok(&c, &r, &q, b"first secret payload").await;
    let (s, v) = send(&c, &r, &q, b"second secret payload", Some("60")).await;
    assert_eq!(s, 201);
    let id2 = v["id"].as_str().unwrap().to_string();
    let id3 = send_ok(&c, &r, &q, b"").await;

    let (msgs, more) = read_page(&c, &r, &q, &t, "").await;
    assert!(!more);
    assert_eq!(
        msgs,
        vec![
            (id1.clone(), b"first secret payload".to_vec()),
            (id2.clone(), b"second secret payload".to_vec()),
            (id3.clone(), Vec::new()),
        ]
    );
    // The TTL header sets expires_at.
    let v: Value = c
        .get(r.url(&format!("/v1/queues/{q}/messages")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp2 = v["messages"][1]["expires_at"].as_u64().unwrap();
    assert!(exp2 >= now + 58 && exp2 <= now + 61, "{exp2} vs {now}");
    let exp1 = v["messages"][0]["expires_at"].as_u64().unwrap();
    assert!(exp1 >= now + 7 * 86_400 - 5, "default TTL is 7 days");

    // DELETE one: 204, then 404.
    let del = |id: String| {
        c.delete(r.url(&format!("/v1/queues/{q}/messages/{id}")))
            .bearer_auth(&t)
            .send()
    };
    assert_eq!(del(id2.clone()).await.unwrap().status(), 204);
    assert_eq!(del(id2.clone()).await.unwrap().status(), 404);
    assert_eq!(del("999999999999".into()).await.unwrap().status(), 404);

    // Ack the rest by ids.
    let resp = c
        .post(r.url(&format!("/v1/queues/{q}/ack")))
        .bearer_auth(&t)
        .json(&json!({ "ids": [id1, id3, id2] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({ "acked": 2 }));
    let (msgs, more) = read_page(&c, &r, &q, &t, "").await;
    assert!(msgs.is_empty() && !more);

    // Account removal purges the queue and revokes the token.
    send_ok(&c, &r, &q, b"left behind").await;
    let resp = c
        .delete(r.url(&format!("/v1/accounts/{q}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(send(&c, &r, &q, b"x", None).await.0, 404);
    let resp = c
        .get(r.url(&format!("/v1/queues/{q}/messages")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Logs hold no payloads, tokens or queue ids.
    let log = r.stderr();
    for secret in [t.as_str(), q.as_str(), "secret payload", "left behind"] {
        assert!(!log.contains(secret), "log leaks {secret:?}: {log}");
    }
    let out = r.stdout_lines.join("\n");
    assert!(!out.contains(&t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_401_and_403_on_every_authenticated_route() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (qa, ta) = account(&c, &r).await;
    let (_qb, tb) = account(&c, &r).await;
    let id = send_ok(&c, &r, &qa, b"for a").await;

    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/v1/queues/{qa}/messages"), None),
        (
            Method::DELETE,
            format!("/v1/queues/{qa}/messages/{id}"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/queues/{qa}/ack"),
            Some(json!({ "ids": [id] })),
        ),
        (Method::GET, format!("/v1/queues/{qa}/ws"), None),
        (Method::DELETE, format!("/v1/accounts/{qa}"), None),
    ];
    for (m, path, body) in &routes {
        let go = |auth: Option<String>| {
            let mut req = c.request(m.clone(), r.url(path));
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            req.send()
        };
        let cases = [
            (None, 401),
            (Some("Bearer".to_string()), 401),
            (Some("Bearer wrong-token".to_string()), 401),
            (Some(format!("Basic {ta}")), 401),
            (Some(format!("Bearer {ta}x")), 401),
            (Some(format!("Bearer {tb}")), 403),
        ];
        for (auth, want) in cases {
            let resp = go(auth.clone()).await.unwrap();
            assert_eq!(resp.status(), want, "{m} {path} with {auth:?}");
            if want == 401 {
                assert!(resp.headers().contains_key("www-authenticate"));
            }
        }
    }
    // A valid token on an unknown queue is 403 too (it is another queue's token).
    let resp = c
        .get(r.url("/v1/queues/AAAAAAAAAAAAAAAAAAAAAA/messages"))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Nothing was changed by the refused requests.
    let (msgs, _) = read_page(&c, &r, &qa, &ta, "").await;
    assert_eq!(msgs, vec![(id, b"for a".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cumulative_ack_and_paging() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let mut ids = Vec::new();
    for i in 0..150 {
        ids.push(send_ok(&c, &r, &q, format!("m{i}").as_bytes()).await);
    }
    // Default limit 100, `more` set; cursor paging; the limit is capped at 1000.
    let (p1, more) = read_page(&c, &r, &q, &t, "").await;
    assert_eq!(p1.len(), 100);
    assert!(more);
    let (p2, more) = read_page(&c, &r, &q, &t, &format!("?after={}", p1[99].0)).await;
    assert_eq!(p2.len(), 50);
    assert!(!more);
    assert_eq!(p2[0].1, b"m100");
    let (all, more) = read_page(&c, &r, &q, &t, "?limit=5000").await;
    assert_eq!(all.len(), 150);
    assert!(!more);
    let got: Vec<String> = all.iter().map(|m| m.0.clone()).collect();
    assert_eq!(got, ids, "FIFO order");
    let (p, more) = read_page(&c, &r, &q, &t, "?limit=150").await;
    assert_eq!((p.len(), more), (150, false));
    let (p, more) = read_page(&c, &r, &q, &t, "?limit=149").await;
    assert_eq!((p.len(), more), (149, true));

    let ack = |body: Value| {
        c.post(r.url(&format!("/v1/queues/{q}/ack")))
            .bearer_auth(&t)
            .json(&body)
            .send()
    };
    let acked = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()["acked"]
            .as_u64()
            .unwrap()
    };
    // Through the 60th: 60 acked, the rest start at the 61st.
    assert_eq!(
        acked(ack(json!({ "through": ids[59] })).await.unwrap()).await,
        60
    );
    assert_eq!(
        acked(ack(json!({ "through": ids[59] })).await.unwrap()).await,
        0
    );
    let (p, _) = read_page(&c, &r, &q, &t, "?limit=1").await;
    assert_eq!(p[0].0, ids[60]);
    // Ids mixed with already-acked and unknown ones count only the live ones.
    assert_eq!(
        acked(
            ack(json!({ "ids": [ids[0], ids[60], ids[61], "123456789"] }))
                .await
                .unwrap()
        )
        .await,
        2
    );
    assert_eq!(acked(ack(json!({ "ids": [] })).await.unwrap()).await, 0);
    assert_eq!(
        acked(ack(json!({ "through": ids[149] })).await.unwrap()).await,
        88
    );
    let (p, more) = read_page(&c, &r, &q, &t, "").await;
    assert!(p.is_empty() && !more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_send_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[
            NO_LIMITS,
            &[
                "--max-message-bytes",
                "1KiB",
                "--max-ttl",
                "1h",
                "--default-ttl",
                "1h",
            ],
        ]
        .concat(),
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let keep = send_ok(&c, &r, &q, b"keep me").await;

    // Send.
    for ttl in ["abc", "0", "-1", "1.5", "3601", "99999999999999999999999"] {
        assert_eq!(send(&c, &r, &q, b"x", Some(ttl)).await.0, 400, "ttl {ttl}");
    }
    assert_eq!(send(&c, &r, &q, b"x", Some("3600")).await.0, 201);
    assert_eq!(send(&c, &r, &q, &[7u8; 1024], None).await.0, 201);
    let (s, v) = send(&c, &r, &q, &[7u8; 1025], None).await;
    assert_eq!(s, 413, "{v}");
    // Far over the limit: the server answers 413 from Content-Length without reading the
    // body, so the client may see the answer or a reset connection while still writing.
    let resp = c
        .put(r.url(&format!("/v1/queues/{q}/messages")))
        .body(vec![7u8; 1 << 20])
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 413);
    }
    // A chunked body (no Content-Length) over the limit is refused too.
    assert_eq!(raw_chunked_put(&r.addr, &q, 4, 512).await, 413);
    assert_eq!(raw_chunked_put(&r.addr, &q, 2, 512).await, 201);
    assert_eq!(
        send(&c, &r, &q.replace(|_| true, "A"), b"x", None).await.0,
        404
    );
    assert_eq!(send(&c, &r, "%00", b"x", None).await.0, 404);
    let long = "a".repeat(300);
    assert_eq!(send(&c, &r, &long, b"x", None).await.0, 404);

    // Nothing above harmed the stored messages.
    let all = read_all(&c, &r, &q, &t).await;
    assert_eq!(all.len(), 4);
    assert_eq!(all[0], (keep, b"keep me".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_read_ack_and_delete_input_is_400() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let keep = send_ok(&c, &r, &q, b"keep me").await;

    // Read.
    for query in [
        "?limit=0",
        "?limit=abc",
        "?limit=-1",
        "?after=abc",
        "?after=-5",
        "?after=1e3",
    ] {
        let resp = c
            .get(r.url(&format!("/v1/queues/{q}/messages{query}")))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{query}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"].is_string());
    }

    // Ack.
    for body in [
        "",
        "not json",
        "{}",
        r#"{"ids": ["1"], "through": "2"}"#,
        r#"{"ids": ["x"]}"#,
        r#"{"ids": "1"}"#,
        r#"{"through": "-1"}"#,
        r#"{"through": null}"#,
        r#"{"acks": ["1"]}"#,
        "[1, 2]",
    ] {
        let resp = c
            .post(r.url(&format!("/v1/queues/{q}/ack")))
            .bearer_auth(&t)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
    }
    let many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let resp = c
        .post(r.url(&format!("/v1/queues/{q}/ack")))
        .bearer_auth(&t)
        .json(&json!({ "ids": many }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Delete one.
    let resp = c
        .delete(r.url(&format!("/v1/queues/{q}/messages/notanid")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Unknown routes and methods.
    assert_eq!(c.get(r.url("/nope")).send().await.unwrap().status(), 404);
    assert_eq!(
        c.get(r.url("/v1/accounts")).send().await.unwrap().status(),
        405
    );

    // Nothing above harmed the stored message.
    assert_eq!(
        read_all(&c, &r, &q, &t).await,
        vec![(keep, b"keep me".to_vec())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let resp = c.get(r.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (q, t) = account(&c, &r).await;
    let id = send_ok(&c, &r, &q, b"counted").await;
    assert_eq!(send(&c, &r, "unknownqueue", b"x", None).await.0, 404);
    let resp = c
        .delete(r.url(&format!("/v1/queues/{q}/messages/{id}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = c.get(r.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for want in [
        "cinder_relay_http_requests_total{method=\"PUT\",route=\"/v1/queues/{queue}/messages\",status=\"201\"} 1",
        "cinder_relay_http_requests_total{method=\"PUT\",route=\"/v1/queues/{queue}/messages\",status=\"404\"} 1",
        "cinder_relay_http_requests_total{method=\"POST\",route=\"/v1/accounts\",status=\"201\"} 1",
        "cinder_relay_http_request_duration_seconds_bucket{le=\"+Inf\",method=\"PUT\",route=\"/v1/queues/{queue}/messages\"} 2",
        "cinder_relay_accounts 1",
        "cinder_relay_messages_sent_total 1",
        "cinder_relay_messages_acked_total 1",
        "cinder_segments ",
        "cinder_bytes_on_disk ",
        "cinder_live_messages 0",
        "cinder_dead_records ",
        "cinder_shreds_total ",
        "cinder_queues ",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains(&q), "queue id in metrics");
    // Every sample line parses as `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, v) = line.rsplit_once(' ').unwrap();
        assert!(v.parse::<f64>().is_ok(), "{line}");
    }
}

/// PUT with `Transfer-Encoding: chunked` (no Content-Length) over a raw socket; returns
/// the status.
async fn raw_chunked_put(addr: &str, queue: &str, chunks: usize, size: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "PUT /v1/queues/{queue}/messages HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..chunks {
        req.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        req.extend(std::iter::repeat_n(b'z', size));
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The server may answer 413 and close before reading everything.
    let _ = s.write_all(&req).await;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    let head = String::from_utf8_lossy(&resp);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_grow_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let metrics = || async {
        c.get(r.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // The scrape itself is a labelled request: make its label exist before comparing.
    metrics().await;
    for i in 0..200 {
        let m = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let resp = c.request(m, r.url("/healthz")).send().await.unwrap();
        assert!(resp.status().is_client_error());
    }
    let first = metrics().await;
    assert!(!first.contains("MADEUP"), "{first}");
    assert!(first.contains("method=\"other\""), "{first}");
    for i in 200..400 {
        let m = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        c.request(m, r.url("/healthz")).send().await.unwrap();
    }
    // Same label set: only counts changed.
    let second = metrics().await;
    assert_eq!(first.lines().count(), second.lines().count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_name_the_route_not_the_queue_and_json_logs_parse() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--log-format", "json", "--access-log"]].concat(),
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    send_ok(&c, &r, &q, b"logged?").await;
    let resp = c
        .get(r.url(&format!("/v1/queues/{q}/messages")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let st = r.signal_and_wait("TERM", Duration::from_secs(15));
    assert!(st.success());
    let log = r.stderr();
    assert!(!log.contains(&q) && !log.contains(&t), "{log}");
    let mut access = Vec::new();
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string(), "{line}");
        if v["target"] == "cinder_relay::access" {
            access.push((
                v["fields"]["method"].as_str().unwrap().to_string(),
                v["fields"]["route"].as_str().unwrap().to_string(),
                v["fields"]["status"].as_u64().unwrap(),
            ));
            assert!(v["fields"]["micros"].is_u64(), "{line}");
        }
    }
    for want in [
        ("POST", "/v1/accounts", 201),
        ("PUT", "/v1/queues/{queue}/messages", 201),
        ("GET", "/v1/queues/{queue}/messages", 200),
    ] {
        assert!(
            access
                .iter()
                .any(|(m, r, s)| (m.as_str(), r.as_str(), *s) == want),
            "no access line {want:?} in {access:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_moves_metrics_off_the_api_listener() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--metrics-listen", "127.0.0.1:0"]].concat(),
    );
    let ops = r
        .stdout_lines
        .iter()
        .find_map(|l| l.strip_prefix("metrics on  "))
        .unwrap_or_else(|| panic!("no metrics address in {:?}", r.stdout_lines))
        .trim()
        .to_string();
    assert!(ops.starts_with("http://127.0.0.1:"), "{ops}");
    let c = client();
    account(&c, &r).await;
    let api = c.get(r.url("/metrics")).send().await.unwrap();
    assert_eq!(api.status(), 404, "the API still serves /metrics");
    let resp = c.get(&ops).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("cinder_relay_accounts 1"), "{text}");
    let health = c
        .get(ops.replace("/metrics", "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // The ops listener serves nothing of the API.
    let accounts = c
        .post(ops.replace("/metrics", "/v1/accounts"))
        .send()
        .await
        .unwrap();
    assert_eq!(accounts.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_gets_the_first_id_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let put = |key: Option<(&'static str, &str)>, body: &'static str| {
        let mut req = c.put(r.url(&format!("/v1/queues/{q}/messages"))).body(body);
        if let Some((h, v)) = key {
            req = req.header(h, v);
        }
        req.send()
    };
    let first = put(Some(("Idempotency-Key", "7f9c-retry-me")), "once")
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let id = first.json::<Value>().await.unwrap()["id"].clone();
    let again = put(Some(("Idempotency-Key", "7f9c-retry-me")), "once")
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id);
    // The other header name is the same key space; another key is another message.
    let alias = put(Some(("X-Cinder-Message-Id", "7f9c-retry-me")), "once")
        .await
        .unwrap();
    assert_eq!(alias.status(), 200);
    assert_eq!(
        put(Some(("Idempotency-Key", "another")), "twice")
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(put(None, "no key").await.unwrap().status(), 201);
    assert_eq!(put(None, "no key").await.unwrap().status(), 201);
    let msgs = read_all(&c, &r, &q, &t).await;
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    assert_eq!(msgs[0].1, b"once");
    // Bad keys are refused before anything is stored.
    for bad in ["", &"k".repeat(256), "has space"] {
        let resp = put(Some(("Idempotency-Key", bad)), "bad").await.unwrap();
        assert_eq!(resp.status(), 400, "{bad:?}");
    }
    assert_eq!(read_all(&c, &r, &q, &t).await.len(), 4);
    let m = c
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("cinder_relay_messages_deduplicated_total 2\n"),
        "{m}"
    );
}

/// (padded, body plaintext length) of every message frame in the data dir's segments.
fn stored_message_frames(data: &std::path::Path) -> Vec<(bool, usize)> {
    use cinder::format::frame::{FrameHeader, FrameKind, TAG_LEN};
    let mut out = Vec::new();
    for e in std::fs::read_dir(data).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "seg") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let mut at = cinder::format::segment_header::HEADER_LEN;
        while let Ok(h) = FrameHeader::decode(&bytes[at..]) {
            if h.kind == FrameKind::Message {
                out.push((h.padded, h.body_len as usize - TAG_LEN));
            }
            if h.kind == FrameKind::Seal {
                break;
            }
            at += h.frame_len();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_payloads_are_padded_by_default_and_not_with_padding_none() {
    for (flag, padded) in [(None, true), (Some("none"), false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<&str> = NO_LIMITS.to_vec();
        if let Some(f) = flag {
            args.extend(["--padding", f]);
        }
        let mut r = Relay::start(dir.path(), &args);
        let c = client();
        let (q, _) = account(&c, &r).await;
        send_ok(&c, &r, &q, &[7u8; 1000]).await;
        assert!(r.signal_and_wait("TERM", Duration::from_secs(15)).success());
        let frames = stored_message_frames(&dir.path().join("data"));
        assert_eq!(frames.len(), 1, "{frames:?}");
        let (was_padded, body) = frames[0];
        assert_eq!(was_padded, padded, "{flag:?}");
        if padded {
            // Padmé: the next bucket above 1,001 bytes (payload + marker).
            assert!(body > 1000 && body <= 1120, "{body}");
        } else {
            assert_eq!(body, 1000);
        }
    }
}
