//! Builds the seed corpora from real stores made with the engine under the fuzzers'
//! fixed master key:
//!
//! ```sh
//! cargo run --release --manifest-path fuzz/Cargo.toml --example make_corpus
//! ```
//!
//! Store shapes: empty; a few messages; acked and purged messages; several segments
//! (expiry buckets); expired and shredded; reopened several times; a copy taken while
//! the store was open (unsealed segments with their preallocated zeros); that copy with a
//! torn last frame; a keystore of one moment with the segments of another; compacted
//! (live messages copied to a survivor segment, the old one shredded). From each it
//! writes: `open_dir` (whole dir images, `cinder_fuzz::image`), `segment_header` (the
//! 64-byte headers), `frame` (every frame, and plaintext metas), `seal` (seal frames),
//! `keystore` (keystore files). `ops_model` gets fixed pseudo-random byte strings.
//! The output is deterministic in shape, not in bytes (keys and salts are random), so
//! every run replaces the previous seeds: files are named `<shape>-<n>`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cinder::format::frame::{FrameHeader, FrameKind, MessageMeta, SealMeta};
use cinder::{Durability, FileKeyProvider, ManualClock, MessageId, NewMessage, Store};
use cinder_fuzz::image::{DirImage, SegFile, FIX_FRAME_CRCS, FIX_HEADER_CRC, FIX_KEYSTORE_CRCS};
use cinder_fuzz::{key_provider, options, CLOCK_BASE_MS};

const TARGETS: &[&str] = &[
    "segment_header",
    "frame",
    "keystore",
    "seal",
    "open_dir",
    "ops_model",
];

struct Out {
    root: PathBuf,
    /// (target, content) already written: no duplicate seeds.
    seen: BTreeSet<(String, Vec<u8>)>,
    count: usize,
}

impl Out {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        if !self.seen.insert((target.to_string(), bytes.to_vec())) {
            return;
        }
        let dir = self.root.join(target);
        let n = fs::read_dir(&dir).map(Iterator::count).unwrap_or(0);
        fs::write(dir.join(format!("{name}-{n}")), bytes).expect("write seed");
        self.count += 1;
    }

    /// All the per-structure seeds of one image.
    fn pieces(&mut self, shape: &str, img: &DirImage) {
        self.put("keystore", shape, &img.keystore);
        for s in &img.segments {
            let mut full = s.bytes.clone();
            full.resize(full.len() + usize::from(s.pad), 0);
            let b = &full;
            if b.len() >= 64 {
                self.put("segment_header", shape, &b[..64]);
            }
            let mut pos = 64;
            while pos < b.len() {
                let Ok(h) = FrameHeader::decode(&b[pos..]) else {
                    break;
                };
                let Some(f) = b.get(pos..pos + h.frame_len()) else {
                    break;
                };
                match h.kind {
                    FrameKind::Seal => {
                        self.put("seal", shape, f);
                        self.put("seal", &format!("{shape}-meta"), &f[16..]);
                        self.put("frame", &format!("{shape}-seal"), f);
                    }
                    FrameKind::Message => self.put("frame", &format!("{shape}-msg"), f),
                    FrameKind::Acks => self.put("frame", &format!("{shape}-acks"), f),
                }
                pos += h.frame_len();
            }
            // The seal as recovery finds it: the last 64 bytes of the file.
            if b.len() >= 128 {
                self.put("seal", &format!("{shape}-tail"), &b[b.len() - 64..]);
            }
        }
        let all = FIX_HEADER_CRC | FIX_FRAME_CRCS | FIX_KEYSTORE_CRCS;
        for flags in [all, 0] {
            let mut i = img.clone();
            i.flags = flags | (img.flags & 0xF0);
            self.put("open_dir", shape, &i.encode());
        }
    }
}

struct Lab {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: Arc<FileKeyProvider>,
    clock: Arc<ManualClock>,
}

impl Lab {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = key_provider(&tmp.path().join("master.key"));
        Lab {
            dir: tmp.path().join("data"),
            _tmp: tmp,
            key,
            clock: ManualClock::new(CLOCK_BASE_MS),
        }
    }

    fn open(&self) -> Store {
        let mut o = options(self.key.clone(), self.clock.clone());
        // Sync: everything an append returned for is in the files when we copy them.
        o.durability = Durability::Sync;
        Store::open(&self.dir, o).expect("open")
    }

    fn open_with_shred_delay(&self, d: Duration) -> Store {
        let mut o = options(self.key.clone(), self.clock.clone());
        o.durability = Durability::Sync;
        o.max_shred_delay = d;
        Store::open(&self.dir, o).expect("open")
    }

    fn image(&self, flags: u8) -> DirImage {
        DirImage::from_dir(&self.dir, flags).expect("read dir")
    }

    fn advance(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }
}

fn payload(n: usize, len: usize) -> Vec<u8> {
    let mut p = format!("message {n} ").into_bytes();
    p.resize(len, b'a' + (n % 26) as u8);
    p
}

const HOUR: Duration = Duration::from_secs(3600);

/// Flags bits 4..=6 for a clock `CLOCK_STEPS_MS[step]` ahead.
fn clock(step: u8) -> u8 {
    step << 4
}

fn shapes(out: &mut Out) {
    // Empty store, closed; and open.
    {
        let lab = Lab::new();
        let s = lab.open();
        let open_img = lab.image(0);
        s.close().unwrap();
        out.pieces("empty-open", &open_img);
        out.pieces("empty", &lab.image(0));
    }
    // A few messages in two queues.
    {
        let lab = Lab::new();
        let s = lab.open();
        for i in 0..3 {
            s.append(b"alice", &payload(i, 40), HOUR).unwrap();
        }
        s.append(b"bob", &payload(9, 200), HOUR).unwrap();
        s.append(b"bob", b"", HOUR).unwrap();
        s.close().unwrap();
        out.pieces("few", &lab.image(0));
        out.pieces("few-late", &lab.image(clock(3)));
        out.pieces("few-expired", &lab.image(clock(4)));
    }
    // Acked, ack_through, purged.
    {
        let lab = Lab::new();
        let s = lab.open();
        let ids: Vec<MessageId> = (0..6)
            .map(|i| s.append(b"alice", &payload(i, 64), HOUR).unwrap())
            .collect();
        s.append(b"bob", &payload(7, 64), HOUR).unwrap();
        s.append(b"carol", &payload(8, 64), HOUR).unwrap();
        s.ack(b"alice", ids[1]).unwrap();
        s.ack_batch(b"alice", &[ids[3], ids[4]]).unwrap();
        s.ack_through(b"alice", ids[0]).unwrap();
        s.purge(b"bob").unwrap();
        s.close().unwrap();
        out.pieces("acked", &lab.image(0));
    }
    // Several segments: expiry buckets of different widths, a batch, a max-size message.
    {
        let lab = Lab::new();
        let s = lab.open();
        s.append(b"alice", &payload(1, 100), Duration::from_secs(30))
            .unwrap();
        s.append(b"bob", &payload(2, 100), HOUR).unwrap();
        s.append(b"carol", &payload(3, 4096), Duration::from_secs(86_400))
            .unwrap();
        let p: Vec<Vec<u8>> = (0..8).map(|i| payload(i, 16 * i)).collect();
        let items: Vec<NewMessage<'_>> = p
            .iter()
            .map(|p| NewMessage {
                queue: b"q0",
                payload: p,
                ttl: HOUR,
            })
            .collect();
        let ids = s.append_batch(&items).unwrap();
        s.ack(b"q0", ids[2]).unwrap();
        s.close().unwrap();
        out.pieces("segments", &lab.image(0));
        out.pieces("segments-late", &lab.image(clock(2)));
    }
    // Copies taken while open (unsealed, preallocated), then a torn last frame.
    {
        let lab = Lab::new();
        let s = lab.open();
        for i in 0..5 {
            s.append(b"alice", &payload(i, 300), HOUR).unwrap();
        }
        let a = s.append(b"bob", &payload(5, 50), HOUR).unwrap();
        s.ack(b"bob", a).unwrap();
        s.append(b"q0", &payload(6, 1000), HOUR).unwrap();
        let img = lab.image(0);
        out.pieces("open-copy", &img);
        // Torn: cut the last frame of each segment with frames in the middle.
        let mut torn = img.clone();
        for seg in &mut torn.segments {
            let mut pos = 64;
            let mut last = None;
            while let Ok(h) = FrameHeader::decode(&seg.bytes[pos.min(seg.bytes.len())..]) {
                if pos + h.frame_len() > seg.bytes.len() {
                    break;
                }
                last = Some((pos, h.frame_len()));
                pos += h.frame_len();
            }
            if let Some((p, l)) = last {
                seg.bytes.truncate(p + l / 2);
                seg.pad = seg.pad.saturating_add((l - l / 2) as u16);
            }
        }
        out.pieces("torn", &torn);
        s.close().unwrap();
        out.pieces("open-copy-closed", &lab.image(0));
    }
    // Expired and shredded; a reopen in between.
    {
        let lab = Lab::new();
        let s = lab.open();
        s.append(b"q0", &payload(1, 10), Duration::from_secs(2))
            .unwrap();
        s.append(b"alice", &payload(2, 10), HOUR).unwrap();
        s.close().unwrap();
        drop(s);
        let before = lab.image(0);
        lab.advance(10_000);
        let s = lab.open();
        s.maintain().unwrap();
        s.append(b"alice", &payload(3, 10), HOUR).unwrap();
        s.close().unwrap();
        let after = lab.image(0);
        out.pieces("expired", &after);
        // Keystore of one moment, segments of another: orphan keys, unkeyed files,
        // stale keystore, sealed lengths that disagree.
        let mixed = |ks: &DirImage, segs: &DirImage| DirImage {
            flags: 0,
            keystore: ks.keystore.clone(),
            segments: segs.segments.clone(),
        };
        out.pieces("mixed-old-keys", &mixed(&before, &after));
        out.pieces("mixed-new-keys", &mixed(&after, &before));
    }
    // Reopened several times, acks reaching across segments.
    {
        let lab = Lab::new();
        let mut ids = Vec::new();
        for round in 0..3 {
            let s = lab.open();
            for i in 0..3 {
                ids.push(
                    s.append(b"alice", &payload(round * 10 + i, 80), HOUR)
                        .unwrap(),
                );
            }
            if round > 0 {
                s.ack(b"alice", ids[round * 2]).unwrap();
            }
            s.close().unwrap();
            lab.advance(1_000);
        }
        let img = lab.image(0);
        out.pieces("reopened", &img);
        // Extra file kinds: an interrupted creation, a keystore temp, an unknown file.
        let mut odd = img.clone();
        for (seg, name) in odd.segments.iter_mut().zip([0xFF, 0xFE, 0xFD]) {
            *seg = SegFile {
                name,
                ..seg.clone()
            };
        }
        out.pieces("odd-names", &odd);
    }
    // Compacted: a partly dead segment past its shred deadline, copied into a survivor
    // segment by `maintain`; then the old segment shredded.
    {
        let lab = Lab::new();
        let s = lab.open_with_shred_delay(Duration::from_secs(4));
        let ids: Vec<MessageId> = (0..5)
            .map(|i| s.append(b"alice", &payload(i, 50), HOUR).unwrap())
            .collect();
        s.append(b"bob", &payload(9, 50), HOUR).unwrap();
        s.ack(b"alice", ids[0]).unwrap();
        s.ack(b"alice", ids[3]).unwrap();
        lab.advance(5_000);
        s.maintain().unwrap();
        lab.advance(5_000);
        s.maintain().unwrap();
        out.pieces("compacted-open", &lab.image(0));
        s.close().unwrap();
        out.pieces("compacted", &lab.image(0));
    }
    // No keystore, only segments.
    {
        let lab = Lab::new();
        let s = lab.open();
        s.append(b"alice", b"x", HOUR).unwrap();
        s.close().unwrap();
        let mut img = lab.image(0);
        img.flags |= cinder_fuzz::image::NO_KEYSTORE;
        out.pieces("no-keystore", &img);
    }
}

/// Plaintext structures for the decoders (inside real frames they are ciphertext).
fn plaintext(out: &mut Out) {
    for (i, q) in [&b"a"[..], b"alice", &[0xFF; 255]].iter().enumerate() {
        let m = MessageMeta {
            id: 42 + i as u64,
            created_at_ms: CLOCK_BASE_MS,
            expires_at_ms: CLOCK_BASE_MS + 3_600_000,
            payload_len: 13,
            queue: q,
            // One with a client message id (format version 5).
            client_id: (i == 1).then_some([0x5c; 16]),
        };
        let mut b = vec![0u8; m.plain_len()];
        m.encode_into(&mut b);
        out.put("frame", "meta", &b);
    }
    let s = SealMeta {
        record_count: 3,
        data_end: 4096,
        data_crc: 0xdead_beef,
        salt: 7,
        tag: [9; 16],
    };
    out.put("seal", "meta-plain", &s.encode());
    out.put("frame", "seal-meta-plain", &s.encode());
    let ids: Vec<u8> = [1u64, 2, 99].iter().flat_map(|i| i.to_le_bytes()).collect();
    out.put("frame", "ack-ids", &ids);
}

/// `ops_model` seeds: fixed pseudo-random byte strings of several lengths.
fn ops_seeds(out: &mut Out) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, len) in [16usize, 64, 128, 256, 512, 1024, 2048, 4096]
        .iter()
        .cycle()
        .take(24)
        .enumerate()
    {
        let b: Vec<u8> = (0..*len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        out.put("ops_model", &format!("random{i}"), &b);
    }
}

fn main() {
    let root = std::env::args().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"),
        PathBuf::from,
    );
    for t in TARGETS {
        let d = root.join(t);
        // Replace the previous seeds (never what a fuzzing run added: those have
        // libFuzzer's 40-hex-digit names).
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let generated = name.len() != 40 || !name.bytes().all(|b| b.is_ascii_hexdigit());
                if generated {
                    fs::remove_file(e.path()).expect("remove old seed");
                }
            }
        }
        fs::create_dir_all(&d).expect("create corpus dir");
    }
    let mut out = Out {
        root: root.clone(),
        seen: BTreeSet::new(),
        count: 0,
    };
    shapes(&mut out);
    plaintext(&mut out);
    ops_seeds(&mut out);
    println!("wrote {} seeds under {}", out.count, root.display());
}
