//! Size padding: payloads round-trip under every mode, the body lengths on disk are the
//! mode's buckets (not the payloads' lengths), the padding flag cannot be flipped, and
//! compaction keeps a copy's padding.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cinder::format::frame::{FrameHeader, FrameKind};
use cinder::format::padding::padded_len;
use cinder::format::segment_header::HEADER_LEN;
use cinder::{CorruptionKind, Error, FileKeyProvider, ManualClock, Options, Padding, Store};

const SIZES: [usize; 12] = [0, 1, 31, 63, 64, 100, 700, 1000, 1023, 1024, 5000, 65_535];

fn opts(tmp: &Path, padding: Padding) -> Options {
    let key = Arc::new(FileKeyProvider::open_or_create(tmp.join("key"), true).unwrap());
    let mut o = Options::new(key);
    o.padding = padding;
    o.segment_size = 1 << 20;
    o.max_message_size = 64 << 10;
    o
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

/// (body plaintext length, padded flag) of every message frame in the data dir.
fn message_bodies(dir: &Path) -> Vec<(usize, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "seg") {
            continue;
        }
        let data = std::fs::read(&p).unwrap();
        let mut at = HEADER_LEN;
        while let Ok(h) = FrameHeader::decode(&data[at..]) {
            if h.kind == FrameKind::Message {
                out.push((h.body_len as usize - 16, h.padded));
            }
            at += h.frame_len();
        }
    }
    out.sort_unstable();
    out
}

#[test]
fn payloads_round_trip_and_the_files_show_only_buckets() {
    for mode in [Padding::None, Padding::PowerOfTwo, Padding::Padme] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let s = Store::open(&data, opts(tmp.path(), mode)).unwrap();
        for (i, &len) in SIZES.iter().enumerate() {
            s.append(b"q", &payload(i, len), Duration::from_secs(600))
                .unwrap();
        }
        s.close().unwrap();
        drop(s);
        let s = Store::open(&data, opts(tmp.path(), mode)).unwrap();
        let got = s.read(b"q", None, 100).unwrap();
        assert_eq!(got.len(), SIZES.len());
        for (i, (m, &len)) in got.iter().zip(&SIZES).enumerate() {
            assert_eq!(m.payload, payload(i, len), "{mode:?} size {len}");
        }
        let mut want: Vec<(usize, bool)> = SIZES
            .iter()
            .map(|&l| (padded_len(mode, l), mode != Padding::None))
            .collect();
        want.sort_unstable();
        assert_eq!(message_bodies(&data), want, "{mode:?}");
        if mode == Padding::Padme {
            // Nearby sizes share a bucket: 1000 and 1023 look the same on disk.
            assert_eq!(padded_len(mode, 1000), padded_len(mode, 1023));
        }
        drop(s);
        let key = FileKeyProvider::open(tmp.path().join("key")).unwrap();
        let v = cinder::verify(&data, &key).unwrap();
        assert!(v.is_clean(), "{mode:?}: {:?}", v.problems);
    }
}

#[test]
fn the_padding_flag_is_authenticated() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Store::open(&data, opts(tmp.path(), Padding::Padme)).unwrap();
    s.append(b"q", b"a secret of some length", Duration::from_secs(600))
        .unwrap();
    s.close().unwrap();
    drop(s);
    let seg = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    // Clear the flag of the first frame and fix its checksum: only the AEAD can tell.
    let at = HEADER_LEN;
    let h = FrameHeader::decode(&b[at..]).unwrap();
    assert!(h.padded);
    b[at + 5] = 0;
    let crc = crc32fast::hash(&b[at + 4..at + h.frame_len()]);
    b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&seg, &b).unwrap();
    // An authentication failure, not the payload-length check: a cleared flag would fail
    // that check even if the flag were not bound into the AEAD's associated data.
    match Store::open(&data, opts(tmp.path(), Padding::Padme)) {
        Err(Error::Corruption {
            offset,
            kind: CorruptionKind::AuthenticationFailed,
            ..
        }) => assert!(
            (at..at + h.frame_len()).contains(&(offset as usize)),
            "{offset}"
        ),
        other => panic!("a flipped padding flag was not an authentication failure: {other:?}"),
    }
}

#[test]
fn compaction_keeps_a_copys_padding() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let clock = ManualClock::new(1_000_000);
    let mut o = opts(tmp.path(), Padding::PowerOfTwo);
    o.clock = clock.clone();
    o.background_reaper = false;
    o.max_shred_delay = Duration::from_secs(8);
    let s = Store::open(&data, o).unwrap();
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            s.append(b"q", &payload(i, 300 + i), Duration::from_secs(3600))
                .unwrap(),
        );
    }
    assert_eq!(s.ack_batch(b"q", &ids[..36]).unwrap(), 36);
    for _ in 0..6 {
        clock.advance(Duration::from_secs(2));
        s.maintain().unwrap();
    }
    assert!(s.stats().bytes_copied > 0, "nothing was compacted");
    let left = s.read(b"q", None, 100).unwrap();
    assert_eq!(left.len(), 4);
    for (m, i) in left.iter().zip(36..) {
        assert_eq!(m.payload, payload(i, 300 + i));
    }
    for (body, padded) in message_bodies(&data) {
        assert!(padded && body.is_power_of_two(), "{body} {padded}");
    }
}
