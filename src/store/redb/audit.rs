//! The audit trail in redb: the same `audit` and `audit_meta` entries as sled's.
//!
//! Blocks are stored as zstd frames ([`audit_frame`](crate::store::kv::audit_frame)).
//!
//! An append reads the chain's end, seals what follows it, and writes only if the end
//! is still what it read (the writer's transaction checks); appenders in this process
//! take turns, so the check fails only if something else moved the end, and then the
//! append seals again from the new end.

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable};

use super::{AUDIT, AUDIT_META, Bytes, RedbStore};
use crate::store::kv::audit_frame::{pack, unpack};
use crate::store::kv::{ANCHOR_KEY, END_KEY, decode_end, encode_end, seq_of};
use crate::store::{AuditStore, ChainEnd, Seal, StoreError};

type Entry<'a> =
    Result<(redb::AccessGuard<'a, Bytes>, redb::AccessGuard<'a, Bytes>), redb::StorageError>;

pub(super) fn block_entry(entry: Entry<'_>) -> Result<(u64, Vec<u8>), StoreError> {
    let (key, value) = entry?;
    let first_seq = seq_of(key.value())?;
    Ok((first_seq, unpack(first_seq, value.value())?))
}

pub(super) fn meta_entry(
    txn: &ReadTransaction,
    key: &[u8],
    what: &str,
) -> Result<Option<ChainEnd>, StoreError> {
    let meta = txn.open_table(AUDIT_META)?;
    let raw = meta.get(key)?;
    raw.map(|raw| decode_end(what, raw.value())).transpose()
}

impl RedbStore {
    /// One append, in the writer's next batch; with `durable`, answered once on disk.
    async fn append(&self, seal: Seal<'_>, durable: bool) -> Result<(), StoreError> {
        let _appending = self.audit_append.lock().await;
        loop {
            let end = self.audit_chain_end().await?;
            let sealed = seal(end);
            let expected = end.as_ref().map(encode_end);
            let next = sealed.end.as_ref().map(encode_end);
            // Compressed here, on the caller's task, not on the one writer thread.
            let packed: Vec<(u64, Vec<u8>)> = sealed
                .blocks
                .iter()
                .map(|(first_seq, block)| (*first_seq, pack(block)))
                .collect();
            let written = self
                .write_job(durable, move |txn| {
                    let mut meta = txn.open_table(AUDIT_META)?;
                    if meta.get(END_KEY)?.map(|raw| raw.value().to_vec()) != expected {
                        return Err(StoreError::Conflict);
                    }
                    let mut audit = txn.open_table(AUDIT)?;
                    for (first_seq, block) in &packed {
                        audit.insert(first_seq.to_be_bytes().as_slice(), block.as_slice())?;
                    }
                    if let Some(next) = &next {
                        meta.insert(END_KEY, next.as_slice())?;
                    }
                    Ok(())
                })
                .await;
            match written {
                Err(StoreError::Conflict) => continue,
                other => return other,
            }
        }
    }
}

#[async_trait]
impl AuditStore for RedbStore {
    async fn append_audit(&self, seal: Seal<'_>) -> Result<(), StoreError> {
        self.append(seal, false).await
    }

    async fn append_audit_durably(&self, seal: Seal<'_>) -> Result<(), StoreError> {
        self.append(seal, true).await
    }

    async fn audit_chain_end(&self) -> Result<Option<ChainEnd>, StoreError> {
        let (_, txn) = self.read()?;
        meta_entry(&txn, END_KEY, "audit chain end")
    }

    async fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let (_, txn) = self.read()?;
        let audit = txn.open_table(AUDIT)?;
        match audit.last()? {
            Some(entry) => block_entry(Ok(entry)).map(Some),
            None => Ok(None),
        }
    }

    async fn audit_blocks_before(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.scan(move |_, txn| {
            let audit = txn.open_table(AUDIT)?;
            let range = match before {
                Some(seq) => audit.range::<&[u8]>(..seq.to_be_bytes().as_slice())?,
                None => audit.iter()?,
            };
            range.rev().take(limit).map(block_entry).collect()
        })
        .await
    }

    async fn audit_blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.scan(move |_, txn| {
            txn.open_table(AUDIT)?
                .range::<&[u8]>(from.to_be_bytes().as_slice()..)?
                .take(limit)
                .map(block_entry)
                .collect()
        })
        .await
    }

    async fn audit_anchor(&self) -> Result<Option<ChainEnd>, StoreError> {
        let (_, txn) = self.read()?;
        meta_entry(&txn, ANCHOR_KEY, "audit anchor")
    }

    /// The anchor only moves forward: an older cut arriving late changes nothing.
    async fn prune_audit_blocks(&self, upto: u64, anchor: ChainEnd) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut meta = txn.open_table(AUDIT_META)?;
            let current = meta
                .get(ANCHOR_KEY)?
                .map(|raw| decode_end("audit anchor", raw.value()))
                .transpose()?;
            if current.is_some_and(|current| current.seq >= anchor.seq) {
                return Ok(0);
            }
            let mut audit = txn.open_table(AUDIT)?;
            let doomed: Vec<Vec<u8>> = audit
                .range::<&[u8]>(..=upto.to_be_bytes().as_slice())?
                .map(|entry| entry.map(|(key, _)| key.value().to_vec()))
                .collect::<Result<_, _>>()?;
            for key in &doomed {
                audit.remove(key.as_slice())?;
            }
            meta.insert(ANCHOR_KEY, encode_end(&anchor).as_slice())?;
            Ok(doomed.len())
        })
        .await
    }
}
