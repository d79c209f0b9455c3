//! The persisted keystore: wrapped data keys of live segments, rewritten whole and
//! crash-safely on every change (segment created, segments shredded).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::{Zeroize, Zeroizing};

use super::KeyProvider;
use crate::crypto::{Dek, SealKey, TAG_LEN};
use crate::error::{CorruptionKind, Error, Result};
use crate::format::keystore::{
    self as fmt, KeyEntry, KeystoreImage, KeystoreMeta, META_PLAIN_LEN, META_SEALED_LEN,
};
use crate::format::FORMAT_VERSION;
use crate::fsutil;
use crate::vfs::FileSystem;

/// File name of the keystore inside the data dir.
pub const FILE_NAME: &str = "KEYS";

/// In-memory copy of the keystore.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    generation: u64,
    pub next_segment_id: u64,
    entries: BTreeMap<u64, KeyEntry>,
    /// Every message id ever issued is below this or inside a live segment.
    pub id_floor: u64,
    /// The latest clock reading persisted (expiry never goes backwards past it).
    pub time_floor_ms: u64,
    /// The key audit log's (record count, last hash) this keystore vouches for: read at
    /// load (`None` from a version-2 keystore), set by the keyring before each persist.
    pub audit_anchor: Option<(u64, [u8; 32])>,
    /// The key of the audit log's macs: random, made once (a new store, or the upgrade
    /// of one from format version 3 or earlier, which has none) and kept in every
    /// keystore written since, master-key rotations included.
    pub audit_key: Option<Arc<Dek>>,
    /// The wrapped one-time meta key of the keystore on disk (empty before the first
    /// write): a provider with destroyable epochs must keep the key that opens it.
    meta_wrapped: Vec<u8>,
}

fn dek_context(segment_id: u64, dek_id: u64) -> [u8; 26] {
    let mut c = [0u8; 26];
    c[..10].copy_from_slice(b"cinder dek");
    c[10..18].copy_from_slice(&segment_id.to_le_bytes());
    c[18..].copy_from_slice(&dek_id.to_le_bytes());
    c
}

const META_CONTEXT: &[u8] = b"cinder keystore meta";

/// Re-wraps one entry's data key (of the keystore at `path`) from `old` to `new`.
fn rewrap_entry(
    path: &Path,
    e: &mut KeyEntry,
    old: &dyn KeyProvider,
    new: &dyn KeyProvider,
) -> Result<()> {
    let ctx = dek_context(e.segment_id, e.dek_id);
    let dek = old
        .unwrap(&e.wrapped, &ctx)?
        .ok_or_else(|| Error::corruption(path, 0, CorruptionKind::AuthenticationFailed))?;
    e.wrapped = new.wrap(&dek, &ctx)?;
    e.kek_id = new.kek_id();
    Ok(())
}

impl KeyStore {
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// A fresh, empty keystore (not yet persisted), with a new audit key.
    pub fn new_empty(dir: &Path) -> Result<Self> {
        Ok(KeyStore {
            path: Self::path_in(dir),
            generation: 0,
            next_segment_id: 1,
            entries: BTreeMap::new(),
            id_floor: 1,
            time_floor_ms: 0,
            audit_anchor: None,
            audit_key: Some(Arc::new(Dek::generate()?)),
            meta_wrapped: Vec::new(),
        })
    }

    /// The generation of the keystore on disk (+1 at every write).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Loads the keystore, or `None` if the file does not exist. Checks that `provider`
    /// holds the KEK the keystore was written with, and opens the sealed meta block.
    pub fn load(
        fs: &dyn FileSystem,
        dir: &Path,
        provider: &dyn KeyProvider,
    ) -> Result<Option<Self>> {
        let path = Self::path_in(dir);
        let bytes = match fs.read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read keystore", &path, e)),
        };
        let img = KeystoreImage::decode(&bytes).map_err(|e| e.into_error(&path, 0))?;
        if img.kek_id != provider.kek_id() {
            return Err(Error::WrongMasterKey {
                expected: img.kek_id,
                got: provider.kek_id(),
            });
        }
        let meta_at = bytes.len() - 4 - img.meta_sealed.len();
        let auth =
            || Error::corruption(&path, meta_at as u64, CorruptionKind::AuthenticationFailed);
        let meta_key = provider
            .unwrap(&img.meta_wrapped_key, META_CONTEXT)?
            .ok_or_else(auth)?;
        let plain_len = img.meta_sealed.len() - TAG_LEN;
        let mut plain = Zeroizing::new(img.meta_sealed[..plain_len].to_vec());
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&img.meta_sealed[plain_len..]);
        if !SealKey::new(&meta_key).open([0; 12], &img.meta_aad(), plain.as_mut(), &tag) {
            return Err(auth());
        }
        let mut meta = fmt::decode_meta(&plain);
        let audit_key = meta
            .audit_key
            .map(|k| Arc::new(Dek::from_bytes(&Zeroizing::new(k))));
        meta.audit_key.zeroize();
        let mut entries = BTreeMap::new();
        for e in img.entries {
            if e.segment_id >= img.next_segment_id || entries.contains_key(&e.segment_id) {
                return Err(Error::corruption(
                    &path,
                    0,
                    CorruptionKind::BadField {
                        field: "keystore entry segment id",
                        value: e.segment_id,
                    },
                ));
            }
            entries.insert(e.segment_id, e);
        }
        Ok(Some(KeyStore {
            path,
            generation: img.generation,
            next_segment_id: img.next_segment_id,
            entries,
            id_floor: meta.id_floor,
            time_floor_ms: meta.time_floor_ms,
            audit_anchor: meta.audit,
            audit_key,
            meta_wrapped: img.meta_wrapped_key,
        }))
    }

    /// The wrapped meta key of the keystore on disk.
    pub fn meta_wrapped(&self) -> &[u8] {
        &self.meta_wrapped
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Segment ids that have a key.
    pub fn segment_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, segment_id: u64) -> bool {
        self.entries.contains_key(&segment_id)
    }

    /// Allocates the next segment id.
    pub fn allocate_segment_id(&mut self) -> u64 {
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        id
    }

    /// Adds (in memory) the wrapped key of a new segment. Persist before using the key.
    pub fn add(&mut self, segment_id: u64, dek: &Dek, provider: &dyn KeyProvider) -> Result<()> {
        let wrapped = provider.wrap(dek, &dek_context(segment_id, segment_id))?;
        self.entries.insert(
            segment_id,
            KeyEntry {
                segment_id,
                dek_id: segment_id,
                kek_id: provider.kek_id(),
                sealed_len: 0,
                wrapped,
            },
        );
        Ok(())
    }

    /// Records (in memory) the final length of a sealed segment. Persist to make it
    /// count: recovery then refuses a shorter (older or truncated) copy of the file.
    pub fn mark_sealed(&mut self, segment_id: u64, len: u64) {
        if let Some(e) = self.entries.get_mut(&segment_id) {
            e.sealed_len = len;
        }
    }

    /// The id of the KEK that wraps a segment's key.
    pub fn kek_of(&self, segment_id: u64) -> Option<u64> {
        self.entries.get(&segment_id).map(|e| e.kek_id)
    }

    /// The sealed length recorded for a segment (0 = not sealed when last persisted).
    pub fn sealed_len(&self, segment_id: u64) -> u64 {
        self.entries.get(&segment_id).map_or(0, |e| e.sealed_len)
    }

    /// Removes (in memory) a segment's key. Persist to make the shred durable. Returns
    /// the entry, if it was there.
    pub fn remove(&mut self, segment_id: u64) -> Option<KeyEntry> {
        self.entries.remove(&segment_id)
    }

    /// Puts back entries taken out by [`remove`](Self::remove) when the change could not
    /// be persisted.
    pub fn restore(&mut self, entries: Vec<KeyEntry>) {
        for e in entries {
            self.entries.insert(e.segment_id, e);
        }
    }

    /// Re-wraps a copy of the entries of the keystore at `path` under `new` (no
    /// keystore change; see [`apply_rewrap`](Self::apply_rewrap)). Entries that fail are
    /// left out: one shredded meanwhile may have lost its epoch key (HSM), and one that
    /// is still live is tried again, and its error reported, by `apply_rewrap`.
    pub fn rewrapped(
        path: &Path,
        entries: BTreeMap<u64, KeyEntry>,
        old: &dyn KeyProvider,
        new: &dyn KeyProvider,
    ) -> BTreeMap<u64, KeyEntry> {
        entries
            .into_iter()
            .filter_map(|(id, mut e)| rewrap_entry(path, &mut e, old, new).ok().map(|()| (id, e)))
            .collect()
    }

    /// Re-wraps every data key under `new` (in memory; persist under `new` to make it
    /// count), taking the re-wrapped copy from `done` for every entry it holds (same
    /// segment and data key) and re-wrapping the rest (created since) now. All or
    /// nothing: on an error the entries are unchanged. Returns the ids of the segments
    /// whose keys were re-wrapped.
    pub fn apply_rewrap(
        &mut self,
        done: &BTreeMap<u64, KeyEntry>,
        old: &dyn KeyProvider,
        new: &dyn KeyProvider,
    ) -> Result<Vec<u64>> {
        let mut next = self.entries.clone();
        for e in next.values_mut() {
            match done.get(&e.segment_id) {
                Some(d) if d.dek_id == e.dek_id && d.kek_id == new.kek_id() => {
                    e.wrapped.clone_from(&d.wrapped);
                    e.kek_id = d.kek_id;
                }
                _ => rewrap_entry(&self.path, e, old, new)?,
            }
        }
        let ids = next.keys().copied().collect();
        self.entries = next;
        Ok(ids)
    }

    /// Copies of the entries whose wrapped key `pick` selects (by its wrapped bytes).
    pub fn entries_where(&self, pick: impl Fn(&[u8]) -> bool) -> BTreeMap<u64, KeyEntry> {
        self.entries
            .iter()
            .filter(|(_, e)| pick(&e.wrapped))
            .map(|(&id, e)| (id, e.clone()))
            .collect()
    }

    /// Puts re-wrapped keys in place (in memory; persist to make it count): each entry of
    /// `after` (re-wrapped from `before`) replaces the live one if that is still the entry
    /// of `before` (one shredded or changed meanwhile is left alone). Returns
    /// the entries replaced, to put back with [`restore`](Self::restore) if the write
    /// fails.
    pub fn replace_wrapped(
        &mut self,
        before: &BTreeMap<u64, KeyEntry>,
        after: &BTreeMap<u64, KeyEntry>,
    ) -> Vec<KeyEntry> {
        let mut replaced = Vec::new();
        for (id, new) in after {
            let (Some(cur), Some(old)) = (self.entries.get_mut(id), before.get(id)) else {
                continue;
            };
            // The same key under the same wrap as when it was taken: install the new
            // wrap. Only the wrap is compared: a sealed length recorded meanwhile (the key
            // worker does that with the lock dropped, while a roll re-wraps) is kept, and
            // must not leave the key in an epoch that is over.
            if (cur.dek_id, cur.kek_id, &cur.wrapped) == (old.dek_id, old.kek_id, &old.wrapped) {
                let prev = cur.clone();
                cur.kek_id = new.kek_id;
                cur.wrapped.clone_from(&new.wrapped);
                replaced.push(prev);
            }
        }
        replaced
    }

    /// The wrapped keys of every live entry (for a provider's `retire`).
    pub fn wrapped_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.values().map(|e| &e.wrapped[..])
    }

    /// The wrapped key of a segment.
    pub fn wrapped_of(&self, segment_id: u64) -> Option<&[u8]> {
        self.entries.get(&segment_id).map(|e| &e.wrapped[..])
    }

    /// A copy of the entries, to put back with [`restore_entries`](Self::restore_entries)
    /// when a change cannot be persisted.
    pub fn clone_entries(&self) -> BTreeMap<u64, KeyEntry> {
        self.entries.clone()
    }

    pub fn restore_entries(&mut self, entries: BTreeMap<u64, KeyEntry>) {
        self.entries = entries;
    }

    /// Unwraps the data key of a segment.
    pub fn unwrap_key(&self, segment_id: u64, provider: &dyn KeyProvider) -> Result<Option<Dek>> {
        let Some(e) = self.entries.get(&segment_id) else {
            return Ok(None);
        };
        match provider.unwrap(&e.wrapped, &dek_context(e.segment_id, e.dek_id))? {
            Some(k) => Ok(Some(k)),
            None => Err(Error::corruption(
                &self.path,
                0,
                CorruptionKind::AuthenticationFailed,
            )),
        }
    }

    /// Writes the keystore crash-safely (temp file, fsync, rename, fsync dir) under a new
    /// generation number.
    pub fn persist(&mut self, fs: &dyn FileSystem, provider: &dyn KeyProvider) -> Result<()> {
        let Some(audit_key) = &self.audit_key else {
            // Recovery gives every keystore its audit key before the first write.
            return Err(Error::corruption(
                &self.path,
                0,
                CorruptionKind::BadField {
                    field: "keystore audit key (missing)",
                    value: 0,
                },
            ));
        };
        let generation = self.generation + 1;
        let meta_key = Dek::generate()?;
        let mut img = KeystoreImage {
            version: FORMAT_VERSION,
            generation,
            next_segment_id: self.next_segment_id,
            kek_id: provider.kek_id(),
            entries: self.entries.values().cloned().collect(),
            meta_wrapped_key: provider.wrap(&meta_key, META_CONTEXT)?,
            meta_sealed: vec![0; META_SEALED_LEN],
        };
        let mut meta = KeystoreMeta {
            id_floor: self.id_floor,
            time_floor_ms: self.time_floor_ms,
            audit: self.audit_anchor,
            audit_key: Some(*audit_key.expose()),
        };
        let mut plain = Zeroizing::new(fmt::encode_meta(&meta));
        meta.audit_key.zeroize();
        // The meta key is fresh for every write, so the fixed nonce is never reused.
        let tag = SealKey::new(&meta_key).seal([0; 12], &img.meta_aad(), &mut plain[..]);
        img.meta_sealed[..META_PLAIN_LEN].copy_from_slice(&plain[..]);
        img.meta_sealed[META_PLAIN_LEN..].copy_from_slice(&tag);
        fsutil::replace_file(fs, &self.path, &img.encode())?;
        self.generation = generation;
        self.meta_wrapped = img.meta_wrapped_key;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, sealed_len: u64, wrapped: u8) -> KeyEntry {
        KeyEntry {
            segment_id: id,
            dek_id: id,
            kek_id: 7,
            sealed_len,
            wrapped: vec![wrapped; 8],
        }
    }

    #[test]
    fn a_rewrap_is_installed_over_a_sealed_length_recorded_meanwhile() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ks = KeyStore::new_empty(tmp.path()).unwrap();
        ks.entries.insert(1, entry(1, 0, 1));
        ks.entries.insert(2, entry(2, 0, 2));
        let before: BTreeMap<u64, KeyEntry> = ks.entries.clone();
        // With the lock dropped: segment 1 is sealed (its length recorded), segment 2
        // is re-wrapped by someone else.
        ks.mark_sealed(1, 4096);
        ks.entries.get_mut(&2).unwrap().wrapped = vec![9; 8];
        let after: BTreeMap<u64, KeyEntry> = [(1, entry(1, 0, 11)), (2, entry(2, 0, 12))]
            .into_iter()
            .collect();
        let replaced = ks.replace_wrapped(&before, &after);
        assert_eq!(replaced.len(), 1);
        let one = &ks.entries[&1];
        assert_eq!(
            (one.wrapped[0], one.sealed_len),
            (11, 4096),
            "new wrap, length kept"
        );
        assert_eq!(
            ks.entries[&2].wrapped[0], 9,
            "a key re-wrapped meanwhile is left alone"
        );
        // Undone as it was: the length recorded meanwhile stays.
        ks.restore(replaced);
        assert_eq!(
            (ks.entries[&1].wrapped[0], ks.entries[&1].sealed_len),
            (1, 4096)
        );
    }
}
