//! The peers' application-level encryption: one long-lived ChaCha20-Poly1305 key (ring,
//! the implementation cinder uses), a random 96-bit nonce per record stored in front of
//! the ciphertext. The record's (queue, seq) key is the associated data, so a value moved
//! to another key fails to open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

pub const OVERHEAD: usize = NONCE_LEN + 16;

pub struct AppCipher {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl AppCipher {
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let mut k = [0u8; 32];
        rng.fill(&mut k).expect("getrandom");
        AppCipher {
            key: LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &k).expect("key")),
            rng,
        }
    }

    /// `nonce || ciphertext || tag` of `plain`, bound to `key`.
    pub fn seal(&self, key: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        let mut n = [0u8; NONCE_LEN];
        self.rng.fill(&mut n).expect("getrandom");
        out.extend_from_slice(&n);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from(key),
                &mut out[NONCE_LEN..],
            )
            .expect("seal");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Opens a value written by [`seal`](Self::seal) under the same `key`.
    pub fn open<'a>(&self, key: &[u8], sealed: &'a mut [u8]) -> Result<&'a [u8], String> {
        if sealed.len() < OVERHEAD {
            return Err("sealed value too short".into());
        }
        let (n, rest) = sealed.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| "nonce")?;
        self.key
            .open_in_place(nonce, Aad::from(key), rest)
            .map(|p| &*p)
            .map_err(|_| "record does not authenticate".to_string())
    }
}
