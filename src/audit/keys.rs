//! Read-only views of the key hierarchy: `key_status` (which master keys wrap how many
//! live data keys, how old they are) and `key_audit_log` (the key events, checked).
//! Neither shows any secret: ids are public fingerprints.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::audit::{decode_log, log_version, v1, AuditEvent, AuditRecord};
use crate::format::keystore::KeystoreImage;
use crate::keys::audit::KeyAudit;
use crate::keys::keystore::KeyStore;
use crate::keys::KeyProvider;

/// The key audit log, read and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyAuditLog {
    pub records: Vec<AuditRecord>,
    /// Bytes of a torn last record (an interrupted append; recovery cuts it).
    pub torn_tail: usize,
    /// With the key: whether the log reaches the point the keystore vouches for
    /// (`None` without a key, or for a keystore from before the log existed).
    pub matches_keystore: Option<bool>,
    /// Every record's mac was checked under the audit key (with the master key, for a
    /// keyed log). Without it only the structure is checked: sequence numbers, events,
    /// the order of keystore generations.
    pub verified: bool,
    /// The log's version: 2 (keyed) or 1 (a store not yet opened by a build that writes
    /// format version 4; its unkeyed chain is checked in full, without a key).
    pub version: u32,
}

/// Reads and checks the key audit log of `dir`. A record that does not chain to the one
/// before it is an `Error::Corruption` naming its offset. With `provider`, the log is
/// also checked against the anchor in the authenticated keystore, which catches records
/// removed from its end.
pub fn key_audit_log(dir: &Path, provider: Option<&dyn KeyProvider>) -> Result<KeyAuditLog> {
    let path = KeyAudit::path_in(dir);
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read key audit log", &path, e))?;
    let ks = match provider {
        None => None,
        Some(p) => KeyStore::load(&crate::vfs::RealFs, dir, p)?,
    };
    let version = log_version(&bytes).unwrap_or(0);
    let log = if version == 1 {
        v1::decode_log(&bytes)
    } else {
        let key = ks.as_ref().and_then(|k| k.audit_key.as_ref());
        decode_log(&bytes, key.map(|k| k.expose()))
    }
    .map_err(|e| e.into_error(&path, 0))?;
    // A keyed log next to a keystore without an audit key (an upgrade cut short): the
    // keystore's anchor is into the archived log, not this one.
    let matches_keystore = ks
        .filter(|ks| version == 1 || ks.audit_key.is_some())
        .and_then(|ks| ks.audit_anchor)
        .map(|a| log.reaches(a));
    Ok(KeyAuditLog {
        records: log.records,
        torn_tail: log.torn_tail,
        matches_keystore,
        verified: log.verified,
        version,
    })
}

/// One master key (KEK) and the live data keys it wraps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MasterKeyStatus {
    pub kek_id: u64,
    /// Which kind of provider wrapped its keys, from the wrapped keys' layout: "file",
    /// "pkcs11", or "unknown" (no live key to tell by).
    pub provider: &'static str,
    /// The keystore is written under this key (the current one).
    pub current: bool,
    pub live_data_keys: u64,
    /// Creation time of the oldest and newest of those data keys (from the audit log).
    pub oldest_dek_ms: Option<u64>,
    pub newest_dek_ms: Option<u64>,
}

/// The key hierarchy of a data dir, from plaintext framing and the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStatus {
    pub master_keys: Vec<MasterKeyStatus>,
    pub live_data_keys: u64,
    /// Master-key rotations recorded, and the time of the last one.
    pub rotations: u64,
    pub last_rotation_ms: Option<u64>,
    /// Records in the key audit log (`None`: no log yet).
    pub audit_records: Option<u64>,
    /// Epoch keys (HSM provider): none with a key file.
    pub epochs: Vec<u64>,
}

/// The key hierarchy of `dir`. Needs no key: ids and counts are plaintext framing.
pub fn key_status(dir: &Path) -> Result<KeyStatus> {
    let path = KeyStore::path_in(dir);
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read keystore", &path, e))?;
    let img = KeystoreImage::decode(&bytes).map_err(|e| e.into_error(&path, 0))?;
    let log = key_audit_log(dir, None).ok();
    let mut created: HashMap<u64, u64> = HashMap::new();
    let mut st = KeyStatus {
        live_data_keys: img.entries.len() as u64,
        audit_records: log.as_ref().map(|l| l.records.len() as u64),
        ..KeyStatus::default()
    };
    for r in log.iter().flat_map(|l| &l.records) {
        match r.event {
            AuditEvent::DekCreated => {
                created.insert(r.subject, r.time_ms);
            }
            AuditEvent::MasterKeyRotated => {
                st.rotations += 1;
                st.last_rotation_ms = Some(r.time_ms);
            }
            AuditEvent::EpochKeyCreated => st.epochs.push(r.subject),
            AuditEvent::EpochKeyDestroyed => st.epochs.retain(|&e| e != r.subject),
            _ => {}
        }
    }
    let mut per: BTreeMap<u64, MasterKeyStatus> = BTreeMap::new();
    per.insert(
        img.kek_id,
        MasterKeyStatus {
            kek_id: img.kek_id,
            provider: "unknown",
            current: true,
            ..MasterKeyStatus::default()
        },
    );
    for e in &img.entries {
        let m = per.entry(e.kek_id).or_insert_with(|| MasterKeyStatus {
            kek_id: e.kek_id,
            provider: "unknown",
            ..MasterKeyStatus::default()
        });
        m.live_data_keys += 1;
        m.provider = match e.wrapped.len() {
            crate::keys::FILE_WRAPPED_LEN => "file",
            crate::keys::pkcs11::WRAPPED_LEN => "pkcs11",
            _ => "unknown",
        };
        if let Some(&t) = created.get(&e.segment_id) {
            m.oldest_dek_ms = Some(m.oldest_dek_ms.map_or(t, |o| o.min(t)));
            m.newest_dek_ms = Some(m.newest_dek_ms.map_or(t, |o| o.max(t)));
        }
    }
    st.master_keys = per.into_values().collect();
    Ok(st)
}
