//! The only place cinder maps files into memory.

use std::fs::File;

use memmap2::Mmap;

/// Maps a sealed segment read-only.
///
/// Soundness argument: a mapped segment is never written, truncated or resized by cinder
/// again. Sealed segments are immutable; recovery truncates torn tails *before* mapping;
/// shredding unlinks the file, which leaves the inode (and so the mapping) valid until the
/// last `Arc<Segment>` drops the map. The data-dir lock keeps other cinder processes out,
/// and the `cinder` CLI reads with `pread`, never with a mapping. A process outside cinder
/// that truncates a mapped file is outside this contract (as for every mmap-based engine).
pub fn map_sealed(file: &File) -> std::io::Result<Mmap> {
    #[expect(unsafe_code, reason = "read-only mapping of an immutable segment file")]
    // SAFETY: see the function docs: the mapped file is immutable for the map's lifetime.
    unsafe {
        Mmap::map(file)
    }
}
