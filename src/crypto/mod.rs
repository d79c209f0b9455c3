//! The one place that knows which AEAD cinder uses.
//!
//! ChaCha20-Poly1305 from `ring` (assembly backends with run-time CPU detection: about
//! 3.5x the RustCrypto crate at 1 KiB on the reference machine, see BENCHMARKS.md).
//! Data keys are [`Dek`]s: 32 random bytes that are zeroized on drop and never printed.

pub mod locked;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Authentication tag length.
pub const TAG_LEN: usize = 16;
/// Key length.
pub const KEY_LEN: usize = 32;

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::KeyProvider("the operating system's random generator failed".into()))
}

/// A random 64-bit value from the OS CSPRNG.
pub fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    fill_random(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A 256-bit data key. Plaintext only in locked, dump-excluded memory
/// ([`locked::LockedBox`]); wiped on drop; `Debug` shows nothing.
pub struct Dek(locked::LockedBox<[u8; KEY_LEN]>);

impl Dek {
    /// A fresh random key from the OS CSPRNG, generated in place.
    pub fn generate() -> Result<Self> {
        let mut k = locked::LockedBox::new([0u8; KEY_LEN]);
        fill_random(k.as_mut())?;
        Ok(Dek(k))
    }

    /// Copies key bytes (for example, just unwrapped) into key memory; the caller keeps
    /// its copy in a `Zeroizing` so that it is wiped too.
    pub fn from_bytes(bytes: &Zeroizing<[u8; KEY_LEN]>) -> Self {
        Dek(locked::LockedBox::new(**bytes))
    }

    /// The key bytes, for a key provider to wrap. Never log them.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// An expanded AEAD key, ready to seal and open. It lives in locked, dump-excluded
/// memory that is wiped on drop.
pub struct SealKey {
    // `ring` keys do not zeroize themselves, so the key lives in a locked slot that the
    // box wipes when it is dropped.
    inner: locked::LockedBox<LessSafeKey>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    pub fn new(dek: &Dek) -> Self {
        Self::from_raw(dek.expose())
    }

    /// Builds a key from raw bytes (used for one-time derived keys).
    pub(crate) fn from_raw(bytes: &[u8; KEY_LEN]) -> Self {
        // A 32-byte key is always valid for ChaCha20-Poly1305.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32-byte key is valid");
        SealKey {
            inner: locked::LockedBox::new(LessSafeKey::new(unbound)),
        }
    }

    /// Seals `buf` in place and returns the tag.
    pub fn seal(&self, nonce: [u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .inner
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .expect("sealing fails only for inputs over 256 GiB");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Opens `buf` in place. `false` means the tag did not verify (and `buf` is garbage).
    #[must_use]
    pub fn open(&self, nonce: [u8; 12], aad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        self.inner
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                Tag::from(*tag),
                buf,
                0..,
            )
            .is_ok()
    }
}

/// Derives a one-time key from `kek` and a random `salt` (BLAKE3 keyed hash). Used to wrap
/// keys: each wrap has its own derived key, so a fixed nonce is safe.
pub fn derive_one_time_key(kek: &[u8; KEY_LEN], salt: &[u8]) -> SealKey {
    let mut h = blake3::Hasher::new_keyed(kek);
    h.update(b"cinder v1 wrap key");
    h.update(salt);
    let k = Zeroizing::new(*h.finalize().as_bytes());
    SealKey::from_raw(&k)
}

/// A public fingerprint of a key-encryption key (not usable to derive the key).
pub fn kek_fingerprint(kek: &[u8; KEY_LEN]) -> u64 {
    let d = blake3::derive_key("cinder v1 kek fingerprint", kek);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let k = SealKey::new(&Dek::generate().unwrap());
        let mut buf = b"hello world".to_vec();
        let tag = k.seal([1; 12], b"aad", &mut buf);
        assert_ne!(&buf, b"hello world");
        let mut ok = buf.clone();
        assert!(k.open([1; 12], b"aad", &mut ok, &tag));
        assert_eq!(&ok, b"hello world");
        let mut wrong_aad = buf.clone();
        assert!(!k.open([1; 12], b"aae", &mut wrong_aad, &tag));
        let mut wrong_nonce = buf.clone();
        assert!(!k.open([2; 12], b"aad", &mut wrong_nonce, &tag));
        let mut flipped = buf.clone();
        flipped[0] ^= 1;
        assert!(!k.open([1; 12], b"aad", &mut flipped, &tag));
    }

    #[test]
    fn dek_debug_is_redacted() {
        let d = Dek::generate().unwrap();
        assert_eq!(format!("{d:?}"), "Dek(<redacted>)");
        assert_eq!(format!("{:?}", SealKey::new(&d)), "SealKey(<redacted>)");
    }
}
