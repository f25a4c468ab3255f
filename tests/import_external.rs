//! Bring your own key by GetParametersForImport and ImportKeyMaterial: EXTERNAL-origin
//! keys (import, delete the material, import it again), parameters and material that
//! expire, and both import flows across a restart. Over real gRPC against a real token;
//! the client half is Python's `cryptography` (see `common::import`).

mod common;

use std::time::Duration;

use common::import::*;
use common::{TestServer, TestToken, instance, req};
use kms::proto::{
    CreateKeyRequest, DeleteImportedKeyMaterialRequest, ExpirationModel,
    GetParametersForImportRequest, ImportKeyMaterialRequest, KeyOrigin, KeyState, RotateKeyRequest,
    WrapKeyRequest, WrappingKeySpec,
};
use tonic::Code;

#[tokio::test]
async fn external_key_import_delete_and_reimport() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(&token, data.path(), &[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();

    let external = |name: &str| CreateKeyRequest {
        name: name.into(),
        origin: KeyOrigin::External as i32,
        ..Default::default()
    };
    let key = keys
        .create_key(req(&tenant, external("external")))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.state, KeyState::PreActivation as i32);
    assert_eq!(key.origin, KeyOrigin::External as i32);
    let id = key.id.clone();
    let wrap_early = keys
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: id.clone(),
                ..Default::default()
            },
        ))
        .await;
    assert_refused(wrap_early, Code::FailedPrecondition, "PRE_ACTIVATION");

    let parameters = |hash: Hash, spec: WrappingKeySpec| GetParametersForImportRequest {
        key_id: id.clone(),
        wrapping_algorithm: hash.algorithm(),
        wrapping_key_spec: spec as i32,
    };
    // Defaults: RSAES_OAEP_SHA_256 with RSA_2048, valid for 24 hours.
    let defaults = default_parameters(&mut keys, &tenant, &id).await;
    assert_eq!(defaults.key_id, id);
    assert_eq!(key_size_of(&defaults.public_key), 2048);
    let expires_in = defaults.expiration_time.unwrap().seconds
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!((86_000..=86_400).contains(&expires_in), "{expires_in}");

    // A new call supersedes the last.
    let current = keys
        .get_parameters_for_import(req(
            &tenant,
            parameters(Hash::Sha1, WrappingKeySpec::Rsa3072),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key_size_of(&current.public_key), 3072);
    let material = random_bytes(32);
    let import = |token: &[u8], encrypted: Vec<u8>| ImportKeyMaterialRequest {
        key_id: id.clone(),
        import_token: token.to_vec(),
        encrypted_key_material: encrypted,
        expiration_model: ExpirationModel::KeyMaterialDoesNotExpire as i32,
        valid_to: None,
    };
    let superseded = keys
        .import_key_material(req(
            &tenant,
            import(
                &defaults.import_token,
                encrypt_material(&defaults.public_key, Hash::Sha256, &material),
            ),
        ))
        .await;
    assert_refused(superseded, Code::InvalidArgument, "superseded");

    // Refusals that change nothing.
    let encrypted = encrypt_material(&current.public_key, Hash::Sha1, &material);
    let cases: Vec<(ImportKeyMaterialRequest, Code, &str)> = vec![
        (
            import(b"garbage", encrypted.clone()),
            Code::InvalidArgument,
            "import_token",
        ),
        (
            import(&current.import_token, random_bytes(384)),
            Code::InvalidArgument,
            "cannot be decrypted",
        ),
        (
            import(
                &current.import_token,
                encrypt_material(&current.public_key, Hash::Sha1, &random_bytes(20)),
            ),
            Code::InvalidArgument,
            "key material inside is",
        ),
        (
            import(
                &current.import_token,
                encrypt_material(&current.public_key, Hash::Sha256, &material),
            ),
            Code::InvalidArgument,
            "cannot be decrypted",
        ),
        (
            ImportKeyMaterialRequest {
                expiration_model: ExpirationModel::KeyMaterialExpires as i32,
                ..import(&current.import_token, encrypted.clone())
            },
            Code::InvalidArgument,
            "valid_to: required",
        ),
        (
            ImportKeyMaterialRequest {
                valid_to: Some(prost_types::Timestamp {
                    seconds: 1_000,
                    nanos: 0,
                }),
                expiration_model: 0,
                ..import(&current.import_token, encrypted.clone())
            },
            Code::InvalidArgument,
            "valid_to: must be in the future",
        ),
        (
            ImportKeyMaterialRequest {
                expiration_model: 7,
                ..import(&current.import_token, encrypted.clone())
            },
            Code::InvalidArgument,
            "expiration_model",
        ),
    ];
    for (request, code, needle) in cases {
        assert_refused(
            keys.import_key_material(req(&tenant, request)).await,
            code,
            needle,
        );
    }
    // The token of another key, and a key of another instance.
    let other = keys
        .create_key(req(&tenant, external("other")))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let wrong_key = keys
        .import_key_material(req(
            &tenant,
            ImportKeyMaterialRequest {
                key_id: other.id.clone(),
                ..import(&current.import_token, encrypted.clone())
            },
        ))
        .await;
    assert_refused(wrong_key, Code::InvalidArgument, "another key");
    assert_refused(
        keys.import_key_material(req(
            &instance(),
            import(&current.import_token, encrypted.clone()),
        ))
        .await,
        Code::NotFound,
        "not found",
    );
    assert_eq!(
        get_key(&mut keys, &tenant, &id).await.state,
        KeyState::PreActivation as i32
    );

    // The import.
    let imported = keys
        .import_key_material(req(
            &tenant,
            import(&current.import_token, encrypted.clone()),
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(imported.state, KeyState::Active as i32);
    assert_eq!(imported.size_bits, 256);
    assert_eq!(
        imported.expiration_model,
        ExpirationModel::KeyMaterialDoesNotExpire as i32
    );
    let ciphertext = wrap(&mut keys, &tenant, &id, b"before delete").await;
    assert_eq!(
        open_locally(&material, &id, &ciphertext, &[BYOK_AAD]),
        b"before delete"
    );
    assert_refused(
        keys.import_key_material(req(
            &tenant,
            import(&current.import_token, encrypted.clone()),
        ))
        .await,
        Code::FailedPrecondition,
        "ACTIVE",
    );
    let rotate = keys
        .rotate_key(req(
            &tenant,
            RotateKeyRequest {
                id: id.clone(),
                ..Default::default()
            },
        ))
        .await;
    assert_refused(rotate, Code::FailedPrecondition, "EXTERNAL");

    // Delete the material: back to PRE_ACTIVATION, data undecryptable.
    let deleted = keys
        .delete_imported_key_material(req(
            &tenant,
            DeleteImportedKeyMaterialRequest { key_id: id.clone() },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(deleted.state, KeyState::PreActivation as i32);
    assert_refused(
        unwrap(&mut keys, &tenant, &id, &ciphertext).await,
        Code::FailedPrecondition,
        "PRE_ACTIVATION",
    );
    assert_refused(
        keys.delete_imported_key_material(req(
            &tenant,
            DeleteImportedKeyMaterialRequest { key_id: id.clone() },
        ))
        .await,
        Code::FailedPrecondition,
        "no key material",
    );

    // Re-import: different material is refused, the same material brings the data back.
    let fresh = keys
        .get_parameters_for_import(req(
            &tenant,
            parameters(Hash::Sha256, WrappingKeySpec::Rsa2048),
        ))
        .await
        .unwrap()
        .into_inner();
    let different = encrypt_material(&fresh.public_key, Hash::Sha256, &random_bytes(32));
    assert_refused(
        keys.import_key_material(req(&tenant, import(&fresh.import_token, different)))
            .await,
        Code::InvalidArgument,
        "not the material previously imported",
    );
    let same = encrypt_material(&fresh.public_key, Hash::Sha256, &material);
    let back = keys
        .import_key_material(req(&tenant, import(&fresh.import_token, same)))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(back.state, KeyState::Active as i32);
    assert_eq!(back.current_version_id, imported.current_version_id);
    assert_eq!(
        unwrap(&mut keys, &tenant, &id, &ciphertext).await.unwrap(),
        b"before delete"
    );

    // Parameters only for EXTERNAL keys in PRE_ACTIVATION.
    assert_refused(
        keys.get_parameters_for_import(req(
            &tenant,
            parameters(Hash::Sha256, WrappingKeySpec::Rsa2048),
        ))
        .await,
        Code::FailedPrecondition,
        "ACTIVE",
    );
    let generated = common::create_key(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "generated".into(),
            ..Default::default()
        },
    )
    .await;
    let result = keys
        .get_parameters_for_import(req(
            &tenant,
            GetParametersForImportRequest {
                key_id: generated.id,
                ..Default::default()
            },
        ))
        .await;
    assert_refused(result, Code::FailedPrecondition, "EXTERNAL");
    let result = keys
        .get_parameters_for_import(req(
            &tenant,
            GetParametersForImportRequest {
                key_id: other.id.clone(),
                wrapping_key_spec: 9,
                ..Default::default()
            },
        ))
        .await;
    assert_refused(result, Code::InvalidArgument, "wrapping_key_spec");
}

#[tokio::test]
async fn material_and_parameters_expire() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(
        &token,
        data.path(),
        &[("KMS_IMPORT_PARAMETERS_LIFETIME_SECS", "3")],
    )
    .await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let create = || CreateKeyRequest {
        name: "expiring".into(),
        origin: KeyOrigin::External as i32,
        ..Default::default()
    };
    let id = keys
        .create_key(req(&tenant, create()))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .id;
    let parameters = default_parameters(&mut keys, &tenant, &id).await;
    let material = random_bytes(24);
    let valid_to = std::time::SystemTime::now() + Duration::from_secs(2);
    let valid_to = valid_to.duration_since(std::time::UNIX_EPOCH).unwrap();
    let imported = keys
        .import_key_material(req(
            &tenant,
            ImportKeyMaterialRequest {
                key_id: id.clone(),
                import_token: parameters.import_token.clone(),
                encrypted_key_material: encrypt_material(
                    &parameters.public_key,
                    Hash::Sha256,
                    &material,
                ),
                expiration_model: ExpirationModel::KeyMaterialExpires as i32,
                valid_to: Some(prost_types::Timestamp {
                    seconds: valid_to.as_secs() as i64,
                    nanos: valid_to.subsec_nanos() as i32,
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(imported.state, KeyState::Active as i32);
    assert_eq!(imported.size_bits, 192);
    let ciphertext = wrap(&mut keys, &tenant, &id, b"short-lived").await;

    // Nobody uses the key: the sweep erases the material at valid_to.
    let mut state = imported.state;
    for _ in 0..50 {
        state = get_key(&mut keys, &tenant, &id).await.state;
        if state == KeyState::PreActivation as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state,
        KeyState::PreActivation as i32,
        "material erased at valid_to"
    );
    assert_refused(
        unwrap(&mut keys, &tenant, &id, &ciphertext).await,
        Code::FailedPrecondition,
        "PRE_ACTIVATION",
    );

    // The parameters (3 s) have expired by now too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late = keys
        .import_key_material(req(
            &tenant,
            ImportKeyMaterialRequest {
                key_id: id.clone(),
                import_token: parameters.import_token.clone(),
                encrypted_key_material: encrypt_material(
                    &parameters.public_key,
                    Hash::Sha256,
                    &material,
                ),
                expiration_model: ExpirationModel::KeyMaterialDoesNotExpire as i32,
                valid_to: None,
            },
        ))
        .await;
    assert_refused(late, Code::FailedPrecondition, "expired");
}

#[tokio::test]
async fn both_flows_survive_a_restart_in_the_middle() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let material = random_bytes(32);

    let server = TestServer::start_with_env(&token, data.path(), &[]).await;
    let (mut tokens, mut keys) = (server.import_tokens().await, server.keys().await);
    create_token(&mut tokens, &tenant, 600, 2).await;
    let import_token = get_token(&mut tokens, &tenant).await.unwrap();
    let external = create_external(&mut keys, &tenant, "ext").await;
    let parameters = default_parameters(&mut keys, &tenant, &external.id).await;
    server.kill().await;

    let server = TestServer::start_with_env(&token, data.path(), &[]).await;
    let (mut tokens, mut keys) = (server.import_tokens().await, server.keys().await);
    let retrieved = get_token(&mut tokens, &tenant).await.unwrap();
    assert_eq!(
        retrieved.remaining_retrievals, 0,
        "the retrieval count survived"
    );
    assert_eq!(retrieved.payload, import_token.payload);
    let fields = encrypt_for_token(&import_token, Hash::Sha256, &material, None);
    let secure = secure_create(&mut keys, &tenant, fields, Hash::Sha256)
        .await
        .unwrap();
    keys.import_key_material(req(
        &tenant,
        ImportKeyMaterialRequest {
            key_id: external.id.clone(),
            import_token: parameters.import_token,
            encrypted_key_material: encrypt_material(
                &parameters.public_key,
                Hash::Sha256,
                &material,
            ),
            expiration_model: ExpirationModel::KeyMaterialDoesNotExpire as i32,
            valid_to: None,
        },
    ))
    .await
    .unwrap();
    let from_secure = wrap(&mut keys, &tenant, &secure.id, b"one").await;
    let from_external = wrap(&mut keys, &tenant, &external.id, b"two").await;
    server.stop().await;

    let server = TestServer::start_with_env(&token, data.path(), &[]).await;
    let mut keys = server.keys().await;
    assert_eq!(
        unwrap(&mut keys, &tenant, &secure.id, &from_secure)
            .await
            .unwrap(),
        b"one"
    );
    assert_eq!(
        unwrap(&mut keys, &tenant, &external.id, &from_external)
            .await
            .unwrap(),
        b"two"
    );
    assert_eq!(
        open_locally(&material, &secure.id, &from_secure, &[BYOK_AAD]),
        b"one"
    );
}
