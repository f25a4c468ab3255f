//! Bring your own key, over real gRPC against a real token: import tokens and secure
//! import (IBM style), both OAEP hashes, refusals, the RSA pair pool and the
//! `kms import-key` command. EXTERNAL-origin keys (GetParametersForImport /
//! ImportKeyMaterial / DeleteImportedKeyMaterial) are in `import_external.rs`.
//!
//! The client half (RSA-OAEP, AES-GCM of the nonce) is done by Python's `cryptography`
//! package (tests/support/import_client.py), and imported keys are checked by decrypting
//! WrapKey ciphertexts locally with OpenSSL, following the documented format.

mod common;

use std::process::Command;
use std::time::Duration;

use common::import::*;
use common::{TestServer, TestToken, instance, req};
use kms::proto::{
    CountKeysRequest, CreateImportTokenRequest, CreateKeyRequest, ExpirationModel,
    GetImportTokenResponse, GetParametersForImportRequest, KeyOrigin, KeyState, RotateKeyRequest,
};
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn import_token_creation_retrieval_counting_and_replacement() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(&token, data.path(), &[]).await;
    let mut tokens = server.import_tokens().await;
    let tenant = instance();

    assert_refused(
        get_token(&mut tokens, &tenant).await,
        Code::NotFound,
        "import token",
    );

    for (expiration, retrievals, field) in [
        (299, 1, "expiration"),
        (86_401, 1, "expiration"),
        (600, 0, "max_allowed_retrievals"),
        (600, 501, "max_allowed_retrievals"),
    ] {
        let result = tokens
            .create_import_token(req(
                &tenant,
                CreateImportTokenRequest {
                    expiration: Some(expiration),
                    max_allowed_retrievals: Some(retrievals),
                },
            ))
            .await;
        assert_refused(result, Code::InvalidArgument, field);
    }
    assert_refused(
        get_token(&mut tokens, &tenant).await,
        Code::NotFound,
        "import token",
    );

    // Defaults: 600 s, one retrieval.
    let created = tokens
        .create_import_token(req(&tenant, CreateImportTokenRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.max_allowed_retrievals, 1);
    assert_eq!(created.remaining_retrievals, 1);
    let lifetime =
        created.expiration_date.unwrap().seconds - created.creation_date.unwrap().seconds;
    assert_eq!(lifetime, 600);

    let first = get_token(&mut tokens, &tenant).await.unwrap();
    assert_eq!(first.remaining_retrievals, 0);
    assert_eq!(first.nonce.len(), 12);
    assert_eq!(
        key_size_of(&first.payload),
        4096,
        "an RSA-4096 public key, DER SPKI"
    );
    assert_refused(
        get_token(&mut tokens, &tenant).await,
        Code::FailedPrecondition,
        "no retrievals left",
    );
    // Another instance has no token.
    assert_refused(
        get_token(&mut tokens, &instance()).await,
        Code::NotFound,
        "import token",
    );

    // A new token replaces the old one: new key pair, new nonce, new budget.
    create_token(&mut tokens, &tenant, 900, 3).await;
    let mut seen = Vec::new();
    for remaining in [2, 1, 0] {
        let retrieved = get_token(&mut tokens, &tenant).await.unwrap();
        assert_eq!(retrieved.remaining_retrievals, remaining);
        assert_eq!(retrieved.max_allowed_retrievals, 3);
        assert_ne!(retrieved.payload, first.payload);
        assert_ne!(retrieved.nonce, first.nonce);
        seen.push(retrieved.payload);
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "same token each time"
    );
    assert_refused(
        get_token(&mut tokens, &tenant).await,
        Code::FailedPrecondition,
        "no retrievals left",
    );
}

#[tokio::test]
async fn secure_import_with_both_hashes_then_wrap_unwrap_and_rotate() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(&token, data.path(), &[]).await;
    let (mut tokens, mut keys) = (server.import_tokens().await, server.keys().await);
    let tenant = instance();
    create_token(&mut tokens, &tenant, 600, 2).await;
    let import_token = get_token(&mut tokens, &tenant).await.unwrap();

    for (hash, size) in [(Hash::Sha256, 32), (Hash::Sha1, 16)] {
        let material = random_bytes(size);
        let fields = encrypt_for_token(&import_token, hash, &material, None);
        let key = secure_create(&mut keys, &tenant, fields, hash)
            .await
            .unwrap();
        assert_eq!(key.state, KeyState::Active as i32);
        assert_eq!(key.origin, KeyOrigin::Imported as i32);
        assert!(key.imported && !key.extractable);
        assert_eq!(key.size_bits, size as u32 * 8);

        let ciphertext = wrap(&mut keys, &tenant, &key.id, b"data key").await;
        assert_eq!(
            open_locally(&material, &key.id, &ciphertext, &[BYOK_AAD]),
            b"data key",
            "{hash:?}: the key uses exactly the imported material"
        );
        assert_eq!(
            unwrap(&mut keys, &tenant, &key.id, &ciphertext)
                .await
                .unwrap(),
            b"data key"
        );

        // Rotation of an imported key by secure import: new material, same size.
        let next = random_bytes(size);
        let fields = encrypt_for_token(&import_token, hash, &next, None);
        let rotated = keys
            .rotate_key(req(
                &tenant,
                RotateKeyRequest {
                    id: key.id.clone(),
                    encrypted_payload: fields.encrypted_payload,
                    encrypted_nonce: fields.encrypted_nonce,
                    iv: fields.iv,
                    encryption_algorithm: hash.algorithm(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        assert_ne!(rotated.current_version_id, key.current_version_id);
        let newer = wrap(&mut keys, &tenant, &key.id, b"after rotation").await;
        assert_eq!(
            open_locally(&next, &key.id, &newer, &[BYOK_AAD]),
            b"after rotation"
        );
        assert_eq!(
            unwrap(&mut keys, &tenant, &key.id, &ciphertext)
                .await
                .unwrap(),
            b"data key"
        );

        // A rotation must keep the size.
        let other_size = random_bytes(if size == 32 { 16 } else { 32 });
        let fields = encrypt_for_token(&import_token, hash, &other_size, None);
        let result = keys
            .rotate_key(req(
                &tenant,
                RotateKeyRequest {
                    id: key.id.clone(),
                    encrypted_payload: fields.encrypted_payload,
                    encrypted_nonce: fields.encrypted_nonce,
                    iv: fields.iv,
                    encryption_algorithm: hash.algorithm(),
                    ..Default::default()
                },
            ))
            .await;
        assert_refused(result, Code::InvalidArgument, "encrypted_payload");
    }
    assert_eq!(common::count_keys(&server, &tenant).await, 2);
}

#[tokio::test]
async fn secure_import_refusals_store_nothing() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(
        &token,
        data.path(),
        &[("KMS_IMPORT_MIN_TOKEN_EXPIRATION_SECS", "2")],
    )
    .await;
    let (mut tokens, mut keys) = (server.import_tokens().await, server.keys().await);
    let tenant = instance();
    let material = random_bytes(32);

    // No token at all.
    let orphan = GetImportTokenResponse {
        payload: field(&python_client(json!({"generate_rsa": 2048})), "public_key"),
        nonce: random_bytes(12),
        ..Default::default()
    };
    let fields = encrypt_for_token(&orphan, Hash::Sha1, &material, None);
    assert_refused(
        secure_create(&mut keys, &tenant, fields, Hash::Sha1).await,
        Code::NotFound,
        "import token",
    );

    create_token(&mut tokens, &tenant, 600, 5).await;
    let import_token = get_token(&mut tokens, &tenant).await.unwrap();
    for hash in [Hash::Sha1, Hash::Sha256] {
        // Encrypted for another public key (another token).
        let wrong_key = GetImportTokenResponse {
            payload: orphan.payload.clone(),
            nonce: import_token.nonce.clone(),
            ..Default::default()
        };
        let fields = encrypt_for_token(&wrong_key, hash, &material, None);
        assert_refused(
            secure_create(&mut keys, &tenant, fields, hash).await,
            Code::InvalidArgument,
            "encrypted_payload: cannot be decrypted",
        );
        // Right key, wrong nonce.
        let wrong_nonce = GetImportTokenResponse {
            nonce: random_bytes(12),
            ..import_token.clone()
        };
        let fields = encrypt_for_token(&wrong_nonce, hash, &material, None);
        assert_refused(
            secure_create(&mut keys, &tenant, fields, hash).await,
            Code::InvalidArgument,
            "encrypted_nonce",
        );
        // The nonce encrypted under other material than the payload.
        let fields = encrypt_for_token(&import_token, hash, &material, Some(&random_bytes(32)));
        assert_refused(
            secure_create(&mut keys, &tenant, fields, hash).await,
            Code::InvalidArgument,
            "encrypted_nonce",
        );
        // Material of a size no AES key has.
        let fields = encrypt_for_token(&import_token, hash, &random_bytes(20), Some(&material));
        assert_refused(
            secure_create(&mut keys, &tenant, fields, hash).await,
            Code::InvalidArgument,
            "key material inside is",
        );
        // Encrypted with one hash, declared as the other.
        let other = match hash {
            Hash::Sha1 => Hash::Sha256,
            Hash::Sha256 => Hash::Sha1,
        };
        let fields = encrypt_for_token(&import_token, hash, &material, None);
        assert_refused(
            secure_create(&mut keys, &tenant, fields, other).await,
            Code::InvalidArgument,
            "encrypted_payload: cannot be decrypted",
        );
    }
    // Malformed fields are refused before anything is decrypted.
    let good = || encrypt_for_token(&import_token, Hash::Sha1, &material, None);
    type Spoil = fn(&mut SecureFields);
    let malformed: [(Spoil, &str); 3] = [
        (|f| f.iv.truncate(f.iv.len() - 1), "iv"),
        (
            |f| f.encrypted_nonce.truncate(f.encrypted_nonce.len() - 1),
            "encrypted_nonce",
        ),
        (|f| f.encrypted_payload.clear(), "encrypted_payload"),
    ];
    for (spoil, field) in malformed {
        let mut fields = good();
        spoil(&mut fields);
        assert_refused(
            secure_create(&mut keys, &tenant, fields, Hash::Sha1).await,
            Code::InvalidArgument,
            field,
        );
    }
    let unknown_algorithm = keys
        .create_key(req(
            &tenant,
            CreateKeyRequest {
                name: "x".into(),
                encrypted_payload: good().encrypted_payload,
                encrypted_nonce: good().encrypted_nonce,
                iv: good().iv,
                encryption_algorithm: 9,
                ..Default::default()
            },
        ))
        .await;
    assert_refused(
        unknown_algorithm,
        Code::InvalidArgument,
        "encryption_algorithm",
    );

    // The right fields work (the token is still usable after the refusals)...
    let key = secure_create(&mut keys, &tenant, good(), Hash::Sha1)
        .await
        .unwrap();
    assert_eq!(key.size_bits, 256);
    assert_eq!(
        common::count_keys(&server, &tenant).await,
        1,
        "refusals stored nothing"
    );

    // ...until the token expires.
    create_token(&mut tokens, &tenant, 2, 5).await;
    let short_lived = get_token(&mut tokens, &tenant).await.unwrap();
    let fields = encrypt_for_token(&short_lived, Hash::Sha1, &material, None);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_refused(
        secure_create(&mut keys, &tenant, fields, Hash::Sha1).await,
        Code::FailedPrecondition,
        "expired",
    );
    assert_refused(
        get_token(&mut tokens, &tenant).await,
        Code::FailedPrecondition,
        "expired",
    );
    assert_eq!(common::count_keys(&server, &tenant).await, 1);
}

#[tokio::test]
async fn sha256_without_the_fallback_is_refused_where_the_token_lacks_it() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_env(&token, data.path(), &[("KMS_HSM_OAEP_FALLBACK", "false")])
            .await;
    let native = sha256_is_native(&server);
    let (mut tokens, mut keys) = (server.import_tokens().await, server.keys().await);
    let tenant = instance();
    create_token(&mut tokens, &tenant, 600, 1).await;
    let import_token = get_token(&mut tokens, &tenant).await.unwrap();
    let material = random_bytes(32);

    let fields = encrypt_for_token(&import_token, Hash::Sha256, &material, None);
    let result = secure_create(&mut keys, &tenant, fields, Hash::Sha256).await;
    if native {
        // Kryoptic: the token does it itself; the switch changes nothing.
        assert_eq!(result.unwrap().state, KeyState::Active as i32);
    } else {
        assert!(server.log().contains("oaep_sha256=Unavailable"));
        assert_refused(
            result,
            Code::FailedPrecondition,
            "cannot decrypt RSAES_OAEP_SHA_256",
        );
        let external = create_external(&mut keys, &tenant, "e").await;
        let parameters = keys
            .get_parameters_for_import(req(
                &tenant,
                GetParametersForImportRequest {
                    key_id: external.id,
                    ..Default::default()
                },
            ))
            .await;
        assert_refused(parameters, Code::FailedPrecondition, "RSAES_OAEP_SHA_256");
    }
    // SHA-1 is native on every token here.
    let fields = encrypt_for_token(&import_token, Hash::Sha1, &material, None);
    assert!(
        secure_create(&mut keys, &tenant, fields, Hash::Sha1)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn expired_import_token_private_key_is_erased() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(
        &token,
        data.path(),
        &[("KMS_IMPORT_MIN_TOKEN_EXPIRATION_SECS", "1")],
    )
    .await;
    let mut tokens = server.import_tokens().await;
    let tenant = instance();
    create_token(&mut tokens, &tenant, 1, 3).await;
    assert!(get_token(&mut tokens, &tenant).await.is_ok());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_refused(
        get_token(&mut tokens, &tenant).await,
        Code::FailedPrecondition,
        "expired",
    );
    server.stop().await;

    // The sweep left the metadata (so users hear "expired") but erased the private key.
    let store = common::open_store(data.path()).await;
    let stored = store
        .get_import_token(&tenant)
        .await
        .unwrap()
        .expect("metadata kept");
    assert!(stored.key_pair.is_none(), "the private key blob is erased");
}

#[tokio::test]
async fn pre_generated_pairs_serve_requests_and_refill() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_env(&token, data.path(), &[("KMS_IMPORT_RSA_POOL_SIZE", "1")]).await;
    assert!(
        wait_for_log(
            &server,
            "RSA key-pair pool is full",
            Duration::from_secs(120)
        )
        .await,
        "the pool fills in the background"
    );
    let mut tokens = server.import_tokens().await;
    let tenant = instance();
    create_token(&mut tokens, &tenant, 600, 1).await;
    assert!(
        server
            .log_eventually("RSA key pair taken from the pool")
            .await
    );
    assert!(
        !server
            .log()
            .contains("generating a pair on the request path")
    );
    // The pool was drained for RSA-4096: the next token is made on the spot, not refused.
    create_token(&mut tokens, &instance(), 600, 1).await;
    assert!(
        server
            .log_eventually("generating a pair on the request path")
            .await
    );
    assert!(get_token(&mut tokens, &tenant).await.is_ok());
}

async fn wait_for_log(server: &TestServer, needle: &str, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if server.log().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Runs `kms import-key` against the server; returns the key id it printed.
fn import_command(
    server: &TestServer,
    tenant: &str,
    material: &std::path::Path,
    args: &[&str],
) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_kms"))
        .arg("import-key")
        .args(["--addr", &server.url(), "--instance", tenant])
        .arg("--token-file")
        .arg(common::admin_token_path(&server.data_dir))
        .arg("--material")
        .arg(material)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "import-key failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stdout.contains(&hex::encode(std::fs::read(material).unwrap())));
    stdout
        .split_whitespace()
        .nth(1)
        .expect("key <id> ...")
        .to_owned()
}

#[tokio::test]
async fn the_import_key_command_brings_keys_in_by_both_flows() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(&token, data.path(), &[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let material = random_bytes(32);
    let material_file = data.path().join("material.bin");
    std::fs::write(&material_file, &material).unwrap();

    // Secure import with a token the command creates, SHA-256.
    let id = import_command(
        &server,
        &tenant,
        &material_file,
        &["--create-token", "--name", "cli"],
    );
    let ciphertext = wrap(&mut keys, &tenant, &id, b"from the cli").await;
    assert_eq!(
        open_locally(&material, &id, &ciphertext, &[BYOK_AAD]),
        b"from the cli"
    );

    // Rotation by secure import needs a retrievable token: a new one, SHA-1.
    let next = random_bytes(32);
    std::fs::write(&material_file, &next).unwrap();
    let rotated = import_command(
        &server,
        &tenant,
        &material_file,
        &["--create-token", "--hash", "sha1", "--rotate", &id],
    );
    assert_eq!(rotated, id);
    let newer = wrap(&mut keys, &tenant, &id, b"rotated").await;
    assert_eq!(open_locally(&next, &id, &newer, &[BYOK_AAD]), b"rotated");

    // An EXTERNAL key, with a 3072-bit wrapping key.
    let external = create_external(&mut keys, &tenant, "ext").await;
    let imported = import_command(
        &server,
        &tenant,
        &material_file,
        &[
            "--external",
            &external.id,
            "--wrapping-key-bits",
            "3072",
            "--valid-for-secs",
            "3600",
        ],
    );
    assert_eq!(imported, external.id);
    let key = get_key(&mut keys, &tenant, &external.id).await;
    assert_eq!(key.state, KeyState::Active as i32);
    assert_eq!(
        key.expiration_model,
        ExpirationModel::KeyMaterialExpires as i32
    );
    let ciphertext = wrap(&mut keys, &tenant, &external.id, b"external").await;
    assert_eq!(
        open_locally(&next, &external.id, &ciphertext, &[BYOK_AAD]),
        b"external"
    );
}

/// Secure-import inputs at random, through the real RSA path: random RSA-OAEP blocks of
/// every plausible size, random nonces and IVs, both hashes, and fields of the wrong
/// size. Each is refused INVALID_ARGUMENT naming a secure-import field (the token's
/// private key unwraps in the HSM and the OAEP check fails there, or in the fallback
/// decoder), never INTERNAL or UNAVAILABLE, and no key is created.
#[tokio::test]
async fn random_secure_import_inputs_are_refused_naming_a_field() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let (mut tokens, mut keys) = (server.import_tokens().await, server.keys().await);
    let tenant = instance();
    create_token(&mut tokens, &tenant, 600, 500).await;
    let sizes = [0usize, 1, 12, 27, 28, 29, 255, 256, 384, 511, 512, 513];
    let mut draw = [0u8; 8];
    for case in 0..64 {
        openssl::rand::rand_bytes(&mut draw).unwrap();
        let pick = |i: usize| sizes[draw[i] as usize % sizes.len()];
        // Mostly the sizes the format wants, so the HSM sees the ciphertext.
        let (payload, nonce, iv) = if case % 4 == 0 {
            (pick(0), pick(1), pick(2))
        } else {
            ([256, 384, 512][draw[3] as usize % 3], 28, 12)
        };
        let hash = if draw[4] % 2 == 0 {
            Hash::Sha1
        } else {
            Hash::Sha256
        };
        let fields = SecureFields {
            encrypted_payload: random_bytes(payload),
            encrypted_nonce: random_bytes(nonce),
            iv: random_bytes(iv),
        };
        let empty = payload == 0 && nonce == 0 && iv == 0;
        let outcome = secure_create(&mut keys, &tenant, fields, hash).await;
        if empty {
            // No secure-import fields at all: an ordinary generated key.
            outcome.expect("a generated key");
            continue;
        }
        let status = outcome.expect_err("random input is refused");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "case {case}: {status:?}"
        );
        assert!(
            ["encrypted_payload", "encrypted_nonce", "iv"]
                .iter()
                .any(|field| status.message().starts_with(field)),
            "case {case}: names a field: {status:?}"
        );
    }
    let generated = common::count_keys(&server, &tenant).await;
    let listed = keys
        .count_keys(req(
            &tenant,
            CountKeysRequest {
                state: vec![KeyState::Active as i32],
                extractable: None,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(generated, listed, "only the generated keys exist");
    assert!(!server.settled_log().await.contains("call failed"));
}
