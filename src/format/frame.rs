//! Record frames: the unit appended to a segment.
//!
//! A frame is a 16-byte plaintext header (checksum, kind, lengths) followed by a sealed
//! meta part and a sealed body part. This module encodes the framing and the plaintext
//! *inside* the sealed parts; sealing itself lives in `crypto`.

use super::{check_crc, get_u16, get_u32, get_u64, need, FormatError};
use crate::error::CorruptionKind;

pub const FRAME_HEADER_LEN: usize = 16;
pub const TAG_LEN: usize = 16;
const CRC_AT: usize = 0;
const KIND_AT: usize = 4;
const FLAGS_AT: usize = 5;
/// Frame flag: the message body is padded.
pub const FLAG_PADDED: u8 = 1;
const META_LEN_AT: usize = 6;
const BODY_LEN_AT: usize = 8;
const RESERVED_AT: usize = 12;

/// Fixed part of a message's meta plaintext: id, creation time, expiry, payload length,
/// queue length.
pub const MESSAGE_META_FIXED: usize = 29;
/// Longest queue id.
pub const MAX_QUEUE_ID: usize = 255;
/// Length of the optional client message id at the end of a message's meta (format
/// version 5; idempotent appends).
pub const CLIENT_ID_LEN: usize = 16;
/// Longest sealed meta part the decoder accepts.
pub const MAX_META_LEN: usize = MESSAGE_META_FIXED + MAX_QUEUE_ID + CLIENT_ID_LEN + TAG_LEN;
/// Longest sealed body part the decoder accepts (16 MiB payload + tag).
pub const MAX_BODY_LEN: usize = (16 << 20) + TAG_LEN;
/// Length of a seal frame's meta part.
pub const SEAL_META_LEN: usize = 48;
/// Length of the associated data bound to every sealed part.
pub const AAD_LEN: usize = 24;
/// Ack ids in one ack frame, at most.
pub const MAX_ACKS_PER_FRAME: usize = (MAX_BODY_LEN - TAG_LEN) / 8;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// One message: meta = id, expiry, length, queue id; body = payload.
    Message = 1,
    /// A batch of acks: meta = count; body = the acked message ids.
    Acks = 2,
    /// The last frame of a closed segment: counts and an authenticated checksum.
    Seal = 3,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FrameKind::Message),
            2 => Some(FrameKind::Acks),
            3 => Some(FrameKind::Seal),
            _ => None,
        }
    }
}

/// Which sealed part of a frame a nonce or AAD is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Meta = 1,
    Body = 2,
    Seal = 3,
}

/// The plaintext framing of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub meta_len: u16,
    pub body_len: u32,
    /// Flag bit 0 (message frames only): the body is padded (see `format::padding`).
    pub padded: bool,
}

impl FrameHeader {
    pub const fn serialized_len() -> usize {
        FRAME_HEADER_LEN
    }

    /// Total bytes of the frame, header included.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.meta_len as usize + self.body_len as usize
    }

    /// Writes the header into `frame[..16]`. The checksum is filled in by [`finish_crc`].
    pub fn encode_into(&self, frame: &mut [u8]) {
        frame[CRC_AT..CRC_AT + 4].fill(0);
        frame[KIND_AT] = self.kind as u8;
        frame[FLAGS_AT] = u8::from(self.padded);
        frame[META_LEN_AT..META_LEN_AT + 2].copy_from_slice(&self.meta_len.to_le_bytes());
        frame[BODY_LEN_AT..BODY_LEN_AT + 4].copy_from_slice(&self.body_len.to_le_bytes());
        frame[RESERVED_AT..RESERVED_AT + 4].fill(0);
    }

    /// Decodes and validates the 16-byte header at the start of `buf`. Lengths are checked
    /// against the format's limits before any arithmetic with them.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        need(buf, 0, FRAME_HEADER_LEN)?;
        let bad = |at: usize, field: &'static str, value: u64| {
            Err(FormatError::at(
                at,
                CorruptionKind::BadField { field, value },
            ))
        };
        let Some(kind) = FrameKind::from_u8(buf[KIND_AT]) else {
            return bad(KIND_AT, "frame kind", u64::from(buf[KIND_AT]));
        };
        let padded = buf[FLAGS_AT] == FLAG_PADDED && kind == FrameKind::Message;
        if buf[FLAGS_AT] != 0 && !padded {
            return bad(FLAGS_AT, "frame flags", u64::from(buf[FLAGS_AT]));
        }
        if get_u32(buf, RESERVED_AT) != 0 {
            return bad(
                RESERVED_AT,
                "frame reserved bytes",
                u64::from(get_u32(buf, RESERVED_AT)),
            );
        }
        let meta_len = get_u16(buf, META_LEN_AT);
        let body_len = get_u32(buf, BODY_LEN_AT);
        let ok = match kind {
            FrameKind::Message => {
                (MESSAGE_META_FIXED + 1 + TAG_LEN..=MAX_META_LEN).contains(&(meta_len as usize))
                    && (TAG_LEN..=MAX_BODY_LEN).contains(&(body_len as usize))
            }
            FrameKind::Acks => {
                meta_len as usize == 4 + TAG_LEN
                    && (TAG_LEN + 8..=MAX_BODY_LEN).contains(&(body_len as usize))
                    && (body_len as usize - TAG_LEN).is_multiple_of(8)
            }
            FrameKind::Seal => meta_len as usize == SEAL_META_LEN && body_len == 0,
        };
        if !ok {
            return bad(
                META_LEN_AT,
                "frame lengths",
                u64::from(meta_len) << 32 | u64::from(body_len),
            );
        }
        Ok(FrameHeader {
            kind,
            meta_len,
            body_len,
            padded,
        })
    }

    /// Byte range of the meta part within the frame.
    pub fn meta_range(&self) -> std::ops::Range<usize> {
        FRAME_HEADER_LEN..FRAME_HEADER_LEN + self.meta_len as usize
    }

    /// Byte range of the body part within the frame.
    pub fn body_range(&self) -> std::ops::Range<usize> {
        let start = FRAME_HEADER_LEN + self.meta_len as usize;
        start..start + self.body_len as usize
    }
}

/// Computes and stores the frame checksum (over everything after the checksum field).
pub fn finish_crc(frame: &mut [u8]) {
    let crc = crc32fast::hash(&frame[4..]);
    frame[..4].copy_from_slice(&crc.to_le_bytes());
}

/// Verifies the checksum of a complete frame.
pub fn verify_crc(frame: &[u8]) -> Result<(), FormatError> {
    need(frame, 0, FRAME_HEADER_LEN)?;
    check_crc(&frame[4..], get_u32(frame, CRC_AT), CRC_AT)
}

/// The 12-byte AEAD nonce of a part: the frame's offset in the segment and the part.
/// Unique per segment key because a segment's writer never reuses an offset
/// (see engine-format.md, "Nonce uniqueness"). Seal parts use a random salt instead of
/// the offset.
pub fn nonce(offset_or_salt: u64, part: Part) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&offset_or_salt.to_le_bytes());
    n[8..].copy_from_slice(&(part as u32).to_le_bytes());
    n
}

/// Associated data of a part: binds it to its segment, its offset, its kind and its lengths.
pub fn aad(segment_id: u64, offset: u64, h: &FrameHeader, part: Part) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    a[..8].copy_from_slice(&segment_id.to_le_bytes());
    a[8..16].copy_from_slice(&offset.to_le_bytes());
    a[16] = h.kind as u8;
    // The padding flag is bound too (0x10), so it cannot be flipped unnoticed; unpadded
    // frames have the same associated data as in format version 2.
    a[17] = part as u8 | if h.padded { 0x10 } else { 0 };
    a[18..20].copy_from_slice(&h.meta_len.to_le_bytes());
    a[20..24].copy_from_slice(&h.body_len.to_le_bytes());
    a
}

/// The plaintext of a message's meta part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta<'a> {
    pub id: u64,
    /// When the message was appended (ms since the Unix epoch).
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub payload_len: u32,
    pub queue: &'a [u8],
    /// The sender's id for this message (idempotent appends), if it gave one: 16 bytes
    /// after the queue id. Its presence is told by the meta's length alone.
    pub client_id: Option<[u8; CLIENT_ID_LEN]>,
}

impl MessageMeta<'_> {
    pub fn encoded_len(queue_len: usize, has_client_id: bool) -> usize {
        MESSAGE_META_FIXED + queue_len + if has_client_id { CLIENT_ID_LEN } else { 0 }
    }

    /// This meta's plaintext length.
    pub fn plain_len(&self) -> usize {
        Self::encoded_len(self.queue.len(), self.client_id.is_some())
    }

    pub fn encode_into(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..16].copy_from_slice(&self.created_at_ms.to_le_bytes());
        out[16..24].copy_from_slice(&self.expires_at_ms.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        out[28] = self.queue.len() as u8;
        let q_end = MESSAGE_META_FIXED + self.queue.len();
        out[MESSAGE_META_FIXED..q_end].copy_from_slice(self.queue);
        if let Some(c) = &self.client_id {
            out[q_end..q_end + CLIENT_ID_LEN].copy_from_slice(c);
        }
    }

    pub fn decode(buf: &[u8]) -> Result<MessageMeta<'_>, FormatError> {
        need(buf, 0, MESSAGE_META_FIXED)?;
        let qlen = buf[28] as usize;
        let q_end = MESSAGE_META_FIXED + qlen;
        let client_id = if buf.len() == q_end + CLIENT_ID_LEN {
            let mut c = [0u8; CLIENT_ID_LEN];
            c.copy_from_slice(&buf[q_end..]);
            Some(c)
        } else {
            None
        };
        if qlen == 0 || (buf.len() != q_end && client_id.is_none()) {
            return Err(FormatError::at(
                28,
                CorruptionKind::BadField {
                    field: "queue id length",
                    value: qlen as u64,
                },
            ));
        }
        Ok(MessageMeta {
            id: get_u64(buf, 0),
            created_at_ms: get_u64(buf, 8),
            expires_at_ms: get_u64(buf, 16),
            payload_len: get_u32(buf, 24),
            queue: &buf[MESSAGE_META_FIXED..q_end],
            client_id,
        })
    }
}

/// Decodes an ack body's plaintext: a list of little-endian u64 message ids.
pub fn decode_ack_ids(buf: &[u8]) -> impl Iterator<Item = u64> + '_ {
    buf.chunks_exact(8).map(|c| get_u64(c, 0))
}

/// The seal frame's meta: plaintext, authenticated by its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealMeta {
    /// Records (message and ack frames) before the seal.
    pub record_count: u64,
    /// Offset of the seal frame, which is the end of the record data.
    pub data_end: u64,
    /// CRC-32 of every byte from the end of the segment header to `data_end`.
    pub data_crc: u32,
    /// Random nonce salt of the tag.
    pub salt: u64,
    pub tag: [u8; TAG_LEN],
}

impl SealMeta {
    /// The bytes the tag authenticates (as associated data).
    pub fn authenticated(&self) -> [u8; 24] {
        let mut a = [0u8; 24];
        a[..8].copy_from_slice(&self.record_count.to_le_bytes());
        a[8..16].copy_from_slice(&self.data_end.to_le_bytes());
        a[16..20].copy_from_slice(&self.data_crc.to_le_bytes());
        a
    }

    pub fn encode(&self) -> [u8; SEAL_META_LEN] {
        let mut b = [0u8; SEAL_META_LEN];
        b[..24].copy_from_slice(&self.authenticated());
        b[24..32].copy_from_slice(&self.salt.to_le_bytes());
        b[32..48].copy_from_slice(&self.tag);
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        need(buf, 0, SEAL_META_LEN)?;
        if get_u32(buf, 20) != 0 {
            return Err(FormatError::at(
                20,
                CorruptionKind::BadField {
                    field: "seal reserved bytes",
                    value: u64::from(get_u32(buf, 20)),
                },
            ));
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&buf[32..48]);
        Ok(SealMeta {
            record_count: get_u64(buf, 0),
            data_end: get_u64(buf, 8),
            data_crc: get_u32(buf, 16),
            salt: get_u64(buf, 24),
            tag,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_crc() {
        let h = FrameHeader {
            kind: FrameKind::Message,
            meta_len: (MESSAGE_META_FIXED + 3 + TAG_LEN) as u16,
            body_len: 100,
            padded: true,
        };
        let mut f = vec![7u8; h.frame_len()];
        h.encode_into(&mut f);
        finish_crc(&mut f);
        assert_eq!(FrameHeader::decode(&f).unwrap(), h);
        verify_crc(&f).unwrap();
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 1;
            assert!(verify_crc(&g).is_err(), "flip at {i} not caught by crc");
        }
    }

    #[test]
    fn rejects_hostile_lengths() {
        let mut f = [0u8; 16];
        FrameHeader {
            kind: FrameKind::Message,
            meta_len: 40,
            body_len: u32::MAX,
            padded: false,
        }
        .encode_into(&mut f);
        assert!(FrameHeader::decode(&f).is_err());
        f[KIND_AT] = 9;
        assert!(FrameHeader::decode(&f).is_err());
        assert!(FrameHeader::decode(&f[..5]).is_err());
    }

    #[test]
    fn meta_round_trip() {
        let m = MessageMeta {
            id: 42,
            created_at_ms: 1_600_000_000_000,
            expires_at_ms: 1_700_000_000_000,
            payload_len: 9,
            queue: b"alice",
            client_id: None,
        };
        let mut b = vec![0u8; MessageMeta::encoded_len(5, false)];
        m.encode_into(&mut b);
        assert_eq!(MessageMeta::decode(&b).unwrap(), m);
        assert!(MessageMeta::decode(&b[..b.len() - 1]).is_err());
        // With a client message id: 16 bytes more, told apart by the length alone; any
        // other length is refused.
        let m = MessageMeta {
            client_id: Some([7; CLIENT_ID_LEN]),
            ..m
        };
        let mut b = vec![0u8; m.plain_len()];
        assert_eq!(b.len(), MessageMeta::encoded_len(5, true));
        m.encode_into(&mut b);
        assert_eq!(MessageMeta::decode(&b).unwrap(), m);
        for cut in 1..CLIENT_ID_LEN {
            assert!(MessageMeta::decode(&b[..b.len() - cut]).is_err(), "{cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(MessageMeta::decode(&longer).is_err());
    }

    #[test]
    fn seal_round_trip() {
        let s = SealMeta {
            record_count: 3,
            data_end: 4096,
            data_crc: 0xabcd,
            salt: 99,
            tag: [5; 16],
        };
        assert_eq!(SealMeta::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn nonces_differ_by_offset_and_part() {
        assert_ne!(nonce(16, Part::Meta), nonce(16, Part::Body));
        assert_ne!(nonce(16, Part::Meta), nonce(17, Part::Meta));
    }
}
