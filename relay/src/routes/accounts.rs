//! `POST /v1/accounts`, `DELETE /v1/accounts/{queue}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use super::{authorize, bearer, AppState};
use crate::accounts::{Auth, Rotation};
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

/// `POST /v1/accounts/{queue}/token` with the current token, optionally with a body
/// `{"token": "<43 base64url characters>"}` choosing the new one: `200 {"token"}`. The
/// old token stops working at once; WebSocket sessions opened with it are closed (4002).
/// A client that chose its token and lost the answer repeats the request with the new
/// token: that is a no-op `200`.
pub async fn rotate_token(
    State(app): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    let Some(presented) = bearer(&headers).map(str::to_string) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token",
        ));
    };
    let body = super::messages::read_body(body, &headers, 1024).await?;
    let chosen = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Chosen {
            token: String,
        }
        let c: Chosen = serde_json::from_slice(&body)
            .map_err(|_| ApiError::bad_request(r#"body must be empty or {"token": "<token>"}"#))?;
        Some(c.token)
    };
    let a = Arc::clone(&app);
    let r = blocking(move || {
        a.accounts
            .rotate_token(&queue, &presented, chosen.as_deref())
    })
    .await?;
    match r {
        Rotation::Done(token) => {
            inc(&app.metrics.tokens_rotated, 1);
            Ok(Json(json!({ "token": token })))
        }
        Rotation::Refused(Auth::Forbidden) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "token is not for this queue",
        )),
        Rotation::Refused(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token")),
        Rotation::BadToken => Err(ApiError::bad_request(
            "a chosen token must be 43 base64url characters (256 random bits)",
        )),
    }
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
