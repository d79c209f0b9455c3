//! Frame decoding: `FrameHeader::decode`, `verify_crc`, and the plaintext decoders of the
//! sealed parts (`MessageMeta::decode`, `SealMeta::decode`, `decode_ack_ids`), on
//! arbitrary bytes. Checks the documented length limits, that every accepted structure is
//! its own canonical encoding, and round trips through the encoders.
#![no_main]

use cinder::format::frame::{
    decode_ack_ids, finish_crc, verify_crc, FrameHeader, FrameKind, MessageMeta, SealMeta,
    FRAME_HEADER_LEN, MESSAGE_META_FIXED, SEAL_META_LEN,
};
use libfuzzer_sys::fuzz_target;

/// The limits as `engine-format.md` states them (independent of the code's constants).
fn lengths_documented(h: &FrameHeader) -> bool {
    let (m, b) = (usize::from(h.meta_len), h.body_len as usize);
    match h.kind {
        FrameKind::Message => (46..=316).contains(&m) && (16..=(16 << 20) + 16).contains(&b),
        FrameKind::Acks => m == 20 && b >= 16 + 8 && (b - 16) % 8 == 0 && b <= (16 << 20) + 16,
        FrameKind::Seal => m == 48 && b == 0,
    }
}

fn check_message_meta(buf: &[u8]) {
    if let Ok(m) = MessageMeta::decode(buf) {
        assert!(!m.queue.is_empty() && m.queue.len() <= 255);
        let has_cid = m.client_id.is_some();
        assert_eq!(buf.len(), MessageMeta::encoded_len(m.queue.len(), has_cid));
        assert_eq!(
            buf.len(),
            MESSAGE_META_FIXED + m.queue.len() + if has_cid { 16 } else { 0 }
        );
        let mut out = vec![0u8; buf.len()];
        m.encode_into(&mut out);
        assert_eq!(out, buf, "message meta is not canonical");
        assert_eq!(MessageMeta::decode(&out), Ok(m));
    }
}

fn check_seal_meta(buf: &[u8]) {
    if let Ok(s) = SealMeta::decode(buf) {
        let enc = s.encode();
        assert_eq!(
            &enc[..],
            &buf[..SEAL_META_LEN],
            "seal meta is not canonical"
        );
        assert_eq!(&s.authenticated()[..], &buf[..24]);
        assert_eq!(SealMeta::decode(&enc), Ok(s));
    }
}

fn check_ack_ids(buf: &[u8]) {
    let ids: Vec<u64> = decode_ack_ids(buf).collect();
    assert_eq!(ids.len(), buf.len() / 8);
    let enc: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    assert_eq!(&enc[..], &buf[..ids.len() * 8]);
}

fuzz_target!(|data: &[u8]| {
    let crc_ok = verify_crc(data).is_ok();
    if crc_ok {
        assert!(data.len() >= FRAME_HEADER_LEN);
    }
    if let Ok(h) = FrameHeader::decode(data) {
        assert!(
            lengths_documented(&h),
            "accepted lengths outside the documented limits: {h:?}"
        );
        assert_eq!(
            h.frame_len(),
            FRAME_HEADER_LEN + usize::from(h.meta_len) + h.body_len as usize
        );
        assert_eq!(h.meta_range().start, FRAME_HEADER_LEN);
        assert_eq!(h.meta_range().end, h.body_range().start);
        assert_eq!(h.body_range().end, h.frame_len());
        // Canonical header: everything but the CRC field is re-encoded identically.
        let mut enc = [0u8; FRAME_HEADER_LEN];
        h.encode_into(&mut enc);
        assert_eq!(
            &enc[4..],
            &data[4..FRAME_HEADER_LEN],
            "frame header is not canonical"
        );
        assert_eq!(FrameHeader::decode(&enc), Ok(h));
        if let Some(frame) = data.get(..h.frame_len()) {
            // The CRC verifies exactly when it equals the one the encoder computes.
            let mut fixed = frame.to_vec();
            finish_crc(&mut fixed);
            verify_crc(&fixed).expect("finish_crc output verifies");
            assert_eq!(verify_crc(frame).is_ok(), fixed == frame);
            // The part decoders must be total on whatever bytes sit in the parts.
            let meta = &frame[h.meta_range()];
            let body = &frame[h.body_range()];
            check_message_meta(meta);
            check_message_meta(&meta[..meta.len().saturating_sub(16)]);
            check_seal_meta(meta);
            check_ack_ids(body);
            check_ack_ids(&body[..body.len().saturating_sub(16)]);
        }
    }
    // The plaintext decoders on the whole input too (seeds hold plaintext metas).
    check_message_meta(data);
    check_seal_meta(data);
    check_ack_ids(data);
});
