//! # cinder
//!
//! An embedded storage engine for encrypted, ephemeral messages: the queue of undelivered
//! messages inside a relay server. A message lives on disk only until its recipient acks
//! it or it expires. Every record is sealed with ChaCha20-Poly1305 under its segment's own
//! data key; deletion destroys keys (crypto-shredding), while the ack itself is O(1).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use cinder::{FileKeyProvider, Options, Store};
//!
//! let key = FileKeyProvider::open_or_create("/etc/cinder/master.key", true)?;
//! let store = Store::open("/var/lib/cinder", Options::new(Arc::new(key)))?;
//! let id = store.append(b"alice", b"hello", Duration::from_secs(3600))?;
//! let page = store.read(b"alice", None, 100)?;
//! assert_eq!(page[0].payload, b"hello");
//! assert!(store.ack(b"alice", id)?);
//! # Ok::<(), cinder::Error>(())
//! ```
//!
//! See `engine-format.md` for the on-disk format and the guarantees it supports.

mod audit;
pub mod crypto;
mod error;
pub mod format;
mod fsutil;
mod gc;
mod health;
mod index;
pub mod keys;
mod options;
mod recovery;
mod segment;
mod store;
mod subscription;
pub mod vfs;
mod writer;

pub use audit::{
    inspect, key_audit_log, key_status, verify, Finding, InspectReport, KeyAuditLog, KeyStatus,
    KeystoreInfo, MasterKeyStatus, QueueSummary, SegmentInfo, VerifyReport,
};
pub use error::{CorruptionKind, Error, FailureCause, HsmFailure, Result};
pub use format::audit::{AuditEvent, AuditRecord};
pub use format::padding::Padding;
pub use health::Health;
pub use keys::{
    FileKeyProvider, KeyProvider, PinSource, Pkcs11Config, Pkcs11KeyProvider, RotationReport,
};
pub use options::{
    AutoRotation, Clock, CoreDumps, Durability, ManualClock, Options, RecoveryMode, SystemClock,
};
pub use recovery::RecoveryReport;
pub use store::{Appended, ClientMessageId, Message, MessageId, NewMessage, Stats, Store};
pub use subscription::Subscription;
