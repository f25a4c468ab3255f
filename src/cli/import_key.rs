//! `kms import-key`: the client half of key import, so users need not hand-craft
//! RSA-OAEP and AES-GCM. It reads AES key material (16, 24 or 32 raw bytes) from a file,
//! fetches the import token (IBM-style secure import) or the import parameters (EXTERNAL
//! keys), encrypts locally with OpenSSL, and imports.
//!
//! The material stays in zeroized buffers and is never printed.

use std::path::PathBuf;

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use super::connect::{ConnectError, Target};

use crate::hsm::encrypt_oaep;
use crate::hsm::oaep::OaepHash;
use crate::proto;
use crate::proto::import_token_service_client::ImportTokenServiceClient;
use crate::proto::key_service_client::KeyServiceClient;

/// What to import into.
#[derive(Clone, Debug)]
pub enum ImportTarget {
    /// A new root key by secure import with the instance's import token.
    NewKey { name: String },
    /// A new version of an imported root key, by secure import.
    Rotate { key_id: String },
    /// An EXTERNAL-origin key in PRE_ACTIVATION.
    External {
        key_id: String,
        wrapping_key_bits: u32,
        /// Seconds from now until the material expires; `None`: it does not.
        valid_for_secs: Option<u64>,
    },
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub server: Target,
    pub instance: String,
    pub material: PathBuf,
    pub hash: OaepHash,
    /// Create a new import token first (secure import only).
    pub create_token: bool,
    pub target: ImportTarget,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: key material must be 16, 24 or 32 bytes; the file has {len}")]
    MaterialSize { path: String, len: usize },
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{call}: {code:?}: {message}", code = .status.code(), message = .status.message())]
    Call { call: &'static str, status: Status },
    #[error("--wrapping-key-bits must be 2048, 3072 or 4096; got {0}")]
    WrappingKeyBits(u32),
    #[error("invalid instance id")]
    Instance,
    #[error("encrypting locally: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
}

const GCM_IV_LEN: usize = 12;

/// Runs one import; returns the resulting key.
pub async fn import_key(options: &ImportOptions) -> Result<proto::Key, ClientError> {
    let material = zeroize::Zeroizing::new(std::fs::read(&options.material).map_err(|source| {
        ClientError::Read {
            path: options.material.display().to_string(),
            source,
        }
    })?);
    if ![16, 24, 32].contains(&material.len()) {
        return Err(ClientError::MaterialSize {
            path: options.material.display().to_string(),
            len: material.len(),
        });
    }
    let (_, channel) = super::connect::connect(&options.server).await?;
    let mut keys = KeyServiceClient::new(channel.clone());
    let instance = options.instance.as_str();
    let algorithm = match options.hash {
        OaepHash::Sha1 => proto::WrappingAlgorithm::RsaesOaepSha1,
        OaepHash::Sha256 => proto::WrappingAlgorithm::RsaesOaepSha256,
    } as i32;

    if let ImportTarget::External {
        key_id,
        wrapping_key_bits,
        valid_for_secs,
    } = &options.target
    {
        let spec = match wrapping_key_bits {
            2048 => proto::WrappingKeySpec::Rsa2048,
            3072 => proto::WrappingKeySpec::Rsa3072,
            4096 => proto::WrappingKeySpec::Rsa4096,
            other => return Err(ClientError::WrappingKeyBits(*other)),
        } as i32;
        let parameters = keys
            .get_parameters_for_import(with_instance(
                instance,
                proto::GetParametersForImportRequest {
                    key_id: key_id.clone(),
                    wrapping_algorithm: algorithm,
                    wrapping_key_spec: spec,
                },
            )?)
            .await
            .map_err(|status| ClientError::Call {
                call: "GetParametersForImport",
                status,
            })?
            .into_inner();
        let encrypted = encrypt_oaep(&parameters.public_key, options.hash, &material)?;
        let (expiration_model, valid_to) = match valid_for_secs {
            None => (proto::ExpirationModel::KeyMaterialDoesNotExpire, None),
            Some(secs) => {
                let at = std::time::SystemTime::now() + std::time::Duration::from_secs(*secs);
                (
                    proto::ExpirationModel::KeyMaterialExpires,
                    Some(prost_types::Timestamp::from(at)),
                )
            }
        };
        let imported = keys
            .import_key_material(with_instance(
                instance,
                proto::ImportKeyMaterialRequest {
                    key_id: key_id.clone(),
                    import_token: parameters.import_token,
                    encrypted_key_material: encrypted,
                    expiration_model: expiration_model as i32,
                    valid_to,
                },
            )?)
            .await
            .map_err(|status| ClientError::Call {
                call: "ImportKeyMaterial",
                status,
            })?;
        return Ok(imported.into_inner().key.unwrap_or_default());
    }

    let mut tokens = ImportTokenServiceClient::new(channel);
    if options.create_token {
        tokens
            .create_import_token(with_instance(
                instance,
                proto::CreateImportTokenRequest::default(),
            )?)
            .await
            .map_err(|status| ClientError::Call {
                call: "CreateImportToken",
                status,
            })?;
    }
    let token = tokens
        .get_import_token(with_instance(instance, proto::GetImportTokenRequest {})?)
        .await
        .map_err(|status| ClientError::Call {
            call: "GetImportToken",
            status,
        })?
        .into_inner();
    let encrypted_payload = encrypt_oaep(&token.payload, options.hash, &material)?;
    let mut iv = [0u8; GCM_IV_LEN];
    openssl::rand::rand_bytes(&mut iv)?;
    let cipher = match material.len() {
        16 => openssl::symm::Cipher::aes_128_gcm(),
        24 => openssl::symm::Cipher::aes_192_gcm(),
        _ => openssl::symm::Cipher::aes_256_gcm(),
    };
    let mut tag = [0u8; 16];
    let mut encrypted_nonce =
        openssl::symm::encrypt_aead(cipher, &material, Some(&iv), &[], &token.nonce, &mut tag)?;
    encrypted_nonce.extend_from_slice(&tag);

    let key = match &options.target {
        ImportTarget::NewKey { name } => {
            keys.create_key(with_instance(
                instance,
                proto::CreateKeyRequest {
                    name: name.clone(),
                    encrypted_payload,
                    encrypted_nonce,
                    iv: iv.to_vec(),
                    encryption_algorithm: algorithm,
                    ..Default::default()
                },
            )?)
            .await
            .map_err(|status| ClientError::Call {
                call: "CreateKey",
                status,
            })?
            .into_inner()
            .key
        }
        ImportTarget::Rotate { key_id } => {
            keys.rotate_key(with_instance(
                instance,
                proto::RotateKeyRequest {
                    id: key_id.clone(),
                    encrypted_payload,
                    encrypted_nonce,
                    iv: iv.to_vec(),
                    encryption_algorithm: algorithm,
                    ..Default::default()
                },
            )?)
            .await
            .map_err(|status| ClientError::Call {
                call: "RotateKey",
                status,
            })?
            .into_inner()
            .key
        }
        ImportTarget::External { .. } => unreachable!("handled above"),
    };
    Ok(key.unwrap_or_default())
}

fn with_instance<T>(instance: &str, message: T) -> Result<Request<T>, ClientError> {
    let mut request = Request::new(message);
    let value = MetadataValue::try_from(instance).map_err(|_| ClientError::Instance)?;
    request.metadata_mut().insert("bluemix-instance", value);
    Ok(request)
}
