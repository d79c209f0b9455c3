//! The key audit log (`keys.audit`): every key event, append-only, each record chained to
//! the one before by a BLAKE3 hash. A record names a segment or epoch and a key id, never
//! a queue id or anything about messages.
//!
//! Layout: a 16-byte header (magic, version, zero), then fixed 72-byte records:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | seq (0, 1, 2, ...) |
//! | 8 | 8 | time, ms since the Unix epoch |
//! | 16 | 1 | event |
//! | 17 | 7 | zero |
//! | 24 | 8 | subject: segment id (DEK events), epoch id, or new KEK id (rotation) |
//! | 32 | 8 | key id: the KEK (or epoch key) involved |
//! | 40 | 32 | hash = BLAKE3("cinder-audit-v1" ‖ previous hash ‖ bytes 0..40) |
//!
//! The first record's previous hash is 32 zero bytes. Editing, removing or reordering a
//! record breaks the chain at that record; removing records from the end is caught by the
//! anchor (count and last hash) kept in the keystore's authenticated meta block.

use super::{get_u32, get_u64, need, FormatError};
use crate::error::CorruptionKind;

pub const MAGIC: [u8; 8] = *b"CINDRAUD";
pub const HEADER_LEN: usize = 16;
pub const RECORD_LEN: usize = 72;
pub const AUDIT_VERSION: u32 = 1;
const HASHED_LEN: usize = 40;
const DOMAIN: &[u8] = b"cinder-audit-v1";

/// A key event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuditEvent {
    /// A segment's data key was generated and wrapped (subject: segment id).
    DekCreated = 1,
    /// A data key was unwrapped when the store opened (subject: segment id).
    DekUnwrapped = 2,
    /// A data key was destroyed: its keystore entry removed (subject: segment id).
    DekShredded = 3,
    /// A data key was re-wrapped under a new master key (subject: segment id).
    DekRewrapped = 4,
    /// An epoch key was created in the HSM (subject: epoch id).
    EpochKeyCreated = 5,
    /// An epoch key was destroyed in the HSM (subject: epoch id).
    EpochKeyDestroyed = 6,
    /// The master key was rotated (subject: new KEK id; key id: the old one).
    MasterKeyRotated = 7,
}

impl AuditEvent {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::DekCreated,
            2 => Self::DekUnwrapped,
            3 => Self::DekShredded,
            4 => Self::DekRewrapped,
            5 => Self::EpochKeyCreated,
            6 => Self::EpochKeyDestroyed,
            7 => Self::MasterKeyRotated,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::DekCreated => "dek-created",
            Self::DekUnwrapped => "dek-unwrapped",
            Self::DekShredded => "dek-shredded",
            Self::DekRewrapped => "dek-rewrapped",
            Self::EpochKeyCreated => "epoch-key-created",
            Self::EpochKeyDestroyed => "epoch-key-destroyed",
            Self::MasterKeyRotated => "master-key-rotated",
        }
    }
}

/// One decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub event: AuditEvent,
    pub subject: u64,
    pub key_id: u64,
    pub hash: [u8; 32],
}

pub fn encode_header() -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&AUDIT_VERSION.to_le_bytes());
    b
}

/// Encodes the record that follows `prev_hash`; its hash is in the returned bytes 40..72.
pub fn encode_record(
    prev_hash: &[u8; 32],
    seq: u64,
    time_ms: u64,
    event: AuditEvent,
    subject: u64,
    key_id: u64,
) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&time_ms.to_le_bytes());
    b[16] = event as u8;
    b[24..32].copy_from_slice(&subject.to_le_bytes());
    b[32..40].copy_from_slice(&key_id.to_le_bytes());
    let h = chain(prev_hash, &b[..HASHED_LEN]);
    b[HASHED_LEN..].copy_from_slice(&h);
    b
}

fn chain(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update(body);
    *h.finalize().as_bytes()
}

/// A decoded log: every record whose chain verifies, and the length of a torn partial
/// record at the end (a crash inside an append), if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditLog {
    pub records: Vec<AuditRecord>,
    pub torn_tail: usize,
}

impl AuditLog {
    /// The hash the next record chains to.
    pub fn head(&self) -> [u8; 32] {
        self.records.last().map_or([0; 32], |r| r.hash)
    }

    /// Whether the log reaches a keystore's anchor: it has at least `count` records and
    /// the `count`-th hashes to `hash`.
    pub fn reaches(&self, (count, hash): (u64, [u8; 32])) -> bool {
        match count.checked_sub(1) {
            None => true,
            Some(i) => self.records.get(i as usize).is_some_and(|r| r.hash == hash),
        }
    }
}

/// Decodes and verifies a whole log file. Any record that does not chain (edited,
/// removed, reordered, inserted) is an error at its offset.
pub fn decode_log(buf: &[u8]) -> Result<AuditLog, FormatError> {
    need(buf, 0, HEADER_LEN)?;
    if buf[..8] != MAGIC {
        return Err(FormatError::at(0, CorruptionKind::BadMagic));
    }
    let version = get_u32(buf, 8);
    if version != AUDIT_VERSION {
        return Err(FormatError::Version {
            expected: AUDIT_VERSION,
            got: version,
        });
    }
    if get_u32(buf, 12) != 0 {
        return Err(FormatError::at(
            12,
            CorruptionKind::BadField {
                field: "audit header reserved bytes",
                value: u64::from(get_u32(buf, 12)),
            },
        ));
    }
    let body = &buf[HEADER_LEN..];
    let whole = body.len() / RECORD_LEN * RECORD_LEN;
    let mut log = AuditLog {
        records: Vec::with_capacity(whole / RECORD_LEN),
        torn_tail: body.len() - whole,
    };
    let mut prev = [0u8; 32];
    for (i, r) in body[..whole].chunks_exact(RECORD_LEN).enumerate() {
        let at = HEADER_LEN + i * RECORD_LEN;
        let bad = |off: usize, field: &'static str, value: u64| {
            Err(FormatError::at(
                at + off,
                CorruptionKind::BadField { field, value },
            ))
        };
        let seq = get_u64(r, 0);
        if seq != i as u64 {
            // A record removed, inserted or moved before this one.
            return Err(FormatError::at(
                at,
                CorruptionKind::AuditChainBroken { seq: i as u64 },
            ));
        }
        let Some(event) = AuditEvent::from_u8(r[16]) else {
            return bad(16, "audit event", u64::from(r[16]));
        };
        if r[17..24].iter().any(|&b| b != 0) {
            return bad(17, "audit record reserved bytes", 0);
        }
        let want = chain(&prev, &r[..HASHED_LEN]);
        if want[..] != r[HASHED_LEN..] {
            return Err(FormatError::at(
                at + HASHED_LEN,
                CorruptionKind::AuditChainBroken { seq },
            ));
        }
        prev = want;
        log.records.push(AuditRecord {
            seq,
            time_ms: get_u64(r, 8),
            event,
            subject: get_u64(r, 24),
            key_id: get_u64(r, 32),
            hash: want,
        });
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Vec<u8> {
        let mut b = encode_header().to_vec();
        let mut prev = [0u8; 32];
        for i in 0..n {
            let r = encode_record(&prev, i, 1000 + i, AuditEvent::DekCreated, i + 1, 77);
            prev.copy_from_slice(&r[40..]);
            b.extend_from_slice(&r);
        }
        b
    }

    #[test]
    fn round_trip() {
        let l = decode_log(&log(3)).unwrap();
        assert_eq!(l.records.len(), 3);
        assert_eq!(l.records[2].subject, 3);
        assert_eq!(l.torn_tail, 0);
        assert_eq!(l.head(), l.records[2].hash);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let b = log(3);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x01;
            assert!(decode_log(&c).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn removal_and_reordering_break_the_chain() {
        let b = log(4);
        let rec = |i: usize| &b[HEADER_LEN + i * RECORD_LEN..HEADER_LEN + (i + 1) * RECORD_LEN];
        // Record 1 removed.
        let mut removed = b[..HEADER_LEN].to_vec();
        for i in [0, 2, 3] {
            removed.extend_from_slice(rec(i));
        }
        assert!(decode_log(&removed).is_err());
        // Records 1 and 2 swapped.
        let mut swapped = b[..HEADER_LEN].to_vec();
        for i in [0, 2, 1, 3] {
            swapped.extend_from_slice(rec(i));
        }
        assert!(decode_log(&swapped).is_err());
    }

    #[test]
    fn a_torn_last_record_is_reported_not_decoded() {
        let mut b = log(2);
        b.extend_from_slice(&[9; 30]);
        let l = decode_log(&b).unwrap();
        assert_eq!((l.records.len(), l.torn_tail), (2, 30));
    }
}
