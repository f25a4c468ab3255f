//! Bringing key material in: secure import with the instance's import token (CreateKey
//! and RotateKey), and EXTERNAL-origin keys (GetParametersForImport, ImportKeyMaterial,
//! DeleteImportedKeyMaterial, material expiry).
//!
//! Decisions:
//! - Imported material is always AES: 128, 192 or 256 bits, as for root keys.
//! - ImportKeyMaterial is accepted in PRE_ACTIVATION only (a key with material must have
//!   it deleted first). Once a key has had material, it takes back only the same
//!   material: the HSM computes a check value (AES-CMAC of a zero block) at every
//!   import and the stored one must match. The key version id stays the same across
//!   re-imports, so data wrapped before DeleteImportedKeyMaterial unwraps again.
//! - EXPIRATION_MODEL_UNSPECIFIED means KEY_MATERIAL_EXPIRES when valid_to is given and
//!   KEY_MATERIAL_DOES_NOT_EXPIRE when it is not.
//! - The opaque import token of GetParametersForImport is `0x01 | key id | parameters id
//!   | expires-ms (BE i64)`. It is not a secret (the RSA private key it names never
//!   leaves the store unwrapped); a superseded or expired one is recognised and refused.
//! - Parameters are kept until they expire (a failed import may be retried with them),
//!   then removed by the sweep with their private key.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::{Change, KeyManager, ROOT_KEY_IMPORT_BYTES, require_state, wrong_state};
use crate::domain::import_tokens::ImportTokenManager;
use crate::domain::key_pairs::KeyPairPool;
use crate::domain::model::{
    ExpirationModel, ImportParametersRecord, KeyOrigin, KeyRecord, KeyState, Millis, RECORD_SCHEMA,
    VersionRecord, format_millis, now_millis,
};
use crate::domain::{CallerContext, KmsError};
use crate::hsm::oaep::OaepHash;
use crate::hsm::{HsmError, ImportRefusal, ImportedMaterial, MaterialImport, NonceProof};
use crate::store::ImportStore;

/// What KeyManager needs for imports.
pub struct Imports {
    pub store: Arc<dyn ImportStore>,
    pub tokens: Arc<ImportTokenManager>,
    pub pairs: Arc<KeyPairPool>,
    /// How long GetParametersForImport's answer stays valid.
    pub parameters_lifetime: Duration,
}

/// CreateKey / RotateKey material encrypted for the instance's import token.
#[derive(Debug)]
pub struct SecureImport {
    pub hash: OaepHash,
    pub encrypted_payload: Vec<u8>,
    pub encrypted_nonce: Vec<u8>,
    pub iv: Vec<u8>,
}

/// A validated ImportKeyMaterial request.
#[derive(Debug)]
pub struct MaterialForKey {
    pub import_token: Vec<u8>,
    pub encrypted_key_material: Vec<u8>,
    pub expiration_model: Option<ExpirationModel>,
    pub valid_to: Option<Millis>,
}

/// GetParametersForImport's answer.
#[derive(Debug)]
pub struct ImportParameters {
    pub key_id: Uuid,
    pub import_token: Vec<u8>,
    pub public_key: Vec<u8>,
    pub expires_at: Millis,
}

const IMPORT_TOKEN_FORMAT: u8 = 0x01;
const IMPORT_TOKEN_LEN: usize = 1 + 16 + 16 + 8;

struct ParsedImportToken {
    key_id: Uuid,
    parameters_id: Uuid,
    expires_at: Millis,
}

fn encode_import_token(parameters: &ImportParametersRecord) -> Vec<u8> {
    let mut token = Vec::with_capacity(IMPORT_TOKEN_LEN);
    token.push(IMPORT_TOKEN_FORMAT);
    token.extend_from_slice(parameters.key_id.as_bytes());
    token.extend_from_slice(parameters.id.as_bytes());
    token.extend_from_slice(&parameters.expires_at.to_be_bytes());
    token
}

fn parse_import_token(token: &[u8]) -> Option<ParsedImportToken> {
    if token.len() != IMPORT_TOKEN_LEN || token[0] != IMPORT_TOKEN_FORMAT {
        return None;
    }
    Some(ParsedImportToken {
        key_id: Uuid::from_slice(&token[1..17]).ok()?,
        parameters_id: Uuid::from_slice(&token[17..33]).ok()?,
        expires_at: Millis::from_be_bytes(token[33..41].try_into().ok()?),
    })
}

impl KeyManager {
    /// Unwraps secure-import material with the instance's token inside the HSM and
    /// checks the nonce proof there.
    pub(super) async fn secure_import(
        &self,
        ctx: &CallerContext,
        import: SecureImport,
        allowed_sizes: Vec<usize>,
    ) -> Result<ImportedMaterial, KmsError> {
        let token = self.imports.tokens.usable(ctx).await?;
        let request = MaterialImport {
            modulus_bits: token.key_pair.bits,
            private_key: token.key_pair.private_key,
            hash: import.hash,
            encrypted_material: import.encrypted_payload,
            allowed_sizes,
            nonce_proof: Some(NonceProof {
                expected_nonce: token.nonce,
                iv: import.iv,
                encrypted_nonce: import.encrypted_nonce,
            }),
        };
        self.hsm
            .import_material(request)
            .await
            .map_err(|e| import_refused(e, "encrypted_payload"))
    }

    /// A fresh wrapping key pair and import token for an EXTERNAL key in PRE_ACTIVATION;
    /// supersedes earlier parameters of the key.
    pub async fn get_parameters_for_import(
        &self,
        ctx: &CallerContext,
        id: Uuid,
        hash: OaepHash,
        bits: u32,
    ) -> Result<ImportParameters, KmsError> {
        let key = self.current(ctx, id).await?;
        require_external(&key, "GetParametersForImport")?;
        require_state(&key, "GetParametersForImport", &[KeyState::PreActivation])?;
        if self.hsm.capabilities().oaep(hash) == crate::hsm::OaepSupport::Unavailable {
            return Err(import_refused(
                HsmError::ImportRefused(ImportRefusal::HashUnavailable(hash)),
                "wrapping_algorithm",
            ));
        }
        let key_pair = self.imports.pairs.take(bits).await?;
        let now = now_millis();
        let lifetime = self.imports.parameters_lifetime.as_millis() as Millis;
        let parameters = ImportParametersRecord {
            schema: RECORD_SCHEMA,
            key_id: id,
            instance: ctx.instance.clone(),
            id: Uuid::new_v4(),
            algorithm: hash,
            created_at: now,
            expires_at: now + lifetime,
            key_pair,
        };
        self.imports
            .store
            .put_import_parameters(&parameters)
            .await?;
        Ok(ImportParameters {
            key_id: id,
            import_token: encode_import_token(&parameters),
            public_key: parameters.key_pair.public_key,
            expires_at: parameters.expires_at,
        })
    }

    /// Imports RSA-OAEP-wrapped material into an EXTERNAL key: PRE_ACTIVATION -> ACTIVE.
    pub async fn import_key_material(
        &self,
        ctx: &CallerContext,
        id: Uuid,
        request: MaterialForKey,
    ) -> Result<KeyRecord, KmsError> {
        let token = parse_import_token(&request.import_token).ok_or_else(|| {
            KmsError::invalid(
                "import_token",
                "is not an import token from GetParametersForImport",
            )
        })?;
        if token.key_id != id {
            return Err(KmsError::invalid(
                "import_token",
                format!("was issued for another key, not for key {id}"),
            ));
        }
        let now = now_millis();
        let (expiration_model, valid_to) =
            expiration(request.expiration_model, request.valid_to, now)?;

        let key = self.current(ctx, id).await?;
        require_external(&key, "ImportKeyMaterial")?;
        require_state(&key, "ImportKeyMaterial", &[KeyState::PreActivation])?;
        let parameters = self
            .imports
            .store
            .get_import_parameters(id)
            .await?
            .filter(|p| p.id == token.parameters_id && p.instance == ctx.instance);
        let parameters = match parameters {
            Some(p) if p.expires_at > now => p,
            _ if token.expires_at <= now => {
                return Err(KmsError::FailedPrecondition(format!(
                    "import_token expired at {}; call GetParametersForImport again",
                    format_millis(token.expires_at)
                )));
            }
            Some(p) => {
                return Err(KmsError::FailedPrecondition(format!(
                    "import_token expired at {}; call GetParametersForImport again",
                    format_millis(p.expires_at)
                )));
            }
            None => {
                return Err(KmsError::invalid(
                    "import_token",
                    "is not the key's current import token (a later GetParametersForImport \
                     superseded it)",
                ));
            }
        };

        let allowed_sizes = match key.check_value {
            // A re-import must be the same material, so the same size.
            Some(_) => vec![key.size_bits as usize / 8],
            None => ROOT_KEY_IMPORT_BYTES.to_vec(),
        };
        let imported = self
            .hsm
            .import_material(MaterialImport {
                modulus_bits: parameters.key_pair.bits,
                private_key: parameters.key_pair.private_key,
                hash: parameters.algorithm,
                encrypted_material: request.encrypted_key_material,
                allowed_sizes,
                nonce_proof: None,
            })
            .await
            .map_err(|e| import_refused(e, "encrypted_key_material"))?;
        if let Some(previous) = &key.check_value
            && !openssl::memcmp::eq(previous, &imported.check_value)
        {
            return Err(KmsError::invalid(
                "encrypted_key_material",
                "is not the material previously imported into this key; a key takes back \
                 only its own material",
            ));
        }

        let version = match key.current_version {
            Some(version_id) => {
                let previous =
                    self.store
                        .get_version(&key, version_id)
                        .await?
                        .ok_or_else(|| KmsError::NotFound {
                            what: format!("version {version_id} of key {id}"),
                        })?;
                VersionRecord {
                    wrapped: Some(imported.wrapped),
                    ..previous
                }
            }
            None => VersionRecord {
                schema: RECORD_SCHEMA,
                key_id: id,
                id: Uuid::new_v4(),
                created_at: now,
                wrapped: Some(imported.wrapped),
            },
        };
        let check_value = imported.check_value;
        let size_bits = imported.size_bytes as u32 * 8;
        let imported_key = self
            .update(ctx, id, |key| {
                require_state(key, "ImportKeyMaterial", &[KeyState::PreActivation])?;
                let now = now_millis();
                let state = if key.expires_at.is_some_and(|at| at <= now) {
                    KeyState::Deactivated
                } else {
                    KeyState::Active
                };
                Ok(Change {
                    next: KeyRecord {
                        state,
                        updated_at: now,
                        size_bits,
                        imported: true,
                        current_version: Some(version.id),
                        expiration_model: Some(expiration_model),
                        valid_to,
                        check_value: Some(check_value.clone()),
                        ..key.clone()
                    },
                    new_version: Some(version.clone()),
                    erase_material: false,
                })
            })
            .await?;
        self.hsm.forget_key(&id);
        Ok(imported_key)
    }

    /// Erases an EXTERNAL key's material: back to PRE_ACTIVATION. Data wrapped under it
    /// stays undecryptable until the same material is imported again.
    pub async fn delete_imported_key_material(
        &self,
        ctx: &CallerContext,
        id: Uuid,
    ) -> Result<KeyRecord, KmsError> {
        let removed = self
            .update(ctx, id, |key| {
                require_external(key, "DeleteImportedKeyMaterial")?;
                if key.state == KeyState::PreActivation {
                    return Err(KmsError::FailedPrecondition(format!(
                        "key {id} has no key material to delete (state PRE_ACTIVATION)"
                    )));
                }
                require_state(
                    key,
                    "DeleteImportedKeyMaterial",
                    &[KeyState::Active, KeyState::Suspended, KeyState::Deactivated],
                )?;
                Ok(Change::erasing(material_removed(key, now_millis())))
            })
            .await?;
        self.hsm.forget_key(&id);
        Ok(removed)
    }

    /// Removes import parameters that expired, with their wrapped private keys.
    pub async fn sweep_import_parameters(&self) -> Result<usize, KmsError> {
        let expired = self
            .imports
            .store
            .expired_import_parameters(now_millis())
            .await?;
        for key_id in &expired {
            self.imports.store.remove_import_parameters(*key_id).await?;
        }
        if !expired.is_empty() {
            self.imports.store.sync().await?;
        }
        Ok(expired.len())
    }
}

/// The key after its imported material is erased (deleted or past valid-to).
pub(super) fn material_removed(key: &KeyRecord, now: Millis) -> KeyRecord {
    KeyRecord {
        state: KeyState::PreActivation,
        updated_at: now,
        expiration_model: None,
        valid_to: None,
        ..key.clone()
    }
}

fn require_external(key: &KeyRecord, operation: &'static str) -> Result<(), KmsError> {
    if key.origin == KeyOrigin::External {
        return Ok(());
    }
    if key.state == KeyState::Destroyed {
        return Err(wrong_state(operation, key));
    }
    Err(KmsError::FailedPrecondition(format!(
        "{operation} needs a key with origin EXTERNAL; key {} was {}",
        key.id,
        match key.origin {
            KeyOrigin::Generated => "generated in the HSM",
            _ => "created with its material",
        }
    )))
}

fn expiration(
    model: Option<ExpirationModel>,
    valid_to: Option<Millis>,
    now: Millis,
) -> Result<(ExpirationModel, Option<Millis>), KmsError> {
    match (model, valid_to) {
        (Some(ExpirationModel::KeyMaterialExpires) | None, Some(at)) if at > now => {
            Ok((ExpirationModel::KeyMaterialExpires, Some(at)))
        }
        (Some(ExpirationModel::KeyMaterialExpires) | None, Some(_)) => {
            Err(KmsError::invalid("valid_to", "must be in the future"))
        }
        (Some(ExpirationModel::KeyMaterialExpires), None) => Err(KmsError::invalid(
            "valid_to",
            "required when expiration_model is KEY_MATERIAL_EXPIRES",
        )),
        (Some(ExpirationModel::KeyMaterialDoesNotExpire) | None, None) => {
            Ok((ExpirationModel::KeyMaterialDoesNotExpire, None))
        }
        (Some(ExpirationModel::KeyMaterialDoesNotExpire), Some(_)) => Err(KmsError::invalid(
            "valid_to",
            "must be absent when expiration_model is KEY_MATERIAL_DOES_NOT_EXPIRE",
        )),
    }
}

/// Maps an import failure to the error users see, naming `field` for input at fault.
fn import_refused(e: HsmError, field: &'static str) -> KmsError {
    match e {
        HsmError::ImportRefused(refusal) => match refusal {
            ImportRefusal::Undecryptable => KmsError::invalid(
                field,
                "cannot be decrypted with the import key (encrypted for another public key, \
                 with another algorithm, or damaged)",
            ),
            ImportRefusal::MaterialSize { bytes } => KmsError::invalid(
                field,
                format!(
                    "the key material inside is {}; imported material is AES-128, -192 or \
                     -256 (16, 24 or 32 bytes), and a rotation or re-import keeps the key's \
                     size",
                    match bytes {
                        Some(bytes) => format!("{bytes} bytes"),
                        None => "of another length".into(),
                    }
                ),
            ),
            ImportRefusal::NonceMismatch => KmsError::invalid(
                "encrypted_nonce",
                "does not decrypt, with iv and the imported key material, to the nonce of \
                 the instance's current import token",
            ),
            ImportRefusal::HashUnavailable(hash) => KmsError::FailedPrecondition(format!(
                "the HSM token cannot decrypt {} and the software OAEP fallback is turned off \
                 (hsm.oaep_fallback); use {} or enable the fallback",
                hash.algorithm_name(),
                match hash {
                    OaepHash::Sha1 => OaepHash::Sha256.algorithm_name(),
                    OaepHash::Sha256 => OaepHash::Sha1.algorithm_name(),
                }
            )),
        },
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::{RsaKeyPair, WrapFormat, WrappedKey};

    #[test]
    fn import_tokens_round_trip_and_garbage_is_refused() {
        let parameters = ImportParametersRecord {
            schema: RECORD_SCHEMA,
            key_id: Uuid::new_v4(),
            instance: "i".into(),
            id: Uuid::new_v4(),
            algorithm: OaepHash::Sha256,
            created_at: 1,
            expires_at: 86_400_001,
            key_pair: RsaKeyPair {
                bits: 2048,
                public_key: vec![1],
                private_key: WrappedKey {
                    format: WrapFormat::Rfc5649,
                    blob: vec![2],
                },
            },
        };
        let token = encode_import_token(&parameters);
        let parsed = parse_import_token(&token).expect("parses");
        assert_eq!(parsed.key_id, parameters.key_id);
        assert_eq!(parsed.parameters_id, parameters.id);
        assert_eq!(parsed.expires_at, parameters.expires_at);
        assert!(parse_import_token(&token[..40]).is_none());
        let mut other_format = token.clone();
        other_format[0] = 2;
        assert!(parse_import_token(&other_format).is_none());
    }

    proptest::proptest! {
        /// Any bytes as an import token: refused or parsed, never a panic; a parsed
        /// token is exactly what encoding its fields gives.
        #[test]
        fn import_tokens_parse_or_refuse(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            if let Some(parsed) = parse_import_token(&bytes) {
                let mut again = vec![IMPORT_TOKEN_FORMAT];
                again.extend_from_slice(parsed.key_id.as_bytes());
                again.extend_from_slice(parsed.parameters_id.as_bytes());
                again.extend_from_slice(&parsed.expires_at.to_be_bytes());
                proptest::prop_assert_eq!(again, bytes);
            }
        }
    }

    #[test]
    fn expiration_model_rules() {
        use ExpirationModel::*;
        let now = 1_000;
        assert_eq!(
            expiration(None, None, now).unwrap(),
            (KeyMaterialDoesNotExpire, None)
        );
        assert_eq!(
            expiration(None, Some(2_000), now).unwrap(),
            (KeyMaterialExpires, Some(2_000))
        );
        assert!(expiration(Some(KeyMaterialExpires), None, now).is_err());
        assert!(expiration(Some(KeyMaterialExpires), Some(now), now).is_err());
        assert!(expiration(Some(KeyMaterialDoesNotExpire), Some(2_000), now).is_err());
    }
}
