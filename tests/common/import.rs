//! What the import tests share: the independent client half (Python's `cryptography`,
//! `tests/support/import_client.py`), local decryption of WrapKey ciphertexts with
//! OpenSSL, and the calls both flows make.

use std::process::{Command, Stdio};

use kms::cli::connect::AuthedChannel;
use kms::proto::import_token_service_client::ImportTokenServiceClient;
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::{
    CreateImportTokenRequest, CreateKeyRequest, GetImportTokenRequest, GetImportTokenResponse,
    GetKeyRequest, GetParametersForImportRequest, Key, KeyOrigin, UnwrapKeyRequest,
    WrappingAlgorithm,
};
use serde_json::{Value, json};
use tonic::{Code, Status};

use super::{TestServer, req};
/// The aad every import test wraps and unwraps with.
pub const BYOK_AAD: &str = "byok";

pub type Keys = KeyServiceClient<AuthedChannel>;
pub type Tokens = ImportTokenServiceClient<AuthedChannel>;

#[derive(Clone, Copy, Debug)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    pub fn python(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
        }
    }

    pub fn algorithm(self) -> i32 {
        match self {
            Hash::Sha1 => WrappingAlgorithm::RsaesOaepSha1 as i32,
            Hash::Sha256 => WrappingAlgorithm::RsaesOaepSha256 as i32,
        }
    }
}

/// Runs the independent client half; returns its JSON answer.
pub fn python_client(request: Value) -> Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/import_client.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/deps.sh --test installs python3-cryptography)");
    serde_json::to_writer(child.stdin.take().unwrap(), &request).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "import client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

pub fn field(answer: &Value, name: &str) -> Vec<u8> {
    hex::decode(answer[name].as_str().unwrap()).unwrap()
}

/// Secure-import fields for `material` under the token (public key, nonce).
pub struct SecureFields {
    pub encrypted_payload: Vec<u8>,
    pub encrypted_nonce: Vec<u8>,
    pub iv: Vec<u8>,
}

pub fn encrypt_for_token(
    token: &GetImportTokenResponse,
    hash: Hash,
    material: &[u8],
    nonce_key: Option<&[u8]>,
) -> SecureFields {
    let mut request = json!({
        "public_key": hex::encode(&token.payload),
        "hash": hash.python(),
        "material": hex::encode(material),
        "nonce": hex::encode(&token.nonce),
    });
    if let Some(key) = nonce_key {
        request["nonce_key"] = json!(hex::encode(key));
    }
    let answer = python_client(request);
    SecureFields {
        encrypted_payload: field(&answer, "encrypted_material"),
        encrypted_nonce: field(&answer, "encrypted_nonce"),
        iv: field(&answer, "iv"),
    }
}

pub fn encrypt_material(public_key: &[u8], hash: Hash, material: &[u8]) -> Vec<u8> {
    let answer = python_client(json!({
        "public_key": hex::encode(public_key),
        "hash": hash.python(),
        "material": hex::encode(material),
    }));
    field(&answer, "encrypted_material")
}

pub fn key_size_of(public_key: &[u8]) -> u64 {
    python_client(json!({
        "public_key": hex::encode(public_key),
        "hash": "sha256",
        "material": "00",
    }))["key_size"]
        .as_u64()
        .unwrap()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    openssl::rand::rand_bytes(&mut bytes).unwrap();
    bytes
}

/// Decrypts a WrapKey ciphertext with the key material, following the documented format,
/// without the service: proves which material the key really uses.
pub fn open_locally(material: &[u8], key_id: &str, ciphertext: &[u8], aad: &[&str]) -> Vec<u8> {
    let version = &ciphertext[1..17];
    let iv = &ciphertext[17..29];
    let (body, tag) = ciphertext[29..].split_at(ciphertext.len() - 29 - 16);
    let mut additional = b"kms.v1.wrap".to_vec();
    additional.push(0x01);
    additional.extend_from_slice(uuid::Uuid::parse_str(key_id).unwrap().as_bytes());
    additional.extend_from_slice(version);
    additional.extend_from_slice(&(aad.len() as u32).to_be_bytes());
    for entry in aad {
        additional.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        additional.extend_from_slice(entry.as_bytes());
    }
    let cipher = match material.len() {
        16 => openssl::symm::Cipher::aes_128_gcm(),
        24 => openssl::symm::Cipher::aes_192_gcm(),
        _ => openssl::symm::Cipher::aes_256_gcm(),
    };
    openssl::symm::decrypt_aead(cipher, material, Some(iv), &additional, body, tag)
        .expect("the ciphertext opens with the imported material")
}

#[track_caller]
pub fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: Code, needle: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not contain {needle:?}",
        status.message()
    );
}

pub async fn create_token(tokens: &mut Tokens, tenant: &str, expiration: u32, retrievals: u32) {
    tokens
        .create_import_token(req(
            tenant,
            CreateImportTokenRequest {
                expiration: Some(expiration),
                max_allowed_retrievals: Some(retrievals),
            },
        ))
        .await
        .unwrap();
}

pub async fn get_token(
    tokens: &mut Tokens,
    tenant: &str,
) -> Result<GetImportTokenResponse, Status> {
    tokens
        .get_import_token(req(tenant, GetImportTokenRequest {}))
        .await
        .map(|r| r.into_inner())
}

pub async fn secure_create(
    keys: &mut Keys,
    tenant: &str,
    fields: SecureFields,
    hash: Hash,
) -> Result<Key, Status> {
    keys.create_key(req(
        tenant,
        CreateKeyRequest {
            name: "byok".into(),
            encrypted_payload: fields.encrypted_payload,
            encrypted_nonce: fields.encrypted_nonce,
            iv: fields.iv,
            encryption_algorithm: hash.algorithm(),
            ..Default::default()
        },
    ))
    .await
    .map(|r| r.into_inner().key.unwrap())
}

/// WrapKey under key `id` with the import tests' aad; the call must succeed.
pub async fn wrap(keys: &mut Keys, tenant: &str, id: &str, plaintext: &[u8]) -> Vec<u8> {
    super::wrap_key(keys, tenant, id, plaintext, &[BYOK_AAD]).await
}

/// UnwrapKey under key `id` with the import tests' aad; refusals are the caller's to check.
pub async fn unwrap(
    keys: &mut Keys,
    tenant: &str,
    id: &str,
    ciphertext: &[u8],
) -> Result<Vec<u8>, Status> {
    keys.unwrap_key(req(
        tenant,
        UnwrapKeyRequest {
            id: id.into(),
            ciphertext: ciphertext.to_vec(),
            aad: vec![BYOK_AAD.into()],
        },
    ))
    .await
    .map(|r| r.into_inner().plaintext)
}

pub async fn get_key(keys: &mut Keys, tenant: &str, id: &str) -> Key {
    keys.get_key(req(tenant, GetKeyRequest { id: id.into() }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

pub async fn create_external(keys: &mut Keys, tenant: &str, name: &str) -> Key {
    keys.create_key(req(
        tenant,
        CreateKeyRequest {
            name: name.into(),
            origin: KeyOrigin::External as i32,
            ..Default::default()
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .key
    .unwrap()
}

/// GetParametersForImport with the defaults (RSAES_OAEP_SHA_256, RSA_2048).
pub async fn default_parameters(
    keys: &mut Keys,
    tenant: &str,
    key_id: &str,
) -> kms::proto::GetParametersForImportResponse {
    keys.get_parameters_for_import(req(
        tenant,
        GetParametersForImportRequest {
            key_id: key_id.into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap()
    .into_inner()
}

/// Whether this token decrypts OAEP-SHA-256 natively (the start-up probe's verdict).
pub fn sha256_is_native(server: &TestServer) -> bool {
    server.log().contains("oaep_sha256=Native")
}
