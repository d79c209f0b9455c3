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
use axum::{extract::State, middleware, Router};
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

pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", post(accounts::create))
        .route("/v1/accounts/{queue}", delete(accounts::remove))
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
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(envelope::envelope))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            crate::metrics::track,
        ))
        .with_state(app)
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// 401 without a valid token, 403 for a valid token of another queue.
pub fn authorize(app: &App, headers: &HeaderMap, queue: &str) -> Result<(), ApiError> {
    let Some(token) = bearer(headers) else {
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

async fn healthz(State(app): State<AppState>) -> Response {
    if *app.shutdown.borrow() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
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
