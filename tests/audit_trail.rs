//! The audit trail end to end: `kms audit verify` on a real data directory, tampering
//! with copies of it (a changed, deleted, reordered record), kill -9 under load,
//! durability of read records in both modes, retention, and time-driven changes
//! recorded as `system`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestServer, TestToken, audit_events, instance, req};
use kms::audit::{AuditRecord, decode_block, encode_block};
use kms::proto::*;
use kms::store::SledStore;

/// Runs `kms audit verify` on `data_dir`'s store (its sled database, or its PostgreSQL
/// database when the suite runs on PostgreSQL); returns (success, stdout + stderr).
fn verify(data_dir: &Path) -> (bool, String) {
    common::audit_verify(data_dir)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of `data_dir`'s database whose audit records `change` edits (all records,
/// oldest first, written back as one block).
fn tampered_copy(data_dir: &Path, change: impl FnOnce(&mut Vec<AuditRecord>)) -> tempfile::TempDir {
    if common::redb_selected() {
        tampered_redb_copy(data_dir, change)
    } else {
        tampered_sled_copy(data_dir, change)
    }
}

/// The same below redb's store: its `audit` table holds each block as a zstd frame, as
/// sled's `audit` tree does.
fn tampered_redb_copy(
    data_dir: &Path,
    change: impl FnOnce(&mut Vec<AuditRecord>),
) -> tempfile::TempDir {
    use redb::{ReadableDatabase, ReadableTable};
    const AUDIT: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("audit");
    let copy = tempfile::tempdir().unwrap();
    let file = copy.path().join("kms.redb");
    std::fs::copy(data_dir.join("kms.redb"), &file).unwrap();
    let db = redb::Database::open(&file).unwrap();
    let mut records: Vec<AuditRecord> = {
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(AUDIT).unwrap();
        table
            .iter()
            .unwrap()
            .flat_map(|item| {
                let frame = item.unwrap().1.value().to_vec();
                let block = zstd::stream::decode_all(frame.as_slice()).unwrap();
                decode_block(&block).unwrap()
            })
            .map(|(record, _)| record)
            .collect()
    };
    change(&mut records);
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(AUDIT).unwrap();
        table.retain(|_, _| false).unwrap();
        let frame = zstd::block::compress(&encode_block(&records), 1).unwrap();
        table
            .insert(1u64.to_be_bytes().as_slice(), frame.as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
    copy
}

fn tampered_sled_copy(
    data_dir: &Path,
    change: impl FnOnce(&mut Vec<AuditRecord>),
) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&data_dir.join("db"), &copy.path().join("db"));
    let db = SledStore::open_database(&copy.path().join("db")).unwrap();
    let tree = db.open_tree("audit").unwrap();
    let mut records: Vec<AuditRecord> = tree
        .iter()
        .flat_map(|item| {
            let frame = item.unwrap().1.to_vec();
            let block = zstd::stream::decode_all(frame.as_slice()).unwrap();
            decode_block(&block).unwrap()
        })
        .map(|(record, _)| record)
        .collect();
    change(&mut records);
    tree.clear().unwrap();
    let frame = zstd::block::compress(&encode_block(&records), 1).unwrap();
    tree.insert(1u64.to_be_bytes(), frame).unwrap();
    db.flush().unwrap();
    copy
}

fn at(records: &mut [AuditRecord], seq: u64) -> &mut AuditRecord {
    records.iter_mut().find(|r| r.seq == seq).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_deleted_or_reordered_record_is_found_at_the_right_place() {
    if common::postgres::selected() {
        eprintln!(
            "skipped: edits an embedded database; the chain logic is the same for every store"
        );
        return;
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    for n in 0..10 {
        common::create_key(
            &mut keys,
            &tenant,
            CreateKeyRequest {
                name: format!("k{n}"),
                ..Default::default()
            },
        )
        .await;
    }
    assert!(server.stop().await.success());

    let (ok, text) = verify(data.path());
    assert!(ok, "{text}");
    assert!(
        text.contains("audit trail intact: 10 records (1..10)"),
        "{text}"
    );

    type Tamper = Box<dyn FnOnce(&mut Vec<AuditRecord>)>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "a field changed",
            Box::new(|records| at(records, 5).principal = "mallory".into()),
            "audit record 5: its fields do not match its hash",
        ),
        (
            "a field changed and its hash recomputed",
            Box::new(|records| {
                // The forger cannot fix the next record's link without rewriting
                // everything after it: record 6 still points at the original.
                let r = at(records, 5);
                r.code = 7;
                r.hash = r.compute_hash();
            }),
            "audit record 6: does not carry the hash of the record before it",
        ),
        (
            "a record deleted",
            Box::new(|records| records.retain(|r| r.seq != 5)),
            "audit record 5: missing",
        ),
        (
            "two records swapped",
            Box::new(|records| records.swap(4, 5)),
            "audit record 5: out of order",
        ),
        (
            "a successor relinked",
            Box::new(|records| at(records, 6).prev_hash = [0x11; 32]),
            "audit record 6",
        ),
        (
            "the newest records cut off",
            Box::new(|records| records.retain(|r| r.seq <= 8)),
            "audit record 9: missing: the chain's recorded end is record 10",
        ),
    ];
    for (what, change, expected) in cases {
        let copy = tampered_copy(data.path(), change);
        let (ok, text) = verify(copy.path());
        assert!(!ok, "{what}: verify passed");
        assert!(text.contains(expected), "{what}: {text}");
    }
    // The original is still intact.
    assert!(verify(data.path()).0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_leaves_a_chain_that_verifies_with_every_acknowledged_change() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, data.path()).await;
    let keys = server.keys().await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..8 {
        let (mut keys, tenant, stop) = (keys.clone(), tenant.clone(), Arc::clone(&stop));
        workers.push(tokio::spawn(async move {
            let mut created = Vec::new();
            for n in 0..10_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let answer = keys
                    .create_key(req(
                        &tenant,
                        CreateKeyRequest {
                            name: format!("w{worker}-{n}"),
                            ..Default::default()
                        },
                    ))
                    .await;
                match answer {
                    Ok(r) => {
                        let id = r.into_inner().key.unwrap().id;
                        // Reads in between, so the trail interleaves both kinds.
                        let _ = keys
                            .wrap_key(req(
                                &tenant,
                                WrapKeyRequest {
                                    id: id.clone(),
                                    plaintext: None,
                                    aad: vec![],
                                },
                            ))
                            .await;
                        created.push(id);
                    }
                    Err(_) => break,
                }
            }
            created
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill().await;
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for worker in workers {
        acknowledged.extend(worker.await.unwrap());
    }
    assert!(
        acknowledged.len() >= 20,
        "only {} keys created",
        acknowledged.len()
    );

    let (ok, text) = verify(data.path());
    assert!(ok, "{text}");
    let server = TestServer::start(&token, data.path()).await;
    let recorded: std::collections::HashSet<String> = audit_events(
        &server,
        &tenant,
        ListAuditEventsRequest {
            operation: "CreateKey".into(),
            code: Some(0),
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .map(|e| e.key_id)
    .collect();
    for id in &acknowledged {
        assert!(
            recorded.contains(id),
            "acknowledged CreateKey {id} has no record"
        );
    }
    assert!(server.stop().await.success());
    assert!(
        verify(data.path()).0,
        "still intact after a restart appended to it"
    );
}

fn named(name: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        name: name.into(),
        ..Default::default()
    }
}

/// Wraps `n` times and returns how many were acknowledged.
async fn wrap_many(server: &TestServer, tenant: &str, key: &str, n: usize) -> usize {
    let mut keys = server.keys().await;
    for _ in 0..n {
        keys.wrap_key(req(
            tenant,
            WrapKeyRequest {
                id: key.into(),
                plaintext: None,
                aad: vec![],
            },
        ))
        .await
        .unwrap();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_records_are_durable_before_the_answer_or_within_the_flush_interval() {
    let token = TestToken::create();
    for (sync_reads, pause) in [
        ("true", Duration::ZERO),
        ("false", Duration::from_millis(1200)),
    ] {
        let data = tempfile::tempdir().unwrap();
        let tenant = instance();
        let server = TestServer::start_with_env(
            &token,
            data.path(),
            &[("KMS_AUDIT_SYNC_READS", sync_reads)],
        )
        .await;
        let mut keys = server.keys().await;
        let key = common::create_key(&mut keys, &tenant, named("k")).await.id;
        let wrapped = wrap_many(&server, &tenant, &key, 50).await;
        // Past the background flush (every 200 ms) in the batched mode; at once with sync
        // reads.
        tokio::time::sleep(pause).await;
        server.kill().await;
        let server = TestServer::start(&token, data.path()).await;
        let recorded = audit_events(
            &server,
            &tenant,
            ListAuditEventsRequest {
                operation: "WrapKey".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(recorded.len(), wrapped, "sync_reads={sync_reads}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bounds_the_trail_and_what_remains_verifies() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server =
        TestServer::start_with_env(&token, data.path(), &[("KMS_AUDIT_MAX_RECORDS", "40")]).await;
    let mut keys = server.keys().await;
    let key = common::create_key(&mut keys, &tenant, named("k")).await.id;
    // In bursts, so the records land in several blocks (retention drops whole blocks).
    for _ in 0..5 {
        wrap_many(&server, &tenant, &key, 30).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut held = usize::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        held = audit_events(&server, &tenant, ListAuditEventsRequest::default())
            .await
            .len();
        if held < 100 {
            break;
        }
    }
    assert!(
        held < 100,
        "{held} of over 150 records held; server log:\n{}",
        server.log()
    );
    assert!(server.stop().await.success());
    let (ok, text) = verify(data.path());
    assert!(ok, "{text}");
    assert!(
        !text.contains("(1.."),
        "the oldest records are gone: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_driven_changes_are_recorded_as_system() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    let soon = std::time::SystemTime::now() + Duration::from_secs(2);
    let key = common::create_key(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "short-lived".into(),
            expiration_date: Some(prost_types::Timestamp::from(soon)),
            ..Default::default()
        },
    )
    .await
    .id;
    let mut found = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        found = audit_events(
            &server,
            &tenant,
            ListAuditEventsRequest {
                operation: "ExpireKey".into(),
                ..Default::default()
            },
        )
        .await;
        if !found.is_empty() {
            break;
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].principal, "system");
    assert_eq!(found[0].key_id, key);
    assert_eq!(found[0].code, 0);
    assert!(found[0].peer.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_audit_events_filters_and_pages_newest_first() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    let key = common::create_key(&mut keys, &tenant, named("k")).await.id;
    wrap_many(&server, &tenant, &key, 25).await;
    let other = common::create_key(&mut keys, &tenant, named("k")).await.id;
    let mut audit = server.audit().await;
    let mut pages = Vec::new();
    let mut request = ListAuditEventsRequest {
        key_id: key.clone(),
        operation: "WrapKey".into(),
        page_size: 10,
        ..Default::default()
    };
    loop {
        let page = audit
            .list_audit_events(req(&tenant, request.clone()))
            .await
            .unwrap()
            .into_inner();
        pages.push(page.events.len());
        let sequences: Vec<u64> = page.events.iter().map(|e| e.sequence).collect();
        assert!(sequences.windows(2).all(|w| w[0] > w[1]), "newest first");
        assert!(
            page.events
                .iter()
                .all(|e| e.key_id == key && e.operation == "WrapKey")
        );
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    assert_eq!(pages, [10, 10, 5]);
    // A token belongs to its query.
    let first = audit
        .list_audit_events(req(
            &tenant,
            ListAuditEventsRequest {
                page_size: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let status = audit
        .list_audit_events(req(
            &tenant,
            ListAuditEventsRequest {
                page_size: 1,
                key_id: other,
                page_token: first.next_page_token,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("page_token"));
    let status = audit
        .list_audit_events(req(
            &tenant,
            ListAuditEventsRequest {
                page_size: 5000,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(status.message().contains("page_size"));
}
