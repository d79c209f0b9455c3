//! `SegmentHeader::decode` on arbitrary bytes. Whatever it accepts must be exactly the
//! canonical 64-byte encoding of what it returns (every byte of the header is either a
//! checked constant, the CRC, or one of the three ids), and re-encoding must round-trip.
#![no_main]

use cinder::format::segment_header::{SegmentHeader, HEADER_LEN};
use cinder::format::{FormatError, FORMAT_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match SegmentHeader::decode(data) {
        Ok(h) => {
            assert!(data.len() >= HEADER_LEN);
            let enc = h.encode();
            assert_eq!(enc.len(), SegmentHeader::serialized_len());
            assert_eq!(
                &enc[..],
                &data[..HEADER_LEN],
                "accepted a non-canonical header"
            );
            assert_eq!(SegmentHeader::decode(&enc), Ok(h));
            // Trailing bytes (the frames) never change the header.
            assert_eq!(SegmentHeader::decode(&data[..HEADER_LEN]), Ok(h));
        }
        Err(FormatError::Corrupt { offset, .. }) => {
            assert!(
                offset < HEADER_LEN as u64,
                "error offset {offset} outside the header"
            );
        }
        Err(FormatError::Version { expected, got }) => {
            assert_eq!(expected, FORMAT_VERSION);
            assert_ne!(got, FORMAT_VERSION);
        }
    }
});
