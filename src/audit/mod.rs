//! The audit trail: one record per KMS call (refused ones included) and per
//! time-driven change, append-only and hash-chained so that a changed, deleted or
//! reordered record is detected by [`verify`].
//!
//! Decisions:
//! - One chain per store, appended under one lock: the sequence number and the
//!   previous hash are taken together, and the record is written to the store inside
//!   the same lock, so the store holds the records in chain order with no gaps.
//! - The trail lives in the same store as the keys, so a mutating call's change and its
//!   record are made durable by one group flush before the call is answered (the API's
//!   call gate does that). A read call's record is durable within the store's periodic
//!   flush (sled: 500 ms), or before the answer with `audit.sync_reads = true`.
//! - Retention ([`retention`]) removes the oldest records beyond a count or an age and
//!   keeps the hash of the last removed record as the chain's anchor, so what remains
//!   still verifies. Removal at either end of the chain is not detectable by a chain
//!   alone (an attacker with write access could also rewrite the anchor); ship the
//!   newest hash elsewhere if that matters.

mod query;
mod record;
pub mod retention;
mod verify;

pub use query::{AuditPage, AuditQuery, PageTokenError};
pub use record::{AuditRecord, GENESIS_HASH};
pub use verify::{VerifyFailure, VerifyReport, verify};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::domain::model::now_millis;
use crate::store::{AuditStore, StoreError};

/// The principal recorded for a caller that did not authenticate.
pub const ANONYMOUS: &str = "anonymous";
/// The principal recorded for time-driven changes (expiry sweeps).
pub const SYSTEM: &str = "system";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(#[from] StoreError),
    #[error("audit record {seq} is corrupt: {reason}")]
    Corrupt { seq: u64, reason: String },
}

/// What a caller knows about an event; the trail adds sequence, time and hashes.
#[derive(Clone, Debug)]
pub struct AuditEvent<'a> {
    pub principal: &'a str,
    pub instance: &'a str,
    pub operation: &'a str,
    pub key_id: Option<Uuid>,
    /// gRPC status code (0 = OK).
    pub code: i32,
    pub correlation_id: Uuid,
    pub peer: Option<SocketAddr>,
}

struct ChainHead {
    next_seq: u64,
    last_hash: [u8; 32],
}

pub struct AuditTrail {
    store: Arc<dyn AuditStore>,
    head: Mutex<ChainHead>,
}

impl AuditTrail {
    /// Continues the chain where the store's newest record (or its anchor) ends.
    pub fn open(store: Arc<dyn AuditStore>) -> Result<Self, AuditError> {
        let head = match store.last_audit()? {
            Some((seq, raw)) => {
                let record = AuditRecord::decode(&raw)
                    .map_err(|reason| AuditError::Corrupt { seq, reason })?;
                ChainHead {
                    next_seq: seq + 1,
                    last_hash: record.hash,
                }
            }
            None => match store.audit_anchor()? {
                Some((seq, hash)) => ChainHead {
                    next_seq: seq + 1,
                    last_hash: hash,
                },
                None => ChainHead {
                    next_seq: 1,
                    last_hash: GENESIS_HASH,
                },
            },
        };
        Ok(Self {
            store,
            head: Mutex::new(head),
        })
    }

    /// Appends one record and returns its sequence number. Not durable until the
    /// store's next flush.
    pub fn append(&self, event: &AuditEvent<'_>) -> Result<u64, AuditError> {
        let key_id = event.key_id.map(|id| id.to_string()).unwrap_or_default();
        let correlation_id = event.correlation_id.to_string();
        let peer = event.peer.map(|p| p.to_string()).unwrap_or_default();
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = AuditRecord {
            seq: head.next_seq,
            time_ms: now_millis(),
            principal: event.principal.to_owned(),
            instance: event.instance.to_owned(),
            operation: event.operation.to_owned(),
            key_id,
            code: event.code,
            correlation_id,
            peer,
            prev_hash: head.last_hash,
            hash: [0; 32],
        };
        record.hash = record.compute_hash();
        self.store.append_audit(record.seq, &record.encode())?;
        head.next_seq += 1;
        head.last_hash = record.hash;
        Ok(record.seq)
    }

    /// One page of records, newest first.
    pub fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError> {
        query::run(self.store.as_ref(), query)
    }

    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }
}
