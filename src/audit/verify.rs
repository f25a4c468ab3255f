//! Checks a whole trail: every record decodes, sits at its own sequence number, follows
//! the one before without a gap, carries the hash of the one before, and its own hash
//! matches its fields.

use super::record::{AuditRecord, GENESIS_HASH};
use crate::store::{AuditStore, StoreError};

const CHUNK: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Hash of the newest record: what an operator may keep elsewhere.
    pub head_hash: [u8; 32],
}

/// The first record that breaks the chain, and how.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {reason}")]
pub struct VerifyFailure {
    pub seq: u64,
    pub reason: String,
}

/// Walks the trail oldest first. `progress` is called with the records checked so far
/// after each chunk.
pub fn verify(
    store: &dyn AuditStore,
    mut progress: impl FnMut(u64),
) -> Result<Result<VerifyReport, VerifyFailure>, StoreError> {
    let (mut expected_seq, mut prev_hash) = match store.audit_anchor()? {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, GENESIS_HASH),
    };
    let mut report = VerifyReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        head_hash: prev_hash,
    };
    let mut from = 0;
    loop {
        let chunk = store.audit_from(from, CHUNK)?;
        let Some((last_key, _)) = chunk.last() else {
            break;
        };
        from = last_key + 1;
        for (key, raw) in &chunk {
            let fail = |reason: String| Ok(Err(VerifyFailure { seq: *key, reason }));
            if *key != expected_seq {
                return fail(if *key > expected_seq {
                    format!(
                        "records {expected_seq}..{} are missing (the chain jumps to {key})",
                        key - 1
                    )
                } else {
                    format!("out of order: expected record {expected_seq}")
                });
            }
            let record = match AuditRecord::decode(raw) {
                Ok(record) => record,
                Err(reason) => return fail(format!("does not decode: {reason}")),
            };
            if record.seq != *key {
                return fail(format!(
                    "stored at position {key} but says it is record {}: reordered",
                    record.seq
                ));
            }
            if record.prev_hash != prev_hash {
                return fail("does not carry the hash of the record before it".into());
            }
            if record.compute_hash() != record.hash {
                return fail("its fields do not match its hash: changed".into());
            }
            report.first_seq.get_or_insert(*key);
            report.last_seq = Some(*key);
            report.records += 1;
            prev_hash = record.hash;
            expected_seq += 1;
        }
        progress(report.records);
    }
    report.head_hash = prev_hash;
    Ok(Ok(report))
}
