//! The public API: [`Store`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{CorruptionKind, Error, Result};
use crate::format::frame::{FrameHeader, FrameKind, MessageMeta, MAX_QUEUE_ID};
use crate::format::padding;
use crate::fsutil::{self, DirLock};
use crate::gc::{self, ReaperSignal};
use crate::index::dedupe::ClientId;
use crate::index::{Index, QueueCell, Removed, Slot};
use crate::keys::keyring::Keyring;
use crate::options::{Clock, Durability, Options};
use crate::recovery::{self, RecoveryReport};
use crate::segment::codec;
use crate::segment::{Segment, SegmentTable};
use crate::subscription::Subscription;
use crate::writer::{Bucket, Reservation, Writer, WriterConfig};

/// Recovery: the live messages into the index, with their client ids. (The client ids
/// of acked messages are not restored: their ack records cannot tell an ack from a
/// purge, and a purge must forget them.)
fn restore_index(index: &Index, live: Vec<recovery::FoundMessage>, now: u64, window_ms: u64) {
    for m in live {
        let q = index.get_or_create(&m.queue);
        let mut st = q.state.lock();
        st.push_pending(m.id, m.expires_at_ms, m.len);
        st.commit(m.id, m.seg, m.off);
        index.messages.fetch_add(1, Ordering::SeqCst);
        drop(st);
        restore_client_id(index, &q, &m, now, window_ms);
    }
}

/// Recovery: `m`'s client id (if it has one, and within the window) names it again.
fn restore_client_id(
    index: &Index,
    q: &Arc<QueueCell>,
    m: &recovery::FoundMessage,
    now: u64,
    window_ms: u64,
) {
    let Some(cid) = m.client_id else { return };
    if now.saturating_sub(m.created_at_ms) >= window_ms {
        return;
    }
    let entry = crate::index::dedupe::Entry {
        id: m.id,
        seg: Some(m.seg),
        at_ms: m.created_at_ms,
    };
    q.state.lock().dedupe.restore(cid, entry);
    index.dedupe_refs.add(m.seg, Arc::downgrade(q), cid);
}

/// A message id: unique in the store forever, increasing in append order within a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        s.parse().map(MessageId)
    }
}

/// A message returned by [`Store::read`].
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub payload: Vec<u8>,
    /// Expiry, in milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for Message {
    // Payloads are secret: never in Debug output or logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("payload_len", &self.payload.len())
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// One message of [`Store::append_batch`].
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    pub queue: &'a [u8],
    pub payload: &'a [u8],
    pub ttl: Duration,
}

/// A sender's name for one message (16 bytes, e.g. a random UUID), for
/// [`Store::append_once`]: a second append with the same id to the same queue stores
/// nothing. Never printed (`Debug` hides it): it can link messages to their sender.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientMessageId(pub [u8; 16]);

impl std::fmt::Debug for ClientMessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientMessageId(..)")
    }
}

/// What [`Store::append_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The message was stored under this id.
    Stored(MessageId),
    /// An earlier append with the same client id stored this message: nothing was
    /// stored now.
    Duplicate(MessageId),
}

impl Appended {
    /// The message's id, stored now or before.
    pub fn id(self) -> MessageId {
        match self {
            Appended::Stored(id) | Appended::Duplicate(id) => id,
        }
    }
}

/// One message to store (internal: `NewMessage` plus the client id of `append_once`).
struct Item<'a> {
    queue: &'a [u8],
    payload: &'a [u8],
    ttl: Duration,
    cid: Option<ClientId>,
}

/// A message whose id and pending slot are issued, not yet written.
struct Issued {
    q: Arc<QueueCell>,
    id: u64,
    flen: u64,
    expires: u64,
    cid: Option<ClientId>,
}

/// Whether a removal wakes the queue's waiters (a purge: an `append_once` may wait on a
/// client id it just forgot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Queue,
    Nobody,
}

/// Whether an ack waits for its record per the durability mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckWait {
    Durable,
    No,
}

/// Forgets the client ids of `Issued` messages if their write panics, and wakes the
/// repeats waiting on them.
struct ForgetOnUnwind<'a>(&'a [Issued]);

impl Drop for ForgetOnUnwind<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for is in self.0 {
            if let Some(cid) = &is.cid {
                is.q.state.lock().dedupe.abandon(cid, is.id);
                is.q.notify();
            }
        }
    }
}

/// What issuing found.
enum Issue {
    New(Issued),
    /// The queue has this client id on record: its message.
    Duplicate(u64),
}

/// Counters from [`Store::stats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Segment files (each with its own key).
    pub segments: u64,
    /// Bytes the data dir occupies: segment files (a segment being written counts its
    /// whole preallocated size), the keystore and the key audit log.
    pub bytes_on_disk: u64,
    /// Messages in the index (appended, not acked, not yet removed as expired).
    pub live_messages: u64,
    /// Records still on disk (and still decryptable) whose message is acked or expired.
    pub dead_records: u64,
    /// Data keys in the keystore.
    pub live_keys: u64,
    /// Segments shredded since open.
    pub shreds: u64,
    /// Queues in the index.
    pub queues: u64,
    /// Age of the oldest segment still holding a live message (an upper bound on the
    /// oldest live message's age).
    pub oldest_live_age: Option<Duration>,
    /// The last error of background maintenance, if any.
    pub last_gc_error: Option<String>,
    /// Shred latency (first dead record of a segment → its key destroyed) over the last
    /// 4096 shreds: p50, p99, max.
    pub shred_latency_p50: Option<Duration>,
    pub shred_latency_p99: Option<Duration>,
    pub shred_latency_max: Option<Duration>,
    /// Frame bytes appended, and copied by compaction.
    pub bytes_appended: u64,
    pub bytes_copied: u64,
    /// (appended + copied) / appended: bytes written per byte appended.
    pub write_amplification: f64,
    /// How long the oldest dead record that can still be decrypted has been dead.
    pub oldest_dead_openable_age: Option<Duration>,
    /// The most by which any record outlived `max_shred_delay` since open: at its shred,
    /// or (still decryptable) now. Zero while the deadline holds.
    pub shred_overrun_max: Duration,
    /// Compactions that failed for a reason that may pass and were retried.
    pub compaction_retries: u64,
    /// Segments no compaction can empty (a record that does not open; see
    /// `last_gc_error`): their dead records are shredded only with the whole segment.
    pub uncompactable_segments: u64,
}

pub(crate) struct Inner {
    pub dir: PathBuf,
    pub opts: Options,
    clock: Arc<dyn Clock>,
    pub index: Index,
    pub segments: Arc<SegmentTable>,
    pub keyring: Arc<Keyring>,
    pub writer: Arc<Writer>,
    next_id: Arc<AtomicU64>,
    pub shreds: AtomicU64,
    pub reaper: ReaperSignal,
    pub compactor: ReaperSignal,
    /// Frame bytes appended by callers, and copied by compaction.
    bytes_appended: AtomicU64,
    pub bytes_copied: AtomicU64,
    /// Recent shred latencies (death of the first record → key destroyed), ms.
    shred_latencies: Mutex<std::collections::VecDeque<u64>>,
    pub last_gc_error: Mutex<Option<String>>,
    shred_overrun_max_ms: AtomicU64,
    compaction_retries: AtomicU64,
    closed: AtomicBool,
    report: RecoveryReport,
    /// When the master key was last rotated (or the store created), ms.
    pub last_rotation_ms: AtomicU64,
    maint_shard: Mutex<usize>,
    lock: Mutex<Option<DirLock>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// "Now" for expiry: the engine clock (see `options::EngineClock`).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Counts a compaction that failed for a reason that may pass (retried).
    pub fn count_compaction_retry(&self) {
        self.compaction_retries.fetch_add(1, Ordering::SeqCst);
    }

    /// Keeps the last `SHRED_LATENCY_WINDOW` shred latencies for `stats()`, and the
    /// largest overrun of the deadline.
    pub fn record_shred_latency(&self, ms: u64) {
        let d = self.opts.max_shred_delay.as_millis() as u64;
        self.shred_overrun_max_ms
            .fetch_max(ms.saturating_sub(d), Ordering::SeqCst);
        let mut l = self.shred_latencies.lock();
        if l.len() == SHRED_LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(ms);
    }

    /// Counts removed-as-expired messages dead in their segments.
    pub fn drop_expired(&self, slots: &[Slot]) {
        if slots.is_empty() {
            return;
        }
        self.index
            .messages
            .fetch_sub(slots.len() as u64, Ordering::SeqCst);
        for s in slots {
            if let Some(seg) = self.segments.get(s.seg) {
                seg.dec_live(1);
            }
        }
        self.reaper.poke();
    }
}

/// How many recent shred latencies `stats()` summarises.
const SHRED_LATENCY_WINDOW: usize = 4096;

/// An open data dir. `Send + Sync`: share it through an `Arc`.
///
/// Dropping the store (or [`Store::close`]) writes and fsyncs everything, seals the active
/// segments and releases the directory lock; reopening recovers.
#[derive(Debug)]
pub struct Store {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn validate_queue(queue: &[u8]) -> Result<()> {
    if queue.is_empty() || queue.len() > MAX_QUEUE_ID {
        return Err(Error::InvalidQueueId { len: queue.len() });
    }
    Ok(())
}

impl Store {
    /// Creates or opens the data dir `dir` (mode 0700, files 0600), takes its exclusive
    /// lock, and recovers its contents.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Store> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fsutil::create_private_dir(&dir)?;
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::io("resolve data dir", &dir, e))?;
        check_key_location(&dir, &opts, &*opts.key_provider)?;
        if opts.core_dumps == crate::options::CoreDumps::Disable {
            crate::crypto::locked::disable_core_dumps()
                .map_err(|e| Error::io("disable core dumps", "", e))?;
        }
        let lock = DirLock::acquire(&dir)?;
        let (mut rec, provider) = recover_with_keys(&dir, &opts)?;
        let clock: Arc<dyn Clock> = Arc::new(crate::options::EngineClock::new(
            Arc::clone(&opts.clock),
            rec.keystore.time_floor_ms,
        ));
        let next_id = Arc::new(AtomicU64::new(rec.next_id));
        // A rotation time past the clock (a forged or damaged record) must not put the
        // next automatic rotation off: no later than now.
        let now = clock.now_ms();
        let last_rotation_ms = rec.last_rotation_ms.map_or(now, |t| t.min(now));
        let keyring = Arc::new(Keyring::new(
            (&dir, Arc::clone(&opts.file_system)),
            (rec.keystore, rec.audit),
            Arc::clone(&provider),
            Arc::clone(&next_id),
            Arc::clone(&clock),
        ));
        if provider.kek_id() != opts.key_provider.kek_id() {
            let r = keyring.rotate(Arc::clone(&opts.key_provider))?;
            rec.report.master_key_rotated = Some((r.old_kek_id, r.new_kek_id));
        }
        let segments = Arc::new(SegmentTable::default());
        for s in rec.segments {
            segments.insert(s);
        }
        let index = Index::default();
        restore_index(
            &index,
            rec.messages,
            now,
            opts.dedupe_window.as_millis() as u64,
        );
        let writer = Writer::new(
            WriterConfig {
                durability: opts.durability,
                segment_size: opts.segment_size,
                async_sync_interval: opts.async_sync_interval,
                max_disk_bytes: opts.max_disk_bytes,
                max_active_age_ms: gc::deadline::Deadline::new(opts.max_shred_delay)
                    .active_age_ms(),
                zero_fill: opts.zero_fill_segments && opts.durability != Durability::Async,
            },
            Arc::clone(&clock),
            Arc::clone(&keyring),
            Arc::clone(&segments),
        );
        let inner = Arc::new(Inner {
            dir,
            clock,
            index,
            segments,
            keyring,
            writer: Arc::clone(&writer),
            next_id,
            shreds: AtomicU64::new(0),
            reaper: ReaperSignal::default(),
            compactor: ReaperSignal::default(),
            bytes_appended: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            shred_latencies: Mutex::new(std::collections::VecDeque::new()),
            last_gc_error: Mutex::new(None),
            shred_overrun_max_ms: AtomicU64::new(0),
            compaction_retries: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            report: rec.report,
            last_rotation_ms: AtomicU64::new(last_rotation_ms),
            maint_shard: Mutex::new(0),
            lock: Mutex::new(Some(lock)),
            opts,
        });
        let weak = Arc::downgrade(&inner);
        writer.start(Box::new(move || {
            if let Some(i) = weak.upgrade() {
                i.reaper.poke();
            }
        }))?;
        let store = Store {
            inner: Arc::clone(&inner),
            threads: Mutex::new(Vec::new()),
        };
        // Shred what recovery found dead before serving.
        gc::shred_dead(&inner, inner.now_ms())?;
        // Keys left in an epoch that ended while the store was closed move on now (HSM);
        // a token error here is reported like any maintenance error, not as a failed open.
        if let Err(e) = inner.keyring.roll_epochs() {
            *inner.last_gc_error.lock() = Some(e.to_string());
        }
        if inner.opts.background_reaper {
            store.spawn("cinder-reaper", gc::run_reaper)?;
            store.spawn("cinder-compactor", gc::run_compactor)?;
        }
        Ok(store)
    }

    fn spawn(&self, name: &str, f: fn(&Arc<Inner>)) -> Result<()> {
        let i = Arc::clone(&self.inner);
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&i))
            .map_err(|e| Error::io("spawn background thread", "", e))?;
        self.threads.lock().push(h);
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Rotates the master key without downtime: every live data key is re-wrapped under
    /// `new` and the keystore is rewritten under it in one atomic rename; appends, reads
    /// and acks go on meanwhile (only segment creation and shredding wait). Data keys
    /// never change, so no segment is rewritten. A crash leaves a store that opens with
    /// the old key, or with the new one given the old as
    /// [`Options::previous_key_provider`] (which then finishes the rotation). The key
    /// audit log records each re-wrap and the rotation.
    pub fn rotate_master_key(
        &self,
        new: Arc<dyn crate::keys::KeyProvider>,
    ) -> Result<crate::keys::RotationReport> {
        self.check_open()?;
        rotate_master(&self.inner, new, self.inner.now_ms())
    }

    /// The id (public fingerprint) of the master key currently wrapping the data keys.
    pub fn master_key_id(&self) -> u64 {
        self.inner.keyring.kek_id()
    }

    /// What recovery found when this store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// Appends one message; returns once it is durable per the durability mode.
    pub fn append(&self, queue: &[u8], payload: &[u8], ttl: Duration) -> Result<MessageId> {
        let ids = self.append_batch(&[NewMessage {
            queue,
            payload,
            ttl,
        }])?;
        Ok(ids[0])
    }

    /// Appends one message at most once per `client_id` and queue: if an earlier append
    /// with this client id is still on record for the queue (its record not shredded,
    /// the queue not purged, and within `Options::dedupe_window` of that append), this
    /// stores nothing and returns `Duplicate` with the earlier message's id, even if that
    /// message was acked or expired since. While the earlier append is still being
    /// written, this waits for its outcome. The client id is stored inside the sealed
    /// record, never in the clear, and the store's memory of it ends with the record.
    pub fn append_once(
        &self,
        queue: &[u8],
        client_id: ClientMessageId,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<Appended> {
        self.check_open()?;
        let item = Item {
            queue,
            payload,
            ttl,
            cid: Some(client_id.0),
        };
        self.validate(std::slice::from_ref(&item))?;
        let now = self.inner.now_ms();
        let body = padding::padded_len(self.inner.opts.padding, payload.len());
        match self.issue(&item, body, now)? {
            Issue::Duplicate(id) => Ok(Appended::Duplicate(MessageId(id))),
            Issue::New(issued) => {
                let ids = self.write_issued(&[item], &[issued], &[body], now)?;
                Ok(Appended::Stored(ids[0]))
            }
        }
    }

    /// Appends several messages, waiting once for all of them to be durable. Validation
    /// and quotas are checked for the whole batch first: if one message is refused,
    /// none is stored. The batch is not atomic across a crash (each message is).
    pub fn append_batch(&self, items: &[NewMessage<'_>]) -> Result<Vec<MessageId>> {
        self.check_open()?;
        let items: Vec<Item<'_>> = items
            .iter()
            .map(|m| Item {
                queue: m.queue,
                payload: m.payload,
                ttl: m.ttl,
                cid: None,
            })
            .collect();
        self.validate(&items)?;
        let o = &self.inner.opts;
        let now = self.inner.now_ms();
        // 1. Issue ids and pending slots (all or nothing).
        let mut issued: Vec<Issued> = Vec::with_capacity(items.len());
        // Body plaintext lengths (padded per `Options::padding`), for reserving and sealing.
        let bodies: Vec<usize> = items
            .iter()
            .map(|m| padding::padded_len(o.padding, m.payload.len()))
            .collect();
        for (m, &body) in items.iter().zip(&bodies) {
            match self.issue(m, body, now) {
                Ok(Issue::New(i)) => issued.push(i),
                // Only `append_once` gives client ids.
                Ok(Issue::Duplicate(_)) => unreachable!("a batch item without a client id"),
                Err(e) => {
                    self.rollback(&issued);
                    return Err(e);
                }
            }
        }
        self.write_issued(&items, &issued, &bodies, now)
    }

    /// Message size and TTL of every item.
    fn validate(&self, items: &[Item<'_>]) -> Result<()> {
        let o = &self.inner.opts;
        for m in items {
            validate_queue(m.queue)?;
            if m.payload.len() > o.max_message_size {
                return Err(Error::MessageTooLarge {
                    size: m.payload.len(),
                    max: o.max_message_size,
                });
            }
            if m.ttl.is_zero() || m.ttl > o.max_ttl || m.ttl.as_millis() == 0 {
                return Err(Error::InvalidTtl {
                    ttl_ms: m.ttl.as_millis(),
                    max_ms: o.max_ttl.as_millis(),
                });
            }
        }
        Ok(())
    }

    /// Steps 2 and 3 of an append: reserve and seal each issued message (outside every
    /// lock), submit the whole batch at once, wait for durability, make them visible.
    fn write_issued(
        &self,
        items: &[Item<'_>],
        issued: &[Issued],
        bodies: &[usize],
        now: u64,
    ) -> Result<Vec<MessageId>> {
        let o = &self.inner.opts;
        // A panic out of here (a key provider's, creating a segment) must not leave a
        // client id waiting on a message that will never commit.
        let _unwind = ForgetOnUnwind(issued);
        let mut sealed: Vec<(Reservation, Vec<u8>)> = Vec::with_capacity(items.len());
        let mut submitted = 0;
        let mut refused = None;
        for (i, m) in items.iter().enumerate() {
            let is = &issued[i];
            let bucket = Bucket::for_message(
                0,
                m.ttl.as_millis() as u64,
                is.expires,
                o.max_shred_delay.as_millis() as u64,
            );
            let w = &self.inner.writer;
            let times = (is.expires, now);
            let r = match w.try_reserve(bucket, is.flen, times, true) {
                Ok(Some(r)) => Ok(r),
                // The writer is backlogged: hand it what is sealed (it may be waiting
                // on those offsets), then wait our turn.
                Ok(None) => {
                    submitted += self.submit_sealed(&mut sealed[submitted..]);
                    w.reserve(bucket, is.flen, times, true)
                }
                Err(e) => Err(e),
            };
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            };
            let meta = MessageMeta {
                id: is.id,
                created_at_ms: now,
                expires_at_ms: is.expires,
                payload_len: m.payload.len() as u32,
                queue: m.queue,
                client_id: m.cid,
            };
            let padded_to = (o.padding != padding::Padding::None).then_some(bodies[i]);
            let frame =
                codec::seal_message(&r.seg.key, r.seg.id, r.offset, &meta, m.payload, padded_to);
            sealed.push((r, frame));
        }
        // Every reservation made is filled, even when a later one was refused: the
        // writer writes each segment in offset order and would wait on a hole.
        self.submit_sealed(&mut sealed[submitted..]);
        let placed: Vec<(Arc<Segment>, u64)> = sealed
            .iter()
            .map(|(r, _)| (Arc::clone(&r.seg), r.offset + r.len))
            .collect();
        if let Some(e) = refused {
            // The messages before the refused one are written; keep them.
            let n = placed.len();
            self.rollback(&issued[n..]);
            self.finish(&issued[..n], &placed)?;
            return Err(e);
        }
        self.finish(issued, &placed)?;
        Ok(issued.iter().map(|x| MessageId(x.id)).collect())
    }

    /// Hands sealed frames to the writer in one go; returns how many.
    fn submit_sealed(&self, sealed: &mut [(Reservation, Vec<u8>)]) -> usize {
        let bytes: u64 = sealed.iter().map(|(r, _)| r.len).sum();
        self.inner
            .writer
            .submit_all(sealed.iter_mut().map(|(r, f)| (&*r, std::mem::take(f))));
        self.inner.bytes_appended.fetch_add(bytes, Ordering::SeqCst);
        sealed.len()
    }

    /// Issues an id and a pending slot for `m` under its queue's lock, after the queue's
    /// quotas; or, for an item with a client id the queue has on record, its message.
    fn issue(&self, m: &Item<'_>, body: usize, now: u64) -> Result<Issue> {
        let o = &self.inner.opts;
        let flen = codec::message_frame_len(m.queue.len(), m.cid.is_some(), body) as u64;
        let expires = now + m.ttl.as_millis() as u64;
        let window_ms = o.dedupe_window.as_millis() as u64;
        loop {
            let q = self.inner.index.get_or_create(m.queue);
            let mut st = q.state.lock();
            if st.removed {
                continue;
            }
            if let Some(cid) = &m.cid {
                if let Some(e) = st.dedupe.lookup(cid, now, window_ms) {
                    if e.seg.is_some() || !st.is_pending(e.id) {
                        return Ok(Issue::Duplicate(e.id));
                    }
                    // Still being written: wait for its commit or rollback (both notify
                    // the queue after changing it under this lock), then look again.
                    let listener = q.event.listen();
                    drop(st);
                    self.check_open()?;
                    event_listener::Listener::wait(listener);
                    continue;
                }
            }
            if st.count() >= o.max_queue_len {
                let mut exp = Vec::new();
                st.remove_expired(self.inner.now_ms(), &mut exp);
                self.inner.drop_expired(&exp);
                if st.count() >= o.max_queue_len {
                    return Err(Error::QueueFull {
                        len: st.count(),
                        max: o.max_queue_len,
                    });
                }
            }
            if st.bytes() + flen > o.max_queue_bytes {
                return Err(Error::QueueBytesExceeded {
                    bytes: st.bytes(),
                    adding: flen,
                    max: o.max_queue_bytes,
                });
            }
            let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
            st.push_pending(id, expires, flen as u32);
            if let Some(cid) = m.cid {
                st.dedupe.begin(cid, id, now);
            }
            self.inner.index.messages.fetch_add(1, Ordering::SeqCst);
            drop(st);
            return Ok(Issue::New(Issued {
                q,
                id,
                flen,
                expires,
                cid: m.cid,
            }));
        }
    }

    fn rollback(&self, issued: &[Issued]) {
        for is in issued {
            let mut st = is.q.state.lock();
            st.rollback(is.id);
            if let Some(cid) = &is.cid {
                st.dedupe.abandon(cid, is.id);
            }
            drop(st);
            self.inner.index.messages.fetch_sub(1, Ordering::SeqCst);
            // A later message of the queue may have been held back behind this one (and
            // a duplicate of it waits for its outcome).
            is.q.notify();
        }
    }

    /// Waits for durability, then makes the messages visible.
    fn finish(&self, issued: &[Issued], placed: &[(Arc<Segment>, u64)]) -> Result<()> {
        let mut ends: Vec<(&Arc<Segment>, u64)> = Vec::new();
        for (seg, end) in placed {
            match ends.iter_mut().find(|(s, _)| s.id == seg.id) {
                Some(e) => e.1 = e.1.max(*end),
                None => ends.push((seg, *end)),
            }
        }
        for (seg, end) in ends {
            if let Err(e) = self.inner.writer.wait_durable(seg, end) {
                self.rollback(&issued[..placed.len()]);
                return Err(e);
            }
        }
        let mut orphaned = Vec::new();
        for (is, (seg, end)) in issued.iter().zip(placed) {
            // The segment learns of the client id before the message is readable (and so
            // ackable, and its segment shreddable): a shred in between would otherwise
            // miss the entry. A reference that ends up unused is harmless.
            if let Some(cid) = is.cid {
                self.inner
                    .index
                    .dedupe_refs
                    .add(seg.id, Arc::downgrade(&is.q), cid);
            }
            let mut st = is.q.state.lock();
            if st.commit(is.id, seg.id, end - is.flen) {
                if let Some(cid) = &is.cid {
                    st.dedupe.placed(cid, is.id, seg.id);
                }
                drop(st);
                is.q.notify();
            } else {
                // Purged while being written: it is on disk, so it needs an ack record.
                drop(st);
                orphaned.push((is.id, seg.id));
                is.q.notify();
            }
        }
        if !orphaned.is_empty() {
            self.inner
                .index
                .messages
                .fetch_sub(orphaned.len() as u64, Ordering::SeqCst);
            let gen = self.inner.writer.push_acks(orphaned);
            self.inner.writer.wait_acks(gen)?;
        }
        Ok(())
    }

    /// Reads up to `max` messages of `queue` after the cursor `after` (exclusive), in
    /// FIFO order. Only unacked, unexpired messages are returned.
    pub fn read(&self, queue: &[u8], after: Option<MessageId>, max: usize) -> Result<Vec<Message>> {
        self.check_open()?;
        validate_queue(queue)?;
        let Some(q) = self.inner.index.get(queue) else {
            return Ok(Vec::new());
        };
        let now = self.inner.now_ms();
        let mut expired = Vec::new();
        let slots = q
            .state
            .lock()
            .collect(after.map(|a| a.0), max, now, &mut expired);
        self.inner.drop_expired(&expired);
        // Resolve each message's segment (consecutive messages mostly share one).
        let mut found: Vec<(u64, Slot, Arc<Segment>)> = Vec::with_capacity(slots.len());
        for (id, mut slot) in slots {
            let cached = found
                .last()
                .filter(|f| f.2.id == slot.seg)
                .map(|f| Arc::clone(&f.2));
            let seg = if let Some(s) = cached.or_else(|| self.inner.segments.get(slot.seg)) {
                s
            } else {
                // Its segment is gone: the message expired, or compaction moved it (and
                // the old segment was shredded) since we looked. Look again.
                match q.state.lock().slot(id) {
                    Some(s) if s.seg != slot.seg => slot = s,
                    _ => continue,
                }
                let Some(s) = self.inner.segments.get(slot.seg) else {
                    continue;
                };
                s
            };
            found.push((id, slot, seg));
        }
        prefetch(&found);
        let mut out = Vec::with_capacity(found.len());
        for (id, slot, seg) in &found {
            if let Some(m) = self.load(seg, *id, slot, now)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Loads a message's payload: only the frame's body is opened. The meta (queue, id,
    /// expiry) is not opened again: the index holds it, taken from an authenticated
    /// meta at append or recovery, and the body's associated data binds it to this
    /// (segment, offset), where no other record was ever written. From a mapped
    /// (sealed) segment only the body is copied; otherwise the frame is read whole.
    fn load(&self, seg: &Segment, id: u64, slot: &Slot, now_ms: u64) -> Result<Option<Message>> {
        if slot.expires_at_ms <= now_ms {
            return Ok(None);
        }
        let off = u64::from(slot.off);
        let len = slot.len() as usize;
        self.inner.writer.wait_written(seg, off + len as u64)?;
        let mapped = seg
            .mapped()
            .and_then(|m| m.get(off as usize..off as usize + len));
        let payload = if let Some(frame) = mapped {
            let h = message_header(seg, off, len, frame)?;
            let mut body = frame[h.body_range()].to_vec();
            let n = codec::open_body_part(&seg.key, seg.id, off, h, &mut body)
                .map_err(|e| e.into_error(&seg.path, off))?;
            body.truncate(n);
            body
        } else {
            let mut frame = seg.read_at(off, len)?;
            let h = message_header(seg, off, len, &frame)?;
            let r = codec::open_body(&seg.key, seg.id, off, h, &mut frame)
                .map_err(|e| e.into_error(&seg.path, off))?;
            frame.truncate(r.end);
            frame.drain(..r.start);
            frame
        };
        Ok(Some(Message {
            id: MessageId(id),
            payload,
            expires_at_ms: slot.expires_at_ms,
        }))
    }

    /// Acks (deletes) message `id` of `queue`. `Ok(false)` if the queue has no such
    /// message (never had, already acked, expired, or it belongs to another queue).
    /// O(1): an index removal and a 8-byte entry in the shared ack buffer.
    pub fn ack(&self, queue: &[u8], id: MessageId) -> Result<bool> {
        Ok(self.ack_batch(queue, &[id])? == 1)
    }

    /// Acks several messages of one queue; returns how many were acked.
    pub fn ack_batch(&self, queue: &[u8], ids: &[MessageId]) -> Result<u64> {
        self.remove_with(queue, |st, now, out| {
            for id in ids {
                if let Some(r) = st.take(id.0, now) {
                    out.push(r);
                }
            }
        })
    }

    /// Acks several messages of one queue like [`ack_batch`](Self::ack_batch), but
    /// returns without waiting for the ack record's fsync, whatever the durability mode:
    /// the messages are gone from reads at once, and the record is written and synced
    /// with the writer's next commit (within `async_sync_interval` in `Async`, at once in
    /// `Sync` and `Group`). A crash before that can bring them back (at-least-once
    /// delivery); [`flush`](Self::flush) waits for it. Never blocks on I/O, so an async
    /// caller can run it on its own thread — for acks nobody awaits an answer to (a
    /// WebSocket client's).
    pub fn ack_batch_nowait(&self, queue: &[u8], ids: &[MessageId]) -> Result<u64> {
        self.remove_inner(
            queue,
            |st, now, out| {
                for id in ids {
                    if let Some(r) = st.take(id.0, now) {
                        out.push(r);
                    }
                }
            },
            AckWait::No,
            Wake::Nobody,
        )
    }

    /// Acks every message of `queue` up to and including `id`; returns how many.
    pub fn ack_through(&self, queue: &[u8], id: MessageId) -> Result<u64> {
        self.remove_with(queue, |st, now, out| st.take_through(id.0, now, out))
    }

    /// Drops every message of `queue` (account or device removal); returns how many.
    /// Its client ids are forgotten too, and an `append_once` waiting on one of them is
    /// woken to look again.
    pub fn purge(&self, queue: &[u8]) -> Result<u64> {
        self.remove_inner(
            queue,
            crate::index::QueueState::take_all,
            AckWait::Durable,
            Wake::Queue,
        )
    }

    fn remove_with(
        &self,
        queue: &[u8],
        f: impl FnOnce(&mut crate::index::QueueState, u64, &mut Vec<Removed>),
    ) -> Result<u64> {
        self.remove_inner(queue, f, AckWait::Durable, Wake::Nobody)
    }

    fn remove_inner(
        &self,
        queue: &[u8],
        f: impl FnOnce(&mut crate::index::QueueState, u64, &mut Vec<Removed>),
        wait: AckWait,
        wake: Wake,
    ) -> Result<u64> {
        self.check_open()?;
        validate_queue(queue)?;
        // A stopped store takes no acks: not even "no such message" (an ack that failed
        // before took the message out of memory; it is back after a reopen).
        self.inner.writer.check_failed()?;
        let Some(q) = self.inner.index.get(queue) else {
            // See below: not a success while an earlier refused ack may be the reason.
            self.inner.writer.check_acks_queued()?;
            return Ok(0);
        };
        let now = self.inner.now_ms();
        let mut removed = Vec::new();
        f(&mut q.state.lock(), now, &mut removed);
        if wake == Wake::Queue {
            q.notify();
        }
        let mut expired = Vec::new();
        let mut acks = Vec::with_capacity(removed.len());
        for r in removed {
            match r {
                Removed::Acked(id, s) => acks.push((id, s.seg)),
                Removed::Expired(s) => expired.push(s),
            }
        }
        self.inner.drop_expired(&expired);
        let n = acks.len() as u64;
        if n == 0 {
            // Nothing to remove, perhaps because an earlier ack whose record could not be
            // written yet (no ack segment: disk full) took it: not a success until then.
            self.inner.writer.check_acks_queued()?;
        }
        if n > 0 {
            self.inner.index.messages.fetch_sub(n, Ordering::SeqCst);
            let gen = self.inner.writer.push_acks(acks);
            if wait == AckWait::Durable {
                self.inner.writer.wait_acks(gen)?;
            }
        }
        Ok(n)
    }

    /// Number of messages `read` would return for `queue`.
    pub fn len(&self, queue: &[u8]) -> Result<u64> {
        validate_queue(queue)?;
        let Some(q) = self.inner.index.get(queue) else {
            return Ok(0);
        };
        let mut expired = Vec::new();
        let n = q
            .state
            .lock()
            .readable_len(self.inner.now_ms(), &mut expired);
        self.inner.drop_expired(&expired);
        Ok(n)
    }

    /// Blocks until `queue` has a readable message after `after`, or `timeout` passes.
    /// Returns whether one is there. Appends wake waiters at once (no polling). A thin
    /// layer over [`Store::subscribe`]; `Err(Closed)` if the store closes meanwhile.
    pub fn wait(&self, queue: &[u8], after: Option<MessageId>, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now().checked_add(timeout);
        let mut sub = self.subscribe(queue, after)?;
        match deadline {
            Some(d) => sub.wait_until(d),
            // A timeout past the end of time: wait until there is something.
            None => loop {
                if sub.wait_until(Instant::now() + Duration::from_secs(86_400))? {
                    return Ok(true);
                }
            },
        }
    }

    /// Registers for a wake-up when `queue` has a readable message after `after`: a
    /// [`Subscription`], which is a `Future` (any executor; no thread per subscriber)
    /// and also offers a blocking [`Subscription::wait_until`]. Dropping it cancels it.
    pub fn subscribe(&self, queue: &[u8], after: Option<MessageId>) -> Result<Subscription> {
        self.check_open()?;
        validate_queue(queue)?;
        Ok(Subscription::new(Arc::clone(&self.inner), queue, after))
    }

    /// Whether appends can be taken now (see [`Health`](crate::Health)): the writer
    /// stopped, the disk quota is reached for a largest-size message, the disk refused
    /// the last segment needed, or the store is closed. Cheap (no I/O): for health checks.
    pub fn health(&self) -> crate::Health {
        if self.inner.is_closed() {
            return crate::Health::Closed;
        }
        let o = &self.inner.opts;
        let body = padding::padded_len(o.padding, o.max_message_size);
        let largest = codec::message_frame_len(MAX_QUEUE_ID, true, body);
        self.inner.writer.health(largest as u64)
    }

    /// Engine counters.
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        let now = i.now_ms();
        let mut s = Stats {
            live_keys: i.keyring.live_keys() as u64,
            shreds: i.shreds.load(Ordering::SeqCst),
            live_messages: i.index.messages.load(Ordering::SeqCst),
            queues: i.index.queue_count() as u64,
            last_gc_error: i.last_gc_error.lock().clone(),
            ..Stats::default()
        };
        let mut oldest = u64::MAX;
        let mut oldest_death = u64::MAX;
        for seg in i.segments.all() {
            s.segments += 1;
            s.uncompactable_segments += u64::from(seg.uncompactable.load(Ordering::SeqCst));
            s.bytes_on_disk += if seg.closed.load(Ordering::SeqCst) {
                seg.data_len()
            } else {
                // Preallocated whole until it is sealed.
                seg.data_len().max(i.opts.segment_size)
            };
            let live = seg.live.load(Ordering::SeqCst);
            let dead = seg.records.load(Ordering::SeqCst).saturating_sub(live);
            s.dead_records += dead;
            if live > 0 {
                oldest = oldest.min(seg.first_ms.load(Ordering::SeqCst));
            }
            if dead > 0 {
                if let Some(d) = seg.first_death_ms(now) {
                    oldest_death = oldest_death.min(d);
                }
            }
        }
        let d = i.opts.max_shred_delay.as_millis() as u64;
        let mut overrun = i.shred_overrun_max_ms.load(Ordering::SeqCst);
        if oldest_death != u64::MAX {
            let age = now.saturating_sub(oldest_death);
            s.oldest_dead_openable_age = Some(Duration::from_millis(age));
            overrun = overrun.max(age.saturating_sub(d));
        }
        s.shred_overrun_max = Duration::from_millis(overrun);
        s.compaction_retries = i.compaction_retries.load(Ordering::SeqCst);
        s.bytes_appended = i.bytes_appended.load(Ordering::SeqCst);
        s.bytes_copied = i.bytes_copied.load(Ordering::SeqCst);
        s.write_amplification = if s.bytes_appended == 0 {
            1.0
        } else {
            (s.bytes_appended + s.bytes_copied) as f64 / s.bytes_appended as f64
        };
        let mut lat: Vec<u64> = i.shred_latencies.lock().iter().copied().collect();
        lat.sort_unstable();
        if !lat.is_empty() {
            let pick = |q: usize| Duration::from_millis(lat[((lat.len() - 1) * q) / 100]);
            s.shred_latency_p50 = Some(pick(50));
            s.shred_latency_p99 = Some(pick(99));
            s.shred_latency_max = Some(pick(100));
        }
        for name in [
            crate::keys::keystore::FILE_NAME,
            crate::keys::audit::FILE_NAME,
            crate::keys::audit::ARCHIVE_V1,
        ] {
            if let Ok(m) = std::fs::metadata(i.dir.join(name)) {
                s.bytes_on_disk += m.len();
            }
        }
        if oldest != u64::MAX {
            s.oldest_live_age = Some(Duration::from_millis(now.saturating_sub(oldest)));
        }
        s
    }

    /// Bytes of heap the index uses (walks every queue; for measurement, not hot paths).
    pub fn index_memory(&self) -> usize {
        let mut total = 0;
        for shard in 0..Index::shard_count() {
            self.inner.index.for_each_in_shard(shard, |k, q| {
                total +=
                    k.len() + 64 + std::mem::size_of::<QueueCell>() + q.state.lock().heap_bytes();
            });
        }
        total + self.inner.index.dedupe_refs.heap_bytes()
    }

    /// Runs one full maintenance pass now (retire segments, sweep expired messages,
    /// compact segments that are due, shred dead segments). The reaper thread does this on its own; tests that move a
    /// manual clock call it to avoid waiting. Returns the segments shredded.
    pub fn maintain(&self) -> Result<usize> {
        self.check_open()?;
        let mut shard = self.inner.maint_shard.lock();
        let n = gc::maintain(&self.inner, &mut shard, Index::shard_count())?;
        // Segments retired above are sealed by the writer thread; then the compactor copies
        // out of those that are due, and what that left dead is shredded.
        self.flush()?;
        gc::compact::compact_due(&self.inner)?;
        self.flush()?;
        Ok(n + gc::shred_dead(&self.inner, self.inner.now_ms())?)
    }

    /// Waits until everything appended or acked so far is durable and sealed segments
    /// are settled (their lengths recorded in the keystore, the next spare segment made).
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        let w = &self.inner.writer;
        let gen = w.push_acks(std::iter::empty());
        w.wait_acks_durable(gen)?;
        w.settle_key_work();
        Ok(())
    }

    /// Flushes, seals the active segments and releases the data dir. Also done on drop.
    pub fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.reaper.stop();
        self.inner.compactor.stop();
        for h in std::mem::take(&mut *self.threads.lock()) {
            let _ = h.join();
        }
        let r = self.inner.writer.shutdown();
        // Subscribers see `closed` when woken: wake them all.
        for shard in 0..Index::shard_count() {
            self.inner.index.for_each_in_shard(shard, |_, q| q.notify());
        }
        // After a writer failure the keystore is left as the last successful write made
        // it; either way the data dir is released and can be opened again right away.
        let flushed = match r {
            Err(e @ Error::WriterFailed { .. }) => Err(e),
            // Acks still refused a segment: the floors are persisted all the same.
            Err(e) => self.inner.keyring.flush().and(Err(e)),
            Ok(()) => self.inner.keyring.flush(),
        };
        self.inner.lock.lock().take();
        flushed
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Decodes the header of the message frame of `len` bytes at `off`.
fn message_header(seg: &Segment, off: u64, len: usize, frame: &[u8]) -> Result<FrameHeader> {
    let h = FrameHeader::decode(frame).map_err(|e| e.into_error(&seg.path, off))?;
    if h.kind != FrameKind::Message || h.frame_len() != len {
        return Err(Error::corruption(
            &seg.path,
            off,
            CorruptionKind::BadField {
                field: "frame kind or length",
                value: h.frame_len() as u64,
            },
        ));
    }
    Ok(h)
}

/// Touches the first and last byte of every mapped frame about to be read. A queue's
/// messages lie scattered among everyone else's, so each is a cache (and TLB) miss; these
/// loads are independent of each other, so the CPU overlaps the misses instead of taking
/// them one at a time inside the decryption loop.
fn prefetch(found: &[(u64, Slot, Arc<Segment>)]) {
    let mut acc = 0u8;
    for (_, slot, seg) in found {
        if let Some(m) = seg.mapped() {
            let (start, len) = (slot.off as usize, slot.len() as usize);
            if let Some(f) = m.get(start..start + len) {
                acc ^= f[0] ^ f[len - 1];
            }
        }
    }
    std::hint::black_box(acc);
}

/// Refuses a key file inside the data dir (a thief of the dir would get the key too),
/// unless `Options::allow_key_in_data_dir`.
fn check_key_location(dir: &Path, opts: &Options, p: &dyn crate::keys::KeyProvider) -> Result<()> {
    if let Some(kf) = p.key_file() {
        let kf = kf.canonicalize().unwrap_or_else(|_| kf.to_path_buf());
        if kf.starts_with(dir) && !opts.allow_key_in_data_dir {
            return Err(Error::KeyFileInsideDataDir { path: kf });
        }
    }
    Ok(())
}

/// Rotates the master key to `new` (by hand or automatically) and notes when.
pub(crate) fn rotate_master(
    inner: &Inner,
    new: Arc<dyn crate::keys::KeyProvider>,
    now_ms: u64,
) -> Result<crate::keys::RotationReport> {
    check_key_location(&inner.dir, &inner.opts, &*new)?;
    let r = inner.keyring.rotate(new)?;
    inner.last_rotation_ms.store(now_ms, Ordering::SeqCst);
    Ok(r)
}

/// Recovers `dir` with the master key, or, when the keystore is still under the
/// previous key (a rotation a crash interrupted), with `previous_key_provider`. Returns
/// the provider the keystore opened with; the caller finishes the rotation.
fn recover_with_keys(
    dir: &Path,
    opts: &Options,
) -> Result<(recovery::Recovered, Arc<dyn crate::keys::KeyProvider>)> {
    let recover = |p: &dyn crate::keys::KeyProvider| {
        recovery::recover(
            (&opts.file_system, dir),
            p,
            opts.recovery,
            opts.clock.now_ms(),
            opts.max_shred_delay.as_millis() as u64,
        )
    };
    match recover(&*opts.key_provider) {
        Err(Error::WrongMasterKey { expected, .. }) => match &opts.previous_key_provider {
            Some(prev) if prev.kek_id() == expected => Ok((recover(&**prev)?, Arc::clone(prev))),
            _ => Err(Error::WrongMasterKey {
                expected,
                got: opts.key_provider.kek_id(),
            }),
        },
        r => Ok((r?, Arc::clone(&opts.key_provider))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::FileKeyProvider;

    #[test]
    fn a_frame_that_does_not_fit_its_reservation_fails_the_writer_instead_of_being_written() {
        let tmp = tempfile::tempdir().unwrap();
        let key = Arc::new(FileKeyProvider::create(tmp.path().join("key")).unwrap());
        let dir = tmp.path().join("data");
        let store = Store::open(&dir, Options::new(key.clone())).unwrap();
        let ttl = Duration::from_secs(60);
        store.append(b"q", b"before", ttl).unwrap();
        let w = &store.inner.writer;
        let now = store.inner.now_ms();
        let expires = now + 60_000;
        let bucket = Bucket::for_message(0, 60_000, expires, 60_000);
        let r = w.reserve(bucket, 100, (expires, now), true).unwrap();
        w.submit(&r, vec![0u8; 99]); // one byte short of its reservation
        let e = store.append(b"q", b"after", ttl).unwrap_err();
        assert!(matches!(e, Error::WriterFailed { .. }), "{e}");
        assert!(e.to_string().contains("does not fit"), "{e}");
        drop(store);
        // What was durable before is intact; the hole is a torn tail to recovery.
        let store = Store::open(&dir, Options::new(key)).unwrap();
        let got = store.read(b"q", None, 10).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"before");
    }
}
