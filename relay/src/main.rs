//! `cinder-relay`: an HTTP + WebSocket relay for encrypted, ephemeral messages, embedding
//! the cinder storage engine. See `relay/README.md` for the API.

mod accounts;
mod cli;
mod errors;
mod keysource;
mod limits;
mod metrics;
mod routes;
mod server;
mod sessions;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{error, info, warn};

use crate::accounts::Accounts;
use crate::cli::Cli;
use crate::limits::Limiter;
use crate::routes::{App, Config};

/// How long shutdown waits for in-flight requests, then for WebSocket sessions.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Logs go to stderr through `tracing`: levels and targets filtered by `RUST_LOG`
/// (default `info`, with the access log — the target `cinder_relay::access` — only with
/// `--access-log`), as text or as JSON lines. A background thread writes them in
/// batches, so a slow stderr does not stall the async workers (it blocks them only once
/// its buffer is full: lines are not dropped). No call site passes payloads, tokens,
/// keys, queue ids or client addresses.
fn init_logging(
    format: cli::LogFormat,
    access_log: bool,
) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("cinder-relay-log")
        .finish(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stderr(),
        ));
    let default = if access_log {
        "info"
    } else {
        "info,cinder_relay::access=off"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    match format {
        cli::LogFormat::Text => logs.init(),
        cli::LogFormat::Json => logs.json().init(),
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logs = init_logging(cli.log_format, cli.access_log);
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("fatal: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The flags' one rule for zero: `0` turns a rate limit off (`--send-rate`,
/// `--accounts-per-minute`, `--recipient-bytes-per-minute`); every other number is a cap
/// or a duration that a `0` would make refuse every request, so it must be at least 1
/// (and within its range), checked here at start.
fn check_flags(cli: &Cli) -> Result<(), String> {
    check_messages(cli)?;
    check_storage(cli)?;
    check_rates(cli)?;
    check_connections(cli)
}

fn check_messages(cli: &Cli) -> Result<(), String> {
    if cli.default_ttl.is_zero() || cli.default_ttl > cli.max_ttl {
        return Err("--default-ttl must be positive and at most --max-ttl".into());
    }
    if cli.max_message_bytes == 0 || cli.max_message_bytes > 16 << 20 {
        return Err("--max-message-bytes must be 1 ..= 16MiB".into());
    }
    if cli.queue_quota_messages == 0 || cli.queue_quota_bytes == 0 {
        return Err("--queue-quota-messages and --queue-quota-bytes must be at least 1 (0 would refuse every send)".into());
    }
    if cli.max_shred_delay < Duration::from_secs(1) {
        return Err("--max-shred-delay must be at least 1s".into());
    }
    Ok(())
}

fn check_storage(cli: &Cli) -> Result<(), String> {
    if !(64 << 10..=1 << 30).contains(&cli.segment_size) {
        return Err("--segment-size must be 64KiB ..= 1GiB".into());
    }
    if (cli.max_message_bytes + 1024) * 2 > cli.segment_size {
        return Err("--segment-size must hold two messages of --max-message-bytes".into());
    }
    // Up to 8 expiry buckets, the ack segment, compaction survivors and a spare are
    // preallocated at once, and the quota counts them whole.
    if cli.disk_quota_bytes < 16 * cli.segment_size {
        return Err(format!(
            "--disk-quota-bytes must be at least 16 segments ({} bytes with --segment-size {}): the segments being written count whole",
            16 * cli.segment_size,
            cli.segment_size
        ));
    }
    Ok(())
}

fn check_rates(cli: &Cli) -> Result<(), String> {
    if cli.recipient_bytes_per_minute != 0 && cli.recipient_bytes_per_minute < cli.max_message_bytes
    {
        return Err("--recipient-bytes-per-minute must be at least --max-message-bytes".into());
    }
    let at_least = |x: f64, min: f64| x.is_finite() && x >= min;
    if !at_least(cli.send_rate, 0.0)
        || !at_least(cli.send_burst, 1.0)
        || !at_least(cli.accounts_per_minute, 0.0)
    {
        return Err("rates must be >= 0 and --send-burst >= 1".into());
    }
    Ok(())
}

fn check_connections(cli: &Cli) -> Result<(), String> {
    if cli.max_ws_connections == 0 || cli.max_ws_connections > 1_000_000 {
        return Err("--max-ws-connections must be 1 ..= 1000000".into());
    }
    if cli.max_connections == 0 || cli.max_connections > 1_100_000 {
        return Err("--max-connections must be 1 ..= 1100000".into());
    }
    if cli.header_timeout.is_zero() || cli.header_timeout > Duration::from_secs(300) {
        return Err("--header-timeout must be 1s ..= 300s".into());
    }
    if cli.sessions_per_queue == 0 || cli.sessions_per_queue > 1024 {
        return Err("--sessions-per-queue must be 1 ..= 1024".into());
    }
    Ok(())
}

/// `path` made absolute, with its parent directory resolved (the file may not exist).
fn resolve(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map_or_else(|_| abs.clone(), |d| d.join(name)),
        _ => abs,
    }
}

/// Where the files are, checked before anything is created.
#[derive(Debug)]
struct Paths {
    accounts: PathBuf,
    data_has_files: bool,
}

/// Refuses, before a key or an accounts file is created: a key file or accounts file
/// inside the data dir (either would sit next to the data it protects or describes), the
/// same file for both, and a data dir that holds data while its accounts file is missing
/// (the accounts would be gone: every message would expire unread) unless
/// `--accept-new-accounts-file` says that is meant.
fn check_paths(cli: &Cli) -> Result<Paths, BoxError> {
    let data = cli
        .data
        .canonicalize()
        .unwrap_or_else(|_| resolve(&cli.data));
    let key = if cli.pkcs11_module.is_some() {
        None
    } else {
        Some(cli.key_dir.as_deref().map_or_else(
            || resolve(&cli.key_file_path()),
            |d| d.canonicalize().unwrap_or_else(|_| resolve(d)),
        ))
    };
    let accounts = resolve(&cli.accounts);
    if let Some(key) = key.as_ref().filter(|k| k.starts_with(&data)) {
        return Err(format!(
            "the master key {} is inside the data dir {}; keep it outside (--key-file, --key-dir)",
            key.display(),
            data.display()
        )
        .into());
    }
    if accounts.starts_with(&data) {
        return Err(format!(
            "the accounts file {} is inside the data dir; keep it outside (--accounts)",
            accounts.display()
        )
        .into());
    }
    if key
        .as_ref()
        .is_some_and(|k| accounts == *k || accounts.starts_with(k))
    {
        return Err("--accounts must be neither the key file nor in the key directory".into());
    }
    let data_has_files = std::fs::read_dir(&cli.data)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != "LOCK")));
    if data_has_files && !accounts.exists() && !cli.accept_new_accounts_file {
        return Err(format!(
            "the data dir {} holds data but the accounts file {} is missing: restore it, or \
             pass --accept-new-accounts-file to start with no accounts (every stored message \
             then expires unread)",
            data.display(),
            accounts.display()
        )
        .into());
    }
    Ok(Paths {
        accounts,
        data_has_files,
    })
}

/// Connections the operations listener (`--metrics-listen`) takes at most: scrapers and
/// health checkers, not clients.
const OPS_CONNECTIONS: usize = 64;

/// File descriptors kept for everything but client sockets: segment files, the
/// keystore and audit log, the listener, sockets being refused over the cap.
const FD_RESERVE: u64 = 1024;

/// Raises the soft open-files limit to the hard one and returns (limit, raised from).
fn raise_fd_limit() -> (u64, Option<u64>) {
    let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return (1024, None);
    };
    if soft >= hard {
        return (soft, None);
    }
    match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
        Ok(()) => (hard, Some(soft)),
        Err(_) => (soft, None),
    }
}

/// How many sockets the relay may hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Caps {
    /// Open connections, HTTP and WebSocket.
    connections: usize,
    /// WebSocket sessions (a subset of the connections).
    sessions: usize,
}

/// The flags' caps, bounded by the open-files limit less [`FD_RESERVE`] (and sessions by
/// connections: each session is one).
fn caps(cli: &Cli, fd_limit: u64) -> Caps {
    let by_fds = fd_limit.saturating_sub(FD_RESERVE).max(1);
    let connections = cli
        .max_connections
        .min(usize::try_from(by_fds).unwrap_or(usize::MAX));
    Caps {
        connections,
        sessions: cli.max_ws_connections.min(connections),
    }
}

/// The engine's options from the flags.
fn store_options(cli: &Cli, key: keysource::MasterKey) -> cinder::Options {
    let mut opts = cinder::Options::new(key.provider);
    opts.previous_key_provider = key.previous;
    opts.auto_rotation = key.rotation;
    opts.durability = cli.durability.to_engine();
    opts.padding = cli.padding.to_engine();
    opts.max_message_size = cli.max_message_bytes as usize;
    opts.max_ttl = cli.max_ttl;
    opts.max_queue_bytes = cli.queue_quota_bytes;
    opts.max_queue_len = cli.queue_quota_messages;
    opts.max_disk_bytes = cli.disk_quota_bytes;
    opts.segment_size = cli.segment_size;
    opts.max_shred_delay = cli.max_shred_delay;
    opts.dedupe_window = cli
        .dedupe_window
        .unwrap_or_else(|| cli.default_ttl.min(Duration::from_secs(86_400)));
    opts
}

fn run(cli: &Cli) -> Result<(), BoxError> {
    check_flags(cli)?;
    let (fd_limit, raised_from) = raise_fd_limit();
    let caps = caps(cli, fd_limit);

    let paths = check_paths(cli)?;
    // The key the keystore is under (plaintext framing; a keystore that does not read
    // is the store's to report, with the right key).
    let store_kek = cinder::key_status(&cli.data)
        .ok()
        .and_then(|s| s.master_keys.iter().find(|m| m.current).map(|m| m.kek_id));
    let master = keysource::open(cli, paths.data_has_files, store_kek)?;
    let key_summary = master.summary.clone();
    let key_dir = master.dir.clone();
    let opts = store_options(cli, master);
    let store = cinder::Store::open(&cli.data, opts)?;
    let data_dir = cli.data.canonicalize()?;
    if let Some(kd) = &key_dir {
        // A key that a rotation before this start left behind is not needed any more
        // (the first check only notes the settled key; the task below destroys).
        kd.destroy_replaced(&cli.data, &store)?;
    }

    let accounts_path = paths.accounts;
    let (accounts, acc_report) = Accounts::open(&accounts_path)
        .map_err(|e| format!("accounts file {}: {e}", accounts_path.display()))?;
    if acc_report.created && paths.data_has_files {
        warn!("--accept-new-accounts-file: new accounts file for a data dir that holds data: earlier accounts are gone, their messages expire unread");
    }
    if acc_report.torn_tail_dropped {
        warn!("accounts file: dropped a torn last record (a change interrupted by a crash, never acknowledged)");
    }

    let listener = std::net::TcpListener::bind(cli.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let ops_listener = match cli.metrics_listen {
        Some(a) => {
            let l = std::net::TcpListener::bind(a)
                .map_err(|e| format!("cannot listen on {a} (--metrics-listen): {e}"))?;
            l.set_nonblocking(true)?;
            let addr = l.local_addr()?;
            Some((l, addr))
        }
        None => None,
    };

    let rec = store.recovery_report();
    println!("cinder-relay {}", env!("CARGO_PKG_VERSION"));
    println!("data dir:    {}", data_dir.display());
    println!("master key:  {key_summary}");
    println!(
        "accounts:    {}{} ({} accounts)",
        accounts_path.display(),
        if acc_report.created {
            " (created now)"
        } else {
            ""
        },
        accounts.len()
    );
    println!("durability:  {}", cli.durability.describe());
    println!(
        "open files:  {fd_limit}{}; connections at most {}, WebSocket sessions at most {}{}",
        raised_from.map_or(String::new(), |f| format!(" (raised from {f})")),
        caps.connections,
        caps.sessions,
        if caps.connections < cli.max_connections || caps.sessions < cli.max_ws_connections {
            " (lowered from the flags to fit the open-files limit)"
        } else {
            ""
        }
    );
    println!(
        "recovered:   {} segments, {} live messages",
        rec.segments, rec.live
    );
    if !local.ip().is_loopback() {
        warn!("listening beyond loopback without TLS; put a TLS-terminating proxy in front (and note that per-client limits then see the proxy's address)");
    }

    // Engine calls that can block on I/O (sends, reads, acks) run on the blocking pool;
    // idle WebSocket sessions are tasks and hold none of it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(256)
        .build()?;
    let store = Arc::new(store);
    let result = rt.block_on(serve(
        cli,
        caps,
        (listener, local),
        ops_listener,
        Arc::clone(&store),
        accounts,
        key_dir,
    ));

    // Whatever happened, make everything durable and release the data dir.
    let closed = store.flush().and_then(|()| store.close());
    rt.shutdown_timeout(Duration::from_secs(5));
    match (&result, closed) {
        (_, Err(e)) => error!("closing the store: {e}"),
        (Ok(()), Ok(())) => info!("store flushed and closed; bye"),
        (Err(_), Ok(())) => info!("store flushed and closed"),
    }
    result
}

/// The state the handlers share, from the flags.
fn app_state(
    cli: &Cli,
    caps: Caps,
    store: Arc<cinder::Store>,
    accounts: Accounts,
    shutdown_rx: watch::Receiver<bool>,
) -> Arc<App> {
    let budget = cli.recipient_bytes_per_minute as f64;
    Arc::new(App {
        store,
        accounts,
        metrics: metrics::Metrics::default(),
        cfg: Config {
            default_ttl: cli.default_ttl,
            max_ttl: cli.max_ttl,
            max_message_bytes: cli.max_message_bytes as usize,
            inline_reads: cli.durability != cli::DurabilityArg::Async,
        },
        send_limit: Limiter::new(cli.send_rate, cli.send_burst),
        inbound_limit: Limiter::new(budget / 60.0, budget + routes::PER_MESSAGE_COST as f64),
        account_limit: Limiter::new(
            cli.accounts_per_minute / 60.0,
            cli.accounts_per_minute.max(1.0),
        ),
        shutdown: shutdown_rx,
        ws_ended: Notify::new(),
        ws_permits: Arc::new(Semaphore::new(caps.sessions)),
        sessions: Arc::new(sessions::Sessions::new(cli.sessions_per_queue)),
        conn_stats: Arc::default(),
    })
}

async fn serve(
    cli: &Cli,
    caps: Caps,
    (listener, local): (std::net::TcpListener, SocketAddr),
    ops: Option<(std::net::TcpListener, SocketAddr)>,
    store: Arc<cinder::Store>,
    accounts: Accounts,
    key_dir: Option<keysource::KeyDir>,
) -> Result<(), BoxError> {
    if let Some(kd) = key_dir {
        tokio::spawn(destroy_old_keys(kd, cli.data.clone(), Arc::clone(&store)));
    }
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = app_state(cli, caps, store, accounts, shutdown_rx.clone());
    let metrics_on = if ops.is_some() {
        routes::MetricsOn::OpsListener
    } else {
        routes::MetricsOn::Api
    };
    let router = routes::router(Arc::clone(&app), metrics_on);
    let limits = server::Limits {
        max_connections: caps.connections,
        header_timeout: cli.header_timeout,
    };
    let mut server = tokio::spawn(server::Server::run(
        listener,
        router,
        limits,
        Arc::clone(&app.conn_stats),
        shutdown_rx.clone(),
    ));
    let ops_server = match ops {
        Some((l, addr)) => {
            let l = tokio::net::TcpListener::from_std(l)?;
            let limits = server::Limits {
                max_connections: OPS_CONNECTIONS,
                header_timeout: cli.header_timeout,
            };
            println!("metrics on  http://{addr}/metrics");
            Some(tokio::spawn(server::Server::run(
                l,
                routes::ops_router(Arc::clone(&app)),
                limits,
                Arc::default(),
                shutdown_rx.clone(),
            )))
        }
        None => None,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    println!("listening on http://{local}");

    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        r = &mut server => {
            return Err(match r {
                Ok(_) => "the server stopped unexpectedly".into(),
                Err(e) => e.into(),
            });
        }
    };
    info!("{sig}: shutting down: no new connections, finishing in-flight requests");
    let _ = shutdown_tx.send(true);
    let server = server.await?;
    if let Some(ops) = ops_server {
        ops.await?;
    }
    // Idle connections close at once, requests in flight finish, WebSocket sessions close
    // (they were told to) and apply the acks they received; silent sockets are gone
    // within --header-timeout.
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    if !server.drain(deadline).await {
        warn!(
            "{} connections did not close in time; closing anyway",
            server.open()
        );
    }
    loop {
        let ended = app.ws_ended.notified();
        if app.metrics.ws_open.get() == 0 {
            break;
        }
        if tokio::time::timeout_at(deadline, ended).await.is_err() {
            warn!("WebSocket sessions did not close in time; closing anyway");
            break;
        }
    }
    Ok(())
}

/// How often the key directory is checked for keys a rotation left unneeded.
const KEY_CLEANUP_EVERY: Duration = Duration::from_secs(1);

/// Destroys, as soon as the store runs under its successor, each master key a rotation
/// replaced.
async fn destroy_old_keys(kd: keysource::KeyDir, data: PathBuf, store: Arc<cinder::Store>) {
    let mut tick = tokio::time::interval(KEY_CLEANUP_EVERY);
    loop {
        tick.tick().await;
        let (kd, data, store) = (kd.clone(), data.clone(), Arc::clone(&store));
        let r = tokio::task::spawn_blocking(move || kd.destroy_replaced(&data, &store)).await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error!("destroying replaced master keys: {e}"),
            Err(e) => error!("destroying replaced master keys: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caps_fit_the_open_files_limit() {
        use clap::Parser as _;
        let cli = Cli::parse_from(["cinder-relay"]);
        let c = |fds| caps(&cli, fds);
        assert_eq!(
            c(1_048_576),
            Caps {
                connections: 110_000,
                sessions: 100_000
            }
        );
        let fit = 20_000 - FD_RESERVE as usize;
        assert_eq!(
            c(20_000),
            Caps {
                connections: fit,
                sessions: fit
            }
        );
        assert_eq!(
            c(100),
            Caps {
                connections: 1,
                sessions: 1
            }
        );
    }
}
