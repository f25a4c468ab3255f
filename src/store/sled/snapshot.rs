//! A consistent snapshot of the sled store: taken under the write gate, on a blocking
//! thread, at the pace of the channel's reader. Reads are served meanwhile; writes
//! (and so mutating calls) wait until the walk ends.

use async_trait::async_trait;

use super::audit::block_entry;
use super::{BACKEND, SledStore, Trees};
use crate::store::kv::{carried_version, decode, decode_key_value, decode_token, parse_order_key};
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
        let carried = carried_version(&key, &v)?;
        let mut versions = trees.versions_with(&key, carried)?;
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
        let (key, value) = entry?;
        let (first_seq, block) = block_entry(Ok((key.clone(), value)))?;
        read_again(&trees.audit, &key)?;
        if !send(StoreItem::AuditBlock { first_seq, block }) {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads of each audit block beyond the walk's own.
const AUDIT_REREADS: usize = 8;

/// Reads `key` again [`AUDIT_REREADS`] times, so that sled lets go of the nodes the walk
/// has passed. sled 0.34 queues each read of a node in one of 256 shards and weighs a
/// shard's queue against its cache only once 64 reads have queued there; until then
/// every node read stays in memory, decoded. A walk reads each node of `audit` once
/// per block, and a node holds up to 16 blocks, so with a million keys' trail (1,800
/// nodes, seven a shard) hardly a queue filled: the walk alone added 307 MB resident,
/// with a cache of 1 MiB or 16 alike. Eight more reads of each block fill every
/// shard's queue as the walk goes: 102 MB; with blocks stored as frames
/// ([`audit_frame`](crate::store::kv::audit_frame)), 128 MB without the rereads and 43
/// with them, for about 3 µs a block (measured on a copy of that store). Key records
/// are small and read a million times: their nodes are let go of without help.
fn read_again(tree: &::sled::Tree, key: &[u8]) -> Result<(), StoreError> {
    for _ in 0..AUDIT_REREADS {
        tree.get(key)?;
    }
    Ok(())
}
