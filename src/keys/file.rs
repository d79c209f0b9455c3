//! A key-encryption key kept in a 32-byte file with mode 0600.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::KeyProvider;
use crate::crypto::locked::LockedBox;
use crate::crypto::{self, Dek, KEY_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::fsutil;

const SALT_LEN: usize = 24;
/// Length of a key wrapped by this provider: salt, sealed key, tag.
pub const WRAPPED_LEN: usize = SALT_LEN + KEY_LEN + TAG_LEN;

/// A KEK read from a key file. Protects the data dir against a thief who has the data
/// dir but not the key file. The key is zeroized on drop.
pub struct FileKeyProvider {
    path: PathBuf,
    /// In locked, dump-excluded memory, wiped on drop.
    kek: LockedBox<[u8; KEY_LEN]>,
    id: u64,
}

impl std::fmt::Debug for FileKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeyProvider")
            .field("path", &self.path)
            .field("kek_id", &format_args!("{:016x}", self.id))
            .finish_non_exhaustive()
    }
}

impl FileKeyProvider {
    /// Opens an existing key file. It must be exactly 32 bytes and not readable by group
    /// or others.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::KeyFileMissing { path })
            }
            Err(e) => return Err(Error::io("open key file", &path, e)),
        };
        let meta = f
            .metadata()
            .map_err(|e| Error::io("stat key file", &path, e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::KeyFileInsecure { path, mode });
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(Error::KeyFileInvalid {
                reason: format!("{} bytes, expected {KEY_LEN}", meta.len()),
                path,
            });
        }
        let mut kek = LockedBox::new([0u8; KEY_LEN]);
        f.read_exact(&mut kek[..])
            .map_err(|e| Error::io("read key file", &path, e))?;
        let id = crypto::kek_fingerprint(&kek);
        Ok(FileKeyProvider { path, kek, id })
    }

    /// Creates a new random key file (mode 0600); fails if the file exists.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let mut kek = Zeroizing::new([0u8; KEY_LEN]);
        crypto::fill_random(kek.as_mut())?;
        Self::write_new(path.as_ref(), &kek)
    }

    /// Writes `kek` to a new key file (mode 0600, fsynced with its dir); fails if the file
    /// exists.
    fn write_new(path: &Path, kek: &[u8; KEY_LEN]) -> Result<Self> {
        fsutil::write_new_private(path, kek)?;
        Self::open(path)
    }

    /// A backup of this master key sealed under `passphrase` (Argon2id + ChaCha20-Poly1305,
    /// see [`super::backup`]); 96 bytes to store away from the data dir.
    pub fn export_backup(
        &self,
        passphrase: &[u8],
        params: super::backup::BackupParams,
    ) -> Result<Vec<u8>> {
        Ok(super::backup::seal(&self.kek, self.id, passphrase, params)?.to_vec())
    }

    /// Restores a master key from a backup into a new key file at `path` (mode 0600;
    /// fails if it exists). A wrong passphrase is `Error::WrongPassphrase`.
    pub fn import_backup(backup: &[u8], passphrase: &[u8], path: impl AsRef<Path>) -> Result<Self> {
        let (kek, _) = super::backup::open(backup, passphrase)?;
        Self::write_new(path.as_ref(), &kek)
    }

    /// Opens the key file, creating it first if it is missing and `create_if_missing`.
    pub fn open_or_create(path: impl AsRef<Path>, create_if_missing: bool) -> Result<Self> {
        match Self::open(path.as_ref()) {
            Err(Error::KeyFileMissing { .. }) if create_if_missing => Self::create(path),
            r => r,
        }
    }
}

impl KeyProvider for FileKeyProvider {
    fn kek_id(&self) -> u64 {
        self.id
    }

    fn wrap(&self, dek: &Dek, context: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; WRAPPED_LEN];
        crypto::fill_random(&mut out[..SALT_LEN])?;
        let key = crypto::derive_one_time_key(&self.kek, &out[..SALT_LEN]);
        out[SALT_LEN..SALT_LEN + KEY_LEN].copy_from_slice(dek.expose());
        let tag = key.seal([0; 12], context, &mut out[SALT_LEN..SALT_LEN + KEY_LEN]);
        out[SALT_LEN + KEY_LEN..].copy_from_slice(&tag);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Option<Dek>> {
        if wrapped.len() != WRAPPED_LEN {
            return Ok(None);
        }
        let key = crypto::derive_one_time_key(&self.kek, &wrapped[..SALT_LEN]);
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(&wrapped[SALT_LEN..SALT_LEN + KEY_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&wrapped[SALT_LEN + KEY_LEN..]);
        if !key.open([0; 12], context, k.as_mut(), &tag) {
            return Ok(None);
        }
        Ok(Some(Dek::from_bytes(&k)))
    }

    fn key_file(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn wrap_unwrap_and_context_binding() {
        let dir = tempfile::tempdir().unwrap();
        let p = FileKeyProvider::create(dir.path().join("k")).unwrap();
        let dek = Dek::generate().unwrap();
        let w = p.wrap(&dek, b"ctx").unwrap();
        assert_eq!(
            p.unwrap(&w, b"ctx").unwrap().unwrap().expose(),
            dek.expose()
        );
        assert!(p.unwrap(&w, b"other").unwrap().is_none());
        let q = FileKeyProvider::create(dir.path().join("k2")).unwrap();
        assert!(q.unwrap(&w, b"ctx").unwrap().is_none());
        assert_ne!(p.kek_id(), q.kek_id());
    }

    #[test]
    fn refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            FileKeyProvider::open(&missing),
            Err(Error::KeyFileMissing { .. })
        ));
        let p = dir.path().join("k");
        FileKeyProvider::create(&p).unwrap();
        assert!(matches!(FileKeyProvider::create(&p), Err(Error::Io { .. })));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            FileKeyProvider::open(&p),
            Err(Error::KeyFileInsecure { .. })
        ));
        let short = dir.path().join("short");
        fsutil::create_private_file(&short)
            .unwrap()
            .write_all(b"abc")
            .unwrap();
        assert!(matches!(
            FileKeyProvider::open(&short),
            Err(Error::KeyFileInvalid { .. })
        ));
        assert!(!format!(
            "{:?}",
            FileKeyProvider::open_or_create(dir.path().join("n"), true).unwrap()
        )
        .contains("kek:"));
    }
}
