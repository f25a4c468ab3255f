//! `kms.v1.KeyService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::call::{AuditedKey, CallGate, Rpc};
use super::{convert, key_field, page_token, parse_key_id};
use crate::domain::ciphertext::{MAX_AAD_ENTRIES, MAX_AAD_ENTRY_BYTES, MAX_PLAINTEXT};
use crate::domain::keys::{KeyManager, Material, MaterialForKey, NewKey};
use crate::domain::model::KeyRecord;
use crate::domain::model::now_millis;
use crate::domain::{KmsError, PageStart};
use crate::proto;
use crate::proto::key_service_server::KeyService;
use crate::secret::SecretBytes;

pub struct KeyApi {
    keys: Arc<KeyManager>,
    gate: Arc<CallGate>,
}

impl KeyApi {
    pub fn new(keys: Arc<KeyManager>, gate: Arc<CallGate>) -> Self {
        Self { keys, gate }
    }
}

/// Requests name their key in a field called `id` or `key_id`.
macro_rules! audited_by_field {
    ($field:ident: $($message:ty),+) => {
        $(impl AuditedKey for $message {
            fn audited_key(&self) -> Option<Uuid> {
                key_field(&self.$field)
            }
        })+
    };
}

audited_by_field!(id: proto::GetKeyRequest, proto::WrapKeyRequest, proto::UnwrapKeyRequest,
    proto::RewrapKeyRequest, proto::RotateKeyRequest, proto::ListKeyVersionsRequest,
    proto::DisableKeyRequest, proto::EnableKeyRequest, proto::DeleteKeyRequest);
audited_by_field!(key_id: proto::GetParametersForImportRequest,
    proto::ImportKeyMaterialRequest, proto::DeleteImportedKeyMaterialRequest);

impl AuditedKey for proto::CreateKeyRequest {}
impl AuditedKey for proto::ListKeysRequest {}
impl AuditedKey for proto::CountKeysRequest {}
impl AuditedKey for proto::GetKeyResponse {}
impl AuditedKey for proto::ListKeysResponse {}
impl AuditedKey for proto::CountKeysResponse {}
impl AuditedKey for proto::WrapKeyResponse {}
impl AuditedKey for proto::UnwrapKeyResponse {}
impl AuditedKey for proto::RewrapKeyResponse {}
impl AuditedKey for proto::RotateKeyResponse {}
impl AuditedKey for proto::ListKeyVersionsResponse {}
impl AuditedKey for proto::KeyResponse {}
impl AuditedKey for proto::GetParametersForImportResponse {}
impl AuditedKey for proto::ImportKeyMaterialResponse {}

/// CreateKey names its key only in the answer.
impl AuditedKey for proto::CreateKeyResponse {
    fn audited_key(&self) -> Option<Uuid> {
        self.key.as_ref().and_then(|k| key_field(&k.id))
    }
}

fn key_response(key: KeyRecord) -> proto::KeyResponse {
    proto::KeyResponse {
        key: Some(convert::key(&key)),
    }
}

fn new_key(request: proto::CreateKeyRequest) -> Result<NewKey, KmsError> {
    let origin = proto::KeyOrigin::try_from(request.origin)
        .map_err(|_| KmsError::invalid("origin", format!("unknown origin {}", request.origin)))?;
    let secure_import = convert::secure_import(
        request.encrypted_payload,
        request.encrypted_nonce,
        request.iv,
        request.encryption_algorithm,
    )?;
    let name = convert::name(request.name)?;
    let description = convert::description(request.description)?;
    let expires_at = match &request.expiration_date {
        None => None,
        Some(ts) => {
            let at = convert::millis_from("expiration_date", ts)?;
            if at <= now_millis() {
                return Err(KmsError::invalid(
                    "expiration_date",
                    "must be in the future",
                ));
            }
            Some(at)
        }
    };
    if secure_import.is_some() && request.payload.is_some() {
        return Err(KmsError::invalid(
            "payload",
            "give either payload or encrypted_payload, not both",
        ));
    }
    let material = match (origin, request.payload) {
        (proto::KeyOrigin::External, payload) => {
            if payload.is_some() || secure_import.is_some() {
                return Err(KmsError::invalid(
                    "origin",
                    "an EXTERNAL key is created without material (no payload or \
                     encrypted_payload); import it with ImportKeyMaterial",
                ));
            }
            Material::External
        }
        (proto::KeyOrigin::Generated, _) if secure_import.is_some() => {
            return Err(KmsError::invalid(
                "encrypted_payload",
                "must be absent when origin is GENERATED",
            ));
        }
        (_, None) if secure_import.is_some() => {
            Material::SecureImport(secure_import.expect("checked"))
        }
        (proto::KeyOrigin::Generated, Some(_)) => {
            return Err(KmsError::invalid(
                "payload",
                "must be absent when origin is GENERATED",
            ));
        }
        (proto::KeyOrigin::Imported, None) => {
            return Err(KmsError::invalid(
                "payload",
                "required when origin is IMPORTED",
            ));
        }
        (_, Some(payload)) => Material::Plaintext(SecretBytes::new(payload)),
        (_, None) => Material::Generate,
    };
    Ok(NewKey {
        name,
        description,
        expires_at,
        extractable: request.extractable,
        material,
    })
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::CreateKeyResponse>, Status> {
        self.gate
            .call(Rpc::CreateKey, request, |caller, request| async move {
                let new_key = new_key(request)?;
                let key = self.keys.create_key(&caller.ctx, new_key).await?;
                Ok(proto::CreateKeyResponse {
                    key: Some(convert::key(&key)),
                })
            })
            .await
    }

    async fn get_key(
        &self,
        request: Request<proto::GetKeyRequest>,
    ) -> Result<Response<proto::GetKeyResponse>, Status> {
        self.gate
            .call(Rpc::GetKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                let (key, payload) = self.keys.get_key(&caller.ctx, id).await?;
                Ok(proto::GetKeyResponse {
                    key: Some(convert::key(&key)),
                    payload: payload.map(SecretBytes::into_unprotected),
                })
            })
            .await
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        self.gate
            .call(Rpc::ListKeys, request, |caller, request| async move {
                let limit = convert::limit(request.limit)?;
                let filter = convert::filter(&request.state, request.extractable)?;
                let instance = &caller.ctx.instance;
                let start = match (request.page_token.as_str(), request.offset) {
                    ("", offset) => PageStart::Offset(offset as usize),
                    (token, 0) => PageStart::After(page_token::decode(instance, &filter, token)?),
                    (_, _) => {
                        return Err(KmsError::invalid(
                            "offset",
                            "give offset or page_token, not both",
                        ));
                    }
                };
                let (keys, total, next) = self
                    .keys
                    .list_keys(&caller.ctx, &filter, start, limit)
                    .await?;
                Ok(proto::ListKeysResponse {
                    keys: keys.iter().map(convert::key).collect(),
                    total_count: total,
                    next_page_token: next
                        .map(|position| page_token::encode(instance, &filter, position))
                        .unwrap_or_default(),
                })
            })
            .await
    }

    async fn count_keys(
        &self,
        request: Request<proto::CountKeysRequest>,
    ) -> Result<Response<proto::CountKeysResponse>, Status> {
        self.gate
            .call(Rpc::CountKeys, request, |caller, request| async move {
                let filter = convert::filter(&request.state, request.extractable)?;
                Ok(proto::CountKeysResponse {
                    count: self.keys.count_keys(&caller.ctx, &filter).await?,
                })
            })
            .await
    }

    async fn delete_key(
        &self,
        request: Request<proto::DeleteKeyRequest>,
    ) -> Result<Response<proto::KeyResponse>, Status> {
        self.gate
            .call(Rpc::DeleteKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                self.keys
                    .delete_key(&caller.ctx, id)
                    .await
                    .map(key_response)
            })
            .await
    }

    async fn wrap_key(
        &self,
        request: Request<proto::WrapKeyRequest>,
    ) -> Result<Response<proto::WrapKeyResponse>, Status> {
        self.gate
            .call(Rpc::WrapKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                let plaintext = match request.plaintext {
                    None => None,
                    Some(p) if (1..=MAX_PLAINTEXT).contains(&p.len()) => Some(SecretBytes::new(p)),
                    Some(p) => {
                        let len = p.len();
                        drop(SecretBytes::new(p));
                        return Err(KmsError::invalid(
                            "plaintext",
                            format!("must be 1..{MAX_PLAINTEXT} bytes; got {len}"),
                        ));
                    }
                };
                check_aad(&request.aad)?;
                let wrapped = self
                    .keys
                    .wrap(&caller.ctx, id, plaintext, &request.aad)
                    .await?;
                Ok(proto::WrapKeyResponse {
                    ciphertext: wrapped.ciphertext,
                    plaintext: wrapped
                        .generated_plaintext
                        .map(SecretBytes::into_unprotected)
                        .unwrap_or_default(),
                    key_version_id: wrapped.version_id.to_string(),
                })
            })
            .await
    }

    async fn unwrap_key(
        &self,
        request: Request<proto::UnwrapKeyRequest>,
    ) -> Result<Response<proto::UnwrapKeyResponse>, Status> {
        self.gate
            .call(Rpc::UnwrapKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                check_ciphertext(&request.ciphertext)?;
                check_aad(&request.aad)?;
                let unwrapped = self
                    .keys
                    .unwrap(&caller.ctx, id, &request.ciphertext, &request.aad)
                    .await?;
                let (rewrapped_ciphertext, rewrapped_version) = match unwrapped.rewrapped {
                    Some((ciphertext, version)) => (ciphertext, version.to_string()),
                    None => (Vec::new(), String::new()),
                };
                Ok(proto::UnwrapKeyResponse {
                    plaintext: unwrapped.plaintext.into_unprotected(),
                    key_version_id: unwrapped.version_id.to_string(),
                    rewrapped_ciphertext,
                    rewrapped_key_version_id: rewrapped_version,
                })
            })
            .await
    }

    async fn rewrap_key(
        &self,
        request: Request<proto::RewrapKeyRequest>,
    ) -> Result<Response<proto::RewrapKeyResponse>, Status> {
        self.gate
            .call(Rpc::RewrapKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                check_ciphertext(&request.ciphertext)?;
                check_aad(&request.aad)?;
                let (ciphertext, version) = self
                    .keys
                    .rewrap(&caller.ctx, id, &request.ciphertext, &request.aad)
                    .await?;
                Ok(proto::RewrapKeyResponse {
                    ciphertext,
                    key_version_id: version.to_string(),
                })
            })
            .await
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::RotateKeyResponse>, Status> {
        self.gate
            .call(Rpc::RotateKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                let secure_import = convert::secure_import(
                    request.encrypted_payload,
                    request.encrypted_nonce,
                    request.iv,
                    request.encryption_algorithm,
                )?;
                let material = match (request.payload, secure_import) {
                    (Some(_), Some(_)) => {
                        return Err(KmsError::invalid(
                            "payload",
                            "give either payload or encrypted_payload, not both",
                        ));
                    }
                    (Some(payload), None) => Some(Material::Plaintext(SecretBytes::new(payload))),
                    (None, Some(import)) => Some(Material::SecureImport(import)),
                    (None, None) => None,
                };
                let key = self.keys.rotate_key(&caller.ctx, id, material).await?;
                Ok(proto::RotateKeyResponse {
                    key: Some(convert::key(&key)),
                })
            })
            .await
    }

    async fn list_key_versions(
        &self,
        request: Request<proto::ListKeyVersionsRequest>,
    ) -> Result<Response<proto::ListKeyVersionsResponse>, Status> {
        self.gate
            .call(
                Rpc::ListKeyVersions,
                request,
                |caller, request| async move {
                    let id = parse_key_id("id", &request.id)?;
                    let limit = convert::limit(request.limit)?;
                    let instance = &caller.ctx.instance;
                    let start = match (request.page_token.as_str(), request.offset) {
                        ("", offset) => PageStart::Offset(offset as usize),
                        (token, 0) => {
                            PageStart::After(page_token::decode_versions(instance, id, token)?)
                        }
                        (_, _) => {
                            return Err(KmsError::invalid(
                                "offset",
                                "give offset or page_token, not both",
                            ));
                        }
                    };
                    let (versions, total, next) = self
                        .keys
                        .list_key_versions(&caller.ctx, id, start, limit)
                        .await?;
                    Ok(proto::ListKeyVersionsResponse {
                        versions: versions
                            .iter()
                            .map(|v| proto::KeyVersion {
                                id: v.id.to_string(),
                                creation_date: Some(convert::timestamp(v.created_at)),
                            })
                            .collect(),
                        total_count: total,
                        next_page_token: next
                            .map(|position| page_token::encode_versions(instance, id, position))
                            .unwrap_or_default(),
                    })
                },
            )
            .await
    }

    async fn disable_key(
        &self,
        request: Request<proto::DisableKeyRequest>,
    ) -> Result<Response<proto::KeyResponse>, Status> {
        self.gate
            .call(Rpc::DisableKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                self.keys
                    .disable_key(&caller.ctx, id)
                    .await
                    .map(key_response)
            })
            .await
    }

    async fn enable_key(
        &self,
        request: Request<proto::EnableKeyRequest>,
    ) -> Result<Response<proto::KeyResponse>, Status> {
        self.gate
            .call(Rpc::EnableKey, request, |caller, request| async move {
                let id = parse_key_id("id", &request.id)?;
                self.keys
                    .enable_key(&caller.ctx, id)
                    .await
                    .map(key_response)
            })
            .await
    }

    async fn get_parameters_for_import(
        &self,
        request: Request<proto::GetParametersForImportRequest>,
    ) -> Result<Response<proto::GetParametersForImportResponse>, Status> {
        self.gate
            .call(
                Rpc::GetParametersForImport,
                request,
                |caller, request| async move {
                    let id = parse_key_id("key_id", &request.key_id)?;
                    let hash =
                        convert::oaep_hash("wrapping_algorithm", request.wrapping_algorithm)?;
                    let bits = convert::wrapping_key_bits(request.wrapping_key_spec)?;
                    let parameters = self
                        .keys
                        .get_parameters_for_import(&caller.ctx, id, hash, bits)
                        .await?;
                    Ok(proto::GetParametersForImportResponse {
                        key_id: parameters.key_id.to_string(),
                        import_token: parameters.import_token,
                        public_key: parameters.public_key,
                        expiration_time: Some(convert::timestamp(parameters.expires_at)),
                    })
                },
            )
            .await
    }

    async fn import_key_material(
        &self,
        request: Request<proto::ImportKeyMaterialRequest>,
    ) -> Result<Response<proto::ImportKeyMaterialResponse>, Status> {
        self.gate
            .call(
                Rpc::ImportKeyMaterial,
                request,
                |caller, request| async move {
                    let id = parse_key_id("key_id", &request.key_id)?;
                    if request.import_token.is_empty() {
                        return Err(KmsError::invalid(
                            "import_token",
                            "required (from GetParametersForImport)",
                        ));
                    }
                    let material_len = request.encrypted_key_material.len();
                    if material_len == 0 || material_len > convert::MAX_RSA_CIPHERTEXT {
                        return Err(KmsError::invalid(
                            "encrypted_key_material",
                            format!(
                                "required: the RSA-OAEP ciphertext of the key material (at most {} \
                             bytes); got {material_len} bytes",
                                convert::MAX_RSA_CIPHERTEXT
                            ),
                        ));
                    }
                    let expiration_model = convert::expiration_model(request.expiration_model)?;
                    let valid_to = request
                        .valid_to
                        .as_ref()
                        .map(|ts| convert::millis_from("valid_to", ts))
                        .transpose()?;
                    let key = self
                        .keys
                        .import_key_material(
                            &caller.ctx,
                            id,
                            MaterialForKey {
                                import_token: request.import_token,
                                encrypted_key_material: request.encrypted_key_material,
                                expiration_model,
                                valid_to,
                            },
                        )
                        .await?;
                    Ok(proto::ImportKeyMaterialResponse {
                        key: Some(convert::key(&key)),
                    })
                },
            )
            .await
    }

    async fn delete_imported_key_material(
        &self,
        request: Request<proto::DeleteImportedKeyMaterialRequest>,
    ) -> Result<Response<proto::KeyResponse>, Status> {
        self.gate
            .call(
                Rpc::DeleteImportedKeyMaterial,
                request,
                |caller, request| async move {
                    let id = parse_key_id("key_id", &request.key_id)?;
                    self.keys
                        .delete_imported_key_material(&caller.ctx, id)
                        .await
                        .map(key_response)
                },
            )
            .await
    }
}

/// At most 126 entries of 0..255 bytes each.
fn check_aad(aad: &[String]) -> Result<(), KmsError> {
    if aad.len() > MAX_AAD_ENTRIES {
        return Err(KmsError::invalid(
            "aad",
            format!("at most {MAX_AAD_ENTRIES} entries; got {}", aad.len()),
        ));
    }
    if let Some((index, entry)) = aad
        .iter()
        .enumerate()
        .find(|(_, a)| a.len() > MAX_AAD_ENTRY_BYTES)
    {
        return Err(KmsError::invalid(
            "aad",
            format!(
                "entry {index} is {} bytes; at most {MAX_AAD_ENTRY_BYTES}",
                entry.len()
            ),
        ));
    }
    Ok(())
}

fn check_ciphertext(ciphertext: &[u8]) -> Result<(), KmsError> {
    if ciphertext.is_empty() {
        return Err(KmsError::invalid("ciphertext", "required"));
    }
    Ok(())
}
