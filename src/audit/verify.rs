//! Checks a whole trail: every block decodes and sits under its first record's sequence
//! number; every record follows the one before without a gap, carries the hash of the
//! one before, and its own hash matches its stored bytes.

use super::record::{GENESIS_HASH, decode_block};
use crate::store::{AuditStore, StoreError};

/// Blocks read at a time.
const CHUNK: usize = 64;

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
/// after each chunk of blocks.
pub async fn verify(
    store: &dyn AuditStore,
    mut progress: impl FnMut(u64),
) -> Result<Result<VerifyReport, VerifyFailure>, StoreError> {
    let (mut expected_seq, mut prev_hash) = match store.audit_anchor().await? {
        Some(anchor) => (anchor.seq + 1, anchor.hash),
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
        let chunk = store.audit_blocks_from(from, CHUNK).await?;
        let Some((last_key, _)) = chunk.last() else {
            break;
        };
        from = last_key + 1;
        for (block_seq, raw) in &chunk {
            let records = match decode_block(raw) {
                Ok(records) => records,
                Err(reason) => {
                    return Ok(Err(VerifyFailure {
                        seq: *block_seq,
                        reason: format!("the block holding it does not decode: {reason}"),
                    }));
                }
            };
            if records.first().is_some_and(|(r, _)| r.seq != *block_seq) {
                return Ok(Err(VerifyFailure {
                    seq: *block_seq,
                    reason: "missing: its block begins with another record".into(),
                }));
            }
            let seqs: Vec<u64> = records.iter().map(|(r, _)| r.seq).collect();
            for (index, (record, hash_matches)) in records.into_iter().enumerate() {
                let fail = |reason: String| {
                    Ok(Err(VerifyFailure {
                        seq: expected_seq,
                        reason,
                    }))
                };
                if record.seq != expected_seq && seqs[index + 1..].contains(&expected_seq) {
                    return fail(format!(
                        "out of order: record {} stands where {expected_seq} belongs",
                        record.seq
                    ));
                }
                if record.seq > expected_seq {
                    return fail(format!(
                        "missing (records {expected_seq}..{} are gone; the chain resumes at {})",
                        record.seq - 1,
                        record.seq
                    ));
                }
                if record.seq < expected_seq {
                    return fail(format!(
                        "out of order: record {} stands where {expected_seq} belongs",
                        record.seq
                    ));
                }
                if !hash_matches {
                    return fail("its fields do not match its hash: changed".into());
                }
                if record.prev_hash != prev_hash {
                    return fail("does not carry the hash of the record before it".into());
                }
                report.first_seq.get_or_insert(record.seq);
                report.last_seq = Some(record.seq);
                report.records += 1;
                prev_hash = record.hash;
                expected_seq += 1;
            }
        }
        progress(report.records);
    }
    // The end recorded with the last append: blocks removed from the end of the chain
    // leave it pointing past what remains.
    if let Some(end) = store.audit_chain_end().await?
        && (end.seq != expected_seq - 1 || end.hash != prev_hash)
    {
        return Ok(Err(VerifyFailure {
            seq: expected_seq,
            reason: format!(
                "missing: the chain's recorded end is record {}, but the records stop at {}",
                end.seq,
                expected_seq - 1
            ),
        }));
    }
    report.head_hash = prev_hash;
    Ok(Ok(report))
}
