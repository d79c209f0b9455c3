//! Backup of the file provider's master key, sealed under a passphrase: Argon2id derives
//! the sealing key (its parameters are stored in the backup), ChaCha20-Poly1305 seals the
//! 32-byte key. Data keys are never backed up: a DEK backup would survive the shredding
//! it exists to make final.
//!
//! Layout (`BACKUP_LEN` = 96 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `CINDRBAK` |
//! | 8 | 4 | backup version (1) |
//! | 12 | 4 | Argon2id memory, KiB |
//! | 16 | 4 | Argon2id passes |
//! | 20 | 4 | Argon2id lanes |
//! | 24 | 16 | salt |
//! | 40 | 8 | the key's id (public fingerprint), so a restore can say which key it is |
//! | 48 | 32 | the sealed master key |
//! | 80 | 16 | tag |
//!
//! The AEAD key is Argon2id(passphrase, salt), the nonce is zero (every backup has its own
//! salt, so its own key), the associated data is bytes 0..48: a changed parameter, salt
//! or id fails to open like a wrong passphrase.

use zeroize::Zeroizing;

use crate::crypto::{self, SealKey, KEY_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::format::{get_u32, get_u64};

pub const MAGIC: [u8; 8] = *b"CINDRBAK";
pub const BACKUP_LEN: usize = 96;
const VERSION: u32 = 1;
const AAD_LEN: usize = 48;
/// The shortest passphrase accepted.
pub const MIN_PASSPHRASE: usize = 12;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupParams {
    pub memory_kib: u32,
    pub passes: u32,
    pub lanes: u32,
}

impl Default for BackupParams {
    /// 64 MiB, 3 passes, 1 lane (about a quarter of a second here; RFC 9106's second
    /// recommendation).
    fn default() -> Self {
        BackupParams {
            memory_kib: 64 << 10,
            passes: 3,
            lanes: 1,
        }
    }
}

impl BackupParams {
    /// Bounds a restore accepts, checked before any work, so that a hostile backup's
    /// demands stay bounded: memory 8 MiB ..= 4 GiB, passes 1 ..= 64, lanes 1 ..= 16.
    fn check(self) -> Result<()> {
        let ok = (8 << 10..=4 << 20).contains(&self.memory_kib)
            && (1..=64).contains(&self.passes)
            && (1..=16).contains(&self.lanes);
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidBackup(format!(
                "Argon2id parameters out of bounds: {self:?}"
            )))
        }
    }
}

fn derive(passphrase: &[u8], salt: &[u8], p: BackupParams) -> Result<SealKey> {
    let params = argon2::Params::new(p.memory_kib, p.passes, p.lanes, Some(KEY_LEN))
        .map_err(|e| Error::InvalidBackup(format!("Argon2id parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    a.hash_password_into(passphrase, salt, k.as_mut())
        .map_err(|e| Error::InvalidBackup(format!("Argon2id: {e}")))?;
    Ok(SealKey::from_raw(&k))
}

fn check_passphrase(passphrase: &[u8]) -> Result<()> {
    if passphrase.len() < MIN_PASSPHRASE {
        return Err(Error::InvalidBackup(format!(
            "passphrase of {} bytes; at least {MIN_PASSPHRASE} are required",
            passphrase.len()
        )));
    }
    Ok(())
}

/// Seals `kek` (whose id is `kek_id`) under `passphrase`.
pub fn seal(
    kek: &[u8; KEY_LEN],
    kek_id: u64,
    passphrase: &[u8],
    p: BackupParams,
) -> Result<[u8; BACKUP_LEN]> {
    check_passphrase(passphrase)?;
    p.check()?;
    let mut b = [0u8; BACKUP_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&p.memory_kib.to_le_bytes());
    b[16..20].copy_from_slice(&p.passes.to_le_bytes());
    b[20..24].copy_from_slice(&p.lanes.to_le_bytes());
    crypto::fill_random(&mut b[24..40])?;
    b[40..48].copy_from_slice(&kek_id.to_le_bytes());
    let key = derive(passphrase, &b[24..40], p)?;
    let mut sealed = Zeroizing::new(*kek);
    let aad = b[..AAD_LEN].to_vec();
    let tag = key.seal([0; 12], &aad, sealed.as_mut());
    b[48..80].copy_from_slice(sealed.as_ref());
    b[80..].copy_from_slice(&tag);
    Ok(b)
}

/// What a backup says about itself before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupHeader {
    pub params: BackupParams,
    pub kek_id: u64,
}

/// Decodes the plaintext part of a backup (no passphrase needed).
pub fn header(b: &[u8]) -> Result<BackupHeader> {
    if b.len() != BACKUP_LEN {
        return Err(Error::InvalidBackup(format!(
            "{} bytes, a backup has {BACKUP_LEN}",
            b.len()
        )));
    }
    if b[..8] != MAGIC {
        return Err(Error::InvalidBackup("not a cinder key backup".into()));
    }
    let v = get_u32(b, 8);
    if v != VERSION {
        return Err(Error::InvalidBackup(format!(
            "backup version {v}, this build reads {VERSION}"
        )));
    }
    let params = BackupParams {
        memory_kib: get_u32(b, 12),
        passes: get_u32(b, 16),
        lanes: get_u32(b, 20),
    };
    params.check()?;
    Ok(BackupHeader {
        params,
        kek_id: get_u64(b, 40),
    })
}

/// Opens a backup: the master key and its id. A wrong passphrase (or any changed byte)
/// is `Error::WrongPassphrase`.
pub fn open(b: &[u8], passphrase: &[u8]) -> Result<(Zeroizing<[u8; KEY_LEN]>, u64)> {
    let h = header(b)?;
    let key = derive(passphrase, &b[24..40], h.params)?;
    let mut kek = Zeroizing::new([0u8; KEY_LEN]);
    kek.copy_from_slice(&b[48..80]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&b[80..]);
    if !key.open([0; 12], &b[..AAD_LEN], kek.as_mut(), &tag) {
        return Err(Error::WrongPassphrase);
    }
    if crypto::kek_fingerprint(&kek) != h.kek_id {
        return Err(Error::InvalidBackup(
            "the restored key does not match the id the backup names".into(),
        ));
    }
    Ok((kek, h.kek_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Argon2's working memory (derived from the passphrase) is wiped only with its
    /// `zeroize` feature: a build without it would leave it in freed heap.
    #[test]
    fn argon2_is_built_with_its_zeroize_feature() {
        let manifest = include_str!("../../Cargo.toml");
        let line = manifest
            .lines()
            .find(|l| l.starts_with("argon2 "))
            .expect("argon2 is a dependency");
        assert!(line.contains("\"zeroize\""), "{line}");
    }

    const FAST: BackupParams = BackupParams {
        memory_kib: 8 << 10,
        passes: 1,
        lanes: 1,
    };

    #[test]
    fn round_trip_wrong_passphrase_and_every_flipped_byte() {
        let kek = [7u8; KEY_LEN];
        let id = crypto::kek_fingerprint(&kek);
        let b = seal(&kek, id, b"correct horse battery", FAST).unwrap();
        let (k, got) = open(&b, b"correct horse battery").unwrap();
        assert_eq!((*k, got), (kek, id));
        assert!(matches!(
            open(&b, b"correct horse battery!"),
            Err(Error::WrongPassphrase)
        ));
        assert!(matches!(
            seal(&kek, id, b"short", FAST),
            Err(Error::InvalidBackup(_))
        ));
        for i in 0..BACKUP_LEN {
            let mut c = b;
            c[i] ^= 1;
            assert!(open(&c, b"correct horse battery").is_err(), "flip at {i}");
        }
        assert!(open(&b[..95], b"correct horse battery").is_err());
    }

    #[test]
    fn hostile_parameters_are_refused_before_any_work() {
        let kek = [7u8; KEY_LEN];
        let mut b = seal(&kek, 1, b"correct horse battery", FAST).unwrap();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(header(&b), Err(Error::InvalidBackup(_))));
    }
}
