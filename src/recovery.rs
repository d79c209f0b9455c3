//! Opening a data dir: lock it, load and check the keystore, reconcile it with the
//! segment files, scan every segment (in parallel), truncate torn tails, rebuild the
//! index, and apply ack records.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::{Dek, SealKey};
use crate::error::{CorruptionKind, Error, Result};
use crate::format::audit::AuditEvent;
use crate::format::segment_header::SegmentHeader;
use crate::fsutil;
use crate::keys::audit::{
    AuditCheck, KeyAudit, ARCHIVE_V1 as AUDIT_ARCHIVE, FILE_NAME as AUDIT_FILE,
};
use crate::keys::keystore::{KeyStore, FILE_NAME as KEYSTORE_FILE};
use crate::keys::KeyProvider;
use crate::options::RecoveryMode;
use crate::segment::codec;
use crate::segment::scan::{self, Content};
use crate::segment::{self, Segment};
use crate::vfs::FileSystem;

/// Ids are skipped by this much at every open, so an id handed out in Async mode but
/// lost in a crash is never issued again.
pub const ID_SKIP_ON_OPEN: u64 = 1 << 24;

/// What recovery found and did. Returned by [`crate::Store::recovery_report`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments scanned.
    pub segments: usize,
    /// Segments that were still being written at the last stop (no seal) and were
    /// sealed by recovery.
    pub unsealed: usize,
    /// Torn tails cut: (file, offset of the first bad byte, bytes dropped that were not
    /// zero). Only in segments that were being written at a crash.
    pub truncated: Vec<(PathBuf, u64, u64)>,
    /// Segment files without a key (a shred interrupted between its two steps): deleted.
    pub deleted_unkeyed: Vec<PathBuf>,
    /// Keys without a segment file (a creation interrupted): dropped.
    pub orphan_keys: usize,
    /// Sealed segments whose file was missing, dropped with their keys
    /// (`RecoveryMode::SalvageMissingSegments` only; any other mode fails the open).
    pub missing_segments: Vec<PathBuf>,
    /// Files in the data dir that cinder does not know (left alone).
    pub unknown_files: Vec<PathBuf>,
    /// Message records read.
    pub records: u64,
    /// Live messages rebuilt into the index.
    pub live: u64,
    /// Bytes of segment data scanned.
    pub bytes_scanned: u64,
    /// Bytes of a torn last record cut from the key audit log (a crash inside an append).
    pub audit_torn_tail_cut: usize,
    /// The key audit log was started at this open (a new store, or one written by a
    /// version without it).
    pub audit_log_created: bool,
    /// The key audit log was upgraded to a keyed one at this open (a store from format
    /// version 3 or earlier): the old log is kept as `KEYS.audit.v1`.
    pub audit_log_upgraded: bool,
    /// This open finished a master-key rotation a crash had interrupted: (old KEK id, new
    /// KEK id). The keystore was under the old key; see `Options::previous_key_provider`.
    pub master_key_rotated: Option<(u64, u64)>,
}

/// A live message found on disk.
#[derive(Debug)]
pub struct FoundMessage {
    pub queue: Vec<u8>,
    /// The sender's client message id (idempotent appends), if it gave one.
    pub client_id: Option<crate::index::dedupe::ClientId>,
    pub id: u64,
    pub seg: u64,
    pub off: u64,
    pub len: u32,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Everything `Store::open` needs.
#[derive(Debug)]
pub struct Recovered {
    pub keystore: KeyStore,
    pub audit: KeyAudit,
    /// Time of the last master-key rotation in the audit log (or of its first record).
    pub last_rotation_ms: Option<u64>,
    pub segments: Vec<Arc<Segment>>,
    pub messages: Vec<FoundMessage>,
    pub next_id: u64,
    pub report: RecoveryReport,
}

struct Scanned {
    seg: Segment,
    messages: Vec<FoundMessage>,
    acks: Vec<u64>,
    max_id: u64,
    truncated: Option<(u64, u64)>,
    was_sealed: bool,
    bytes: u64,
}

/// Files found in the data dir.
struct Listing {
    segments: HashMap<u64, PathBuf>,
    unknown: Vec<PathBuf>,
}

fn list_dir(fs: &dyn FileSystem, dir: &Path) -> Result<Listing> {
    let mut l = Listing {
        segments: HashMap::new(),
        unknown: Vec::new(),
    };
    let entries = fs
        .list_dir(dir)
        .map_err(|e| Error::io("list data dir", dir, e))?;
    for (name, path) in entries {
        if let Some(id) = segment::parse_file_name(&name) {
            l.segments.insert(id, path);
        } else if name
            .strip_suffix(".tmp")
            .and_then(segment::parse_file_name)
            .is_some()
        {
            // A segment creation interrupted before its rename: its key (if persisted) has
            // no file and is dropped below.
            fs.remove_file(&path)
                .map_err(|e| Error::io("remove temp segment", &path, e))?;
        } else if name == format!("{KEYSTORE_FILE}.tmp")
            || name == format!("{AUDIT_FILE}.tmp")
            || name == format!("{AUDIT_ARCHIVE}.tmp")
        {
            // An interrupted keystore write: the rename never happened, the old file rules.
            fs.remove_file(&path)
                .map_err(|e| Error::io("remove temp keystore", &path, e))?;
        } else if ![KEYSTORE_FILE, AUDIT_FILE, AUDIT_ARCHIVE, "LOCK"].contains(&name.as_str()) {
            l.unknown.push(path);
        }
    }
    Ok(l)
}

/// Loads the keystore, or creates an empty one for a new data dir.
fn load_keystore(
    fs: &dyn FileSystem,
    dir: &Path,
    provider: &dyn KeyProvider,
    has_segments: bool,
) -> Result<KeyStore> {
    match KeyStore::load(fs, dir, provider)? {
        Some(ks) => Ok(ks),
        None if !has_segments => {
            let mut ks = KeyStore::new_empty(dir)?;
            ks.persist(fs, provider)?;
            Ok(ks)
        }
        None => Err(Error::corruption(
            KeyStore::path_in(dir),
            0,
            CorruptionKind::MissingKeystore,
        )),
    }
}

/// Matches segment files with keys. Returns the files whose key was shredded (to delete);
/// drops keys without files from `ks`. A key without a file whose segment was sealed
/// (the keystore knows its final length) is not an interrupted creation: the file was
/// lost or deleted, and with it durable messages or the ack records that keep acked
/// messages dead. That fails the open (`SegmentMissing`) unless the mode salvages.
fn reconcile(
    (dir, ks): (&Path, &mut KeyStore),
    files: &HashMap<u64, PathBuf>,
    (mode, report): (RecoveryMode, &mut RecoveryReport),
    dropped: &mut Vec<crate::keys::audit::Event>,
) -> Result<Vec<PathBuf>> {
    let mut unkeyed = Vec::new();
    for (&id, path) in files {
        if ks.contains(id) {
            continue;
        }
        if id >= ks.next_segment_id {
            return Err(Error::corruption(
                ks.path(),
                0,
                CorruptionKind::StaleKeystore {
                    segment_id: id,
                    next_segment_id: ks.next_segment_id,
                },
            ));
        }
        unkeyed.push(path.clone());
    }
    let mut orphans: Vec<u64> = ks
        .segment_ids()
        .filter(|id| !files.contains_key(id))
        .collect();
    orphans.sort_unstable();
    for &id in &orphans {
        let sealed_len = ks.sealed_len(id);
        if sealed_len != 0 {
            let path = dir.join(segment::file_name(id));
            if mode != RecoveryMode::SalvageMissingSegments {
                return Err(Error::corruption(
                    path,
                    0,
                    CorruptionKind::SegmentMissing {
                        segment_id: id,
                        sealed_len,
                    },
                ));
            }
            report.missing_segments.push(path);
        } else {
            report.orphan_keys += 1;
        }
        if let Some(e) = ks.remove(id) {
            dropped.push((AuditEvent::DekShredded, id, e.kek_id));
        }
    }
    Ok(unkeyed)
}

/// Recovers the data dir (already locked by the caller).
pub fn recover(
    (fs, dir): (&Arc<dyn FileSystem>, &Path),
    provider: &dyn KeyProvider,
    mode: RecoveryMode,
    now_ms: u64,
    max_shred_delay_ms: u64,
) -> Result<Recovered> {
    let listing = list_dir(&**fs, dir)?;
    // A keystore rename an earlier process made visible but could not make durable (its
    // directory fsync failed) is made durable now, before any audit record of a later
    // write names its generation: otherwise a power cut could bring back the older
    // keystore next to those records, which reads as a keystore rolled back.
    fsutil::sync_dir(&**fs, dir)?;
    let mut report = RecoveryReport {
        unknown_files: listing.unknown,
        ..RecoveryReport::default()
    };
    let mut ks = load_keystore(&**fs, dir, provider, !listing.segments.is_empty())?;
    // The engine's time: never before the time the store persisted last (a clock set
    // back after a persisted forward jump; see `options::EngineClock`).
    let now_ms = now_ms.max(ks.time_floor_ms);
    // A keystore from format version 3 or earlier has no audit key: the log is upgraded
    // to a keyed one under a new key, which the keystore written below keeps.
    let upgrade = ks.audit_key.is_none();
    let audit_key = match &ks.audit_key {
        Some(k) => Arc::clone(k),
        None => Arc::new(Dek::generate()?),
    };
    let check = AuditCheck {
        anchor: ks.audit_anchor,
        generation: ks.generation(),
        key: &audit_key,
        upgrade,
    };
    let (mut audit, found) = KeyAudit::open(fs, dir, &check, mode)?;
    ks.audit_key = Some(audit_key);
    report.audit_torn_tail_cut = found.torn_tail_cut;
    report.audit_log_created = found.created;
    report.audit_log_upgraded = found.upgraded;
    let last_rotation_ms = found.last_rotation_ms;
    let mut events = Vec::new();
    let unkeyed = reconcile(
        (dir, &mut ks),
        &listing.segments,
        (mode, &mut report),
        &mut events,
    )?;
    let mut work = Vec::new();
    let mut ids: Vec<u64> = ks.segment_ids().collect();
    ids.sort_unstable();
    for id in ids {
        let dek = ks
            .unwrap_key(id, provider)?
            .ok_or_else(|| Error::corruption(ks.path(), 0, CorruptionKind::AuthenticationFailed))?;
        events.push((AuditEvent::DekUnwrapped, id, ks.kek_of(id).unwrap_or(0)));
        work.push((id, listing.segments[&id].clone(), dek, ks.sealed_len(id)));
    }
    audit.append(&events, now_ms, ks.generation() + 1)?;
    let scanned = scan_all(fs, work, mode)?;
    let Rebuilt {
        segments,
        messages,
        max_id,
    } = rebuild(scanned, &mut ks, &mut report, (now_ms, max_shred_delay_ms));
    let next_id = max_id
        .max(ks.id_floor)
        .saturating_add(1)
        .saturating_add(ID_SKIP_ON_OPEN);
    ks.id_floor = next_id;
    ks.time_floor_ms = ks.time_floor_ms.max(now_ms);
    ks.audit_anchor = Some(audit.anchor());
    ks.persist(&**fs, provider)?;
    // Keys of these are gone already: finish the interrupted shreds.
    for p in &unkeyed {
        fs.remove_file(p)
            .map_err(|e| Error::io("remove shredded segment", p, e))?;
    }
    if !unkeyed.is_empty() {
        fsutil::sync_dir(&**fs, dir)?;
    }
    report.deleted_unkeyed = unkeyed;
    Ok(Recovered {
        keystore: ks,
        audit,
        last_rotation_ms,
        segments,
        messages,
        next_id,
        report,
    })
}

/// What `rebuild` found.
struct Rebuilt {
    segments: Vec<Arc<Segment>>,
    /// Live messages, sorted by id.
    messages: Vec<FoundMessage>,
    max_id: u64,
}

/// Applies acks to the scanned messages, counts what is live per segment and links ack
/// segments to the segments they protect. Returns the segments, the live messages
/// sorted by id, and the largest id seen.
fn rebuild(
    scanned: Vec<Scanned>,
    ks: &mut KeyStore,
    report: &mut RecoveryReport,
    (now_ms, max_shred_delay_ms): (u64, u64),
) -> Rebuilt {
    use std::sync::atomic::Ordering::SeqCst;
    // Acks first, so acked messages never enter the index.
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut max_id = 0;
    for s in &scanned {
        for &id in &s.acks {
            acked.entry(id).or_insert(s.seg.id);
        }
    }
    // A message copied by a compaction that a crash interrupted is in two segments: the
    // copy (in the newer segment) wins. A compaction retried after a failure can leave
    // two copies in one survivor: the later one wins. Every segment holding a copy of a
    // message is linked with the others (`Links::copies`): an ack protects them all.
    let mut newest: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut holders: HashMap<u64, Vec<u64>> = HashMap::new();
    for s in &scanned {
        for m in &s.messages {
            let e = newest.entry(m.id).or_insert((m.seg, m.off));
            if *e != (m.seg, m.off) {
                let h = holders.entry(m.id).or_insert_with(|| vec![e.0]);
                if !h.contains(&m.seg) {
                    h.push(m.seg);
                }
            }
            *e = (*e).max((m.seg, m.off));
        }
    }
    let death_floor_ms = now_ms.saturating_sub(max_shred_delay_ms);
    let mut segments = Vec::with_capacity(scanned.len());
    let mut messages = Vec::new();
    let mut links: Vec<(u64, u64)> = Vec::new();
    for s in scanned {
        report.segments += 1;
        report.bytes_scanned += s.bytes;
        report.unsealed += usize::from(!s.was_sealed);
        if let Some((off, dropped)) = s.truncated {
            report.truncated.push((s.seg.path.clone(), off, dropped));
        }
        max_id = max_id.max(s.max_id);
        ks.mark_sealed(s.seg.id, s.seg.written.load(SeqCst));
        s.seg.has_acks.store(!s.acks.is_empty(), SeqCst);
        for m in s.messages {
            report.records += 1;
            s.seg.records.fetch_add(1, SeqCst);
            s.seg.max_expiry_ms.fetch_max(m.expires_at_ms, SeqCst);
            s.seg.min_expiry_ms.fetch_min(m.expires_at_ms, SeqCst);
            let is_newest = newest.get(&m.id) == Some(&(m.seg, m.off));
            if let Some(&src) = acked.get(&m.id) {
                if src != m.seg {
                    links.push((src, m.seg));
                }
                // Acked before the last stop, at an unknown time: due for shredding now.
                // Its client id (if any) is not remembered: an ack record cannot tell an
                // ack from a purge, and a purge must forget it.
                s.seg.mark_acked(death_floor_ms);
            } else if !is_newest {
                // An older copy of a message a compaction copied before a crash: the
                // newer copy is the live one.
                s.seg.mark_acked(death_floor_ms);
            } else if m.expires_at_ms > now_ms {
                s.seg.live.fetch_add(1, SeqCst);
                s.seg
                    .first_ms
                    .fetch_min(m.created_at_ms.min(now_ms), SeqCst);
                report.live += 1;
                messages.push(m);
            }
        }
        segments.push(Arc::new(s.seg));
    }
    let by_id: HashMap<u64, &Arc<Segment>> = segments.iter().map(|s| (s.id, s)).collect();
    for (src, target) in links {
        if let (Some(a), Some(t)) = (by_id.get(&src), by_id.get(&target)) {
            a.links.lock().ack_targets.insert(t.id);
            t.links.lock().ack_sources.insert(a.id);
        }
    }
    for segs in holders.values() {
        for &a in segs {
            if let Some(s) = by_id.get(&a) {
                let mut l = s.links.lock();
                l.copies.extend(segs.iter().copied().filter(|&b| b != a));
            }
        }
    }
    messages.sort_unstable_by_key(|m| m.id);
    Rebuilt {
        segments,
        messages,
        max_id,
    }
}

/// Scans segments on up to two threads (recovery time follows live data, not cores).
fn scan_all(
    fs: &Arc<dyn FileSystem>,
    work: Vec<(u64, PathBuf, Dek, u64)>,
    mode: RecoveryMode,
) -> Result<Vec<Scanned>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .clamp(1, 4);
    let mut buckets: Vec<Vec<(u64, PathBuf, Dek, u64)>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (i, w) in work.into_iter().enumerate() {
        buckets[i % threads].push(w);
    }
    let results: Vec<Result<Vec<Scanned>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = buckets
            .into_iter()
            .map(|b| {
                sc.spawn(move || {
                    b.into_iter()
                        .map(|(id, p, k, sealed_len)| {
                            scan_segment(fs, (id, &p), &k, sealed_len, mode)
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::InvalidOptions("recovery thread panicked".into()))
                })
            })
            .collect()
    });
    let mut out = Vec::new();
    for r in results {
        out.extend(r?);
    }
    out.sort_by_key(|s| s.seg.id);
    Ok(out)
}

/// Scans one segment. A sealed segment must be intact; an unsealed one (being written at
/// a crash) may end in a torn tail, which is cut at the first bad frame and then sealed.
///
/// The repair is crash-safe and idempotent: first the file is cut at the end of the last
/// good frame and fsynced (a crash leaves an unsealed segment without its torn tail, which
/// the next recovery repairs again); then the seal is appended and fsynced (a crash leaves
/// at most a torn seal: a torn tail again). Never a seal with bytes after it.
fn scan_segment(
    fs: &Arc<dyn FileSystem>,
    (id, path): (u64, &Path),
    dek: &Dek,
    sealed_len: u64,
    mode: RecoveryMode,
) -> Result<Scanned> {
    let file = fs
        .open(path)
        .map_err(|e| Error::io("open segment", path, e))?;
    let bytes = fs
        .read(path)
        .map_err(|e| Error::io("read segment", path, e))?;
    let len = bytes.len() as u64;
    let key = SealKey::new(dek);
    check_header(&bytes, id, path)?;
    let sealed = scan::ends_with_valid_seal(&key, id, &bytes);
    if sealed_len != 0 && (len != sealed_len || !sealed) {
        // The keystore says this segment was sealed at `sealed_len` bytes.
        let kind = if len < sealed_len {
            CorruptionKind::Truncated {
                needed: sealed_len,
                available: len,
            }
        } else {
            CorruptionKind::MissingSeal
        };
        return Err(Error::corruption(path, len.min(sealed_len), kind));
    }
    let walk = scan::scan(&bytes, id, Some(&key), false);
    if let Some((off, kind)) = walk.auth_failures.first().or(walk.seal_problem.as_ref()) {
        return Err(Error::corruption(path, *off, kind.clone()));
    }
    let mut out = Scanned {
        seg: Segment::open_recovered(Arc::clone(fs), (id, path.to_path_buf()), dek, file),
        messages: Vec::new(),
        acks: Vec::new(),
        max_id: 0,
        truncated: None,
        was_sealed: sealed,
        bytes: len,
    };
    collect(&walk, id, &mut out);
    let mut end = walk.end;
    if let Some((bad, kind)) = walk.stopped.clone() {
        // Zeros after the last frame of an unsealed segment are its preallocation: a clean
        // end, not damage. Anything else there is a torn tail, unless the bad frame was
        // written whole and data follows it (bit rot in durable data, not a write a
        // crash cut short: cutting there would drop durable frames, acks included).
        if sealed
            || (mode == RecoveryMode::Strict && walk.dropped > 0)
            || (walk.dropped > 0 && scan::damaged_mid_segment(&bytes, bad))
        {
            return Err(Error::corruption(path, bad as u64, kind));
        }
        if walk.dropped > 0 {
            out.truncated = Some((bad as u64, walk.dropped));
        }
    }
    if end != bytes.len() && !walk.sealed {
        out.seg.truncate(end as u64)?;
        out.seg.sync()?;
    }
    if !walk.sealed {
        // Seal it now (the seal's nonce is random, never an offset: no nonce repeats).
        let salt = crate::crypto::random_u64()?;
        let f = codec::seal_segment(&key, id, end as u64, walk.records, walk.data_crc, salt);
        out.seg.write_at(&f, end as u64)?;
        end += f.len();
        out.seg.sync()?;
    } else if end != bytes.len() {
        // Zeros after a valid seal: the writer's seal landed, its cut did not.
        out.seg.truncate(end as u64)?;
        out.seg.sync()?;
    }
    drop(bytes);
    out.seg
        .written
        .store(end as u64, std::sync::atomic::Ordering::SeqCst);
    out.seg
        .durable
        .store(end as u64, std::sync::atomic::Ordering::SeqCst);
    out.seg.map_for_reading()?;
    Ok(out)
}

fn check_header(bytes: &[u8], id: u64, path: &Path) -> Result<()> {
    let h = SegmentHeader::decode(bytes).map_err(|e| e.into_error(path, 0))?;
    if h.segment_id != id {
        return Err(Error::corruption(
            path,
            16,
            CorruptionKind::SegmentIdMismatch {
                expected: id,
                got: h.segment_id,
            },
        ));
    }
    if h.dek_id != id {
        let kind = CorruptionKind::BadField {
            field: "segment dek id",
            value: h.dek_id,
        };
        return Err(Error::corruption(path, 24, kind));
    }
    Ok(())
}

/// Takes the messages and acks out of a scan.
fn collect(walk: &scan::SegmentScan, seg: u64, out: &mut Scanned) {
    for f in &walk.frames {
        match &f.content {
            Content::Acks(ids) => {
                out.max_id = out.max_id.max(ids.iter().copied().max().unwrap_or(0));
                out.acks.extend(ids);
            }
            Content::Message {
                id,
                created_at_ms,
                expires_at_ms,
                queue,
                client_id,
                ..
            } => {
                out.max_id = out.max_id.max(*id);
                out.messages.push(FoundMessage {
                    queue: queue.clone(),
                    client_id: *client_id,
                    id: *id,
                    seg,
                    off: f.offset,
                    len: f.len,
                    created_at_ms: *created_at_ms,
                    expires_at_ms: *expires_at_ms,
                });
            }
            Content::Seal(_) | Content::Sealed(_) => {}
        }
    }
}
