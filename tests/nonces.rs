//! Nonce uniqueness across crashes: a child is SIGKILLed mid-write many times (Async mode,
//! so tails tear); after every recovery, every frame ever seen on disk at (segment id,
//! offset) — the key and the nonce — has the same bytes it had before. A segment is never
//! appended to after a reopen, and a segment id is never reused.

mod common;

use std::collections::HashMap;
use std::path::Path;

use cinder::format::frame::FrameHeader;
use cinder::format::segment_header::{SegmentHeader, HEADER_LEN};
use cinder::Store;
use common::{jitter, options, run_child, Ledger};

#[test]
fn child_entry() {
    if let Ok(spec) = std::env::var("CINDER_CHILD") {
        common::child_main(&spec);
    }
}

/// (segment id, frame offset) → frame bytes, for every frame in the data dir.
fn frames(dir: &Path) -> HashMap<(u64, u64), Vec<u8>> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "seg") {
            continue;
        }
        let b = std::fs::read(&p).unwrap();
        let id = SegmentHeader::decode(&b)
            .expect("recovered segments have valid headers")
            .segment_id;
        let mut pos = HEADER_LEN;
        while pos < b.len() {
            let h = FrameHeader::decode(&b[pos..]).unwrap_or_else(|e| {
                panic!("{}: bad frame at {pos} of {}: {e:?}", p.display(), b.len())
            });
            let len = h.frame_len();
            out.insert((id, pos as u64), b[pos..pos + len].to_vec());
            pos += len;
        }
    }
    out
}

#[test]
fn no_key_nonce_pair_reused_across_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    cinder::FileKeyProvider::create(&key).unwrap();
    let dir = tmp.path().join("data");
    let mut seen: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut ledger = Ledger::default();
    let mut torn = 0;
    for c in 0..16u64 {
        run_child(
            "child_entry",
            &dir,
            &key,
            "async",
            c * 1_000_000,
            jitter(c + 3, 60, 300),
            &mut ledger,
        );
        let store = Store::open(&dir, options(&key, "sync")).expect("recover");
        torn += store.recovery_report().truncated.len() + store.recovery_report().unsealed;
        store.close().unwrap();
        drop(store);
        for (k, v) in frames(&dir) {
            if let Some(old) = seen.get(&k) {
                assert_eq!(
                    old, &v,
                    "segment {} offset {} was rewritten: key/nonce reuse",
                    k.0, k.1
                );
            }
            seen.insert(k, v);
        }
    }
    assert!(
        torn > 0,
        "no crash ever left an unsealed segment: the test exercised nothing"
    );
    assert!(seen.len() > 100);
}
