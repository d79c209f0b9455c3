//! Small filesystem helpers: private permissions, crash-safe replace, directory fsync,
//! and the exclusive directory lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::vfs::FileSystem;

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create data dir", dir, e))
}

/// Opens a new file with mode 0600, failing if it exists.
pub fn create_private_file(path: &Path) -> Result<File> {
    crate::vfs::real::create_new(path).map_err(|e| Error::io("create file", path, e))
}

/// Creates the temp file `tmp` (0600) afresh: a stale one a crash left is removed first.
pub fn create_temp(vfs: &dyn FileSystem, tmp: &Path) -> Result<File> {
    if tmp.exists() {
        vfs.remove_file(tmp)
            .map_err(|e| Error::io("remove temp file", tmp, e))?;
    }
    vfs.create_new(tmp)
        .map_err(|e| Error::io("create file", tmp, e))
}

/// Writes `bytes` to a new private file (0600; fails if it exists), fsynced together with
/// its directory: key files, key backups.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_private_dir(parent)?;
    }
    let mut f = create_private_file(path)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write file", path, e))?;
    if let Some(parent) = parent {
        sync_dir(&crate::vfs::RealFs, parent)?;
    }
    Ok(())
}

/// Reads a secret kept in a file (a passphrase, a PIN): the file must not be readable by
/// group or others; one trailing newline is dropped. The bytes are wiped when dropped.
pub fn read_secret(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|e| Error::io("read secret file", path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::SecretFileInsecure {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut b = zeroize::Zeroizing::new(
        fs::read(path).map_err(|e| Error::io("read secret file", path, e))?,
    );
    if b.ends_with(b"\n") {
        b.pop();
        if b.ends_with(b"\r") {
            b.pop();
        }
    }
    Ok(b)
}

/// fsyncs a directory so that creations, renames and unlinks in it are durable.
pub fn sync_dir(vfs: &dyn FileSystem, dir: &Path) -> Result<()> {
    vfs.sync_dir(dir)
        .map_err(|e| Error::io("fsync dir", dir, e))
}

/// Replaces `path` with `bytes` crash-safely: write a temp file (0600), fsync it, rename
/// it over `path`, fsync the directory. A crash leaves either the old or the new file.
pub fn replace_file(vfs: &dyn FileSystem, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let f = create_temp(vfs, &tmp)?;
    let written = vfs
        .write_at(&f, &tmp, bytes, 0)
        .and_then(|()| vfs.sync_all(&f, &tmp));
    if let Err(e) = written {
        drop(f);
        let _ = vfs.remove_file(&tmp);
        return Err(Error::io("write temp file", &tmp, e));
    }
    drop(f);
    vfs.rename(&tmp, path)
        .map_err(|e| Error::io("rename", path, e))?;
    sync_dir(vfs, path.parent().unwrap_or(Path::new(".")))
}

/// The temp-file name used by [`replace_file`].
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// How long a held data-dir lock is retried before `Error::Locked`.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// An exclusive lock on a data dir, held for the life of a `Store`.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock, or fails with [`Error::Locked`] if any process (this one included)
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("open lock file", &path, e))?;
        // A lock just released can still be held for a moment by a child process that
        // another thread of this process is spawning: the child shares the lock file's
        // open file description from fork until exec closes it. Retry briefly so that a
        // close-and-reopen is not refused for that; a real holder is reported after it.
        let give_up = std::time::Instant::now() + LOCK_RETRY;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::Locked {
                        dir: dir.to_path_buf(),
                    })
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(Error::io("lock data dir", &path, e))
                }
            }
        }
    }
}
