//! One segment: an append-only file of sealed frames under its own data key, with the
//! counters that decide when it can be shredded.

pub mod codec;
mod mmap;
pub mod scan;
mod table;

pub(crate) use mmap::map_sealed;
pub use table::SegmentTable;

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;
use parking_lot::Mutex;

use crate::crypto::{Dek, SealKey};
use crate::error::{Error, Result};
use crate::format::segment_header::{SegmentHeader, HEADER_LEN};
use crate::fsutil;
use crate::vfs::FileSystem;

/// File name of segment `id`.
pub fn file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// Parses a segment file name back to its id.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Ack links between segments. An ack segment must outlive every segment holding a
/// message it acks, or the acked messages would come back at the next recovery.
#[derive(Debug, Default)]
pub struct Links {
    /// Live segments holding messages acked by records in this segment.
    pub ack_targets: HashSet<u64>,
    /// Segments holding ack records for messages in this segment.
    pub ack_sources: HashSet<u64>,
    /// Segments that hold compaction copies of records of this one, or the originals of
    /// copies in this one: both are durable copies of the same messages, so an ack
    /// record for a message in one must also protect the other.
    pub copies: HashSet<u64>,
}

/// A segment file with its key and counters.
pub struct Segment {
    pub id: u64,
    pub path: PathBuf,
    pub key: SealKey,
    fs: Arc<dyn FileSystem>,
    file: File,
    map: OnceLock<Mmap>,
    /// End of the complete frames handed to the OS.
    pub written: AtomicU64,
    /// End of the frames known to be on stable storage.
    pub durable: AtomicU64,
    /// Message records that are neither acked nor removed as expired.
    pub live: AtomicU64,
    /// Message records in the segment.
    pub records: AtomicU64,
    /// Latest expiry of any message in the segment (0 if none).
    pub max_expiry_ms: AtomicU64,
    /// Clock reading when the first message was added (u64::MAX if none).
    pub first_ms: AtomicU64,
    /// Earliest expiry of any message in the segment (u64::MAX if none).
    pub min_expiry_ms: AtomicU64,
    /// When the first of its messages was acked or purged (u64::MAX if none yet).
    pub first_ack_ms: AtomicU64,
    /// When the latest ack into this segment was applied (0 = none).
    pub last_ack_ms: AtomicU64,
    /// A compaction is copying its live messages out.
    pub compacting: AtomicBool,
    /// A compaction failed on a record that does not open: not retried (reported).
    pub uncompactable: AtomicBool,
    /// Compactions of it that failed for a reason that may pass (disk full, the key
    /// provider, the writer's backlog) in a row, and when the next may start (clock ms).
    pub compact_failures: std::sync::atomic::AtomicU32,
    pub compact_retry_at_ms: AtomicU64,
    /// Never written again: sealed, or found at recovery.
    pub closed: AtomicBool,
    /// The segment holds ack records.
    pub has_acks: AtomicBool,
    pub shredded: AtomicBool,
    pub links: Mutex<Links>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("written", &self.written)
            .field("live", &self.live)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Segment {
    fn new(
        fs: Arc<dyn FileSystem>,
        (id, path): (u64, PathBuf),
        dek: &Dek,
        file: File,
        len: u64,
    ) -> Self {
        Segment {
            id,
            path,
            key: SealKey::new(dek),
            fs,
            file,
            map: OnceLock::new(),
            written: AtomicU64::new(len),
            durable: AtomicU64::new(len),
            live: AtomicU64::new(0),
            records: AtomicU64::new(0),
            max_expiry_ms: AtomicU64::new(0),
            first_ms: AtomicU64::new(u64::MAX),
            min_expiry_ms: AtomicU64::new(u64::MAX),
            first_ack_ms: AtomicU64::new(u64::MAX),
            last_ack_ms: AtomicU64::new(0),
            compacting: AtomicBool::new(false),
            uncompactable: AtomicBool::new(false),
            compact_failures: std::sync::atomic::AtomicU32::new(0),
            compact_retry_at_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            has_acks: AtomicBool::new(false),
            shredded: AtomicBool::new(false),
            links: Mutex::new(Links::default()),
        }
    }

    /// Creates a new segment file (mode 0600) with its header, preallocated to
    /// `prealloc` bytes so that a full disk shows up here and not in the middle of a
    /// frame. The file is built under a temporary name and renamed into place once its
    /// header is durable, so a crash never leaves a segment file without a valid header.
    pub fn create(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
        (id, kek_id): (u64, u64),
        dek: &Dek,
        prealloc: u64,
    ) -> Result<Self> {
        let path = dir.join(file_name(id));
        let tmp = fsutil::tmp_path(&path);
        let file = fsutil::create_temp(&**fs, &tmp)?;
        let res = (|| {
            fs.allocate(&file, &tmp, prealloc)
                .map_err(|e| Error::io("preallocate segment", &tmp, e))?;
            let h = SegmentHeader {
                version: crate::format::FORMAT_VERSION,
                segment_id: id,
                dek_id: id,
                kek_id,
            };
            fs.write_at(&file, &tmp, &h.encode(), 0)
                .and_then(|()| fs.sync_all(&file, &tmp))
                .map_err(|e| Error::io("write segment header", &tmp, e))?;
            fs.rename(&tmp, &path)
                .map_err(|e| Error::io("rename segment", &path, e))?;
            fsutil::sync_dir(&**fs, dir)
        })();
        if let Err(e) = res {
            drop(file);
            let _ = fs.remove_file(&tmp);
            if path.exists() {
                let _ = fs.remove_file(&path);
            }
            return Err(e);
        }
        Ok(Self::new(
            Arc::clone(fs),
            (id, path),
            dek,
            file,
            HEADER_LEN as u64,
        ))
    }

    /// Writes zeros over the preallocated data area and makes them durable, so that the
    /// blocks are written ones (not "unwritten" extents) before frames go there. Only
    /// for a new, empty segment that nothing writes yet; the content is the same zeros
    /// the preallocation reads as, so a crash part way leaves a valid empty segment.
    pub fn zero_fill(&self) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let io = |e| Error::io("zero-fill segment", &self.path, e);
        let end = self.file.metadata().map_err(io)?.len();
        let zeros = vec![0u8; CHUNK];
        let mut at = self.written.load(Ordering::SeqCst);
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            self.fs
                .write_at(&self.file, &self.path, &zeros[..n], at)
                .map_err(io)?;
            at += n as u64;
        }
        self.fs.sync_data(&self.file, &self.path).map_err(io)
    }

    /// Wraps an existing segment found at recovery. It is closed (never written again
    /// but for recovery's seal); recovery maps it once its length is final.
    pub fn open_recovered(
        fs: Arc<dyn FileSystem>,
        (id, path): (u64, PathBuf),
        dek: &Dek,
        file: File,
    ) -> Self {
        let s = Self::new(fs, (id, path), dek, file, 0);
        s.closed.store(true, Ordering::SeqCst);
        s
    }

    /// Writes bytes at `offset` (writer thread only).
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> Result<()> {
        self.fs
            .write_at(&self.file, &self.path, bytes, offset)
            .map_err(|e| Error::io("write segment", &self.path, e))
    }

    /// fdatasync.
    pub fn sync(&self) -> Result<()> {
        self.fs
            .sync_data(&self.file, &self.path)
            .map_err(|e| Error::io("fsync segment", &self.path, e))
    }

    /// Cuts the preallocated tail after sealing (writer thread only).
    pub fn truncate(&self, len: u64) -> Result<()> {
        self.fs
            .set_len(&self.file, &self.path, len)
            .map_err(|e| Error::io("truncate segment", &self.path, e))
    }

    /// Maps the (now immutable) segment for reads.
    pub fn map_for_reading(&self) -> Result<()> {
        if self.map.get().is_none() {
            let m = self
                .fs
                .map(&self.file, &self.path)
                .map_err(|e| Error::io("mmap segment", &self.path, e))?;
            let _ = self.map.set(m);
        }
        Ok(())
    }

    /// The mapped bytes, once sealed.
    pub fn mapped(&self) -> Option<&[u8]> {
        self.map.get().map(|m| &m[..])
    }

    /// Copies `len` bytes at `offset` (which must be below `written`).
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if let Some(m) = self.mapped() {
            let start = offset as usize;
            if let Some(b) = m.get(start..start + len) {
                return Ok(b.to_vec());
            }
        }
        let mut buf = vec![0u8; len];
        self.fs
            .read_at(&self.file, &self.path, &mut buf, offset)
            .map_err(|e| Error::io("read segment", &self.path, e))?;
        Ok(buf)
    }

    /// Unlinks the file (its key is already gone from the keystore). Durable once the
    /// directory is fsynced.
    pub fn unlink(&self) -> Result<()> {
        match self.fs.remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove shredded segment", &self.path, e)),
        }
    }

    /// Counts a new message placed in this segment.
    pub fn add_message(&self, expires_at_ms: u64, now_ms: u64) {
        self.live.fetch_add(1, Ordering::SeqCst);
        self.records.fetch_add(1, Ordering::SeqCst);
        self.max_expiry_ms
            .fetch_max(expires_at_ms, Ordering::SeqCst);
        self.min_expiry_ms
            .fetch_min(expires_at_ms, Ordering::SeqCst);
        self.first_ms.fetch_min(now_ms, Ordering::SeqCst);
    }

    /// Records that some of its messages were acked at `now_ms`.
    pub fn mark_acked(&self, now_ms: u64) {
        self.first_ack_ms.fetch_min(now_ms, Ordering::SeqCst);
        self.last_ack_ms.fetch_max(now_ms, Ordering::SeqCst);
    }

    /// When the first record of this segment died (acked, or expired by `now_ms`), if
    /// one has: the start of its shred deadline.
    pub fn first_death_ms(&self, now_ms: u64) -> Option<u64> {
        let acked = self.first_ack_ms.load(Ordering::SeqCst);
        let exp = self.min_expiry_ms.load(Ordering::SeqCst);
        let exp = if exp <= now_ms { exp } else { u64::MAX };
        let d = acked.min(exp);
        (d != u64::MAX).then_some(d)
    }

    /// Counts messages that died (acked, purged, expired).
    pub fn dec_live(&self, n: u64) {
        let _ = self
            .live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Bytes of the file that hold data (preallocated space not counted).
    pub fn data_len(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&file_name(0xab)), Some(0xab));
        assert_eq!(parse_file_name("00000000000000AB.seg"), None);
        assert_eq!(parse_file_name("xyz.seg"), None);
        assert_eq!(parse_file_name("00000000000000ab.tmp"), None);
    }
}
