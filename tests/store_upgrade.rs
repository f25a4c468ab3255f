//! An embedded store written in the previous layout (versions kept by key id: redb
//! schema 3, sled schema 4, which also kept key records by id) is upgraded when the
//! server starts on it: every key's versions (and on sled its record) move into
//! creation order, ciphertexts made before still unwrap, and the key keeps rotating.
//! The old layout is made by editing a stopped server's database, the way the builds
//! before wrote it (before schema 8 every version had its own entry, the first too).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    ServerSetup, TestServer, TestToken, create_key, instance, req, rotate_key, unwrap_key, wrap_key,
};
use kms::domain::model::KeyState;
use kms::proto::{CreateKeyRequest, ListKeyVersionsRequest};
use kms::store::{SledStore, order_value_before_schema_8};

const MIGRATED: &str = "migrated the store's schema";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_the_previous_layout_is_upgraded_at_start_and_its_keys_still_work() {
    if common::postgres::selected() {
        eprintln!("skipped: PostgreSQL keeps its own numbered migrations");
        return;
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    let mut created = Vec::new();
    let mut wrapped = Vec::new();
    for name in ["first", "second"] {
        let key = create_key(
            &mut keys,
            &tenant,
            CreateKeyRequest {
                name: name.into(),
                ..Default::default()
            },
        )
        .await;
        for round in 0..2u8 {
            let plaintext = vec![round; 32];
            let ciphertext = wrap_key(&mut keys, &tenant, &key.id, &plaintext, &[]).await;
            wrapped.push((key.id.clone(), plaintext, ciphertext));
            rotate_key(&mut keys, &tenant, &key.id).await;
        }
        created.push(key.id);
    }
    drop(keys);
    assert!(server.stop().await.success());

    if common::redb_selected() {
        redb_back_to_schema_3(&data.path().join("kms.redb"));
    } else {
        sled_back_to_schema_4(&data.path().join("db"));
    }

    let server = start_once_released(&token, data.path()).await;
    assert_eq!(server.log_count(MIGRATED), 1, "{}", server.log());
    let mut keys = server.keys().await;
    for (id, plaintext, ciphertext) in &wrapped {
        let opened = unwrap_key(&mut keys, &tenant, id, ciphertext, &[]).await;
        assert_eq!(&opened, plaintext);
    }
    for id in &created {
        assert_eq!(version_count(&mut keys, &tenant, id).await, 3);
        rotate_key(&mut keys, &tenant, id).await;
        assert_eq!(version_count(&mut keys, &tenant, id).await, 4);
    }
    drop(keys);
    assert!(server.stop().await.success());

    // Upgraded once: the next start finds this build's schema.
    let server = start_once_released(&token, data.path()).await;
    assert_eq!(server.log_count(MIGRATED), 0, "{}", server.log());
    let mut keys = server.keys().await;
    assert_eq!(version_count(&mut keys, &tenant, &created[0]).await, 4);
}

async fn version_count(
    keys: &mut kms::proto::key_service_client::KeyServiceClient<kms::cli::connect::AuthedChannel>,
    tenant: &str,
    id: &str,
) -> u64 {
    keys.list_key_versions(req(
        tenant,
        ListKeyVersionsRequest {
            id: id.to_owned(),
            limit: Some(10),
            ..Default::default()
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .total_count
}

/// redb's schema 3: versions in `versions`, keyed by key id (the `key_versions` key
/// without its leading key creation time).
fn redb_back_to_schema_3(path: &Path) {
    use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
    type Table = TableDefinition<'static, &'static [u8], &'static [u8]>;
    const KEY_VERSIONS: Table = TableDefinition::new("key_versions");
    const VERSIONS: Table = TableDefinition::new("versions");
    const META: Table = TableDefinition::new("meta");
    const ORDER: Table = TableDefinition::new("order");
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut order = txn.open_table(ORDER).unwrap();
        let mut new = txn.open_table(KEY_VERSIONS).unwrap();
        let mut records = Vec::new();
        for entry in order.iter().unwrap() {
            let (k, v) = entry.unwrap();
            records.push((k.value().to_vec(), v.value().to_vec()));
        }
        for (k, v) in records {
            let (record, first) = order_value_before_schema_8(&k, &v).unwrap();
            order.insert(k.as_slice(), record.as_slice()).unwrap();
            let (vk, vv) = first.expect("a created key carries its first version");
            new.insert(vk.as_slice(), vv.as_slice()).unwrap();
        }
    }
    {
        let new = txn.open_table(KEY_VERSIONS).unwrap();
        let mut old = txn.open_table(VERSIONS).unwrap();
        assert_eq!(new.len().unwrap(), 6, "two keys of three versions");
        for entry in new.iter().unwrap() {
            let (k, v) = entry.unwrap();
            old.insert(&k.value()[8..], v.value()).unwrap();
        }
    }
    txn.delete_table(KEY_VERSIONS).unwrap();
    txn.open_table(META)
        .unwrap()
        .insert(b"schema_version".as_slice(), 3u32.to_be_bytes().as_slice())
        .unwrap();
    txn.commit().unwrap();
}

/// sled's schema 4: the same move, trees instead of tables; and, as sled kept them up
/// to schema 5, key records in `keys` under their id, `order` holding only their state
/// and whether they are extractable (every key here is active and not extractable).
fn sled_back_to_schema_4(path: &Path) {
    let db = loop {
        match SledStore::open_database(path) {
            Ok(db) => break db,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let new = db.open_tree("key_versions").unwrap();
    let order = db.open_tree("order").unwrap();
    for entry in order.iter() {
        let (k, v) = entry.unwrap();
        let (record, first) = order_value_before_schema_8(&k, &v).unwrap();
        order.insert(&k, record).unwrap();
        let (vk, vv) = first.expect("a created key carries its first version");
        new.insert(vk, vv).unwrap();
    }
    drop(order);
    let old = db.open_tree("versions").unwrap();
    assert_eq!(new.len(), 6, "two keys of three versions");
    for entry in new.iter() {
        let (k, v) = entry.unwrap();
        old.insert(&k[8..], v).unwrap();
    }
    drop(new);
    db.drop_tree("key_versions").unwrap();
    let (order, keys) = (
        db.open_tree("order").unwrap(),
        db.open_tree("keys").unwrap(),
    );
    assert_eq!(order.len(), 2, "two keys");
    for entry in order.iter() {
        let (k, record) = entry.unwrap();
        // instance 0x00 created-ms key-id -> instance 0x00 key-id
        let by_id = [&k[..k.len() - 24], &k[k.len() - 16..]].concat();
        keys.insert(by_id, record).unwrap();
        order
            .insert(k, &[KeyState::Active.code(), false as u8])
            .unwrap();
    }
    db.open_tree("meta")
        .unwrap()
        .insert("schema_version", &4u32.to_be_bytes())
        .unwrap();
    db.flush().unwrap();
}

/// sled lets go of its directory's lock a moment after the last handle is dropped.
async fn start_once_released(token: &TestToken, data_dir: &Path) -> TestServer {
    for _ in 0..50 {
        match TestServer::try_start(ServerSetup::new(Some(token), data_dir)).await {
            Ok(server) => return server,
            Err(failure) if failure.log.contains("lock") => {
                eprintln!("retrying: {failure}");
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(failure) => panic!("server did not start: {failure}"),
        }
    }
    panic!("the store stayed locked");
}
