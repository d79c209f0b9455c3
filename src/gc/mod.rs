//! Background maintenance. The reaper retires old and dead active segments, removes
//! expired messages from the index, and shreds every segment whose records are all dead:
//! drop the keys from the keystore (durably, one keystore write for the whole batch),
//! then unlink the files. The compactor (`compact`) empties partly dead segments before
//! their shred deadline so the reaper can shred them.

pub mod compact;
pub mod deadline;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::Result;
use crate::fsutil;
use crate::segment::Segment;
use crate::store::Inner;

/// Wakes the reaper early (an ack killed the last message of a segment, a segment was
/// sealed) and stops it.
#[derive(Debug, Default)]
pub struct ReaperSignal {
    state: Mutex<(bool, bool)>, // (poked, stop)
    cv: Condvar,
}

impl ReaperSignal {
    pub fn poke(&self) {
        let mut s = self.state.lock();
        s.0 = true;
        self.cv.notify_one();
    }

    pub fn stop(&self) {
        let mut s = self.state.lock();
        s.1 = true;
        self.cv.notify_one();
    }

    /// Sleeps until poked, stopped or `timeout`; `false` = stop.
    fn sleep(&self, timeout: Duration) -> bool {
        let mut s = self.state.lock();
        if !s.0 && !s.1 {
            self.cv.wait_for(&mut s, timeout);
        }
        s.0 = false;
        !s.1
    }

    /// Sleeps `d` whatever the pokes (they stay pending for the next `sleep`), unless
    /// stopped; `false` = stop.
    fn rest(&self, d: Duration) -> bool {
        let until = std::time::Instant::now() + d;
        let mut s = self.state.lock();
        while !s.1 && !self.cv.wait_until(&mut s, until).timed_out() {}
        !s.1
    }
}

/// Index shards the reaper sweeps per tick (64 in all: every queue once in 16 ticks).
const SWEEP_SHARDS_PER_TICK: usize = 4;
/// The least time between two reaper passes: pokes (acks that emptied a segment,
/// expired messages found) that come faster are served together.
const MIN_PASS_GAP: Duration = Duration::from_millis(10);

/// The reaper thread's loop.
pub fn run_reaper(inner: &Arc<Inner>) {
    let tick = deadline::Deadline::new(inner.opts.max_shred_delay).tick();
    let mut shard = 0usize;
    let mut next_sweep = std::time::Instant::now();
    while inner.reaper.sleep(tick) {
        // The index sweep (it drops expired messages from memory; no deadline depends on
        // it: a segment whose messages all expired is dead by its latest expiry) runs
        // once a tick, not at every poke: pokes come with acks, and a sweep locks every
        // queue of its shards — with 18,000 sessions' queues, that was 13% of a relay's
        // CPU at 1,000 messages/s.
        let now = std::time::Instant::now();
        let shards = if now >= next_sweep {
            next_sweep = now + tick;
            SWEEP_SHARDS_PER_TICK
        } else {
            0
        };
        // Errors are kept for `stats()`; the next tick retries.
        if let Err(e) = maintain(inner, &mut shard, shards) {
            *inner.last_gc_error.lock() = Some(e.to_string());
        }
        if !inner.reaper.rest(MIN_PASS_GAP.min(tick)) {
            return;
        }
    }
}

/// The compactor thread's loop: sleeps until the next segment falls due (or a tick, or a
/// poke), then compacts what is due.
pub fn run_compactor(inner: &Arc<Inner>) {
    let tick = deadline::Deadline::new(inner.opts.max_shred_delay).tick();
    loop {
        let now = inner.now_ms();
        let wait = compact::next_due_ms(inner, now).map_or(tick, |due| {
            Duration::from_millis(due.saturating_sub(now)).min(tick)
        });
        if !inner.compactor.sleep(wait) {
            return;
        }
        if let Err(e) = compact::compact_due(inner) {
            *inner.last_gc_error.lock() = Some(e.to_string());
        }
    }
}

/// One maintenance pass: retire, sweep `shards` index shards, shred what is dead.
/// Returns the number of segments shredded.
pub fn maintain(inner: &Inner, next_shard: &mut usize, shards: usize) -> Result<usize> {
    let now = inner.now_ms();
    inner.writer.retire(now);
    let mut expired = Vec::new();
    for _ in 0..shards {
        inner.index.sweep_shard(*next_shard, now, &mut expired);
        *next_shard = (*next_shard + 1) % crate::index::Index::shard_count();
    }
    inner.drop_expired(&expired);
    // An idle store's spare segment must not keep an epoch key alive (HSM provider).
    if let Some(id) = inner.writer.spare_id() {
        if inner.keyring.epoch_is_over(id) {
            inner.writer.retire_spare(now);
        }
    }
    // A failing rotation (its key source down, say) must never hold up shredding: shred
    // first, then report the rotation's error (kept in `last_gc_error`, retried next pass).
    let rotated = rotate_if_due(inner, now);
    let shredded = shred_dead(inner, now);
    // Then live keys leave an epoch that is over (HSM), so a long-lived one does not keep
    // its epoch's key, and the shredded keys it wraps, alive (after the shred: what dies
    // now is not re-wrapped). Same rule for its errors.
    let rolled = inner.keyring.roll_epochs().map(|_| ());
    let shredded = shredded?;
    rotated.and(rolled).map(|()| shredded)
}

/// Automatic master-key rotation (`Options::auto_rotation`), when its interval is up.
fn rotate_if_due(inner: &Inner, now: u64) -> Result<()> {
    let Some(r) = &inner.opts.auto_rotation else {
        return Ok(());
    };
    let last = inner.last_rotation_ms.load(Ordering::SeqCst);
    if now < last.saturating_add(r.every.as_millis() as u64) {
        return Ok(());
    }
    let new = (r.next_key)()?;
    crate::store::rotate_master(inner, new, now).map(|_| ())
}

/// Shreds every closed segment whose records are all dead and whose ack records no
/// longer protect a live segment.
pub fn shred_dead(inner: &Inner, now: u64) -> Result<usize> {
    let active: HashSet<u64> = inner.writer.active_ids().into_iter().collect();
    let all = inner.segments.all();
    let mut doomed: HashSet<u64> = HashSet::new();
    // Fixpoint: shredding a segment releases the ack segments that only protected it.
    loop {
        let before = doomed.len();
        for s in &all {
            // A segment being compacted is not shredded under the compaction: its acks
            // may still need to be extended to the copies (compact::switch_over).
            if doomed.contains(&s.id)
                || active.contains(&s.id)
                || !s.closed.load(Ordering::SeqCst)
                || s.compacting.load(Ordering::SeqCst)
            {
                continue;
            }
            if is_dead(s, now) && protects_nothing(inner, s, &doomed) {
                doomed.insert(s.id);
            }
        }
        if doomed.len() == before {
            break;
        }
    }
    if doomed.is_empty() {
        // Nothing dies: a key-epoch retirement that failed earlier is retried all the
        // same (the keyring returns at once when none is pending).
        return match inner.keyring.shred(&[])? {
            Some(retire_err) => Err(retire_err),
            None => Ok(0),
        };
    }
    let ids: Vec<u64> = doomed.iter().copied().collect();
    // 1. Keys out of the keystore, durably. From here the records are unreadable. (An
    //    error retiring epoch keys is reported once the shred below is done.)
    let retire_err = inner.keyring.shred(&ids)?;
    // 2. Files out of the directory, and the in-memory keys dropped (zeroized once the
    //    last reader lets go). A file that cannot be unlinked holds only ciphertext under
    //    a destroyed key; the next open deletes it (a file without a key).
    let mut unlink_err = None;
    for id in &ids {
        if let Some(seg) = inner.segments.remove(*id) {
            seg.shredded.store(true, Ordering::SeqCst);
            // The client ids whose records were here are forgotten with them.
            inner.index.dedupe_refs.shredded(*id);
            if let Some(death) = seg.first_death_ms(now) {
                inner.record_shred_latency(now.saturating_sub(death));
            }
            let (sources, copies) = {
                let mut l = seg.links.lock();
                (
                    std::mem::take(&mut l.ack_sources),
                    std::mem::take(&mut l.copies),
                )
            };
            for src in sources {
                if let Some(a) = inner.segments.get(src) {
                    a.links.lock().ack_targets.remove(id);
                }
            }
            for c in copies {
                if let Some(a) = inner.segments.get(c) {
                    a.links.lock().copies.remove(id);
                }
            }
            let len = seg.data_len();
            let _ = inner
                .writer
                .disk_used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                    Some(u.saturating_sub(len))
                });
            if let Err(e) = seg.unlink() {
                unlink_err.get_or_insert(e);
            }
        }
    }
    // The keys are gone: these segments are shredded whatever happens to their files.
    inner.shreds.fetch_add(ids.len() as u64, Ordering::SeqCst);
    fsutil::sync_dir(&*inner.opts.file_system, &inner.dir)?;
    if let Some(e) = unlink_err.or(retire_err) {
        return Err(e);
    }
    Ok(ids.len())
}

fn is_dead(s: &Segment, now: u64) -> bool {
    let records = s.records.load(Ordering::SeqCst);
    s.live.load(Ordering::SeqCst) == 0
        || (records > 0 && s.max_expiry_ms.load(Ordering::SeqCst) <= now)
}

fn protects_nothing(inner: &Inner, s: &Segment, doomed: &HashSet<u64>) -> bool {
    let mut links = s.links.lock();
    // Forget targets that are already gone.
    links
        .ack_targets
        .retain(|t| inner.segments.get(*t).is_some());
    links.ack_targets.iter().all(|t| doomed.contains(t))
}
