//! What every response passes through on its way out:
//!
//! - **JSON error bodies.** A 4xx or 5xx whose body is not JSON (axum's own rejections:
//!   405, a path that is not UTF-8, a WebSocket request without `Upgrade`, ...) gets
//!   `{"error": "<reason>"}` instead. The reason is the status's canonical phrase: a
//!   rejection's own text can quote the request, queue ids included.
//! - **`Retry-After`** on every 429 and 503 that does not carry one already.
//! - **A request body the handler did not read** (a 404, 413 or 429 decided before the
//!   body): a small declared one (≤ [`DRAIN_MAX`]) is read and discarded so the
//!   keep-alive connection stays usable; anything else gets `Connection: close`, so the
//!   client knows not to send its next request on a connection whose input is unread.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use parking_lot::Mutex;

/// An unread request body up to this many declared bytes is drained, not left behind.
pub const DRAIN_MAX: u64 = 64 << 10;
/// ... if it arrives within this.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// `Retry-After` seconds when the handler did not say.
const RETRY_429: &str = "1";
const RETRY_503: &str = "5";

/// The middleware (outermost layer but the metrics one).
pub async fn envelope(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    let has_body =
        declared.is_some_and(|n| n > 0) || req.headers().contains_key(header::TRANSFER_ENCODING);
    let mut resp = if has_body {
        let (parts, body) = req.into_parts();
        let shared = Shared(Arc::new(Mutex::new(Some(body))));
        let handler_side = Body::new(Shared(Arc::clone(&shared.0)));
        let resp = next.run(Request::from_parts(parts, handler_side)).await;
        settle_body(resp, &shared, declared).await
    } else {
        next.run(req).await
    };
    json_error_body(&mut resp);
    retry_after(&mut resp);
    resp
}

/// Drains what the handler left of a small body, or marks the connection to be closed.
async fn settle_body(mut resp: Response, shared: &Shared, declared: Option<u64>) -> Response {
    let Some(unread) = shared.0.lock().take() else {
        return resp; // read to its end
    };
    if declared.is_some_and(|n| n <= DRAIN_MAX) && drain(unread).await {
        return resp;
    }
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Reads `body` to its end within [`DRAIN_TIME`] (at most [`DRAIN_MAX`] bytes).
async fn drain(body: Body) -> bool {
    let limited = http_body_util::Limited::new(body, DRAIN_MAX as usize);
    matches!(
        tokio::time::timeout(DRAIN_TIME, limited.collect()).await,
        Ok(Ok(_))
    )
}

fn json_error_body(resp: &mut Response) {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return;
    }
    let reason = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase();
    let body = serde_json::json!({ "error": reason }).to_string();
    let h = resp.headers_mut();
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    *resp.body_mut() = Body::from(body);
}

fn retry_after(resp: &mut Response) {
    let secs = match resp.status() {
        StatusCode::TOO_MANY_REQUESTS => RETRY_429,
        StatusCode::SERVICE_UNAVAILABLE => RETRY_503,
        _ => return,
    };
    resp.headers_mut()
        .entry(header::RETRY_AFTER)
        .or_insert(HeaderValue::from_static(secs));
}

/// A request body shared by the handler (which reads it through this) and the
/// middleware (which takes what is left once the handler is done). `None` once read to
/// its end.
struct Shared(Arc<Mutex<Option<Body>>>);

impl http_body::Body for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut slot = self.0.lock();
        let Some(body) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(body).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            *slot = None;
        }
        r
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .lock()
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_become_json_and_busy_answers_say_when_to_retry() {
        let mut r = Response::new(Body::from("Method Not Allowed"));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        json_error_body(&mut r);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let mut ok = Response::new(Body::from("fine"));
        json_error_body(&mut ok);
        assert!(ok.headers().get(header::CONTENT_TYPE).is_none());
        let mut busy = Response::new(Body::empty());
        *busy.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        retry_after(&mut busy);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
        busy.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        retry_after(&mut busy);
        assert_eq!(
            busy.headers()[header::RETRY_AFTER],
            "7",
            "a handler's own value stays"
        );
    }
}
