//! Bounded retention: the oldest records beyond `max_records`, or older than
//! `max_age`, are removed, a chunk at a time, with the hash of the last removed record
//! kept as the chain's anchor (in the same store transaction), so the rest verifies.

use std::time::Duration;

use super::record::AuditRecord;
use super::{AuditError, AuditTrail};
use crate::domain::model::now_millis;

/// Records removed per store transaction.
const PRUNE_CHUNK: usize = 5_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_records: u64,
    pub max_age: Duration,
}

impl AuditTrail {
    /// Removes what retention says must go; returns how many records were removed.
    /// At most `budget` records per call, so a pass never holds the store for long.
    pub fn prune(&self, retention: &Retention, budget: usize) -> Result<usize, AuditError> {
        let store = self.store();
        let cutoff = now_millis() - retention.max_age.as_millis() as i64;
        let mut removed = 0;
        while removed < budget {
            let Some((last_seq, _)) = store.last_audit()? else {
                break;
            };
            let oldest = store.audit_from(0, PRUNE_CHUNK.min(budget - removed))?;
            let Some((first_seq, _)) = oldest.first() else {
                break;
            };
            let held = last_seq - first_seq + 1;
            let over_count = held.saturating_sub(retention.max_records) as usize;
            let mut upto = None;
            for (index, (seq, raw)) in oldest.iter().enumerate() {
                let record = AuditRecord::decode(raw)
                    .map_err(|reason| AuditError::Corrupt { seq: *seq, reason })?;
                // Never the newest record: the chain head must stay readable.
                if *seq == last_seq || (index >= over_count && record.time_ms >= cutoff) {
                    break;
                }
                upto = Some((*seq, record.hash));
            }
            let Some((upto_seq, hash)) = upto else {
                break;
            };
            let n = store.prune_audit(upto_seq, hash)?;
            removed += n;
            if n == 0 {
                break;
            }
        }
        Ok(removed)
    }
}
