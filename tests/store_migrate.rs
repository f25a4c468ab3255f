//! `kms store migrate`: an embedded-default style sled data directory moves to a
//! throwaway PostgreSQL with one command, and the same token then unwraps, from the
//! database, what was wrapped before the move.

mod common;

use common::postgres::TempPostgres;
use common::{ServerSetup, TestServer, TestToken, create_key, instance, req};
use kms::proto::{
    CountKeysRequest, CreateImportTokenRequest, CreateKeyRequest, GetImportTokenRequest,
    ListKeyVersionsRequest, RotateKeyRequest, UnwrapKeyRequest, WrapKeyRequest,
};

fn kms(args: &[&str]) -> (bool, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    common::run_kms(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_moves_to_postgres_and_old_ciphertexts_still_unwrap() {
    if common::postgres::selected() {
        eprintln!("skipped: the source must be a sled store");
        return;
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    let key = create_key(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "moved".into(),
            ..Default::default()
        },
    )
    .await;
    let mut wrapped = Vec::new();
    for round in 0..3u8 {
        let response = keys
            .wrap_key(req(
                &tenant,
                WrapKeyRequest {
                    id: key.id.clone(),
                    plaintext: Some(vec![round; 32]),
                    aad: vec!["before".into()],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        wrapped.push((vec![round; 32], response.ciphertext));
        keys.rotate_key(req(
            &tenant,
            RotateKeyRequest {
                id: key.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    }
    server
        .import_tokens()
        .await
        .create_import_token(req(
            &tenant,
            CreateImportTokenRequest {
                expiration: Some(600),
                max_allowed_retrievals: Some(3),
            },
        ))
        .await
        .unwrap();
    server.stop().await;

    let pg = TempPostgres::start();
    let url = pg.database("migrated");
    let from = data.path().to_str().unwrap();
    let (ok, out) = kms(&["store", "migrate", "--from", from, "--to", &url]);
    assert!(ok, "{out}");
    assert!(
        out.contains("migrated 1 keys (4 versions), 1 import tokens"),
        "{out}"
    );
    // Never into a store that already holds keys.
    let (ok, out) = kms(&["store", "migrate", "--from", from, "--to", &url]);
    assert!(!ok && out.contains("not empty"), "{out}");
    // The copied chain verifies in the database.
    let (ok, out) = kms(&["audit", "verify", "--store-url", &url]);
    assert!(ok && out.contains("audit trail intact"), "{out}");

    std::fs::rename(data.path().join("db"), data.path().join("db.migrated")).unwrap();
    let mut setup = ServerSetup::new(Some(&token), data.path());
    setup.extra_env = vec![("KMS_STORE_URL".into(), url.clone())];
    let server = TestServer::try_start(setup).await.unwrap();
    let mut keys = server.keys().await;
    for (plaintext, ciphertext) in &wrapped {
        let opened = keys
            .unwrap_key(req(
                &tenant,
                UnwrapKeyRequest {
                    id: key.id.clone(),
                    ciphertext: ciphertext.clone(),
                    aad: vec!["before".into()],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&opened.plaintext, plaintext);
    }
    let versions = keys
        .list_key_versions(req(
            &tenant,
            ListKeyVersionsRequest {
                id: key.id.clone(),
                limit: Some(10),
                offset: 0,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions.total_count, 4);
    let count = keys
        .count_keys(req(&tenant, CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 1, "counters rebuilt in the target");
    let token_state = server
        .import_tokens()
        .await
        .get_import_token(req(&tenant, GetImportTokenRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        token_state.remaining_retrievals, 2,
        "the token moved with its retrieval count (3, one used now)"
    );
    server.stop().await;
    let (ok, out) = kms(&["audit", "verify", "--store-url", &url]);
    assert!(ok, "the chain continued after the move verifies: {out}");
}
