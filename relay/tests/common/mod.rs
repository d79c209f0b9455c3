//! Starts the real `cinder-relay` binary on an ephemeral loopback port and talks to it
//! with real HTTP and WebSocket clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_cinder-relay");

/// Flags that lift the rate limits, so tests only meet the limits they set.
pub const NO_LIMITS: &[&str] = &[
    "--send-rate",
    "0",
    "--accounts-per-minute",
    "0",
    "--recipient-bytes-per-minute",
    "0",
];

/// A relay child process. Dropping it SIGKILLs it and reaps it.
pub struct Relay {
    pub child: Option<Child>,
    pub base: String,
    pub addr: String,
    pub dir: PathBuf,
    pub stderr_path: PathBuf,
    pub stdout_lines: Vec<String>,
}

impl Relay {
    /// Starts a relay with its data dir, key and accounts file under `dir`, plus `args`.
    pub fn start(dir: &Path, args: &[&str]) -> Relay {
        let stderr_path = dir.join(format!(
            "stderr-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(dir.join("data"));
        // A key file unless the test names another key source.
        if !args
            .iter()
            .any(|a| *a == "--key-dir" || *a == "--pkcs11-module")
        {
            cmd.arg("--key-file").arg(dir.join("master.key"));
        }
        let mut child = cmd
            .arg("--accounts")
            .arg(dir.join("accounts"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn cinder-relay");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut relay = Relay {
            child: Some(child),
            base: String::new(),
            addr: String::new(),
            dir: dir.to_path_buf(),
            stderr_path,
            stdout_lines: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    relay.stdout_lines.push(line.clone());
                    if let Some(url) = line.strip_prefix("listening on ") {
                        relay.base = url.trim().to_string();
                        relay.addr = relay.base.trim_start_matches("http://").to_string();
                        assert!(relay.addr.starts_with("127.0.0.1:"), "{line}");
                        break;
                    }
                }
                Err(e) => panic!(
                    "relay did not start ({e}); stdout {:?}, stderr {}",
                    relay.stdout_lines,
                    relay.stderr()
                ),
            }
        }
        relay
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, queue: &str) -> String {
        format!("ws://{}/v1/queues/{queue}/ws", self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (e.g. "TERM") and waits for the exit, at most `timeout`.
    pub fn signal_and_wait(&mut self, sig: &str, timeout: Duration) -> ExitStatus {
        let pid = self.pid().to_string();
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(&pid)
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + timeout;
        let mut c = self.child.take().unwrap();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("relay did not exit within {timeout:?} after SIG{sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `(queue, token)` of a new account.
pub async fn account(c: &reqwest::Client, r: &Relay) -> (String, String) {
    let resp = c.post(r.url("/v1/accounts")).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    (
        v["queue"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

/// Sends; returns the status and the JSON body.
pub async fn send(
    c: &reqwest::Client,
    r: &Relay,
    queue: &str,
    payload: &[u8],
    ttl: Option<&str>,
) -> (u16, Value) {
    let mut req = c
        .put(r.url(&format!("/v1/queues/{queue}/messages")))
        .body(payload.to_vec());
    if let Some(t) = ttl {
        req = req.header("X-Cinder-Ttl", t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(Value::Null);
    (status, v)
}

/// Sends and expects a 201; returns the id.
pub async fn send_ok(c: &reqwest::Client, r: &Relay, queue: &str, payload: &[u8]) -> String {
    let (s, v) = send(c, r, queue, payload, None).await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// One page: `(messages as (id, payload), more)`.
pub async fn read_page(
    c: &reqwest::Client,
    r: &Relay,
    queue: &str,
    token: &str,
    query: &str,
) -> (Vec<(String, Vec<u8>)>, bool) {
    let resp = c
        .get(r.url(&format!("/v1/queues/{queue}/messages{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let msgs = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m["expires_at"].as_u64().unwrap() > 1_600_000_000);
            (
                m["id"].as_str().unwrap().to_string(),
                b64(m["payload"].as_str().unwrap()),
            )
        })
        .collect();
    (msgs, v["more"].as_bool().unwrap())
}

/// Every message of the queue, paging with `after`.
pub async fn read_all(
    c: &reqwest::Client,
    r: &Relay,
    queue: &str,
    token: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let q = match out.last() {
            Some((id, _)) => format!("?limit=1000&after={id}"),
            None => "?limit=1000".to_string(),
        };
        let (page, more) = read_page(c, r, queue, token, &q).await;
        out.extend(page);
        if !more {
            return out;
        }
    }
}

pub fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
