//! `kms store migrate`: an embedded store's data directory (sled, or redb when the suite
//! runs on it) moves to a throwaway PostgreSQL, and a sled one to redb, with one command;
//! the same token then unwraps, from the new store, what was wrapped before the move.

mod common;

use common::postgres::TempPostgres;
use common::{
    ServerSetup, TestServer, TestToken, create_key, instance, req, rotate_key, unwrap_key, wrap_key,
};
use kms::proto::{
    CountKeysRequest, CreateImportTokenRequest, CreateKeyRequest, GetImportTokenRequest,
    ListKeyVersionsRequest,
};

fn kms(args: &[&str]) -> (bool, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    common::run_kms(&args)
}

/// Where the test moves the store.
enum Target {
    Postgres,
    Redb,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_moves_to_postgres_and_old_ciphertexts_still_unwrap() {
    if common::postgres::selected() {
        eprintln!("skipped: the source must be an embedded store");
        return;
    }
    moves_and_old_ciphertexts_still_unwrap(Target::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_moves_to_redb_and_old_ciphertexts_still_unwrap() {
    if !common::sled_selected() {
        eprintln!("skipped: the source must be a sled store");
        return;
    }
    moves_and_old_ciphertexts_still_unwrap(Target::Redb).await;
}

async fn moves_and_old_ciphertexts_still_unwrap(target: Target) {
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
        let plaintext = vec![round; 32];
        let ciphertext = wrap_key(&mut keys, &tenant, &key.id, &plaintext, &["before"]).await;
        wrapped.push((plaintext, ciphertext));
        rotate_key(&mut keys, &tenant, &key.id).await;
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

    let source = if common::redb_selected() {
        "kms.redb"
    } else {
        "db"
    };
    let from = data.path().to_str().unwrap();
    // The target's data directory: a new one, or the PostgreSQL database.
    let moved = tempfile::tempdir().unwrap();
    let _pg;
    let (to, verify, extra_env) = match target {
        Target::Postgres => {
            _pg = TempPostgres::start();
            let url = _pg.database("migrated");
            let env = vec![
                ("KMS_STORE_BACKEND".to_owned(), "postgres".to_owned()),
                ("KMS_STORE_URL".to_owned(), url.clone()),
            ];
            (
                ["--to".to_owned(), url.clone()],
                ["--store-url".to_owned(), url],
                env,
            )
        }
        Target::Redb => {
            let file = moved.path().join("kms.redb");
            let dir = moved.path().to_str().unwrap().to_owned();
            let env = vec![
                ("KMS_STORE_BACKEND".to_owned(), "redb".to_owned()),
                (
                    "KMS_STORE_PATH".to_owned(),
                    file.to_str().unwrap().to_owned(),
                ),
            ];
            (
                ["--to-redb".to_owned(), file.to_str().unwrap().to_owned()],
                ["--data-dir".to_owned(), dir],
                env,
            )
        }
    };
    let migrate = ["store", "migrate", "--from", from, &to[0], &to[1]];
    let (ok, out) = kms(&migrate);
    assert!(ok, "{out}");
    assert!(
        out.contains("migrated 1 keys (4 versions), 1 import tokens"),
        "{out}"
    );
    // Never into a store that already holds keys.
    let (ok, out) = kms(&migrate);
    assert!(!ok && out.contains("not empty"), "{out}");
    // The copied chain verifies in the target.
    let (ok, out) = kms(&["audit", "verify", &verify[0], &verify[1]]);
    assert!(ok && out.contains("audit trail intact"), "{out}");

    let set_aside = format!("{source}.migrated");
    std::fs::rename(data.path().join(source), data.path().join(set_aside)).unwrap();
    let mut setup = ServerSetup::new(Some(&token), data.path());
    setup.extra_env = extra_env;
    let server = TestServer::try_start(setup).await.unwrap();
    let mut keys = server.keys().await;
    for (plaintext, ciphertext) in &wrapped {
        let opened = unwrap_key(&mut keys, &tenant, &key.id, ciphertext, &["before"]).await;
        assert_eq!(&opened, plaintext);
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
    let (ok, out) = kms(&["audit", "verify", &verify[0], &verify[1]]);
    assert!(ok, "the chain continued after the move verifies: {out}");
}
