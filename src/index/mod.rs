//! The in-memory index: queue id → FIFO of message ids, and message id → location.
//!
//! Each queue has its own lock, a FIFO of ids (sorted, because ids are issued under the
//! queue lock from a global counter) and a hash map from id to [`Slot`]. Acked ids leave
//! the map at once and the FIFO lazily. A message is *pending* from the moment its id is
//! issued until its frame is durable; readers stop at the first pending message so a
//! cursor never skips a message that becomes visible later.

pub mod dedupe;
mod id_hash;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use event_listener::Event;
use parking_lot::{Mutex, RwLock};

use id_hash::IdHasher;

const SHARDS: usize = 64;
const PENDING: u32 = 1 << 31;

/// Where a message lives, 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub seg: u64,
    pub off: u32,
    len_flags: u32,
    pub expires_at_ms: u64,
}

impl Slot {
    pub fn len(&self) -> u32 {
        self.len_flags & !PENDING
    }

    pub fn is_pending(&self) -> bool {
        self.len_flags & PENDING != 0
    }

    fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms <= now_ms
    }
}

/// One queue's state. Guarded by its [`QueueCell`]'s mutex.
#[derive(Debug, Default)]
pub struct QueueState {
    fifo: VecDeque<u64>,
    slots: HashMap<u64, Slot, BuildHasherDefault<IdHasher>>,
    pending: u64,
    bytes: u64,
    /// No message in the queue expires before this (a lower bound).
    min_expiry_ms: u64,
    /// Removed from the index; whoever holds it must look the queue up again.
    pub removed: bool,
    /// Live subscriptions on this queue: while any, the sweep keeps the queue.
    pub waiters: u32,
    /// Client message ids of idempotent appends (`dedupe`): while any, the sweep keeps
    /// the queue.
    pub dedupe: dedupe::QueueDedupe,
}

/// A message removed from a queue, with what must happen to it.
#[derive(Debug, Clone, Copy)]
pub enum Removed {
    /// Was live: needs an ack record.
    Acked(u64, Slot),
    /// Had expired: no record needed, only the segment's live count.
    Expired(Slot),
}

impl QueueState {
    /// Messages counted against the quota (pending and live; expired ones until removed).
    pub fn count(&self) -> u64 {
        self.slots.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds a pending message (id already issued by the caller, in increasing order).
    pub fn push_pending(&mut self, id: u64, expires_at_ms: u64, frame_len: u32) {
        debug_assert!(self.fifo.back().is_none_or(|&b| b < id));
        self.fifo.push_back(id);
        self.slots.insert(
            id,
            Slot {
                seg: 0,
                off: 0,
                len_flags: PENDING | frame_len,
                expires_at_ms,
            },
        );
        self.pending += 1;
        self.bytes += u64::from(frame_len);
        if self.slots.len() == 1 {
            self.min_expiry_ms = expires_at_ms;
        } else {
            self.min_expiry_ms = self.min_expiry_ms.min(expires_at_ms);
        }
    }

    /// Makes a pending message visible at its location. `false` if it was purged meanwhile.
    pub fn commit(&mut self, id: u64, seg: u64, off: u64) -> bool {
        match self.slots.get_mut(&id) {
            Some(s) if s.is_pending() => {
                s.seg = seg;
                s.off = off as u32;
                s.len_flags &= !PENDING;
                self.pending -= 1;
                true
            }
            _ => false,
        }
    }

    /// Points message `id` at its copy, if it is still where the compactor found it.
    /// `false` if it was acked, purged or already moved meanwhile.
    pub fn relocate(&mut self, id: u64, from: (u64, u64), to: (u64, u64)) -> bool {
        match self.slots.get_mut(&id) {
            Some(s) if !s.is_pending() && s.seg == from.0 && u64::from(s.off) == from.1 => {
                s.seg = to.0;
                s.off = to.1 as u32;
                true
            }
            _ => false,
        }
    }

    /// The slot of a committed message.
    pub fn slot(&self, id: u64) -> Option<Slot> {
        self.slots.get(&id).filter(|s| !s.is_pending()).copied()
    }

    /// Drops a pending message that was never written.
    pub fn rollback(&mut self, id: u64) {
        if let Some(s) = self.slots.remove(&id) {
            if s.is_pending() {
                self.pending -= 1;
            }
            self.bytes -= u64::from(s.len());
        }
        self.trim();
    }

    /// Removes one committed message (ack). `None` if unknown, pending or already gone.
    pub fn take(&mut self, id: u64, now_ms: u64) -> Option<Removed> {
        let s = *self.slots.get(&id)?;
        if s.is_pending() {
            return None;
        }
        self.slots.remove(&id);
        self.bytes -= u64::from(s.len());
        self.trim();
        Some(if s.expired(now_ms) {
            Removed::Expired(s)
        } else {
            Removed::Acked(id, s)
        })
    }

    /// Removes every committed message with id <= `through` (cumulative ack).
    pub fn take_through(&mut self, through: u64, now_ms: u64, out: &mut Vec<Removed>) {
        let end = self.fifo.partition_point(|&x| x <= through);
        let ids: Vec<u64> = self.fifo.range(..end).copied().collect();
        for id in ids {
            if let Some(r) = self.take(id, now_ms) {
                out.push(r);
            }
        }
    }

    /// Removes every committed message (purge). Pending ones are removed too: their
    /// appenders find them gone and ack them.
    pub fn take_all(&mut self, now_ms: u64, out: &mut Vec<Removed>) {
        for id in std::mem::take(&mut self.fifo) {
            if let Some(s) = self.slots.remove(&id) {
                if s.is_pending() {
                    continue;
                }
                out.push(if s.expired(now_ms) {
                    Removed::Expired(s)
                } else {
                    Removed::Acked(id, s)
                });
            }
        }
        self.slots.clear();
        self.pending = 0;
        self.bytes = 0;
        self.dedupe.clear();
    }

    /// Up to `max` readable messages after `after`, in FIFO order. Stops at the first
    /// pending message. Expired messages met on the way are removed into `expired`.
    pub fn collect(
        &mut self,
        after: Option<u64>,
        max: usize,
        now_ms: u64,
        expired: &mut Vec<Slot>,
    ) -> Vec<(u64, Slot)> {
        let mut out = Vec::new();
        let mut i = after.map_or(0, |a| self.fifo.partition_point(|&x| x <= a));
        let mut gone = Vec::new();
        while out.len() < max && i < self.fifo.len() {
            let id = self.fifo[i];
            i += 1;
            let Some(s) = self.slots.get(&id).copied() else {
                continue;
            };
            if s.is_pending() {
                break;
            }
            if s.expired(now_ms) {
                gone.push(id);
                continue;
            }
            out.push((id, s));
        }
        for id in gone {
            if let Some(s) = self.slots.remove(&id) {
                expired.push(s);
                self.bytes -= u64::from(s.len());
            }
        }
        self.trim();
        out
    }

    /// Whether a readable message with id > `after` exists.
    pub fn has_readable(&self, after: Option<u64>, now_ms: u64) -> bool {
        let i = after.map_or(0, |a| self.fifo.partition_point(|&x| x <= a));
        for id in self.fifo.range(i..) {
            match self.slots.get(id) {
                Some(s) if s.is_pending() => return false,
                Some(s) if !s.expired(now_ms) => return true,
                _ => {}
            }
        }
        false
    }

    /// Number of readable messages; removes expired ones into `expired`.
    pub fn readable_len(&mut self, now_ms: u64, expired: &mut Vec<Slot>) -> u64 {
        self.remove_expired(now_ms, expired);
        self.slots.len() as u64 - self.pending
    }

    /// Removes every expired committed message (cheap when none can have expired).
    pub fn remove_expired(&mut self, now_ms: u64, expired: &mut Vec<Slot>) {
        if self.slots.is_empty() || now_ms < self.min_expiry_ms {
            return;
        }
        let mut min = u64::MAX;
        let gone: Vec<u64> = self
            .slots
            .iter()
            .filter_map(|(&id, s)| {
                if !s.is_pending() && s.expired(now_ms) {
                    Some(id)
                } else {
                    min = min.min(s.expires_at_ms);
                    None
                }
            })
            .collect();
        for id in gone {
            if let Some(s) = self.slots.remove(&id) {
                expired.push(s);
                self.bytes -= u64::from(s.len());
            }
        }
        self.min_expiry_ms = min;
        self.trim();
    }

    /// Drops acked ids from the FIFO: from the front always, everywhere when the FIFO
    /// holds more than twice as many ids as live messages (amortised O(1)).
    fn trim(&mut self) {
        while let Some(f) = self.fifo.front() {
            if self.slots.contains_key(f) {
                break;
            }
            self.fifo.pop_front();
        }
        if self.fifo.len() > 2 * self.slots.len() + 32 {
            let slots = &self.slots;
            self.fifo.retain(|id| slots.contains_key(id));
            self.fifo.shrink_to_fit();
        }
        if self.slots.is_empty() {
            self.slots.shrink_to(0);
        }
    }

    /// No message and no client id: the sweep may drop the queue.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.dedupe.is_empty()
    }

    /// Whether message `id` is still being written.
    pub fn is_pending(&self, id: u64) -> bool {
        self.slots.get(&id).is_some_and(Slot::is_pending)
    }

    /// Bytes of memory this queue's index uses (approximate, for stats).
    pub fn heap_bytes(&self) -> usize {
        self.fifo.capacity() * 8
            + self.slots.capacity() * (8 + std::mem::size_of::<Slot>() + 1)
            + self.dedupe.heap_bytes()
    }
}

/// A queue and the event its subscribers listen on (`subscription`).
#[derive(Debug, Default)]
pub struct QueueCell {
    pub state: Mutex<QueueState>,
    pub event: Event,
}

impl QueueCell {
    /// Wakes every subscriber: call after a change that can make a message readable,
    /// with the state lock released.
    pub fn notify(&self) {
        self.event.notify(usize::MAX);
    }
}

type Shard = RwLock<HashMap<Box<[u8]>, Arc<QueueCell>>>;

/// Every queue, sharded by a keyed hash of the queue id.
#[derive(Debug)]
pub struct Index {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Messages in the index (pending and live).
    pub messages: AtomicU64,
    /// Which segments hold the records of client ids (what a shred ends).
    pub dedupe_refs: dedupe::SegmentRefs,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            messages: AtomicU64::new(0),
            dedupe_refs: dedupe::SegmentRefs::default(),
        }
    }
}

impl Index {
    fn shard(&self, queue: &[u8]) -> &Shard {
        &self.shards[(self.hasher.hash_one(queue) as usize) % SHARDS]
    }

    pub fn get(&self, queue: &[u8]) -> Option<Arc<QueueCell>> {
        self.shard(queue).read().get(queue).cloned()
    }

    pub fn get_or_create(&self, queue: &[u8]) -> Arc<QueueCell> {
        if let Some(q) = self.get(queue) {
            return q;
        }
        let mut w = self.shard(queue).write();
        Arc::clone(w.entry(queue.into()).or_default())
    }

    pub fn queue_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Visits the queues of shard `i` (for sweeps and stats).
    pub fn for_each_in_shard(&self, i: usize, mut f: impl FnMut(&[u8], &Arc<QueueCell>)) {
        for (k, v) in self.shards[i % SHARDS].read().iter() {
            f(k, v);
        }
    }

    pub const fn shard_count() -> usize {
        SHARDS
    }

    /// Removes empty queues nobody waits on from shard `i`; removes expired messages
    /// from the others into `expired`.
    pub fn sweep_shard(&self, i: usize, now_ms: u64, expired: &mut Vec<Slot>) {
        let mut w = self.shards[i % SHARDS].write();
        w.retain(|_, cell| {
            let mut st = cell.state.lock();
            st.remove_expired(now_ms, expired);
            if st.is_empty() && st.waiters == 0 {
                st.removed = true;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_pending_and_acks() {
        let mut q = QueueState::default();
        q.push_pending(1, 100, 10);
        q.push_pending(2, 100, 10);
        q.push_pending(3, 100, 10);
        assert!(q.commit(1, 5, 64));
        assert!(q.commit(3, 5, 144));
        let mut exp = Vec::new();
        // 2 is pending: the reader stops there and never skips it.
        assert_eq!(q.collect(None, 10, 0, &mut exp).len(), 1);
        assert!(q.commit(2, 5, 224));
        assert_eq!(
            q.collect(Some(1), 10, 0, &mut exp)
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(matches!(q.take(2, 0), Some(Removed::Acked(2, _))));
        assert!(q.take(2, 0).is_none());
        assert_eq!(q.readable_len(0, &mut exp), 2);
        assert_eq!(q.bytes(), 20);
        // Expired: invisible, removed on the way.
        assert_eq!(q.collect(None, 10, 100, &mut exp).len(), 0);
        assert_eq!(exp.len(), 2);
        assert!(q.is_empty());
    }

    #[test]
    fn tombstones_do_not_accumulate() {
        let mut q = QueueState::default();
        q.push_pending(0, u64::MAX, 1);
        assert!(q.commit(0, 1, 64));
        for id in 1..10_000 {
            q.push_pending(id, u64::MAX, 1);
            assert!(q.commit(id, 1, 64));
            q.take(id, 0).unwrap();
        }
        assert!(q.fifo.len() < 100, "fifo kept {} tombstones", q.fifo.len());
    }
}
