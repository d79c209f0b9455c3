//! Helpers shared by the fuzz targets and the corpus generator (`make_corpus`).
//!
//! * a FIXED master key, so that seed store images made by `make_corpus` open in the
//!   `open_dir` target and mutations start from valid keystores and segments;
//! * the options every store in the fuzzers uses (small segments, no reaper thread);
//! * [`image`]: the encoding of a small data dir (keystore + up to 4 segment files) as
//!   one fuzz input.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cinder::{Durability, FileKeyProvider, ManualClock, Options};

/// The master key of every store the fuzzers and the corpus generator make. Never use a
/// fixed key anywhere else.
pub const MASTER_KEY: [u8; 32] = *b"cinder fuzz: not a secret key!!!";

/// Start of the manual clock (ms since the Unix epoch) in the generator and the targets.
pub const CLOCK_BASE_MS: u64 = 1_700_000_000_000;

/// Segment size of every fuzzed store (the smallest the engine allows).
pub const SEGMENT_SIZE: u64 = 64 << 10;

/// Largest payload of every fuzzed store.
pub const MAX_MESSAGE_SIZE: usize = 4096;

/// Queue ids the corpus generator writes to; `open_dir` reads these (queue ids are only
/// inside ciphertext, so a harness cannot discover them).
pub const KNOWN_QUEUES: &[&[u8]] = &[b"alice", b"bob", b"carol", b"q0"];

/// Where targets put their scratch stores: `$CINDER_FUZZ_TMP`, else `/dev/shm` (tmpfs:
/// fsync is free, so executions are many times faster), else the system temp dir.
pub fn scratch_root() -> PathBuf {
    if let Some(p) = std::env::var_os("CINDER_FUZZ_TMP") {
        return PathBuf::from(p);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && tempfile::Builder::new()
            .prefix("cinder-fuzz-probe")
            .tempdir_in(shm)
            .is_ok()
    {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A fresh private scratch dir (removed on drop).
pub fn scratch_dir() -> tempfile::TempDir {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let root = ROOT.get_or_init(scratch_root);
    tempfile::Builder::new()
        .prefix("cinder-fuzz-")
        .tempdir_in(root)
        .expect("create scratch dir")
}

/// Writes [`MASTER_KEY`] to a new file with mode 0600.
pub fn write_key_file(path: &Path) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&MASTER_KEY)
}

/// Writes the fixed key next to (never inside) a data dir and opens it.
pub fn key_provider(key_path: &Path) -> Arc<FileKeyProvider> {
    write_key_file(key_path).expect("write key file");
    Arc::new(FileKeyProvider::open(key_path).expect("open key file"))
}

/// The options of every fuzzed store: 64 KiB segments, 4 KiB messages, manual clock,
/// no background reaper (maintenance only when the input asks for it).
pub fn options(key: Arc<FileKeyProvider>, clock: Arc<ManualClock>) -> Options {
    let mut o = Options::new(key);
    o.segment_size = SEGMENT_SIZE;
    o.max_message_size = MAX_MESSAGE_SIZE;
    o.clock = clock;
    o.background_reaper = false;
    o.durability = Durability::Group {
        max_delay: Duration::ZERO,
    };
    o
}

pub mod image {
    //! A data dir as one fuzz input.
    //!
    //! ```text
    //! flags        u8
    //! keystore     len u16 LE, bytes                 (the KEYS file)
    //! segment × ≤4 name u8, pad u16 LE, len u16 LE, bytes
    //! ```
    //!
    //! Every length is cut to the bytes that remain, so any input decodes. A segment file
    //! is its bytes followed by `pad` zero bytes (the preallocated tail of a segment that
    //! was being written, without storing 64 KiB of zeros in the corpus).
    //!
    //! `name`: 0 = `<id>.seg` with the id read from the header (bytes 16..24; 1 when
    //! shorter); 0xFF = `<id>.seg.tmp` (an interrupted creation); 0xFE = `KEYS.tmp`
    //! (an interrupted keystore write); 0xFD = `<ID>.SEG` (an unknown file); else
    //! `<name>.seg`.
    //!
    //! `flags`: bit 0 recompute the segment header CRC; bit 1 recompute the CRC of every
    //! frame that decodes (so mutated lengths, kinds and ciphertext get past the CRC to the
    //! checks behind it); bit 2 recompute the keystore's header and body CRCs; bit 3 no
    //! keystore file; bits 4..=6 the clock (see [`DirImage::clock_advance_ms`]); bit 7
    //! `RecoveryMode::Strict`.

    use super::*;
    use cinder::format::frame::{verify_crc, FrameHeader};
    use cinder::RecoveryMode;

    pub const FIX_HEADER_CRC: u8 = 1;
    pub const FIX_FRAME_CRCS: u8 = 2;
    pub const FIX_KEYSTORE_CRCS: u8 = 4;
    pub const NO_KEYSTORE: u8 = 8;
    pub const STRICT: u8 = 0x80;
    pub const MAX_SEGMENTS: usize = 4;

    /// Clock advances selectable by flags bits 4..=6, from `CLOCK_BASE_MS`.
    pub const CLOCK_STEPS_MS: [u64; 8] = [
        0,
        1_000,
        60_000,
        600_000,
        3_600_000,
        86_400_000,
        31 * 86_400_000,
        365 * 86_400_000,
    ];

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SegFile {
        pub name: u8,
        pub pad: u16,
        pub bytes: Vec<u8>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct DirImage {
        pub flags: u8,
        pub keystore: Vec<u8>,
        pub segments: Vec<SegFile>,
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn u8(&mut self) -> Option<u8> {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            Some(b)
        }
        fn u16(&mut self) -> u16 {
            let lo = self.u8().unwrap_or(0);
            let hi = self.u8().unwrap_or(0);
            u16::from_le_bytes([lo, hi])
        }
        fn bytes(&mut self, n: usize) -> &'a [u8] {
            let n = n.min(self.0.len());
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a
        }
    }

    impl DirImage {
        /// Decodes any byte string (short fields read as zero, lengths are cut).
        pub fn decode(data: &[u8]) -> Self {
            let mut r = Reader(data);
            let flags = r.u8().unwrap_or(0);
            let klen = r.u16() as usize;
            let keystore = r.bytes(klen).to_vec();
            let mut segments = Vec::new();
            while segments.len() < MAX_SEGMENTS {
                let Some(name) = r.u8() else { break };
                let pad = r.u16();
                let len = r.u16() as usize;
                segments.push(SegFile {
                    name,
                    pad,
                    bytes: r.bytes(len).to_vec(),
                });
            }
            DirImage {
                flags,
                keystore,
                segments,
            }
        }

        /// The inverse of [`DirImage::decode`] (for images whose parts fit in u16 lengths).
        pub fn encode(&self) -> Vec<u8> {
            let mut out = vec![self.flags];
            let klen = u16::try_from(self.keystore.len()).expect("keystore fits");
            out.extend_from_slice(&klen.to_le_bytes());
            out.extend_from_slice(&self.keystore);
            for s in self.segments.iter().take(MAX_SEGMENTS) {
                out.push(s.name);
                out.extend_from_slice(&s.pad.to_le_bytes());
                let len = u16::try_from(s.bytes.len()).expect("segment fits");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&s.bytes);
            }
            out
        }

        /// Reads a real data dir: `KEYS` and the `.seg` files (in name order, at most
        /// [`MAX_SEGMENTS`]), trailing zeros of each segment stored as `pad`.
        pub fn from_dir(dir: &Path, flags: u8) -> std::io::Result<Self> {
            let keystore = fs::read(dir.join("KEYS"))?;
            let mut names: Vec<String> = fs::read_dir(dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".seg"))
                .collect();
            names.sort();
            let mut segments = Vec::new();
            for n in names.iter().take(MAX_SEGMENTS) {
                let mut bytes = fs::read(dir.join(n))?;
                let data_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                let pad = (bytes.len() - data_end).min(u16::MAX as usize);
                bytes.truncate(bytes.len() - pad);
                segments.push(SegFile {
                    name: 0,
                    pad: pad as u16,
                    bytes,
                });
            }
            Ok(DirImage {
                flags,
                keystore,
                segments,
            })
        }

        /// Milliseconds the harness's clock is ahead of `CLOCK_BASE_MS`.
        pub fn clock_advance_ms(&self) -> u64 {
            CLOCK_STEPS_MS[usize::from((self.flags >> 4) & 7)]
        }

        pub fn recovery_mode(&self) -> RecoveryMode {
            if self.flags & STRICT != 0 {
                RecoveryMode::Strict
            } else {
                RecoveryMode::TolerateTornTail
            }
        }

        /// Creates `dir` (mode 0700) and writes the files (mode 0600), fixing CRCs as the
        /// flags ask.
        pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
            fs::DirBuilder::new().mode(0o700).create(dir)?;
            if self.flags & NO_KEYSTORE == 0 {
                let mut ks = self.keystore.clone();
                if self.flags & FIX_KEYSTORE_CRCS != 0 {
                    fix_keystore_crcs(&mut ks);
                }
                write_private(&dir.join("KEYS"), &ks)?;
            }
            for s in &self.segments {
                let mut bytes = s.bytes.clone();
                if self.flags & FIX_HEADER_CRC != 0 {
                    fix_header_crc(&mut bytes);
                }
                if self.flags & FIX_FRAME_CRCS != 0 {
                    fix_frame_crcs(&mut bytes);
                }
                bytes.resize(bytes.len() + usize::from(s.pad), 0);
                write_private(&dir.join(segment_file_name(s)), &bytes)?;
            }
            Ok(())
        }
    }

    /// The file name a segment entry is written under.
    pub fn segment_file_name(s: &SegFile) -> String {
        let derived = || {
            s.bytes
                .get(16..24)
                .map_or(1, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        match s.name {
            0 => format!("{:016x}.seg", derived()),
            0xFF => format!("{:016x}.seg.tmp", derived()),
            0xFE => "KEYS.tmp".to_string(),
            0xFD => format!("{:016X}.SEG", derived()),
            n => format!("{n:016x}.seg"),
        }
    }

    fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(bytes)
    }

    fn put_crc(buf: &mut [u8], covered: std::ops::Range<usize>, at: usize) {
        let crc = crc32fast::hash(&buf[covered]);
        buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Segment header: CRC of bytes 0..60 at 60.
    pub fn fix_header_crc(b: &mut [u8]) {
        if b.len() >= 64 {
            put_crc(b, 0..60, 60);
        }
    }

    /// Every frame that decodes, from offset 64 on: CRC of the frame after its first 4
    /// bytes. Stops at the first header that does not decode or does not fit.
    pub fn fix_frame_crcs(b: &mut [u8]) {
        let mut pos = 64;
        while pos < b.len() {
            let Ok(h) = FrameHeader::decode(&b[pos..]) else {
                break;
            };
            let len = h.frame_len();
            if len > b.len() - pos {
                break;
            }
            put_crc(b, pos + 4..pos + len, pos);
            debug_assert!(verify_crc(&b[pos..pos + len]).is_ok());
            pos += len;
        }
    }

    /// Keystore: header CRC (bytes 0..44 at 44) and body CRC (last 4 bytes).
    pub fn fix_keystore_crcs(b: &mut [u8]) {
        if b.len() >= 48 {
            put_crc(b, 0..44, 44);
        }
        if b.len() >= 52 {
            let end = b.len() - 4;
            put_crc(b, 48..end, end);
        }
    }
}
