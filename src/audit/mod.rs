//! Read-only audits of a data dir: [`verify`] (is every byte what it should be?) and
//! [`inspect`] (what is in it?). Both open files read-only, take no lock and write
//! nothing, so they can run while a store has the dir open: a segment still being
//! written has a tail "in flight", which is reported as a note, not as corruption.

mod inspect;
mod keys;
mod verify;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

pub use inspect::{inspect, InspectReport, KeystoreInfo, QueueSummary, SegmentInfo};
pub use keys::{key_audit_log, key_status, KeyAuditLog, KeyStatus, MasterKeyStatus};
pub use verify::{verify, Finding, VerifyReport};

use crate::error::{Error, Result};
use crate::keys::keystore::FILE_NAME as KEYSTORE_FILE;
use crate::segment;

/// The files of a data dir, by role.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    pub segments: BTreeMap<u64, PathBuf>,
    pub keystore: Option<PathBuf>,
    /// Temp files of an interrupted (or in-flight) keystore write or segment creation.
    pub temp: Vec<PathBuf>,
    pub unknown: Vec<PathBuf>,
}

pub(crate) fn list(dir: &Path) -> Result<Listing> {
    let mut l = Listing::default();
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list data dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list data dir", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if let Some(id) = segment::parse_file_name(&name) {
            l.segments.insert(id, path);
        } else if name == KEYSTORE_FILE {
            l.keystore = Some(path);
        } else if name == "LOCK"
            || name == crate::keys::audit::FILE_NAME
            || name == crate::keys::audit::ARCHIVE_V1
        {
        } else if name == format!("{KEYSTORE_FILE}.tmp")
            || name == format!("{}.tmp", crate::keys::audit::FILE_NAME)
            || name == format!("{}.tmp", crate::keys::audit::ARCHIVE_V1)
            || name
                .strip_suffix(".tmp")
                .and_then(segment::parse_file_name)
                .is_some()
        {
            l.temp.push(path);
        } else {
            l.unknown.push(path);
        }
    }
    l.temp.sort();
    l.unknown.sort();
    Ok(l)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io("read", path, e))
}
