//! `GET /v1/queues/{queue}/ws`: push delivery.
//!
//! The server sends each message as a text frame `{"id", "payload", "expires_at"}`, the
//! backlog first, then new messages as they arrive. New messages are noticed through the
//! engine's `Store::subscribe` future (woken by the append itself; no polling, and no
//! thread per session: an idle session is a parked task, a socket and a few KiB). The
//! client answers `{"ack": "<id>"}`; at most 256 messages are unacked in flight, and the
//! server sends nothing more until acks arrive. An ack is applied as it arrives, without
//! waiting for its record's fsync (`Store::ack_batch_nowait`: no I/O, so it runs on the
//! session's own task): the message is gone at once and its record is synced with the
//! writer's next commit; a crash in between redelivers it. Reads of new messages (just
//! written through the page cache) run in place too, except under Async durability
//! (there a message is readable before it is written, and its read waits for the write);
//! the backlog is read on the blocking pool. Acks that cross the server's close frame
//! still count. So a delivered message costs no thread hand-off beyond the engine's own.
//!
//! At most `--sessions-per-queue` sessions per queue (default 1): a new one displaces the
//! oldest, which is closed with code 4001. A client that answers neither pings nor
//! anything else for [`SILENT_LIMIT`] is closed (1001 is not right for that; 1008).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cinder::{MessageId, Subscription};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::messages::message_json;
use super::{authorize_token, bearer, App, AppState};
use crate::errors::ApiError;
use crate::metrics::inc;

/// Unacked messages in flight per session, at most.
pub const MAX_IN_FLIGHT: usize = 256;
/// A ping goes out this often, keeping the connection (and any proxy) alive.
const PING_EVERY: Duration = Duration::from_secs(25);
/// A client not heard from (no frame, no pong) for this long is gone: close.
pub const SILENT_LIMIT: Duration = Duration::from_secs(60);
/// The largest WebSocket message (and frame) a client may send. A valid client frame is
/// an ack, `{"ack": "<20 digits>"}`: ~40 bytes. Anything larger fails the session.
pub const MAX_CLIENT_MESSAGE: usize = 4 << 10;
/// Read buffer per session: sized to acks, so an idle session holds little memory.
const READ_BUFFER: usize = 4 << 10;
/// Outgoing bytes buffered before a write goes to the socket.
const WRITE_BUFFER: usize = 16 << 10;
/// Messages read from the engine per call.
const READ_BATCH: usize = 64;
/// Close code: the account was deleted.
const CLOSE_ACCOUNT_DELETED: u16 = 4000;
/// Close code: the token this session was opened with was replaced.
const CLOSE_TOKEN_ROTATED: u16 = 4002;
/// The subprotocol the server speaks; a client that offers subprotocols must offer it.
pub const PROTOCOL: &str = "cinder.v1";
/// A subprotocol `cinder.bearer.<token>` carries the token for clients that cannot set
/// an `Authorization` header (browsers). It is never selected, echoed or logged.
const TOKEN_PROTOCOL_PREFIX: &str = "cinder.bearer.";

/// The token of a `cinder.bearer.<token>` entry in `Sec-WebSocket-Protocol`.
fn protocol_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .filter(|t| !t.is_empty())
}

/// How long a closing session waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Close code: a newer session for the same queue took this one's place.
const CLOSE_DISPLACED: u16 = 4001;

/// Counts an open session (for the gauge and for shutdown, which waits for sessions to
/// end); dropping it notifies.
struct Slot(AppState);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.metrics.ws_open.dec();
        self.0.ws_ended.notify_waiters();
    }
}

pub async fn upgrade(
    State(app): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Told of a token rotation or account removal from here on: subscribed before the
    // token is checked, so a rotation in between cannot leave this session on the old
    // token.
    let gone = app.accounts.subscribe(&queue);
    let token = bearer(&headers).or_else(|| protocol_token(&headers));
    if let Err(e) = authorize_token(&app, token, &queue) {
        return e.into_response();
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    if *app.shutdown.borrow() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let Some(gone) = gone else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "invalid token").into_response();
    };
    // The permit lives exactly as long as the session: a closed session frees its slot
    // at once.
    let Ok(permit) = Arc::clone(&app.ws_permits).try_acquire_owned() else {
        inc(&app.metrics.ws_refused, 1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many WebSocket sessions; retry later",
        )
        .into_response();
    };
    let sub = match app.store.subscribe(queue.as_bytes(), None) {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    app.metrics.ws_open.inc();
    let slot = Slot(Arc::clone(&app));
    // Registered now, in the order the upgrade requests are answered, so the session
    // whose upgrade came last is the one that stays (registering once the handshake is
    // done let an older session's slower task displace the newer one). An upgrade that
    // then fails drops its registration with the callback.
    let queue: Arc<str> = queue.into();
    let (reg, displaced, n) = app.sessions.register(&queue);
    inc(&app.metrics.ws_displaced, n as u64);
    upgrade
        .protocols([PROTOCOL])
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            let _permit = permit;
            let _reg = reg;
            Session::new(app, queue, gone, sub, displaced)
                .run(socket)
                .await;
        })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckFrame {
    ack: AckId,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AckId {
    Str(String),
    Num(u64),
}

fn parse_ack(text: &str) -> Option<MessageId> {
    let f: AckFrame = serde_json::from_str(text).ok()?;
    match f.ack {
        AckId::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        AckId::Str(_) => None,
        AckId::Num(n) => Some(MessageId(n)),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// What the session loop does after an event.
enum Next {
    Continue,
    /// Read and push what is after the cursor.
    Read,
    /// Send a keep-alive ping.
    Ping,
    /// Ping, then read (in flight was full: expired messages may have freed slots).
    PingAndRead,
    /// End the session, sending this close frame first.
    End(Option<Message>),
}

/// The engine's subscription fired.
fn after_wait(r: cinder::Result<()>) -> Next {
    match r {
        Ok(()) => Next::Read,
        Err(cinder::Error::Closed) => {
            Next::End(Some(close(close_code::AWAY, "server shutting down")))
        }
        Err(e) => internal_error("wait", &e),
    }
}

fn internal_error(what: &str, e: &dyn std::fmt::Display) -> Next {
    tracing::error!("websocket {what}: {e}");
    Next::End(Some(close(close_code::ERROR, "internal error")))
}

struct Session {
    app: AppState,
    queue: Arc<str>,
    gone: watch::Receiver<()>,
    /// The last message sent: the next read starts after it.
    cursor: Option<MessageId>,
    /// Sent, not yet acked: id -> expiry (ms).
    in_flight: HashMap<u64, u64>,
    /// The next read may go deep into stored messages (the backlog at the start, or a
    /// read that filled its batch): it runs on the blocking pool, where a read of cold
    /// pages from disk stalls no async worker. Otherwise the session was woken by new
    /// messages, which the append just wrote through the page cache: read in place.
    backlog: bool,
    /// Fires when the queue has a message after the cursor.
    sub: Subscription,
    /// Fires when a newer session for the queue displaced this one.
    displaced: oneshot::Receiver<()>,
    /// When the client was last heard from (any frame, pongs included).
    heard: Instant,
}

impl Session {
    fn new(
        app: AppState,
        queue: Arc<str>,
        gone: watch::Receiver<()>,
        sub: Subscription,
        displaced: oneshot::Receiver<()>,
    ) -> Self {
        Session {
            app,
            queue,
            gone,
            cursor: None,
            in_flight: HashMap::new(),
            backlog: true,
            sub,
            displaced,
            heard: Instant::now(),
        }
    }

    fn app(&self) -> &App {
        &self.app
    }

    async fn run(mut self, mut socket: WebSocket) {
        let mut shutdown = self.app.shutdown.clone();
        let mut want_read = true;
        let mut next_ping = Instant::now() + PING_EVERY;
        let end = loop {
            if *shutdown.borrow() {
                break Some(close(close_code::AWAY, "server shutting down"));
            }
            if want_read {
                match self.push(&mut socket).await {
                    Ok(more) => want_read = more,
                    Err(end) => break end,
                }
                if want_read {
                    continue;
                }
            }
            let room = self.in_flight.len() < MAX_IN_FLIGHT;
            let next = tokio::select! {
                r = &mut self.sub, if room => after_wait(r),
                msg = socket.recv() => {
                    self.heard = Instant::now();
                    self.on_frame(msg)
                }
                () = tokio::time::sleep_until(next_ping) => {
                    next_ping = Instant::now() + PING_EVERY;
                    if self.heard.elapsed() >= SILENT_LIMIT {
                        Next::End(Some(close(close_code::POLICY, "no answer to pings")))
                    } else if room {
                        Next::Ping
                    } else {
                        // In flight is full and the client is silent: look again for
                        // slots of messages that expired unacked.
                        Next::PingAndRead
                    }
                }
                r = self.gone.changed() => match r {
                    Ok(()) => Next::End(Some(close(CLOSE_TOKEN_ROTATED, "token rotated"))),
                    Err(_) => Next::End(Some(close(CLOSE_ACCOUNT_DELETED, "account deleted"))),
                },
                _ = &mut self.displaced => {
                    Next::End(Some(close(CLOSE_DISPLACED, "displaced by a newer session")))
                }
                r = shutdown.changed() => match r {
                    Ok(()) => Next::Continue,
                    Err(_) => Next::End(Some(close(close_code::AWAY, "server shutting down"))),
                },
            };
            match next {
                Next::Continue => {}
                Next::Read => want_read = true,
                Next::Ping | Next::PingAndRead => {
                    let ping = Message::Ping(axum::body::Bytes::new());
                    if socket.send(ping).await.is_err() {
                        break None;
                    }
                    want_read |= matches!(next, Next::PingAndRead);
                }
                Next::End(m) => break m,
            }
        };
        if let Some(m) = end {
            if socket.send(m).await.is_ok() {
                // The closing handshake: wait (briefly) for the client's close frame, so
                // closing the socket does not reset the connection under the client's
                // read of ours.
                // Acks that cross our close frame still count.
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    while let Some(Ok(m)) = socket.recv().await {
                        match m {
                            Message::Close(_) => break,
                            Message::Text(t) => {
                                if let Some(id) = parse_ack(t.as_str()) {
                                    let _ = self.ack(id);
                                }
                            }
                            _ => {}
                        }
                    }
                })
                .await;
            }
        }
    }

    /// Applies a client's ack. It does not wait for the ack record's fsync (nobody
    /// awaits an answer to it, and the engine call then does no I/O, so it runs right
    /// here): the message is gone from reads at once, and its record is synced with the
    /// writer's next commit. A crash before that redelivers it, which the protocol allows.
    fn ack(&mut self, id: MessageId) -> Next {
        match self
            .app
            .store
            .ack_batch_nowait(self.queue.as_bytes(), &[id])
        {
            Ok(n) => {
                inc(&self.app.metrics.messages_acked, n);
                Next::Continue
            }
            Err(cinder::Error::Closed) => {
                Next::End(Some(close(close_code::AWAY, "server shutting down")))
            }
            // The disk refused a segment for ack records: the acks wait in the engine
            // until space frees (a crash before then redelivers them). Not this
            // session's fault, and not a reason to end it.
            Err(cinder::Error::DiskFull { .. }) => Next::Continue,
            Err(e) => internal_error("ack", &e),
        }
    }

    /// A frame from the client (or the end of the stream).
    fn on_frame(&mut self, msg: Option<Result<Message, axum::Error>>) -> Next {
        match msg {
            Some(Ok(Message::Text(t))) => {
                let Some(id) = parse_ack(t.as_str()) else {
                    return Next::End(Some(close(
                        close_code::POLICY,
                        "expected {\"ack\": \"<id>\"}",
                    )));
                };
                let was_full = self.in_flight.len() >= MAX_IN_FLIGHT;
                self.in_flight.remove(&id.0);
                if let end @ Next::End(_) = self.ack(id) {
                    return end;
                }
                if was_full && self.in_flight.len() < MAX_IN_FLIGHT {
                    Next::Read
                } else {
                    Next::Continue
                }
            }
            Some(Ok(Message::Binary(_))) => Next::End(Some(close(
                close_code::UNSUPPORTED,
                "binary frames are not used",
            ))),
            // Over `MAX_CLIENT_MESSAGE`: refused before it is buffered (tungstenite's
            // capacity error); only this session ends.
            Some(Err(e)) if e.to_string().contains("too long") => {
                Next::End(Some(close(close_code::SIZE, "message too big")))
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => Next::End(None),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Next::Continue,
        }
    }

    /// Sends the next messages after the cursor while there is room in flight. `Ok(true)`
    /// if a full batch went out (there may be more); `Err` ends the session, with the
    /// close frame to send.
    async fn push(&mut self, socket: &mut WebSocket) -> Result<bool, Option<Message>> {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            // Messages that expired unacked can never be acked: free their slots.
            let now = now_ms();
            self.in_flight.retain(|_, exp| *exp > now);
        }
        let room = MAX_IN_FLIGHT.saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(false);
        }
        // Nothing after the cursor (a new session on an empty queue, or a wake-up whose
        // message another reader took): no read at all, and no blocking-pool thread for
        // thousands of sessions connecting at once.
        if !self.sub.is_ready() {
            self.backlog = false;
            return Ok(false);
        }
        let batch = room.min(READ_BATCH);
        let store = Arc::clone(&self.app().store);
        let (q, cursor) = (Arc::clone(&self.queue), self.cursor);
        // With Async durability a message is readable before the writer has written it,
        // and reading it waits for that write: such reads go to the blocking pool too.
        let read = if self.backlog || !self.app.cfg.inline_reads {
            tokio::task::spawn_blocking(move || store.read(q.as_bytes(), cursor, batch))
                .await
                .unwrap_or_else(|e| {
                    tracing::error!("websocket read task: {e}");
                    Err(cinder::Error::Closed)
                })
        } else {
            store.read(q.as_bytes(), cursor, batch)
        };
        let msgs = match read {
            Ok(m) => m,
            Err(cinder::Error::Closed) => {
                return Err(Some(close(close_code::AWAY, "server shutting down")))
            }
            Err(e) => {
                tracing::error!("websocket read: {e}");
                return Err(Some(close(close_code::ERROR, "internal error")));
            }
        };
        let full = msgs.len() == batch;
        self.backlog = full;
        for m in &msgs {
            let text = message_json(m).to_string();
            if socket.send(Message::Text(text.into())).await.is_err() {
                return Err(None);
            }
            self.in_flight.insert(m.id.0, m.expires_at_ms);
            self.cursor = Some(m.id);
        }
        self.sub.set_after(self.cursor);
        inc(&self.app().metrics.messages_pushed_ws, msgs.len() as u64);
        Ok(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_frames() {
        assert_eq!(parse_ack(r#"{"ack": "42"}"#), Some(MessageId(42)));
        assert_eq!(parse_ack(r#"{"ack": 42}"#), Some(MessageId(42)));
        assert_eq!(parse_ack(r#"{"ack": "x"}"#), None);
        assert_eq!(parse_ack(r#"{"ack": "-1"}"#), None);
        assert_eq!(parse_ack(r#"{"ack": "1", "x": 2}"#), None);
        assert_eq!(parse_ack("hello"), None);
    }
}
