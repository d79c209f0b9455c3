//! `POST /v1/accounts`, `DELETE /v1/accounts/{queue}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use super::{authorize, AppState};
use crate::errors::{blocking, ApiError};
use crate::limits::client_key;
use crate::metrics::inc;

/// Creates a queue and its token: `201 {"queue", "token"}`. The token is shown once.
pub async fn create(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if let Err(wait) = app.account_limit.try_take(&client_key(peer.ip()), 1.0) {
        inc(&app.metrics.limited_accounts, 1);
        return Err(ApiError::too_many("too many accounts created; retry later").retry_after(wait));
    }
    let a = Arc::clone(&app);
    let (queue, token) = blocking(move || a.accounts.create()).await?;
    inc(&app.metrics.accounts_created, 1);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "queue": queue, "token": token })),
    ))
}

/// `POST /v1/accounts/{queue}/token` with the current token: a new token,
/// `200 {"token"}`. The old one stops working at once; WebSocket sessions opened with it
/// are closed (4002) and must reconnect with the new one.
pub async fn rotate_token(
    State(app): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers, &queue)?;
    let a = Arc::clone(&app);
    let token = blocking(move || a.accounts.rotate_token(&queue))
        .await?
        // Removed between the check and the rotation.
        .ok_or(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"))?;
    inc(&app.metrics.tokens_rotated, 1);
    Ok(Json(json!({ "token": token })))
}

/// Removes the account, then purges its queue: `204`.
pub async fn remove(
    State(app): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&app, &headers, &queue)?;
    // Account first: no send is accepted for the queue once it is gone.
    let a = Arc::clone(&app);
    let q = queue.clone();
    blocking(move || a.accounts.remove(&q)).await?;
    let store = Arc::clone(&app.store);
    blocking(move || store.purge(queue.as_bytes())).await?;
    inc(&app.metrics.accounts_deleted, 1);
    Ok(StatusCode::NO_CONTENT)
}
