//! `kms store compact`: a stopped server's embedded store (sled, or redb when the suite
//! runs on it) is compacted with one command, is refused while the server runs, and
//! afterwards serves every key, version and ciphertext as before, with its audit trail
//! intact.

mod common;

use common::{TestServer, TestToken, create_key, instance, req, rotate_key, unwrap_key, wrap_key};
use kms::proto::{CountKeysRequest, CreateKeyRequest, ListKeyVersionsRequest};

fn kms(args: &[&str]) -> (bool, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    common::run_kms(&args)
}

/// The "before -> after bytes" of the command's report.
fn sizes(report: &str) -> (u64, u64) {
    let (_, rest) = report.rsplit_once(": ").expect("a report line");
    let mut words = rest.split_whitespace();
    let before = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("->"));
    (before, words.next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_store_serves_every_key_and_its_trail_verifies() {
    if common::postgres::selected() {
        eprintln!("skipped: PostgreSQL compacts itself (VACUUM FULL)");
        return;
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();
    let tenant = instance();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    let mut created = Vec::new();
    for n in 0..300 {
        let key = create_key(
            &mut keys,
            &tenant,
            CreateKeyRequest {
                name: format!("k{n}"),
                ..Default::default()
            },
        )
        .await;
        created.push(key.id);
    }
    let mut wrapped = Vec::new();
    for (round, id) in created.iter().step_by(50).enumerate() {
        let plaintext = vec![round as u8; 32];
        let ciphertext = wrap_key(&mut keys, &tenant, id, &plaintext, &["before"]).await;
        wrapped.push((id.clone(), plaintext, ciphertext));
    }
    rotate_key(&mut keys, &tenant, &created[0]).await;

    // Refused while the server holds the store, which goes on serving.
    let (ok, out) = kms(&["store", "compact", "--data-dir", &dir]);
    assert!(!ok && out.contains("a running server holds it"), "{out}");
    let count = keys
        .count_keys(req(&tenant, CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 300);
    server.stop().await;

    // What an interrupted compaction left beside a sled database is cleared first.
    let staging = data.path().join("db.compacting");
    if common::sled_selected() {
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("db"), b"half a copy").unwrap();
    }
    let (ok, out) = kms(&["store", "compact", "--data-dir", &dir]);
    assert!(ok && out.contains("compacted"), "{out}");
    let report = out
        .lines()
        .find(|l| l.starts_with("compacted ") && l.contains("bytes on disk"))
        .expect(&out);
    let (before, after) = sizes(report);
    assert!(after < before, "replaced only by a smaller copy: {out}");
    assert!(!staging.exists(), "nothing is left beside the database");

    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    for (id, plaintext, ciphertext) in &wrapped {
        let opened = unwrap_key(&mut keys, &tenant, id, ciphertext, &["before"]).await;
        assert_eq!(&opened, plaintext);
    }
    let count = keys
        .count_keys(req(&tenant, CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 300, "counters as they were");
    let versions = keys
        .list_key_versions(req(
            &tenant,
            ListKeyVersionsRequest {
                id: created[0].clone(),
                limit: Some(10),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions.total_count, 2);
    // A key created after compaction lands beside the others.
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
    let (ok, out) = common::audit_verify(data.path());
    assert!(ok && out.contains("audit trail intact"), "{out}");
}
