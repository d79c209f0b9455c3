//! The machine's own limits, measured in the same run as the backends.

use std::path::Path;

#[path = "../../common/machine.rs"]
mod machine;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

#[derive(Debug, Clone)]
pub struct Limits {
    /// (payload size, seals/s, opens/s) on one core.
    pub aead: Vec<(usize, f64, f64)>,
    /// Bytes/s, fdatasync every 4 MiB.
    pub seq_write: f64,
    /// fdatasync after a 4 KiB append, seconds.
    pub fsync_p50: f64,
    pub fsync_p99: f64,
    /// Bytes/s.
    pub memcpy: f64,
    /// (payload size, seconds) of one commit of a batch of such messages: the write of
    /// `batch · (size + 44)` bytes (payload, nonce, tag, key) and an fdatasync, median.
    pub commit: Vec<(usize, f64)>,
}

impl Limits {
    pub fn seal_rate(&self, size: usize) -> f64 {
        self.aead
            .iter()
            .find(|a| a.0 == size)
            .map_or(f64::NAN, |a| a.1)
    }

    pub fn commit_secs(&self, size: usize) -> f64 {
        self.commit
            .iter()
            .find(|a| a.0 == size)
            .map_or(f64::NAN, |a| a.1)
    }

    pub fn open_rate(&self, size: usize) -> f64 {
        self.aead
            .iter()
            .find(|a| a.0 == size)
            .map_or(f64::NAN, |a| a.2)
    }
}

pub fn measure(
    dir: &Path,
    sizes: &[usize],
    batch: usize,
    secs: f64,
    quick: bool,
) -> std::io::Result<Limits> {
    let aead = sizes
        .iter()
        .map(|&s| (s, seal_rate(s, secs), open_rate(s, secs)))
        .collect();
    let (fsync_p50, fsync_p99) = machine::fsync_latency(dir, if quick { 50 } else { 2000 })?;
    let seq_write = machine::seq_write(dir, if quick { 16 << 20 } else { 1 << 30 })?;
    let commit = sizes
        .iter()
        .map(|&s| {
            let n = if quick { 20 } else { 300 };
            machine::commit_latency(dir, batch * (s + 44), n).map(|t| (s, t))
        })
        .collect::<std::io::Result<_>>()?;
    Ok(Limits {
        aead,
        commit,
        seq_write,
        fsync_p50,
        fsync_p99,
        memcpy: machine::memcpy_bandwidth(secs),
    })
}

fn ring_key() -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("key"))
}

fn nonce(i: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&i.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// One core's seal rate for `size`-byte messages, seals/s.
fn seal_rate(size: usize, secs: f64) -> f64 {
    let key = ring_key();
    let mut buf = vec![1u8; size];
    machine::rate_for(secs, |i| {
        let t = key
            .seal_in_place_separate_tag(nonce(i), Aad::from(b"aad"), &mut buf)
            .expect("seal");
        let _ = std::hint::black_box(t);
    })
}

/// One core's open rate (a copy of the sealed record, then the open), opens/s.
fn open_rate(size: usize, secs: f64) -> f64 {
    let key = ring_key();
    let mut sealed = vec![1u8; size];
    let tag = key
        .seal_in_place_separate_tag(nonce(0), Aad::from(b"aad"), &mut sealed)
        .expect("seal");
    sealed.extend_from_slice(tag.as_ref());
    let mut work = sealed.clone();
    machine::rate_for(secs, |_| {
        work.copy_from_slice(&sealed);
        let p = key
            .open_in_place(nonce(0), Aad::from(b"aad"), &mut work)
            .expect("open");
        std::hint::black_box(p);
    })
}
