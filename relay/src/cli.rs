//! Command-line flags and the small parsers they use (durations like `7d`, sizes like
//! `256KiB`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// A relay server for encrypted, ephemeral messages, on the cinder storage engine.
///
/// Senders deliver without a token (sealed-sender style); each recipient reads and acks
/// its queue with a bearer token. Durations take a unit suffix (s, m, h, d; plain numbers
/// are seconds); sizes take KiB, MiB, GiB (plain numbers are bytes).
#[derive(Debug, Parser)]
#[command(name = "cinder-relay", version, about, long_about = None)]
pub struct Cli {
    /// Address to listen on (plain HTTP: put a TLS-terminating proxy in front of anything
    /// that is not loopback).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,

    /// Serve `/metrics` (and `/healthz`) on this address instead of on `--listen`, so the
    /// metrics can stay on an internal network; the API listener then has no `/metrics`.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,

    /// The store's data directory (created 0700 if missing).
    #[arg(long, default_value = "./cinder-data")]
    pub data: PathBuf,

    /// Master key file (32 bytes, 0600), generated on first start (default
    /// ./cinder-master.key when neither --key-dir nor --pkcs11-module is given). Keep it
    /// outside the data dir; production wants an HSM or a key on separate storage.
    #[arg(long, conflicts_with_all = ["key_dir", "pkcs11_module"])]
    pub key_file: Option<PathBuf>,

    /// A directory of master keys (`master-NNNNNN.key`, the newest current), for
    /// --rotate-master-every: new keys are made there and old ones destroyed once the
    /// store no longer needs them. Outside the data dir.
    #[arg(long, conflicts_with = "pkcs11_module")]
    pub key_dir: Option<PathBuf>,

    /// Rotate the master key this often (with --key-dir): a new key is made, every data
    /// key is re-wrapped under it online, the old key is destroyed. Counted from the last
    /// rotation in the key audit log, so restarts do not put it off.
    #[arg(long, value_parser = parse_duration, requires = "key_dir")]
    pub rotate_master_every: Option<Duration>,

    /// PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so): the key-encryption keys stay
    /// in the token as per-epoch keys, made and destroyed there.
    #[arg(long, requires_all = ["pkcs11_token_label", "pkcs11_pin_file"])]
    pub pkcs11_module: Option<PathBuf>,

    /// The token's label.
    #[arg(long, requires = "pkcs11_module")]
    pub pkcs11_token_label: Option<String>,

    /// A file holding the token's user PIN (mode 0600; never on the command line).
    #[arg(long, requires = "pkcs11_module")]
    pub pkcs11_pin_file: Option<PathBuf>,

    /// Prefix of the epoch keys' labels in the token (one store per prefix).
    #[arg(long, default_value = "cinder")]
    pub pkcs11_key_label: String,

    /// Length of a PKCS#11 key epoch: the token's master-key rotation. Once an epoch is
    /// over, live data keys move to the current epoch's key and the old one is destroyed
    /// in the token.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub pkcs11_epoch: Duration,

    /// Accounts file: queue ids and token hashes (never tokens), 0600, outside the data dir.
    #[arg(long, default_value = "./cinder-accounts")]
    pub accounts: PathBuf,

    /// Start with a new, empty accounts file although the data dir holds data (the old
    /// accounts file is lost): earlier accounts are gone and their messages expire unread.
    /// Without it such a start is refused.
    #[arg(long)]
    pub accept_new_accounts_file: bool,

    /// When a write is acknowledged: `sync` (fsync per call), `group` (shared fsyncs,
    /// still durable before the reply) or `async` (fsync within 100 ms).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Group)]
    pub durability: DurabilityArg,

    /// Largest message payload accepted (413 above it; at most 16MiB).
    #[arg(long, default_value = "256KiB", value_parser = parse_bytes)]
    pub max_message_bytes: u64,

    /// TTL of a message sent without an `X-Cinder-Ttl` header.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub default_ttl: Duration,

    /// Longest TTL a sender may ask for (400 above it).
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// Bytes stored per queue at most (429 above it). Counts stored frames: payload plus
    /// about 100 bytes per message.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub queue_quota_bytes: u64,

    /// Messages stored per queue at most (429 above it).
    #[arg(long, default_value_t = 100_000)]
    pub queue_quota_messages: u64,

    /// Bytes the segment files may occupy on disk (507 above it), counting the whole
    /// preallocated size of each segment being written. At least 16 segments.
    #[arg(long, default_value = "64GiB", value_parser = parse_bytes)]
    pub disk_quota_bytes: u64,

    /// Size of a segment file (64KiB ..= 1GiB): the unit of preallocation and of
    /// shredding. Must hold two messages of --max-message-bytes.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub segment_size: u64,

    /// How long a send's `Idempotency-Key` is remembered for its queue (a repeat within it
    /// gets the first message's id, 200, and stores nothing). Default: the smaller of
    /// --default-ttl and 24h. A key is forgotten earlier once its message's record is
    /// shredded (after an ack or expiry, within --max-shred-delay) or the account purged.
    #[arg(long, value_parser = parse_duration)]
    pub dedupe_window: Option<Duration>,

    /// Bound on how long an acked or expired message stays decryptable on disk.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_shred_delay: Duration,

    /// Sends per second per client address (token bucket; 429 when empty; 0 = no limit).
    /// IPv6 clients are grouped by /64.
    #[arg(long, default_value_t = 50.0)]
    pub send_rate: f64,

    /// Burst of sends per client address.
    #[arg(long, default_value_t = 200.0)]
    pub send_burst: f64,

    /// Inbound bytes per recipient queue per minute (token bucket holding one minute;
    /// 429 when spent; 0 = no limit). Must be at least --max-message-bytes.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub recipient_bytes_per_minute: u64,

    /// Accounts created per client address per minute (0 = no limit).
    #[arg(long, default_value_t = 30.0)]
    pub accounts_per_minute: f64,

    /// Open WebSocket sessions at most (an idle one is a parked task and a socket, no
    /// thread; 503 above it). Lowered at start to what the file-descriptor limit allows.
    #[arg(long, default_value_t = 100_000)]
    pub max_ws_connections: usize,

    /// Open connections at most, HTTP and WebSocket alike (a canned 503 above it, and a
    /// log line). Lowered at start to what the open-files limit allows.
    #[arg(long, default_value_t = 110_000)]
    pub max_connections: usize,

    /// Time a connection has to send a request's complete headers, from its start or
    /// from its previous response: silent, slow (slowloris) and idle keep-alive
    /// connections are closed after it, and never hold up shutdown longer.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Write one access log line per request (method, route template, status, latency;
    /// never a queue id, token or address). It costs ~12% of the relay's CPU per message
    /// at ~7,000 sends/s on 2 cores (BENCHMARKS.md). `RUST_LOG`, when set, decides instead.
    #[arg(long)]
    pub access_log: bool,

    /// Size padding of stored payloads, so the files show a bucket, not a message's exact
    /// length: `padme` (at most ~12% larger), `power-of-two`, or `none`. On disk only; see
    /// METADATA.md.
    #[arg(long, value_enum, default_value_t = PaddingArg::Padme)]
    pub padding: PaddingArg,

    /// Log lines on stderr as `text` or `json`; levels and targets come from `RUST_LOG`
    /// (default `info`; the access log is the target `cinder_relay::access`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Live WebSocket sessions per queue: a new session displaces the oldest beyond this
    /// (close code 4001), like a device reconnecting. Raise it for multi-reader setups.
    #[arg(long, default_value_t = 1)]
    pub sessions_per_queue: usize,
}

/// `--padding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PaddingArg {
    Padme,
    PowerOfTwo,
    None,
}

impl PaddingArg {
    pub fn to_engine(self) -> cinder::Padding {
        match self {
            PaddingArg::Padme => cinder::Padding::Padme,
            PaddingArg::PowerOfTwo => cinder::Padding::PowerOfTwo,
            PaddingArg::None => cinder::Padding::None,
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl Cli {
    /// The key file: `--key-file`, or the default one.
    pub fn key_file_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| PathBuf::from("./cinder-master.key"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    Sync,
    Group,
    Async,
}

impl DurabilityArg {
    pub fn to_engine(self) -> cinder::Durability {
        match self {
            DurabilityArg::Sync => cinder::Durability::Sync,
            DurabilityArg::Group => cinder::Durability::default(),
            DurabilityArg::Async => cinder::Durability::Async,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            DurabilityArg::Sync => "sync (each write fsynced before its reply)",
            DurabilityArg::Group => "group (fsyncs shared, each write durable before its reply)",
            DurabilityArg::Async => "async (replies before fsync; a power loss can lose ~100 ms)",
        }
    }
}

/// `90`, `90s`, `15m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 2h or 7d"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use s, m, h or d)"
            ))
        }
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// `1048576`, `512KiB`, `256MiB`, `64GiB` (K/M/G and KB/MB/GB are read as binary too).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 256KiB, 64MiB or 1GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("256KiB").unwrap(), 256 << 10);
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert!(parse_bytes("1 parsec").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }

    #[test]
    fn flags_parse_with_defaults() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::parse_from(["cinder-relay"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(c.durability, DurabilityArg::Group);
        assert_eq!(c.max_message_bytes, 256 << 10);
    }
}
