//! cinder through its public API: its own per-segment encryption, no application-level
//! sealing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cinder::format::frame::{FrameHeader, FrameKind};
use cinder::format::segment_header::HEADER_LEN;
use cinder::{Durability, FileKeyProvider, MessageId, NewMessage, Options, Store};

use crate::backend::{Backend, Mode, Msg, Sample, R, SAMPLE_LEN};

const TTL: Duration = Duration::from_secs(3600);

pub struct Cinder {
    store: Store,
    dir: PathBuf,
    key: Arc<FileKeyProvider>,
    /// Flush after every put/delete: the Async store then behaves like "commit with fsync
    /// per call", for calls that span several queues (the mixed phase).
    flush_each: bool,
    max_shred_delay: Duration,
    /// Segments that held records when `samples` ran: the ones the deletes make dead.
    sampled_segments: Mutex<HashSet<u64>>,
}

/// How cinder is opened for a run.
#[derive(Debug, Clone, Copy)]
pub enum CinderMode {
    /// Group commit; every call returns durable.
    Group,
    /// Async with a flush (fsync) after every call.
    AsyncFlushEach,
    /// Async, no flush: the no-sync mode.
    Async,
}

impl CinderMode {
    pub fn for_mode(m: Mode) -> Self {
        match m {
            Mode::Sync => CinderMode::Group,
            Mode::NoSync => CinderMode::Async,
        }
    }
}

impl Cinder {
    pub fn open(
        dir: &Path,
        key_dir: &Path,
        mode: CinderMode,
        max_shred_delay: Duration,
    ) -> R<Self> {
        let key = Arc::new(FileKeyProvider::open_or_create(
            key_dir.join("master.key"),
            true,
        )?);
        let mut o = Options::new(key.clone());
        o.durability = match mode {
            CinderMode::Group => Durability::default(),
            CinderMode::Async | CinderMode::AsyncFlushEach => Durability::Async,
        };
        o.max_shred_delay = max_shred_delay;
        o.max_queue_len = u64::MAX;
        o.max_queue_bytes = u64::MAX;
        o.max_disk_bytes = 1 << 40;
        Ok(Cinder {
            store: Store::open(dir, o)?,
            dir: dir.to_path_buf(),
            key,
            flush_each: matches!(mode, CinderMode::AsyncFlushEach),
            max_shred_delay,
            sampled_segments: Mutex::default(),
        })
    }

    fn inspect(&self) -> R<cinder::InspectReport> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        Ok(cinder::inspect(&self.dir, Some(&*self.key), now, false)?)
    }

    fn committed(&self) -> R<()> {
        if self.flush_each {
            self.store.flush()?;
        }
        Ok(())
    }
}

fn qid(queue: u32) -> [u8; 4] {
    queue.to_be_bytes()
}

impl Backend for Cinder {
    fn put(&self, batch: &[Msg<'_>]) -> R<Vec<u64>> {
        let qs: Vec<[u8; 4]> = batch.iter().map(|m| qid(m.queue)).collect();
        let items: Vec<NewMessage<'_>> = batch
            .iter()
            .zip(&qs)
            .map(|(m, q)| NewMessage {
                queue: q,
                payload: m.payload,
                ttl: TTL,
            })
            .collect();
        let ids = self.store.append_batch(&items)?;
        self.committed()?;
        Ok(ids.into_iter().map(|i| i.0).collect())
    }

    fn scan(&self, queue: u32, max: usize, f: &mut dyn FnMut(u64, &[u8])) -> R<usize> {
        let mut after = None;
        let mut n = 0;
        while n < max {
            let page = self.store.read(&qid(queue), after, (max - n).min(256))?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.id);
            n += page.len();
            for m in &page {
                f(m.id.0, &m.payload);
            }
        }
        Ok(n)
    }

    fn delete(&self, batch: &[(u32, u64)]) -> R<()> {
        // ack_batch is scoped to one queue: one call per run of the same queue.
        let mut ids = Vec::with_capacity(batch.len());
        let mut i = 0;
        while i < batch.len() {
            let q = batch[i].0;
            ids.clear();
            while i < batch.len() && batch[i].0 == q {
                ids.push(MessageId(batch[i].1));
                i += 1;
            }
            let n = self.store.ack_batch(&qid(q), &ids)?;
            if n != ids.len() as u64 {
                return Err(format!("acked {n} of {} messages", ids.len()).into());
            }
        }
        self.committed()
    }

    fn settle(&self) -> R<String> {
        // Nothing to force: the engine shreds on its own deadline. Wait for it.
        let start = std::time::Instant::now();
        let limit = self.max_shred_delay * 4 + Duration::from_secs(5);
        loop {
            let s = self.store.stats();
            if s.dead_records == 0 && s.oldest_dead_openable_age.is_none() {
                break;
            }
            if start.elapsed() > limit {
                return Err(format!("dead records still openable after {limit:?}: {s:?}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let waited = start.elapsed().as_secs_f64();
        let left: Vec<String> = self
            .inspect()?
            .segments
            .iter()
            .map(|s| format!("{} of {} B with {} records", s.state, s.size, s.records))
            .collect();
        Ok(format!(
            "waited {waited:.2} s for the shred deadline (max_shred_delay {:?}); segment files left: {}",
            self.max_shred_delay,
            left.join(", ")
        ))
    }

    fn samples(&self, every: usize) -> R<Vec<Sample>> {
        self.store.flush()?;
        let mut out = Vec::new();
        let mut segs = self.sampled_segments.lock().expect("lock");
        let mut n = 0usize;
        for e in std::fs::read_dir(&self.dir)? {
            let path = e?.path();
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                // A temp file renamed or a segment shredded since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            if !data.starts_with(&cinder::format::segment_header::MAGIC) {
                continue;
            }
            let header = cinder::format::segment_header::SegmentHeader::decode(&data)
                .map_err(|e| format!("{}: {e:?}", path.display()))?;
            let before = n;
            let mut at = HEADER_LEN;
            while let Ok(h) = FrameHeader::decode(&data[at..]) {
                if at + h.frame_len() > data.len() {
                    break;
                }
                if h.kind == FrameKind::Message {
                    if n.is_multiple_of(every) {
                        let body = &data[at + h.body_range().start..];
                        out.push(body[..SAMPLE_LEN].try_into()?);
                    }
                    n += 1;
                }
                at += h.frame_len();
            }
            if n > before {
                segs.insert(header.segment_id);
            }
        }
        Ok(out)
    }

    fn active_bytes(&self) -> R<u64> {
        Ok(self
            .inspect()?
            .segments
            .iter()
            .filter(|s| s.state == "active")
            .map(|s| s.size)
            .sum())
    }

    fn deleted_key_exists(&self) -> R<bool> {
        let r = self.inspect()?;
        let keyed: HashSet<u64> = r
            .segments
            .iter()
            .filter(|s| s.has_key)
            .map(|s| s.id)
            .chain(r.keystore.keys_without_file.iter().copied())
            .collect();
        let sampled = self.sampled_segments.lock().expect("lock");
        Ok(keyed.iter().any(|id| sampled.contains(id)) || r.dead_but_openable.unwrap_or(0) > 0)
    }
}
