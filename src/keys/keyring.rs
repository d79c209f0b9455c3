//! The keyring: the keystore plus the provider, and the two operations that change
//! them: creating a segment under a fresh key, and shredding segments' keys.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::keystore::KeyStore;
use super::KeyProvider;
use crate::crypto::Dek;
use crate::error::Result;
use crate::options::Clock;
use crate::segment::Segment;

/// Serialises every keystore change; held across keystore I/O, never by hot paths.
#[derive(Debug)]
pub struct Keyring {
    dir: PathBuf,
    store: Mutex<KeyStore>,
    provider: Arc<dyn KeyProvider>,
    next_id: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
}

impl Keyring {
    pub fn new(
        dir: &Path,
        store: KeyStore,
        provider: Arc<dyn KeyProvider>,
        next_id: Arc<AtomicU64>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Keyring {
            dir: dir.to_path_buf(),
            store: Mutex::new(store),
            provider,
            next_id,
            clock,
        }
    }

    fn persist(&self, ks: &mut KeyStore) -> Result<()> {
        ks.id_floor = ks.id_floor.max(self.next_id.load(Ordering::SeqCst));
        ks.time_floor_ms = ks.time_floor_ms.max(self.clock.now_ms());
        ks.persist(&*self.provider)
    }

    /// Creates a new segment: fresh random key, wrapped and persisted in the keystore
    /// *before* the file exists (so a crash never leaves a file without its key unless the
    /// key was shredded).
    pub fn create_segment(&self, prealloc: u64) -> Result<Segment> {
        let mut ks = self.store.lock();
        let id = ks.allocate_segment_id();
        let dek = Dek::generate()?;
        ks.add(id, &dek, &*self.provider)?;
        if let Err(e) = self.persist(&mut ks) {
            ks.remove(id);
            return Err(e);
        }
        match Segment::create(&self.dir, id, &dek, self.provider.kek_id(), prealloc) {
            Ok(s) => Ok(s),
            Err(e) => {
                // The key now has no file; drop it (best effort: recovery drops it too).
                ks.remove(id);
                let _ = self.persist(&mut ks);
                Err(e)
            }
        }
    }

    /// Shreds keys: removes them from the keystore and persists it. After this returns,
    /// no copy of those keys exists on disk (in the live keystore); the caller then
    /// unlinks the files.
    pub fn shred(&self, ids: &[u64]) -> Result<()> {
        let mut ks = self.store.lock();
        let removed: Vec<u64> = ids.iter().copied().filter(|&id| ks.remove(id)).collect();
        if removed.is_empty() {
            return Ok(());
        }
        self.persist(&mut ks)
    }

    /// Records the final lengths of sealed segments, durably.
    pub fn mark_sealed(&self, sealed: &[(u64, u64)]) -> Result<()> {
        let mut ks = self.store.lock();
        for &(id, len) in sealed {
            ks.mark_sealed(id, len);
        }
        self.persist(&mut ks)
    }

    /// Persists the keystore (floors updated).
    pub fn flush(&self) -> Result<()> {
        let mut ks = self.store.lock();
        self.persist(&mut ks)
    }

    pub fn live_keys(&self) -> usize {
        self.store.lock().len()
    }
}
