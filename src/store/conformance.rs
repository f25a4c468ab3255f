//! The store contract as executable checks: every backend runs all of them
//! (`tests/store_conformance.rs`: sled in a temporary directory, PostgreSQL in a
//! throwaway cluster). Each check takes a fresh, empty store and panics with a message
//! naming what broke.

use std::future::Future;
use std::sync::Arc;

use uuid::Uuid;

use super::{ChainEnd, KeyPosition, PageStart, SealedBlocks, Store, StoreError};
use crate::domain::model::{
    ImportParametersRecord, ImportTokenRecord, KeyFilter, KeyOrigin, KeyRecord, KeyState,
    RECORD_SCHEMA, VersionRecord,
};
use crate::hsm::oaep::OaepHash;
use crate::hsm::{RsaKeyPair, WrapFormat, WrappedKey};

fn key(instance: &str, created_at: i64, state: KeyState, extractable: bool) -> KeyRecord {
    KeyRecord {
        schema: RECORD_SCHEMA,
        revision: 0,
        id: Uuid::new_v4(),
        instance: instance.into(),
        name: "k".into(),
        description: String::new(),
        state,
        extractable,
        created_at,
        updated_at: created_at,
        expires_at: None,
        origin: KeyOrigin::Generated,
        size_bits: 256,
        current_version: None,
        imported: false,
        expiration_model: None,
        valid_to: None,
        destroyed_at: None,
        check_value: None,
    }
}

fn version(key_id: Uuid, created_at: i64) -> VersionRecord {
    VersionRecord {
        schema: RECORD_SCHEMA,
        key_id,
        id: Uuid::new_v4(),
        created_at,
        wrapped: Some(WrappedKey {
            format: WrapFormat::Rfc5649,
            blob: vec![created_at as u8; 40],
        }),
    }
}

fn changed(key: &KeyRecord, change: impl FnOnce(&mut KeyRecord)) -> KeyRecord {
    let mut next = key.clone();
    next.revision = key.revision + 1;
    change(&mut next);
    next
}

fn pair(bits: u32, tag: u8) -> RsaKeyPair {
    RsaKeyPair {
        bits,
        public_key: vec![tag],
        private_key: WrappedKey {
            format: WrapFormat::Rfc5649,
            blob: vec![tag; 8],
        },
    }
}

fn token(instance: &str) -> ImportTokenRecord {
    ImportTokenRecord {
        schema: RECORD_SCHEMA,
        revision: 0,
        instance: instance.into(),
        id: Uuid::new_v4(),
        created_at: 1,
        expires_at: 2,
        max_retrievals: 2,
        remaining_retrievals: 2,
        nonce: vec![0; 12],
        key_pair: Some(pair(4096, 9)),
    }
}

fn all() -> KeyFilter {
    KeyFilter::default()
}

fn only(state: KeyState) -> KeyFilter {
    KeyFilter {
        states: vec![state],
        extractable: None,
    }
}

/// Keys: insert, read, instance isolation, counters, duplicate ids.
pub async fn keys_and_counters(store: Arc<dyn Store>) {
    assert!(!store.has_keys().await.unwrap(), "a new store has no keys");
    let a = key("a", 1, KeyState::Active, false);
    store.insert_key(&a, None).await.unwrap();
    store
        .insert_key(&key("a", 2, KeyState::Active, true), None)
        .await
        .unwrap();
    store
        .insert_key(&key("b", 3, KeyState::Active, true), None)
        .await
        .unwrap();
    assert!(store.has_keys().await.unwrap());
    assert_eq!(store.get_key("a", a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(
        store.get_key("b", a.id).await.unwrap(),
        None,
        "a key is invisible from another instance"
    );
    assert_eq!(store.count_keys("a", &all()).await.unwrap(), 2);
    assert_eq!(store.count_keys("b", &all()).await.unwrap(), 1);
    let root_only = KeyFilter {
        states: vec![],
        extractable: Some(false),
    };
    assert_eq!(store.count_keys("a", &root_only).await.unwrap(), 1);
    assert!(
        matches!(store.insert_key(&a, None).await, Err(StoreError::Conflict)),
        "a key id is inserted once"
    );
    assert_eq!(store.count_keys("a", &all()).await.unwrap(), 2);
}

/// Compare-and-swap by revision: the current revision wins, a stale one changes nothing.
pub async fn replace_by_revision(store: Arc<dyn Store>) {
    let a = key("a", 1, KeyState::Active, false);
    store.insert_key(&a, None).await.unwrap();
    let suspended = changed(&a, |k| k.state = KeyState::Suspended);
    store
        .replace_key(&a, &suspended, None, false)
        .await
        .unwrap();
    let read = store.get_key("a", a.id).await.unwrap().unwrap();
    assert_eq!(read, suspended, "the replacement is what is read back");
    assert_eq!(read.revision, 1);
    assert_eq!(
        store
            .count_keys("a", &only(KeyState::Active))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .count_keys("a", &only(KeyState::Suspended))
            .await
            .unwrap(),
        1
    );

    let stale = changed(&a, |k| k.state = KeyState::Destroyed);
    assert!(
        matches!(
            store.replace_key(&a, &stale, None, true).await,
            Err(StoreError::Conflict)
        ),
        "a replacement computed from an old revision is refused"
    );
    let skipping = KeyRecord {
        revision: suspended.revision + 2,
        ..suspended.clone()
    };
    assert!(matches!(
        store.replace_key(&suspended, &skipping, None, false).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.get_key("a", a.id).await.unwrap(), Some(suspended));
    assert_eq!(
        store
            .count_keys("a", &only(KeyState::Destroyed))
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.count_keys("a", &all()).await.unwrap(), 1);
}

/// Concurrent read-modify-write of one key: every change lands, none is lost.
pub async fn concurrent_updates_lose_nothing(store: Arc<dyn Store>) {
    let a = key("a", 1, KeyState::Active, false);
    store.insert_key(&a, None).await.unwrap();
    let writers = (0..8).map(|_| {
        let store = Arc::clone(&store);
        let id = a.id;
        tokio::spawn(async move {
            loop {
                let current = store.get_key("a", id).await.unwrap().unwrap();
                let next = changed(&current, |k| k.description.push('x'));
                match store.replace_key(&current, &next, None, false).await {
                    Ok(()) => return,
                    Err(StoreError::Conflict) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
            }
        })
    });
    for writer in writers.collect::<Vec<_>>() {
        writer.await.unwrap();
    }
    // A cached read may lag another process, never this store's own writes after a
    // conflict: read until the revision settles (bounded by the cache's TTL).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let read = store.get_key("a", a.id).await.unwrap().unwrap();
        if read.revision == 8 || std::time::Instant::now() > deadline {
            assert_eq!(read.revision, 8, "eight changes, eight revisions");
            assert_eq!(read.description, "xxxxxxxx", "no change was lost");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(store.count_keys("a", &all()).await.unwrap(), 1);
}

/// Versions: first version with the key, one more per rotation, newest first, erasure.
pub async fn versions(store: Arc<dyn Store>) {
    let mut a = key("a", 1, KeyState::Active, false);
    let first = version(a.id, 10);
    a.current_version = Some(first.id);
    store.insert_key(&a, Some(&first)).await.unwrap();
    let second = version(a.id, 20);
    let rotated = changed(&a, |k| k.current_version = Some(second.id));
    store
        .replace_key(&a, &rotated, Some(&second), false)
        .await
        .unwrap();
    let listed = store.list_versions(a.id).await.unwrap();
    assert_eq!(listed, vec![second.clone(), first.clone()], "newest first");
    assert_eq!(
        store.get_version(a.id, first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.get_version(a.id, Uuid::new_v4()).await.unwrap(), None);
    assert_eq!(
        store.get_version(Uuid::new_v4(), first.id).await.unwrap(),
        None
    );

    let destroyed = changed(&rotated, |k| k.state = KeyState::Destroyed);
    store
        .replace_key(&rotated, &destroyed, None, true)
        .await
        .unwrap();
    let erased = store.list_versions(a.id).await.unwrap();
    assert_eq!(erased.len(), 2, "versions stay, without material");
    assert!(
        erased.iter().all(|v| v.wrapped.is_none()),
        "every blob erased"
    );
}

/// ListKeyVersions pages: newest first, by offset and after a position; every version
/// once; versions sharing a creation time told apart by id; another key's never.
pub async fn version_pages(store: Arc<dyn Store>) {
    let mut current = key("v", 1, KeyState::Active, false);
    let mut made = vec![version(current.id, 100)];
    store.insert_key(&current, Some(&made[0])).await.unwrap();
    for at in 1..11 {
        let next_version = version(current.id, 100 + at / 2);
        let next = changed(&current, |k| k.current_version = Some(next_version.id));
        store
            .replace_key(&current, &next, Some(&next_version), false)
            .await
            .unwrap();
        current = next;
        made.push(next_version);
    }
    let other = key("v", 2, KeyState::Active, false);
    store
        .insert_key(&other, Some(&version(other.id, 105)))
        .await
        .unwrap();
    made.sort_by_key(|v| std::cmp::Reverse((v.created_at, *v.id.as_bytes())));
    let expected: Vec<Uuid> = made.iter().map(|v| v.id).collect();
    for limit in [1, 3, 11, 20] {
        let mut seen = Vec::new();
        let mut start = PageStart::Offset(0);
        loop {
            let (page, total) = store
                .list_versions_page(current.id, start, limit)
                .await
                .unwrap();
            assert_eq!(total, 11);
            seen.extend(page.iter().map(|v| v.id));
            match page.last() {
                Some(last) if page.len() == limit => {
                    start = PageStart::After(KeyPosition {
                        created_at: last.created_at,
                        id: last.id,
                    });
                }
                _ => break,
            }
        }
        assert_eq!(
            seen, expected,
            "limit {limit}: each version once, newest first"
        );
    }
    let (by_offset, _) = store
        .list_versions_page(current.id, PageStart::Offset(4), 3)
        .await
        .unwrap();
    assert_eq!(
        by_offset.iter().map(|v| v.id).collect::<Vec<_>>(),
        expected[4..7]
    );
}

/// ListKeys: creation order, offset and limit, filters, the total.
pub async fn list_pages(store: Arc<dyn Store>) {
    let mut made = Vec::new();
    for at in 1..=5 {
        let state = if at % 2 == 0 {
            KeyState::Suspended
        } else {
            KeyState::Active
        };
        let k = key("a", at, state, at == 5);
        store.insert_key(&k, None).await.unwrap();
        made.push(k);
    }
    store
        .insert_key(&key("b", 0, KeyState::Active, false), None)
        .await
        .unwrap();
    let (page, total) = store
        .list_keys("a", &all(), PageStart::Offset(1), 2)
        .await
        .unwrap();
    assert_eq!(total, 5);
    assert_eq!(
        page,
        made[1..3].to_vec(),
        "offset 1, limit 2, creation order"
    );
    let (page, total) = store
        .list_keys("a", &only(KeyState::Active), PageStart::Offset(0), 10)
        .await
        .unwrap();
    assert_eq!(total, 3);
    assert_eq!(
        page.iter().map(|k| k.created_at).collect::<Vec<_>>(),
        vec![1, 3, 5]
    );
    let extractable = KeyFilter {
        states: vec![KeyState::Active],
        extractable: Some(true),
    };
    let (page, total) = store
        .list_keys("a", &extractable, PageStart::Offset(0), 10)
        .await
        .unwrap();
    assert_eq!((page.len(), total), (1, 1));
    let (page, _) = store
        .list_keys("a", &all(), PageStart::Offset(10), 10)
        .await
        .unwrap();
    assert!(page.is_empty(), "past the end is an empty page");
}

/// ListKeys after a position: every matching key once, in order, whatever the page
/// size; keys created since the position are found, keys of other instances never; two
/// keys created in the same millisecond are told apart by id.
pub async fn list_pages_after_a_position(store: Arc<dyn Store>) {
    let mut made = Vec::new();
    for at in 0..23 {
        // Pairs of keys share a creation time.
        let state = if at % 3 == 0 {
            KeyState::Suspended
        } else {
            KeyState::Active
        };
        let k = key("c", 100 + at / 2, state, false);
        store.insert_key(&k, None).await.unwrap();
        made.push(k);
    }
    for at in 0..4 {
        store
            .insert_key(&key("c-other", 100 + at, KeyState::Active, false), None)
            .await
            .unwrap();
    }
    made.sort_by_key(|k| (k.created_at, *k.id.as_bytes()));
    for (filter, limit) in [(all(), 1), (all(), 4), (only(KeyState::Active), 5)] {
        let expected: Vec<Uuid> = made
            .iter()
            .filter(|k| filter.matches(k.state, k.extractable))
            .map(|k| k.id)
            .collect();
        let mut seen = Vec::new();
        let mut start = PageStart::Offset(0);
        loop {
            let (page, total) = store.list_keys("c", &filter, start, limit).await.unwrap();
            assert_eq!(total, expected.len() as u64);
            assert!(page.len() <= limit);
            seen.extend(page.iter().map(|k| k.id));
            match page.last() {
                Some(last) if page.len() == limit => {
                    start = PageStart::After(KeyPosition::of(last));
                }
                _ => break,
            }
        }
        assert_eq!(seen, expected, "limit {limit}: each key once, in order");
    }
    // A key created after the position is on a later page.
    let (first, _) = store
        .list_keys("c", &all(), PageStart::Offset(0), 3)
        .await
        .unwrap();
    let later = key("c", 500, KeyState::Active, false);
    store.insert_key(&later, None).await.unwrap();
    let after = KeyPosition::of(first.last().unwrap());
    let (rest, _) = store
        .list_keys("c", &all(), PageStart::After(after), 100)
        .await
        .unwrap();
    assert_eq!(rest.len(), made.len() - 3 + 1);
    assert_eq!(rest.last().unwrap().id, later.id);
    // After the last key: an empty page.
    let (none, _) = store
        .list_keys("c", &all(), PageStart::After(KeyPosition::of(&later)), 10)
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// The expiry index follows expiration dates and state changes.
pub async fn expiry_index(store: Arc<dyn Store>) {
    let mut a = key("a", 1, KeyState::Active, false);
    a.expires_at = Some(100);
    store.insert_key(&a, None).await.unwrap();
    store
        .insert_key(&key("a", 2, KeyState::Active, false), None)
        .await
        .unwrap();
    assert!(store.due_for_expiry(99, 10).await.unwrap().is_empty());
    assert_eq!(
        store.due_for_expiry(100, 10).await.unwrap(),
        vec![("a".to_string(), a.id)]
    );
    let deactivated = changed(&a, |k| k.state = KeyState::Deactivated);
    store
        .replace_key(&a, &deactivated, None, false)
        .await
        .unwrap();
    assert!(store.due_for_expiry(1000, 10).await.unwrap().is_empty());
}

/// Import tokens: created once, changed from what was read, no ABA after replacement.
pub async fn import_tokens(store: Arc<dyn Store>) {
    let first = token("a");
    store
        .swap_import_token("a", None, Some(&first))
        .await
        .unwrap();
    assert!(
        matches!(
            store.swap_import_token("a", None, Some(&token("a"))).await,
            Err(StoreError::Conflict)
        ),
        "a second creation from 'none' loses"
    );
    let read = store.get_import_token("a").await.unwrap().unwrap();
    assert_eq!(read, first);
    let used = ImportTokenRecord {
        remaining_retrievals: 1,
        revision: 1,
        ..first.clone()
    };
    store
        .swap_import_token("a", Some(&first), Some(&used))
        .await
        .unwrap();
    assert!(
        matches!(
            store.swap_import_token("a", Some(&first), None).await,
            Err(StoreError::Conflict)
        ),
        "a stale revision loses"
    );
    // Replaced by a new token (revision 0 again): a holder of the first one still loses.
    let second = token("a");
    store
        .swap_import_token("a", Some(&used), Some(&second))
        .await
        .unwrap();
    let stale = ImportTokenRecord {
        revision: 1,
        ..first.clone()
    };
    assert!(matches!(
        store
            .swap_import_token("a", Some(&first), Some(&stale))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.get_import_token("a").await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(store.get_import_token("b").await.unwrap(), None);
    assert_eq!(store.import_tokens().await.unwrap(), vec![second.clone()]);
    store
        .swap_import_token("a", Some(&second), None)
        .await
        .unwrap();
    assert_eq!(store.get_import_token("a").await.unwrap(), None);
}

/// Two callers racing for a token's last retrieval: exactly one wins.
pub async fn last_retrieval_goes_once(store: Arc<dyn Store>) {
    let mut t = token("a");
    t.remaining_retrievals = 1;
    store.swap_import_token("a", None, Some(&t)).await.unwrap();
    let racers = (0..8).map(|_| {
        let store = Arc::clone(&store);
        let t = t.clone();
        tokio::spawn(async move {
            let next = ImportTokenRecord {
                remaining_retrievals: 0,
                revision: t.revision + 1,
                ..t.clone()
            };
            store.swap_import_token("a", Some(&t), Some(&next)).await
        })
    });
    let mut won = 0;
    for racer in racers.collect::<Vec<_>>() {
        match racer.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1, "exactly one swap from the same revision succeeds");
}

/// Import parameters and the RSA pair pool; clearing import state.
pub async fn import_parameters_and_pairs(store: Arc<dyn Store>) {
    let parameters = |expires_at| ImportParametersRecord {
        schema: RECORD_SCHEMA,
        key_id: Uuid::new_v4(),
        instance: "a".into(),
        id: Uuid::new_v4(),
        algorithm: OaepHash::Sha256,
        created_at: 1,
        expires_at,
        key_pair: pair(2048, 1),
    };
    let (early, late) = (parameters(10), parameters(20));
    store.put_import_parameters(&early).await.unwrap();
    store.put_import_parameters(&late).await.unwrap();
    let replaced = ImportParametersRecord {
        id: Uuid::new_v4(),
        ..early.clone()
    };
    store.put_import_parameters(&replaced).await.unwrap();
    assert_eq!(
        store.get_import_parameters(early.key_id).await.unwrap(),
        Some(replaced)
    );
    assert_eq!(
        store.expired_import_parameters(15).await.unwrap(),
        vec![early.key_id]
    );
    store.remove_import_parameters(early.key_id).await.unwrap();
    assert_eq!(
        store.get_import_parameters(early.key_id).await.unwrap(),
        None
    );

    store.push_key_pair(&pair(2048, 1)).await.unwrap();
    store.push_key_pair(&pair(2048, 2)).await.unwrap();
    store.push_key_pair(&pair(4096, 3)).await.unwrap();
    assert_eq!(store.count_key_pairs(2048).await.unwrap(), 2);
    let takers = (0..6).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.take_key_pair(2048).await.unwrap() })
    });
    let mut taken = Vec::new();
    for taker in takers.collect::<Vec<_>>() {
        taken.extend(taker.await.unwrap());
    }
    taken.sort_by_key(|p| p.public_key.clone());
    assert_eq!(
        taken,
        vec![pair(2048, 1), pair(2048, 2)],
        "each pair taken once"
    );
    assert_eq!(store.count_key_pairs(4096).await.unwrap(), 1);

    store
        .swap_import_token("a", None, Some(&token("a")))
        .await
        .unwrap();
    assert_eq!(
        store.clear_import_state().await.unwrap(),
        3,
        "one token, one parameters record, one pair"
    );
    assert_eq!(store.get_import_token("a").await.unwrap(), None);
    assert_eq!(store.count_key_pairs(4096).await.unwrap(), 0);
}

fn sealed_after(end: Option<ChainEnd>, count: u64, tag: u8) -> SealedBlocks {
    let first = end.map_or(1, |e| e.seq + 1);
    SealedBlocks {
        blocks: vec![(first, vec![tag; count as usize])],
        end: Some(ChainEnd {
            seq: first + count - 1,
            hash: [tag; 32],
        }),
    }
}

/// The audit chain: appends continue the stored end (also when racing), reads by
/// range, pruning keeps an anchor that only moves forward.
pub async fn audit_chain(store: Arc<dyn Store>) {
    assert_eq!(store.audit_chain_end().await.unwrap(), None);
    assert_eq!(store.last_audit_block().await.unwrap(), None);
    let appenders = (0..8u8).map(|tag| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .append_audit(&|end| sealed_after(end, 3, tag))
                .await
                .unwrap()
        })
    });
    for appender in appenders.collect::<Vec<_>>() {
        appender.await.unwrap();
    }
    let blocks = store.audit_blocks_from(0, 100).await.unwrap();
    let firsts: Vec<u64> = blocks.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        firsts,
        (0..8).map(|i| 1 + 3 * i).collect::<Vec<_>>(),
        "racing appends each continue where the last ended: no gap, no overlap"
    );
    let end = store.audit_chain_end().await.unwrap().unwrap();
    assert_eq!(end.seq, 24);
    assert_eq!(
        store.last_audit_block().await.unwrap().map(|(seq, _)| seq),
        Some(22)
    );
    let newest_two = store.audit_blocks_before(Some(22), 2).await.unwrap();
    assert_eq!(
        newest_two.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![19, 16]
    );
    assert_eq!(store.audit_blocks_before(None, 1).await.unwrap()[0].0, 22);
    assert_eq!(store.audit_blocks_from(10, 2).await.unwrap()[0].0, 10);

    let anchor = ChainEnd {
        seq: 6,
        hash: [7; 32],
    };
    assert_eq!(store.prune_audit_blocks(4, anchor).await.unwrap(), 2);
    assert_eq!(store.audit_anchor().await.unwrap(), Some(anchor));
    assert_eq!(store.audit_blocks_from(0, 1).await.unwrap()[0].0, 7);
    // A prune that arrives late (an older cut) must not move the anchor back.
    let older = ChainEnd {
        seq: 3,
        hash: [1; 32],
    };
    store.prune_audit_blocks(1, older).await.unwrap();
    assert_eq!(store.audit_anchor().await.unwrap(), Some(anchor));
    store.sync().await.unwrap();
}

/// Schema versions: a fresh store is at the version this build writes; a store marked
/// with a newer one is refused when opened again.
pub async fn newer_schema_is_refused<Open, Opened, Mark, Marked>(
    open: Open,
    mark_newer: Mark,
    known: u32,
) where
    Open: Fn() -> Opened,
    Opened: Future<Output = Result<Arc<dyn Store>, StoreError>>,
    Mark: FnOnce(Arc<dyn Store>) -> Marked,
    Marked: Future<Output = ()>,
{
    let store = open().await.expect("a fresh store opens");
    mark_newer(store).await;
    match open().await {
        Err(StoreError::SchemaTooNew {
            found, known: k, ..
        }) => {
            assert_eq!(k, known);
            assert!(found > known);
        }
        Err(e) => panic!("a newer schema gives SchemaTooNew, not {e}"),
        Ok(_) => panic!("a store with a newer schema opened"),
    }
}
