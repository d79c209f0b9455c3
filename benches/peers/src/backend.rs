//! What every backend offers the workload, and the checks run on its data dir.

use std::collections::HashSet;
use std::path::Path;

pub type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Length of a ciphertext sample searched for after the acks.
pub const SAMPLE_LEN: usize = 16;
pub type Sample = [u8; SAMPLE_LEN];

/// One message to enqueue. `seq` is the message's place in its queue (the peers' key);
/// cinder assigns its own ids and ignores it.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    pub queue: u32,
    pub seq: u64,
    pub payload: &'a [u8],
}

/// Durability a backend is opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every `put`/`delete` call is one commit, durable (fsynced) when it returns.
    Sync,
    /// The backend's no-sync mode: commits reach the OS, no fsync.
    NoSync,
}

pub trait Backend: Send + Sync {
    /// Stores every message of `batch` in one commit; returns a handle per message
    /// (the peers' seq, cinder's message id) for `delete`.
    fn put(&self, batch: &[Msg<'_>]) -> R<Vec<u64>>;
    /// The first `max` messages of `queue` in FIFO order, decrypted:
    /// `f(handle, plaintext)`. Returns how many.
    fn scan(&self, queue: u32, max: usize, f: &mut dyn FnMut(u64, &[u8])) -> R<usize>;
    /// Every message of `queue` in FIFO order, decrypted.
    fn drain(&self, queue: u32, f: &mut dyn FnMut(u64, &[u8])) -> R<()> {
        self.scan(queue, usize::MAX, f).map(drop)
    }
    /// The oldest message of `queue`, decrypted, if any.
    fn head(&self, queue: u32, f: &mut dyn FnMut(u64, &[u8])) -> R<bool> {
        Ok(self.scan(queue, 1, f)? == 1)
    }
    /// Deletes each message individually, all in one commit.
    fn delete(&self, batch: &[(u32, u64)]) -> R<()>;
    /// Forces whatever flush and compaction the backend offers (phase D); says what ran.
    fn settle(&self) -> R<String>;
    /// Every `every`-th stored ciphertext, SAMPLE_LEN bytes of it, as it lies on disk.
    fn samples(&self, every: usize) -> R<Vec<Sample>>;
    /// Whether a key that opens the sampled records (now deleted) still exists.
    fn deleted_key_exists(&self) -> R<bool>;
    /// Bytes of files still being written (cinder: the active segment and the spare
    /// one, preallocated to the segment size). Zero for the peers.
    fn active_bytes(&self) -> R<u64> {
        Ok(0)
    }
}

/// Key of a peer record: queue then seq, big-endian, so that byte order is FIFO order.
pub fn record_key(queue: u32, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&queue.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn parse_key(k: &[u8]) -> R<(u32, u64)> {
    if k.len() != 12 {
        return Err(format!("record key of {} bytes", k.len()).into());
    }
    Ok((
        u32::from_be_bytes(k[..4].try_into()?),
        u64::from_be_bytes(k[4..].try_into()?),
    ))
}

/// Takes a sample from a stored value that starts with its nonce.
pub fn sample_of(stored: &[u8]) -> Option<Sample> {
    stored.get(12..12 + SAMPLE_LEN)?.try_into().ok()
}

/// Sum of the sizes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> R<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = match e.metadata() {
            Ok(m) => m,
            // Removed since the listing (a shredded segment, a renamed temp file).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if m.is_dir() {
            total += dir_bytes(&e.path())?;
        } else {
            total += m.len();
        }
    }
    Ok(total)
}

/// How many of `samples` occur anywhere in the files under `dir`.
pub fn samples_found(dir: &Path, samples: &[Sample]) -> R<usize> {
    let set: HashSet<Sample> = samples.iter().copied().collect();
    // A 64 Ki-bit filter on the first two bytes keeps the hash lookups rare.
    let mut first2 = vec![false; 1 << 16];
    for s in samples {
        first2[usize::from(u16::from_le_bytes([s[0], s[1]]))] = true;
    }
    let mut found = HashSet::new();
    scan(dir, &set, &first2, &mut found)?;
    Ok(found.len())
}

fn scan(dir: &Path, set: &HashSet<Sample>, first2: &[bool], found: &mut HashSet<Sample>) -> R<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            scan(&e.path(), set, first2, found)?;
            continue;
        }
        let data = match std::fs::read(e.path()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if data.len() < SAMPLE_LEN {
            continue;
        }
        for i in 0..=data.len() - SAMPLE_LEN {
            if first2[usize::from(u16::from_le_bytes([data[i], data[i + 1]]))] {
                let w: Sample = data[i..i + SAMPLE_LEN].try_into()?;
                if set.contains(&w) {
                    found.insert(w);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_a_planted_sample_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 10_000];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let planted: Sample = core::array::from_fn(|i| 200 + i as u8);
        data[5000..5016].copy_from_slice(&planted);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), &data).unwrap();
        let absent: Sample = [9; SAMPLE_LEN];
        assert_eq!(samples_found(dir.path(), &[planted, absent]).unwrap(), 1);
        assert_eq!(samples_found(dir.path(), &[absent]).unwrap(), 0);
        assert_eq!(dir_bytes(dir.path()).unwrap(), 10_000);
    }
}
