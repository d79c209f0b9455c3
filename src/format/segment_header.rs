//! The 64-byte header at the start of every segment file.

use super::{check_preamble, get_u32, get_u64, FormatError};
use crate::error::CorruptionKind;

pub const MAGIC: [u8; 8] = *b"CINDRSEG";
pub const HEADER_LEN: usize = 64;
const VERSION_AT: usize = 8;
const HEADER_LEN_AT: usize = 12;
const SEGMENT_ID_AT: usize = 16;
const DEK_ID_AT: usize = 24;
const KEK_ID_AT: usize = 32;
const RESERVED_AT: usize = 40;
const CRC_AT: usize = 60;

/// The plaintext header of a segment: framing only, no secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The format version it was written in (`FORMAT_VERSION` for new segments; version-2
    /// segments have the same layout).
    pub version: u32,
    pub segment_id: u64,
    /// Id of the data key that seals this segment's records (its keystore entry).
    pub dek_id: u64,
    /// Id (fingerprint) of the key-encryption key that wraps the data key.
    pub kek_id: u64,
}

impl SegmentHeader {
    pub const fn serialized_len() -> usize {
        HEADER_LEN
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[VERSION_AT..VERSION_AT + 4].copy_from_slice(&self.version.to_le_bytes());
        b[HEADER_LEN_AT..HEADER_LEN_AT + 4].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[SEGMENT_ID_AT..SEGMENT_ID_AT + 8].copy_from_slice(&self.segment_id.to_le_bytes());
        b[DEK_ID_AT..DEK_ID_AT + 8].copy_from_slice(&self.dek_id.to_le_bytes());
        b[KEK_ID_AT..KEK_ID_AT + 8].copy_from_slice(&self.kek_id.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header. Checks run in an order that never does
    /// arithmetic with an unvalidated field.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let version = check_preamble(buf, MAGIC, HEADER_LEN, CRC_AT)?;
        let len = get_u32(buf, HEADER_LEN_AT);
        if len as usize != HEADER_LEN {
            return Err(FormatError::at(
                HEADER_LEN_AT,
                CorruptionKind::BadField {
                    field: "segment header length",
                    value: u64::from(len),
                },
            ));
        }
        if buf[RESERVED_AT..CRC_AT].iter().any(|&b| b != 0) {
            return Err(FormatError::at(
                RESERVED_AT,
                CorruptionKind::BadField {
                    field: "reserved header bytes",
                    value: 1,
                },
            ));
        }
        Ok(SegmentHeader {
            version,
            segment_id: get_u64(buf, SEGMENT_ID_AT),
            dek_id: get_u64(buf, DEK_ID_AT),
            kek_id: get_u64(buf, KEK_ID_AT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::FORMAT_VERSION;

    fn sample() -> SegmentHeader {
        SegmentHeader {
            version: FORMAT_VERSION,
            segment_id: 7,
            dek_id: 7,
            kek_id: 0xdead_beef,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(b.len(), SegmentHeader::serialized_len());
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let b = sample().encode();
        for i in 0..HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x40;
            assert!(SegmentHeader::decode(&c).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn truncated_and_newer_version() {
        let b = sample().encode();
        assert!(matches!(
            SegmentHeader::decode(&b[..10]),
            Err(FormatError::Corrupt {
                kind: CorruptionKind::Truncated { .. },
                ..
            })
        ));
        let mut c = b;
        c[VERSION_AT] = (FORMAT_VERSION + 1) as u8;
        let crc = crc32fast::hash(&c[..CRC_AT]);
        c[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SegmentHeader::decode(&c),
            Err(FormatError::Version {
                expected: FORMAT_VERSION,
                got
            }) if got == FORMAT_VERSION + 1
        ));
    }

    #[test]
    fn a_version_2_header_is_read_and_encodes_back_to_its_bytes() {
        let mut h = sample();
        h.version = 2;
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        assert_eq!(SegmentHeader::decode(&b).unwrap().encode(), b);
    }
}
