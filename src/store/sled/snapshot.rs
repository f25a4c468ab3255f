//! A consistent snapshot of the sled store: taken under the write gate, on a blocking
//! thread, at the pace of the channel's reader. Reads are served meanwhile; writes
//! (and so mutating calls) wait until the walk ends.

use async_trait::async_trait;

use super::audit::block_entry;
use super::{BACKEND, SledStore, Trees};
use crate::store::kv::{decode, decode_key_value, decode_token, parse_order_key};
use crate::store::{Snapshot, SnapshotSink, StoreError, StoreItem};

#[async_trait]
impl Snapshot for SledStore {
    async fn snapshot(&self, sink: SnapshotSink) -> Result<(), StoreError> {
        let gate = std::sync::Arc::clone(&self.writes).write_owned().await;
        let trees = self.trees()?;
        tokio::task::spawn_blocking(move || {
            let _gate = gate;
            walk(&trees, &sink)
        })
        .await
        .map_err(|e| StoreError::unavailable(BACKEND, e))?
    }
}

/// Sends every record; stops quietly once the reader has gone.
fn walk(trees: &Trees, sink: &SnapshotSink) -> Result<(), StoreError> {
    let send = |item: StoreItem| sink.blocking_send(item).is_ok();
    let chain = StoreItem::AuditChain {
        end: trees.chain_end()?,
        anchor: trees.anchor()?,
    };
    if !send(chain) {
        return Ok(());
    }
    // Records and versions are both in creation order: one pass along each.
    for entry in trees.order.iter() {
        let (k, v) = entry?;
        let (instance, id) = parse_order_key(&k)?;
        let key = decode_key_value(&instance, id, &v)?;
        let mut versions = trees.list_versions(&key)?;
        versions.reverse();
        if !send(StoreItem::Key { key, versions }) {
            return Ok(());
        }
    }
    for entry in trees.import_tokens.iter() {
        let token = decode_token(&entry?.1)?;
        if !send(StoreItem::ImportToken(token)) {
            return Ok(());
        }
    }
    for entry in trees.import_parameters.iter() {
        let parameters = decode("import parameters", &entry?.1)?;
        if !send(StoreItem::ImportParameters(parameters)) {
            return Ok(());
        }
    }
    for entry in trees.rsa_pool.iter() {
        let pair = decode("RSA key pair", &entry?.1)?;
        if !send(StoreItem::KeyPair(pair)) {
            return Ok(());
        }
    }
    for entry in trees.audit.iter() {
        let (first_seq, block) = block_entry(entry)?;
        if !send(StoreItem::AuditBlock { first_seq, block }) {
            return Ok(());
        }
    }
    Ok(())
}
