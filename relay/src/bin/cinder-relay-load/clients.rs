//! The relay's clients: accounts, recipients holding a WebSocket that ack every message,
//! idle WebSocket sessions, and senders.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::tally::Tally;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the relay is, and the local addresses to connect from (round robin: one source
/// address has ~28,000 ephemeral ports).
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub sources: Arc<Vec<IpAddr>>,
    next_source: Arc<AtomicUsize>,
}

impl Target {
    pub fn new(addr: SocketAddr, sources: Vec<IpAddr>) -> Self {
        Target {
            addr,
            sources: Arc::new(sources),
            next_source: Arc::default(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn tcp(&self) -> std::io::Result<TcpStream> {
        let sock = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.sources.is_empty() {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            sock.bind(SocketAddr::new(self.sources[i], 0))?;
        }
        let s = sock.connect(self.addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// A recipient: its queue and token.
#[derive(Debug, Clone)]
pub struct Account {
    pub queue: String,
    pub token: String,
}

/// Creates `n` accounts, 32 at a time (the relay must allow that many:
/// `--accounts-per-minute 0`).
pub async fn create_accounts(
    http: &reqwest::Client,
    target: &Target,
    n: usize,
) -> Result<Vec<Account>, BoxError> {
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (http, url, gate) = (http.clone(), target.url("/v1/accounts"), Arc::clone(&gate));
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await?;
            let resp = http.post(url).send().await?;
            if resp.status() != 201 {
                return Err(format!("account creation: {}", resp.status()).into());
            }
            let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
            let field = |k: &str| v[k].as_str().map(str::to_string).ok_or("bad account JSON");
            Ok::<_, BoxError>(Account {
                queue: field("queue")?,
                token: field("token")?,
            })
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

pub type Ws = WebSocketStream<TcpStream>;

/// Opens `account`'s WebSocket.
pub async fn connect(target: &Target, account: &Account) -> Result<Ws, BoxError> {
    let url = format!("ws://{}/v1/queues/{}/ws", target.addr, account.queue);
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", account.token).parse()?,
    );
    let tcp = target.tcp().await?;
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    Ok(ws)
}

/// Opens one WebSocket per account, `parallel` handshakes at a time.
pub async fn connect_all(
    target: &Target,
    accounts: &[Account],
    parallel: usize,
) -> Result<Vec<Ws>, BoxError> {
    let gate = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(accounts.len());
    for a in accounts {
        let (t, a, gate) = (target.clone(), a.clone(), Arc::clone(&gate));
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await?;
            connect(&t, &a).await
        }));
    }
    let mut out = Vec::with_capacity(accounts.len());
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// A recipient's session: every message is counted as delivered and acked at once.
/// Ends when the server closes or `stop` fires.
pub async fn receive(mut ws: Ws, tally: Arc<Tally>, mut stop: watch::Receiver<bool>) {
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(Ok(msg)) = msg else { break };
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let Some(id) = v["id"].as_str() else { continue };
        if let Ok(n) = id.parse::<u64>() {
            tally.delivered(n);
        }
        let ack = format!("{{\"ack\":\"{id}\"}}");
        if ws.send(Message::Text(ack.into())).await.is_err() {
            break;
        }
    }
    let _ = ws.close(None).await;
}

/// An idle session: reads (tungstenite answers the relay's pings while it does) until
/// `stop` fires. It wakes only when the relay sends something.
pub async fn idle(mut ws: Ws, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(_)) => {}
                _ => return,
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = ws.close(None).await;
}

/// What the senders do.
#[derive(Debug, Clone)]
pub struct SendPlan {
    pub payload: Arc<Vec<u8>>,
    pub until: Instant,
    /// Sends per second in all, spread over the senders on a fixed schedule, or `None`:
    /// each sender sends again as soon as it has its answer.
    pub rate: Option<f64>,
}

/// One send, `since` its intended start; its outcome goes to the tally.
async fn send_one(
    http: &reqwest::Client,
    url: String,
    body: &Arc<Vec<u8>>,
    since: Instant,
    tally: &Tally,
) {
    match http.put(url).body(body.as_ref().clone()).send().await {
        Ok(resp) if resp.status() == 201 => {
            let took = since.elapsed();
            match resp.bytes().await.ok().and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).ok()?["id"]
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            }) {
                Some(id) => tally.accepted(id, took),
                None => tally.send_failed("201 without an id".into()),
            }
        }
        Ok(resp) => tally.send_failed(resp.status().as_u16().to_string()),
        Err(e) if e.is_timeout() => tally.send_failed("timeout".into()),
        Err(_) => tally.send_failed("connection error".into()),
    }
}

/// Runs `senders` senders over the recipients' queues, round robin, until `plan.until`.
/// Each holds one connection. With a rate, sender `s` sends its `k`-th message at
/// `start + (k·senders + s) / rate`, and its latency counts from that moment: a relay
/// that falls behind shows it as latency, not as a lower rate (no coordinated omission).
pub async fn send_all(
    http: reqwest::Client,
    target: Target,
    queues: Arc<Vec<String>>,
    senders: usize,
    plan: SendPlan,
    tally: Arc<Tally>,
) {
    let urls: Arc<Vec<String>> = Arc::new(
        queues
            .iter()
            .map(|q| target.url(&format!("/v1/queues/{q}/messages")))
            .collect(),
    );
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(senders);
    for s in 0..senders {
        let (http, urls, plan, tally) = (
            http.clone(),
            Arc::clone(&urls),
            plan.clone(),
            Arc::clone(&tally),
        );
        tasks.push(tokio::spawn(async move {
            let mut k: u64 = 0;
            loop {
                let n = k * senders as u64 + s as u64;
                let due = match plan.rate {
                    Some(r) => start + Duration::from_secs_f64(n as f64 / r),
                    None => Instant::now(),
                };
                if due >= plan.until {
                    break;
                }
                // Closed loop: no timer at all (even an elapsed one costs a driver turn).
                if plan.rate.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let url = urls[(n as usize) % urls.len()].clone();
                send_one(&http, url, &plan.payload, due, &tally).await;
                k += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
