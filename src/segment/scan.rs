//! A read-only walk over the bytes of one segment file: every frame's framing and
//! checksum, and (with the key) its tags. Shared by recovery, `verify` and `inspect`; it
//! has no side effects, so tools can run it on a store that is open elsewhere.

use crate::crypto::SealKey;
use crate::error::CorruptionKind;
use crate::format::frame::{verify_crc, FrameHeader, FrameKind, SealMeta};
use crate::format::segment_header::HEADER_LEN;
use crate::format::FormatError;

use super::codec::{self, Opened};

/// What a frame holds, as far as the scan could see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Message {
        id: u64,
        created_at_ms: u64,
        expires_at_ms: u64,
        queue: Vec<u8>,
        payload_len: u32,
        /// The sender's id for the message (idempotent appends), if it gave one.
        client_id: Option<[u8; crate::format::frame::CLIENT_ID_LEN]>,
    },
    Acks(Vec<u64>),
    Seal(SealMeta),
    /// Scanned without the key: only the plaintext framing is known.
    Sealed(FrameKind),
}

/// One frame found by the scan.
#[derive(Debug, Clone)]
pub struct ScannedFrame {
    pub offset: u64,
    pub len: u32,
    pub content: Content,
}

/// The result of a scan.
#[derive(Debug, Default)]
pub struct SegmentScan {
    pub frames: Vec<ScannedFrame>,
    /// End of the last good frame (after the seal, if one was reached).
    pub end: usize,
    /// The walk stopped at a frame whose framing, length or checksum is bad: a torn tail
    /// if the segment was being written, damage otherwise.
    pub stopped: Option<(usize, CorruptionKind)>,
    /// Bytes after `stopped` that are not zero (zeros are the preallocation).
    pub dropped: u64,
    /// Tags that did not verify, at the failing part's offset. Framing and checksum were
    /// intact, so these are never torn writes.
    pub auth_failures: Vec<(u64, CorruptionKind)>,
    /// A seal whose counts or checksum disagree with the frames, or bytes after it.
    pub seal_problem: Option<(u64, CorruptionKind)>,
    /// A seal frame was reached.
    pub sealed: bool,
    /// Zeros follow the seal (a crash between writing the seal and truncating).
    pub zeros_after_seal: bool,
    /// Frames before the seal, and the CRC-32 of their bytes.
    pub records: u64,
    pub data_crc: u32,
}

/// Walks `bytes` (a whole segment file, header included) from the end of the header.
/// With `key`, opens every meta part (and, with `open_bodies`, every body); `id` is the
/// segment id the frames must be bound to.
pub fn scan(bytes: &[u8], id: u64, key: Option<&SealKey>, open_bodies: bool) -> SegmentScan {
    let mut out = SegmentScan::default();
    let mut pos = HEADER_LEN.min(bytes.len());
    let mut crc = crc32fast::Hasher::new();
    // Frames are opened in here: plaintext metadata (and bodies, for `verify`). Wiped
    // before it grows and when the scan ends.
    let mut scratch = zeroize::Zeroizing::new(Vec::new());
    while pos < bytes.len() {
        let (fh, flen) = match frame_at(bytes, pos) {
            Ok(f) => f,
            Err(kind) => {
                out.stopped = Some((pos, kind));
                out.dropped = bytes[pos..].iter().filter(|&&b| b != 0).count() as u64;
                break;
            }
        };
        let fbytes = &bytes[pos..pos + flen];
        let content = match key {
            None => Content::Sealed(fh.kind),
            Some(key) => {
                if scratch.capacity() < fbytes.len() {
                    // Growing would leave the old buffer behind unwiped.
                    scratch = zeroize::Zeroizing::new(Vec::with_capacity(fbytes.len()));
                }
                scratch.clear();
                scratch.extend_from_slice(fbytes);
                match open(key, id, pos as u64, fh, &mut scratch, open_bodies) {
                    Ok(c) => c,
                    Err(e) => {
                        let (off, kind) = absolute(e, pos as u64);
                        out.auth_failures.push((off, kind));
                        Content::Sealed(fh.kind)
                    }
                }
            }
        };
        if fh.kind == FrameKind::Seal {
            out.sealed = true;
            out.end = pos + flen;
            out.seal_problem = check_seal(&content, pos, out.records, crc.clone().finalize());
            let rest = &bytes[pos + flen..];
            if rest.iter().any(|&b| b != 0) {
                let kind = CorruptionKind::BadField {
                    field: "bytes after the seal",
                    value: rest.len() as u64,
                };
                out.seal_problem.get_or_insert(((pos + flen) as u64, kind));
            } else {
                out.zeros_after_seal = !rest.is_empty();
            }
            out.frames.push(ScannedFrame {
                offset: pos as u64,
                len: flen as u32,
                content,
            });
            out.data_crc = crc.finalize();
            return out;
        }
        crc.update(fbytes);
        out.records += 1;
        out.frames.push(ScannedFrame {
            offset: pos as u64,
            len: flen as u32,
            content,
        });
        pos += flen;
    }
    if out.stopped.is_none() {
        out.end = pos;
    } else {
        out.end = out.stopped.as_ref().map_or(pos, |s| s.0);
    }
    out.data_crc = crc.finalize();
    out
}

fn check_seal(
    content: &Content,
    pos: usize,
    records: u64,
    crc: u32,
) -> Option<(u64, CorruptionKind)> {
    match content {
        Content::Seal(s)
            if s.record_count != records || s.data_end != pos as u64 || s.data_crc != crc =>
        {
            Some((pos as u64, CorruptionKind::MissingSeal))
        }
        _ => None,
    }
}

fn open(
    key: &SealKey,
    id: u64,
    off: u64,
    fh: FrameHeader,
    frame: &mut [u8],
    bodies: bool,
) -> Result<Content, FormatError> {
    Ok(match codec::open_frame(key, id, off, fh, frame)? {
        Opened::Message {
            id: message_id,
            created_at_ms,
            expires_at_ms,
            queue,
            client_id,
        } => {
            if bodies {
                codec::open_body(key, id, off, fh, frame)?;
            }
            Content::Message {
                id: message_id,
                created_at_ms,
                expires_at_ms,
                queue,
                payload_len: fh.body_len - crate::crypto::TAG_LEN as u32,
                client_id,
            }
        }
        Opened::Acks(ids) => Content::Acks(ids),
        Opened::Seal(s) => Content::Seal(s),
    })
}

fn absolute(e: FormatError, base: u64) -> (u64, CorruptionKind) {
    match e {
        FormatError::Corrupt { offset, kind } => (base + offset, kind),
        FormatError::Version { got, .. } => (
            base,
            CorruptionKind::BadField {
                field: "version",
                value: u64::from(got),
            },
        ),
    }
}

/// Decodes and checks the frame at `pos`: header, bounds, checksum.
pub fn frame_at(bytes: &[u8], pos: usize) -> Result<(FrameHeader, usize), CorruptionKind> {
    let rest = &bytes[pos..];
    let fh = FrameHeader::decode(rest).map_err(kind_of)?;
    let flen = fh.frame_len();
    if flen > rest.len() {
        return Err(CorruptionKind::Truncated {
            needed: flen as u64,
            available: rest.len() as u64,
        });
    }
    verify_crc(&rest[..flen]).map_err(kind_of)?;
    Ok((fh, flen))
}

fn kind_of(e: FormatError) -> CorruptionKind {
    match e {
        FormatError::Corrupt { kind, .. } => kind,
        FormatError::Version { got, .. } => CorruptionKind::BadField {
            field: "version",
            value: u64::from(got),
        },
    }
}

/// Sector size assumed for torn writes: a power cut lands or loses whole sectors of an
/// unsynced write (engine-format.md, "Assumptions about the media").
const SECTOR: usize = 512;

/// Whether the bad frame at `pos` is damage to durable data rather than a torn tail: it
/// was written whole (its declared extent lies inside the file and no sector's share of
/// it is all zeros) and data follows it (a non-zero byte after its extent). Space a
/// segment has not written yet reads as zeros (preallocated or zero-filled), so a write
/// a crash cut short leaves a zero sector (or a frame running past the end), and nothing
/// follows the last write but zeros; a whole frame that fails its checks with later
/// frames after it was damaged after it was written (bit rot), and cutting there would
/// drop durable frames. A header that does not decode is judged over its own length.
pub fn damaged_mid_segment(bytes: &[u8], pos: usize) -> bool {
    let rest = &bytes[pos.min(bytes.len())..];
    let extent = match FrameHeader::decode(rest) {
        Ok(h) => h.frame_len(),
        Err(_) => crate::format::frame::FRAME_HEADER_LEN,
    };
    if extent == 0 || extent > rest.len() {
        return false;
    }
    let end = pos + extent;
    let mut s = pos;
    while s < end {
        let e = ((s / SECTOR + 1) * SECTOR).min(end);
        if bytes[s..e].iter().all(|&b| b == 0) {
            return false;
        }
        s = e;
    }
    bytes[end..].iter().any(|&b| b != 0)
}

/// Whether the file ends with a seal frame that authenticates under this key.
pub fn ends_with_valid_seal(key: &SealKey, id: u64, bytes: &[u8]) -> bool {
    let seal_len = codec::SEAL_FRAME_LEN;
    if bytes.len() < HEADER_LEN + seal_len {
        return false;
    }
    let pos = bytes.len() - seal_len;
    let Ok((fh, flen)) = frame_at(bytes, pos) else {
        return false;
    };
    if fh.kind != FrameKind::Seal || flen != seal_len {
        return false;
    }
    let mut f = bytes[pos..].to_vec();
    matches!(codec::open_frame(key, id, pos as u64, fh, &mut f), Ok(Opened::Seal(s)) if s.data_end == pos as u64)
}
