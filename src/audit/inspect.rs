//! `inspect`: what a data dir holds. Without a key it shows exactly what is in plaintext
//! (what an attacker without keys sees); with the key it adds message counts, queues and
//! ages.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::{list, read};
use crate::crypto::SealKey;
use crate::format::frame::FrameKind;
use crate::format::keystore::KeystoreImage;
use crate::format::segment_header::SegmentHeader;
use crate::keys::keystore::KeyStore;
use crate::keys::KeyProvider;
use crate::segment::scan::{self, Content};
use crate::Result;

/// One segment file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: u64,
    pub file: PathBuf,
    pub size: u64,
    /// Frames before the seal (messages and ack batches).
    pub records: u64,
    /// "sealed", "active" (being written, or a crash left it unsealed), or "damaged".
    pub state: &'static str,
    pub dek_id: Option<u64>,
    pub kek_id: Option<u64>,
    pub has_key: bool,
    /// With the key: messages live (not acked, not expired), acked, expired.
    pub live: Option<u64>,
    pub acked: Option<u64>,
    pub expired: Option<u64>,
    pub ack_records: Option<u64>,
}

/// The keystore, as far as its plaintext shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeystoreInfo {
    pub present: bool,
    pub live_keys: u64,
    pub generation: u64,
    pub next_segment_id: u64,
    /// Segment ids with a key but no file.
    pub keys_without_file: Vec<u64>,
}

/// Queue statistics (with the key). Queue ids appear only if asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSummary {
    pub queues: u64,
    /// (bucket label, number of queues whose live length falls in it).
    pub length_histogram: Vec<(String, u64)>,
    /// (queue id, live length), only with `show_queues`.
    pub queue_lengths: Option<Vec<(Vec<u8>, u64)>>,
}

/// What `inspect` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InspectReport {
    pub segments: Vec<SegmentInfo>,
    pub keystore: KeystoreInfo,
    /// Segment files whose key is gone (shredded, or a stale keystore).
    pub segments_without_key: Vec<u64>,
    pub unknown_files: Vec<PathBuf>,
    /// With the key:
    pub queues: Option<QueueSummary>,
    pub live_messages: Option<u64>,
    pub oldest_live_age_ms: Option<u64>,
    /// Records still decryptable although their message is acked or expired.
    pub dead_but_openable: Option<u64>,
    /// How long ago the longest-expired of those expired.
    pub oldest_expired_openable_age_ms: Option<u64>,
}

/// Inspects `dir`. `provider` adds what only the key can show; `now_ms` is the time ages
/// are measured against; `show_queues` lists queue ids (off by default: they identify
/// recipients).
pub fn inspect(
    dir: &Path,
    provider: Option<&dyn KeyProvider>,
    now_ms: u64,
    show_queues: bool,
) -> Result<InspectReport> {
    let listing = list(dir)?;
    let mut r = InspectReport {
        unknown_files: listing.unknown.clone(),
        ..InspectReport::default()
    };
    let mut keyed: HashSet<u64> = HashSet::new();
    if let Some(p) = &listing.keystore {
        if let Ok(img) = KeystoreImage::decode(&read(p)?) {
            keyed = img.entries.iter().map(|e| e.segment_id).collect();
            r.keystore = KeystoreInfo {
                present: true,
                live_keys: img.entries.len() as u64,
                generation: img.generation,
                next_segment_id: img.next_segment_id,
                keys_without_file: img
                    .entries
                    .iter()
                    .map(|e| e.segment_id)
                    .filter(|id| !listing.segments.contains_key(id))
                    .collect(),
            };
        }
    }
    let ks = match provider {
        Some(p) => KeyStore::load(&crate::vfs::RealFs, dir, p)?,
        None => None,
    };
    let mut files: Vec<(u64, PathBuf, Vec<u8>)> = Vec::new();
    for (&id, path) in &listing.segments {
        let Ok(bytes) = read(path) else { continue }; // shredded while we looked
        if !keyed.contains(&id) {
            r.segments_without_key.push(id);
        }
        files.push((id, path.clone(), bytes));
    }
    let mut keys: HashMap<u64, SealKey> = HashMap::new();
    if let (Some(ks), Some(p)) = (&ks, provider) {
        for (id, _, _) in &files {
            if let Ok(Some(dek)) = ks.unwrap_key(*id, p) {
                keys.insert(*id, SealKey::new(&dek));
            }
        }
    }
    let scans: Vec<scan::SegmentScan> = files
        .iter()
        .map(|(id, _, bytes)| scan::scan(bytes, *id, keys.get(id), false))
        .collect();
    for ((id, path, bytes), walk) in files.iter().zip(&scans) {
        r.segments
            .push(plain_info(*id, path, bytes, walk, keyed.contains(id)));
    }
    if provider.is_some() {
        with_key(&mut r, &scans, now_ms, show_queues);
    }
    Ok(r)
}

fn plain_info(
    id: u64,
    path: &Path,
    bytes: &[u8],
    walk: &scan::SegmentScan,
    has_key: bool,
) -> SegmentInfo {
    let header = SegmentHeader::decode(bytes).ok();
    let sealed = walk.frames.last().is_some_and(|f| {
        matches!(
            f.content,
            Content::Seal(_) | Content::Sealed(FrameKind::Seal)
        )
    });
    let state = if walk.stopped.as_ref().is_some_and(|_| walk.dropped > 0)
        || !walk.auth_failures.is_empty()
        || header.is_none()
    {
        "damaged"
    } else if sealed {
        "sealed"
    } else {
        "active"
    };
    SegmentInfo {
        id,
        file: path.to_path_buf(),
        size: bytes.len() as u64,
        records: walk.records,
        state,
        dek_id: header.map(|h| h.dek_id),
        kek_id: header.map(|h| h.kek_id),
        has_key,
        ..SegmentInfo::default()
    }
}

/// Counts only the key can give: acks across all segments, then each message's fate.
fn with_key(r: &mut InspectReport, scans: &[scan::SegmentScan], now_ms: u64, show_queues: bool) {
    let acked: HashSet<u64> = scans
        .iter()
        .flat_map(|s| s.frames.iter())
        .filter_map(|f| match &f.content {
            Content::Acks(ids) => Some(ids.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    let mut queues: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let (mut live_total, mut dead, mut oldest_created, mut oldest_expired) =
        (0u64, 0u64, u64::MAX, u64::MAX);
    for (info, walk) in r.segments.iter_mut().zip(scans) {
        let (mut live, mut ack, mut exp, mut ack_records) = (0u64, 0u64, 0u64, 0u64);
        for f in &walk.frames {
            match &f.content {
                Content::Message {
                    id,
                    created_at_ms,
                    expires_at_ms,
                    queue,
                    ..
                } => {
                    if acked.contains(id) {
                        ack += 1;
                    } else if *expires_at_ms <= now_ms {
                        exp += 1;
                        oldest_expired = oldest_expired.min(*expires_at_ms);
                    } else {
                        live += 1;
                        oldest_created = oldest_created.min(*created_at_ms);
                        *queues.entry(queue.clone()).or_default() += 1;
                    }
                }
                Content::Acks(_) => ack_records += 1,
                Content::Seal(_) | Content::Sealed(_) => {}
            }
        }
        if info.has_key {
            dead += ack + exp;
        }
        live_total += live;
        info.live = Some(live);
        info.acked = Some(ack);
        info.expired = Some(exp);
        info.ack_records = Some(ack_records);
    }
    r.live_messages = Some(live_total);
    r.dead_but_openable = Some(dead);
    r.oldest_live_age_ms =
        (oldest_created != u64::MAX).then(|| now_ms.saturating_sub(oldest_created));
    r.oldest_expired_openable_age_ms =
        (oldest_expired != u64::MAX).then(|| now_ms.saturating_sub(oldest_expired));
    r.queues = Some(summarize(&queues, show_queues));
}

fn summarize(queues: &BTreeMap<Vec<u8>, u64>, show: bool) -> QueueSummary {
    let buckets: [(&str, u64, u64); 5] = [
        ("1", 1, 1),
        ("2-10", 2, 10),
        ("11-100", 11, 100),
        ("101-1000", 101, 1000),
        (">1000", 1001, u64::MAX),
    ];
    QueueSummary {
        queues: queues.len() as u64,
        length_histogram: buckets
            .iter()
            .map(|(label, lo, hi)| {
                (
                    (*label).to_string(),
                    queues.values().filter(|&&n| n >= *lo && n <= *hi).count() as u64,
                )
            })
            .collect(),
        queue_lengths: show.then(|| queues.iter().map(|(q, n)| (q.clone(), *n)).collect()),
    }
}
