//! The audit chain, snapshots, and schema versions.

use std::future::Future;
use std::sync::Arc;

use super::*;
use crate::store::{ChainEnd, SealedBlocks, Store, StoreError, StoreItem};

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
    // Every read gives back a block's bytes exactly as they were appended.
    for (seq, block) in &blocks {
        assert!(
            block.len() == 3 && block.iter().all(|b| *b == block[0]),
            "block {seq}"
        );
    }
    let last = store.last_audit_block().await.unwrap();
    assert_eq!(last.as_ref().map(|(seq, _)| *seq), Some(22));
    assert_eq!(last.as_ref(), blocks.last());
    for (seq, block) in &blocks {
        assert_eq!(
            store.audit_blocks_from(*seq, 1).await.unwrap()[0].1,
            *block,
            "block {seq}"
        );
    }
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

/// A snapshot holds every record once, in the documented order: the chain's end and
/// anchor first, keys with their versions oldest first, import state, audit blocks
/// oldest first.
pub async fn snapshot_holds_everything(store: Arc<dyn Store>) {
    let mut rotated = key("s", 1, KeyState::Active, false);
    let first = version(rotated.id, 10);
    rotated.current_version = Some(first.id);
    store.insert_key(&rotated, Some(&first)).await.unwrap();
    let second = version(rotated.id, 20);
    let next = changed(&rotated, |k| k.current_version = Some(second.id));
    store
        .replace_key(&rotated, &next, Some(&second), false)
        .await
        .unwrap();
    let plain = key("t", 2, KeyState::Suspended, true);
    store.insert_key(&plain, None).await.unwrap();
    let import_token = token("s");
    store
        .swap_import_token("s", None, Some(&import_token))
        .await
        .unwrap();
    let key_pair = pair(2048, 3);
    store.push_key_pair(&key_pair).await.unwrap();
    for tag in 0..3u8 {
        store
            .append_audit(&|end| sealed_after(end, 2, tag))
            .await
            .unwrap();
    }
    let anchor = ChainEnd {
        seq: 2,
        hash: [9; 32],
    };
    store.prune_audit_blocks(1, anchor).await.unwrap();

    let (sink, mut records) = tokio::sync::mpsc::channel(4);
    let walk = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.snapshot(sink).await })
    };
    let mut items = Vec::new();
    while let Some(item) = records.recv().await {
        items.push(item);
    }
    walk.await.unwrap().unwrap();

    let end = store.audit_chain_end().await.unwrap();
    assert_eq!(
        items[0],
        StoreItem::AuditChain {
            end,
            anchor: Some(anchor)
        },
        "the chain's end and anchor come first"
    );
    let mut keys: Vec<(KeyRecord, Vec<crate::domain::model::VersionRecord>)> = items
        .iter()
        .filter_map(|item| match item {
            StoreItem::Key { key, versions } => Some((key.clone(), versions.clone())),
            _ => None,
        })
        .collect();
    keys.sort_by_key(|(k, _)| k.created_at);
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].0.id, next.id);
    assert_eq!(keys[0].0.current_version, Some(second.id));
    assert_eq!(keys[0].1, vec![first, second], "versions oldest first");
    assert_eq!(keys[1].0.id, plain.id);
    assert!(keys[1].1.is_empty());
    assert!(items.contains(&StoreItem::ImportToken(
        store.get_import_token("s").await.unwrap().unwrap()
    )));
    assert!(items.contains(&StoreItem::KeyPair(key_pair)));
    let blocks: Vec<u64> = items
        .iter()
        .filter_map(|item| match item {
            StoreItem::AuditBlock { first_seq, .. } => Some(*first_seq),
            _ => None,
        })
        .collect();
    assert_eq!(blocks, vec![3, 5], "what pruning left, oldest first");
    let last_key = items
        .iter()
        .rposition(|i| matches!(i, StoreItem::Key { .. }))
        .unwrap();
    let first_block = items
        .iter()
        .position(|i| matches!(i, StoreItem::AuditBlock { .. }))
        .unwrap();
    assert!(last_key < first_block, "keys before audit blocks");
}
