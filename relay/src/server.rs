//! Accepting connections: the listener loop, the cap on open connections, HTTP/1.1
//! settings per connection, and graceful shutdown.
//!
//! - Every accepted socket takes a permit of the connection cap and holds it until the
//!   socket closes, WebSocket sessions included (the permit travels inside the socket's
//!   I/O wrapper, which a WebSocket upgrade keeps). Over the cap a socket gets a canned
//!   `503` with `Retry-After` and `Connection: close`, and one log line per episode says
//!   the cap was hit (and how many were refused once it clears).
//! - hyper's header-read timeout bounds both a request's headers (slowloris) and the idle
//!   wait of a keep-alive connection for its next request: a silent, slow or idle socket
//!   is closed after [`Limits::header_timeout`], and so never holds shutdown longer.
//! - On shutdown the listener stops, idle connections close at once, requests in flight
//!   finish; [`Server::drain`] waits for every socket to close, up to a deadline.

use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt as _;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open sockets at most (HTTP and WebSocket).
    pub max_connections: usize,
    /// Time for a request's headers, counted from the connection's start or the end of
    /// its previous response (so it is also the keep-alive idle timeout).
    pub header_timeout: Duration,
}

/// The largest request head (request line and headers) read; hyper answers 431 above it.
const MAX_HEAD: usize = 16 << 10;
/// Sockets refused over the cap that are still being answered, at most; more are closed
/// without an answer.
const MAX_REFUSING: usize = 64;
/// How long a refused socket is read (and discarded) after its answer, so that closing
/// it does not reset the connection before the client has read the answer.
const REFUSE_LINGER: Duration = Duration::from_secs(1);
/// The answer to a socket over the cap.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 51\r\n\r\n{\"error\":\"too many connections; retry in a second\"}";
/// Accept errors (out of descriptors, ...) pause the loop this long.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// A cap episode is logged at most this often.
const CAP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Counters the listener keeps (read by /metrics).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Sockets open now (HTTP and WebSocket).
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Sockets refused over the cap.
    pub refused: AtomicU64,
}

/// The running listener.
#[derive(Debug)]
pub struct Server {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Server {
    /// Serves `router` on `listener` until `shutdown` turns `true`. Returns once the
    /// listener has stopped; sockets are still open then (see [`Server::drain`]).
    pub async fn run(
        listener: TcpListener,
        router: Router,
        limits: Limits,
        stats: Arc<ConnStats>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Server {
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
        let mut cap = CapLog::default();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: the cap should keep us clear of them; if not,
                    // do not spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if let Ok(permit) = Arc::clone(&permits).try_acquire_owned() {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                stats.open.fetch_add(1, Ordering::Relaxed);
                cap.cleared(permits.available_permits(), limits.max_connections);
                let io = Counted {
                    tcp,
                    _permit: permit,
                    stats: Arc::clone(&stats),
                };
                tokio::spawn(serve_connection(
                    io,
                    peer,
                    router.clone(),
                    limits,
                    shutdown.clone(),
                ));
            } else {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                cap.hit(limits.max_connections);
                if let Ok(slot) = Arc::clone(&refusing).try_acquire_owned() {
                    tokio::spawn(refuse(tcp, slot));
                }
            }
        }
        Server {
            permits,
            max: limits.max_connections,
        }
    }

    /// Waits until every socket has closed, at most until `deadline`; `false` if some
    /// were still open then.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> bool {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        tokio::time::timeout_at(deadline, self.permits.acquire_many(all))
            .await
            .is_ok()
    }

    /// Open sockets now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// One connection: HTTP/1.1 with upgrades (WebSocket), the header timeout, graceful
/// shutdown.
async fn serve_connection(
    io: Counted,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let svc = router.map_request(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.map(Body::new)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
        .with_upgrades();
    let mut conn = pin!(conn);
    let mut told = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = shutdown.wait_for(|s| *s), if !told => {
                // Idle connections close now; a request in flight finishes first.
                told = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Answers a socket over the cap, then reads what it sent for a moment before closing,
/// so the close does not reset the connection under the client's read of the answer.
async fn refuse(mut tcp: TcpStream, _slot: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        tcp.write_all(REFUSAL).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64usize << 10;
        while left > 0 {
            let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<_, io::Error>(())
    })
    .await;
}

/// One log line when the cap is first hit (at most every [`CAP_LOG_EVERY`]), and one
/// when connections are accepted again.
#[derive(Debug, Default)]
struct CapLog {
    /// When the current episode was logged, and how many it refused so far.
    episode: Option<(Instant, u64)>,
}

impl CapLog {
    fn hit(&mut self, max: usize) {
        if let Some((at, n)) = &mut self.episode {
            *n += 1;
            if at.elapsed() >= CAP_LOG_EVERY {
                tracing::warn!(
                    "connection cap {max} still reached: {n} connections refused so far (raise --max-connections or the open-files limit)"
                );
                *at = Instant::now();
            }
        } else {
            tracing::warn!(
                "connection cap {max} reached: refusing new connections with 503 (raise --max-connections or the open-files limit)"
            );
            self.episode = Some((Instant::now(), 1));
        }
    }

    fn cleared(&mut self, available: usize, max: usize) {
        // Logged once there is room again for a tenth of the cap, not at every accept.
        if available >= max / 10 {
            if let Some((_, n)) = self.episode.take() {
                tracing::info!("accepting connections again; {n} were refused at the cap");
            }
        }
    }
}

/// A socket that holds its connection-cap permit until it is dropped, whatever protocol
/// it ends up speaking.
#[derive(Debug)]
struct Counted {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
    stats: Arc<ConnStats>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_whole_json_response() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].is_string());
    }
}
