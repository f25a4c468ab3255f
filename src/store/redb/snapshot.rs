//! A consistent snapshot of the redb store: one read transaction, walked on a blocking
//! thread at the pace of the channel's reader. Nothing waits for it: writers go on
//! committing after the moment it sees.

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable};

use super::audit::{block_entry, meta_entry};
use super::keys::versions_of;
use super::{AUDIT, IMPORT_PARAMETERS, IMPORT_TOKENS, ORDER, RSA_POOL, RedbStore, VERSIONS};
use crate::store::kv::{
    ANCHOR_KEY, END_KEY, carried_version, decode, decode_key_value, decode_token, parse_order_key,
};
use crate::store::{Snapshot, SnapshotSink, StoreError, StoreItem};

#[async_trait]
impl Snapshot for RedbStore {
    async fn snapshot(&self, sink: SnapshotSink) -> Result<(), StoreError> {
        self.scan(move |_, txn| walk(txn, &sink)).await
    }
}

/// Sends every record; stops quietly once the reader has gone.
fn walk(txn: &ReadTransaction, sink: &SnapshotSink) -> Result<(), StoreError> {
    let send = |item: StoreItem| sink.blocking_send(item).is_ok();
    let chain = StoreItem::AuditChain {
        end: meta_entry(txn, END_KEY, "audit chain end")?,
        anchor: meta_entry(txn, ANCHOR_KEY, "audit anchor")?,
    };
    if !send(chain) {
        return Ok(());
    }
    let versions = txn.open_table(VERSIONS)?;
    for entry in txn.open_table(ORDER)?.iter()? {
        let (k, v) = entry?;
        let (instance, id) = parse_order_key(k.value())?;
        let key = decode_key_value(&instance, id, v.value())?;
        let carried = carried_version(&key, v.value())?;
        let versions = versions_of(&versions, &key, carried)?;
        if !send(StoreItem::Key { key, versions }) {
            return Ok(());
        }
    }
    let (tokens, parameters, pool, audit) = (
        txn.open_table(IMPORT_TOKENS)?,
        txn.open_table(IMPORT_PARAMETERS)?,
        txn.open_table(RSA_POOL)?,
        txn.open_table(AUDIT)?,
    );
    let items = tokens
        .iter()?
        .map(|entry| -> Result<StoreItem, StoreError> {
            Ok(StoreItem::ImportToken(decode_token(entry?.1.value())?))
        })
        .chain(parameters.iter()?.map(|entry| {
            let raw = entry?.1;
            Ok(StoreItem::ImportParameters(decode(
                "import parameters",
                raw.value(),
            )?))
        }))
        .chain(pool.iter()?.map(|entry| {
            Ok(StoreItem::KeyPair(decode(
                "RSA key pair",
                entry?.1.value(),
            )?))
        }))
        .chain(audit.iter()?.map(|entry| {
            let (first_seq, block) = block_entry(entry)?;
            Ok(StoreItem::AuditBlock { first_seq, block })
        }));
    for item in items {
        if !send(item?) {
            return Ok(());
        }
    }
    Ok(())
}
