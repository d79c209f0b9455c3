//! The relay's clients: accounts, recipients holding a WebSocket that ack every message,
//! idle WebSocket sessions, and senders.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
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
/// Ends when the server closes or `stop` is set and the socket goes quiet.
pub async fn receive(mut ws: Ws, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
        let msg = match next {
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(_) => continue,
            Ok(Some(Ok(m))) => m,
            Ok(_) => break,
        };
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

/// An idle session: answers pings (tungstenite does, while it is read) and nothing else.
pub async fn idle(mut ws: Ws, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Err(_) | Ok(Some(Ok(_))) => {}
            Ok(_) => return,
        }
    }
    let _ = ws.close(None).await;
}

/// What the senders do.
#[derive(Debug, Clone)]
pub struct SendPlan {
    pub payload: Arc<Vec<u8>>,
    pub until: Instant,
    /// Sends per second in all (open loop), or `None`: each sender waits for its answer.
    pub rate: Option<f64>,
}

/// One send; its outcome goes to the tally.
async fn send_one(http: &reqwest::Client, url: String, body: Arc<Vec<u8>>, tally: &Tally) {
    let start = Instant::now();
    match http.put(url).body(body.as_ref().clone()).send().await {
        Ok(resp) if resp.status() == 201 => {
            let took = start.elapsed();
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

/// Runs `senders` closed-loop senders (or one open-loop scheduler at `plan.rate`) over
/// the recipients' queues, round robin, until `plan.until`.
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
    if let Some(rate) = plan.rate {
        open_loop(http, urls, rate, &plan, tally).await;
        return;
    }
    let mut tasks = Vec::with_capacity(senders);
    for s in 0..senders {
        let (http, urls, plan, tally) = (
            http.clone(),
            Arc::clone(&urls),
            plan.clone(),
            Arc::clone(&tally),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = s;
            while Instant::now() < plan.until {
                let url = urls[i % urls.len()].clone();
                send_one(&http, url, Arc::clone(&plan.payload), &tally).await;
                i += senders;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Sends at `rate` per second whatever the answers take (at most 4,096 in flight).
async fn open_loop(
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    rate: f64,
    plan: &SendPlan,
    tally: Arc<Tally>,
) {
    let in_flight = Arc::new(Semaphore::new(4096));
    let start = Instant::now();
    let mut n: u64 = 0;
    while Instant::now() < plan.until {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            tally.send_failed("load generator: 4096 in flight".into());
            n += 1;
            continue;
        };
        let url = urls[(n as usize) % urls.len()].clone();
        let (http, body, tally) = (http.clone(), Arc::clone(&plan.payload), Arc::clone(&tally));
        tokio::spawn(async move {
            let _p = permit;
            send_one(&http, url, body, &tally).await;
        });
        n += 1;
    }
    let _ = in_flight.acquire_many(4096).await;
}
