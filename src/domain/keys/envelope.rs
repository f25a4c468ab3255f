//! Envelope encryption with a root key: WrapKey, UnwrapKey, RewrapKey. AES-GCM inside
//! the HSM under a key version unwrapped from its blob (cached in the HSM); the
//! ciphertext format is in [`crate::domain::ciphertext`].

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
        let key = self.current(ctx, id).await?;
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
        let key = self.current(ctx, id).await?;
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
        let key = self.current(ctx, id).await?;
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
        let id = VersionId {
            key_id: key.id,
            version_id,
        };
        let additional = ciphertext::additional_data(key.id, version_id, aad);
        for need_blob in [false, true] {
            let Some(version) = self.version_ref(key, id, need_blob).await? else {
                return Err(missing_material(key));
            };
            match self
                .hsm
                .seal(
                    version,
                    plaintext.clone(),
                    DATA_KEY_BYTES,
                    additional.clone(),
                )
                .await
            {
                Ok((plaintext, sealed)) => {
                    return Ok((
                        plaintext,
                        ciphertext::encode(version_id, &sealed),
                        version_id,
                    ));
                }
                // Evicted between the check and the call: once more, with the blob.
                Err(HsmError::NotCached) if !need_blob => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(HsmError::NotCached.into())
    }

    /// Every way a ciphertext can fail to open gives the same error: no oracle.
    async fn open(
        &self,
        key: &KeyRecord,
        bytes: &[u8],
        aad: &[String],
    ) -> Result<(Uuid, SecretBytes), KmsError> {
        let (version_id, sealed) = ciphertext::decode(bytes).ok_or_else(undecryptable)?;
        let id = VersionId {
            key_id: key.id,
            version_id,
        };
        let additional = ciphertext::additional_data(key.id, version_id, aad);
        for need_blob in [false, true] {
            // A version id that is not one of this key's is as undecryptable as a bad tag.
            let Some(version) = self.version_ref(key, id, need_blob).await? else {
                return Err(undecryptable());
            };
            match self
                .hsm
                .unseal(version, sealed.clone(), additional.clone())
                .await
            {
                Ok(plaintext) => return Ok((version_id, plaintext)),
                Err(HsmError::Rejected { .. }) => return Err(undecryptable()),
                Err(HsmError::NotCached) if !need_blob => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(HsmError::NotCached.into())
    }

    /// A key version for the HSM: without its blob when the HSM holds it unwrapped (the
    /// hot path reads nothing), with it, read from the store, otherwise. `None` when no
    /// blob is stored (an unknown or erased version).
    async fn version_ref(
        &self,
        key: &KeyRecord,
        id: VersionId,
        need_blob: bool,
    ) -> Result<Option<KeyVersionRef>, KmsError> {
        if !need_blob && self.hsm.holds(&id) {
            return Ok(Some(KeyVersionRef { id, blob: None }));
        }
        let blob = self
            .store
            .get_version(key, id.version_id)
            .await?
            .and_then(|v| v.wrapped);
        Ok(blob.map(|blob| KeyVersionRef {
            id,
            blob: Some(blob),
        }))
    }
}

fn undecryptable() -> KmsError {
    KmsError::invalid(
        "ciphertext",
        "cannot be unwrapped with this key and aad (wrong key, wrong aad, or damaged ciphertext)",
    )
}
