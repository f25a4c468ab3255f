//! The master KEK's check value: what a backup records so that a restore onto a token
//! without the same KEK is refused before anything is written.
//!
//! The KEK can only wrap and unwrap (no encrypt, no sign), so the usual "encrypt a zero
//! block" check value is not available. Instead a session key of 32 zero bytes is
//! wrapped under the KEK with a deterministic AES key wrap (RFC 5649 or RFC 3394, named
//! with the value) and the value is the first 8 bytes of the SHA-256 of that blob. Like
//! a classic KCV it is a known-plaintext pair under the KEK, truncated; it says nothing
//! about any stored key.

use cryptoki::object::{Attribute, KeyType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::wrap::{WrapFormat, create_with_value, wrap_and_destroy};
use super::{Hsm, HsmError, standard_key_template};
use crate::secret::SecretBytes;

/// A KEK check value and the wrap format it was computed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekCheck {
    pub format: WrapFormat,
    #[serde(with = "hex::serde")]
    pub value: [u8; 8],
}

impl Hsm {
    /// The check value of the master KEK in `format` (the token's preferred one with
    /// `None`).
    pub async fn kek_check(&self, format: Option<WrapFormat>) -> Result<KekCheck, HsmError> {
        let wrap = match format {
            Some(format) => self.mechanism_for(format)?,
            None => self.preferred_wrap(),
        };
        self.run(move |session, kek| {
            // A standard key's attributes: a session object, not sensitive, extractable.
            let mut template = standard_key_template();
            template.push(Attribute::KeyType(KeyType::GENERIC_SECRET));
            let zeros = create_with_value(session, template, &SecretBytes::new(vec![0; 32]))?;
            let wrapped = wrap_and_destroy(session, wrap, kek, zeros)?;
            let digest = Sha256::digest(&wrapped.blob);
            Ok(KekCheck {
                format: wrapped.format,
                value: digest[..8].try_into().expect("8 of 32 bytes"),
            })
        })
        .await
    }
}
