//! The write path: active segments (one per expiry bucket, plus one for ack records),
//! space reservation, group commit and rotation.
//!
//! Appenders reserve an offset under a short lock, seal their frame *outside* any lock
//! (the offset is the nonce), and hand the sealed bytes back. One writer thread writes
//! contiguous runs of frames with one `pwrite` per segment, fsyncs once for everyone
//! waiting and seals full segments. The key worker (`keywork`) keeps a spare segment
//! ready and records sealed lengths in the keystore, so neither a rotation nor a commit
//! round waits for a keystore write.

mod bucket;
mod keywork;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

pub use bucket::Bucket;

use crate::error::{Error, FailureCause, Result};
use crate::format::segment_header::HEADER_LEN;
use crate::keys::keyring::Keyring;
use crate::options::{Clock, Durability};
use crate::segment::codec::{self, SEAL_FRAME_LEN};
use crate::segment::{Segment, SegmentTable};

/// Active message segments at most; the least recently used one is closed beyond that.
const MAX_ACTIVE_BUCKETS: usize = 8;
/// Appenders wait when this many sealed bytes are queued for the writer thread.
const MAX_PENDING_BYTES: u64 = 64 << 20;
/// In Async mode, the writer is woken early once this many bytes are queued.
const ASYNC_WAKE_BYTES: u64 = 1 << 20;
/// Group commit stops lingering when no caller arrived for this long.
const LINGER_QUIET: Duration = Duration::from_micros(50);
/// Spares are zero-filled only while the average fsync round writes less than this:
/// beyond it commits are bound by bandwidth, which zeroing would halve (measured: 1 KiB
/// rounds of 32 gain ~20%, 512 KiB rounds break even, 2 MiB rounds lose ~15%).
const ZERO_FILL_MAX_ROUND: u64 = 256 << 10;
/// How long zero-filling pauses after a rotation had to make its own spare because the
/// zeroed one was not ready (the device cannot absorb the extra writes at this rate).
const ZERO_FILL_PAUSE: Duration = Duration::from_secs(10);
/// After the disk or the quota refused a spare, the writer tries again this much later.
const SPARE_RETRY: Duration = Duration::from_secs(1);
/// Ack ids per ack frame, at most (and at most half a segment: see `acks_per_frame`).
const ACKS_PER_FRAME: usize = 1 << 16;

/// Settings the writer needs from `Options`.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub durability: Durability,
    pub segment_size: u64,
    pub async_sync_interval: Duration,
    pub max_disk_bytes: u64,
    /// Active segments older than this are closed so they can be shredded or compacted.
    pub max_active_age_ms: u64,
    /// Zero-fill spare segments in the background while segments fill up (see
    /// `Options::zero_fill_segments`; never in Async).
    pub zero_fill: bool,
}

/// One segment being written.
#[derive(Debug)]
struct Active {
    seg: Arc<Segment>,
    bucket: Option<Bucket>,
    /// Next offset to reserve.
    tail: u64,
    /// Frames up to here were taken by the writer thread.
    taken: u64,
    /// Submitted frames not yet taken, by offset.
    pending: BTreeMap<u64, Vec<u8>>,
    closing: bool,
    created_ms: u64,
    last_used_ms: u64,
}

#[derive(Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent flags read together under the state lock"
)]
struct State {
    actives: HashMap<u64, Active>,
    buckets: HashMap<Bucket, u64>,
    ack_seg: Option<u64>,
    spare: Option<Arc<Segment>>,
    /// Someone (a reader, close) wants pending frames written now.
    urgent: bool,
    shutdown: bool,
    pending_bytes: u64,
    /// A spare is being created in the foreground (by the writer or an appender).
    creating: bool,
    /// A spare is being made by the key worker (created, then maybe zero-filled).
    prefilling: bool,
    /// ... and it is being zero-filled now (a rotation does not wait for that).
    zeroing: bool,
    /// The highest segment id taken into use (spares are offered only above it).
    newest_used: u64,
    /// Spares are not zero-filled before this (rotations outran the zeroing).
    zero_fill_paused_until: Option<Instant>,
    /// No spare is made in the background before this (after the disk or the quota
    /// refused one: appenders report that when they need a segment).
    spare_retry_at: Option<Instant>,
    /// Why the key worker's last spare could not be made (until its next try): acks
    /// that need a segment get it.
    spare_error: Option<Error>,
    /// Final lengths of sealed segments, for the key worker to record in the keystore.
    sealed: Vec<(u64, u64)>,
    /// Recording them failed: tried again then.
    sealed_retry_at: Option<Instant>,
    /// The key worker is recording sealed lengths (the lock dropped).
    recording: bool,
    /// Rounds of work the key worker has finished (for `settle_key_work`).
    keys_rounds: u64,
    /// The writer thread has stopped: the key worker records what is left and exits.
    keys_stop: bool,
    /// A round left acks queued for want of an ack segment (refused, or waiting for the
    /// key worker): the next round comes as soon as one is in reach, whatever the
    /// durability mode.
    acks_deferred: bool,
    /// ... waiting for the key worker's spare: its outcome, a spare or a refusal, is
    /// due to those acks' waiters at once (refused acks wait for the next outcome).
    acks_await_worker: bool,
}

#[derive(Debug, Default)]
struct AckBuf {
    entries: Vec<(u64, u64)>,
    gen: u64,
}

/// Shared between the API threads and the writer thread.
#[derive(Debug)]
pub struct Writer {
    cfg: WriterConfig,
    clock: Arc<dyn Clock>,
    keyring: Arc<Keyring>,
    segments: Arc<SegmentTable>,
    state: Mutex<State>,
    work: Condvar,
    /// Bumped after every fsync round (and on failure and stop); durability waiters
    /// sleep on it as a futex.
    durable_epoch: std::sync::atomic::AtomicU32,
    /// Callers waiting for durability, and when the first and the last of them arrived
    /// (nanoseconds since `epoch`, 0 = none).
    waiters: AtomicUsize,
    /// Durability requests since the current batch started (the batch's size so far).
    arrivals: AtomicUsize,
    /// Recent largest number of callers served by one fsync (decays slowly).
    peak_batch: AtomicUsize,
    /// The writer is holding a batch open; arrivals wake it only when the batch is full.
    lingering: std::sync::atomic::AtomicBool,
    first_waiter_ns: AtomicU64,
    last_arrival_ns: AtomicU64,
    epoch: Instant,
    /// Readers of unwritten frames, back-pressured appenders and spare-segment waiters
    /// sleep here; notified when frames are taken or written, or a spare is made.
    moved: Condvar,
    acks: Mutex<AckBuf>,
    acks_done: AtomicU64,
    /// The last ack batch the disk refused (no space for a new ack segment), plus one
    /// (0 = none), and the file it names: its waiters get `DiskFull`; its ack ids stay
    /// queued and are written once space frees.
    refusals: Mutex<Refusals>,
    /// A refusal episode is open (`refusals` is not empty): lets the ack path and the
    /// writer's round skip that lock in the common case.
    refusing: std::sync::atomic::AtomicBool,
    failed: OnceLock<(String, FailureCause)>,
    /// Bytes the live segment files occupy: the whole preallocated size of a segment
    /// being written, the file's length once it is sealed (and truncated).
    pub disk_used: AtomicU64,
    /// Called with segment ids whose live count may have reached zero.
    on_dead: OnceLock<Callback>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The key worker sleeps here (on `state`).
    keys_work: Condvar,
    keys_thread: Mutex<Option<JoinHandle<()>>>,
    stopped: std::sync::atomic::AtomicBool,
    /// The last rotation replaced a full segment: zero-fill the next spare.
    rotating_full: std::sync::atomic::AtomicBool,
    /// Moving average of the bytes written per fsync round (writer thread).
    round_bytes: AtomicU64,
}

/// The writer's "a segment may have died" callback.
struct Callback(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Callback")
    }
}

/// Where a reserved frame goes.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub seg: Arc<Segment>,
    pub offset: u64,
    pub len: u64,
}

impl Writer {
    pub fn new(
        cfg: WriterConfig,
        clock: Arc<dyn Clock>,
        keyring: Arc<Keyring>,
        segments: Arc<SegmentTable>,
    ) -> Arc<Self> {
        let used = segments.all().iter().map(|s| s.data_len()).sum();
        Arc::new(Writer {
            cfg,
            clock,
            keyring,
            segments,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            durable_epoch: std::sync::atomic::AtomicU32::new(0),
            waiters: AtomicUsize::new(0),
            arrivals: AtomicUsize::new(0),
            peak_batch: AtomicUsize::new(0),
            lingering: std::sync::atomic::AtomicBool::new(false),
            first_waiter_ns: AtomicU64::new(0),
            last_arrival_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            moved: Condvar::new(),
            acks: Mutex::new(AckBuf::default()),
            acks_done: AtomicU64::new(0),
            refusals: Mutex::new(Refusals::default()),
            refusing: std::sync::atomic::AtomicBool::new(false),
            failed: OnceLock::new(),
            disk_used: AtomicU64::new(used),
            on_dead: OnceLock::new(),
            thread: Mutex::new(None),
            keys_work: Condvar::new(),
            keys_thread: Mutex::new(None),
            stopped: std::sync::atomic::AtomicBool::new(false),
            rotating_full: std::sync::atomic::AtomicBool::new(false),
            round_bytes: AtomicU64::new(0),
        })
    }

    /// Starts the writer thread and the key worker.
    pub fn start(self: &Arc<Self>, on_dead: Box<dyn Fn() + Send + Sync>) -> Result<()> {
        let _ = self.on_dead.set(Callback(on_dead));
        self.start_key_worker()?;
        let me = Arc::clone(self);
        let h = std::thread::Builder::new()
            .name("cinder-writer".into())
            .spawn(move || me.run())
            .map_err(|e| Error::io("spawn writer thread", "", e));
        match h {
            Ok(h) => *self.thread.lock() = Some(h),
            Err(e) => {
                self.stop_key_worker();
                return Err(e);
            }
        }
        Ok(())
    }

    /// `WriterFailed` once the store stopped accepting writes.
    pub fn check_failed(&self) -> Result<()> {
        match self.failed.get() {
            Some((reason, cause)) => Err(Error::WriterFailed {
                reason: reason.clone(),
                cause: *cause,
            }),
            None => Ok(()),
        }
    }

    /// Whether an append of a frame of `largest_frame` bytes could be taken now.
    pub fn health(&self, largest_frame: u64) -> crate::Health {
        use crate::Health;
        if let Some((reason, cause)) = self.failed.get() {
            return Health::Failed {
                reason: reason.clone(),
                cause: *cause,
            };
        }
        let used = self.disk_used.load(Ordering::SeqCst);
        if used.saturating_add(largest_frame) > self.cfg.max_disk_bytes {
            return Health::DiskQuotaReached {
                used,
                quota: self.cfg.max_disk_bytes,
            };
        }
        let st = self.state.lock();
        if st.shutdown {
            return Health::Closed;
        }
        let disk_full = |e: &Error| {
            matches!(e, Error::DiskFull { .. })
                || matches!(
                    e,
                    Error::WriterFailed {
                        cause: FailureCause::DiskFull,
                        ..
                    }
                )
        };
        if self.refusing.load(Ordering::SeqCst) || st.spare_error.as_ref().is_some_and(disk_full) {
            return Health::DiskFull;
        }
        Health::Ok
    }

    /// Marks the writer failed (the first reason wins): every call then returns
    /// `WriterFailed`, and the writer thread stops writing and exits, whichever thread
    /// found the failure.
    fn fail(&self, e: &Error) {
        let _ = self.failed.set((e.to_string(), FailureCause::of(e)));
        let _g = self.state.lock();
        self.wake_parked();
        self.moved.notify_all();
        self.work.notify_all();
        self.keys_work.notify_all();
    }

    // ----- reservation (API threads) -----

    /// Reserves `len` bytes for a message frame in the active segment of `bucket`.
    /// Compaction passes `enforce_quota = false`: it frees more than it writes, and a
    /// full quota must not stop it from meeting the shred deadline.
    pub fn reserve(
        &self,
        bucket: Bucket,
        len: u64,
        times: (u64, u64),
        enforce_quota: bool,
    ) -> Result<Reservation> {
        self.reserve_inner(bucket, len, times, enforce_quota, true)
            .map(|r| r.expect("a blocking reservation always returns one"))
    }

    /// Like [`reserve`](Self::reserve), but returns `Ok(None)` instead of waiting for the
    /// writer to drain its backlog. A caller holding reservations it has not submitted
    /// yet must use this: the writer writes each segment in offset order, so waiting on
    /// it while holding a hole could wait forever. Submit, then reserve again.
    pub fn try_reserve(
        &self,
        bucket: Bucket,
        len: u64,
        times: (u64, u64),
        enforce_quota: bool,
    ) -> Result<Option<Reservation>> {
        self.reserve_inner(bucket, len, times, enforce_quota, false)
    }

    fn reserve_inner(
        &self,
        bucket: Bucket,
        len: u64,
        (expires_at_ms, now_ms): (u64, u64),
        enforce_quota: bool,
        block: bool,
    ) -> Result<Option<Reservation>> {
        loop {
            self.check_failed()?;
            let used = self.disk_used.load(Ordering::SeqCst);
            if enforce_quota && used + len > self.cfg.max_disk_bytes {
                return Err(Error::DiskQuotaExceeded {
                    used,
                    adding: len,
                    quota: self.cfg.max_disk_bytes,
                });
            }
            let mut st = self.state.lock();
            if !block && st.pending_bytes > MAX_PENDING_BYTES {
                return Ok(None);
            }
            while st.pending_bytes > MAX_PENDING_BYTES && self.failed.get().is_none() {
                self.work.notify_one();
                self.moved.wait_for(&mut st, Duration::from_millis(50));
            }
            if st.shutdown {
                return Err(Error::Closed);
            }
            let current = st.buckets.get(&bucket).and_then(|id| st.actives.get(id));
            let fits = current
                .is_some_and(|a| a.tail + len + SEAL_FRAME_LEN as u64 <= self.cfg.segment_size);
            if !fits {
                if current.is_some() {
                    // Segments fill up: the store is busy (`retire` clears it when
                    // segments close by age instead).
                    self.rotating_full.store(true, Ordering::Relaxed);
                }
                if let Some(old) = st.buckets.remove(&bucket) {
                    self.close_locked(&mut st, old);
                }
                if st.buckets.len() >= MAX_ACTIVE_BUCKETS {
                    let lru = st
                        .buckets
                        .iter()
                        .min_by_key(|(_, id)| st.actives[*id].last_used_ms)
                        .map(|(b, id)| (*b, *id));
                    if let Some((b, id)) = lru {
                        st.buckets.remove(&b);
                        self.close_locked(&mut st, id);
                    }
                }
                let Some(seg) = self.take_spare(&mut st, true)? else {
                    continue;
                };
                st.buckets.insert(bucket, seg.id);
                st.actives
                    .insert(seg.id, Active::new(seg, Some(bucket), now_ms));
            }
            let id = st.buckets[&bucket];
            let a = st
                .actives
                .get_mut(&id)
                .expect("bucket maps to an active segment");
            let offset = a.tail;
            a.tail += len;
            a.last_used_ms = now_ms;
            a.seg.add_message(expires_at_ms, now_ms);
            // The frame goes into space the segment's preallocation already counted.
            return Ok(Some(Reservation {
                seg: Arc::clone(&a.seg),
                offset,
                len,
            }));
        }
    }

    /// Takes the spare segment, or, with `may_create`, creates one (dropping the lock
    /// while the keystore is written). `None` means there is no spare yet: without
    /// `may_create`, nothing was done; with it, the lock was dropped and the caller must
    /// re-check its state. A spare the key worker is creating is waited for; one it is
    /// zero-filling is not: this creates one without zeroing (a rotation must not wait a
    /// whole segment's write). Rotations are then outrunning the zeroing, whose segment
    /// is refused (`offer_spare`): zeroing pauses for `ZERO_FILL_PAUSE` instead of being
    /// written for nothing every rotation.
    fn take_spare(
        &self,
        st: &mut MutexGuard<'_, State>,
        may_create: bool,
    ) -> Result<Option<Arc<Segment>>> {
        if let Some(s) = st.spare.take() {
            st.newest_used = st.newest_used.max(s.id);
            self.keys_work.notify_one(); // make the next spare
            return Ok(Some(s));
        }
        if !may_create {
            return Ok(None);
        }
        if st.creating || (st.prefilling && !st.zeroing) {
            self.moved.wait_for(st, Duration::from_millis(20));
            return Ok(None);
        }
        if st.prefilling {
            st.zero_fill_paused_until = Some(Instant::now() + ZERO_FILL_PAUSE);
        }
        let seg = self.create_unlocked(st)?;
        self.offer_spare(st, seg);
        Ok(None)
    }

    /// Creates a segment with the state lock dropped, flagged `creating` meanwhile (the
    /// flag is cleared even if the key provider panics, so nobody waits on it forever).
    fn create_unlocked(&self, st: &mut MutexGuard<'_, State>) -> Result<Arc<Segment>> {
        st.creating = true;
        let r = MutexGuard::unlocked(st, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.create_segment()))
        });
        st.creating = false;
        self.moved.notify_all();
        self.work.notify_one();
        r.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Makes `seg` the spare. A segment made while the lock was dropped can find that
    /// another maker got there first, or that a newer segment is already in use; it is
    /// then sealed empty and shredded like any dead segment, so that segments are used
    /// in id order (recovery keeps the copy in the newer segment) and none is ever
    /// dropped while its key lives in the keystore.
    fn offer_spare(&self, st: &mut State, seg: Arc<Segment>) {
        if st.spare.is_none() && seg.id > st.newest_used {
            st.spare = Some(seg);
            st.spare_error = None;
        } else {
            let id = seg.id;
            st.actives
                .insert(id, Active::new(seg, None, self.clock.now_ms()));
            self.close_locked(st, id);
        }
        self.work.notify_one();
    }

    fn create_segment(&self) -> Result<Arc<Segment>> {
        let seg = Arc::new(self.keyring.create_segment(self.cfg.segment_size)?);
        // Preallocated whole: that is what the file occupies until it is sealed.
        self.disk_used
            .fetch_add(self.cfg.segment_size, Ordering::SeqCst);
        self.segments.insert(Arc::clone(&seg));
        Ok(seg)
    }

    /// Hands a sealed frame to the writer thread.
    pub fn submit(&self, r: &Reservation, frame: Vec<u8>) {
        self.submit_all(std::iter::once((r, frame)));
    }

    /// Hands several sealed frames to the writer thread under one lock, waking it at
    /// most once (a batch's frames would otherwise wake it frame by frame).
    ///
    /// A frame that does not fill its reservation exactly, or whose segment is no longer
    /// being written, would leave a hole the writer waits on forever or overlap its
    /// neighbour. No caller makes one; if one ever did, the writer fails (every call then
    /// returns `WriterFailed`) rather than write a broken segment.
    pub fn submit_all<'a>(&self, frames: impl IntoIterator<Item = (&'a Reservation, Vec<u8>)>) {
        let mut st = self.state.lock();
        let was_idle = st.pending_bytes == 0;
        let mut misfit = None;
        for (r, frame) in frames {
            let len = frame.len() as u64;
            match st.actives.get_mut(&r.seg.id) {
                Some(a) if len == r.len && r.offset >= a.taken && r.offset + len <= a.tail => {
                    a.pending.insert(r.offset, frame);
                    st.pending_bytes += len;
                }
                _ => {
                    misfit.get_or_insert_with(|| {
                        format!(
                            "internal error: a {len}-byte frame for segment {} at offset {} does not fit its {}-byte reservation",
                            r.seg.id, r.offset, r.len
                        )
                    });
                }
            }
        }
        if let Some(reason) = misfit {
            drop(st);
            self.fail(&Error::WriterFailed {
                reason,
                cause: FailureCause::Internal,
            });
            return;
        }
        let wake = self.cfg.durability != Durability::Async
            || was_idle
            || st.pending_bytes >= ASYNC_WAKE_BYTES;
        if wake {
            self.work.notify_one();
        }
    }

    /// Waits until everything up to `end` of `seg` is durable (per the durability mode).
    pub fn wait_durable(&self, seg: &Segment, end: u64) -> Result<()> {
        if self.cfg.durability == Durability::Async {
            return self.check_failed();
        }
        self.wait_until(true, || Ok(seg.durable.load(Ordering::SeqCst) >= end))
    }

    /// Waits until everything up to `end` of `seg` is on stable storage, whatever the
    /// durability mode (compaction must not shred an original before its copy is durable).
    pub fn wait_durable_always(&self, seg: &Segment, end: u64) -> Result<()> {
        self.wait_until(true, || Ok(seg.durable.load(Ordering::SeqCst) >= end))
    }

    /// Waits until `seg` holds complete frames up to `end` in the file (readers of
    /// Async data that the writer thread has not written yet).
    pub fn wait_written(&self, seg: &Segment, end: u64) -> Result<()> {
        if seg.written.load(Ordering::SeqCst) >= end {
            return Ok(());
        }
        self.wait_until(false, || Ok(seg.written.load(Ordering::SeqCst) >= end))
    }

    fn now_ns(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    /// Waits until `done` says so (`Ok(true)`) or fails (`Err`), or the writer fails or
    /// stops.
    fn wait_until(&self, durable: bool, done: impl Fn() -> Result<bool>) -> Result<()> {
        if done()? {
            return self.check_failed();
        }
        if !durable {
            let mut st = self.state.lock();
            st.urgent = true;
            self.work.notify_one();
            return self.wait_loop(&mut st, &self.moved, &done);
        }
        let now = self.now_ns();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let arrived = self.arrivals.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self
            .first_waiter_ns
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        self.last_arrival_ns.store(now, Ordering::SeqCst);
        // While the writer lingers it checks the batch on its own timer; only the arrival
        // that fills the batch wakes it. Otherwise taking the state lock orders this
        // arrival before the writer's next check, and the notify wakes it.
        if !self.lingering.load(Ordering::SeqCst)
            || arrived >= self.peak_batch.load(Ordering::SeqCst)
        {
            drop(self.state.lock());
            self.work.notify_one();
        }
        let r = loop {
            // Read the epoch before checking: a round that completes after the check bumps
            // it, and the wait returns at once.
            let epoch = self.durable_epoch.load(Ordering::SeqCst);
            match done() {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            if let Err(e) = self.check_failed() {
                break Err(e);
            }
            if self.stopped.load(Ordering::SeqCst) {
                break Err(Error::Closed);
            }
            atomic_wait::wait(&self.durable_epoch, epoch);
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Wakes every durability waiter with one futex call: a woken caller checks atomics
    /// and returns without taking a lock, so a batch of 32 wakes in parallel instead of
    /// as a chain of lock hand-offs.
    fn wake_parked(&self) {
        self.durable_epoch.fetch_add(1, Ordering::SeqCst);
        atomic_wait::wake_all(std::ptr::from_ref(&self.durable_epoch));
    }

    fn wait_loop<T>(
        &self,
        g: &mut MutexGuard<'_, T>,
        cv: &Condvar,
        done: &impl Fn() -> Result<bool>,
    ) -> Result<()> {
        loop {
            if done()? {
                return Ok(());
            }
            self.check_failed()?;
            if self.stopped.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            cv.wait_for(g, Duration::from_millis(100));
        }
    }

    // ----- acks -----

    /// Queues an ack record for message `id` stored in segment `seg`. Returns the batch
    /// generation to wait for. O(1): no I/O, no sealing (the writer seals acks in bulk).
    pub fn push_acks(&self, entries: impl IntoIterator<Item = (u64, u64)>) -> u64 {
        let mut b = self.acks.lock();
        let was_idle = b.entries.is_empty();
        b.entries.extend(entries);
        let wake = self.cfg.durability != Durability::Async
            || was_idle
            || b.entries.len() >= self.acks_per_frame();
        let gen = b.gen;
        drop(b);
        if wake {
            self.work.notify_one();
        }
        gen
    }

    /// Waits until the ack batch `gen` is durable (per the durability mode).
    pub fn wait_acks(&self, gen: u64) -> Result<()> {
        if self.cfg.durability == Durability::Async {
            return self.check_failed();
        }
        self.wait_until(true, || self.acks_written(gen))
    }

    /// Waits until the ack batch `gen` and every frame submitted before it are written
    /// and fsynced, whatever the durability mode.
    pub fn wait_acks_durable(&self, gen: u64) -> Result<()> {
        self.wait_until(true, || self.acks_written(gen))
    }

    /// Whether ack batch `gen` is durable; the refusal (`DiskFull`, an I/O or key
    /// provider error) if no ack segment could be made for it: its acks stay queued and
    /// are written once one can, or lost at a crash.
    fn acks_written(&self, gen: u64) -> Result<bool> {
        if self.acks_done.load(Ordering::SeqCst) > gen {
            return Ok(true);
        }
        if !self.refusing.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let r = self.refusals.lock();
        match (r.gens, &r.queued) {
            (Some((first, last)), Some(e)) if (first..=last).contains(&gen) => Err(e.replicate()),
            _ => Ok(false),
        }
    }

    /// The refusal, while acks refused a segment are still queued: an ack that finds
    /// nothing to remove must not report success while an earlier ack of the same
    /// message (which took it out of memory) is not durable yet.
    pub fn check_acks_queued(&self) -> Result<()> {
        if !self.refusing.load(Ordering::SeqCst) {
            return Ok(());
        }
        match &self.refusals.lock().queued {
            Some(e) => Err(e.replicate()),
            None => Ok(()),
        }
    }

    /// Ack ids per frame: at most half of a segment's room, so that a fresh segment
    /// always takes a frame (a frame longer than a segment would rotate forever).
    fn acks_per_frame(&self) -> usize {
        let overhead = (HEADER_LEN + SEAL_FRAME_LEN + codec::acks_frame_len(0)) as u64;
        let room = self.cfg.segment_size.saturating_sub(overhead) / 8 / 2;
        (room as usize).clamp(1, ACKS_PER_FRAME)
    }

    // ----- closing and shutdown -----

    fn close_locked(&self, st: &mut State, id: u64) {
        if let Some(a) = st.actives.get_mut(&id) {
            a.closing = true;
            if let Some(b) = a.bucket {
                if st.buckets.get(&b) == Some(&id) {
                    st.buckets.remove(&b);
                }
            }
            if st.ack_seg == Some(id) {
                st.ack_seg = None;
            }
        }
        self.work.notify_one();
    }

    /// Closes active segments that are too old, whose messages have all expired, or
    /// whose messages are all dead, so that they can be shredded (or compacted).
    pub fn retire(&self, now_ms: u64) {
        let mut st = self.state.lock();
        let ids: Vec<u64> = st
            .actives
            .values()
            .filter(|a| !a.closing)
            .filter(|a| {
                let s = &a.seg;
                let has_msgs = s.records.load(Ordering::SeqCst) > 0;
                let old = now_ms.saturating_sub(a.created_ms) >= self.cfg.max_active_age_ms;
                let expired = has_msgs && s.max_expiry_ms.load(Ordering::SeqCst) <= now_ms;
                let idle_dead = has_msgs
                    && s.live.load(Ordering::SeqCst) == 0
                    && now_ms.saturating_sub(a.last_used_ms) >= 1000;
                (old && (has_msgs || s.has_acks.load(Ordering::SeqCst))) || expired || idle_dead
            })
            .map(|a| a.seg.id)
            .collect();
        if !ids.is_empty() {
            // Segments close before they fill: a quiet store, whose spares are not zeroed.
            self.rotating_full.store(false, Ordering::Relaxed);
        }
        for id in ids {
            self.close_locked(&mut st, id);
        }
    }

    /// Writes and fsyncs everything, seals every active segment and stops the thread.
    pub fn shutdown(&self) -> Result<()> {
        {
            let mut st = self.state.lock();
            st.shutdown = true;
            // The spare is left for the final round: acks still queued may need it for an
            // ack segment, and the round then seals it (empty or not, `close_all`), so no
            // file is left half-initialised.
            let ids: Vec<u64> = st.actives.keys().copied().collect();
            for id in ids {
                self.close_locked(&mut st, id);
            }
            self.work.notify_all();
        }
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
        // After the writer's last round: it hands over the lengths of what it sealed.
        self.stop_key_worker();
        // An appender may still be creating a segment (keystore write) with the lock
        // dropped; the data dir must not be released under it, failed store or not
        // (`create_unlocked` always clears the flag, even on a panic).
        {
            let mut st = self.state.lock();
            while st.creating {
                self.moved.wait_for(&mut st, Duration::from_millis(20));
            }
        }
        {
            let _guard = self.state.lock();
            self.wake_parked();
            self.moved.notify_all();
        }
        self.check_failed()?;
        // Acks refused a segment and still not written would be back after the reopen:
        // say so instead of closing cleanly.
        if !self.acks.lock().entries.is_empty() {
            return Err(self
                .refusals
                .lock()
                .queued
                .as_ref()
                .map_or_else(|| Error::Closed, Error::replicate));
        }
        Ok(())
    }

    /// The spare segment's id, if one is ready.
    pub fn spare_id(&self) -> Option<u64> {
        self.state.lock().spare.as_ref().map(|s| s.id)
    }

    /// Closes the spare segment (it is sealed empty and then shredded like any dead
    /// segment); a new spare is made in the next round. Used when the spare's key belongs
    /// to an epoch that is over, so that an idle store does not keep that epoch's key.
    pub fn retire_spare(&self, now_ms: u64) {
        let mut st = self.state.lock();
        if let Some(spare) = st.spare.take() {
            let id = spare.id;
            st.actives.insert(id, Active::new(spare, None, now_ms));
            self.close_locked(&mut st, id);
            self.keys_work.notify_one();
        }
    }

    /// Ids of segments currently being written (never shredded).
    pub fn active_ids(&self) -> Vec<u64> {
        let st = self.state.lock();
        let mut v: Vec<u64> = st.actives.keys().copied().collect();
        v.extend(st.spare.as_ref().map(|s| s.id));
        v
    }

    // ----- the writer thread -----

    fn run(self: Arc<Self>) {
        // Whatever ends this thread (a panic included), waiters must not sleep forever.
        struct Stopped<'a>(&'a Writer);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    let _ = self
                        .0
                        .failed
                        .set(("the writer thread panicked".into(), FailureCause::Internal));
                }
                self.0.stopped.store(true, Ordering::SeqCst);
                self.0.wake_parked();
                let _g = self.0.state.lock();
                self.0.moved.notify_all();
            }
        }
        let _stopped = Stopped(&self);
        let mut ws = WriterLocal {
            crcs: HashMap::new(),
            unsynced: HashMap::new(),
            unsynced_bytes: 0,
            last_sync: Instant::now(),
        };
        // A failure found elsewhere (a misfit frame, the spare maker) stops it too: a
        // failed store writes nothing more, and a shutdown does not wait on frames that
        // will never come.
        while self.failed.get().is_none() {
            match self.step(&mut ws) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.fail(&e);
                    break;
                }
            }
        }
    }

    /// Group commit: when several callers have been sharing fsyncs, hold the batch open
    /// while more keep arriving: until as many wait as recently did, or none arrived for
    /// `LINGER_QUIET`, or `max_delay` after the first. A lone caller never waits.
    fn linger(&self, st: &mut MutexGuard<'_, State>, max_delay: Duration) {
        let peak = self.peak_batch.load(Ordering::SeqCst);
        if peak <= 1 {
            return;
        }
        let max_ns = max_delay.as_nanos() as u64;
        let quiet_ns = LINGER_QUIET.as_nanos() as u64;
        self.lingering.store(true, Ordering::SeqCst);
        loop {
            let (first, last) = (
                self.first_waiter_ns.load(Ordering::SeqCst),
                self.last_arrival_ns.load(Ordering::SeqCst),
            );
            let arrived = self.arrivals.load(Ordering::SeqCst);
            if first == 0 || arrived == 0 || st.shutdown || arrived >= peak {
                break;
            }
            let now = self.now_ns();
            let (since_first, quiet) = (now.saturating_sub(first), now.saturating_sub(last));
            if since_first >= max_ns || quiet >= quiet_ns {
                break;
            }
            let t = (quiet_ns - quiet).min(max_ns - since_first);
            self.work.wait_for(st, Duration::from_nanos(t));
        }
        self.lingering.store(false, Ordering::SeqCst);
    }

    /// One round: wait for work, write, fsync, seal, apply acks. `Ok(false)` = stopped.
    fn step(self: &Arc<Self>, ws: &mut WriterLocal) -> Result<bool> {
        let is_async = self.cfg.durability == Durability::Async;
        let mut st = self.state.lock();
        self.wait_for_work(&mut st, ws);
        if self.failed.get().is_some() {
            return Ok(false); // a failed store writes nothing more
        }
        // Group commit: hold the batch open briefly while more callers are arriving.
        if let Durability::Group { max_delay } = self.cfg.durability {
            self.linger(&mut st, max_delay);
        }
        // Callers that arrived from here on are served by the next fsync.
        let batch_waiters = self.arrivals.swap(0, Ordering::SeqCst);
        let stale_waiters = self.waiters.load(Ordering::SeqCst) > 0;
        st.urgent = false;
        self.first_waiter_ns.store(0, Ordering::SeqCst);
        self.last_arrival_ns.store(0, Ordering::SeqCst);
        let (ack_gen, ack_entries) = {
            let mut b = self.acks.lock();
            let gen = b.gen;
            b.gen += 1;
            (gen, std::mem::take(&mut b.entries))
        };
        let (ack_frames, ack_entries, refused, deferred) =
            self.place_acks(&mut st, ack_gen, ack_entries);
        // Every queued ack is reserved this round: the episode ends once they are durable.
        let refusal_ends = !refused && !deferred && !ack_entries.is_empty();
        if st.shutdown {
            self.close_all(&mut st);
        }
        let (mut runs, to_seal) = Self::take_runs(&mut st);
        // A spare still being made is sealed in a later round, once it is offered.
        let shutdown = st.shutdown && st.actives.is_empty() && !st.prefilling && !st.creating;
        drop(st);
        self.moved.notify_all();

        // Outside Async, every appender waits for its frames to be durable. With no
        // concurrency to batch (a lone caller), fsync them in this round instead of
        // waiting for the caller's arrival to start another one.
        let lone_appender =
            !is_async && !runs.is_empty() && self.peak_batch.load(Ordering::SeqCst) <= 1;
        for (seg, off, ids) in &ack_frames {
            let f = codec::seal_acks(&seg.key, seg.id, *off, ids);
            runs.push((Arc::clone(seg), *off, vec![f]));
        }
        Self::write_runs(runs, ws)?;
        self.moved.notify_all();

        let need_sync = batch_waiters > 0
            || lone_appender
            || (stale_waiters && !ws.unsynced.is_empty())
            || !ack_frames.is_empty() && !is_async
            || (is_async && ws.last_sync.elapsed() >= self.cfg.async_sync_interval)
            || shutdown;
        if need_sync {
            let bytes = std::mem::take(&mut ws.unsynced_bytes);
            let avg = self.round_bytes.load(Ordering::Relaxed);
            self.round_bytes
                .store(avg - avg / 8 + bytes / 8, Ordering::Relaxed);
            for (_, seg) in ws.unsynced.drain() {
                let w = seg.written.load(Ordering::SeqCst);
                // Segments about to be sealed are fsynced by the seal.
                if w > seg.durable.load(Ordering::SeqCst)
                    && !to_seal.iter().any(|(s, _)| s.id == seg.id)
                {
                    seg.sync()?;
                    seg.durable.store(w, Ordering::SeqCst);
                }
            }
            ws.last_sync = Instant::now();
        }
        // Acks are linked before their segment can be sealed: a sealed ack segment that
        // protects nothing yet could be shredded by the reaper in between.
        self.apply_acks(&ack_entries, &ack_frames);
        self.seal_segments(to_seal, ws)?;
        if (!is_async || need_sync) && !refused && !deferred {
            self.acks_done.fetch_max(ack_gen + 1, Ordering::SeqCst);
        }
        if self.refusing.load(Ordering::SeqCst) {
            let mut r = self.refusals.lock();
            if refusal_ends {
                r.ends_at = Some(ack_gen);
            }
            if r.ends_at
                .is_some_and(|g| self.acks_done.load(Ordering::SeqCst) > g)
            {
                *r = Refusals::default();
                self.refusing.store(false, Ordering::SeqCst);
            }
        }
        self.finish_round(batch_waiters);
        Ok(!shutdown)
    }

    /// Places this round's ack entries (batch `gen`) in the ack segment. Entries left
    /// over (no ack segment to be had now) go back to the front of the buffer: refused
    /// (their waiters get the error) or waiting for the key worker's spare; either way
    /// the batch is not done. Returns the frames, the entries they hold, and whether the
    /// batch was refused or deferred.
    fn place_acks(
        &self,
        st: &mut MutexGuard<'_, State>,
        gen: u64,
        mut entries: Vec<(u64, u64)>,
    ) -> (Vec<AckFrame>, Vec<(u64, u64)>, bool, bool) {
        st.acks_deferred = false;
        st.acks_await_worker = false;
        let paused = self.acks_paused(st).filter(|_| !entries.is_empty());
        let (frames, stopped) = match paused {
            Some(e) => (Vec::new(), Some((AckStop::Refused(e), 0))),
            None => self.reserve_acks(st, &entries),
        };
        let Some((stop, consumed)) = stopped else {
            return (frames, entries, false, false);
        };
        self.requeue_acks(entries.split_off(consumed));
        st.acks_deferred = true;
        match stop {
            AckStop::Refused(e) => {
                self.refuse_acks(gen, e);
                (frames, entries, true, false)
            }
            AckStop::NoSegmentYet => {
                st.acks_await_worker = true;
                (frames, entries, false, true)
            }
        }
    }

    /// Sleeps until there is something to do.
    fn wait_for_work(&self, st: &mut MutexGuard<'_, State>, ws: &WriterLocal) {
        let is_async = self.cfg.durability == Durability::Async;
        loop {
            // Acks the disk refused a segment for wait for the key worker's next try;
            // acks that need a new ack segment wait for its spare (or its refusal).
            let acks_waiting = self.acks_paused(st).is_none()
                && Self::ack_segment_in_reach(st)
                && !self.acks.lock().entries.is_empty();
            let closing_ready = st.actives.values().any(Active::ready_to_seal);
            let sync_due = is_async
                && st.pending_bytes == 0
                && ws.last_sync.elapsed() >= self.cfg.async_sync_interval;
            // At shutdown, a spare being made (zero-filled in the background, or by an
            // appender with the lock dropped) is waited for and then sealed; its maker
            // wakes us.
            let want = self.failed.get().is_some()
                || (st.shutdown && !((st.prefilling || st.creating) && st.actives.is_empty()))
                || st.urgent
                || self.arrivals.load(Ordering::SeqCst) > 0
                || (self.waiters.load(Ordering::SeqCst) > 0 && !ws.unsynced.is_empty())
                || closing_ready
                || (st.acks_deferred
                    && Self::ack_segment_in_reach(st)
                    && (st.acks_await_worker || self.acks_paused(st).is_none()))
                || (!is_async && (st.pending_bytes > 0 || acks_waiting))
                || (is_async && (st.pending_bytes >= ASYNC_WAKE_BYTES || sync_due));
            if want {
                return;
            }
            let busy = st.pending_bytes > 0 || acks_waiting;
            let tick = if busy {
                Duration::from_millis(1)
            } else {
                self.cfg.async_sync_interval.min(Duration::from_millis(100))
            };
            if self.work.wait_for(st, tick).timed_out() && busy {
                return;
            }
        }
    }

    /// Reserves space for the ack frames in the active ack segment (rotating it into the
    /// spare when full); the frames are sealed after the lock is dropped. When no spare is
    /// ready, returns the frames reserved so far, why it stopped and how many entries
    /// those frames hold: the rest stay queued. The key worker may still be making the
    /// spare (the acks wait for it: the writer's round never writes the keystore), or the
    /// disk (or the quota) refused it: a refused rotation is not a failed write; nothing
    /// is lost, the acks wait for space like appends do. At shutdown the spare is made
    /// here.
    fn reserve_acks(
        &self,
        st: &mut MutexGuard<'_, State>,
        entries: &[(u64, u64)],
    ) -> AckReservation {
        let mut frames = Vec::new();
        let mut consumed = 0;
        for chunk in entries.chunks(self.acks_per_frame()) {
            let len = codec::acks_frame_len(chunk.len()) as u64;
            let id = loop {
                let fits = st
                    .ack_seg
                    .and_then(|id| st.actives.get(&id))
                    .is_some_and(|a| a.tail + len + SEAL_FRAME_LEN as u64 <= self.cfg.segment_size);
                if fits {
                    break st.ack_seg.expect("checked");
                }
                if let Some(old) = st.ack_seg.take() {
                    self.rotating_full.store(true, Ordering::Relaxed);
                    self.close_locked(st, old);
                }
                let at_shutdown = st.shutdown;
                match self.take_spare(st, at_shutdown) {
                    Ok(Some(seg)) => {
                        seg.has_acks.store(true, Ordering::SeqCst);
                        st.ack_seg = Some(seg.id);
                        let now = self.clock.now_ms();
                        st.actives.insert(seg.id, Active::new(seg, None, now));
                    }
                    Ok(None) if at_shutdown => {}
                    // A segment that could not be made (disk full, the key provider, an
                    // I/O error creating it) wrote nothing anyone waits on: refuse these
                    // acks and retry, never fail the store for it.
                    Ok(None) => {
                        let stop = match &st.spare_error {
                            Some(e) => AckStop::Refused(e.replicate()),
                            None => AckStop::NoSegmentYet,
                        };
                        self.keys_work.notify_one();
                        return (frames, Some((stop, consumed)));
                    }
                    Err(e) => return (frames, Some((AckStop::Refused(e), consumed))),
                }
            };
            let a = st.actives.get_mut(&id).expect("ack segment is active");
            let off = a.tail;
            a.tail += len;
            a.taken = a.tail;
            frames.push((Arc::clone(&a.seg), off, chunk.iter().map(|e| e.0).collect()));
            consumed += chunk.len();
        }
        (frames, None)
    }

    /// After an ack segment was refused, acks wait for the key worker's next try (there
    /// is no ack segment until one can be made); the refusal, while they wait. At
    /// shutdown they are tried once more.
    fn acks_paused(&self, st: &State) -> Option<Error> {
        if st.shutdown || st.ack_seg.is_some() || st.spare.is_some() || st.spare_error.is_none() {
            return None;
        }
        self.refusals.lock().queued.as_ref().map(Error::replicate)
    }

    /// Whether a round could place acks now: an ack segment or a spare is there, the
    /// key worker's refusal is there to report, or it is shutdown (the spare is made in
    /// the round then).
    fn ack_segment_in_reach(st: &State) -> bool {
        st.ack_seg.is_some() || st.spare.is_some() || st.spare_error.is_some() || st.shutdown
    }

    /// Puts ack entries not placed this round back at the front of the ack buffer.
    fn requeue_acks(&self, rest: Vec<(u64, u64)>) {
        if rest.is_empty() {
            return;
        }
        let mut b = self.acks.lock();
        let later = std::mem::replace(&mut b.entries, rest);
        b.entries.extend(later);
    }

    /// No ack segment could be made: batch `gen`'s waiters get the refusal (its entries
    /// not yet placed are queued again, `requeue_acks`), and so do those of earlier
    /// batches still not written (left waiting for the key worker's spare).
    fn refuse_acks(&self, gen: u64, err: Error) {
        let mut r = self.refusals.lock();
        let first = r
            .gens
            .map_or_else(|| self.acks_done.load(Ordering::SeqCst).min(gen), |g| g.0);
        r.gens = Some((first, gen));
        r.queued = Some(err);
        self.refusing.store(true, Ordering::SeqCst);
    }

    /// At shutdown: closes every active segment, and the spare (sealed empty).
    fn close_all(&self, st: &mut State) {
        if let Some(spare) = st.spare.take() {
            let now = self.clock.now_ms();
            st.actives.insert(spare.id, Active::new(spare, None, now));
        }
        let ids: Vec<u64> = st
            .actives
            .values()
            .filter(|a| !a.closing)
            .map(|a| a.seg.id)
            .collect();
        for id in ids {
            self.close_locked(st, id);
        }
    }

    /// Takes the contiguous submitted frames of every active segment, and the closed
    /// segments that are complete (removed from the actives, to be sealed).
    fn take_runs(st: &mut State) -> (Vec<Run>, Vec<(Arc<Segment>, u64)>) {
        let mut runs = Vec::new();
        let State {
            actives,
            pending_bytes,
            ..
        } = st;
        for a in actives.values_mut() {
            let start = a.taken;
            let mut frames = Vec::new();
            while let Some(f) = a.pending.remove(&a.taken) {
                a.taken += f.len() as u64;
                *pending_bytes -= f.len() as u64;
                frames.push(f);
            }
            if !frames.is_empty() {
                runs.push((Arc::clone(&a.seg), start, frames));
            }
        }
        let to_seal: Vec<(Arc<Segment>, u64)> = st
            .actives
            .values()
            .filter(|a| a.ready_to_seal())
            .map(|a| (Arc::clone(&a.seg), a.tail))
            .collect();
        for (s, _) in &to_seal {
            st.actives.remove(&s.id);
        }
        (runs, to_seal)
    }

    /// Writes each run with one `pwrite`, in offset order, keeping each segment's running
    /// checksum and frame count for its seal.
    fn write_runs(mut runs: Vec<Run>, ws: &mut WriterLocal) -> Result<()> {
        runs.sort_by_key(|r| (r.0.id, r.1));
        for (seg, start, frames) in runs {
            let mut buf = Vec::with_capacity(frames.iter().map(Vec::len).sum());
            let entry = ws
                .crcs
                .entry(seg.id)
                .or_insert_with(|| (crc32fast::Hasher::new(), 0));
            for f in &frames {
                entry.0.update(f);
                entry.1 += 1;
                buf.extend_from_slice(f);
            }
            seg.write_at(&buf, start)?;
            ws.unsynced_bytes += buf.len() as u64;
            seg.written
                .store(start + buf.len() as u64, Ordering::SeqCst);
            ws.unsynced.insert(seg.id, seg);
        }
        Ok(())
    }

    /// Seals closed segments: seal frame, cut the preallocation, fsync, map; the key
    /// worker records the final lengths in the keystore.
    fn seal_segments(&self, to_seal: Vec<(Arc<Segment>, u64)>, ws: &mut WriterLocal) -> Result<()> {
        let mut sealed_lens = Vec::new();
        for (seg, tail) in to_seal {
            let (crc, count) = ws
                .crcs
                .remove(&seg.id)
                .map_or((crc32fast::hash(&[]), 0), |(h, n)| (h.finalize(), n));
            let salt = crate::crypto::random_u64()?;
            let f = codec::seal_segment(&seg.key, seg.id, tail, count, crc, salt);
            seg.write_at(&f, tail)?;
            let end = tail + f.len() as u64;
            seg.truncate(end)?;
            seg.sync()?;
            // Truncated from its preallocated size to its sealed length.
            let freed = self.cfg.segment_size.saturating_sub(end);
            let _ = self
                .disk_used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                    Some(u.saturating_sub(freed))
                });
            seg.written.store(end, Ordering::SeqCst);
            seg.durable.store(end, Ordering::SeqCst);
            seg.map_for_reading()?;
            seg.closed.store(true, Ordering::SeqCst);
            ws.unsynced.remove(&seg.id);
            sealed_lens.push((seg.id, end));
        }
        if !sealed_lens.is_empty() {
            self.hand_over_sealed(sealed_lens);
            self.poke_reaper();
        }
        Ok(())
    }

    /// Ack effects, once the ack frames are written: link each ack segment to the
    /// segments it acks into (so it outlives them), then count the messages dead.
    fn apply_acks(&self, entries: &[(u64, u64)], frames: &[AckFrame]) {
        if entries.is_empty() {
            return;
        }
        let mut per_target: HashMap<u64, u64> = HashMap::new();
        for (_, seg) in entries {
            *per_target.entry(*seg).or_default() += 1;
        }
        let mut any_dead = false;
        let now = self.clock.now_ms();
        for (target, n) in per_target {
            let Some(t) = self.segments.get(target) else {
                continue;
            };
            // The ack records protect the segment the message was found in and every
            // segment holding a compaction copy of its records (contract 5). The ack
            // segments join `t`'s sources and `t`'s copies are read under one lock: a
            // compaction linking a copy of `t` either is seen here, or sees these sources
            // (`gc::compact::abandon` reads them under the same lock).
            let copies: Vec<u64> = {
                let mut l = t.links.lock();
                for (src, _, _) in frames {
                    if src.id != t.id {
                        l.ack_sources.insert(src.id);
                    }
                }
                l.copies.iter().copied().collect()
            };
            for (src, _, _) in frames {
                if src.id != t.id {
                    src.links.lock().ack_targets.insert(t.id);
                }
            }
            for c in copies.into_iter().filter_map(|c| self.segments.get(c)) {
                for (src, _, _) in frames {
                    if src.id != c.id {
                        src.links.lock().ack_targets.insert(c.id);
                        c.links.lock().ack_sources.insert(src.id);
                    }
                }
            }
            t.dec_live(n);
            t.mark_acked(now);
            any_dead |= t.live.load(Ordering::SeqCst) == 0;
        }
        if any_dead {
            self.poke_reaper();
        }
    }

    fn poke_reaper(&self) {
        if let Some(cb) = self.on_dead.get() {
            (cb.0)();
        }
    }

    /// Learns the batch size for the next linger and wakes everyone waiting.
    fn finish_round(&self, batch_waiters: usize) {
        if batch_waiters > 0 {
            let peak = self.peak_batch.load(Ordering::SeqCst);
            let next = if batch_waiters >= peak {
                batch_waiters
            } else {
                peak - (peak - batch_waiters).div_ceil(8)
            };
            self.peak_batch.store(next, Ordering::SeqCst);
        }
        self.wake_parked();
        drop(self.state.lock());
        self.moved.notify_all();
    }
}

/// Ack batches no ack segment could be made for.
#[derive(Debug, Default)]
struct Refusals {
    /// The refused batch generations of the current episode (first, last): their
    /// waiters get `queued`'s error. A round in between that wrote acks is not in it
    /// (`acks_done` answers those first).
    gens: Option<(u64, u64)>,
    /// Set while refused acks are queued; cleared once they are durable, which ends the
    /// episode.
    queued: Option<Error>,
    /// The batch that took the last of them: the episode ends when it is durable.
    ends_at: Option<u64>,
}

/// Frames taken from one segment: (segment, offset of the first, frames in order).
type Run = (Arc<Segment>, u64, Vec<Vec<u8>>);
/// An ack frame to seal: (ack segment, offset, acked ids).
type AckFrame = (Arc<Segment>, u64, Vec<u64>);
/// Ack frames reserved, and why placing acks stopped early with the number of entries
/// those frames hold.
type AckReservation = (Vec<AckFrame>, Option<(AckStop, usize)>);

/// Why a round placed only some of the queued acks.
#[derive(Debug)]
enum AckStop {
    /// No ack segment could be made: the waiters get this error.
    Refused(Error),
    /// The key worker is still making the spare: the acks wait for it.
    NoSegmentYet,
}

/// State only the writer thread touches.
#[derive(Debug)]
struct WriterLocal {
    /// Running checksum and frame count of each segment being written (for its seal).
    crcs: HashMap<u64, (crc32fast::Hasher, u64)>,
    /// Segments written since their last fsync, and how many bytes.
    unsynced: HashMap<u64, Arc<Segment>>,
    unsynced_bytes: u64,
    last_sync: Instant,
}

impl Active {
    fn new(seg: Arc<Segment>, bucket: Option<Bucket>, now_ms: u64) -> Self {
        let tail = seg.written.load(Ordering::SeqCst);
        Active {
            seg,
            bucket,
            tail,
            taken: tail,
            pending: BTreeMap::new(),
            closing: false,
            created_ms: now_ms,
            last_used_ms: now_ms,
        }
    }

    fn ready_to_seal(&self) -> bool {
        self.closing && self.taken == self.tail && self.pending.is_empty()
    }
}
