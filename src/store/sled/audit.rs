//! The audit trail in sled. Trees:
//! - `audit`:      first seq of the block (BE u64) -> the block as a zstd frame
//!   ([`audit_frame`]; blocks written before schema 7 are kept as they were written)
//! - `audit_meta`: "anchor" -> seq (BE u64) || hash (32 bytes); "end" -> the same, for
//!   the chain's newest record
//!
//! Blocks, not single records: a sled insert costs several microseconds whatever its
//! size, too much per call at tens of thousands of calls a second. Appends and the
//! newest-block read run inline (point operations); range reads and pruning on a
//! blocking thread.

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use async_trait::async_trait;

use super::{SledStore, Trees};
use crate::store::kv::audit_frame::{self, pack};
use crate::store::kv::{ANCHOR_KEY, END_KEY, decode_end, encode_end, seq_of};
use crate::store::{AuditStore, ChainEnd, Seal, StoreError};

pub(super) fn block_entry(
    item: ::sled::Result<(::sled::IVec, ::sled::IVec)>,
) -> Result<(u64, Vec<u8>), StoreError> {
    let (key, value) = item?;
    let first_seq = seq_of(&key)?;
    Ok((first_seq, audit_frame::unpack_either(first_seq, &value)?))
}

impl Trees {
    pub(super) fn anchor(&self) -> Result<Option<ChainEnd>, StoreError> {
        self.audit_meta
            .get(ANCHOR_KEY)?
            .map(|raw| decode_end("audit anchor", &raw))
            .transpose()
    }

    pub(super) fn chain_end(&self) -> Result<Option<ChainEnd>, StoreError> {
        self.audit_meta
            .get(END_KEY)?
            .map(|raw| decode_end("audit chain end", &raw))
            .transpose()
    }

    fn append_audit(&self, seal: Seal<'_>) -> Result<(), StoreError> {
        let _appending = self.audit_append.lock().unwrap_or_else(|e| e.into_inner());
        let sealed = seal(self.chain_end()?);
        let end = sealed.end.as_ref().map(encode_end);
        let packed: Vec<(u64, Vec<u8>)> = sealed
            .blocks
            .iter()
            .map(|(first_seq, block)| (*first_seq, pack(block)))
            .collect();
        (&self.audit, &self.audit_meta)
            .transaction(|(audit, meta)| {
                for (first_seq, block) in &packed {
                    audit.insert(&first_seq.to_be_bytes(), block.as_slice())?;
                }
                if let Some(end) = &end {
                    meta.insert(END_KEY, end.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)
    }

    /// The anchor only moves forward: an older cut arriving late changes nothing.
    fn prune_audit_blocks(&self, upto: u64, anchor: ChainEnd) -> Result<usize, StoreError> {
        let _appending = self.audit_append.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = self.audit_meta.get(ANCHOR_KEY)?
            && decode_end("audit anchor", &current)?.seq >= anchor.seq
        {
            return Ok(0);
        }
        let doomed: Vec<::sled::IVec> = self
            .audit
            .range(..=upto.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        let anchor = encode_end(&anchor);
        (&self.audit, &self.audit_meta)
            .transaction(|(audit, meta)| {
                for key in &doomed {
                    audit.remove(key)?;
                }
                meta.insert(ANCHOR_KEY, anchor.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        Ok(doomed.len())
    }
}

fn transaction_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => e.into(),
        TransactionError::Abort(()) => StoreError::Conflict,
    }
}

#[async_trait]
impl AuditStore for SledStore {
    async fn append_audit(&self, seal: Seal<'_>) -> Result<(), StoreError> {
        self.write(|trees| trees.append_audit(seal)).await
    }

    async fn audit_chain_end(&self) -> Result<Option<ChainEnd>, StoreError> {
        self.trees()?.chain_end()
    }

    async fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.trees()?
            .audit
            .last()?
            .map(Ok)
            .map(block_entry)
            .transpose()
    }

    async fn audit_blocks_before(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.blocking(move |trees| {
            let iter = match before {
                Some(seq) => trees.audit.range(..seq.to_be_bytes()),
                None => trees.audit.iter(),
            };
            iter.rev().take(limit).map(block_entry).collect()
        })
        .await
    }

    async fn audit_blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.blocking(move |trees| {
            trees
                .audit
                .range(from.to_be_bytes()..)
                .take(limit)
                .map(block_entry)
                .collect()
        })
        .await
    }

    async fn audit_anchor(&self) -> Result<Option<ChainEnd>, StoreError> {
        self.trees()?.anchor()
    }

    async fn prune_audit_blocks(&self, upto: u64, anchor: ChainEnd) -> Result<usize, StoreError> {
        self.write_blocking(move |trees| trees.prune_audit_blocks(upto, anchor))
            .await
    }
}
