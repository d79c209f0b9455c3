//! Expiry buckets: messages that expire close together share a segment, so that expiry
//! shreds whole segments without copying.

/// A window of expiry times: `[index << width_log2, (index + 1) << width_log2)` ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bucket {
    pub width_log2: u8,
    pub index: u64,
}

/// Narrowest window: about 1 s.
const MIN_WIDTH_LOG2: u32 = 10;
/// Widest window: about 70 minutes.
const MAX_WIDTH_LOG2: u32 = 22;

impl Bucket {
    /// The bucket of a message with this TTL and expiry. The window is about a sixteenth
    /// of the TTL (a power of two, between ~1 s and ~70 min), so a segment's messages
    /// expire within that window of each other.
    pub fn for_message(ttl_ms: u64, expires_at_ms: u64) -> Self {
        let log = (ttl_ms / 16)
            .max(1)
            .ilog2()
            .clamp(MIN_WIDTH_LOG2, MAX_WIDTH_LOG2);
        Bucket {
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

    #[test]
    fn widths_follow_ttl() {
        let short = Bucket::for_message(10_000, 1_000_000);
        assert_eq!(short.width_log2, 10);
        let long = Bucket::for_message(30 * 86_400_000, 1_000_000);
        assert_eq!(long.width_log2, 22);
        let b = Bucket::for_message(60_000, 123_456);
        assert!(b.end_ms() > 123_456 && b.end_ms() - 123_456 <= 1 << b.width_log2);
    }
}
