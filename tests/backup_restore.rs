//! `kms backup` and `kms restore` end to end: a backup taken from a running server
//! while callers keep creating keys restores into a fresh data directory on the same
//! token, where every ciphertext made before the backup unwraps and the audit trail
//! verifies; a restore onto another token, or from a damaged file, is refused and
//! writes nothing. On sled and, with KMS_TEST_STORE=postgres, on PostgreSQL.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{
    ServerSetup, TestServer, TestToken, admin_token_path, create_key, instance, req, unwrap_key,
};
use kms::proto::{
    CreateImportTokenRequest, CreateKeyRequest, GetImportTokenRequest, ListKeyVersionsRequest,
};

/// Runs `kms` with the token's environment and, on PostgreSQL, `data_dir`'s database as
/// the store; returns whether it succeeded and what it printed.
fn kms_for(token: &TestToken, data_dir: &Path, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kms"));
    command.args(args).env_remove("KMS_STORE_URL");
    if common::postgres::selected() {
        command.env("KMS_STORE_URL", common::store_url(data_dir));
    } else if common::sled_selected() {
        command.env("KMS_STORE_BACKEND", "sled");
    }
    for (name, value) in &token.env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The `[hsm]` configuration the test server of `data_dir` ran with.
fn config_of(data_dir: &Path) -> String {
    data_dir.join("kms.toml").display().to_string()
}

fn backup(token: &TestToken, server: &TestServer, out: &Path) -> (bool, String) {
    kms_for(
        token,
        &server.data_dir,
        &[
            "backup",
            "--addr",
            &server.url(),
            "--token-file",
            admin_token_path(&server.data_dir).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    )
}

fn restore(token: &TestToken, backup: &Path, data_dir: &Path, config: &str) -> (bool, String) {
    kms_for(
        token,
        data_dir,
        &[
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--config",
            config,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_under_load_restores_into_a_working_service() {
    let token = TestToken::create();
    let original = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, original.path()).await;
    let mut keys = server.keys().await;

    // Keys with several versions, and ciphertexts under each version.
    let mut wrapped = Vec::new();
    let mut key_ids = Vec::new();
    for k in 0..5u8 {
        let key = create_key(
            &mut keys,
            &tenant,
            CreateKeyRequest {
                name: format!("before-{k}"),
                ..Default::default()
            },
        )
        .await;
        for round in 0..3u8 {
            let plaintext = vec![k * 16 + round; 32];
            let ciphertext =
                common::wrap_key(&mut keys, &tenant, &key.id, &plaintext, &["backup"]).await;
            wrapped.push((key.id.clone(), plaintext, ciphertext));
            common::rotate_key(&mut keys, &tenant, &key.id).await;
        }
        key_ids.push(key.id);
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

    // Callers keep creating keys in another instance while the backup is taken.
    let busy = instance();
    let stop = Arc::new(AtomicBool::new(false));
    let created = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut keys = server.keys().await;
        let (busy, stop, created) = (busy.clone(), Arc::clone(&stop), Arc::clone(&created));
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                keys.create_key(req(
                    &busy,
                    CreateKeyRequest {
                        name: "during".into(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
                created.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    while created.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let file = original.path().join("kms.backup");
    let (ok, out) = tokio::task::block_in_place(|| backup(&token, &server, &file));
    let during_backup = created.load(Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(ok, "{out}");
    assert!(out.contains("backup written: "), "{out}");
    assert!(file.exists() && !Path::new(&format!("{}.partial", file.display())).exists());
    assert!(
        created.load(Ordering::Relaxed) > during_backup,
        "writes go on once the backup is taken"
    );
    server.stop().await;

    // A fresh data directory on the same token.
    let restored = tempfile::tempdir().unwrap();
    let (ok, out) = restore(&token, &file, restored.path(), &config_of(original.path()));
    assert!(ok, "{out}");
    assert!(out.contains("restored "), "{out}");
    let (ok, out) = restore(&token, &file, restored.path(), &config_of(original.path()));
    assert!(
        !ok && out.contains("not empty"),
        "a restore never merges: {out}"
    );
    let (ok, out) = common::audit_verify(restored.path());
    assert!(ok && out.contains("audit trail intact"), "{out}");

    let server = TestServer::try_start(ServerSetup::new(Some(&token), restored.path()))
        .await
        .unwrap();
    let mut keys = server.keys().await;
    for (key, plaintext, ciphertext) in &wrapped {
        let opened = unwrap_key(&mut keys, &tenant, key, ciphertext, &["backup"]).await;
        assert_eq!(&opened, plaintext);
    }
    for key in &key_ids {
        let versions = keys
            .list_key_versions(req(
                &tenant,
                ListKeyVersionsRequest {
                    id: key.clone(),
                    limit: Some(10),
                    offset: 0,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(versions.total_count, 4);
    }
    assert_eq!(
        common::count_keys(&server, &tenant).await,
        5,
        "counters rebuilt"
    );
    // The busy instance holds what was created up to the snapshot: at least what had
    // been created when the backup started, at most what was created in all.
    let busy_count = common::count_keys(&server, &busy).await;
    assert!(
        (20..=created.load(Ordering::Relaxed)).contains(&busy_count),
        "{busy_count}"
    );
    // The import token came along.
    server
        .import_tokens()
        .await
        .get_import_token(req(&tenant, GetImportTokenRequest {}))
        .await
        .unwrap();
    // New keys work in the restored service.
    create_key(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "after".into(),
            ..Default::default()
        },
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_onto_another_token_or_from_a_damaged_file_is_refused() {
    let token = TestToken::create();
    let original = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, original.path()).await;
    create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "one".into(),
            ..Default::default()
        },
    )
    .await;
    let file = original.path().join("kms.backup");
    let (ok, out) = tokio::task::block_in_place(|| backup(&token, &server, &file));
    assert!(ok, "{out}");
    server.stop().await;

    // Another token with its own master key (made by a first start).
    let other = TestToken::create();
    let elsewhere = tempfile::tempdir().unwrap();
    TestServer::start(&other, elsewhere.path())
        .await
        .stop()
        .await;
    let target = tempfile::tempdir().unwrap();
    let (ok, out) = restore(&other, &file, target.path(), &config_of(elsewhere.path()));
    assert!(!ok && out.contains("another master key"), "{out}");
    assert_nothing_restored(target.path()).await;

    // A file cut short is refused before anything is written.
    let bytes = std::fs::read(&file).unwrap();
    let cut = original.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() - 16]).unwrap();
    let (ok, out) = restore(&token, &cut, target.path(), &config_of(original.path()));
    assert!(!ok && out.contains("damaged"), "{out}");
    assert_nothing_restored(target.path()).await;
}

async fn assert_nothing_restored(data_dir: &Path) {
    if common::postgres::selected() {
        let store = common::open_store(data_dir).await;
        assert!(!store.has_keys().await.unwrap());
    } else {
        for name in ["db", "db.restoring", "kms.redb", "kms.redb.restoring"] {
            assert!(!data_dir.join(name).exists(), "{name}");
        }
    }
}
