//! Connection hygiene against the real binary: silent, slowloris and idle keep-alive
//! sockets are closed after --header-timeout and never hold up others or shutdown; the
//! connection cap answers 503 with Retry-After and logs; every error body is JSON; a
//! body the handler did not read leaves the keep-alive connection usable (drained) or
//! says `Connection: close`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAST: &[&str] = &["--header-timeout", "2s"];

fn args(extra: &[&str]) -> Vec<String> {
    NO_LIMITS
        .iter()
        .chain(FAST)
        .chain(extra)
        .map(ToString::to_string)
        .collect()
}

fn start(dir: &std::path::Path, extra: &[&str]) -> Relay {
    let a = args(extra);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    Relay::start(dir, &refs)
}

/// Reads until the server closes the socket; returns what it sent, or `None` if it was
/// still open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One HTTP/1.1 response read off a raw socket: (status, headers lowercased, body).
async fn read_response(s: &mut TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    (status, headers, body)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn silent_slow_and_idle_sockets_are_closed_and_do_not_block_others() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), &[]);
    let t0 = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(&r.addr).await.unwrap());
    }
    // A slowloris: a request line, then a header byte every 300 ms, never the end.
    let mut slow = TcpStream::connect(&r.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let dripper = tokio::spawn(async move {
        for _ in 0..60 {
            if slow.write_all(b"a").await.is_err() {
                return true; // closed by the server
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        false
    });
    // An idle keep-alive connection after one complete request.
    let mut idle = TcpStream::connect(&r.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut idle).await;
    assert_eq!(status, 200);
    // Meanwhile the relay serves everyone else.
    let c = client();
    let resp = c.get(r.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    for s in &mut silent {
        let got = closed_within(s, Duration::from_secs(15)).await;
        assert!(got.is_some(), "a silent socket was still open");
    }
    assert!(
        closed_within(&mut idle, Duration::from_secs(15))
            .await
            .is_some(),
        "an idle keep-alive connection was still open"
    );
    assert!(dripper.await.unwrap(), "the slowloris was never closed");
    eprintln!("closed after {:?} (timeout 2 s)", t0.elapsed());
}

#[tokio::test]
async fn silent_sockets_do_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    // A long header timeout: shutdown must not wait for it for idle sockets.
    let mut r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--header-timeout", "60s"]].concat(),
    );
    let mut idle = TcpStream::connect(&r.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.0, 200);
    let _silent: Vec<TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(TcpStream::connect(&r.addr).await.unwrap());
        }
        v
    };
    // The old relay waited the full 20 s drain for these; the idle one closes at once
    // and the silent ones (no request started) too.
    let st = r.signal_and_wait("TERM", Duration::from_secs(15));
    assert!(st.success(), "{st:?}: {}", r.stderr());
}

#[tokio::test]
async fn the_connection_cap_answers_503_with_retry_after_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), &["--max-connections", "4"]);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&r.addr).await.unwrap());
    }
    // Let the relay accept them before the next one arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = TcpStream::connect(&r.addr).await.unwrap();
    over.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, headers, body) = read_response(&mut over).await;
    assert_eq!(status, 503);
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(header(&headers, "connection"), Some("close"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("too many connections"));
    drop(held);
    // Room again once they close.
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.get(r.url("/healthz")).send().await {
            Ok(resp) if resp.status() == 200 => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("no room after the sockets closed: {other:?}"),
        }
    }
    let log = r.stderr();
    assert!(log.contains("connection cap 4 reached"), "{log}");
    let m = c
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The one above, and any retries of the loop that came before the closes were seen.
    let refused: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("cinder_relay_connections_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 1, "{m}");
}

#[tokio::test]
async fn every_error_body_is_json() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), &["--max-ws-connections", "1"]);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (c.get(r.url("/nowhere")), 404),
        (c.delete(r.url("/healthz")), 405),
        (c.post(r.url(&format!("/v1/queues/{q}/messages"))), 405),
        // Not UTF-8 once percent-decoded.
        (
            c.get(r.url("/v1/queues/%FF%FE/messages")).bearer_auth(&t),
            400,
        ),
        // A WebSocket route without the upgrade headers.
        (
            c.get(r.url(&format!("/v1/queues/{q}/ws"))).bearer_auth(&t),
            400,
        ),
        (
            c.get(r.url(&format!("/v1/queues/{q}/messages?limit=x")))
                .bearer_auth(&t),
            400,
        ),
        (c.get(r.url(&format!("/v1/queues/{q}/messages"))), 401),
    ];
    for (req, want) in cases {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.bytes().await.unwrap();
        assert_eq!(status, want, "{body:?}");
        assert_eq!(ctype.as_deref(), Some("application/json"), "{status}");
        let json: Value =
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{status}: {e}: {body:?}"));
        assert!(json["error"].is_string(), "{status}: {json}");
    }
}

#[tokio::test]
async fn every_429_and_503_says_when_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[
            "--send-rate",
            "1",
            "--send-burst",
            "1",
            "--accounts-per-minute",
            "1",
            "--recipient-bytes-per-minute",
            "0",
            "--max-ws-connections",
            "1",
        ],
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let resp = c.post(r.url("/v1/accounts")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let secs: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    assert_eq!(send(&c, &r, &q, b"one", None).await.0, 201);
    let resp = c
        .put(r.url(&format!("/v1/queues/{q}/messages")))
        .body("two")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    // The session cap.
    let url = r.ws_url(&q);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    let (_first, _) = tokio_tungstenite::connect_async(req.clone()).await.unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected a 503: {other:?}"),
    }
}

#[tokio::test]
async fn a_rejected_body_leaves_the_keep_alive_connection_usable_or_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), &[]);
    let mut s = TcpStream::connect(&r.addr).await.unwrap();
    // 404 before the body is read (unknown queue): a small body is drained ...
    let body = vec![b'x'; 20_000];
    let head = format!(
        "PUT /v1/queues/nobody/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    let (status, headers, _) = read_response(&mut s).await;
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "connection"), None);
    // ... and the same connection serves the next request.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 200, "the connection was not usable after the 404");

    // A large body that is not read: the answer says the connection closes.
    let mut big = TcpStream::connect(&r.addr).await.unwrap();
    big.write_all(
        b"PUT /v1/queues/nobody/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
    )
    .await
    .unwrap();
    big.write_all(&vec![b'x'; 4096]).await.unwrap();
    let (status, headers, _) = read_response(&mut big).await;
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "connection"), Some("close"));
    assert!(closed_within(&mut big, Duration::from_secs(10))
        .await
        .is_some());
}
