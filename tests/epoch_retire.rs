//! Shredding with destroyable key-encryption keys (contract 6, and the store must always
//! open, contract 10): after every shred the provider is asked to retire the epochs no
//! live key needs, and "live" must include the keystore's own meta key as written on
//! disk. Otherwise an epoch that wraps only the keystore meta (a keystore written just
//! before an epoch boundary) is destroyed, and that keystore can never be opened again.
//! A provider with epochs over a key file stands in for the HSM here.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cinder::crypto::Dek;
use cinder::format::keystore::KeystoreImage;
use cinder::{Clock, FileKeyProvider, KeyProvider, ManualClock, Options, Store};

/// Wraps with a file key, tagged with the epoch (hour of the clock) it was wrapped in;
/// records, at every `retire`, whether `live` holds the on-disk keystore's meta key.
#[derive(Debug)]
struct Epochs {
    inner: FileKeyProvider,
    clock: Arc<ManualClock>,
    dir: PathBuf,
    retires: Mutex<Vec<bool>>,
}

const EPOCH_MS: u64 = 3_600_000;

impl KeyProvider for Epochs {
    fn kek_id(&self) -> u64 {
        self.inner.kek_id()
    }

    fn wrap(&self, dek: &Dek, context: &[u8]) -> cinder::Result<Vec<u8>> {
        let mut w = (self.clock.now_ms() / EPOCH_MS).to_le_bytes().to_vec();
        w.extend(self.inner.wrap(dek, context)?);
        Ok(w)
    }

    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> cinder::Result<Option<Dek>> {
        match wrapped.get(8..) {
            Some(w) => self.inner.unwrap(w, context),
            None => Ok(None),
        }
    }

    fn epoch_of(&self, wrapped: &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(wrapped.get(..8)?.try_into().ok()?))
    }

    fn current_epoch(&self) -> Option<u64> {
        Some(self.clock.now_ms() / EPOCH_MS)
    }

    fn retire(&self, live: &[&[u8]]) -> cinder::Result<Vec<u64>> {
        let img = KeystoreImage::decode(&std::fs::read(self.dir.join("KEYS")).unwrap()).unwrap();
        let kept = live.contains(&img.meta_wrapped_key.as_slice());
        self.retires.lock().unwrap().push(kept);
        Ok(Vec::new())
    }
}

#[test]
fn retire_is_told_the_keystore_meta_key_is_live() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000 * EPOCH_MS);
    let dir = tmp.path().join("data");
    let p = Arc::new(Epochs {
        inner: FileKeyProvider::create(tmp.path().join("key")).unwrap(),
        clock: clock.clone(),
        dir: dir.clone(),
        retires: Mutex::new(Vec::new()),
    });
    let mut o = Options::new(p.clone());
    o.clock = clock.clone();
    o.segment_size = 64 << 10;
    o.max_message_size = 4096;
    o.max_shred_delay = Duration::from_secs(2);
    o.background_reaper = false;
    let store = Store::open(&dir, o).unwrap();
    for round in 0..3 {
        let ids: Vec<_> = (0..80)
            .map(|_| {
                store
                    .append(b"q", &[round; 1000], Duration::from_secs(3600))
                    .unwrap()
            })
            .collect();
        store.ack_batch(b"q", &ids).unwrap();
        // Into the next epoch: what shreds now is written in it, the old keys are not.
        clock.advance(Duration::from_millis(EPOCH_MS / 2));
        store.maintain().unwrap();
        store.maintain().unwrap();
    }
    let retires = p.retires.lock().unwrap().clone();
    assert!(!retires.is_empty(), "shreds ran");
    assert!(
        retires.iter().all(|&kept| kept),
        "retire was not told the on-disk keystore's meta key is live: {retires:?}"
    );
}
