//! Store configuration, durability modes, recovery policy and the injectable clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::format::frame::MAX_BODY_LEN;
use crate::keys::KeyProvider;

/// When a write (append, ack, purge) returns relative to its fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Each call returns only after an fsync that started after its data was written.
    /// Survives `kill -9` and power loss.
    Sync,
    /// Callers still wait until their data is durable, but everyone waiting shares one
    /// fsync. The writer may hold a batch open for up to `max_delay` to let more callers
    /// join (only while callers keep arriving). Survives `kill -9` and power loss.
    Group { max_delay: Duration },
    /// Calls return before the fsync. Data reaches the OS within a few milliseconds and
    /// the disk within `Options::async_sync_interval`; a power loss (not a process crash
    /// after the write reached the OS) can lose that window.
    Async,
}

impl Default for Durability {
    fn default() -> Self {
        Durability::Group {
            max_delay: Duration::from_millis(1),
        }
    }
}

/// What recovery does with damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Truncate a torn tail of a segment that was still being written at the crash
    /// (reported in `RecoveryReport`); any other damage fails the open with
    /// `Error::Corruption`.
    #[default]
    TolerateTornTail,
    /// Any damage, a torn tail included, fails the open.
    Strict,
    /// As `TolerateTornTail`, but a sealed segment whose file is missing does not fail
    /// the open: its key is dropped and the loss is reported in
    /// `RecoveryReport::missing_segments`. Its messages are lost, and if it held ack
    /// records, the messages they acked are delivered again. Only for an operator who
    /// has decided to take that loss to get a store back.
    SalvageMissingSegments,
}

/// Automatic master-key rotation: every `every`, the background maintenance asks
/// `next_key` for a new provider (for example a new key file, or a new HSM key) and
/// rotates to it with [`crate::Store::rotate_master_key`]. The time of the last rotation
/// comes from the key audit log, so the interval holds across restarts. A failure is
/// kept in `Stats::last_gc_error` and retried at the next maintenance pass.
#[derive(Clone)]
pub struct AutoRotation {
    pub every: Duration,
    pub next_key: Arc<dyn Fn() -> crate::Result<Arc<dyn KeyProvider>> + Send + Sync>,
}

impl std::fmt::Debug for AutoRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoRotation")
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// What a core dump of this process may hold of key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CoreDumps {
    /// Key memory (data keys, expanded keys, the file provider's master key) is marked
    /// `MADV_DONTDUMP`, so core dumps leave it out; the rest of the process still dumps.
    #[default]
    ExcludeKeyMemory,
    /// No core dumps at all for the whole process (`RLIMIT_CORE` = 0, not dumpable),
    /// set by `Store::open`. Also covers plaintext payloads passing through memory.
    Disable,
}

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> u64;
}

/// The engine's "now": the configured clock, shifted so that it never reads earlier than
/// the time the data dir persisted last (`time_floor_ms`), and never backwards within a
/// process. A clock that jumped forward, was persisted, and was set back does not freeze
/// expiry until real time catches up: time goes on from the persisted floor at the
/// clock's own pace (and messages expire after their TTL of that time).
#[derive(Debug)]
pub(crate) struct EngineClock {
    raw: Arc<dyn Clock>,
    offset_ms: u64,
    last: AtomicU64,
}

impl EngineClock {
    pub(crate) fn new(raw: Arc<dyn Clock>, floor_ms: u64) -> Self {
        let now = raw.now_ms();
        let offset_ms = floor_ms.saturating_sub(now);
        EngineClock {
            raw,
            offset_ms,
            last: AtomicU64::new(now + offset_ms),
        }
    }
}

impl Clock for EngineClock {
    fn now_ms(&self) -> u64 {
        let t = self.raw.now_ms().saturating_add(self.offset_ms);
        // A plain load in the common case (the clock has not moved past `last`): no
        // read-modify-write on a line every appender shares.
        let last = self.last.load(Ordering::SeqCst);
        if t <= last {
            return last;
        }
        self.last.fetch_max(t, Ordering::SeqCst).max(t)
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock moved by hand, for tests: time only moves when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(start_ms)))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Configuration of a [`crate::Store`]. Start from [`Options::new`] and change fields.
#[derive(Debug, Clone)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches, each documented on its own"
)]
pub struct Options {
    /// Wraps and unwraps the per-segment data keys.
    pub key_provider: Arc<dyn KeyProvider>,
    /// The master key before a rotation (default none). A store whose rotation a crash
    /// interrupted still has its keystore under the old key; given it here, `open`
    /// opens with it and finishes the rotation to `key_provider`
    /// (`RecoveryReport::master_key_rotated` says so). Without it, such a store fails
    /// with `WrongMasterKey`, naming both key ids.
    pub previous_key_provider: Option<Arc<dyn KeyProvider>>,
    /// Rotate the master key automatically (default off).
    pub auto_rotation: Option<AutoRotation>,
    /// Core dumps and key material (default: key memory excluded from dumps).
    pub core_dumps: CoreDumps,
    /// Pad message bodies so that the files do not show exact payload lengths (default
    /// none; `Padme` costs at most ~12% space, `PowerOfTwo` up to 2x). Padding counts
    /// against the queue and disk quotas.
    pub padding: crate::format::padding::Padding,
    pub durability: Durability,
    /// Size at which a segment is closed and a new one started (default 64 MiB;
    /// 64 KiB ..= 1 GiB). Smaller segments shred sooner; larger ones mean fewer files.
    pub segment_size: u64,
    /// Largest payload accepted (default 256 KiB, at most 16 MiB).
    pub max_message_size: usize,
    /// Longest TTL accepted (default 30 days).
    pub max_ttl: Duration,
    /// Messages per queue, at most (default 100,000).
    pub max_queue_len: u64,
    /// Stored bytes per queue, at most (default 1 GiB). Counts whole frames: the payload
    /// plus 77 bytes and the queue id's length per message.
    pub max_queue_bytes: u64,
    /// Bytes the segment files may occupy (default 64 GiB), counted as they sit on disk:
    /// a segment being written counts its whole preallocated `segment_size`, a sealed one
    /// its length. An append that would take them past it is `DiskQuotaExceeded`. Acks
    /// and compaction are never refused by it (they are how space comes back), and the
    /// spare segment made ahead for them can take the files one segment past it; the key
    /// files (`KEYS`, `KEYS.audit`) are not counted (`Stats::bytes_on_disk` shows them).
    pub max_disk_bytes: u64,
    /// How long after an [`append_once`](crate::Store::append_once) a second one with
    /// the same client id to the same queue stores nothing (default 24 h). The store
    /// forgets a client id earlier when its record is shredded (after the message is
    /// acked or expired, within `max_shred_delay`) or its queue purged, and at a reopen
    /// for messages no longer queued (only queued ones are rebuilt from their records). About 90 bytes of
    /// memory per client id on record; `Duration::ZERO` turns deduplication off.
    pub dedupe_window: Duration,
    /// Bound on how long an acked or expired message stays decryptable (default 60 s).
    /// Whole dead segments are shredded well within it; rewriting partly dead segments
    /// (compaction) is what enforces it for the rest.
    pub max_shred_delay: Duration,
    /// Copy live messages out of partly dead segments so that every dead record is
    /// shredded within `max_shred_delay` (default true). Switching it off voids that bound
    /// (a dead record then lives as long as its most long-lived neighbour); it exists to
    /// measure what compaction costs.
    pub compaction: bool,
    /// How often Async data is fsynced (default 100 ms): the Async loss window.
    pub async_sync_interval: Duration,
    /// Where "now" comes from (default: the system clock).
    pub clock: Arc<dyn Clock>,
    pub recovery: RecoveryMode,
    /// Allow the key file to live inside the data dir (default false: a thief of the
    /// data dir would get the key too).
    pub allow_key_in_data_dir: bool,
    /// Write zeros over each new spare segment in the background, before it is used if
    /// it is ready in time (default true; Sync and Group modes only, while segments fill
    /// up and fsync rounds stay under 256 KiB). A segment is
    /// preallocated, which on ext4 and XFS leaves "unwritten" extents: the first fdatasync
    /// over each then also has to record that its blocks are written, one more metadata
    /// write per commit (measured here: 32 frames commit in 174–219 µs instead of 154–162 µs).
    /// A zeroed segment costs one extra sequential write of each segment. A quiet store
    /// (segments closed by age, not because they are full) and Async mode (bound by
    /// bandwidth, not commit latency) never zero.
    pub zero_fill_segments: bool,
    /// Start background threads (reaper, writer). Always true outside tests that drive
    /// maintenance by hand with [`crate::Store::maintain`].
    pub background_reaper: bool,
    /// Where every file operation on the data dir goes (default: the real file system).
    /// Tests put a [`crate::vfs::FaultFs`] here to inject I/O faults and cut power.
    pub file_system: Arc<dyn crate::vfs::FileSystem>,
}

impl Options {
    /// Defaults for everything but the key provider.
    pub fn new(key_provider: Arc<dyn KeyProvider>) -> Self {
        Options {
            key_provider,
            previous_key_provider: None,
            auto_rotation: None,
            core_dumps: CoreDumps::default(),
            padding: crate::format::padding::Padding::default(),
            durability: Durability::default(),
            segment_size: 64 << 20,
            max_message_size: 256 << 10,
            max_ttl: Duration::from_secs(30 * 24 * 3600),
            max_queue_len: 100_000,
            max_queue_bytes: 1 << 30,
            max_disk_bytes: 64 << 30,
            dedupe_window: Duration::from_secs(86_400),
            max_shred_delay: Duration::from_secs(60),
            async_sync_interval: Duration::from_millis(100),
            compaction: true,
            clock: Arc::new(SystemClock),
            recovery: RecoveryMode::default(),
            allow_key_in_data_dir: false,
            zero_fill_segments: true,
            background_reaper: true,
            file_system: Arc::new(crate::vfs::RealFs),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidOptions(m));
        if !(64 << 10..=1 << 30).contains(&self.segment_size) {
            return bad(format!(
                "segment_size {} not in 64 KiB ..= 1 GiB",
                self.segment_size
            ));
        }
        if self.max_message_size == 0 || self.max_message_size > MAX_BODY_LEN - 16 {
            return bad(format!(
                "max_message_size {} not in 1 ..= 16 MiB",
                self.max_message_size
            ));
        }
        if self.padding != crate::format::padding::Padding::None
            && self.max_message_size > MAX_BODY_LEN - 16 - 1
        {
            return bad("with padding, max_message_size must leave a byte for the marker".into());
        }
        let max_body = crate::format::padding::padded_len(self.padding, self.max_message_size);
        if (max_body as u64 + 1024) * 2 > self.segment_size {
            return bad("segment_size must hold at least two maximum-size messages".into());
        }
        if self.max_ttl.is_zero() {
            return bad("max_ttl must be positive".into());
        }
        if self.max_shred_delay.is_zero() {
            return bad("max_shred_delay must be positive".into());
        }
        if let Durability::Group { max_delay } = self.durability {
            if max_delay > Duration::from_secs(1) {
                return bad("Group max_delay must be at most 1 s".into());
            }
        }
        if self
            .auto_rotation
            .as_ref()
            .is_some_and(|r| r.every < Duration::from_secs(1))
        {
            return bad("auto_rotation.every must be at least 1 s".into());
        }
        if self.async_sync_interval.is_zero() || self.async_sync_interval > Duration::from_secs(10)
        {
            return bad("async_sync_interval must be in (0, 10 s]".into());
        }
        Ok(())
    }
}
