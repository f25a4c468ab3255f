//! Bounded retention: the oldest blocks of records are removed while the trail holds
//! more than `max_records`, or while a block's newest record is older than `max_age`,
//! with the hash of the last removed record kept as the chain's anchor (in the same
//! store transaction), so the rest verifies. Whole blocks go, so a trail may hold up to
//! one block (512 records) more than the bound.

use std::time::Duration;

use super::record::decode_block;
use super::{AuditError, AuditTrail};
use crate::domain::model::now_millis;
use crate::store::ChainEnd;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_records: u64,
    pub max_age: Duration,
}

impl AuditTrail {
    /// Removes what retention says must go; returns how many records were removed.
    /// At most about `budget` records per call, so a pass never holds the store long.
    pub async fn prune(&self, retention: &Retention, budget: usize) -> Result<usize, AuditError> {
        let store = self.store();
        let cutoff = now_millis() - retention.max_age.as_millis() as i64;
        let Some((last_block, raw)) = store.last_audit_block().await? else {
            return Ok(0);
        };
        let last_seq = last_seq_of(last_block, &raw)?;
        let mut removed = 0;
        // One block at a time, oldest first: at steady state a pass decodes one block.
        while removed < budget {
            let Some((block_seq, raw)) = store.audit_blocks_from(0, 1).await?.pop() else {
                break;
            };
            // Never the newest block: the chain head must stay readable.
            if block_seq == last_block {
                break;
            }
            let held = last_seq - block_seq + 1;
            let records = decode_block(&raw).map_err(|reason| AuditError::Corrupt {
                seq: block_seq,
                reason,
            })?;
            let Some((newest, _)) = records.last() else {
                break;
            };
            if held <= retention.max_records && newest.time_ms >= cutoff {
                break;
            }
            store
                .prune_audit_blocks(
                    block_seq,
                    ChainEnd {
                        seq: newest.seq,
                        hash: newest.hash,
                    },
                )
                .await?;
            removed += records.len();
        }
        Ok(removed)
    }
}

fn last_seq_of(block_seq: u64, raw: &[u8]) -> Result<u64, AuditError> {
    let records = decode_block(raw).map_err(|reason| AuditError::Corrupt {
        seq: block_seq,
        reason,
    })?;
    Ok(records.last().map_or(block_seq, |(r, _)| r.seq))
}
