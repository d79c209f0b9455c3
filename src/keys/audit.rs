//! The key audit log on disk: opened and checked against the keystore at open (its
//! anchor, its generation, the audit key), appended to (and fsynced) before the keystore
//! that vouches for the new records is written. Also the upgrade of a version-1 log
//! (unkeyed), which is archived as `KEYS.audit.v1` and continued by a new keyed log.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::Dek;
use crate::error::{CorruptionKind, Error, Result};
use crate::format::audit::{
    self as fmt, v1, AuditEvent, AuditLog, RecordFields, HEADER_LEN, RECORD_LEN,
};
use crate::format::FormatError;
use crate::fsutil;
use crate::options::RecoveryMode;
use crate::vfs::FileSystem;

/// File name of the key audit log inside the data dir.
pub const FILE_NAME: &str = "KEYS.audit";
/// File name of a version-1 log archived at the upgrade to a keyed one.
pub const ARCHIVE_V1: &str = "KEYS.audit.v1";

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
    key: Arc<Dek>,
}

/// What the keystore says the log must be.
#[derive(Debug)]
pub struct AuditCheck<'a> {
    /// (record count, last mac) the keystore vouches for (`None`: a version-2 keystore).
    pub anchor: Option<(u64, [u8; 32])>,
    /// The keystore's generation.
    pub generation: u64,
    /// The audit key (from the keystore, or new at an upgrade).
    pub key: &'a Arc<Dek>,
    /// The keystore had no audit key (format version 3 or earlier): the log in place is
    /// a version-1 one, archived now and continued by a new log under `key`.
    pub upgrade: bool,
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditOpen {
    /// Bytes of a torn last record cut off (a crash inside an append), or of records
    /// past the anchor that do not verify.
    pub torn_tail_cut: usize,
    /// The log was created now (new data dir, or a store from format version 2).
    pub created: bool,
    /// A version-1 log was archived and a keyed one started (format version 3 or
    /// earlier).
    pub upgraded: bool,
    /// Time of the last master-key rotation recorded, or of the first record.
    pub last_rotation_ms: Option<u64>,
}

fn read_opt(fs: &dyn FileSystem, path: &Path) -> Result<Option<Vec<u8>>> {
    match fs.read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read key audit log", path, e)),
    }
}

fn behind(path: &Path, records: u64, anchored: u64) -> Error {
    Error::corruption(
        path,
        0,
        CorruptionKind::AuditLogBehindKeystore { records, anchored },
    )
}

/// Decodes a log, cutting damage past the `anchored` records (an append a crash cut
/// short, whose pages may land out of order after a power loss; or records that do not
/// verify) in `TolerateTornTail` mode; any other damage is an error. Returns the log
/// (its `torn_tail`: bytes to cut) and the length to keep.
fn decode_cut(
    path: &Path,
    bytes: &[u8],
    (header, record): (usize, usize),
    anchored: u64,
    mode: RecoveryMode,
    decode: impl Fn(&[u8]) -> std::result::Result<AuditLog, FormatError>,
) -> Result<AuditLog> {
    let log = match decode(bytes) {
        Ok(l) => l,
        Err(FormatError::Corrupt { offset, .. })
            if mode == RecoveryMode::TolerateTornTail
                && offset >= (header + anchored as usize * record) as u64 =>
        {
            let whole = (offset as usize - header) / record;
            let keep = header + whole * record;
            let mut l = decode(&bytes[..keep]).map_err(|e| e.into_error(path, 0))?;
            l.torn_tail = bytes.len() - keep;
            l
        }
        Err(e) => return Err(e.into_error(path, 0)),
    };
    if log.torn_tail > 0 && mode == RecoveryMode::Strict {
        let end = bytes.len() - log.torn_tail;
        return Err(Error::corruption(
            path,
            end as u64,
            CorruptionKind::Truncated {
                needed: record as u64,
                available: log.torn_tail as u64,
            },
        ));
    }
    Ok(log)
}

/// The latest keystore write a version-2 log (decoded without its key, so structure
/// only) has records of.
fn last_generation(bytes: &[u8]) -> Option<u64> {
    fmt::decode_log(bytes, None)
        .ok()
        .and_then(|l| l.records.last().map(|r| r.generation))
}

/// Time of the last rotation in the archived version-1 log, if it ends where `end`
/// (the keyed log's header) says.
fn archived_rotation(fs: &Arc<dyn FileSystem>, dir: &Path, end: (u64, [u8; 32])) -> Option<u64> {
    let bytes = read_opt(&**fs, &dir.join(ARCHIVE_V1)).ok().flatten()?;
    let old = v1::decode_log(&bytes).ok()?;
    (old.records.len() as u64 == end.0 && old.reaches(end))
        .then(|| last_rotation(&old.records))
        .flatten()
}

/// Time of the last rotation among `records`, or of the first one.
fn last_rotation(records: &[fmt::AuditRecord]) -> Option<u64> {
    records
        .iter()
        .rev()
        .find(|r| r.event == AuditEvent::MasterKeyRotated)
        .or(records.first())
        .map(|r| r.time_ms)
}

impl KeyAudit {
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Opens (or creates, or upgrades) the log and checks it against the keystore:
    /// every record verifies under the audit key and chains; the log reaches the anchor;
    /// and no record claims a keystore write two or more past the keystore's (a keystore
    /// rolled back alone).
    pub fn open(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
        check: &AuditCheck<'_>,
        mode: RecoveryMode,
    ) -> Result<(Self, AuditOpen)> {
        let path = Self::path_in(dir);
        let bytes = read_opt(&**fs, &path)?;
        if check.upgrade {
            return Self::upgrade(fs, dir, bytes, check, mode);
        }
        let mut found = AuditOpen::default();
        let anchored = check.anchor.map_or(0, |a| a.0);
        // No log, or one too short to hold its header (a creation cut short), while the
        // keystore vouches for no record: start a new one.
        let bytes = bytes.filter(|b| b.len() >= HEADER_LEN || anchored > 0);
        let Some(bytes) = bytes else {
            if anchored > 0 {
                return Err(behind(&path, 0, anchored));
            }
            found.created = true;
            return Ok((Self::create(fs, path, (0, [0; 32]), check.key)?, found));
        };
        let key = check.key.expose();
        let log = decode_cut(
            &path,
            &bytes,
            (HEADER_LEN, RECORD_LEN),
            anchored,
            mode,
            |b| fmt::decode_log(b, Some(key)),
        )?;
        let records = log.records.len() as u64;
        if let Some(a) = check.anchor {
            if !log.reaches(a) {
                return Err(behind(&path, records, anchored));
            }
        }
        // Records are appended before the keystore write they name, and a record of
        // write g+2 only after write g+1 succeeded: such a record next to a keystore at
        // g means the keystore was put back to an older copy.
        if let Some((i, r)) = log
            .records
            .iter()
            .enumerate()
            .find(|(_, r)| r.generation >= check.generation.saturating_add(2))
        {
            return Err(Error::corruption(
                &path,
                (HEADER_LEN + i * RECORD_LEN + 40) as u64,
                CorruptionKind::KeystoreRolledBack {
                    generation: check.generation,
                    log_generation: r.generation,
                },
            ));
        }
        let file = fs
            .open(&path)
            .map_err(|e| Error::io("open key audit log", &path, e))?;
        if log.torn_tail > 0 {
            fs.set_len(
                &file,
                &path,
                HEADER_LEN as u64 + records * RECORD_LEN as u64,
            )
            .and_then(|()| fs.sync_all(&file, &path))
            .map_err(|e| Error::io("cut torn key audit record", &path, e))?;
            found.torn_tail_cut = log.torn_tail;
        }
        let rotated = log
            .records
            .iter()
            .any(|r| r.event == AuditEvent::MasterKeyRotated);
        found.last_rotation_ms = if !rotated && log.predecessor.0 > 0 {
            // No rotation since the upgrade: the last one is in the archived log (which
            // holds only what the keystore vouched for, and ends where the header says).
            archived_rotation(fs, dir, log.predecessor).or_else(|| last_rotation(&log.records))
        } else {
            last_rotation(&log.records)
        };
        let head = log.head();
        Ok((
            KeyAudit {
                fs: Arc::clone(fs),
                path,
                file,
                records,
                head,
                key: Arc::clone(check.key),
            },
            found,
        ))
    }

    /// The upgrade from a keystore without an audit key: the version-1 log in place is
    /// checked against the anchor and archived as `KEYS.audit.v1` (by one rename), then
    /// a new keyed log continuing it is put in place. A crash after the archive and
    /// before the keystore write that keeps the new key leaves a version-2 log nothing
    /// can verify (its key was lost): it is replaced again, from the archive.
    fn upgrade(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
        bytes: Option<Vec<u8>>,
        check: &AuditCheck<'_>,
        mode: RecoveryMode,
    ) -> Result<(Self, AuditOpen)> {
        let path = Self::path_in(dir);
        let archive = dir.join(ARCHIVE_V1);
        let anchored = check.anchor.map_or(0, |a| a.0);
        let v1_sizes = (v1::HEADER_LEN, v1::RECORD_LEN);
        let mut found = AuditOpen {
            upgraded: true,
            ..AuditOpen::default()
        };
        let version = bytes.as_deref().and_then(fmt::log_version);
        // The macs of a version-2 log found here cannot be checked (its key went with
        // the crash that interrupted the upgrade), its generations can: an interrupted
        // upgrade leaves records of the one write after the keystore's, a keystore put
        // back to a pre-upgrade copy records of more.
        if let Some(g) = bytes
            .as_deref()
            .filter(|_| version == Some(2))
            .and_then(last_generation)
            .filter(|&g| g >= check.generation.saturating_add(2))
        {
            return Err(Error::corruption(
                &path,
                0,
                CorruptionKind::KeystoreRolledBack {
                    generation: check.generation,
                    log_generation: g,
                },
            ));
        }
        let old = match (version, bytes) {
            (Some(1), Some(b)) => {
                let mut log = decode_cut(&path, &b, v1_sizes, anchored, mode, v1::decode_log)?;
                // Only what the keystore vouches for is archived: records past the anchor
                // of an unkeyed log cannot be told from forgeries.
                let vouched = (anchored as usize).min(log.records.len());
                log.records.truncate(vouched);
                let keep = v1::HEADER_LEN + vouched * v1::RECORD_LEN;
                found.torn_tail_cut = b.len() - keep;
                fsutil::replace_file(&**fs, &archive, &b[..keep])?;
                Some(log)
            }
            // A version-2 log, or none (or a header-less one): an upgrade a crash cut
            // short after archiving, or a store that never had a log.
            (None | Some(2), _) => match read_opt(&**fs, &archive)? {
                Some(a) => Some(decode_cut(
                    &archive,
                    &a,
                    v1_sizes,
                    anchored,
                    RecoveryMode::Strict,
                    v1::decode_log,
                )?),
                None if anchored > 0 => return Err(behind(&path, 0, anchored)),
                None => {
                    found.created = true;
                    None
                }
            },
            (Some(got), _) => {
                return Err(Error::UnsupportedVersion {
                    file: path,
                    expected: fmt::AUDIT_VERSION,
                    got,
                })
            }
        };
        let predecessor = match &old {
            Some(log) => {
                if let Some(a) = check.anchor {
                    if !log.reaches(a) {
                        return Err(behind(&archive, log.records.len() as u64, anchored));
                    }
                }
                found.last_rotation_ms = last_rotation(&log.records);
                (log.records.len() as u64, log.head())
            }
            None => (0, [0; 32]),
        };
        Ok((Self::create(fs, path, predecessor, check.key)?, found))
    }

    /// A new, empty log, created whole by one rename: a crash never leaves a header-less
    /// log behind.
    fn create(
        fs: &Arc<dyn FileSystem>,
        path: PathBuf,
        predecessor: (u64, [u8; 32]),
        key: &Arc<Dek>,
    ) -> Result<Self> {
        let header = fmt::encode_header(predecessor);
        fsutil::replace_file(&**fs, &path, &header)?;
        let file = fs
            .open(&path)
            .map_err(|e| Error::io("open key audit log", &path, e))?;
        Ok(KeyAudit {
            fs: Arc::clone(fs),
            path,
            file,
            records: 0,
            head: fmt::chain_start(key.expose(), &header),
            key: Arc::clone(key),
        })
    }

    /// Appends the records of keystore write `generation` (time `now_ms`) and fsyncs
    /// them: `events`, or a "keystore written" record if there are none, so that every
    /// keystore write leaves a trace a rolled-back keystore can be checked against.
    pub fn append(&mut self, events: &[Event], now_ms: u64, generation: u64) -> Result<()> {
        let written = [(AuditEvent::KeystoreWritten, generation, 0)];
        let events = if events.is_empty() { &written } else { events };
        let mut buf = Vec::with_capacity(events.len() * RECORD_LEN);
        let mut head = self.head;
        let key = self.key.expose();
        for (i, &(event, subject, key_id)) in events.iter().enumerate() {
            let f = RecordFields {
                seq: self.records + i as u64,
                time_ms: now_ms,
                event,
                subject,
                key_id,
                generation,
            };
            let r = fmt::encode_record(key, &head, &f);
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

    /// (record count, last mac): what the keystore vouches for.
    pub fn anchor(&self) -> (u64, [u8; 32]) {
        (self.records, self.head)
    }
}
