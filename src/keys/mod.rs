//! Key management: the [`KeyProvider`] trait (wraps data keys under a key-encryption key),
//! the file-backed provider, and the persisted keystore of wrapped data keys.

pub(crate) mod audit;
pub mod backup;
mod file;
pub(crate) mod keyring;
pub(crate) mod keystore;
pub mod pkcs11;

use std::path::Path;

pub use crate::fsutil::{read_secret, write_new_private};
pub use file::{FileKeyProvider, WRAPPED_LEN as FILE_WRAPPED_LEN};
pub use keyring::RotationReport;
pub use pkcs11::{PinSource, Pkcs11Config, Pkcs11KeyProvider};

use crate::crypto::Dek;
use crate::error::Result;

/// Holds a key-encryption key (KEK) and wraps / unwraps data keys with it.
///
/// Implementations: [`FileKeyProvider`] (a 32-byte key file). An HSM provider (PKCS#11)
/// keeps the KEK inside the token; the trait never asks for the KEK itself.
/// Calls happen per segment (creation, open, shred), never per message.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// A public, stable fingerprint of the KEK, stored in the keystore so that opening
    /// with the wrong key is a clear error.
    fn kek_id(&self) -> u64;

    /// Wraps `dek`. `context` is bound to the result: unwrapping with another context fails.
    fn wrap(&self, dek: &Dek, context: &[u8]) -> Result<Vec<u8>>;

    /// Unwraps a key. `Ok(None)` means the wrapped bytes did not authenticate (damaged,
    /// or wrapped under another KEK or context); `Err` means the provider itself failed.
    fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Option<Dek>>;

    /// The key file's path, if the KEK lives in a file (used to refuse a key inside the
    /// data dir).
    fn key_file(&self) -> Option<&Path> {
        None
    }

    /// The epoch whose key wrapped `wrapped`, for providers with shred epochs (the
    /// PKCS#11 provider); `None` otherwise.
    fn epoch_of(&self, _wrapped: &[u8]) -> Option<u64> {
        None
    }

    /// The epoch new keys are wrapped in now, for providers with shred epochs.
    fn current_epoch(&self) -> Option<u64> {
        None
    }

    /// Called after keys were shredded durably, with every wrapped key still live (the
    /// data keys, and the meta key of the keystore on disk): a provider with destroyable
    /// key-encryption keys destroys those no live key needs (never the current epoch's).
    /// Pushes the id (epoch) of each onto `destroyed` as soon as it is gone, so that an
    /// error part way still reports (and the key audit log records) what was destroyed;
    /// the store calls `retire` again after an error.
    fn retire(&self, _live: &[&[u8]], _destroyed: &mut Vec<u64>) -> Result<()> {
        Ok(())
    }

    /// Called when the store stopped using this provider: a master-key rotation moved
    /// every data key and the keystore to another one. A provider with destroyable
    /// key-encryption keys destroys every one it holds for this store, the current
    /// epoch's included, pushing each id onto `destroyed` as in
    /// [`retire`](Self::retire); the store calls it again after an error.
    fn retire_all(&self, _destroyed: &mut Vec<u64>) -> Result<()> {
        Ok(())
    }
}
