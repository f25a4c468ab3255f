//! The sled implementation of [`AuditStore`]. Trees:
//! - `audit`:      first seq of the block (BE u64) -> block bytes
//! - `audit_meta`: "anchor" -> seq (BE u64) || hash (32 bytes)
//!
//! Blocks, not single records: a sled insert costs several microseconds whatever its
//! size, too much per call at tens of thousands of calls a second.

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::sled_store::SledStore;
use super::{AuditStore, StoreError};

const ANCHOR_KEY: &[u8] = b"anchor";

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| {
        StoreError::Corrupt {
            what: "audit record key".into(),
            reason: format!("{} bytes, not 8", key.len()),
        }
    })?))
}

fn entry(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<(u64, Vec<u8>), StoreError> {
    let (key, value) = item?;
    Ok((seq_of(&key)?, value.to_vec()))
}

impl AuditStore for SledStore {
    fn append_audit_block(&self, first_seq: u64, block: &[u8]) -> Result<(), StoreError> {
        self.audit_tree().insert(first_seq.to_be_bytes(), block)?;
        Ok(())
    }

    fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self.audit_tree().last()? {
            Some((key, value)) => Ok(Some((seq_of(&key)?, value.to_vec()))),
            None => Ok(None),
        }
    }

    fn audit_blocks_before(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tree = self.audit_tree();
        let iter = match before {
            Some(seq) => tree.range(..seq.to_be_bytes()),
            None => tree.iter(),
        };
        iter.rev().take(limit).map(entry).collect()
    }

    fn audit_blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.audit_tree()
            .range(from.to_be_bytes()..)
            .take(limit)
            .map(entry)
            .collect()
    }

    fn audit_anchor(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let Some(raw) = self.audit_meta_tree().get(ANCHOR_KEY)? else {
            return Ok(None);
        };
        if raw.len() != 40 {
            return Err(StoreError::Corrupt {
                what: "audit anchor".into(),
                reason: format!("{} bytes, not 40", raw.len()),
            });
        }
        let seq = seq_of(&raw[..8])?;
        let hash = raw[8..].try_into().expect("32 bytes");
        Ok(Some((seq, hash)))
    }

    fn prune_audit_blocks(
        &self,
        upto: u64,
        anchor_seq: u64,
        anchor_hash: [u8; 32],
    ) -> Result<usize, StoreError> {
        let doomed: Vec<sled::IVec> = self
            .audit_tree()
            .range(..=upto.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        let mut anchor = anchor_seq.to_be_bytes().to_vec();
        anchor.extend_from_slice(&anchor_hash);
        (self.audit_tree(), self.audit_meta_tree())
            .transaction(|(audit, meta)| {
                for key in &doomed {
                    audit.remove(key)?;
                }
                meta.insert(ANCHOR_KEY, anchor.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Database(e),
                TransactionError::Abort(()) => StoreError::Conflict,
            })?;
        Ok(doomed.len())
    }
}
