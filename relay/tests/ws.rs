//! WebSocket push over a real WebSocket client: backlog, live push, acks, the in-flight
//! cap, auth, reconnects and closes.

// Tests name the relay r, the client c, a queue q and its token t.
#![allow(clippy::many_single_char_names)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(r: &Relay, queue: &str, auth: Option<&str>) -> Result<Ws, WsError> {
    let mut req = r.ws_url(queue).into_client_request().unwrap();
    if let Some(a) = auth {
        req.headers_mut()
            .insert("Authorization", a.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn open(r: &Relay, queue: &str, token: &str) -> Ws {
    connect(r, queue, Some(&format!("Bearer {token}")))
        .await
        .expect("ws connect")
}

/// The next message frame as (id, payload), within `wait`; `None` on timeout.
async fn next_msg(ws: &mut Ws, wait: Duration) -> Option<(String, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next()).await.ok()?;
        match frame.expect("stream ended").expect("ws error") {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert!(v["expires_at"].as_u64().unwrap() > 1_600_000_000);
                return Some((
                    v["id"].as_str().unwrap().to_string(),
                    b64(v["payload"].as_str().unwrap()),
                ));
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn ack(ws: &mut Ws, id: &str) {
    ws.send(Message::Text(json!({ "ack": id }).to_string().into()))
        .await
        .unwrap();
}

/// Polls (briefly) until the queue holds exactly `n` messages.
async fn wait_len(c: &reqwest::Client, r: &Relay, q: &str, t: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = read_all(c, r, q, t).await.len();
        if got == n {
            return;
        }
        assert!(Instant::now() < deadline, "queue has {got}, want {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_backlog_then_live_and_acks() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let p = format!("backlog {i}");
        sent.push((send_ok(&c, &r, &q, p.as_bytes()).await, p.into_bytes()));
    }
    let mut ws = open(&r, &q, &t).await;
    for want in &sent {
        let got = next_msg(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(&got, want);
    }
    assert_eq!(next_msg(&mut ws, Duration::from_millis(200)).await, None);

    // Live: pushed as soon as the engine wakes the session (well under the 25 s wait).
    for i in 0..3 {
        let p = format!("live {i}");
        let start = Instant::now();
        let id = send_ok(&c, &r, &q, p.as_bytes()).await;
        let got = next_msg(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, (id.clone(), p.clone().into_bytes()));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        sent.push((id, p.into_bytes()));
    }
    // Acks over the socket delete the messages.
    for (id, _) in &sent[..4] {
        ack(&mut ws, id).await;
    }
    wait_len(&c, &r, &q, &t, 2).await;
    for (id, _) in &sent[4..] {
        ack(&mut ws, id).await;
    }
    wait_len(&c, &r, &q, &t, 0).await;
    ws.close(None).await.unwrap();

    // The session counts an ack once the engine call returns, just after the queue
    // shrank: look until the counters catch up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c
            .get(r.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.contains("cinder_relay_messages_pushed_total 6\n")
            && m.contains("cinder_relay_messages_acked_total 6\n")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_256_in_flight_and_reconnect_redelivers() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(send_ok(&c, &r, &q, format!("{i}").as_bytes()).await);
    }
    let mut ws = open(&r, &q, &t).await;
    let mut got = Vec::new();
    for _ in 0..256 {
        got.push(next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0);
    }
    assert_eq!(got, ids[..256]);
    assert_eq!(
        next_msg(&mut ws, Duration::from_millis(500)).await,
        None,
        "more than 256 in flight"
    );
    // Each ack frees one slot.
    ack(&mut ws, &ids[0]).await;
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0,
        ids[256]
    );
    assert_eq!(next_msg(&mut ws, Duration::from_millis(300)).await, None);
    ack(&mut ws, &ids[1]).await;
    ack(&mut ws, &ids[2]).await;
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0,
        ids[257]
    );
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0,
        ids[258]
    );
    drop(ws);

    // A new session starts over from the oldest unacked message.
    wait_len(&c, &r, &q, &t, 297).await;
    let mut ws = open(&r, &q, &t).await;
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0,
        ids[3]
    );
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_auth_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (qa, ta) = account(&c, &r).await;
    let (qb, tb) = account(&c, &r).await;

    let status = |e: WsError| match e {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    };
    assert_eq!(status(connect(&r, &qa, None).await.unwrap_err()), 401);
    assert_eq!(
        status(connect(&r, &qa, Some("Bearer nope")).await.unwrap_err()),
        401
    );
    assert_eq!(
        status(
            connect(&r, &qa, Some(&format!("Bearer {tb}")))
                .await
                .unwrap_err()
        ),
        403
    );

    // A frame that is not an ack closes the session with a policy error.
    let mut ws = open(&r, &qa, &ta).await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1008);

    // Deleting the account closes its open session.
    let mut ws = open(&r, &qb, &tb).await;
    let resp = c
        .delete(r.url(&format!("/v1/accounts/{qb}")))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sessions_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let id = send_ok(&c, &r, &q, b"pushed").await;
    let mut ws = open(&r, &q, &t).await;
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0,
        id
    );
    ack(&mut ws, &id).await;
    // Let the session pick the ack up, then stop the server under it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let st = tokio::task::spawn_blocking(move || {
        let st = r.signal_and_wait("TERM", Duration::from_secs(15));
        (st, r)
    });
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1001);
    drop(ws);
    let (st, r) = st.await.unwrap();
    assert!(st.success(), "{st:?}: {}", r.stderr());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(
        r.stderr().contains("store flushed and closed"),
        "{}",
        r.stderr()
    );

    // The ack made it to disk before the store closed.
    let r = Relay::start(dir.path(), NO_LIMITS);
    assert!(read_all(&c, &r, &q, &t).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cap_is_503() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--max-ws-connections", "1"]].concat(),
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let mut ws = open(&r, &q, &t).await;
    match connect(&r, &q, Some(&format!("Bearer {t}"))).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status().as_u16(), 503),
        other => panic!("second session: {:?}", other.map(|_| ())),
    }
    // The first session still works.
    let id = send_ok(&c, &r, &q, b"still here").await;
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0,
        id
    );
    let m = c
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("cinder_relay_websockets_open 1"), "{m}");
    assert!(m.contains("cinder_relay_websockets_refused_total 1"), "{m}");
}

/// The close frame a session ends with, within `wait` (skipping pings and messages).
async fn close_code_of(ws: &mut Ws, wait: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()? {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn a_closed_session_frees_its_slot_at_once() {
    // The slot used to stay taken until the engine wait behind it timed out (~25 s).
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--max-ws-connections", "1"]].concat(),
    );
    let c = client();
    let (q1, t1) = account(&c, &r).await;
    let (q2, t2) = account(&c, &r).await;
    for round in 0..3 {
        let (q, t) = if round % 2 == 0 {
            (&q1, &t1)
        } else {
            (&q2, &t2)
        };
        // The previous round's session was closed by its client just before: its slot
        // is free within a moment (the loop below checks the same for this one).
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut ws = loop {
            match connect(&r, q, Some(&format!("Bearer {t}"))).await {
                Ok(ws) => break ws,
                Err(WsError::Http(resp)) if resp.status() == 503 && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("round {round}: the slot was not freed: {e}"),
            }
        };
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
        // The server drops the session on the close frame; give it a moment, not 25 s.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match connect(
                &r,
                if round % 2 == 0 { &q2 } else { &q1 },
                Some(&format!(
                    "Bearer {}",
                    if round % 2 == 0 { &t2 } else { &t1 }
                )),
            )
            .await
            {
                Ok(mut ws) => {
                    ws.close(None).await.unwrap();
                    while ws.next().await.is_some() {}
                    break;
                }
                Err(WsError::Http(resp)) if resp.status() == 503 && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("round {round}: the slot was not freed: {e}"),
            }
        }
    }
}

#[tokio::test]
async fn a_new_session_for_the_same_queue_displaces_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let (other_q, other_t) = account(&c, &r).await;
    let mut other = open(&r, &other_q, &other_t).await;
    let mut old = open(&r, &q, &t).await;
    let mut new = open(&r, &q, &t).await;
    assert_eq!(
        close_code_of(&mut old, Duration::from_secs(5)).await,
        Some(4001)
    );
    let id = send_ok(&c, &r, &q, b"to the new device").await;
    assert_eq!(
        next_msg(&mut new, Duration::from_secs(5)).await.unwrap().0,
        id
    );
    // Another queue's session is untouched.
    let id = send_ok(&c, &r, &other_q, b"other").await;
    assert_eq!(
        next_msg(&mut other, Duration::from_secs(5))
            .await
            .unwrap()
            .0,
        id
    );
    // The displaced session counts as open until its closing handshake ends (at most
    // 2 s when the client does not answer the close frame).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c
            .get(r.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            m.contains("cinder_relay_websockets_displaced_total 1"),
            "{m}"
        );
        if m.contains("cinder_relay_websockets_open 2\n") {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sessions_per_queue_allows_deliberate_readers_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(
        dir.path(),
        &[NO_LIMITS, &["--sessions-per-queue", "2"]].concat(),
    );
    let c = client();
    let (q, t) = account(&c, &r).await;
    let mut a = open(&r, &q, &t).await;
    let mut b = open(&r, &q, &t).await;
    let id = send_ok(&c, &r, &q, b"both see it").await;
    assert_eq!(
        next_msg(&mut a, Duration::from_secs(5)).await.unwrap().0,
        id
    );
    assert_eq!(
        next_msg(&mut b, Duration::from_secs(5)).await.unwrap().0,
        id
    );
    let _third = open(&r, &q, &t).await;
    assert_eq!(
        close_code_of(&mut a, Duration::from_secs(5)).await,
        Some(4001)
    );
    ack(&mut b, &id).await;
    wait_len(&c, &r, &q, &t, 0).await;
}

#[tokio::test]
async fn a_1mib_client_message_closes_only_that_session() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q1, t1) = account(&c, &r).await;
    let (q2, t2) = account(&c, &r).await;
    let mut big = open(&r, &q1, &t1).await;
    let mut fine = open(&r, &q2, &t2).await;
    let huge = format!("{{\"ack\": \"{}\"}}", "1".repeat(1 << 20));
    // The server may close before the whole message is written.
    let _ = big.send(Message::Text(huge.into())).await;
    assert_eq!(
        close_code_of(&mut big, Duration::from_secs(5)).await,
        Some(1009)
    );
    let id = send_ok(&c, &r, &q2, b"unaffected").await;
    assert_eq!(
        next_msg(&mut fine, Duration::from_secs(5)).await.unwrap().0,
        id
    );
}

#[tokio::test]
async fn browsers_pass_the_token_as_a_subprotocol_and_get_cinder_v1_back() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, t) = account(&c, &r).await;
    let with_protocols = |protocols: String| {
        let mut req = r.ws_url(&q).into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
        req
    };
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(with_protocols(format!("cinder.v1, cinder.bearer.{t}")))
            .await
            .expect("the subprotocol token is accepted");
    // The server selects cinder.v1 and never echoes the token.
    assert_eq!(resp.headers()["sec-websocket-protocol"], "cinder.v1");
    let id = send_ok(&c, &r, &q, b"to a browser").await;
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(5)).await.unwrap().0,
        id
    );
    match tokio_tungstenite::connect_async(with_protocols("cinder.v1, cinder.bearer.nope".into()))
        .await
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("a wrong token was let in: {other:?}"),
    }
}

#[tokio::test]
async fn a_rotated_token_ends_the_old_one_and_its_sessions_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let (q, old) = account(&c, &r).await;
    let mut ws = open(&r, &q, &old).await;
    let rotate = |token: &str| {
        c.post(r.url(&format!("/v1/accounts/{q}/token")))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(rotate("wrong").await.unwrap().status(), 401);
    let resp = rotate(&old).await.unwrap();
    assert_eq!(resp.status(), 200);
    let new = resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    // The session opened with the old token is closed, and the old token is refused.
    assert_eq!(
        close_code_of(&mut ws, Duration::from_secs(5)).await,
        Some(4002)
    );
    let read = |token: &str| {
        c.get(r.url(&format!("/v1/queues/{q}/messages")))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(read(&old).await.unwrap().status(), 401);
    assert_eq!(read(&new).await.unwrap().status(), 200);
    assert!(matches!(
        connect(&r, &q, Some(&format!("Bearer {old}"))).await,
        Err(WsError::Http(resp)) if resp.status() == 401
    ));
    let _ws = open(&r, &q, &new).await;
    // A client may choose the new token: then a rotation whose answer it lost is simply
    // repeated with that token (a no-op), and the old one is dead either way.
    let chosen = "Q".repeat(42) + "A";
    let choose = |token: &str| {
        c.post(r.url(&format!("/v1/accounts/{q}/token")))
            .bearer_auth(token)
            .body(format!(r#"{{"token": "{chosen}"}}"#))
            .send()
    };
    let resp = choose(&new).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["token"],
        chosen.as_str()
    );
    assert_eq!(
        choose(&new).await.unwrap().status(),
        401,
        "the old token again"
    );
    assert_eq!(
        choose(&chosen).await.unwrap().status(),
        200,
        "the repeat is a no-op"
    );
    assert_eq!(read(&new).await.unwrap().status(), 401);
    let new = chosen.clone();
    // Durable: after a restart only the new token works.
    let st = r.signal_and_wait("TERM", Duration::from_secs(15));
    assert!(st.success());
    let r = Relay::start(dir.path(), NO_LIMITS);
    let read = |token: &str| {
        c.get(r.url(&format!("/v1/queues/{q}/messages")))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(read(&old).await.unwrap().status(), 401);
    assert_eq!(read(&new).await.unwrap().status(), 200);
}
