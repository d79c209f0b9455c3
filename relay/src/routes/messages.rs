//! Send, read, delete and ack messages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use cinder::MessageId;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{authorize, AppState, Config};
use crate::errors::{blocking, ApiError};
use crate::limits::client_key;
use crate::metrics::inc;

/// Messages per read, by default and at most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// Ids per ack request, at most.
pub const MAX_ACK_IDS: usize = 1000;
/// Charged against a recipient's inbound budget per message on top of its payload.
pub const PER_MESSAGE_COST: u64 = 64;

pub const TTL_HEADER: &str = "x-cinder-ttl";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const MESSAGE_ID_HEADER: &str = "x-cinder-message-id";

const TOO_LARGE: ApiError = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "message too large");

/// The JSON form of a message (HTTP reads and WebSocket frames).
pub fn message_json(m: &cinder::Message) -> Value {
    json!({
        "id": m.id.to_string(),
        "payload": STANDARD.encode(&m.payload),
        "expires_at": m.expires_at_ms / 1000,
    })
}

fn ttl(headers: &HeaderMap, cfg: &Config) -> Result<Duration, ApiError> {
    const BAD: ApiError =
        ApiError::bad_request("X-Cinder-Ttl must be whole seconds, 1 ..= max TTL");
    let Some(v) = headers.get(TTL_HEADER) else {
        return Ok(cfg.default_ttl);
    };
    let secs: u64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(BAD)?;
    let ttl = Duration::from_secs(secs);
    if secs == 0 || ttl > cfg.max_ttl {
        return Err(BAD);
    }
    Ok(ttl)
}

/// A request body must arrive within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(TOO_LARGE);
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, max).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(TOO_LARGE),
        Ok(Err(_)) => Err(ApiError::bad_request("could not read the request body")),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request body too slow",
        )),
    }
}

/// The sender's idempotency key (`Idempotency-Key`, or `X-Cinder-Message-Id`): 1 to 255
/// visible ASCII characters, turned into the engine's 16-byte client message id by a
/// BLAKE3 derivation (so any format, a UUID or other, works the same, and the key itself
/// is kept nowhere).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<cinder::ClientMessageId>, ApiError> {
    const BAD: ApiError =
        ApiError::bad_request("Idempotency-Key must be 1 ..= 255 visible ASCII characters");
    let v = match (headers.get(IDEMPOTENCY_KEY), headers.get(MESSAGE_ID_HEADER)) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give one of Idempotency-Key and X-Cinder-Message-Id",
            ))
        }
        (Some(v), None) | (None, Some(v)) => v.as_bytes(),
    };
    if v.is_empty() || v.len() > 255 || !v.iter().all(u8::is_ascii_graphic) {
        return Err(BAD);
    }
    let h = blake3::derive_key("cinder-relay 2026-12 idempotency key v1", v);
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[..16]);
    Ok(Some(cinder::ClientMessageId(id)))
}

/// `PUT /v1/queues/{queue}/messages`: no token; rate-limited per client address and per
/// recipient. `201 {"id"}` once the message is durable; with an `Idempotency-Key` that
/// this queue has on record, `200 {"id"}` of that message and nothing stored.
pub async fn send(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if let Err(wait) = app.send_limit.try_take(&client_key(peer.ip()), 1.0) {
        inc(&app.metrics.limited_client, 1);
        return Err(ApiError::too_many("rate limit exceeded; retry later").retry_after(wait));
    }
    if !app.accounts.exists(&queue) {
        return Err(ApiError::not_found("unknown queue"));
    }
    let ttl = ttl(&headers, &app.cfg)?;
    let key = idempotency_key(&headers)?;
    let payload = read_body(body, &headers, app.cfg.max_message_bytes).await?;
    let cost = (payload.len() as u64 + PER_MESSAGE_COST) as f64;
    if let Err(wait) = app.inbound_limit.try_take(&queue, cost) {
        inc(&app.metrics.limited_recipient, 1);
        return Err(
            ApiError::too_many("recipient's inbound budget exceeded; retry later")
                .retry_after(wait),
        );
    }
    let store = Arc::clone(&app.store);
    let q = queue.clone();
    let len = payload.len() as u64;
    let appended = blocking(move || match key {
        Some(k) => store.append_once(q.as_bytes(), k, &payload, ttl),
        None => store
            .append(q.as_bytes(), &payload, ttl)
            .map(cinder::Appended::Stored),
    })
    .await;
    let id = match appended {
        Ok(cinder::Appended::Stored(id)) => id,
        Ok(cinder::Appended::Duplicate(id)) => {
            // Stored before: nothing new, so nothing counted against the recipient.
            app.inbound_limit.refund(&queue, cost);
            inc(&app.metrics.messages_deduplicated, 1);
            return Ok((StatusCode::OK, Json(json!({ "id": id.to_string() }))));
        }
        Err(e) => {
            app.inbound_limit.refund(&queue, cost);
            return Err(e);
        }
    };
    if !app.accounts.exists(&queue) {
        // The account was deleted while this message was written: drop it.
        let store = Arc::clone(&app.store);
        blocking(move || store.ack(queue.as_bytes(), id)).await?;
        return Err(ApiError::not_found("unknown queue"));
    }
    inc(&app.metrics.messages_sent, 1);
    inc(&app.metrics.bytes_sent, len);
    Ok((StatusCode::CREATED, Json(json!({ "id": id.to_string() }))))
}

#[derive(Debug, Deserialize)]
pub struct ReadParams {
    after: Option<String>,
    limit: Option<String>,
}

fn parse_id(s: &str) -> Option<MessageId> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `GET /v1/queues/{queue}/messages?after=<id>&limit=<n>`: FIFO page, `more` if there is
/// another.
pub async fn read(
    State(app): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers, &queue)?;
    let Query(p) = query.map_err(|_| ApiError::bad_request("bad query string"))?;
    let after = match p.after.as_deref() {
        None | Some("") => None,
        Some(s) => Some(parse_id(s).ok_or(ApiError::bad_request("after must be a message id"))?),
    };
    let limit = match p.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(s) => match s.trim().parse::<usize>() {
            Ok(0) | Err(_) => return Err(ApiError::bad_request("limit must be 1 ..= 1000")),
            Ok(n) => n.min(MAX_LIMIT),
        },
    };
    let store = Arc::clone(&app.store);
    let mut msgs = blocking(move || store.read(queue.as_bytes(), after, limit + 1)).await?;
    let more = msgs.len() > limit;
    msgs.truncate(limit);
    let list: Vec<Value> = msgs.iter().map(message_json).collect();
    Ok(Json(json!({ "messages": list, "more": more })))
}

/// `DELETE /v1/queues/{queue}/messages/{id}`: `204`, or `404` if unknown or already acked.
pub async fn delete_one(
    State(app): State<AppState>,
    Path((queue, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&app, &headers, &queue)?;
    let id = parse_id(&id).ok_or(ApiError::bad_request("invalid message id"))?;
    let store = Arc::clone(&app.store);
    if blocking(move || store.ack(queue.as_bytes(), id)).await? {
        inc(&app.metrics.messages_acked, 1);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("no such message"))
    }
}

/// A message id in a JSON body: a string (canonical) or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum JsonId {
    Str(String),
    Num(u64),
}

impl JsonId {
    fn id(&self) -> Option<MessageId> {
        match self {
            JsonId::Str(s) => parse_id(s),
            JsonId::Num(n) => Some(MessageId(*n)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    ids: Option<Vec<JsonId>>,
    through: Option<JsonId>,
}

/// `POST /v1/queues/{queue}/ack` with `{"ids": [..]}` or `{"through": id}`:
/// `200 {"acked": n}`.
pub async fn ack(
    State(app): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers, &queue)?;
    let body = read_body(body, &headers, 64 << 10).await?;
    let req: AckBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(r#"body must be {"ids": ["<id>", ..]} or {"through": "<id>"}"#)
    })?;
    let store = Arc::clone(&app.store);
    let acked = match (req.ids, req.through) {
        (Some(ids), None) => {
            if ids.len() > MAX_ACK_IDS {
                return Err(ApiError::bad_request("at most 1000 ids per ack"));
            }
            let ids: Vec<MessageId> = ids
                .iter()
                .map(JsonId::id)
                .collect::<Option<_>>()
                .ok_or(ApiError::bad_request("invalid message id"))?;
            blocking(move || store.ack_batch(queue.as_bytes(), &ids)).await?
        }
        (None, Some(t)) => {
            let t = t.id().ok_or(ApiError::bad_request("invalid message id"))?;
            blocking(move || store.ack_through(queue.as_bytes(), t)).await?
        }
        _ => {
            return Err(ApiError::bad_request(
                r#"body must have exactly one of "ids" and "through""#,
            ))
        }
    };
    inc(&app.metrics.messages_acked, acked);
    Ok(Json(json!({ "acked": acked })))
}
