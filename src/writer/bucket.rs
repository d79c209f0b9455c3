//! Expiry buckets: messages that expire close together share a segment, so that expiry
//! shreds whole segments without copying. Survivors of compaction (long-lived messages)
//! get buckets of their own generation, so they are not mixed with fresh traffic and not
//! copied again and again.

/// A window of expiry times, `[index << width_log2, (index + 1) << width_log2)` ms, in
/// one generation (0: appended messages, 1: compaction survivors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bucket {
    pub generation: u8,
    pub width_log2: u8,
    pub index: u64,
}

/// Narrowest window: about 1 s.
const MIN_WIDTH_LOG2: u32 = 10;
/// Widest window: about 70 minutes.
const MAX_WIDTH_LOG2: u32 = 22;

impl Bucket {
    /// The bucket of a message with this TTL and expiry. The window is about a sixteenth
    /// of the TTL (a power of two, between ~1 s and ~70 min), and at most half of
    /// `max_shred_delay_ms`: when the first message of a segment expires, all of it has
    /// expired within half the shred deadline, so expiry alone shreds it, uncopied.
    pub fn for_message(
        generation: u8,
        ttl_ms: u64,
        expires_at_ms: u64,
        max_shred_delay_ms: u64,
    ) -> Self {
        let cap = crate::gc::deadline::Deadline { max_shred_delay_ms }
            .bucket_width_cap_ms()
            .ilog2()
            .clamp(MIN_WIDTH_LOG2, MAX_WIDTH_LOG2);
        let log = (ttl_ms / 16).max(1).ilog2().clamp(MIN_WIDTH_LOG2, cap);
        Bucket {
            generation,
            width_log2: log as u8,
            index: expires_at_ms >> log,
        }
    }

    /// The end of the window (exclusive).
    #[cfg(test)]
    pub fn end_ms(&self) -> u64 {
        (self.index + 1) << self.width_log2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn widths_follow_ttl_and_the_shred_deadline() {
        let short = Bucket::for_message(0, 10_000, 1_000_000, HOUR);
        assert_eq!(short.width_log2, 10);
        let long = Bucket::for_message(0, 30 * 86_400_000, 1_000_000, 24 * HOUR);
        assert_eq!(long.width_log2, 22);
        let capped = Bucket::for_message(0, 30 * 86_400_000, 1_000_000, 60_000);
        assert!(
            1u64 << capped.width_log2 <= 30_000,
            "window wider than half the deadline"
        );
        let b = Bucket::for_message(1, 60_000, 123_456, HOUR);
        assert!(b.end_ms() > 123_456 && b.end_ms() - 123_456 <= 1 << b.width_log2);
        assert_ne!(b, Bucket::for_message(0, 60_000, 123_456, HOUR));
    }
}
