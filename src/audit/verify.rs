//! `verify`: every checksum, every tag, and the keystore against the segment files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::list;
use crate::crypto::SealKey;
use crate::error::{CorruptionKind, Error, Result};
use crate::format::segment_header::SegmentHeader;
use crate::keys::keystore::KeyStore;
use crate::keys::KeyProvider;
use crate::segment::scan::{self, Content};

/// One finding: a file, a byte offset in it (when there is one), and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    pub offset: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{}: offset {o}: {}", self.file.display(), self.what),
            None => write!(f, "{}: {}", self.file.display(), self.what),
        }
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Damage, tampering, or disagreement between keystore and segments.
    pub problems: Vec<Finding>,
    /// Things that are fine but worth knowing (tails in flight, interrupted writes that
    /// recovery will finish).
    pub notes: Vec<Finding>,
    pub segments: u64,
    pub frames: u64,
    pub messages: u64,
    pub ack_records: u64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Ctx {
    report: VerifyReport,
    /// message id → where its first frame is and what it says, to catch duplicates.
    ids: HashMap<u64, FirstCopy>,
    /// Data keys the key audit log records as shredded.
    shredded: std::collections::HashSet<u64>,
}

/// The first frame found for a message id.
struct FirstCopy {
    file: PathBuf,
    offset: u64,
    /// Queue, creation, expiry and payload length: a compaction copy repeats them.
    meta: (Vec<u8>, u64, u64, u32),
}

impl Ctx {
    /// Counts a message frame; a second frame for the same id is a compaction copy when
    /// it is in another segment and says the same (queue, creation, expiry, length),
    /// else damage.
    fn message_seen(&mut self, id: u64, copy: FirstCopy) {
        self.report.messages += 1;
        let first = match self.ids.entry(id) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(copy);
                return;
            }
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        };
        let (
            first,
            FirstCopy {
                file: path,
                offset,
                meta,
            },
        ) = (&*first, copy);
        let (file, off) = (first.file.display(), first.offset);
        if first.file != path && first.meta == meta {
            // Compaction copies a live message into a newer segment and shreds the
            // original once the copy is durable: a live store, or a crash in between,
            // shows both; recovery keeps the newer copy.
            let what = format!(
                "message id {id} also stored at {file} offset {off}: a compaction copy (the copy in the newer segment is the one kept)"
            );
            self.note(&path, Some(offset), what);
        } else if first.file == path {
            let what =
                format!("message id {id} stored twice in this segment (also at offset {off})");
            self.problem(&path, Some(offset), what);
        } else {
            let what = format!(
                "message id {id} also stored at {file} offset {off} as a different message"
            );
            self.problem(&path, Some(offset), what);
        }
    }

    fn problem(&mut self, file: &Path, offset: Option<u64>, what: impl Into<String>) {
        self.report.problems.push(Finding {
            file: file.to_path_buf(),
            offset,
            what: what.into(),
        });
    }

    fn note(&mut self, file: &Path, offset: Option<u64>, what: impl Into<String>) {
        self.report.notes.push(Finding {
            file: file.to_path_buf(),
            offset,
            what: what.into(),
        });
    }
}

/// Checks every frame checksum and AEAD tag in `dir`, the keystore, and that keystore and
/// segments agree (orphan keys, segments without keys, sealed lengths, unknown files,
/// format versions, frames tiling each segment without overlap so no nonce repeats,
/// seals agreeing with the frames). `Err` only when the dir or the key cannot be used
/// at all (for example `WrongMasterKey`); everything else is a finding.
pub fn verify(dir: &Path, provider: &dyn KeyProvider) -> Result<VerifyReport> {
    let listing = list(dir)?;
    let mut cx = Ctx {
        report: VerifyReport::default(),
        ids: HashMap::new(),
        shredded: std::collections::HashSet::new(),
    };
    for p in &listing.unknown {
        cx.problem(p, None, "unknown file in the data dir");
    }
    for p in &listing.temp {
        cx.note(
            p,
            None,
            "temporary file of an interrupted or in-flight write (recovery deletes it)",
        );
    }
    let keys_path = KeyStore::path_in(dir);
    let ks = match KeyStore::load(&crate::vfs::RealFs, dir, provider) {
        Ok(Some(ks)) => Some(ks),
        Ok(None) => {
            if !listing.segments.is_empty() {
                cx.problem(
                    &keys_path,
                    Some(0),
                    "keystore missing while segment files exist",
                );
            }
            None
        }
        Err(e @ (Error::WrongMasterKey { .. } | Error::KeyProvider(_) | Error::Io { .. })) => {
            return Err(e)
        }
        Err(Error::Corruption { file, offset, kind }) => {
            cx.problem(&file, Some(offset), kind.to_string());
            None
        }
        Err(Error::UnsupportedVersion {
            file,
            expected,
            got,
        }) => {
            cx.problem(
                &file,
                Some(8),
                format!("format version {got}, this build reads {expected}"),
            );
            None
        }
        Err(e) => return Err(e),
    };
    check_audit_log(&mut cx, dir, ks.as_ref(), provider);
    if let Some(ks) = &ks {
        let newest_file = listing.segments.keys().next_back().copied().unwrap_or(0);
        for id in ks.segment_ids() {
            if listing.segments.contains_key(&id) {
                continue;
            }
            if ks.sealed_len(id) == 0 && id > newest_file {
                // A key is written before its file exists: a creation in flight (the
                // store is open) or cut short by a crash (recovery drops the key).
                cx.note(
                    &keys_path,
                    None,
                    format!("key of segment {id} whose file is not created yet (in flight, or an interrupted creation that recovery drops)"),
                );
            } else {
                cx.problem(
                    &keys_path,
                    None,
                    format!("orphan key: segment {id} has a key but no file"),
                );
            }
        }
    }
    for (&id, path) in &listing.segments {
        cx.report.segments += 1;
        verify_segment(&mut cx, id, path, ks.as_ref(), provider)?;
    }
    Ok(cx.report)
}

fn verify_segment(
    cx: &mut Ctx,
    id: u64,
    path: &Path,
    ks: Option<&KeyStore>,
    provider: &dyn KeyProvider,
) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            cx.note(
                path,
                None,
                "file vanished while verifying (shredded by the running store)",
            );
            return Ok(());
        }
        Err(e) => return Err(Error::io("read segment", path, e)),
    };
    match SegmentHeader::decode(&bytes) {
        Err(e) => {
            let (offset, what) = match e.into_error(path, 0) {
                Error::Corruption { offset, kind, .. } => (offset, kind.to_string()),
                other => (8, other.to_string()),
            };
            cx.problem(path, Some(offset), what);
            return Ok(());
        }
        Ok(h) if h.segment_id != id => {
            let kind = CorruptionKind::SegmentIdMismatch {
                expected: id,
                got: h.segment_id,
            };
            cx.problem(path, Some(16), kind.to_string());
            return Ok(());
        }
        Ok(h) if h.dek_id != id => {
            // Recovery refuses this too: one key per segment, named by the segment id.
            let kind = CorruptionKind::BadField {
                field: "segment dek id",
                value: h.dek_id,
            };
            cx.problem(path, Some(24), kind.to_string());
            return Ok(());
        }
        Ok(_) => {}
    }
    let Some(ks) = ks else { return Ok(()) };
    if !ks.contains(id) {
        keyless_segment(cx, id, path, ks);
        return Ok(());
    }
    let dek = match ks.unwrap_key(id, provider) {
        Ok(Some(k)) => k,
        Ok(None) => return Ok(()),
        Err(Error::Corruption { file, offset, kind }) => {
            cx.problem(&file, Some(offset), format!("key of segment {id}: {kind}"));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let key = SealKey::new(&dek);
    let sealed_len = ks.sealed_len(id);
    let walk = scan::scan(&bytes, id, Some(&key), true);
    cx.report.frames += walk.frames.len() as u64;
    for (off, kind) in &walk.auth_failures {
        cx.problem(path, Some(*off), kind.to_string());
    }
    if let Some((off, kind)) = &walk.seal_problem {
        cx.problem(path, Some(*off), kind.to_string());
    }
    check_tail(cx, (path, &bytes), &walk, sealed_len);
    for f in &walk.frames {
        match &f.content {
            Content::Message {
                id,
                created_at_ms,
                expires_at_ms,
                queue,
                payload_len,
                ..
            } => cx.message_seen(
                *id,
                FirstCopy {
                    file: path.to_path_buf(),
                    offset: f.offset,
                    meta: (queue.clone(), *created_at_ms, *expires_at_ms, *payload_len),
                },
            ),
            Content::Acks(_) => cx.report.ack_records += 1,
            Content::Seal(_) | Content::Sealed(_) => {}
        }
    }
    Ok(())
}

/// A segment file whose key is not in the keystore.
fn keyless_segment(cx: &mut Ctx, id: u64, path: &Path, ks: &KeyStore) {
    if id >= ks.next_segment_id {
        cx.problem(
            path,
            None,
            "segment without a key, newer than the keystore (stale keystore?)",
        );
    } else if cx.shredded.contains(&id) {
        // A shred persists the keystore (and logs it) first and unlinks second: a live
        // store, or a crash in between, shows the file for a moment. Its key is gone, so
        // its content is unreadable; recovery deletes it.
        cx.note(
            path,
            None,
            "segment without a key: a shred in progress or interrupted (the key is gone; recovery deletes the file)",
        );
    } else {
        cx.problem(
            path,
            None,
            "segment without a key, and the key audit log records no shred of it (recovery deletes the file)",
        );
    }
}

/// The end of a segment: a sealed one must end exactly with its seal at the length the
/// keystore recorded; an unsealed one may have a tail in flight.
fn check_tail(
    cx: &mut Ctx,
    (path, bytes): (&Path, &[u8]),
    walk: &scan::SegmentScan,
    sealed_len: u64,
) {
    let len = bytes.len() as u64;
    if sealed_len != 0 && (sealed_len != len || !walk.sealed) {
        let what = format!("keystore records this segment as sealed at {sealed_len} bytes; the file has {len} bytes and {} seal", if walk.sealed { "a" } else { "no" });
        cx.problem(path, Some(len.min(sealed_len)), what);
    }
    if let Some((off, kind)) = &walk.stopped {
        if walk.sealed || sealed_len != 0 {
            cx.problem(path, Some(*off as u64), kind.to_string());
        } else if walk.dropped > 0 && scan::damaged_mid_segment(bytes, *off) {
            // The same rule recovery applies: a frame written whole with data after it
            // is damage, not a torn tail, and recovery refuses it.
            let what = format!("{kind} in a frame written whole, with data after it (damage, not a torn tail; recovery refuses it)");
            cx.problem(path, Some(*off as u64), what);
        } else if walk.dropped > 0 {
            let what = format!("tail in flight or torn ({} non-zero bytes after the last complete frame; recovery cuts them)", walk.dropped);
            cx.note(path, Some(*off as u64), what);
        } else {
            cx.note(
                path,
                Some(*off as u64),
                "segment being written (preallocated space after the last frame)",
            );
        }
    } else if !walk.sealed {
        cx.note(
            path,
            Some(walk.end as u64),
            "segment being written (no seal yet)",
        );
    }
    if walk.zeros_after_seal {
        cx.note(
            path,
            Some(walk.end as u64),
            "zeros after the seal (a truncation interrupted by a crash; recovery cuts them)",
        );
    }
}

/// The key audit log: every record verifies under the audit key and chains to the one
/// before, the log reaches the point the (authenticated) keystore vouches for, and no
/// record names a keystore write the keystore is two or more behind (rolled back).
fn check_audit_log(cx: &mut Ctx, dir: &Path, ks: Option<&KeyStore>, provider: &dyn KeyProvider) {
    use crate::format::audit::{decode_log, log_version, v1, AuditEvent, HEADER_LEN, RECORD_LEN};
    let path = crate::keys::audit::KeyAudit::path_in(dir);
    let anchor = ks.and_then(|k| k.audit_anchor);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match anchor {
                Some((n, _)) if n > 0 => cx.problem(
                    &path,
                    None,
                    format!("key audit log missing; the keystore vouches for {n} records"),
                ),
                _ => cx.note(
                    &path,
                    None,
                    "no key audit log yet (the next open starts it)",
                ),
            }
            return;
        }
        Err(e) => {
            cx.problem(&path, None, format!("cannot read the key audit log: {e}"));
            return;
        }
    };
    let version = log_version(&bytes);
    let key = ks.and_then(|k| k.audit_key.as_ref());
    if version == Some(2) && ks.is_some() && key.is_none() {
        upgrade_cut_short(cx, dir, &path);
        return;
    }
    let (log, sizes) = match version {
        Some(1) => (v1::decode_log(&bytes), (v1::HEADER_LEN, v1::RECORD_LEN)),
        _ => (
            decode_log(&bytes, key.map(|k| k.expose())),
            (HEADER_LEN, RECORD_LEN),
        ),
    };
    let log = match log {
        Ok(l) => l,
        Err(e) => {
            let Error::Corruption { offset, kind, .. } = e.into_error(&path, 0) else {
                cx.problem(&path, Some(8), "key audit log of an unknown version");
                return;
            };
            let past_anchor = (sizes.0 + anchor.map_or(0, |a| a.0 as usize) * sizes.1) as u64;
            if offset >= past_anchor && key.is_some() {
                // What the keystore does not vouch for yet: an append a crash cut short,
                // or records that do not verify (never used; the next open cuts them).
                cx.note(
                    &path,
                    Some(offset),
                    format!("records past the keystore's anchor do not check ({kind}); the next open cuts them"),
                );
            } else {
                cx.problem(&path, Some(offset), kind.to_string());
            }
            return;
        }
    };
    if version == Some(1) {
        cx.note(
            &path,
            None,
            "key audit log of format version 3 or earlier (unkeyed); the next open archives it and starts a keyed one",
        );
    } else if key.is_none() {
        cx.note(
            &path,
            None,
            "audit log macs not checked (no audit key in the keystore)",
        );
    }
    // A shred logs its record before the keystore without the key is written: records
    // the keystore vouches for, and (with a keyed log whose macs verified) records past
    // it, which the next open finishes.
    let trusted = if log.verified && version != Some(1) {
        log.records.len()
    } else {
        anchor.map_or(0, |(n, _)| n as usize)
    };
    cx.shredded.extend(
        log.records
            .iter()
            .take(trusted)
            .filter(|r| r.event == AuditEvent::DekShredded)
            .map(|r| r.subject),
    );
    let records = log.records.len() as u64;
    if log.torn_tail > 0 {
        cx.note(
            &path,
            Some((sizes.0 + records as usize * sizes.1) as u64),
            format!(
                "torn last record ({} bytes) of an interrupted append (recovery cuts it)",
                log.torn_tail
            ),
        );
    }
    let keyed = log.verified && version != Some(1);
    let reread = || keystore_generation(dir, provider);
    check_against_keystore(cx, &path, &log, ks, anchor, keyed, &reread);
    check_archived_log(cx, dir, log.predecessor);
}

/// The log against the keystore: it reaches the anchor, and (macs verified) no record
/// names a keystore write two or more past the keystore's.
fn check_against_keystore(
    cx: &mut Ctx,
    path: &Path,
    log: &crate::format::audit::AuditLog,
    ks: Option<&KeyStore>,
    anchor: Option<(u64, [u8; 32])>,
    keyed: bool,
    reread: &dyn Fn() -> Option<u64>,
) {
    let records = log.records.len() as u64;
    if let Some(a @ (n, _)) = anchor {
        if !log.reaches(a) {
            cx.problem(
                path,
                None,
                CorruptionKind::AuditLogBehindKeystore {
                    records,
                    anchored: n,
                }
                .to_string(),
            );
        }
    }
    if let (Some(ks), true) = (ks, keyed) {
        let newest = log.records.iter().map(|r| r.generation).max();
        match rollback(ks.generation(), newest, reread) {
            Rollback::No => {}
            Rollback::RewrittenWhileVerifying { now } => cx.note(
                path,
                None,
                format!(
                    "the keystore was rewritten while verifying (write {} read first, write {now} after the log): a running store",
                    ks.generation()
                ),
            ),
            Rollback::Yes { generation, log_generation } => cx.problem(
                path,
                None,
                CorruptionKind::KeystoreRolledBack {
                    generation,
                    log_generation,
                }
                .to_string(),
            ),
        }
    }
}

/// The keystore's generation as it is on disk now.
fn keystore_generation(dir: &Path, provider: &dyn KeyProvider) -> Option<u64> {
    let ks = KeyStore::load(&crate::vfs::RealFs, dir, provider).ok()??;
    Some(ks.generation())
}

/// What the log's newest keystore generation says of the keystore read before it.
#[derive(Debug, PartialEq, Eq)]
enum Rollback {
    No,
    /// A running store wrote the keystore again after it was read, and logged that.
    RewrittenWhileVerifying {
        now: u64,
    },
    Yes {
        generation: u64,
        log_generation: u64,
    },
}

/// A record of write g+2 is appended only after write g+1 succeeded, so a keystore at
/// `read` next to a log record of `read + 2` or later is rolled back — unless it is no
/// longer at `read`: the keystore is read before the log, and a running store may have
/// written it and logged the next write in between. `reread` reads the keystore's
/// generation again, after the log; only a keystore still two writes behind is rolled
/// back.
fn rollback(read: u64, newest: Option<u64>, reread: &dyn Fn() -> Option<u64>) -> Rollback {
    let behind = |g: u64, newest: u64| newest >= g.saturating_add(2);
    let Some(newest) = newest.filter(|&n| behind(read, n)) else {
        return Rollback::No;
    };
    match reread() {
        Some(now) if now > read && !behind(now, newest) => {
            Rollback::RewrittenWhileVerifying { now }
        }
        now => Rollback::Yes {
            generation: now.unwrap_or(read).max(read),
            log_generation: newest,
        },
    }
}

/// A keyed log next to a keystore without an audit key: an upgrade cut short before its
/// keystore write. Nothing in this log can be checked or trusted; the archive's chain can.
fn upgrade_cut_short(cx: &mut Ctx, dir: &Path, path: &Path) {
    cx.note(
        path,
        None,
        "an upgrade to a keyed audit log was cut short; the next open redoes it from KEYS.audit.v1",
    );
    check_archived_log(cx, dir, (u64::MAX, [0; 32]));
}

/// The version-1 log archived at the upgrade (`KEYS.audit.v1`): it must chain and end
/// where the keyed log's header says its predecessor ended.
fn check_archived_log(cx: &mut Ctx, dir: &Path, (count, head): (u64, [u8; 32])) {
    use crate::format::audit::v1;
    let path = dir.join(crate::keys::audit::ARCHIVE_V1);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if count > 0 {
                cx.problem(
                    &path,
                    None,
                    format!("archived key audit log missing; the keyed log continues one of {count} records"),
                );
            }
            return;
        }
        Err(e) => {
            cx.problem(
                &path,
                None,
                format!("cannot read the archived key audit log: {e}"),
            );
            return;
        }
    };
    match v1::decode_log(&bytes) {
        Ok(l) if count == u64::MAX => {
            let _ = l; // only the chain is checked: no keyed log names the archive's end yet
        }
        Ok(l) if l.records.len() as u64 == count && l.head() == head && l.torn_tail == 0 => {}
        Ok(l) => cx.problem(
            &path,
            None,
            format!(
                "archived key audit log has {} records; the keyed log continues one of {count} with another last hash",
                l.records.len()
            ),
        ),
        Err(e) => match e.into_error(&path, 0) {
            Error::Corruption { offset, kind, .. } => {
                cx.problem(&path, Some(offset), kind.to_string());
            }
            other => cx.problem(&path, None, other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keystore_rewritten_between_its_read_and_the_logs_is_no_rollback() {
        let never = || -> Option<u64> { panic!("read again only when behind") };
        assert_eq!(rollback(973, Some(974), &never), Rollback::No);
        assert_eq!(rollback(973, None, &never), Rollback::No);
        // The CI failure: write 973 read, then the store wrote 974 and logged 975.
        assert_eq!(
            rollback(973, Some(975), &|| Some(974)),
            Rollback::RewrittenWhileVerifying { now: 974 }
        );
        // A keystore put back stays behind however often it is read.
        let yes = Rollback::Yes {
            generation: 973,
            log_generation: 975,
        };
        assert_eq!(rollback(973, Some(975), &|| Some(973)), yes);
        assert_eq!(rollback(973, Some(975), &|| None), yes);
        // Rewritten, but still two behind the log: rolled back.
        assert_eq!(
            rollback(973, Some(980), &|| Some(975)),
            Rollback::Yes {
                generation: 975,
                log_generation: 980
            }
        );
    }
}
