//! API errors: an HTTP status and a short JSON body `{"error": "..."}`.
//!
//! Engine errors map to statuses; anything unexpected is a 500 whose body says only
//! "internal error" (details go to the log, which never holds payloads, tokens or keys).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: &'static str,
    /// `Retry-After` seconds (429 and 503 get a default without it: `routes::envelope`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub const fn new(status: StatusCode, message: &'static str) -> Self {
        ApiError {
            status,
            message,
            retry_after: None,
        }
    }

    /// With `Retry-After: ceil(wait)` (at least one second).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = Some(secs.max(1));
        self
    }

    pub const fn bad_request(message: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub const fn not_found(message: &'static str) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub const fn too_many(message: &'static str) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, message)
    }

    pub const fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    /// Logs an unexpected failure (never with request data) and returns a 500.
    pub fn internal_logged(what: &str, err: &dyn std::fmt::Display) -> Self {
        tracing::error!("{what}: {err}");
        Self::internal()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"cinder-relay\""),
            );
        }
        resp
    }
}

impl From<cinder::Error> for ApiError {
    fn from(e: cinder::Error) -> Self {
        use cinder::Error as E;
        match e {
            E::MessageTooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "message too large")
            }
            E::InvalidTtl { .. } => Self::bad_request("invalid TTL"),
            E::QueueFull { .. } => Self::too_many("recipient queue is full"),
            E::QueueBytesExceeded { .. } => Self::too_many("recipient queue byte quota exceeded"),
            E::DiskQuotaExceeded { .. } | E::DiskFull { .. } => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "relay storage is full")
            }
            E::InvalidQueueId { .. } => Self::bad_request("invalid queue id"),
            E::Closed => Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
            other => Self::internal_logged("store", &other),
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        Self::internal_logged("accounts file", &e)
    }
}

/// Runs a blocking call (engine, accounts file) off the async workers.
pub async fn blocking<T, E, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
    ApiError: From<E>,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal_logged("blocking task", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses() {
        use cinder::Error as E;
        let s = |e: E| ApiError::from(e).status.as_u16();
        assert_eq!(s(E::MessageTooLarge { size: 2, max: 1 }), 413);
        assert_eq!(
            s(E::InvalidTtl {
                ttl_ms: 0,
                max_ms: 1
            }),
            400
        );
        assert_eq!(s(E::QueueFull { len: 1, max: 1 }), 429);
        assert_eq!(
            s(E::QueueBytesExceeded {
                bytes: 1,
                adding: 1,
                max: 1
            }),
            429
        );
        assert_eq!(
            s(E::DiskQuotaExceeded {
                used: 1,
                adding: 1,
                quota: 1
            }),
            507
        );
        assert_eq!(s(E::DiskFull { path: "x".into() }), 507);
        assert_eq!(s(E::InvalidQueueId { len: 0 }), 400);
        assert_eq!(s(E::InvalidOptions("x".into())), 500);
    }
}
