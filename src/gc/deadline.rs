//! The shred deadline's arithmetic: every interval the engine derives from
//! `max_shred_delay` (D), in one place. engine-format.md ("Deadline arithmetic") states
//! the same numbers; `format::doc_consts` checks that they agree.
//!
//! The bound it guarantees without faults: a record dies at t; its segment is closed by
//! t + D/4 at the latest if it was still being written (`ACTIVE_AGE_DIV`); a closed
//! segment with a dead record is compacted from t + 3D/4 (`DUE_NUM`/`DUE_DEN`), checked
//! every tick (at most D/4, `TICK_DIV`), and the original is shredded in the same pass.
//! So its key is gone by t + 3D/4 + one tick ≤ t + D. A compaction that fails for a reason
//! that passes is retried after `D/64`, doubling up to `D/8` (`RETRY_*`).

use std::time::Duration;

/// Active segments are closed once this fraction of D old: D / 4.
pub const ACTIVE_AGE_DIV: u64 = 4;
/// A closed segment is compacted DUE_NUM/DUE_DEN of D after its first death.
pub const DUE_NUM: u64 = 3;
pub const DUE_DEN: u64 = 4;
/// A mostly dead segment is compacted for space once no ack reached it for D / 8,
/// clamped to 100 ms ..= 5 s.
pub const SETTLE_DIV: u64 = 8;
pub const SETTLE_MIN_MS: u64 = 100;
pub const SETTLE_MAX_MS: u64 = 5_000;
/// Background maintenance runs every D / 4, clamped to 10 ms ..= 1 s.
pub const TICK_DIV: u64 = 4;
pub const TICK_MIN_MS: u64 = 10;
pub const TICK_MAX_MS: u64 = 1_000;
/// A failed compaction is retried after D / 64, doubling, at most D / 8 (10 ms at least).
pub const RETRY_BASE_DIV: u64 = 64;
pub const RETRY_CAP_DIV: u64 = 8;
pub const RETRY_MIN_MS: u64 = 10;
/// Expiry buckets are at most D / 2 wide, so a segment whose first message expires is
/// fully expired within D / 2 (shredded whole, uncopied).
pub const BUCKET_WIDTH_DIV: u64 = 2;

/// The intervals for one `max_shred_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub max_shred_delay_ms: u64,
}

impl Deadline {
    pub fn new(max_shred_delay: Duration) -> Self {
        Deadline {
            max_shred_delay_ms: (max_shred_delay.as_millis() as u64).max(1),
        }
    }

    /// Age at which an active segment is closed (so it can be shredded or compacted).
    pub fn active_age_ms(self) -> u64 {
        (self.max_shred_delay_ms / ACTIVE_AGE_DIV).max(1)
    }

    /// Time from a segment's first death to its compaction for the deadline.
    pub fn compaction_due_after_ms(self) -> u64 {
        self.max_shred_delay_ms / DUE_DEN * DUE_NUM
    }

    /// How long a mostly dead segment must go without acks before it is compacted for
    /// space.
    pub fn settle_ms(self) -> u64 {
        (self.max_shred_delay_ms / SETTLE_DIV).clamp(SETTLE_MIN_MS, SETTLE_MAX_MS)
    }

    /// The background threads' tick.
    pub fn tick(self) -> Duration {
        let ms = (self.max_shred_delay_ms / TICK_DIV).clamp(TICK_MIN_MS, TICK_MAX_MS);
        Duration::from_millis(ms)
    }

    /// The wait before the `n`-th retry (1-based) of a compaction that failed.
    pub fn retry_backoff_ms(self, n: u32) -> u64 {
        let base = self.max_shred_delay_ms / RETRY_BASE_DIV;
        let cap = self.max_shred_delay_ms / RETRY_CAP_DIV;
        base.saturating_mul(1 << n.saturating_sub(1).min(20))
            .min(cap)
            .max(RETRY_MIN_MS)
    }

    /// The widest expiry bucket.
    pub fn bucket_width_cap_ms(self) -> u64 {
        (self.max_shred_delay_ms / BUCKET_WIDTH_DIV).max(1)
    }

    /// The latest a dead record's key is destroyed after its death, without faults:
    /// compaction due, plus one tick for the pass that does it.
    #[cfg(test)]
    pub fn worst_case_ms(self) -> u64 {
        self.compaction_due_after_ms() + self.tick().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_case_meets_the_deadline_for_every_deadline_from_40_ms() {
        for ms in (40..2_000).chain((2_000..400_000).step_by(997)) {
            let d = Deadline {
                max_shred_delay_ms: ms,
            };
            assert!(d.worst_case_ms() <= ms, "{ms}: {}", d.worst_case_ms());
            assert!(d.active_age_ms() <= ms / 4 + 1);
        }
    }

    #[test]
    fn retries_back_off_within_a_quarter_of_the_deadline() {
        let d = Deadline::new(Duration::from_secs(60));
        let waits: Vec<u64> = (1..=6).map(|n| d.retry_backoff_ms(n)).collect();
        assert_eq!(waits, [937, 1874, 3748, 7496, 7500, 7500]);
        assert!(waits[..4].iter().sum::<u64>() <= 60_000 / 4);
        assert_eq!(
            Deadline::new(Duration::from_millis(100)).retry_backoff_ms(1),
            10
        );
        assert_eq!(d.retry_backoff_ms(u32::MAX), 7_500);
    }

    #[test]
    fn intervals_for_the_default_deadline() {
        let d = Deadline::new(Duration::from_secs(60));
        assert_eq!(d.active_age_ms(), 15_000);
        assert_eq!(d.compaction_due_after_ms(), 45_000);
        assert_eq!(d.settle_ms(), 5_000);
        assert_eq!(d.tick(), Duration::from_secs(1));
        assert_eq!(d.bucket_width_cap_ms(), 30_000);
        assert_eq!(d.worst_case_ms(), 46_000);
    }
}
