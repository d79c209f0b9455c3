//! The keyring: the keystore plus the provider, and the two operations that change
//! them: creating a segment under a fresh key, and shredding segments' keys.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// Serialises every keystore change; held across keystore I/O, never by hot paths.
#[derive(Debug)]
pub struct Keyring {
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    store: Mutex<KeyState>,
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
            store: Mutex::new(KeyState { ks, audit }),
            provider: RwLock::new(provider),
            next_id,
            clock,
        }
    }

    /// Records `events` in the audit log, then persists the keystore vouching for them
    /// (a crash between the two leaves records the keystore does not vouch for yet,
    /// which is allowed; never the reverse).
    fn persist(&self, st: &mut KeyState, events: &[Event]) -> Result<()> {
        let now = self.clock.now_ms();
        st.audit.append(events, now)?;
        let ks = &mut st.ks;
        ks.id_floor = ks.id_floor.max(self.next_id.load(Ordering::SeqCst));
        ks.time_floor_ms = ks.time_floor_ms.max(now);
        ks.audit_anchor = Some(st.audit.anchor());
        ks.persist(&*self.fs, &**self.provider.read())
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

    /// Shreds keys: removes them from the keystore and persists it. After this returns,
    /// no copy of those keys exists on disk (in the live keystore); the caller then
    /// unlinks the files.
    pub fn shred(&self, ids: &[u64]) -> Result<()> {
        let mut st = self.store.lock();
        let removed: Vec<_> = ids.iter().filter_map(|&id| st.ks.remove(id)).collect();
        if removed.is_empty() {
            return Ok(());
        }
        let events: Vec<Event> = removed
            .iter()
            .map(|e| (AuditEvent::DekShredded, e.segment_id, e.kek_id))
            .collect();
        if let Err(e) = self.persist(&mut st, &events) {
            // Not shredded on disk: keep the keys in memory too, so that the retry
            // persists again instead of finding nothing to remove and calling it done.
            st.ks.restore(removed);
            return Err(e);
        }
        // Now that no live keystore holds them, epoch keys nothing needs are destroyed
        // (HSM provider): old copies of these wrapped keys can never be opened again.
        let provider = Arc::clone(&self.provider.read());
        // The keystore on disk needs its meta key too: its epoch may be one no data key
        // is in (a keystore written just before an epoch boundary).
        let mut live: Vec<&[u8]> = st.ks.wrapped_keys().collect();
        live.push(st.ks.meta_wrapped());
        let destroyed = provider.retire(&live)?;
        if !destroyed.is_empty() {
            let kek = provider.kek_id();
            let events: Vec<Event> = destroyed
                .iter()
                .map(|&e| (AuditEvent::EpochKeyDestroyed, e, kek))
                .collect();
            self.persist(&mut st, &events)?;
        }
        Ok(())
    }

    /// Records the final lengths of sealed segments, durably.
    pub fn mark_sealed(&self, sealed: &[(u64, u64)]) -> Result<()> {
        let mut st = self.store.lock();
        for &(id, len) in sealed {
            st.ks.mark_sealed(id, len);
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
    pub fn rotate(&self, new: Arc<dyn KeyProvider>) -> Result<RotationReport> {
        let mut st = self.store.lock();
        let old = Arc::clone(&self.provider.read());
        let (old_id, new_id) = (old.kek_id(), new.kek_id());
        if old_id == new_id {
            return Err(crate::Error::InvalidOptions(
                "the new master key is the current one".into(),
            ));
        }
        let before = st.ks.clone_entries();
        let ids = st.ks.rewrap_all(&*old, &*new)?;
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
            if on_disk != Some(new_id) {
                st.ks.restore_entries(before);
                *self.provider.write() = old;
            }
            return Err(e);
        }
        Ok(RotationReport {
            old_kek_id: old_id,
            new_kek_id: new_id,
            rewrapped: ids.len(),
        })
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

    pub fn live_keys(&self) -> usize {
        self.store.lock().ks.len()
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
