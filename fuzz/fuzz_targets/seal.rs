//! The footer: a sealed segment ends with a seal frame (16-byte frame header + 48-byte
//! `SealMeta`). Decodes the input as a seal frame the way recovery does (at the start of
//! the input, and as the last 64 bytes of a "file"), plus `SealMeta::decode` standalone;
//! an accepted seal must be canonical and round-trip, and a seal frame rebuilt from its
//! decoded parts must carry the same CRC exactly when the input's CRC verifies.
#![no_main]

use cinder::format::frame::{
    finish_crc, verify_crc, FrameHeader, FrameKind, SealMeta, FRAME_HEADER_LEN, SEAL_META_LEN,
};
use libfuzzer_sys::fuzz_target;

const SEAL_FRAME_LEN: usize = FRAME_HEADER_LEN + SEAL_META_LEN;

fn check_meta(buf: &[u8]) -> Option<SealMeta> {
    let s = SealMeta::decode(buf).ok()?;
    assert!(buf.len() >= SEAL_META_LEN);
    assert_eq!(
        &s.encode()[..],
        &buf[..SEAL_META_LEN],
        "seal meta is not canonical"
    );
    assert_eq!(SealMeta::decode(&s.encode()), Ok(s));
    Some(s)
}

fn check_frame(frame: &[u8]) {
    let Ok(h) = FrameHeader::decode(frame) else {
        return;
    };
    if h.kind != FrameKind::Seal {
        return;
    }
    assert_eq!(usize::from(h.meta_len), SEAL_META_LEN);
    assert_eq!(h.body_len, 0);
    assert_eq!(h.frame_len(), SEAL_FRAME_LEN);
    let Some(frame) = frame.get(..SEAL_FRAME_LEN) else {
        return;
    };
    let Some(s) = check_meta(&frame[h.meta_range()]) else {
        return;
    };
    let mut rebuilt = vec![0u8; SEAL_FRAME_LEN];
    h.encode_into(&mut rebuilt);
    rebuilt[FRAME_HEADER_LEN..].copy_from_slice(&s.encode());
    finish_crc(&mut rebuilt);
    assert_eq!(verify_crc(frame).is_ok(), rebuilt == frame);
}

fuzz_target!(|data: &[u8]| {
    check_meta(data);
    check_frame(data);
    if data.len() >= SEAL_FRAME_LEN {
        check_frame(&data[data.len() - SEAL_FRAME_LEN..]);
    }
});
