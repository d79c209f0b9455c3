//! The one error type of the engine.

use std::path::PathBuf;

/// Result alias used throughout cinder.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with a corrupt file. Carried by [`Error::Corruption`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CorruptionKind {
    /// The file does not start with cinder's magic bytes.
    BadMagic,
    /// A CRC-32 over a header or frame does not match.
    ChecksumMismatch { expected: u32, got: u32 },
    /// An AEAD tag did not verify: the bytes were changed, moved, swapped or replayed,
    /// or were sealed under another key.
    AuthenticationFailed,
    /// The file ends inside a structure.
    Truncated { needed: u64, available: u64 },
    /// A field holds a value the format does not allow.
    BadField { field: &'static str, value: u64 },
    /// The segment's header names another segment than its file name.
    SegmentIdMismatch { expected: u64, got: u64 },
    /// A sealed segment does not end with the seal written when it was closed.
    MissingSeal,
    /// The keystore has no key for a segment newer than every segment it knows:
    /// the keystore is an older copy than the segments.
    StaleKeystore {
        segment_id: u64,
        next_segment_id: u64,
    },
    /// Segment files exist but the keystore does not.
    MissingKeystore,
    /// The keystore holds the key of a sealed segment whose file is missing: the file
    /// was lost or deleted after it was sealed (an interrupted creation never has a
    /// sealed length). Its messages, or the ack records that keep acked messages dead,
    /// are gone; restore the file, or open with `RecoveryMode::SalvageMissingSegments`.
    SegmentMissing { segment_id: u64, sealed_len: u64 },
    /// A key audit log record does not chain to the one before it: it, or one before
    /// it, was edited, removed, inserted or moved.
    AuditChainBroken { seq: u64 },
    /// The key audit log holds fewer records than the keystore vouches for, or its record
    /// at that point hashes differently: records were removed from its end, or it was
    /// replaced by another log.
    AuditLogBehindKeystore { records: u64, anchored: u64 },
    /// The key audit log holds records written before keystore write `log_generation`,
    /// which can only be appended after write `log_generation - 1` succeeded, but the
    /// keystore is at `generation`, two or more writes behind: the keystore was
    /// replaced by an older copy (which may hold keys shredded since).
    KeystoreRolledBack {
        generation: u64,
        log_generation: u64,
    },
}

impl std::fmt::Display for CorruptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadMagic => write!(f, "bad magic bytes (not a cinder file)"),
            Self::ChecksumMismatch { expected, got } => {
                write!(f, "checksum mismatch (expected {expected:#010x}, got {got:#010x})")
            }
            Self::AuthenticationFailed => write!(
                f,
                "authentication failed (the bytes were altered, moved, replayed, or sealed under another key)"
            ),
            Self::Truncated { needed, available } => {
                write!(f, "truncated ({needed} bytes needed, {available} available)")
            }
            Self::BadField { field, value } => write!(f, "invalid {field} ({value})"),
            Self::SegmentIdMismatch { expected, got } => {
                write!(f, "segment id mismatch (file name says {expected}, header says {got})")
            }
            Self::MissingSeal => write!(f, "sealed segment has no valid seal at its end"),
            Self::StaleKeystore { segment_id, next_segment_id } => write!(
                f,
                "keystore is older than the segments: segment {segment_id} has no key and is not below the keystore's next segment id {next_segment_id}"
            ),
            Self::MissingKeystore => write!(f, "segment files exist but the keystore file is missing"),
            Self::SegmentMissing { segment_id, sealed_len } => write!(
                f,
                "segment {segment_id} was sealed at {sealed_len} bytes but its file is missing (lost or deleted); restore it, or open with RecoveryMode::SalvageMissingSegments to drop it and take the loss (acked messages may come back)"
            ),
            Self::AuditChainBroken { seq } => write!(
                f,
                "key audit log chain broken at record {seq} (a record was edited, removed, inserted or moved)"
            ),
            Self::AuditLogBehindKeystore { records, anchored } => write!(
                f,
                "key audit log does not match the keystore: it has {records} records, the keystore vouches for {anchored} ending in a hash the log does not have there (records removed or the log replaced)"
            ),
            Self::KeystoreRolledBack { generation, log_generation } => write!(
                f,
                "the keystore was rolled back: it is write {generation}, but the key audit log has records of write {log_generation} (an older copy of KEYS was put in place; it may hold keys shredded since)"
            ),
        }
    }
}

/// Every error cinder returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("I/O error during {op} on {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The device holding the data dir has no space left. Nothing already stored is harmed;
    /// free space and retry.
    #[error("disk full while writing {}; free space and retry", path.display())]
    DiskFull { path: PathBuf },
    /// Another process or another `Store` in this process has the data dir open.
    #[error("data dir {} is locked by another open store; close it first", dir.display())]
    Locked { dir: PathBuf },
    /// Queue ids are 1..=255 bytes long.
    #[error("invalid queue id: length {len}, must be 1..=255 bytes")]
    InvalidQueueId { len: usize },
    /// A payload is over `Options::max_message_size`.
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    /// A TTL is zero or over `Options::max_ttl`.
    #[error("invalid TTL of {ttl_ms} ms: must be between 1 ms and {max_ms} ms")]
    InvalidTtl { ttl_ms: u128, max_ms: u128 },
    /// The queue already holds `Options::max_queue_len` messages.
    #[error("queue is full: {len} messages, quota {max}")]
    QueueFull { len: u64, max: u64 },
    /// The queue's stored bytes (frames) would exceed `Options::max_queue_bytes`.
    #[error("queue byte quota exceeded: {bytes} bytes stored + {adding} > quota {max}")]
    QueueBytesExceeded { bytes: u64, adding: u64, max: u64 },
    /// The data dir would exceed `Options::max_disk_bytes`.
    #[error("disk quota exceeded: {used} bytes used + {adding} > quota {quota}")]
    DiskQuotaExceeded { used: u64, adding: u64, quota: u64 },
    /// The key provider's key-encryption key is not the one the keystore was written with.
    #[error("wrong master key: the keystore was written under key {expected:016x}, the provider holds key {got:016x}")]
    WrongMasterKey { expected: u64, got: u64 },
    /// The HSM (PKCS#11 provider) failed: which way, and the module's own words.
    #[error("HSM: {kind}: {detail}")]
    Hsm { kind: HsmFailure, detail: String },
    /// A key backup could not be used: not a backup, another version, out-of-bounds
    /// parameters, or a passphrase too short to seal one.
    #[error("invalid key backup: {0}")]
    InvalidBackup(String),
    /// A key backup did not open: the passphrase is wrong (or the backup was altered).
    #[error("the key backup does not open with this passphrase (wrong passphrase, or the backup was altered)")]
    WrongPassphrase,
    /// The master key file does not exist (and `create_if_missing` was not set).
    #[error("master key file {} does not exist; create it with create_if_missing or restore it", path.display())]
    KeyFileMissing { path: PathBuf },
    /// The master key file is readable by group or others.
    #[error("master key file {} has mode {mode:o}; it must not be readable by group or others (chmod 600)", path.display())]
    KeyFileInsecure { path: PathBuf, mode: u32 },
    /// A file holding a secret (a passphrase, an HSM PIN) is readable by group or others.
    #[error("secret file {} has mode {mode:o}; it must not be readable by group or others (chmod 600)", path.display())]
    SecretFileInsecure { path: PathBuf, mode: u32 },
    /// The master key file is not 32 bytes.
    #[error("master key file {} is invalid: {reason}", path.display())]
    KeyFileInvalid { path: PathBuf, reason: String },
    /// A key file inside the data dir would be stolen together with the data.
    #[error("master key file {} is inside the data dir; keep it elsewhere (or set allow_key_in_data_dir)", path.display())]
    KeyFileInsideDataDir { path: PathBuf },
    /// The key provider failed to wrap or unwrap a key.
    #[error("key provider error: {0}")]
    KeyProvider(String),
    /// A file is corrupt, truncated or tampered with.
    #[error("corruption in {} at offset {offset}: {kind}", file.display())]
    Corruption {
        file: PathBuf,
        offset: u64,
        kind: CorruptionKind,
    },
    /// A file was written by a newer (or unknown) format version of cinder.
    #[error("{} has format version {got}, this build reads version {expected}; upgrade cinder", file.display())]
    UnsupportedVersion {
        file: PathBuf,
        expected: u32,
        got: u32,
    },
    /// The options are inconsistent.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// A write or fsync failed earlier; the store stops accepting writes
    /// (the page cache may have dropped data). Reopen the store to recover; `cause` says
    /// whether the device was full (free space first) or failed.
    #[error(
        "the store stopped accepting writes after an I/O failure ({reason}); reopen it to recover"
    )]
    WriterFailed { reason: String, cause: FailureCause },
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        // ENOSPC (the device is full) and EDQUOT (the user's quota is): no space.
        if matches!(source.raw_os_error(), Some(28 | 122)) {
            return Error::DiskFull { path };
        }
        Error::Io { op, path, source }
    }

    /// The same error again, for every caller a refusal must reach (`io::Error` is not
    /// `Clone`: an I/O error keeps its kind, operation and path, and its message).
    pub(crate) fn replicate(&self) -> Self {
        match self {
            Error::DiskFull { path } => Error::DiskFull { path: path.clone() },
            Error::DiskQuotaExceeded {
                used,
                adding,
                quota,
            } => Error::DiskQuotaExceeded {
                used: *used,
                adding: *adding,
                quota: *quota,
            },
            Error::Io { op, path, source } => Error::Io {
                op,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Hsm { kind, detail } => Error::Hsm {
                kind: *kind,
                detail: detail.clone(),
            },
            Error::KeyProvider(s) => Error::KeyProvider(s.clone()),
            e => Error::WriterFailed {
                reason: e.to_string(),
                cause: FailureCause::of(e),
            },
        }
    }

    pub(crate) fn corruption(file: impl Into<PathBuf>, offset: u64, kind: CorruptionKind) -> Self {
        Error::Corruption {
            file: file.into(),
            offset,
            kind,
        }
    }
}

/// What stopped a store from accepting writes ([`Error::WriterFailed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureCause {
    /// The device (or the user's quota) was full when a write had to land.
    DiskFull,
    /// A write or an fsync failed (EIO, ...): what it covered may be lost.
    Io,
    /// A bug or a panic inside cinder (never an I/O result).
    Internal,
}

impl FailureCause {
    /// The cause an error stands for when it stops the writer.
    pub(crate) fn of(e: &Error) -> Self {
        match e {
            Error::DiskFull { .. } | Error::DiskQuotaExceeded { .. } => FailureCause::DiskFull,
            Error::Io { .. } => FailureCause::Io,
            Error::WriterFailed { cause, .. } => *cause,
            _ => FailureCause::Internal,
        }
    }
}

/// How an HSM call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmFailure {
    /// The PKCS#11 module could not be loaded or initialised.
    Module,
    /// No token with the configured label.
    TokenNotFound,
    /// The PIN was refused (or could not be read).
    WrongPin,
    /// The session or the token went away (reopened once automatically).
    SessionLost,
    /// An epoch key is gone from the token: what it wrapped is shredded for good.
    EpochKeyDestroyed,
    /// Any other failure of a PKCS#11 call.
    Operation,
}

impl std::fmt::Display for HsmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Module => "module not loadable",
            Self::TokenNotFound => "token not found",
            Self::WrongPin => "PIN refused",
            Self::SessionLost => "session lost",
            Self::EpochKeyDestroyed => "epoch key destroyed",
            Self::Operation => "operation failed",
        })
    }
}
