//! The machine's own limits, shared by `benches/report.rs` and the peer-comparison
//! harness (`benches/peers`), so that both measure them the same way.
#![allow(dead_code)] // each includer uses its own subset

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

/// Calls `f` (with a running counter) for about `secs`; returns calls per second.
pub fn rate_for(secs: f64, mut f: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    let mut i = 0u64;
    loop {
        for _ in 0..64 {
            f(i);
            i += 1;
        }
        let e = start.elapsed().as_secs_f64();
        if e >= secs {
            return i as f64 / e;
        }
    }
}

/// fdatasync latency after each of `n` 4 KiB appends to a file in `dir`: (p50, p99) in
/// seconds.
pub fn fsync_latency(dir: &Path, n: usize) -> std::io::Result<(f64, f64)> {
    let path = dir.join("limits-fsync");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let block = vec![0x5au8; 4096];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        f.write_all_at(&block, (i * 4096) as u64)?;
        let t = Instant::now();
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64());
    }
    std::fs::remove_file(&path)?;
    lat.sort_by(f64::total_cmp);
    Ok((lat[n / 2], lat[(n * 99 / 100).min(n - 1)]))
}

/// Sequential write bandwidth in bytes/s: `total` bytes in 4 MiB writes, fdatasync
/// after each; the better of two passes (each a new file). On a thin-provisioned virtual
/// disk the first writes to never-written blocks run several times slower than writes to
/// blocks written before (seen here: 339 MB/s, then 1.6 GB/s), so one pass would report
/// whatever the disk's history was.
pub fn seq_write(dir: &Path, total: usize) -> std::io::Result<f64> {
    Ok(seq_write_pass(dir, total)?.max(seq_write_pass(dir, total)?))
}

fn seq_write_pass(dir: &Path, total: usize) -> std::io::Result<f64> {
    let path = dir.join("limits-seq");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let chunk = vec![0xa5u8; 4 << 20];
    let t = Instant::now();
    let mut done = 0;
    while done < total {
        f.write_all(&chunk)?;
        f.sync_data()?;
        done += chunk.len();
    }
    let bw = done as f64 / t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(bw)
}

/// How the file under a commit measurement is laid out before the commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Empty; every commit grows it (fdatasync also writes the new size).
    Growing,
    /// Written with zeros first: the blocks exist, nothing but data changes.
    Zeroed,
    /// `posix_fallocate`d, as cinder lays out a segment: the blocks are reserved as
    /// "unwritten" extents, and the first fdatasync over each one records that it is
    /// written now (on ext4 an extra metadata write per commit).
    Fallocated,
}

/// One commit of `batch` bytes: a sequential write of that size, then fdatasync;
/// median seconds over `n` commits, the better of a growing file and a zeroed one (a log
/// that preallocates skips the file-size update in every fdatasync).
pub fn commit_latency(dir: &Path, batch: usize, n: usize) -> std::io::Result<f64> {
    Ok(
        commit_latency_on(dir, batch, n, Layout::Growing)?.min(commit_latency_on(
            dir,
            batch,
            n,
            Layout::Zeroed,
        )?),
    )
}

/// [`commit_latency`] on one file layout: median seconds per commit of `batch` bytes.
pub fn commit_latency_on(
    dir: &Path,
    batch: usize,
    n: usize,
    layout: Layout,
) -> std::io::Result<f64> {
    let path = dir.join("limits-commit");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let total = batch * n;
    match layout {
        Layout::Growing => {}
        Layout::Zeroed => {
            let zeros = vec![0u8; 4 << 20];
            let mut at = 0;
            while at < total {
                f.write_all_at(&zeros, at as u64)?;
                at += zeros.len();
            }
            f.sync_all()?;
        }
        Layout::Fallocated => {
            fallocate(&f, total as u64)?;
            f.sync_all()?;
        }
    }
    let buf = vec![0x3cu8; batch];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&buf, (i * batch) as u64)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64());
    }
    std::fs::remove_file(&path)?;
    lat.sort_by(f64::total_cmp);
    Ok(lat[n / 2])
}

fn fallocate(f: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    #[expect(unsafe_code, reason = "posix_fallocate on an fd we own")]
    // SAFETY: the fd stays valid while `f` is borrowed; posix_fallocate reads no memory.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// memcpy bandwidth between two 64 MiB buffers, bytes/s.
pub fn memcpy_bandwidth(secs: f64) -> f64 {
    let src = vec![3u8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    let calls = rate_for(secs.max(0.2) / 64.0, |_| {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
    });
    calls * src.len() as f64
}
