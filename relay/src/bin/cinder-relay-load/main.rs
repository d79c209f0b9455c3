//! `cinder-relay-load`: load for a running cinder-relay — M recipients each holding a
//! WebSocket and acking every message, N senders (each waiting for its `201`, or an
//! open rate), and optionally many idle WebSocket sessions. Progress goes to stderr each
//! second; the summary (text, or `--json`) gives sends/s, deliveries/s, latencies
//! (request → `201`, and `201` → delivery on the socket) at p50/p99/p999, errors by
//! status, and with `--server-pid` the relay's CPU per delivered message, RSS and
//! threads, next to this process's own CPU (so a reader can tell which side was busy).
//!
//! The relay must let the run create its accounts: start it with
//! `--accounts-per-minute 0 --send-rate 0 --recipient-bytes-per-minute 0`.

mod clients;
mod procstat;
mod tally;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use clients::{BoxError, SendPlan, Target};
use tally::{Percentiles, Tally};

/// Load for a running cinder-relay (see the crate docs for the relay flags it needs).
#[derive(Debug, Parser)]
#[command(name = "cinder-relay-load", version, about)]
struct Args {
    /// The relay's address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    target: SocketAddr,
    /// Recipients, each with its account and a WebSocket session that acks.
    #[arg(long, default_value_t = 1000)]
    recipients: usize,
    /// Senders: each sends, waits for its answer, sends again (closed loop).
    #[arg(long, default_value_t = 16)]
    senders: usize,
    /// Sends per second in all, on a fixed schedule spread over the senders (latency then
    /// counts from each send's scheduled moment); 0 = each sender sends again as soon
    /// as it has its answer.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// How long the senders send (s, m suffixes; plain = seconds).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Payload bytes per message (KiB suffix allowed).
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    payload: usize,
    /// Idle WebSocket sessions held open besides the recipients' (each its own account).
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Local addresses to connect from, comma-separated (127.0.0.0/8 works on loopback):
    /// one address has ~28,000 ephemeral ports, so many sessions need several.
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// The relay's process id: report its CPU per delivered message, RSS and threads.
    #[arg(long)]
    server_pid: Option<u32>,
    /// After the senders stop, wait this long at most for outstanding deliveries.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    settle: Duration,
    /// After the sessions open, wait this long before sending (both sides finish setting
    /// up thousands of sessions; 5 s covers 18,000 here).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s.strip_suffix('s').unwrap_or(s), 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    (v.is_finite() && v >= 0.0)
        .then(|| Duration::from_secs_f64(v * mult))
        .ok_or_else(|| format!("{s:?} is not a duration"))
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, shift) = match s.strip_suffix("KiB").or_else(|| s.strip_suffix('K')) {
        Some(n) => (n, 10),
        None => match s.strip_suffix("MiB").or_else(|| s.strip_suffix('M')) {
            Some(n) => (n, 20),
            None => (s, 0),
        },
    };
    num.trim()
        .parse::<usize>()
        .map(|n| n << shift)
        .map_err(|_| format!("{s:?} is not a size"))
}

/// The run's results.
#[derive(Debug, serde::Serialize)]
struct Summary {
    recipients: usize,
    idle_sessions: usize,
    senders: usize,
    payload_bytes: usize,
    seconds: f64,
    sent: u64,
    sends_per_sec: f64,
    delivered: u64,
    deliveries_per_sec: f64,
    undelivered: u64,
    send_errors: u64,
    errors: std::collections::BTreeMap<String, u64>,
    /// Request → `201`.
    send_latency: Percentiles,
    /// `201` → delivery on the recipient's socket.
    delivery_latency: Percentiles,
    /// This process's CPU per delivered message.
    client_cpu_us_per_msg: f64,
    server: Option<ServerSummary>,
}

#[derive(Debug, serde::Serialize)]
struct ServerSummary {
    cpu_us_per_msg: f64,
    cpu_utilisation: f64,
    rss_before_sessions_bytes: u64,
    /// At the end of the run, sessions still open.
    rss_with_sessions_bytes: u64,
    rss_per_session_bytes: f64,
    threads_before_sessions: u64,
    /// At the end of the run, sessions still open.
    threads_with_sessions: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cinder-relay-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(s) => {
            print(&s, args.json);
            if s.send_errors > 0 || s.undelivered > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("cinder-relay-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn raise_fd_limit() {
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        if soft < hard {
            let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
        }
    }
}

async fn run(args: &Args) -> Result<Summary, BoxError> {
    raise_fd_limit();
    let target = Target::new(args.target, args.sources.clone());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.senders.max(64))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()?;
    let pid = args.server_pid.map(|p| p.to_string());
    let server = || pid.as_deref().and_then(procstat::sample);
    eprintln!(
        "creating {} accounts ({} recipients, {} idle)",
        args.recipients + args.idle,
        args.recipients,
        args.idle
    );
    let accounts = clients::create_accounts(&http, &target, args.recipients + args.idle).await?;
    let (recipients, idlers) = accounts.split_at(args.recipients);
    let before = server();
    let t = Instant::now();
    let rx = clients::connect_all(&target, recipients, 64).await?;
    let idle_ws = clients::connect_all(&target, idlers, 256).await?;
    eprintln!(
        "{} sessions open in {:.1} s",
        rx.len() + idle_ws.len(),
        t.elapsed().as_secs_f64()
    );

    let tally = Arc::new(Tally::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut sessions = Vec::new();
    for ws in rx {
        sessions.push(tokio::spawn(clients::receive(
            ws,
            Arc::clone(&tally),
            stopped.clone(),
        )));
    }
    for ws in idle_ws {
        sessions.push(tokio::spawn(clients::idle(ws, stopped.clone())));
    }
    // Sessions that just opened still do their first work (the relay's first look at
    // each queue, this side's first read): let that pass before the clock starts.
    tokio::time::sleep(args.warmup).await;
    let progress = tokio::spawn(progress(Arc::clone(&tally)));

    let cpu0 = (server(), procstat::sample("self"));
    let start = Instant::now();
    let plan = SendPlan {
        payload: Arc::new((0..args.payload).map(|i| (i % 251) as u8).collect()),
        until: start + args.duration,
        rate: (args.rate > 0.0).then_some(args.rate),
    };
    let queues = Arc::new(recipients.iter().map(|a| a.queue.clone()).collect());
    if args.recipients > 0 {
        clients::send_all(http, target, queues, args.senders, plan, Arc::clone(&tally)).await;
    } else {
        tokio::time::sleep(args.duration).await;
    }
    let sending = start.elapsed();
    let settle_until = Instant::now() + args.settle;
    while tally.undelivered() > 0 && Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = (server(), procstat::sample("self"));
    // With every session still open, at the end of the run: by now the threads the
    // relay's blocking pool started for the account creations have idled out (after
    // 10 s), so a run of 15 s or more shows the sessions' own threads and memory.
    let with_sessions = cpu1.0;
    progress.abort();
    let _ = stop.send(true);
    for s in sessions {
        let _ = s.await;
    }
    Ok(summarise(
        args,
        &tally,
        sending,
        (before, with_sessions),
        (cpu0, cpu1),
    ))
}

type Cpu = (Option<procstat::Sample>, Option<procstat::Sample>);

fn summarise(
    args: &Args,
    tally: &Tally,
    sending: Duration,
    (before, with): (Option<procstat::Sample>, Option<procstat::Sample>),
    ((s0, c0), (s1, c1)): (Cpu, Cpu),
) -> Summary {
    let c = &tally.counters;
    let sent = c.sent.load(Ordering::Relaxed);
    let delivered = c.delivered.load(Ordering::Relaxed);
    let secs = sending.as_secs_f64();
    let per_msg = |a: Option<procstat::Sample>, b: Option<procstat::Sample>| match (a, b) {
        (Some(a), Some(b)) if delivered > 0 => {
            (b.cpu.saturating_sub(a.cpu)).as_secs_f64() * 1e6 / delivered as f64
        }
        _ => 0.0,
    };
    let sessions = (args.recipients + args.idle).max(1) as f64;
    let server = match (before, with, s0, s1) {
        (Some(b), Some(w), Some(a0), Some(a1)) => Some(ServerSummary {
            cpu_us_per_msg: per_msg(Some(a0), Some(a1)),
            cpu_utilisation: a1.cpu.saturating_sub(a0.cpu).as_secs_f64() / secs.max(1e-9),
            rss_before_sessions_bytes: b.rss_bytes,
            rss_with_sessions_bytes: w.rss_bytes,
            rss_per_session_bytes: (w.rss_bytes.saturating_sub(b.rss_bytes)) as f64 / sessions,
            threads_before_sessions: b.threads,
            threads_with_sessions: w.threads,
        }),
        _ => None,
    };
    Summary {
        recipients: args.recipients,
        idle_sessions: args.idle,
        senders: args.senders,
        payload_bytes: args.payload,
        seconds: secs,
        sent,
        sends_per_sec: sent as f64 / secs.max(1e-9),
        delivered,
        deliveries_per_sec: delivered as f64 / secs.max(1e-9),
        undelivered: tally.undelivered(),
        send_errors: c.send_errors.load(Ordering::Relaxed),
        errors: tally.errors(),
        send_latency: tally.send_percentiles(),
        delivery_latency: tally.e2e_percentiles(),
        client_cpu_us_per_msg: per_msg(c0, c1),
        server,
    }
}

async fn progress(tally: Arc<Tally>) {
    let mut last = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let c = &tally.counters;
        let now = (
            c.sent.load(Ordering::Relaxed),
            c.delivered.load(Ordering::Relaxed),
        );
        eprintln!(
            "sends/s {:>8}  deliveries/s {:>8}  errors {}",
            now.0 - last.0,
            now.1 - last.1,
            c.send_errors.load(Ordering::Relaxed)
        );
        last = now;
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn print(s: &Summary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
        return;
    }
    println!(
        "{} recipients, {} idle sessions, {} senders, {} B payloads, {:.1} s",
        s.recipients, s.idle_sessions, s.senders, s.payload_bytes, s.seconds
    );
    println!(
        "sends       {} ({:.0}/s), errors {} {:?}",
        s.sent, s.sends_per_sec, s.send_errors, s.errors
    );
    println!(
        "deliveries  {} ({:.0}/s), undelivered {}",
        s.delivered, s.deliveries_per_sec, s.undelivered
    );
    for (name, p) in [
        ("send → 201", &s.send_latency),
        ("201 → delivery", &s.delivery_latency),
    ] {
        println!(
            "{name:<15} p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  max {:.2} ms",
            ms(p.p50_us),
            ms(p.p99_us),
            ms(p.p999_us),
            ms(p.max_us)
        );
    }
    println!(
        "load generator CPU per delivered message: {:.1} µs",
        s.client_cpu_us_per_msg
    );
    if let Some(v) = &s.server {
        println!(
            "relay CPU per delivered message: {:.1} µs ({:.2} cores busy)",
            v.cpu_us_per_msg, v.cpu_utilisation
        );
        println!(
            "relay RSS {:.1} MiB before sessions, {:.1} MiB with them ({:.0} B per session); threads {} -> {}",
            v.rss_before_sessions_bytes as f64 / 1_048_576.0,
            v.rss_with_sessions_bytes as f64 / 1_048_576.0,
            v.rss_per_session_bytes,
            v.threads_before_sessions,
            v.threads_with_sessions
        );
    }
}
