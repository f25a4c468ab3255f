//! Keys, versions, counters, listings and the expiry index.

use std::sync::Arc;

use uuid::Uuid;

use super::*;
use crate::store::{KeyPosition, PageStart, Store, StoreError};

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
    // Created in the same millisecond, in the same instance: its versions are its own.
    let mut b = key("a", 1, KeyState::Active, false);
    let b_first = version(b.id, 10);
    b.current_version = Some(b_first.id);
    store.insert_key(&b, Some(&b_first)).await.unwrap();
    let listed = store.list_versions(&rotated).await.unwrap();
    assert_eq!(listed, vec![second.clone(), first.clone()], "newest first");
    assert_eq!(
        store.get_version(&rotated, first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.get_version(&rotated, Uuid::new_v4()).await.unwrap(),
        None
    );
    assert_eq!(
        store.get_version(&b, first.id).await.unwrap(),
        None,
        "another key's version is not found"
    );
    assert_eq!(store.list_versions(&b).await.unwrap(), vec![b_first]);

    let destroyed = changed(&rotated, |k| k.state = KeyState::Destroyed);
    store
        .replace_key(&rotated, &destroyed, None, true)
        .await
        .unwrap();
    let erased = store.list_versions(&destroyed).await.unwrap();
    assert_eq!(erased.len(), 2, "versions stay, without material");
    assert!(
        erased.iter().all(|v| v.wrapped.is_none()),
        "every blob erased"
    );
}

/// `current` with a new version created at `at` made current, as stored.
async fn rotate(store: &dyn Store, current: &KeyRecord, at: i64) -> (KeyRecord, VersionRecord) {
    let next_version = version(current.id, at);
    let next = changed(current, |k| k.current_version = Some(next_version.id));
    store
        .replace_key(current, &next, Some(&next_version), false)
        .await
        .unwrap();
    (next, next_version)
}

/// Material over a key's life: a key created without it (an import pending) gets its
/// first version by a replacement, then rotations; erasure reaches every version, and
/// re-importing a version's material restores that version alone, never a second copy.
pub async fn version_material(store: Arc<dyn Store>) {
    let pending = key("m", 1, KeyState::PreActivation, false);
    store.insert_key(&pending, None).await.unwrap();
    assert_eq!(store.list_versions(&pending).await.unwrap(), vec![]);
    let first = version(pending.id, 5);
    let mut current = changed(&pending, |k| {
        k.state = KeyState::Active;
        k.current_version = Some(first.id);
    });
    store
        .replace_key(&pending, &current, Some(&first), false)
        .await
        .unwrap();
    let mut made = vec![first.clone()];
    for at in [6, 7] {
        let (next, next_version) = rotate(&*store, &current, at).await;
        current = next;
        made.push(next_version);
    }
    let newest_first: Vec<_> = made.iter().rev().cloned().collect();
    assert_eq!(store.list_versions(&current).await.unwrap(), newest_first);
    for v in &made {
        assert_eq!(
            store.get_version(&current, v.id).await.unwrap().as_ref(),
            Some(v)
        );
    }

    let destroyed = changed(&current, |k| k.state = KeyState::Destroyed);
    store
        .replace_key(&current, &destroyed, None, true)
        .await
        .unwrap();
    let erased: Vec<_> = newest_first
        .iter()
        .map(|v| VersionRecord {
            wrapped: None,
            ..v.clone()
        })
        .collect();
    assert_eq!(store.list_versions(&destroyed).await.unwrap(), erased);
    assert_eq!(
        store.get_version(&destroyed, first.id).await.unwrap(),
        Some(erased[2].clone()),
        "the first version's material is erased too"
    );

    // Re-importing the first version's material, then the second's.
    let mut current = destroyed;
    for restored in [&made[0], &made[1]] {
        let next = changed(&current, |k| k.state = KeyState::Active);
        store
            .replace_key(&current, &next, Some(restored), false)
            .await
            .unwrap();
        current = next;
    }
    let expected = vec![erased[0].clone(), made[1].clone(), made[0].clone()];
    assert_eq!(store.list_versions(&current).await.unwrap(), expected);
    let (page, total) = store
        .list_versions_page(&current, PageStart::Offset(0), 10)
        .await
        .unwrap();
    assert_eq!((page, total), (expected.clone(), 3));
    let (page, _) = store
        .list_versions_page(
            &current,
            PageStart::After(KeyPosition::of_version(&expected[1])),
            10,
        )
        .await
        .unwrap();
    assert_eq!(page, expected[2..]);
    assert_eq!(
        store
            .get_version(&current, made[0].id)
            .await
            .unwrap()
            .as_ref(),
        Some(&made[0])
    );
}

/// A key's versions as an earlier layout left them (`earlier`, oldest first, each in
/// its own entry): read in order, then rotated, erased, re-imported and paged as any
/// other key's. `key` is the key as stored.
pub async fn versions_of_an_earlier_layout(
    store: Arc<dyn Store>,
    key: KeyRecord,
    earlier: Vec<VersionRecord>,
) {
    let mut expected: Vec<_> = earlier.iter().rev().cloned().collect();
    assert_eq!(store.list_versions(&key).await.unwrap(), expected);
    let (rotated, latest) = rotate(&*store, &key, earlier.last().unwrap().created_at + 1).await;
    expected.insert(0, latest);
    assert_eq!(store.list_versions(&rotated).await.unwrap(), expected);
    for (offset, v) in expected.iter().enumerate() {
        assert_eq!(
            store.get_version(&rotated, v.id).await.unwrap().as_ref(),
            Some(v)
        );
        let (page, total) = store
            .list_versions_page(&rotated, PageStart::Offset(offset), 1)
            .await
            .unwrap();
        assert_eq!((page, total), (vec![v.clone()], expected.len() as u64));
    }
    let destroyed = changed(&rotated, |k| k.state = KeyState::Destroyed);
    store
        .replace_key(&rotated, &destroyed, None, true)
        .await
        .unwrap();
    let listed = store.list_versions(&destroyed).await.unwrap();
    assert_eq!(listed.len(), expected.len());
    assert!(
        listed.iter().all(|v| v.wrapped.is_none()),
        "every blob erased"
    );
    let oldest = earlier[0].clone();
    let restored = changed(&destroyed, |k| k.state = KeyState::Active);
    store
        .replace_key(&destroyed, &restored, Some(&oldest), false)
        .await
        .unwrap();
    let listed = store.list_versions(&restored).await.unwrap();
    assert_eq!(
        listed.len(),
        expected.len(),
        "re-imported in place, not added"
    );
    assert_eq!(listed.last(), Some(&oldest));
}

/// ListKeyVersions pages: newest first, by offset and after a position; every version
/// once; versions sharing a creation time told apart by id; another key's never.
pub async fn version_pages(store: Arc<dyn Store>) {
    let mut current = key("v", 1, KeyState::Active, false);
    let mut made = vec![version(current.id, 100)];
    store.insert_key(&current, Some(&made[0])).await.unwrap();
    for at in 1..11 {
        let (next, next_version) = rotate(&*store, &current, 100 + at / 2).await;
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
                .list_versions_page(&current, start, limit)
                .await
                .unwrap();
            assert_eq!(total, 11);
            seen.extend(page.iter().map(|v| v.id));
            match page.last() {
                Some(last) if page.len() == limit => {
                    start = PageStart::After(KeyPosition::of_version(last));
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
        .list_versions_page(&current, PageStart::Offset(4), 3)
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
