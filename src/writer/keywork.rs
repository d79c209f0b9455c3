//! The key worker: the writer's keystore work, on a thread of its own.
//!
//! Making the spare segment (a fresh data key, wrapped, written to the keystore with its
//! audit records, fsynced, maybe zero-filled) and recording the final lengths of sealed
//! segments both write the keystore under the keyring's lock, which a master-key
//! rotation or a shred (HSM calls included) may hold for long. The writer thread never
//! does either: it hands sealed lengths over and takes spares that are ready, so no
//! appender or ack waits for its durability behind key work. Only a rotation that finds
//! no spare ready makes one in the foreground (an appender, which needs the segment now;
//! acks wait for the worker instead, or get its refusal).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;

use super::{State, Writer, SPARE_RETRY, ZERO_FILL_MAX_ROUND};
use crate::error::{Error, FailureCause, Result};

/// The worker sleeps at most this long between looks at its state.
const IDLE_TICK: Duration = Duration::from_secs(1);

impl Writer {
    /// Starts the key worker thread.
    pub(super) fn start_key_worker(self: &Arc<Self>) -> Result<()> {
        let me = Arc::clone(self);
        let h = std::thread::Builder::new()
            .name("cinder-keys".into())
            .spawn(move || me.run_key_worker())
            .map_err(|e| Error::io("spawn key worker thread", "", e))?;
        *self.keys_thread.lock() = Some(h);
        Ok(())
    }

    /// Stops the key worker once the writer thread has stopped (the writer's last round
    /// seals every segment and hands their lengths over first) and waits for it: every
    /// sealed length handed over is in the keyring's memory when this returns.
    pub(super) fn stop_key_worker(&self) {
        {
            let mut st = self.state.lock();
            st.keys_stop = true;
            self.keys_work.notify_all();
        }
        if let Some(h) = self.keys_thread.lock().take() {
            let _ = h.join();
        }
    }

    /// Hands the final lengths of sealed segments to the key worker.
    pub(super) fn hand_over_sealed(&self, sealed: Vec<(u64, u64)>) {
        let mut st = self.state.lock();
        st.sealed.extend(sealed);
        self.keys_work.notify_one();
    }

    /// Waits until the key worker has nothing in hand: the sealed lengths handed over
    /// are recorded (or their keystore write failed and waits for its retry), and a
    /// spare that is wanted is made or refused (one being zero-filled is not waited
    /// for). `Store::flush` ends with this, so that what it leaves is settled. Work that
    /// arrives meanwhile is not waited for: two of the worker's rounds take everything
    /// that was in hand at the call.
    pub fn settle_key_work(&self) {
        let mut st = self.state.lock();
        let start = st.keys_rounds;
        loop {
            let now = Instant::now();
            let busy = self.failed.get().is_none()
                && !st.keys_stop
                && (st.recording
                    || (!st.sealed.is_empty() && st.sealed_retry_at.is_none_or(|t| now >= t))
                    || (st.prefilling && !st.zeroing)
                    || self.spare_wanted(&st, now));
            if !busy || st.keys_rounds >= start + 2 {
                return;
            }
            self.keys_work.notify_one();
            self.moved.wait_for(&mut st, Duration::from_millis(20));
        }
    }

    /// Whether the worker should make a spare now.
    fn spare_wanted(&self, st: &State, now: Instant) -> bool {
        st.spare.is_none()
            && !st.creating
            && !st.prefilling
            && !st.shutdown
            && self.failed.get().is_none()
            && st.spare_retry_at.is_none_or(|t| now >= t)
    }

    /// Zero-fill the next spare only while segments fill up (a busy store), rounds are
    /// small enough that commits are not bound by bandwidth, and rotations have not
    /// outrun the zeroing lately (see `ZERO_FILL_MAX_ROUND`, `ZERO_FILL_PAUSE`).
    fn zero_fill_wanted(&self, st: &State, now: Instant) -> bool {
        self.cfg.zero_fill
            && self.rotating_full.load(Ordering::Relaxed)
            && self.round_bytes.load(Ordering::Relaxed) < ZERO_FILL_MAX_ROUND
            && st.zero_fill_paused_until.is_none_or(|t| now >= t)
    }

    fn run_key_worker(self: Arc<Self>) {
        // If this thread panics (the key provider is the embedder's code), the writer and
        // appenders must not wait for its spare forever: the store fails.
        struct Panicked<'a>(&'a Writer);
        impl Drop for Panicked<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    {
                        let mut st = self.0.state.lock();
                        st.prefilling = false;
                        st.zeroing = false;
                    }
                    self.0.fail(&Error::WriterFailed {
                        reason: "the key worker panicked".into(),
                        cause: FailureCause::Internal,
                    });
                }
            }
        }
        let _guard = Panicked(&self);
        let mut st = self.state.lock();
        loop {
            let now = Instant::now();
            let sealed_due = !st.sealed.is_empty()
                && (st.keys_stop || st.sealed_retry_at.is_none_or(|t| now >= t));
            let make = self.spare_wanted(&st, now);
            if !sealed_due && !make {
                if st.keys_stop {
                    return;
                }
                let until = [st.spare_retry_at, st.sealed_retry_at]
                    .into_iter()
                    .flatten()
                    .filter(|t| *t > now)
                    .min()
                    .map_or(IDLE_TICK, |t| (t - now).min(IDLE_TICK));
                self.keys_work.wait_for(&mut st, until);
                continue;
            }
            let sealed = if sealed_due {
                std::mem::take(&mut st.sealed)
            } else {
                Vec::new()
            };
            let zero = make && self.zero_fill_wanted(&st, now);
            if make {
                // A retry starts: until it ends, acks wait for its outcome instead of
                // being refused again with the last one (`Writer::acks_paused`).
                st.spare_error = None;
                st.spare_retry_at = None;
                st.prefilling = true;
            }
            let stopping = st.keys_stop;
            st.recording = !sealed.is_empty();
            let marked = MutexGuard::unlocked(&mut st, || {
                if sealed.is_empty() {
                    Ok(())
                } else {
                    self.keyring.mark_sealed(&sealed)
                }
            });
            st.recording = false;
            if marked.is_err() && !stopping {
                // The lengths are in the keyring's memory already; the keystore write is
                // retried (an unrecorded length only means recovery checks that segment
                // by its seal alone, engine-format.md "Sealing").
                st.sealed.extend(sealed);
                st.sealed_retry_at = Some(Instant::now() + SPARE_RETRY);
            }
            if make {
                self.make_spare(&mut st, zero);
            } else {
                self.moved.notify_all();
            }
            st.keys_rounds += 1;
        }
    }

    /// Creates a segment (and zero-fills it if `zero`) with the state lock dropped, then
    /// offers it as the spare. A failure is kept for the acks that need a segment and
    /// retried after `SPARE_RETRY`; appenders that need one meanwhile try for themselves
    /// and get their own error.
    fn make_spare(&self, st: &mut MutexGuard<'_, State>, zero: bool) {
        let r = MutexGuard::unlocked(st, || self.create_segment());
        let r = match r {
            Ok(seg) if zero => {
                st.zeroing = true;
                // Zeroing is only an optimisation: a segment that failed part way is
                // still a valid (preallocated) one, and real writes report real errors.
                MutexGuard::unlocked(st, || {
                    let _ = seg.zero_fill();
                });
                st.zeroing = false;
                Ok(seg)
            }
            r => r,
        };
        st.prefilling = false;
        match r {
            Ok(seg) => self.offer_spare(st, seg),
            Err(e) => {
                st.spare_retry_at = Some(Instant::now() + SPARE_RETRY);
                st.spare_error = Some(e);
            }
        }
        self.work.notify_one();
        self.moved.notify_all();
    }
}
