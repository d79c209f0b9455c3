//! The I/O seam: every file operation the engine does on its data dir goes through
//! [`FileSystem`], so tests can inject faults (ENOSPC, EIO, short writes, failed fsyncs)
//! and cut power at any call ([`FaultFs`]).
//!
//! The real implementation, [`RealFs`], is the trait's default methods: each is the one
//! system call it names, reached through one indirect call (next to a system call, free).
//! Files stay `std::fs::File`s, so the engine keeps `pread`/`pwrite` and `mmap`; the seam
//! only decides whether and how each call happens.
//!
//! Not behind the seam: the data-dir lock (`flock` on `LOCK`, which holds no data), the
//! master key file (outside the data dir), and the read-only `inspect`/`verify` tools.

mod fault;

pub use fault::{CrashImage, Fault, FaultFs, FaultKind};

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// The kinds of file operation, as counted and targeted by [`FaultFs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// Create a new file (fails if it exists).
    Create,
    /// Open an existing file.
    Open,
    /// Read a whole file, or a range of one.
    Read,
    /// `pwrite`.
    Write,
    /// `fdatasync` / `fsync` of a file.
    Sync,
    /// `ftruncate`.
    SetLen,
    /// `posix_fallocate`.
    Allocate,
    /// `rename`.
    Rename,
    /// `unlink`.
    Remove,
    /// `fsync` of a directory (makes creations, renames and unlinks in it durable).
    SyncDir,
    /// List a directory.
    List,
    /// Map a sealed segment for reading.
    Map,
}

impl Op {
    /// Whether the operation changes what is (or will be) on disk: these are the calls
    /// a power cut can land between.
    pub fn mutates(self) -> bool {
        matches!(
            self,
            Op::Create
                | Op::Write
                | Op::Sync
                | Op::SetLen
                | Op::Allocate
                | Op::Rename
                | Op::Remove
                | Op::SyncDir
        )
    }
}

/// Every file operation of the engine. The default methods are the real system calls
/// ([`RealFs`]); an implementation overrides them to observe or fail calls.
///
/// `path` always names the file a `File` was opened from (for errors and bookkeeping).
pub trait FileSystem: Send + Sync + std::fmt::Debug {
    /// Creates a new file, mode 0600, open for reading and writing; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<File> {
        real::create_new(path)
    }
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(path)
    }
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, file: &File, _path: &Path, buf: &mut [u8], offset: u64) -> io::Result<()> {
        file.read_exact_at(buf, offset)
    }
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, file: &File, _path: &Path, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }
    /// `fdatasync`: the file's data (and its size) on stable storage.
    fn sync_data(&self, file: &File, _path: &Path) -> io::Result<()> {
        file.sync_data()
    }
    /// `fsync`: data and all metadata.
    fn sync_all(&self, file: &File, _path: &Path) -> io::Result<()> {
        file.sync_all()
    }
    /// Sets the file's length.
    fn set_len(&self, file: &File, _path: &Path, len: u64) -> io::Result<()> {
        file.set_len(len)
    }
    /// Reserves `len` bytes of disk for the file (`posix_fallocate`; a filesystem without
    /// it gets a sparse file).
    fn allocate(&self, file: &File, _path: &Path, len: u64) -> io::Result<()> {
        real::allocate(file, len)
    }
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    /// Unlinks a file.
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    /// fsyncs a directory, making creations, renames and unlinks in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    /// The names and paths of the entries of a directory.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
        let mut v = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            v.push((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
        Ok(v)
    }
    /// Maps a sealed segment read-only (see `segment::mmap` for the soundness argument).
    fn map(&self, file: &File, _path: &Path) -> io::Result<Mmap> {
        crate::segment::map_sealed(file)
    }
}

/// The real file system: the default [`Options::file_system`](crate::Options).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl FileSystem for RealFs {}

/// The real calls that more than one implementation uses.
pub(crate) mod real {
    use super::{AsRawFd, File, OpenOptions, OpenOptionsExt, Path};
    use std::io;

    pub fn create_new(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    }

    pub fn allocate(file: &File, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        #[expect(unsafe_code, reason = "posix_fallocate on an fd we own")]
        // SAFETY: the fd is valid for the life of `file`; posix_fallocate reads no memory.
        let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        match r {
            // 0, or a filesystem without fallocate support: fall back to a sparse file.
            0 | libc::EOPNOTSUPP | libc::ENOSYS => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}
