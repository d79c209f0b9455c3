//! The keyring: the keystore plus the provider, and the two operations that change
//! them: creating a segment under a fresh key, and shredding segments' keys.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::audit::{Event, KeyAudit};
use super::keystore::KeyStore;
use super::KeyProvider;
use crate::crypto::Dek;
use crate::error::Result;
use crate::format::audit::AuditEvent;
use crate::options::Clock;
use crate::segment::Segment;
use crate::vfs::FileSystem;

/// The keystore and the audit log of its changes, changed together.
#[derive(Debug)]
struct KeyState {
    ks: KeyStore,
    audit: KeyAudit,
    /// The provider's last `retire` failed: the next shred calls it again, even with
    /// nothing new to shred.
    retire_pending: bool,
    /// Providers a master-key rotation moved away from, whose `retire_all` has not
    /// succeeded yet (tried again at every shred).
    abandoned: Vec<Arc<dyn KeyProvider>>,
    /// Audit records of key destructions not yet in the log (its append failed): the
    /// next keystore write records them first.
    unaudited: Vec<Event>,
    /// The keystore on disk may differ from the one in memory: sealed lengths not yet
    /// written, or a write that failed (maybe after its rename).
    dirty: bool,
}

/// Serialises every keystore change. Its lock is held across keystore I/O and key
/// provider calls, so nothing an appender or an ack waits for takes it: the writer
/// hands its key work to its key worker (`writer::keywork`), and only an appender
/// that finds no spare segment ready creates one here itself. A master-key rotation
/// re-wraps with the lock dropped and takes it only to apply and persist.
#[derive(Debug)]
pub struct Keyring {
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    store: Mutex<KeyState>,
    /// One master-key rotation at a time (held across the whole of it).
    rotation: Mutex<()>,
    /// Live data keys, as of the last change (read without the lock, for `stats`).
    live: AtomicUsize,
    /// The epoch every live key was last moved into by `roll_epochs` (u64::MAX: none).
    rolled_to: AtomicU64,
    /// Replaced by a master-key rotation (under the `store` lock).
    provider: RwLock<Arc<dyn KeyProvider>>,
    next_id: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
}

impl Keyring {
    pub fn new(
        (dir, fs): (&Path, Arc<dyn FileSystem>),
        (ks, audit): (KeyStore, KeyAudit),
        provider: Arc<dyn KeyProvider>,
        next_id: Arc<AtomicU64>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Keyring {
            dir: dir.to_path_buf(),
            fs,
            live: AtomicUsize::new(ks.len()),
            rolled_to: AtomicU64::new(u64::MAX),
            store: Mutex::new(KeyState {
                ks,
                audit,
                retire_pending: false,
                abandoned: Vec::new(),
                unaudited: Vec::new(),
                dirty: false,
            }),
            rotation: Mutex::new(()),
            provider: RwLock::new(provider),
            next_id,
            clock,
        }
    }

    /// Records `events` in the audit log, then persists the keystore vouching for them
    /// (a crash between the two leaves records the keystore does not vouch for yet,
    /// which is allowed; never the reverse).
    fn persist(&self, st: &mut KeyState, events: &[Event]) -> Result<()> {
        self.live.store(st.ks.len(), Ordering::Relaxed);
        let now = self.clock.now_ms();
        let generation = st.ks.generation() + 1;
        if st.unaudited.is_empty() {
            st.audit.append(events, now, generation)?;
        } else {
            // Records owed from an earlier write whose audit append failed go first; once
            // appended they are never queued again (a failed keystore write after it
            // leaves them in the log, unanchored, which is allowed).
            let mut all = std::mem::take(&mut st.unaudited);
            let owed = all.len();
            all.extend_from_slice(events);
            if let Err(e) = st.audit.append(&all, now, generation) {
                all.truncate(owed);
                st.unaudited = all;
                return Err(e);
            }
        }
        let ks = &mut st.ks;
        ks.id_floor = ks.id_floor.max(self.next_id.load(Ordering::SeqCst));
        ks.time_floor_ms = ks.time_floor_ms.max(now);
        ks.audit_anchor = Some(st.audit.anchor());
        if let Err(e) = ks.persist(&*self.fs, &**self.provider.read()) {
            // The rename may have happened (a failed directory fsync): the keystore on
            // disk may now differ from the one in memory, which the caller may even put
            // back. Until a write succeeds, nothing is retired on the word of memory.
            st.dirty = true;
            return Err(e);
        }
        st.dirty = false;
        Ok(())
    }

    /// Creates a new segment: fresh random key, wrapped and persisted in the keystore
    /// *before* the file exists (so a crash never leaves a file without its key unless the
    /// key was shredded).
    pub fn create_segment(&self, prealloc: u64) -> Result<Segment> {
        let mut st = self.store.lock();
        let id = st.ks.allocate_segment_id();
        let dek = Dek::generate()?;
        let provider = Arc::clone(&self.provider.read());
        let kek = provider.kek_id();
        // A data key wrapped in an epoch no other live key is in: a new epoch key.
        let epochs_before: std::collections::HashSet<u64> = st
            .ks
            .wrapped_keys()
            .filter_map(|w| provider.epoch_of(w))
            .collect();
        // The key provider is the embedder's code: if it panics once the key is in the
        // keystore, take the key out again, so no key without a file stays live.
        let added = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            st.ks.add(id, &dek, &*provider)?;
            let mut events = Vec::with_capacity(2);
            if let Some(e) = st.ks.wrapped_of(id).and_then(|w| provider.epoch_of(w)) {
                if !epochs_before.contains(&e) {
                    events.push((AuditEvent::EpochKeyCreated, e, kek));
                }
            }
            events.push((AuditEvent::DekCreated, id, kek));
            self.persist(&mut st, &events)
        }));
        match added {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                st.ks.remove(id);
                return Err(e);
            }
            Err(panic) => {
                st.ks.remove(id);
                std::panic::resume_unwind(panic);
            }
        }
        match Segment::create(&self.fs, &self.dir, (id, kek), &dek, prealloc) {
            Ok(s) => Ok(s),
            Err(e) => {
                // The key now has no file; drop it (best effort: recovery drops it too).
                st.ks.remove(id);
                let _ = self.persist(&mut st, &[(AuditEvent::DekShredded, id, kek)]);
                Err(e)
            }
        }
    }

    /// Shreds keys: removes them from the keystore and persists it. After this returns
    /// `Ok`, no copy of those keys exists on disk (in the live keystore); the caller then
    /// unlinks the files. Then asks the provider to retire the epoch keys no live key
    /// needs (and providers rotated away from to retire all of theirs): an error there
    /// is returned as `Ok(Some(error))`, the shred itself being done, and the retirement
    /// is retried by the next call, with or without keys to shred.
    pub fn shred(&self, ids: &[u64]) -> Result<Option<crate::Error>> {
        let mut st = self.store.lock();
        let removed: Vec<_> = ids.iter().filter_map(|&id| st.ks.remove(id)).collect();
        if !removed.is_empty() {
            let events: Vec<Event> = removed
                .iter()
                .map(|e| (AuditEvent::DekShredded, e.segment_id, e.kek_id))
                .collect();
            if let Err(e) = self.persist(&mut st, &events) {
                // Not shredded on disk: keep the keys in memory too, so that the retry
                // persists again instead of finding nothing to remove and calling it done.
                st.ks.restore(removed);
                self.live.store(st.ks.len(), Ordering::Relaxed);
                return Err(e);
            }
        } else if !st.retire_pending && st.abandoned.is_empty() && st.unaudited.is_empty() {
            return Ok(None);
        }
        Ok(self.retire_epochs(&mut st).err())
    }

    /// Now that no live keystore holds them, epoch keys nothing needs are destroyed
    /// (HSM provider): old copies of the wrapped keys they wrap can never be opened
    /// again. Every epoch destroyed is audited, also when the provider fails part way.
    fn retire_epochs(&self, st: &mut KeyState) -> Result<()> {
        // After a failed keystore write the file on disk may hold keys (and a meta key)
        // in epochs memory no longer lists: write memory out first, so what is retired
        // is exactly what the keystore on disk does not need.
        if st.dirty {
            if let Err(e) = self.persist(st, &[]) {
                st.retire_pending = true;
                return Err(e);
            }
        }
        let provider = Arc::clone(&self.provider.read());
        // The keystore on disk needs its meta key too: its epoch may be one no data key
        // is in (a keystore written just before an epoch boundary).
        let mut destroyed = Vec::new();
        let retired = {
            let mut live: Vec<&[u8]> = st.ks.wrapped_keys().collect();
            live.push(st.ks.meta_wrapped());
            provider.retire(&live, &mut destroyed)
        };
        st.retire_pending = retired.is_err();
        let kek = provider.kek_id();
        st.unaudited.extend(
            destroyed
                .iter()
                .map(|&e| (AuditEvent::EpochKeyDestroyed, e, kek)),
        );
        // Providers rotated away from: every epoch key of theirs goes (never those of
        // the provider in use: a rotation back to one takes it off this list first).
        let mut abandoned_err = Ok(());
        let mut still = Vec::new();
        for old in std::mem::take(&mut st.abandoned) {
            let old_kek = old.kek_id();
            if old_kek == kek {
                continue;
            }
            let mut gone = Vec::new();
            let r = old.retire_all(&mut gone);
            st.unaudited.extend(
                gone.iter()
                    .map(|&e| (AuditEvent::EpochKeyDestroyed, e, old_kek)),
            );
            if let Err(e) = r {
                still.push(old);
                abandoned_err = abandoned_err.and(Err(e));
            }
        }
        st.abandoned = still;
        // Destroyed is destroyed: the records are owed until an audit append takes them
        // (this write, or the next one).
        let audited = if st.unaudited.is_empty() {
            Ok(())
        } else {
            self.persist(st, &[])
        };
        retired.and(abandoned_err).and(audited)
    }

    /// Records the final lengths of sealed segments, durably (in memory at once, so
    /// any later keystore write carries them if this one fails). Segments shredded in
    /// the meantime are skipped; if none is left, nothing is written.
    pub fn mark_sealed(&self, sealed: &[(u64, u64)]) -> Result<()> {
        let mut st = self.store.lock();
        for &(id, len) in sealed {
            if st.ks.contains(id) && st.ks.sealed_len(id) != len {
                st.ks.mark_sealed(id, len);
                st.dirty = true;
            }
        }
        if !st.dirty {
            return Ok(());
        }
        self.persist(&mut st, &[])
    }

    /// Persists the keystore (floors updated).
    pub fn flush(&self) -> Result<()> {
        let mut st = self.store.lock();
        self.persist(&mut st, &[])
    }

    /// Rotates the master key: re-wraps every live data key under `new` and persists
    /// the keystore under it. The keystore is replaced by one rename, so a crash leaves
    /// either the old keystore (opens with the old key, or with the new one given the
    /// old as `previous_key_provider`) or the new one. The audit log records every
    /// re-wrap and the rotation before the keystore is written.
    ///
    /// The provider calls (two per live key; an HSM's round trips) run with the lock
    /// dropped, on a copy of the entries: segments created or shredded meanwhile are
    /// re-wrapped or left out when the result is applied, under the lock.
    pub fn rotate(&self, new: Arc<dyn KeyProvider>) -> Result<RotationReport> {
        let _one = self.rotation.lock();
        let old = Arc::clone(&self.provider.read());
        let (old_id, new_id) = (old.kek_id(), new.kek_id());
        if old_id == new_id {
            return Err(crate::Error::InvalidOptions(
                "the new master key is the current one".into(),
            ));
        }
        // A provider rotated away from earlier and rotated back to now must not have its
        // epoch keys retired under the keys this rotation wraps.
        let revived: Vec<_> = {
            let mut st = self.store.lock();
            let (revived, rest) = std::mem::take(&mut st.abandoned)
                .into_iter()
                .partition(|p| p.kek_id() == new_id);
            st.abandoned = rest;
            revived
        };
        let snapshot = self.store.lock().ks.clone_entries();
        let rewrapped = KeyStore::rewrapped(&KeyStore::path_in(&self.dir), snapshot, &*old, &*new);
        let mut st = self.store.lock();
        let before = st.ks.clone_entries();
        let ids = match st.ks.apply_rewrap(&rewrapped, &*old, &*new) {
            Ok(ids) => ids,
            Err(e) => {
                st.abandoned.extend(revived);
                return Err(e);
            }
        };
        let mut events: Vec<Event> = ids
            .iter()
            .map(|&id| (AuditEvent::DekRewrapped, id, new_id))
            .collect();
        events.push((AuditEvent::MasterKeyRotated, new_id, old_id));
        *self.provider.write() = new;
        if let Err(e) = self.persist(&mut st, &events) {
            // Whether the keystore on disk is now under the new key decides which state
            // is true: the rename may have happened before the error (a failed dir fsync).
            let on_disk = self
                .fs
                .read(st.ks.path())
                .ok()
                .and_then(|b| crate::format::keystore::KeystoreImage::decode(&b).ok())
                .map(|img| img.kek_id);
            // Renamed into place but maybe not durable (the dir fsync failed): a power
            // cut could still bring back the keystore under the old provider, so its
            // epoch keys are not retired (they linger; see engine-format.md).
            if on_disk != Some(new_id) {
                st.ks.restore_entries(before);
                *self.provider.write() = old;
                st.abandoned.extend(revived);
            }
            return Err(e);
        }
        // No live key is under the old provider now: its epoch keys (HSM) go, here or
        // at a later shred if the provider fails (the rotation itself is done).
        st.abandoned.push(old);
        let _ = self.retire_epochs(&mut st);
        Ok(RotationReport {
            old_kek_id: old_id,
            new_kek_id: new_id,
            rewrapped: ids.len(),
        })
    }

    /// Moves every live data key wrapped in an epoch that is over into the current one
    /// (HSM provider; nothing for a provider without epochs): re-wrapped, the keystore
    /// written, then the emptied epochs retired. So no long-lived key keeps an old
    /// epoch's key alive, and a shredded segment's key, in any copy of any keystore, is
    /// unopenable once the epoch it was last wrapped in is over and this has run (see
    /// engine-format.md, "Thief of the disk and of every backup"). Skipped while a
    /// master-key rotation runs (it re-wraps everything anyway), and when the epoch it
    /// last rolled into is still the current one. The provider calls (two per key) run
    /// with the keyring lock dropped, like a rotation's. Returns the keys moved.
    pub fn roll_epochs(&self) -> Result<usize> {
        let Some(_one) = self.rotation.try_lock() else {
            return Ok(0);
        };
        let provider = Arc::clone(&self.provider.read());
        let Some(now) = provider.current_epoch() else {
            return Ok(0);
        };
        if self.rolled_to.load(Ordering::Relaxed) == now {
            return Ok(0);
        }
        let is_old = |w: &[u8]| provider.epoch_of(w).is_some_and(|e| e < now);
        let before = self.store.lock().ks.entries_where(is_old);
        if before.is_empty() {
            // Nothing to move (an earlier roll, or a reopen, did it), but the epochs it
            // emptied may still be in the token (a crash before their retirement; the
            // pending flag does not survive a restart): retire once per epoch.
            let mut st = self.store.lock();
            let retired = self.retire_epochs(&mut st);
            if retired.is_ok() {
                self.rolled_to.store(now, Ordering::Relaxed);
            }
            return retired.map(|()| 0);
        }
        let mut after = KeyStore::rewrapped(
            &KeyStore::path_in(&self.dir),
            before.clone(),
            &*provider,
            &*provider,
        );
        let failed = before.len() - after.len();
        let mut st = self.store.lock();
        // Keys re-wrapped in an epoch that ended while the token worked (a slow token, a
        // short epoch) are not installed: with the lock dropped, a shred may already have
        // retired that epoch. They are moved again next pass.
        let current = provider.current_epoch().unwrap_or(now);
        after.retain(|_, e| provider.epoch_of(&e.wrapped) >= Some(current));
        // The first key wrapped in this epoch: its epoch key was made in the token now.
        let new_epoch = !st
            .ks
            .wrapped_keys()
            .any(|w| provider.epoch_of(w) == Some(current));
        let replaced = st.ks.replace_wrapped(&before, &after);
        let mut from: Vec<u64> = replaced
            .iter()
            .filter_map(|e| provider.epoch_of(&e.wrapped))
            .collect();
        from.sort_unstable();
        from.dedup();
        let moved = replaced.len();
        let mut events: Vec<Event> = Vec::with_capacity(from.len() + 1);
        if new_epoch && moved > 0 {
            events.push((AuditEvent::EpochKeyCreated, current, provider.kek_id()));
        }
        events.extend(from.iter().map(|&e| (AuditEvent::EpochRolled, e, current)));
        if moved > 0 {
            if let Err(e) = self.persist(&mut st, &events) {
                st.ks.restore(replaced);
                return Err(e);
            }
        }
        // Keys that could not be moved (a token error; a seal or a new epoch in between)
        // are tried again next pass.
        if st.ks.entries_where(is_old).is_empty() {
            self.rolled_to.store(now, Ordering::Relaxed);
        }
        // The emptied epochs go now, or at a later shred if the token fails.
        let retired = self.retire_epochs(&mut st);
        if failed > 0 {
            return Err(crate::Error::KeyProvider(format!(
                "{failed} live data keys could not be re-wrapped out of an epoch that is over (retried at the next maintenance pass; until then that epoch's key stays)"
            )));
        }
        retired.map(|()| moved)
    }

    /// Whether a segment's key was wrapped in an epoch that is over (HSM provider).
    pub fn epoch_is_over(&self, segment_id: u64) -> bool {
        let st = self.store.lock();
        let p = self.provider.read();
        match (
            st.ks.wrapped_of(segment_id).and_then(|w| p.epoch_of(w)),
            p.current_epoch(),
        ) {
            (Some(e), Some(now)) => e < now,
            _ => false,
        }
    }

    /// The current provider's KEK id.
    pub fn kek_id(&self) -> u64 {
        self.provider.read().kek_id()
    }

    /// Live data keys (as of the last keystore change; never waits for the keyring).
    pub fn live_keys(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// What a master-key rotation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationReport {
    pub old_kek_id: u64,
    pub new_kek_id: u64,
    /// Live data keys re-wrapped.
    pub rewrapped: usize,
}
