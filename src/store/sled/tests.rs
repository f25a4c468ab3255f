//! sled-only checks: storage parameters kept, schema upgrades on real databases.

use uuid::Uuid;

use super::*;
use crate::domain::model::{KeyFilter, KeyOrigin, KeyRecord, KeyState, VersionRecord};
use crate::hsm::{WrapFormat, WrappedKey};
use crate::store::conformance;
use crate::store::{KeyPosition, KeyStore, PageStart};

/// A database created with sled's default storage parameters (earlier builds) opens
/// with them; a new one gets this build's.
#[test]
fn databases_keep_the_storage_parameters_they_were_created_with() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    drop(::sled::Config::new().path(&old).open().unwrap());
    assert_eq!(created_with(&old), Some((512 * 1024, false)));
    let store = loop {
        match SledStore::open(&old) {
            Ok(store) => break store,
            Err(StoreError::Unavailable { .. }) => std::thread::sleep(Duration::from_millis(20)),
            Err(other) => panic!("{other}"),
        }
    };
    assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
    let new = dir.path().join("new");
    drop(SledStore::open(&new).unwrap());
    assert_eq!(created_with(&new), Some((SEGMENT_BYTES, true)));
}

/// A schema-2 database (JSON records, versions by key id) opens at this build's
/// schema with every record intact, rewritten in the binary form, and its version
/// moved into creation order.
#[tokio::test]
async fn a_schema_2_database_is_rewritten_in_the_binary_form() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let key = KeyRecord {
        schema: 1,
        revision: 3,
        id: Uuid::new_v4(),
        instance: "inst".into(),
        name: "old".into(),
        description: String::new(),
        state: KeyState::Active,
        extractable: false,
        created_at: 1_700_000_000_000,
        updated_at: 1_700_000_000_000,
        expires_at: None,
        origin: KeyOrigin::Generated,
        size_bits: 256,
        current_version: Some(Uuid::new_v4()),
        imported: false,
        expiration_model: None,
        valid_to: None,
        destroyed_at: None,
        check_value: None,
    };
    let version = VersionRecord {
        schema: 1,
        key_id: key.id,
        id: key.current_version.unwrap(),
        created_at: key.created_at,
        wrapped: Some(WrappedKey {
            format: WrapFormat::Rfc5649,
            blob: vec![0xab; 40],
        }),
    };
    {
        let store = SledStore::open(&path).unwrap();
        let trees = store.trees().unwrap();
        store.insert_key(&key, Some(&version)).await.unwrap();
        // Back to what schema 2 wrote: the record, in JSON, kept by id.
        records_back_by_id(&trees, &key);
        let kk = [b"inst".as_slice(), &[0], key.id.as_bytes()].concat();
        let json = kv::encode_key_value(3, &serde_json::to_vec(&key).unwrap());
        trees.keys.insert(&kk, json).unwrap();
        // Schema 2 kept versions by key id, in `versions`.
        trees.key_versions.clear().unwrap();
        trees
            .db
            .open_tree(SCHEMA_4_VERSIONS)
            .unwrap()
            .insert(
                kv::version_key(&version),
                serde_json::to_vec(&version).unwrap(),
            )
            .unwrap();
        store.force_schema_version(2).unwrap();
    }
    let store = reopened(&path);
    assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
    let trees = store.trees().unwrap();
    let (_, key_value) = trees.order.iter().next().unwrap().unwrap();
    assert!(!codec::is_json(&key_value[8..]), "{key_value:?}");
    let (_, created) = trees.keys.iter().next().unwrap().unwrap();
    assert_eq!(*created, key.created_at.to_be_bytes());
    let (_, version_value) = trees.key_versions.iter().next().unwrap().unwrap();
    assert!(!codec::is_json(&version_value), "{version_value:?}");
    assert!(!trees.db.tree_names().contains(&SCHEMA_4_VERSIONS.into()));
    let read = store.get_key("inst", key.id).await.unwrap().unwrap();
    assert_eq!(
        read,
        KeyRecord {
            schema: 1,
            ..key.clone()
        }
    );
    assert_eq!(store.list_versions(&read).await.unwrap(), vec![version]);
    let (page, total) = store
        .list_keys("inst", &KeyFilter::default(), PageStart::Offset(0), 10)
        .await
        .unwrap();
    assert_eq!((page.len(), total), (1, 1));
}

/// A schema-4 database (versions kept by key id) opens with every key's versions
/// moved under its creation time, two keys created in the same millisecond keeping
/// their own, and the old tree gone.
#[tokio::test]
async fn a_schema_4_database_opens_with_versions_in_creation_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let key = |created_at| conformance::key("inst", created_at, KeyState::Active, false);
    let keys = [
        key(1_700_000_000_000),
        key(1_700_000_000_000),
        key(1_700_000_000_500),
    ];
    let versions: Vec<Vec<VersionRecord>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (0..=i as i64)
                .map(|n| conformance::version(k.id, k.created_at + n))
                .collect()
        })
        .collect();
    {
        let store = SledStore::open(&path).unwrap();
        let trees = store.trees().unwrap();
        let old = trees.db.open_tree(SCHEMA_4_VERSIONS).unwrap();
        for (k, vs) in keys.iter().zip(&versions) {
            store.insert_key(k, None).await.unwrap();
            records_back_by_id(&trees, k);
            for v in vs {
                old.insert(kv::version_key(v), codec::encode_version(v))
                    .unwrap();
            }
        }
        store.force_schema_version(4).unwrap();
    }
    let store = reopened(&path);
    assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
    for (k, vs) in keys.iter().zip(&versions) {
        let read = store.get_key("inst", k.id).await.unwrap().unwrap();
        let mut newest_first = vs.clone();
        newest_first.reverse();
        assert_eq!(store.list_versions(&read).await.unwrap(), newest_first);
        let last = vs.last().unwrap();
        assert_eq!(
            store.get_version(&read, last.id).await.unwrap().as_ref(),
            Some(last)
        );
    }
    let trees = store.trees().unwrap();
    assert_eq!(trees.key_versions.len(), 6);
    assert!(!trees.db.tree_names().contains(&SCHEMA_4_VERSIONS.into()));
}

/// A schema-5 database (records kept by id, `order` holding only their state and
/// whether they are extractable) opens with every record in listing order, including
/// one a migration interrupted before had moved already; GetKey, filtered ListKeys and
/// a cursor page read them, and the next change lands where they are.
#[tokio::test]
async fn a_schema_5_database_opens_with_records_in_listing_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut keys: Vec<KeyRecord> = (0..5)
        .map(|i| {
            let state = if i % 2 == 0 {
                KeyState::Active
            } else {
                KeyState::Suspended
            };
            conformance::key("inst", 1_700_000_000_000 + i / 2, state, false)
        })
        .collect();
    keys.sort_by_key(|k| (k.created_at, k.id));
    {
        let store = SledStore::open(&path).unwrap();
        let trees = store.trees().unwrap();
        for (i, k) in keys.iter().enumerate() {
            store.insert_key(k, None).await.unwrap();
            // The second key as an interrupted move left it.
            if i != 1 {
                records_back_by_id(&trees, k);
            }
        }
        store.force_schema_version(5).unwrap();
    }
    let store = reopened(&path);
    assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
    for k in &keys {
        assert_eq!(store.get_key("inst", k.id).await.unwrap().as_ref(), Some(k));
    }
    let trees = store.trees().unwrap();
    assert!(trees.keys.iter().all(|e| e.unwrap().1.len() == 8));
    let active = KeyFilter {
        states: vec![KeyState::Active],
        ..Default::default()
    };
    let (page, total) = store
        .list_keys("inst", &active, PageStart::Offset(0), 10)
        .await
        .unwrap();
    let expected: Vec<_> = keys
        .iter()
        .filter(|k| k.state == KeyState::Active)
        .cloned()
        .collect();
    assert_eq!((page, total), (expected, 3));
    let (page, _) = store
        .list_keys(
            "inst",
            &KeyFilter::default(),
            PageStart::After(KeyPosition {
                created_at: keys[1].created_at,
                id: keys[1].id,
            }),
            2,
        )
        .await
        .unwrap();
    assert_eq!(page, keys[2..4].to_vec());
    let renamed = KeyRecord {
        revision: keys[3].revision + 1,
        name: "renamed".into(),
        ..keys[3].clone()
    };
    store
        .replace_key(&keys[3], &renamed, None, false)
        .await
        .unwrap();
    assert_eq!(
        store.get_key("inst", renamed.id).await.unwrap(),
        Some(renamed)
    );
}

/// Rewrites a key as schemas up to 5 kept it: its record in `keys`, under its id, and
/// in `order` only its state and whether it is extractable.
fn records_back_by_id(trees: &Trees, key: &KeyRecord) {
    let record = trees.order.remove(kv::order_key(key)).unwrap().unwrap();
    trees
        .keys
        .insert(kv::key_key(&key.instance, key.id), record)
        .unwrap();
    trees
        .order
        .insert(
            kv::order_key(key),
            &[key.state.code(), key.extractable as u8],
        )
        .unwrap();
}

/// The store at `path` opened again once the test's earlier handle has let go: sled
/// releases its lock a moment after the last handle drops.
fn reopened(path: &Path) -> SledStore {
    loop {
        match SledStore::open(path) {
            Ok(store) => break store,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A schema-6 database's audit blocks, kept as written, read back unchanged after the
/// upgrade to 7; blocks appended afterwards are stored as frames and read back as
/// written too, and the walk of a backup sees both.
#[tokio::test]
async fn blocks_written_before_schema_7_read_as_they_were_beside_framed_ones() {
    use crate::store::{AuditStore, ChainEnd, SealedBlocks};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let old_block = b"\0\0\0\x05older".repeat(4);
    {
        let store = SledStore::open(&path).unwrap();
        let trees = store.trees().unwrap();
        trees
            .audit
            .insert(1u64.to_be_bytes(), old_block.as_slice())
            .unwrap();
        let meta = trees.db.open_tree("meta").unwrap();
        meta.insert(SCHEMA_KEY, &6u32.to_be_bytes()).unwrap();
        trees.db.flush().unwrap();
    }
    let store = SledStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
    let new_block = b"\0\0\0\x05newer".repeat(40);
    let sealed = new_block.clone();
    let seal = move |_| SealedBlocks {
        blocks: vec![(5, sealed.clone())],
        end: Some(ChainEnd {
            seq: 5,
            hash: [7; 32],
        }),
    };
    store.append_audit(&seal).await.unwrap();
    let stored = store
        .trees()
        .unwrap()
        .audit
        .get(5u64.to_be_bytes())
        .unwrap()
        .unwrap();
    assert_ne!(
        stored.as_ref(),
        new_block.as_slice(),
        "a new block is stored as a frame"
    );
    assert!(stored.len() < new_block.len());
    assert_eq!(
        store.audit_blocks_from(0, 10).await.unwrap(),
        vec![(1, old_block.clone()), (5, new_block.clone())]
    );
    assert_eq!(
        store.last_audit_block().await.unwrap(),
        Some((5, new_block))
    );
    assert_eq!(
        store.audit_blocks_before(Some(5), 10).await.unwrap(),
        vec![(1, old_block)]
    );
}

/// A new key's first version rides in its record: `key_versions` holds only the
/// versions rotated in after it. A schema-7 database, where every version has its own
/// entry, opens as it is and its keys' versions read, rotate, erase and re-import as
/// any other's.
#[tokio::test]
async fn versions_written_before_schema_8_read_beside_carried_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut k = conformance::key("inst", 1_700_000_000_000, KeyState::Active, false);
    let first = conformance::version(k.id, k.created_at);
    k.current_version = Some(first.id);
    let second = conformance::version(k.id, k.created_at + 1);
    let rotated = KeyRecord {
        revision: 1,
        current_version: Some(second.id),
        ..k.clone()
    };
    {
        let store = SledStore::open(&path).unwrap();
        store.insert_key(&k, Some(&first)).await.unwrap();
        let trees = store.trees().unwrap();
        assert_eq!(trees.key_versions.len(), 0, "the first version is carried");
        store
            .replace_key(&k, &rotated, Some(&second), false)
            .await
            .unwrap();
        assert_eq!(trees.key_versions.len(), 1, "a rotated-in version is not");
        // As schema 7 wrote it: the record alone, the first version in its own entry.
        let at = kv::order_key(&rotated);
        let raw = trees.order.get(&at).unwrap().unwrap();
        let carried = kv::carried_version(&rotated, &raw).unwrap();
        assert_eq!(carried.as_ref(), Some(&first));
        trees.order.insert(&at, kv::key_value(&rotated)).unwrap();
        let (vk, vv) = kv::key_version_entry(&rotated, &first).unwrap();
        trees.key_versions.insert(vk, vv).unwrap();
        drop(trees);
        store.force_schema_version(7).unwrap();
    }
    let store = reopened(&path);
    assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
    let read = store.get_key("inst", k.id).await.unwrap().unwrap();
    assert_eq!(read, rotated);
    conformance::versions_of_an_earlier_layout(
        std::sync::Arc::new(store),
        read,
        vec![first, second],
    )
    .await;
}
