//! 10,000 idle WebSocket sessions on one relay: no thread per session (the relay's thread
//! count does not grow with them), bounded memory per session, a message to any of them
//! still delivered at once, and every slot freed when they close. The 50,000-session run
//! is an opt-in command (`BENCHMARKS.md`, "Relay"), since it needs a higher open-files
//! limit than a default machine grants.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SESSIONS: usize = 10_000;

/// (threads, RSS bytes) of a process, from /proc.
fn proc_sample(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
            .unwrap()
    };
    (field("Threads:"), field("VmRSS:") * 1024)
}

fn raise_fd_limit() -> u64 {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    if soft < hard {
        rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).unwrap();
    }
    hard
}

async fn metric(c: &reqwest::Client, r: &Relay, name: &str) -> u64 {
    let text = c
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_sessions_hold_no_thread_each() {
    let fds = raise_fd_limit();
    if fds < SESSIONS as u64 + 2_000 {
        eprintln!("SKIP: the open-files hard limit ({fds}) is below {SESSIONS} sessions + 2,000");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(dir.path(), NO_LIMITS);
    let c = client();
    let t0 = Instant::now();
    let mut accounts = Vec::with_capacity(SESSIONS);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SESSIONS {
        let (c, url) = (c.clone(), r.url("/v1/accounts"));
        tasks.spawn(async move {
            let v: serde_json::Value = c.post(url).send().await.unwrap().json().await.unwrap();
            (
                v["queue"].as_str().unwrap().to_string(),
                v["token"].as_str().unwrap().to_string(),
            )
        });
        if tasks.len() >= 64 {
            accounts.push(tasks.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(a) = tasks.join_next().await {
        accounts.push(a.unwrap());
    }
    eprintln!("{SESSIONS} accounts in {:?}", t0.elapsed());
    // The blocking pool's threads from the account creations idle out after 10 s; take
    // the baseline once they have, so what follows is the sessions' own cost.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (threads_before, rss_before) = proc_sample(r.pid());

    let t1 = Instant::now();
    let mut sessions: Vec<(usize, _)> = Vec::with_capacity(SESSIONS);
    let mut opening = tokio::task::JoinSet::new();
    for (i, (q, t)) in accounts.iter().cloned().enumerate() {
        let url = r.ws_url(&q);
        opening.spawn(async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
            (i, tokio_tungstenite::connect_async(req).await.unwrap().0)
        });
        if opening.len() >= 256 {
            sessions.push(opening.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(ws) = opening.join_next().await {
        sessions.push(ws.unwrap());
    }
    // In account order, so session i is account i's.
    sessions.sort_by_key(|(i, _)| *i);
    let mut sessions: Vec<_> = sessions.into_iter().map(|(_, ws)| ws).collect();
    eprintln!("{SESSIONS} sessions open in {:?}", t1.elapsed());
    assert_eq!(
        metric(&c, &r, "cinder_relay_websockets_open").await,
        SESSIONS as u64
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (threads, rss) = proc_sample(r.pid());
    let per_session = rss.saturating_sub(rss_before) / SESSIONS as u64;
    eprintln!(
        "threads {threads_before} -> {threads}; RSS {} -> {} MiB ({per_session} B per session)",
        rss_before >> 20,
        rss >> 20
    );
    // A few blocking-pool threads may come and go; a thread per session would be 10,000.
    assert!(
        threads <= threads_before + 16,
        "threads grew from {threads_before} to {threads} with {SESSIONS} sessions"
    );
    assert!(
        per_session < 64 << 10,
        "{per_session} B of RSS per idle session"
    );

    // Any of them still gets its messages at once.
    let pick = SESSIONS / 2;
    let id = send_ok(&c, &r, &accounts[pick].0, b"wake up").await;
    let ws = &mut sessions[pick];
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
                return t.to_string();
            }
        }
    })
    .await
    .expect("the message reached the idle session");
    assert!(got.contains(&id), "{got}");

    // All close: every slot comes back.
    for mut ws in sessions {
        let _ = ws.close(None).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&c, &r, "cinder_relay_websockets_open").await > 0 {
        assert!(
            Instant::now() < deadline,
            "sessions still open after their clients closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
