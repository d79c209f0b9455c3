//! The key audit log on disk: opened and checked against the keystore's anchor at
//! open, appended to (and fsynced) before the keystore that vouches for the new records
//! is written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{CorruptionKind, Error, Result};
use crate::format::audit::{self as fmt, AuditEvent, HEADER_LEN, RECORD_LEN};
use crate::format::FormatError;
use crate::fsutil;
use crate::options::RecoveryMode;
use crate::vfs::FileSystem;

/// File name of the key audit log inside the data dir.
pub const FILE_NAME: &str = "KEYS.audit";

/// One key event to record: (event, subject, key id).
pub type Event = (AuditEvent, u64, u64);

/// The open key audit log.
#[derive(Debug)]
pub struct KeyAudit {
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
    file: File,
    records: u64,
    head: [u8; 32],
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditOpen {
    /// Bytes of a torn last record cut off (a crash inside an append).
    pub torn_tail_cut: usize,
    /// The log was created now (new data dir, or a store from format version 2).
    pub created: bool,
    /// Time of the last master-key rotation recorded, or of the first record.
    pub last_rotation_ms: Option<u64>,
}

impl KeyAudit {
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Opens (or creates) the log and checks it: every record chains, and the log
    /// reaches the keystore's anchor (`None`: the keystore predates the log).
    pub fn open(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
        anchor: Option<(u64, [u8; 32])>,
        mode: RecoveryMode,
    ) -> Result<(Self, AuditOpen)> {
        let path = Self::path_in(dir);
        let bytes = match fs.read(&path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("read key audit log", &path, e)),
        };
        let mut found = AuditOpen::default();
        let anchored = anchor.map_or(0, |a| a.0);
        // No log, or one too short to hold its header (a creation cut short), while the
        // keystore vouches for no record: start a new one.
        let bytes = bytes.filter(|b| b.len() >= HEADER_LEN || anchored > 0);
        let Some(bytes) = bytes else {
            if anchored > 0 {
                return Err(Error::corruption(
                    &path,
                    0,
                    CorruptionKind::AuditLogBehindKeystore {
                        records: 0,
                        anchored,
                    },
                ));
            }
            found.created = true;
            return Ok((Self::create(fs, path)?, found));
        };
        let log = match fmt::decode_log(&bytes) {
            Ok(l) => l,
            // Damage past the records the keystore vouches for is an append a crash cut
            // short (after power loss its pages may land out of order): cut it there.
            Err(FormatError::Corrupt { offset, .. })
                if mode == RecoveryMode::TolerateTornTail
                    && offset >= (HEADER_LEN + anchored as usize * RECORD_LEN) as u64 =>
            {
                let whole = (offset as usize - HEADER_LEN) / RECORD_LEN;
                let keep = HEADER_LEN + whole * RECORD_LEN;
                let mut l = fmt::decode_log(&bytes[..keep]).map_err(|e| e.into_error(&path, 0))?;
                l.torn_tail = bytes.len() - keep;
                l
            }
            Err(e) => return Err(e.into_error(&path, 0)),
        };
        let records = log.records.len() as u64;
        if let Some(a @ (n, _)) = anchor {
            if !log.reaches(a) {
                return Err(Error::corruption(
                    &path,
                    0,
                    CorruptionKind::AuditLogBehindKeystore {
                        records,
                        anchored: n,
                    },
                ));
            }
        }
        let file = fs
            .open(&path)
            .map_err(|e| Error::io("open key audit log", &path, e))?;
        if log.torn_tail > 0 {
            if mode == RecoveryMode::Strict {
                let end = (HEADER_LEN as u64) + records * RECORD_LEN as u64;
                return Err(Error::corruption(
                    &path,
                    end,
                    CorruptionKind::Truncated {
                        needed: RECORD_LEN as u64,
                        available: log.torn_tail as u64,
                    },
                ));
            }
            fs.set_len(
                &file,
                &path,
                HEADER_LEN as u64 + records * RECORD_LEN as u64,
            )
            .and_then(|()| fs.sync_all(&file, &path))
            .map_err(|e| Error::io("cut torn key audit record", &path, e))?;
            found.torn_tail_cut = log.torn_tail;
        }
        found.last_rotation_ms = log
            .records
            .iter()
            .rev()
            .find(|r| r.event == AuditEvent::MasterKeyRotated)
            .or(log.records.first())
            .map(|r| r.time_ms);
        let head = log.head();
        Ok((
            KeyAudit {
                fs: Arc::clone(fs),
                path,
                file,
                records,
                head,
            },
            found,
        ))
    }

    /// A new, empty log, created whole by one rename: a crash never leaves a header-less
    /// log behind.
    fn create(fs: &Arc<dyn FileSystem>, path: PathBuf) -> Result<Self> {
        fsutil::replace_file(&**fs, &path, &fmt::encode_header())?;
        let file = fs
            .open(&path)
            .map_err(|e| Error::io("open key audit log", &path, e))?;
        Ok(KeyAudit {
            fs: Arc::clone(fs),
            path,
            file,
            records: 0,
            head: [0; 32],
        })
    }

    /// Appends `events` (time `now_ms`) and fsyncs them.
    pub fn append(&mut self, events: &[Event], now_ms: u64) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(events.len() * RECORD_LEN);
        let mut head = self.head;
        for (i, &(event, subject, key_id)) in events.iter().enumerate() {
            let r = fmt::encode_record(
                &head,
                self.records + i as u64,
                now_ms,
                event,
                subject,
                key_id,
            );
            head.copy_from_slice(&r[RECORD_LEN - 32..]);
            buf.extend_from_slice(&r);
        }
        let at = HEADER_LEN as u64 + self.records * RECORD_LEN as u64;
        if let Err(e) = self
            .fs
            .write_at(&self.file, &self.path, &buf, at)
            .and_then(|()| self.fs.sync_data(&self.file, &self.path))
        {
            // Leave no partial records behind for a later, shorter append to sit in
            // front of (best effort: recovery cuts an unvouched tail anyway).
            let _ = self.fs.set_len(&self.file, &self.path, at);
            return Err(Error::io("append to key audit log", &self.path, e));
        }
        self.records += events.len() as u64;
        self.head = head;
        Ok(())
    }

    /// (record count, last hash): what the keystore vouches for.
    pub fn anchor(&self) -> (u64, [u8; 32]) {
        (self.records, self.head)
    }
}
