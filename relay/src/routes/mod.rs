//! The HTTP API: the shared state, the router, bearer auth, and the operational routes.

mod accounts;
mod envelope;
mod messages;
pub use messages::PER_MESSAGE_COST;
mod ws;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{extract::State, middleware, Json, Router};
use serde_json::json;
use tokio::sync::{watch, Notify, Semaphore};

use crate::accounts::{Accounts, Auth};
use crate::errors::{blocking, ApiError};
use crate::limits::Limiter;
use crate::metrics::Metrics;

/// Limits and defaults the handlers apply.
#[derive(Debug, Clone)]
pub struct Config {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub max_message_bytes: usize,
    /// WebSocket sessions may read new messages on their own task: they are written
    /// before they become readable (not so with Async durability).
    pub inline_reads: bool,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    pub store: Arc<cinder::Store>,
    pub accounts: Accounts,
    pub metrics: Metrics,
    pub cfg: Config,
    /// Sends per client address.
    pub send_limit: Limiter<IpAddr>,
    /// Inbound payload bytes per recipient queue.
    pub inbound_limit: Limiter<String>,
    /// Account creations per client address.
    pub account_limit: Limiter<IpAddr>,
    /// Becomes `true` when the server shuts down: WebSocket sessions close.
    pub shutdown: watch::Receiver<bool>,
    /// Notified whenever a WebSocket session ends.
    pub ws_ended: Notify,
    /// One permit per WebSocket session (`--max-ws-connections`).
    pub ws_permits: Arc<Semaphore>,
    /// Live sessions per queue (`--sessions-per-queue`).
    pub sessions: Arc<crate::sessions::Sessions>,
    /// The listener's connection counters.
    pub conn_stats: Arc<crate::server::ConnStats>,
}

pub type AppState = Arc<App>;

/// Where `/metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsOn {
    /// On the API listener.
    Api,
    /// Only on the operations listener (`--metrics-listen`): the API has no `/metrics`.
    OpsListener,
}

/// The API: accounts, messages, WebSocket, health (and metrics unless they have a
/// listener of their own).
pub fn router(app: AppState, metrics_on: MetricsOn) -> Router {
    let mut r = Router::new()
        .route("/v1/accounts", post(accounts::create))
        .route("/v1/accounts/{queue}", delete(accounts::remove))
        .route("/v1/accounts/{queue}/token", post(accounts::rotate_token))
        .route(
            "/v1/queues/{queue}/messages",
            put(messages::send).get(messages::read),
        )
        .route(
            "/v1/queues/{queue}/messages/{id}",
            delete(messages::delete_one),
        )
        .route("/v1/queues/{queue}/ack", post(messages::ack))
        .route("/v1/queues/{queue}/ws", get(ws::upgrade))
        .route("/healthz", get(healthz));
    if metrics_on == MetricsOn::Api {
        r = r.route("/metrics", get(metrics));
    }
    finish(r, app)
}

/// The operations listener (`--metrics-listen`): `/metrics` and `/healthz` only.
pub fn ops_router(app: AppState) -> Router {
    let r = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz));
    finish(r, app)
}

fn finish(r: Router<AppState>, app: AppState) -> Router {
    r.fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(envelope::envelope))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            crate::metrics::track,
        ))
        .with_state(app)
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// 401 without a valid bearer token, 403 for a valid token of another queue.
pub fn authorize(app: &App, headers: &HeaderMap, queue: &str) -> Result<(), ApiError> {
    authorize_token(app, bearer(headers), queue)
}

/// [`authorize`] with the token found elsewhere (a WebSocket's subprotocol header).
pub fn authorize_token(app: &App, token: Option<&str>, queue: &str) -> Result<(), ApiError> {
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token",
        ));
    };
    match app.accounts.authorize(queue, token) {
        Auth::Ok => Ok(()),
        Auth::Unauthorized => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token")),
        Auth::Forbidden => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "token is not for this queue",
        )),
    }
}

/// `200 {"status": "ok"}`, or `503` with the reason while sends would fail: shutting
/// down, the disk quota reached, a full disk, a stopped writer (the store's `health()`,
/// no I/O).
async fn healthz(State(app): State<AppState>) -> Response {
    let degraded = |status: &str, reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": status, "reason": reason, "error": format!("{status}: {reason}") })),
        )
            .into_response()
    };
    if *app.shutdown.borrow() {
        return degraded("shutting down", "the relay is shutting down".into());
    }
    match app.store.health() {
        cinder::Health::Ok => Json(json!({ "status": "ok" })).into_response(),
        h => degraded("degraded", h.to_string()),
    }
}

async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let a = Arc::clone(&app);
    let text = blocking(move || {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &a.conn_stats;
        let snap = crate::metrics::Snapshot {
            stats: a.store.stats(),
            accounts: a.accounts.len() as u64,
            connections_open: c.open.load(Relaxed),
            connections_accepted: c.accepted.load(Relaxed),
            connections_refused: c.refused.load(Relaxed),
        };
        Ok::<_, cinder::Error>(a.metrics.render(&snap))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }
}
