//! Sealing and opening record frames with a segment's key.

use crate::crypto::{SealKey, TAG_LEN};
use crate::error::CorruptionKind;
use crate::format::frame::{
    aad, finish_crc, nonce, FrameHeader, FrameKind, MessageMeta, Part, SealMeta, CLIENT_ID_LEN,
    FRAME_HEADER_LEN, SEAL_META_LEN,
};
use crate::format::{padding, FormatError};

/// Length of the frame holding a message with this queue id (and a client message id,
/// or not) and a body of `body_plain` bytes (the payload, or its padded length:
/// [`padding::padded_len`]).
pub fn message_frame_len(queue_len: usize, has_client_id: bool, body_plain: usize) -> usize {
    FRAME_HEADER_LEN
        + MessageMeta::encoded_len(queue_len, has_client_id)
        + TAG_LEN
        + body_plain
        + TAG_LEN
}

/// Length of an ack frame holding `n` ids.
pub fn acks_frame_len(n: usize) -> usize {
    FRAME_HEADER_LEN + 4 + TAG_LEN + n * 8 + TAG_LEN
}

/// Length of the seal frame.
pub const SEAL_FRAME_LEN: usize = FRAME_HEADER_LEN + SEAL_META_LEN;

fn seal_parts(key: &SealKey, segment_id: u64, offset: u64, h: FrameHeader, frame: &mut [u8]) {
    h.encode_into(frame);
    let m = h.meta_range();
    let tag = key.seal(
        nonce(offset, Part::Meta),
        &aad(segment_id, offset, &h, Part::Meta),
        &mut frame[m.start..m.end - TAG_LEN],
    );
    frame[m.end - TAG_LEN..m.end].copy_from_slice(&tag);
    let b = h.body_range();
    let tag = key.seal(
        nonce(offset, Part::Body),
        &aad(segment_id, offset, &h, Part::Body),
        &mut frame[b.start..b.end - TAG_LEN],
    );
    frame[b.end - TAG_LEN..b.end].copy_from_slice(&tag);
    finish_crc(frame);
}

/// Builds the sealed frame of one message, to be written at `offset` of segment
/// `segment_id`. `padded_to`: the padded body length (`padding::padded_len`, more than
/// the payload), or `None` for an unpadded body.
pub fn seal_message(
    key: &SealKey,
    segment_id: u64,
    offset: u64,
    meta: &MessageMeta<'_>,
    payload: &[u8],
    padded_to: Option<usize>,
) -> Vec<u8> {
    let meta_plain = meta.plain_len();
    let body_plain = padded_to.unwrap_or(payload.len());
    let h = FrameHeader {
        kind: FrameKind::Message,
        meta_len: (meta_plain + TAG_LEN) as u16,
        body_len: (body_plain + TAG_LEN) as u32,
        padded: padded_to.is_some(),
    };
    let mut frame = vec![0u8; h.frame_len()];
    meta.encode_into(&mut frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + meta_plain]);
    let b = h.body_range();
    let body = &mut frame[b.start..b.end - TAG_LEN];
    body[..payload.len()].copy_from_slice(payload);
    if h.padded {
        padding::pad(body, payload.len());
    }
    seal_parts(key, segment_id, offset, h, &mut frame);
    frame
}

/// Builds a sealed ack frame listing `ids`.
pub fn seal_acks(key: &SealKey, segment_id: u64, offset: u64, ids: &[u64]) -> Vec<u8> {
    let h = FrameHeader {
        kind: FrameKind::Acks,
        meta_len: (4 + TAG_LEN) as u16,
        body_len: (ids.len() * 8 + TAG_LEN) as u32,
        padded: false,
    };
    let mut frame = vec![0u8; h.frame_len()];
    frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4]
        .copy_from_slice(&(ids.len() as u32).to_le_bytes());
    let b = h.body_range();
    for (i, id) in ids.iter().enumerate() {
        frame[b.start + i * 8..b.start + i * 8 + 8].copy_from_slice(&id.to_le_bytes());
    }
    seal_parts(key, segment_id, offset, h, &mut frame);
    frame
}

/// Builds the seal frame that closes a segment. `salt` must be random: the tag's nonce
/// is (salt, Seal), a nonce space disjoint from every record's.
pub fn seal_segment(
    key: &SealKey,
    segment_id: u64,
    offset: u64,
    record_count: u64,
    data_crc: u32,
    salt: u64,
) -> Vec<u8> {
    let h = FrameHeader {
        kind: FrameKind::Seal,
        meta_len: SEAL_META_LEN as u16,
        body_len: 0,
        padded: false,
    };
    let mut s = SealMeta {
        record_count,
        data_end: offset,
        data_crc,
        salt,
        tag: [0; TAG_LEN],
    };
    let mut ad = aad(segment_id, offset, &h, Part::Seal).to_vec();
    ad.extend_from_slice(&s.authenticated());
    s.tag = key.seal(nonce(salt, Part::Seal), &ad, &mut []);
    let mut frame = vec![0u8; SEAL_FRAME_LEN];
    h.encode_into(&mut frame);
    frame[FRAME_HEADER_LEN..].copy_from_slice(&s.encode());
    finish_crc(&mut frame);
    frame
}

/// A frame opened with its segment's key.
#[derive(Debug)]
pub enum Opened {
    Message {
        id: u64,
        created_at_ms: u64,
        expires_at_ms: u64,
        queue: Vec<u8>,
        client_id: Option<[u8; CLIENT_ID_LEN]>,
    },
    Acks(Vec<u64>),
    Seal(SealMeta),
}

fn auth_fail(at: usize) -> FormatError {
    FormatError::at(at, CorruptionKind::AuthenticationFailed)
}

/// Opens the meta part of `frame` (and the body of ack frames) in place.
/// Offsets in errors are relative to the frame start.
pub fn open_frame(
    key: &SealKey,
    segment_id: u64,
    offset: u64,
    h: FrameHeader,
    frame: &mut [u8],
) -> Result<Opened, FormatError> {
    let m = h.meta_range();
    match h.kind {
        FrameKind::Seal => {
            let s = SealMeta::decode(&frame[m.clone()]).map_err(|e| e.shifted(m.start))?;
            let mut ad = aad(segment_id, offset, &h, Part::Seal).to_vec();
            ad.extend_from_slice(&s.authenticated());
            if !key.open(nonce(s.salt, Part::Seal), &ad, &mut [], &s.tag) {
                return Err(auth_fail(m.start));
            }
            Ok(Opened::Seal(s))
        }
        FrameKind::Message | FrameKind::Acks => {
            open_part(
                key,
                segment_id,
                offset,
                h,
                Part::Meta,
                &mut frame[m.clone()],
                m.start,
            )?;
            let plain = &frame[m.start..m.end - TAG_LEN];
            if h.kind == FrameKind::Acks {
                let n = u32::from_le_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
                if n * 8 + TAG_LEN != h.body_len as usize {
                    return Err(FormatError::at(
                        m.start,
                        CorruptionKind::BadField {
                            field: "ack count",
                            value: n as u64,
                        },
                    ));
                }
                let b = h.body_range();
                open_part(
                    key,
                    segment_id,
                    offset,
                    h,
                    Part::Body,
                    &mut frame[b.clone()],
                    b.start,
                )?;
                let ids = crate::format::frame::decode_ack_ids(&frame[b.start..b.end - TAG_LEN])
                    .collect();
                return Ok(Opened::Acks(ids));
            }
            let meta = MessageMeta::decode(plain).map_err(|e| e.shifted(m.start))?;
            let body_plain = h.body_len as usize - TAG_LEN;
            let fits = if h.padded {
                (meta.payload_len as usize) < body_plain
            } else {
                meta.payload_len as usize == body_plain
            };
            if !fits {
                return Err(FormatError::at(
                    m.start,
                    CorruptionKind::BadField {
                        field: "payload length",
                        value: u64::from(meta.payload_len),
                    },
                ));
            }
            Ok(Opened::Message {
                id: meta.id,
                created_at_ms: meta.created_at_ms,
                expires_at_ms: meta.expires_at_ms,
                queue: meta.queue.to_vec(),
                client_id: meta.client_id,
            })
        }
    }
}

/// Opens a message frame's body in place; returns the payload's range within `frame`.
/// The associated data binds the body to its segment, offset, frame lengths and part,
/// so the body of any other record fails here: a reader that knows from the index which
/// record sits at `offset` needs no meta open to trust the payload.
pub fn open_body(
    key: &SealKey,
    segment_id: u64,
    offset: u64,
    h: FrameHeader,
    frame: &mut [u8],
) -> Result<std::ops::Range<usize>, FormatError> {
    let b = h.body_range();
    let n = open_body_part(key, segment_id, offset, h, &mut frame[b.clone()])?;
    Ok(b.start..b.start + n)
}

/// Opens the sealed body (exactly `h.body_range()` of the frame at `offset`, copied out
/// on its own) in place; returns the payload length (without padding).
pub fn open_body_part(
    key: &SealKey,
    segment_id: u64,
    offset: u64,
    h: FrameHeader,
    body: &mut [u8],
) -> Result<usize, FormatError> {
    let at = h.body_range().start;
    if body.len() != h.body_len as usize {
        return Err(FormatError::at(
            at,
            CorruptionKind::BadField {
                field: "body length",
                value: body.len() as u64,
            },
        ));
    }
    open_part(key, segment_id, offset, h, Part::Body, body, at)?;
    let plain = &body[..body.len() - TAG_LEN];
    if !h.padded {
        return Ok(plain.len());
    }
    padding::unpadded_len(plain).ok_or_else(|| {
        FormatError::at(
            at,
            CorruptionKind::BadField {
                field: "body padding",
                value: plain.len() as u64,
            },
        )
    })
}

fn open_part(
    key: &SealKey,
    segment_id: u64,
    offset: u64,
    h: FrameHeader,
    part: Part,
    sealed: &mut [u8],
    at: usize,
) -> Result<(), FormatError> {
    let (ct, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag);
    if key.open(
        nonce(offset, part),
        &aad(segment_id, offset, &h, part),
        ct,
        &t,
    ) {
        Ok(())
    } else {
        Err(auth_fail(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;

    #[test]
    fn message_round_trip_and_binding() {
        let key = SealKey::new(&Dek::generate().unwrap());
        let meta = MessageMeta {
            id: 9,
            created_at_ms: 500,
            expires_at_ms: 1000,
            payload_len: 5,
            queue: b"q1",
            client_id: None,
        };
        let mut f = seal_message(&key, 3, 64, &meta, b"hello", None);
        assert_eq!(f.len(), message_frame_len(2, false, 5));
        assert!(!f.windows(5).any(|w| w == b"hello"));
        let h = FrameHeader::decode(&f).unwrap();
        let mut g = f.clone();
        match open_frame(&key, 3, 64, h, &mut g).unwrap() {
            Opened::Message { id, queue, .. } => {
                assert_eq!((id, queue.as_slice()), (9, &b"q1"[..]));
            }
            o => panic!("{o:?}"),
        }
        let r = open_body(&key, 3, 64, h, &mut g).unwrap();
        assert_eq!(&g[r], b"hello");
        // Moved to another offset or segment: fails.
        assert!(open_frame(&key, 3, 65, h, &mut f.clone()).is_err());
        assert!(open_frame(&key, 4, 64, h, &mut f.clone()).is_err());
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(open_body(&key, 3, 64, h, &mut f).is_err());
    }

    #[test]
    fn acks_and_seal_round_trip() {
        let key = SealKey::new(&Dek::generate().unwrap());
        let mut f = seal_acks(&key, 1, 128, &[5, 6, 7]);
        let h = FrameHeader::decode(&f).unwrap();
        assert!(
            matches!(open_frame(&key, 1, 128, h, &mut f).unwrap(), Opened::Acks(v) if v == vec![5, 6, 7])
        );
        let mut s = seal_segment(&key, 1, 500, 3, 0xabc, 77);
        let h = FrameHeader::decode(&s).unwrap();
        assert!(
            matches!(open_frame(&key, 1, 500, h, &mut s.clone()).unwrap(), Opened::Seal(m) if m.record_count == 3)
        );
        s[FRAME_HEADER_LEN] ^= 1; // change the record count
        assert!(open_frame(&key, 1, 500, h, &mut s).is_err());
    }
}
