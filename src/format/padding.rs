//! Size padding of message bodies: hides a payload's exact length at rest.
//!
//! A padded body's plaintext is the payload, one `0x80` byte, then zeros up to the padded
//! length (ISO/IEC 7816-4); the frame's flag bit 0 says the body is padded, and the flag is
//! part of the associated data, so it cannot be flipped unnoticed.

use super::frame::{MAX_BODY_LEN, TAG_LEN};

/// How message bodies are padded (`Options::padding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// No padding: the frame shows the payload's exact length.
    #[default]
    None,
    /// To the next power of two (at least 64 bytes): at most 2x the payload, hides all
    /// but the bucket.
    PowerOfTwo,
    /// Padmé (Nikitin et al., 2019): at most ~12% overhead, leaks O(log log n) bits.
    Padme,
}

/// The body plaintext length for a payload of `len` bytes: `len` unpadded, else room for
/// the payload and the `0x80` marker, rounded up per `p` (capped at the format's limit).
pub fn padded_len(p: Padding, len: usize) -> usize {
    let max = MAX_BODY_LEN - TAG_LEN;
    let l = len + 1;
    let out = match p {
        Padding::None => return len,
        Padding::PowerOfTwo => l.next_power_of_two().max(64),
        Padding::Padme => padme(l),
    };
    out.min(max).max(l)
}

/// Padmé: keeps the top ⌊log2 E⌋+1 bits of the length's exponent-sized mantissa.
fn padme(l: usize) -> usize {
    if l < 2 {
        return l;
    }
    let e = usize::BITS - 1 - l.leading_zeros(); // ⌊log2 l⌋ (a u32)
    let s = u32::BITS - e.leading_zeros(); // ⌊log2 e⌋ + 1
    let last_bits = e - s;
    let mask = (1usize << last_bits) - 1;
    (l + mask) & !mask
}

/// Writes the padding (marker and zeros) after the payload in `body[len..]`.
pub fn pad(body: &mut [u8], len: usize) {
    body[len] = 0x80;
    body[len + 1..].fill(0);
}

/// The payload length of a padded body plaintext: before the last `0x80`, which only
/// zeros may follow. `None` if the padding is malformed.
pub fn unpadded_len(body: &[u8]) -> Option<usize> {
    let end = body.iter().rposition(|&b| b != 0)?;
    (body[end] == 0x80).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_and_bound_the_overhead() {
        for len in (0..5000).chain([65_535, 65_536, 1 << 20, (1 << 20) + 7]) {
            for p in [Padding::PowerOfTwo, Padding::Padme] {
                let n = padded_len(p, len);
                assert!(n > len, "{p:?} {len}");
                let mut body = vec![0xff; n];
                body[..len].fill(7);
                pad(&mut body, len);
                assert_eq!(unpadded_len(&body), Some(len), "{p:?} {len}");
            }
            assert_eq!(padded_len(Padding::None, len), len);
            let pm = padded_len(Padding::Padme, len);
            if len >= 256 {
                assert!(
                    (pm as f64) <= (len + 1) as f64 * 1.12,
                    "Padmé overhead at {len}: {pm}"
                );
            }
            assert!(padded_len(Padding::PowerOfTwo, len).is_power_of_two());
        }
        // Padmé leaves few distinct sizes: all of 1000..1100 land in very few buckets.
        let mut b: Vec<usize> = (1000..1100)
            .map(|l| padded_len(Padding::Padme, l))
            .collect();
        b.dedup();
        assert!(b.len() <= 4, "{b:?}");
    }

    #[test]
    fn malformed_padding_is_refused() {
        assert_eq!(unpadded_len(&[1, 2, 0, 0]), None);
        assert_eq!(unpadded_len(&[0, 0, 0]), None);
        assert_eq!(unpadded_len(&[5, 0x80, 0, 0]), Some(1));
        // The largest payload a padded frame can hold fills the body exactly.
        let top = MAX_BODY_LEN - TAG_LEN - 1;
        for p in [Padding::PowerOfTwo, Padding::Padme] {
            assert_eq!(padded_len(p, top), MAX_BODY_LEN - TAG_LEN);
        }
    }
}
