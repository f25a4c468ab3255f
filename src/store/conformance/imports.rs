//! Import tokens, import parameters and the RSA pair pool.

use std::sync::Arc;

use uuid::Uuid;

use super::*;
use crate::store::{Store, StoreError};

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
