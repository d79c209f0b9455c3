//! The key audit log (`KEYS.audit`): every key event, append-only, each record chained
//! to the one before by a keyed BLAKE3 MAC. A record names a segment or epoch and a key
//! id, never a queue id or anything about messages.
//!
//! Layout (log version 2): a 56-byte header, then fixed 80-byte records.
//!
//! Header: magic (8), log version (4), zero (4), then the predecessor this log continues
//! (a version-1 log archived as `KEYS.audit.v1` when the store was upgraded): its record
//! count (8) and the hash of its last record (32); zeros when there is none.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | seq (0, 1, 2, ...) |
//! | 8 | 8 | time, ms since the Unix epoch |
//! | 16 | 1 | event |
//! | 17 | 7 | zero |
//! | 24 | 8 | subject: segment id (DEK events), epoch id, new KEK id (rotation), or the keystore generation (keystore written) |
//! | 32 | 8 | key id: the KEK (or epoch key) involved |
//! | 40 | 8 | generation of the keystore write the record precedes |
//! | 48 | 32 | mac = BLAKE3-keyed(audit key, previous mac ‖ bytes 0..48) |
//!
//! The first record's previous mac is BLAKE3-keyed(audit key, header). The audit key is
//! random, kept in the keystore's sealed meta block (so only the master key's holder can
//! read it). Editing, removing or reordering a record breaks the chain at that record;
//! removing records from the end is caught by the anchor (count and last mac) in the
//! keystore; records cannot be forged without the audit key. Without the key, a reader
//! can still check everything but the macs (sequence, events, generations).
//!
//! Version 1 (72-byte records without the generation, an unkeyed hash, a 16-byte header)
//! is read only to archive it at the upgrade: [`v1`].

use super::{get_u32, get_u64, need, FormatError};
use crate::error::CorruptionKind;

pub const MAGIC: [u8; 8] = *b"CINDRAUD";
pub const HEADER_LEN: usize = 56;
pub const RECORD_LEN: usize = 80;
pub const AUDIT_VERSION: u32 = 2;
/// Length of the audit key (kept in the keystore's sealed meta).
pub const AUDIT_KEY_LEN: usize = 32;
const MACED_LEN: usize = 48;

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
    /// A keystore write with no key event of its own (sealed lengths, floors): every
    /// keystore write is preceded by at least one record (subject: its generation).
    KeystoreWritten = 8,
    /// The live data keys wrapped in an epoch that is over were re-wrapped into the
    /// current one (subject: the old epoch; key id: the new epoch).
    EpochRolled = 9,
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
            8 => Self::KeystoreWritten,
            9 => Self::EpochRolled,
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
            Self::KeystoreWritten => "keystore-written",
            Self::EpochRolled => "epoch-rolled",
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
    /// The keystore write this record precedes (0 in a version-1 log).
    pub generation: u64,
    /// The record's mac (its hash in a version-1 log): what the next one chains to.
    pub hash: [u8; 32],
}

impl AuditRecord {
    /// The fields both log versions keep at bytes 0..40 (sequence, time, subject, key
    /// id), with the event, generation and hash the caller checked.
    fn read(r: &[u8], event: AuditEvent, generation: u64, hash: [u8; 32]) -> Self {
        AuditRecord {
            seq: get_u64(r, 0),
            time_ms: get_u64(r, 8),
            event,
            subject: get_u64(r, 24),
            key_id: get_u64(r, 32),
            generation,
            hash,
        }
    }
}

/// The fields of a record to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordFields {
    pub seq: u64,
    pub time_ms: u64,
    pub event: AuditEvent,
    pub subject: u64,
    pub key_id: u64,
    pub generation: u64,
}

/// The log's header: `predecessor` is the (record count, last hash) of the archived
/// version-1 log this one continues, if any.
pub fn encode_header(predecessor: (u64, [u8; 32])) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&AUDIT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&predecessor.0.to_le_bytes());
    b[24..56].copy_from_slice(&predecessor.1);
    b
}

/// What the first record chains to: the header, under the audit key.
pub fn chain_start(key: &[u8; AUDIT_KEY_LEN], header: &[u8]) -> [u8; 32] {
    *blake3::keyed_hash(key, &header[..HEADER_LEN]).as_bytes()
}

fn mac(key: &[u8; AUDIT_KEY_LEN], prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(prev);
    h.update(body);
    *h.finalize().as_bytes()
}

/// Encodes the record that follows `prev`; its mac is in the returned bytes 48..80.
pub fn encode_record(
    key: &[u8; AUDIT_KEY_LEN],
    prev: &[u8; 32],
    f: &RecordFields,
) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[..8].copy_from_slice(&f.seq.to_le_bytes());
    b[8..16].copy_from_slice(&f.time_ms.to_le_bytes());
    b[16] = f.event as u8;
    b[24..32].copy_from_slice(&f.subject.to_le_bytes());
    b[32..40].copy_from_slice(&f.key_id.to_le_bytes());
    b[40..48].copy_from_slice(&f.generation.to_le_bytes());
    let m = mac(key, prev, &b[..MACED_LEN]);
    b[MACED_LEN..].copy_from_slice(&m);
    b
}

/// A decoded log: every record that checks, and the length of a torn partial record at
/// the end (a crash inside an append), if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditLog {
    /// The archived log this one continues: (record count, last hash).
    pub predecessor: (u64, [u8; 32]),
    pub records: Vec<AuditRecord>,
    pub torn_tail: usize,
    /// The macs were checked (the audit key was given).
    pub verified: bool,
    /// What the first record chains to (zeros when decoded without the key).
    pub start: [u8; 32],
}

impl AuditLog {
    /// The hash the next record chains to.
    pub fn head(&self) -> [u8; 32] {
        self.records.last().map_or(self.start, |r| r.hash)
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

/// The version of a log file's header, if it has one.
pub fn log_version(buf: &[u8]) -> Option<u32> {
    (buf.len() >= 12 && buf[..8] == MAGIC).then(|| get_u32(buf, 8))
}

/// Decodes a whole log file. With the audit key every mac is checked: a record that
/// does not chain (edited, removed, reordered, inserted, forged) is an error at its
/// offset. Without it, the sequence numbers, events, reserved bytes and the order of
/// generations are checked, not the macs.
pub fn decode_log(buf: &[u8], key: Option<&[u8; AUDIT_KEY_LEN]>) -> Result<AuditLog, FormatError> {
    need(buf, 0, 12)?;
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
    need(buf, 0, HEADER_LEN)?;
    if get_u32(buf, 12) != 0 {
        return Err(FormatError::at(
            12,
            CorruptionKind::BadField {
                field: "audit header reserved bytes",
                value: u64::from(get_u32(buf, 12)),
            },
        ));
    }
    let mut head = [0u8; 32];
    head.copy_from_slice(&buf[24..56]);
    let start = key.map_or([0; 32], |k| chain_start(k, buf));
    let body = &buf[HEADER_LEN..];
    let whole = body.len() / RECORD_LEN * RECORD_LEN;
    let mut log = AuditLog {
        predecessor: (get_u64(buf, 16), head),
        records: Vec::with_capacity(whole / RECORD_LEN),
        torn_tail: body.len() - whole,
        verified: key.is_some(),
        start,
    };
    let mut prev = start;
    let mut last_generation = 0;
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
        let generation = get_u64(r, 40);
        if generation < last_generation {
            return bad(40, "audit record keystore generation", generation);
        }
        last_generation = generation;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&r[MACED_LEN..]);
        if let Some(k) = key {
            if mac(k, &prev, &r[..MACED_LEN]) != hash {
                return Err(FormatError::at(
                    at + MACED_LEN,
                    CorruptionKind::AuditChainBroken { seq },
                ));
            }
        }
        prev = hash;
        log.records
            .push(AuditRecord::read(r, event, generation, hash));
    }
    Ok(log)
}

/// Version 1 of the log (format versions 3 and earlier of the store): 16-byte header,
/// 72-byte records, chained by an unkeyed BLAKE3 hash. Read only to check it against
/// the keystore's anchor and archive it when the store is upgraded.
pub mod v1 {
    use super::super::{get_u32, get_u64, need, FormatError};
    use super::{AuditEvent, AuditLog, AuditRecord, MAGIC};
    use crate::error::CorruptionKind;

    pub const HEADER_LEN: usize = 16;
    pub const RECORD_LEN: usize = 72;
    const HASHED_LEN: usize = 40;
    const DOMAIN: &[u8] = b"cinder-audit-v1";

    fn chain(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(prev);
        h.update(body);
        *h.finalize().as_bytes()
    }

    /// A version-1 header.
    pub fn encode_header() -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b
    }

    /// A version-1 record (what a version-3 store wrote; for upgrade tests).
    pub fn encode_record(
        prev: &[u8; 32],
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
        let h = chain(prev, &b[..HASHED_LEN]);
        b[HASHED_LEN..].copy_from_slice(&h);
        b
    }

    /// Decodes and verifies a whole version-1 log.
    pub fn decode_log(buf: &[u8]) -> Result<AuditLog, FormatError> {
        need(buf, 0, HEADER_LEN)?;
        if buf[..8] != MAGIC {
            return Err(FormatError::at(0, CorruptionKind::BadMagic));
        }
        let version = get_u32(buf, 8);
        if version != 1 || get_u32(buf, 12) != 0 {
            return Err(FormatError::Version {
                expected: 1,
                got: version,
            });
        }
        let body = &buf[HEADER_LEN..];
        let whole = body.len() / RECORD_LEN * RECORD_LEN;
        let mut log = AuditLog {
            records: Vec::with_capacity(whole / RECORD_LEN),
            torn_tail: body.len() - whole,
            verified: true,
            ..AuditLog::default()
        };
        let mut prev = [0u8; 32];
        for (i, r) in body[..whole].chunks_exact(RECORD_LEN).enumerate() {
            let at = HEADER_LEN + i * RECORD_LEN;
            let seq = get_u64(r, 0);
            let event = AuditEvent::from_u8(r[16]).filter(|_| r[17..24].iter().all(|&b| b == 0));
            let want = chain(&prev, &r[..HASHED_LEN]);
            let (Some(event), true) = (event, seq == i as u64 && want[..] == r[HASHED_LEN..])
            else {
                return Err(FormatError::at(
                    at,
                    CorruptionKind::AuditChainBroken { seq: i as u64 },
                ));
            };
            prev = want;
            log.records.push(AuditRecord::read(r, event, 0, want));
        }
        Ok(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn log(n: u64) -> Vec<u8> {
        let mut b = encode_header((0, [0; 32])).to_vec();
        let mut prev = chain_start(&KEY, &b);
        for i in 0..n {
            let f = RecordFields {
                seq: i,
                time_ms: 1000 + i,
                event: AuditEvent::DekCreated,
                subject: i + 1,
                key_id: 77,
                generation: 2 + i / 2,
            };
            let r = encode_record(&KEY, &prev, &f);
            prev.copy_from_slice(&r[MACED_LEN..]);
            b.extend_from_slice(&r);
        }
        b
    }

    #[test]
    fn round_trip() {
        let l = decode_log(&log(3), Some(&KEY)).unwrap();
        assert_eq!(l.records.len(), 3);
        assert_eq!(l.records[2].subject, 3);
        assert_eq!(l.records[2].generation, 3);
        assert_eq!(l.torn_tail, 0);
        assert_eq!(l.head(), l.records[2].hash);
        assert!(decode_log(&log(0), Some(&KEY))
            .unwrap()
            .reaches((0, [0; 32])));
    }

    #[test]
    fn every_flipped_byte_is_detected_with_the_key() {
        let b = log(3);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x01;
            assert!(decode_log(&c, Some(&KEY)).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn a_record_chained_under_another_key_does_not_verify() {
        // What someone who can write the data dir but not read the keystore can do: a
        // well-formed record, chained with a key of their own.
        let mut b = log(2);
        let prev = decode_log(&b, Some(&KEY)).unwrap().head();
        let f = RecordFields {
            seq: 2,
            time_ms: u64::MAX,
            event: AuditEvent::MasterKeyRotated,
            subject: 1,
            key_id: 1,
            generation: 9,
        };
        b.extend_from_slice(&encode_record(&[8; 32], &prev, &f));
        assert!(decode_log(&b, None).is_ok(), "structure alone is fine");
        assert!(matches!(
            decode_log(&b, Some(&KEY)),
            Err(FormatError::Corrupt {
                kind: CorruptionKind::AuditChainBroken { seq: 2 },
                ..
            })
        ));
    }

    #[test]
    fn removal_and_reordering_break_the_chain_even_without_the_key() {
        let b = log(4);
        let rec = |i: usize| &b[HEADER_LEN + i * RECORD_LEN..HEADER_LEN + (i + 1) * RECORD_LEN];
        let mut removed = b[..HEADER_LEN].to_vec();
        for i in [0, 2, 3] {
            removed.extend_from_slice(rec(i));
        }
        let mut swapped = b[..HEADER_LEN].to_vec();
        for i in [0, 2, 1, 3] {
            swapped.extend_from_slice(rec(i));
        }
        for bad in [&removed, &swapped] {
            assert!(decode_log(bad, None).is_err());
            assert!(decode_log(bad, Some(&KEY)).is_err());
        }
    }

    #[test]
    fn generations_never_go_back() {
        let mut b = log(3);
        // Record 2 claims an older keystore write than record 1 (decoded without the key:
        // the structure check alone catches it).
        let at = HEADER_LEN + 2 * RECORD_LEN + 40;
        b[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
        assert!(decode_log(&b, None).is_err());
    }

    #[test]
    fn a_torn_last_record_is_reported_not_decoded() {
        let mut b = log(2);
        b.extend_from_slice(&[9; 30]);
        let l = decode_log(&b, Some(&KEY)).unwrap();
        assert_eq!((l.records.len(), l.torn_tail), (2, 30));
    }

    #[test]
    fn a_version_1_log_still_decodes_and_verifies() {
        let mut b = v1::encode_header().to_vec();
        let mut prev = [0u8; 32];
        for i in 0..3 {
            let r = v1::encode_record(&prev, i, 5, AuditEvent::DekShredded, i, 9);
            prev.copy_from_slice(&r[40..]);
            b.extend_from_slice(&r);
        }
        let l = v1::decode_log(&b).unwrap();
        assert_eq!((l.records.len(), l.head()), (3, prev));
        assert_eq!(log_version(&b), Some(1));
        b[v1::HEADER_LEN + 24] ^= 1;
        assert!(v1::decode_log(&b).is_err());
        // Each version refuses the other's files.
        assert!(matches!(
            decode_log(&b, None),
            Err(FormatError::Version { got: 1, .. })
        ));
        assert!(v1::decode_log(&log(1)).is_err());
    }
}
