//! Pure byte encoding and decoding of every on-disk structure. No I/O, no key state:
//! this is what the fuzz targets hit. `engine-format.md` documents each layout; the
//! `doc_consts` test below checks that the documented sizes match these constants.

pub mod audit;
pub mod frame;
pub mod keystore;
pub mod padding;
pub mod segment_header;

use crate::error::CorruptionKind;

/// The on-disk format version this build writes. Version 3 added the key audit log's
/// anchor to the keystore's sealed meta block; version 4 added the audit log's key to it
/// (and keyed the log's chain); version 5 lets a message's meta end in a client message
/// id (idempotent appends). The keystore is laid out as in version 4.
pub const FORMAT_VERSION: u32 = 5;
/// The oldest format version this build still reads (and rewrites as the current one).
pub const MIN_READ_VERSION: u32 = 2;

/// A decode failure, relative to the start of the decoded buffer.
/// Callers add the file name and absolute offset to make an [`crate::Error::Corruption`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Structural damage at `offset` (relative to the buffer passed in).
    Corrupt { offset: u64, kind: CorruptionKind },
    /// The structure has a format version this build does not read.
    Version { expected: u32, got: u32 },
}

impl FormatError {
    pub(crate) fn at(offset: usize, kind: CorruptionKind) -> Self {
        FormatError::Corrupt {
            offset: offset as u64,
            kind,
        }
    }

    /// The same failure, `by` bytes further into the file.
    pub(crate) fn shifted(self, by: usize) -> Self {
        match self {
            FormatError::Corrupt { offset, kind } => FormatError::Corrupt {
                offset: offset + by as u64,
                kind,
            },
            v @ FormatError::Version { .. } => v,
        }
    }

    /// Turns a relative decode failure into a typed engine error.
    pub(crate) fn into_error(self, file: &std::path::Path, base: u64) -> crate::Error {
        match self {
            FormatError::Corrupt { offset, kind } => {
                crate::Error::corruption(file, base + offset, kind)
            }
            FormatError::Version { expected, got } => crate::Error::UnsupportedVersion {
                file: file.to_path_buf(),
                expected,
                got,
            },
        }
    }
}

pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn need(buf: &[u8], at: usize, len: usize) -> Result<(), FormatError> {
    if buf.len() < at.saturating_add(len) {
        return Err(FormatError::at(
            at,
            CorruptionKind::Truncated {
                needed: len as u64,
                available: buf.len().saturating_sub(at) as u64,
            },
        ));
    }
    Ok(())
}

/// Checks the preamble every file header shares: length, magic (bytes 0..8), a CRC-32 of
/// bytes `0..crc_at` stored at `crc_at`, and the format version at bytes 8..12, which must
/// be one this build reads. Returns the version.
pub(crate) fn check_preamble(
    buf: &[u8],
    magic: [u8; 8],
    len: usize,
    crc_at: usize,
) -> Result<u32, FormatError> {
    need(buf, 0, len)?;
    if buf[..8] != magic {
        return Err(FormatError::at(0, CorruptionKind::BadMagic));
    }
    check_crc(&buf[..crc_at], get_u32(buf, crc_at), crc_at)?;
    let version = get_u32(buf, 8);
    if !(MIN_READ_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::Version {
            expected: FORMAT_VERSION,
            got: version,
        });
    }
    Ok(version)
}

pub(crate) fn check_crc(buf: &[u8], stored: u32, at: usize) -> Result<(), FormatError> {
    let got = crc32fast::hash(buf);
    if got != stored {
        return Err(FormatError::at(
            at,
            CorruptionKind::ChecksumMismatch {
                expected: stored,
                got,
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod doc_consts {
    //! Every size and offset written in `engine-format.md` must equal the code's const.
    use super::*;

    fn doc() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/engine-format.md")).unwrap()
    }

    fn documented(name: &str) -> u64 {
        // The doc states each constant as "`NAME` = value".
        let doc = doc();
        let needle = format!("`{name}` = ");
        let at = doc
            .find(&needle)
            .unwrap_or_else(|| panic!("{name} not documented"));
        let rest = &doc[at + needle.len()..];
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap();
        rest[..end].parse().unwrap()
    }

    #[test]
    fn documented_sizes_match_code() {
        assert_eq!(documented("FORMAT_VERSION"), u64::from(FORMAT_VERSION));
        assert_eq!(
            documented("SEGMENT_HEADER_LEN"),
            segment_header::HEADER_LEN as u64
        );
        assert_eq!(
            documented("FRAME_HEADER_LEN"),
            frame::FRAME_HEADER_LEN as u64
        );
        assert_eq!(documented("TAG_LEN"), frame::TAG_LEN as u64);
        assert_eq!(
            documented("MESSAGE_META_FIXED"),
            frame::MESSAGE_META_FIXED as u64
        );
        assert_eq!(documented("SEAL_META_LEN"), frame::SEAL_META_LEN as u64);
        assert_eq!(documented("CLIENT_ID_LEN"), frame::CLIENT_ID_LEN as u64);
        assert_eq!(
            documented("KEYSTORE_HEADER_LEN"),
            keystore::HEADER_LEN as u64
        );
        assert_eq!(
            documented("KEYSTORE_ENTRY_FIXED"),
            keystore::ENTRY_FIXED as u64
        );
        assert_eq!(
            documented("KEYSTORE_META_PLAIN"),
            keystore::META_PLAIN_LEN as u64
        );
        assert_eq!(documented("AAD_LEN"), frame::AAD_LEN as u64);
        assert_eq!(documented("AUDIT_RECORD_LEN"), audit::RECORD_LEN as u64);
        assert_eq!(documented("AUDIT_HEADER_LEN"), audit::HEADER_LEN as u64);
        assert_eq!(documented("AUDIT_KEY_LEN"), audit::AUDIT_KEY_LEN as u64);
        assert_eq!(documented("AUDIT_VERSION"), u64::from(audit::AUDIT_VERSION));
        assert_eq!(
            documented("PKCS11_WRAPPED_LEN"),
            crate::keys::pkcs11::WRAPPED_LEN as u64
        );
        assert_eq!(
            documented("BACKUP_LEN"),
            crate::keys::backup::BACKUP_LEN as u64
        );
        assert_eq!(documented("KEY_LEN"), crate::crypto::KEY_LEN as u64);
    }

    #[test]
    fn documented_versions_and_parts_match_code() {
        assert_eq!(
            documented("SEGMENT_VERSION_WRITTEN"),
            u64::from(FORMAT_VERSION)
        );
        assert_eq!(
            documented("SEGMENT_VERSION_MIN_READ"),
            u64::from(MIN_READ_VERSION)
        );
        assert_eq!(documented("PART_META"), frame::Part::Meta as u64);
        assert_eq!(documented("PART_BODY"), frame::Part::Body as u64);
        assert_eq!(documented("PART_SEAL"), frame::Part::Seal as u64);
        // The header the code writes carries the documented version.
        let h = segment_header::SegmentHeader {
            version: FORMAT_VERSION,
            segment_id: 1,
            dek_id: 1,
            kek_id: 2,
        };
        assert_eq!(
            u64::from(get_u32(&h.encode(), 8)),
            documented("SEGMENT_VERSION_WRITTEN")
        );
    }

    #[test]
    fn documented_deadline_arithmetic_matches_code() {
        use crate::gc::deadline as d;
        for (name, v) in [
            ("SHRED_ACTIVE_AGE_DIV", d::ACTIVE_AGE_DIV),
            ("SHRED_DUE_NUM", d::DUE_NUM),
            ("SHRED_DUE_DEN", d::DUE_DEN),
            ("SHRED_SETTLE_DIV", d::SETTLE_DIV),
            ("SHRED_SETTLE_MIN_MS", d::SETTLE_MIN_MS),
            ("SHRED_SETTLE_MAX_MS", d::SETTLE_MAX_MS),
            ("SHRED_TICK_DIV", d::TICK_DIV),
            ("SHRED_TICK_MIN_MS", d::TICK_MIN_MS),
            ("SHRED_TICK_MAX_MS", d::TICK_MAX_MS),
            ("SHRED_RETRY_BASE_DIV", d::RETRY_BASE_DIV),
            ("SHRED_RETRY_CAP_DIV", d::RETRY_CAP_DIV),
            ("SHRED_BUCKET_WIDTH_DIV", d::BUCKET_WIDTH_DIV),
        ] {
            assert_eq!(documented(name), v, "{name}");
        }
    }
}
