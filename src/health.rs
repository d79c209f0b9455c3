//! Whether the store can take appends now: [`Health`], from [`Store::health`].
//!
//! [`Store::health`]: crate::Store::health

use crate::error::FailureCause;

/// What [`Store::health`](crate::Store::health) says about appends. A relay's health
/// check reports anything but `Ok` as degraded, so a balancer sends elsewhere while
/// appends would fail. Reads and acks keep working in every state but `Failed` and
/// `Closed`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Appends of any allowed size can be taken.
    Ok,
    /// The segment files occupy `used` bytes of the `quota` (`Options::max_disk_bytes`):
    /// a message of the largest allowed size would be refused (`DiskQuotaExceeded`)
    /// until acks, expiry and compaction free space.
    DiskQuotaReached { used: u64, quota: u64 },
    /// The disk (or the user's disk quota) refused the last segment the store needed:
    /// appends and acks that need a new segment fail with `DiskFull` until space frees
    /// (the store retries by itself).
    DiskFull,
    /// The writer stopped after a failed write or fsync (`WriterFailed`): every write
    /// fails until the store is reopened.
    Failed { reason: String, cause: FailureCause },
    /// The store is closed.
    Closed,
}

impl Health {
    pub fn is_ok(&self) -> bool {
        matches!(self, Health::Ok)
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Ok => f.write_str("ok"),
            Health::DiskQuotaReached { used, quota } => write!(
                f,
                "disk quota reached: the segment files occupy {used} of {quota} bytes"
            ),
            Health::DiskFull => {
                f.write_str("disk full: the last segment the store needed was refused")
            }
            Health::Failed { reason, .. } => {
                write!(f, "the writer stopped ({reason}); reopen the store")
            }
            Health::Closed => f.write_str("closed"),
        }
    }
}
