//! Envelope encryption with a root key: WrapKey, UnwrapKey, RewrapKey. AES-GCM inside
//! the HSM under a key version unwrapped from its blob (cached in the HSM); the
//! ciphertext format is in [`crate::domain::ciphertext`].

use std::sync::Arc;

use uuid::Uuid;

use super::{KeyManager, missing_material, require_root, require_state};
use crate::domain::ciphertext;
use crate::domain::model::{KeyRecord, KeyState};
use crate::domain::{CallerContext, KmsError};
use crate::hsm::{HsmError, KeyVersionRef, VersionId};
use crate::secret::SecretBytes;

/// Size of the data key the HSM generates for WrapKey without plaintext.
pub const DATA_KEY_BYTES: usize = 32;

/// WrapKey's result.
#[derive(Debug)]
pub struct Wrapped {
    pub ciphertext: Vec<u8>,
    pub generated_plaintext: Option<SecretBytes>,
    pub version_id: Uuid,
}

/// UnwrapKey's result.
#[derive(Debug)]
pub struct Unwrapped {
    pub plaintext: SecretBytes,
    pub version_id: Uuid,
    /// Ciphertext under the latest version and that version's id.
    pub rewrapped: Option<(Vec<u8>, Uuid)>,
}

impl KeyManager {
    /// AES-GCM under the key's latest version, inside the HSM. Without plaintext the HSM
    /// generates a 32-byte data key, which is returned too.
    pub async fn wrap(
        &self,
        ctx: &CallerContext,
        id: Uuid,
        plaintext: Option<SecretBytes>,
        aad: &[String],
    ) -> Result<Wrapped, KmsError> {
        let key = self.current(ctx, id)?;
        require_root(&key, "WrapKey")?;
        require_state(&key, "WrapKey", &[KeyState::Active])?;
        let generated = plaintext.is_none();
        let (plaintext, ciphertext, version_id) = self.seal_latest(&key, plaintext, aad).await?;
        Ok(Wrapped {
            ciphertext,
            generated_plaintext: generated.then_some(plaintext),
            version_id,
        })
    }

    /// Decrypts a WrapKey ciphertext. When it was made with an older version and the key
    /// is ACTIVE, also returns the plaintext rewrapped under the latest version.
    pub async fn unwrap(
        &self,
        ctx: &CallerContext,
        id: Uuid,
        ciphertext: &[u8],
        aad: &[String],
    ) -> Result<Unwrapped, KmsError> {
        let key = self.current(ctx, id)?;
        require_root(&key, "UnwrapKey")?;
        require_state(
            &key,
            "UnwrapKey",
            &[KeyState::Active, KeyState::Deactivated],
        )?;
        let (version_id, plaintext) = self.open(&key, ciphertext, aad).await?;
        let rewrapped = if Some(version_id) != key.current_version && key.state == KeyState::Active
        {
            let (_, ciphertext, latest) =
                self.seal_latest(&key, Some(plaintext.clone()), aad).await?;
            Some((ciphertext, latest))
        } else {
            None
        };
        Ok(Unwrapped {
            plaintext,
            version_id,
            rewrapped,
        })
    }

    /// Re-encrypts a ciphertext under the key's latest version; the plaintext stays in
    /// zeroized buffers and is never returned.
    pub async fn rewrap(
        &self,
        ctx: &CallerContext,
        id: Uuid,
        ciphertext: &[u8],
        aad: &[String],
    ) -> Result<(Vec<u8>, Uuid), KmsError> {
        let key = self.current(ctx, id)?;
        require_root(&key, "RewrapKey")?;
        require_state(&key, "RewrapKey", &[KeyState::Active])?;
        let (_, plaintext) = self.open(&key, ciphertext, aad).await?;
        let (_, ciphertext, version_id) = self.seal_latest(&key, Some(plaintext), aad).await?;
        Ok((ciphertext, version_id))
    }

    async fn seal_latest(
        &self,
        key: &KeyRecord,
        plaintext: Option<SecretBytes>,
        aad: &[String],
    ) -> Result<(SecretBytes, Vec<u8>, Uuid), KmsError> {
        let version_id = key.current_version.ok_or_else(|| missing_material(key))?;
        let version = self.version_ref(key.id, version_id);
        let additional = ciphertext::additional_data(key.id, version_id, aad);
        let (plaintext, sealed) = match self
            .hsm
            .seal(version, plaintext, DATA_KEY_BYTES, additional)
            .await
        {
            Ok(sealed) => sealed,
            Err(HsmError::NoSuchBlob) => return Err(missing_material(key)),
            Err(e) => return Err(e.into()),
        };
        Ok((
            plaintext,
            ciphertext::encode(version_id, &sealed),
            version_id,
        ))
    }

    /// Every way a ciphertext can fail to open gives the same error: no oracle.
    async fn open(
        &self,
        key: &KeyRecord,
        bytes: &[u8],
        aad: &[String],
    ) -> Result<(Uuid, SecretBytes), KmsError> {
        let (version_id, sealed) = ciphertext::decode(bytes).ok_or_else(undecryptable)?;
        let version = self.version_ref(key.id, version_id);
        let additional = ciphertext::additional_data(key.id, version_id, aad);
        match self.hsm.unseal(version, sealed, additional).await {
            Ok(plaintext) => Ok((version_id, plaintext)),
            // A version id that is not one of this key's is as undecryptable as a bad tag.
            Err(HsmError::Rejected { .. } | HsmError::NoSuchBlob) => Err(undecryptable()),
            Err(e) => Err(e.into()),
        }
    }

    /// A key version for the HSM; its blob is read from the store only if the HSM does
    /// not already hold the version unwrapped.
    fn version_ref(&self, key_id: Uuid, version_id: Uuid) -> KeyVersionRef {
        let store = Arc::clone(&self.store);
        KeyVersionRef {
            id: VersionId { key_id, version_id },
            load: Box::new(move || {
                store
                    .get_version(key_id, version_id)
                    .map(|v| v.and_then(|v| v.wrapped))
                    .map_err(|e| e.to_string())
            }),
        }
    }
}

fn undecryptable() -> KmsError {
    KmsError::invalid(
        "ciphertext",
        "cannot be unwrapped with this key and aad (wrong key, wrong aad, or damaged ciphertext)",
    )
}
