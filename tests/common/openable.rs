//! What a thief of the data dir who also holds the master key could decrypt: every
//! message record whose meta part opens under a data key that the keystore still holds.
//! Uses only the documented format (engine-format.md).

use std::path::Path;

use cinder::crypto::SealKey;
use cinder::format::frame::{aad, nonce, FrameHeader, FrameKind, MessageMeta, Part, TAG_LEN};
use cinder::format::keystore::KeystoreImage;
use cinder::format::segment_header::HEADER_LEN;
use cinder::KeyProvider;

/// (segment id, message id) of every message record that opens with a key in the
/// keystore of `dir`, unwrapped by whichever of `keys` wrapped it.
pub fn openable_messages(dir: &Path, keys: &[&dyn KeyProvider]) -> Vec<(u64, u64)> {
    let Ok(bytes) = std::fs::read(dir.join("KEYS")) else {
        return Vec::new();
    };
    let img = KeystoreImage::decode(&bytes).expect("keystore decodes");
    let key = keys
        .iter()
        .find(|k| k.kek_id() == img.kek_id)
        .expect("a provider for the keystore's master key");
    let mut out = Vec::new();
    for e in &img.entries {
        let Ok(bytes) = std::fs::read(dir.join(format!("{:016x}.seg", e.segment_id))) else {
            continue;
        };
        let mut ctx = b"cinder dek".to_vec();
        ctx.extend_from_slice(&e.segment_id.to_le_bytes());
        ctx.extend_from_slice(&e.dek_id.to_le_bytes());
        let dek = key.unwrap(&e.wrapped, &ctx).unwrap().unwrap();
        let sk = SealKey::new(&dek);
        let mut pos = HEADER_LEN;
        while let Ok(h) = FrameHeader::decode(&bytes[pos.min(bytes.len())..]) {
            if pos + h.frame_len() > bytes.len() {
                break;
            }
            if h.kind == FrameKind::Message {
                let m = h.meta_range();
                let mut meta = bytes[pos + m.start..pos + m.end].to_vec();
                let (ct, tag) = meta.split_at_mut(m.len() - TAG_LEN);
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(tag);
                let a = aad(e.segment_id, pos as u64, &h, Part::Meta);
                if sk.open(nonce(pos as u64, Part::Meta), &a, ct, &t) {
                    out.push((e.segment_id, MessageMeta::decode(ct).unwrap().id));
                }
            }
            pos += h.frame_len();
        }
    }
    out
}
