//! What a newcomer and an operator see: the embedded default's first start (admin token
//! owner-only, where the log says), a Viewer made with `kms token create` that can wrap
//! and unwrap with one key and nothing else, owner-only files in the data directory,
//! and no secret in the log (at debug, every crate) or the store.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{ServerSetup, TestServer, TestToken, instance, kms_token, req};
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::*;
use tonic::Code;

/// Every file and directory under `dir` with a mode granting group or others anything.
fn loose_modes(dir: &Path) -> Vec<String> {
    let mut loose = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.permissions().mode() & 0o077 != 0 {
            loose.push(format!(
                "{} {:o}",
                path.display(),
                meta.permissions().mode()
            ));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    loose
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_starts_the_embedded_default_and_gives_an_app_a_viewer_token() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("kms-data");
    // A data directory an older build left world-readable.
    std::fs::create_dir_all(dir.join("db")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("db"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let server = TestServer::try_start(ServerSetup::new(None, &dir))
        .await
        .unwrap();
    let token_file = dir.join("admin.token");
    let log = server.log();
    assert!(
        log.contains("first start: created principal admin") && log.contains("admin.token"),
        "{log}"
    );
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        log.contains("plaintext"),
        "the embedded default says it serves plaintext"
    );

    // The admin makes a key; the app gets a Viewer token for that instance.
    let tenant = instance();
    let mut admin = server.keys().await;
    let key = common::create_key(
        &mut admin,
        &tenant,
        CreateKeyRequest {
            name: "app-root".into(),
            ..Default::default()
        },
    )
    .await
    .id;
    let printed = kms_token(&[
        "create",
        "--data-dir",
        dir.to_str().unwrap(),
        "--principal",
        "app",
        "--role",
        &format!("{tenant}=Viewer"),
    ]);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "the token alone on stdout: {printed:?}");
    let app_token = lines[0].to_owned();
    assert!(app_token.starts_with("kms_") && app_token.len() == 68);
    server.hangup();
    assert!(server.log_eventually("tokens file reloaded").await);

    let mut app = KeyServiceClient::new(server.channel_with(&app_token).await);
    let wrapped = app
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: key.clone(),
                plaintext: None,
                aad: vec!["orders".into()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let opened = app
        .unwrap_key(req(
            &tenant,
            UnwrapKeyRequest {
                id: key.clone(),
                ciphertext: wrapped.ciphertext.clone(),
                aad: vec!["orders".into()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, wrapped.plaintext);
    // Nothing else.
    let denied = [
        app.create_key(req(&tenant, CreateKeyRequest::default()))
            .await
            .map(|_| ()),
        app.get_key(req(&tenant, GetKeyRequest { id: key.clone() }))
            .await
            .map(|_| ()),
        app.list_keys(req(&tenant, ListKeysRequest::default()))
            .await
            .map(|_| ()),
        app.delete_key(req(&tenant, DeleteKeyRequest { id: key.clone() }))
            .await
            .map(|_| ()),
        app.wrap_key(req(
            &instance(),
            WrapKeyRequest {
                id: key.clone(),
                plaintext: None,
                aad: vec![],
            },
        ))
        .await
        .map(|_| ()),
    ];
    for outcome in denied {
        assert_eq!(outcome.unwrap_err().code(), Code::PermissionDenied);
    }
    assert!(loose_modes(&dir).is_empty(), "{:?}", loose_modes(&dir));
    assert!(server.stop().await.success());

    // A second start keeps the admin token; the trail of all of it verifies.
    let before = std::fs::read_to_string(&token_file).unwrap();
    let server = TestServer::try_start(ServerSetup::new(None, &dir))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), before);
    assert!(!server.log().contains("first start"));
    assert!(server.stop().await.success());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kms"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(output.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_at_debug_or_the_store() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start_with_env(&token, data.path(), &[("KMS_LOG", "debug")]).await;
    let viewer = common::create_principal(data.path(), "viewer", &[&format!("{tenant}=Viewer")]);
    server.hangup();
    assert!(server.log_eventually("tokens file reloaded").await);

    let marker = uuid::Uuid::new_v4().simple().to_string();
    let plaintext = format!("plaintext-{marker}");
    let payload = format!("payload-{}", &marker[..24]);
    let aad = format!("aad-{marker}");
    let mut admin = server.keys().await;
    let root = common::create_key(
        &mut admin,
        &tenant,
        CreateKeyRequest {
            name: "root".into(),
            ..Default::default()
        },
    )
    .await
    .id;
    let standard = common::create_key(
        &mut admin,
        &tenant,
        CreateKeyRequest {
            name: "standard".into(),
            extractable: true,
            payload: Some(payload.clone().into_bytes()),
            ..Default::default()
        },
    )
    .await
    .id;
    let got = admin
        .get_key(req(&tenant, GetKeyRequest { id: standard }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.payload.unwrap(), payload.as_bytes());
    let mut app = KeyServiceClient::new(server.channel_with(&viewer).await);
    let wrapped = app
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: root.clone(),
                plaintext: Some(plaintext.clone().into_bytes()),
                aad: vec![aad.clone()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let generated = app
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: root.clone(),
                plaintext: None,
                aad: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    app.unwrap_key(req(
        &tenant,
        UnwrapKeyRequest {
            id: root.clone(),
            ciphertext: wrapped.ciphertext.clone(),
            aad: vec![aad.clone()],
        },
    ))
    .await
    .unwrap();
    // Refused and failing calls log too: a wrong aad, a wrong token.
    let _ = app
        .unwrap_key(req(
            &tenant,
            UnwrapKeyRequest {
                id: root,
                ciphertext: wrapped.ciphertext.clone(),
                aad: vec![format!("{aad}-wrong")],
            },
        ))
        .await
        .unwrap_err();
    let log_file = server.log_file.clone();
    let admin_token = server.admin_token.clone();
    assert!(server.stop().await.success());

    let pin = token.user_pin();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("plaintext", plaintext.clone().into_bytes()),
        ("plaintext (hex)", hex::encode(&plaintext).into_bytes()),
        ("standard key payload", payload.clone().into_bytes()),
        ("payload (hex)", hex::encode(&payload).into_bytes()),
        ("aad", aad.clone().into_bytes()),
        (
            "generated data key (hex)",
            hex::encode(&generated).into_bytes(),
        ),
        (
            "ciphertext (hex)",
            hex::encode(&wrapped.ciphertext).into_bytes(),
        ),
        ("admin token", admin_token.clone().into_bytes()),
        ("viewer token", viewer.clone().into_bytes()),
        ("token hex part", viewer.as_bytes()[4..].to_vec()),
        ("user PIN", pin.clone().into_bytes()),
    ];
    let log = std::fs::read(&log_file).unwrap();
    assert!(log.len() > 1000, "a debug log was written");
    let contains =
        |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    for (what, secret) in &secrets {
        assert!(!contains(&log, secret), "{what} appears in the log");
    }
    // The store (metadata, blobs, audit trail) holds none of the values either; the
    // ciphertext is the client's and not stored, the payload only KEK-wrapped.
    // On PostgreSQL: every file of the cluster (tables, WAL) the suite's servers use.
    let mut stack = if common::postgres::selected() {
        vec![common::postgres::shared().socket_dir().join("data")]
    } else if common::redb_selected() {
        vec![data.path().join("kms.redb")]
    } else {
        vec![data.path().join("db")]
    };
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for (what, secret) in &secrets {
            if *what == "user PIN" {
                continue; // a short digit string may occur by chance in binary data
            }
            assert!(
                !contains(&bytes, secret),
                "{what} appears in {}",
                path.display()
            );
        }
    }
}
