//! `KeystoreImage::decode` on arbitrary bytes. Whatever it accepts must be exactly the
//! canonical encoding of the image it returns (`encode()` gives the input back), decode
//! again to an equal image, and respect the documented limits.
#![no_main]

use cinder::format::keystore::{KeystoreImage, MAX_ENTRIES, MAX_WRAPPED_LEN};
use cinder::format::FormatError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match KeystoreImage::decode(data) {
        Ok(img) => {
            assert!(img.entries.len() <= MAX_ENTRIES);
            for e in &img.entries {
                assert!((1..=MAX_WRAPPED_LEN).contains(&e.wrapped.len()));
            }
            assert!((1..=MAX_WRAPPED_LEN).contains(&img.meta_wrapped_key.len()));
            let enc = img.encode();
            assert_eq!(enc, data, "keystore is not canonical");
            assert_eq!(KeystoreImage::decode(&enc).as_ref(), Ok(&img));
            let aad = img.meta_aad();
            assert_eq!(&aad[..40], &data[..40]);
        }
        Err(FormatError::Corrupt { offset, .. }) => {
            assert!(
                offset <= data.len() as u64,
                "error offset {offset} past the input"
            );
        }
        Err(FormatError::Version { expected, got }) => assert_ne!(expected, got),
    }
});
