//! The audit trail: one record per KMS call (refused ones included) and per
//! time-driven change, append-only and hash-chained so that a changed, deleted or
//! reordered record is detected by [`verify`].
//!
//! Decisions:
//! - One chain per store. [`AuditTrail::append`] takes the sequence number and the
//!   previous hash under one lock and puts the record in the trail's pending list, in
//!   memory: the record exists, in chain order, before the call is answered.
//! - [`AuditTrail::commit`] writes the pending records to the store as one block (a
//!   store insert costs several microseconds, too much per call at 25k calls/s). The
//!   store's group flush commits the trail before it syncs, and the trail lives in the
//!   same store as the keys, so a mutating call's record and its change become durable
//!   in the one group flush the call gate waits for before answering. Read calls'
//!   records are made durable by a background group flush every [`BACKGROUND_COMMIT`]
//!   (so within about 0.2 s plus one fsync), or like mutating calls with
//!   `audit.sync_reads = true`.
//! - If records cannot be written, the trail turns unavailable: every call is answered
//!   UNAVAILABLE (Vault's rule: nothing served unaudited) until a commit succeeds
//!   again; the pending list is bounded, so a stuck store cannot grow memory.
//! - Retention ([`retention`]) removes the oldest blocks beyond a count or an age and
//!   keeps the hash of the last removed record as the chain's anchor, so what remains
//!   still verifies. Removal at either end of the chain is not detectable by a chain
//!   alone (an attacker with write access could also rewrite the anchor); ship the
//!   newest hash (`kms audit verify` prints it) elsewhere if that matters.

mod query;
mod record;
pub mod retention;
mod verify;

pub use query::{AuditPage, AuditQuery, PageTokenError};
pub use record::{AuditRecord, GENESIS_HASH, decode_block, encode_block};
pub use verify::{VerifyFailure, VerifyReport, verify};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::domain::model::now_millis;
use crate::store::{AuditStore, StoreError};

/// The principal recorded for a caller that did not authenticate.
pub const ANONYMOUS: &str = "anonymous";
/// The principal recorded for time-driven changes (expiry sweeps).
pub const SYSTEM: &str = "system";
/// How often the server commits and flushes read calls' records.
pub const BACKGROUND_COMMIT: Duration = Duration::from_millis(200);
/// Records written to the store as one block at most.
const BLOCK_RECORDS: usize = 512;
/// Pending records held at most; beyond, appends fail (the store is not keeping up).
const MAX_PENDING: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(#[from] StoreError),
    #[error("audit block {seq} is corrupt: {reason}")]
    Corrupt { seq: u64, reason: String },
    #[error(
        "the audit trail cannot be written (a commit failed or {MAX_PENDING} records are pending)"
    )]
    Unavailable,
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
    /// Appended, not yet in the store; in sequence order.
    pending: Vec<AuditRecord>,
}

pub struct AuditTrail {
    store: Arc<dyn AuditStore>,
    head: Mutex<ChainHead>,
    /// Held while writing blocks, so blocks reach the store in sequence order.
    writing: Mutex<()>,
    /// False after a failed commit, until one succeeds.
    writable: AtomicBool,
}

impl AuditTrail {
    /// Continues the chain where the store's newest record (or its anchor) ends.
    pub fn open(store: Arc<dyn AuditStore>) -> Result<Self, AuditError> {
        let last = match store.last_audit_block()? {
            Some((seq, raw)) => {
                let records =
                    decode_block(&raw).map_err(|reason| AuditError::Corrupt { seq, reason })?;
                records.last().map(|(r, _)| (r.seq, r.hash))
            }
            None => None,
        };
        let (next_seq, last_hash) = match last.or(store.audit_anchor()?) {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, GENESIS_HASH),
        };
        Ok(Self {
            store,
            head: Mutex::new(ChainHead {
                next_seq,
                last_hash,
                pending: Vec::new(),
            }),
            writing: Mutex::new(()),
            writable: AtomicBool::new(true),
        })
    }

    /// Adds one record to the chain and returns its sequence number. It reaches the
    /// store at the next [`commit`](Self::commit).
    pub fn append(&self, event: &AuditEvent<'_>) -> Result<u64, AuditError> {
        if !self.writable.load(Ordering::Relaxed) {
            return Err(AuditError::Unavailable);
        }
        let key_id = event.key_id.map(|id| id.to_string()).unwrap_or_default();
        let correlation_id = event.correlation_id.to_string();
        let peer = event.peer.map(|p| p.to_string()).unwrap_or_default();
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        if head.pending.len() >= MAX_PENDING {
            return Err(AuditError::Unavailable);
        }
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
        head.next_seq += 1;
        head.last_hash = record.hash;
        let seq = record.seq;
        head.pending.push(record);
        Ok(seq)
    }

    /// Writes every pending record to the store (not yet flushed). Records appended
    /// before this call are written when it returns Ok.
    pub fn commit(&self) -> Result<(), AuditError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let pending = {
            let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut head.pending)
        };
        for (index, block) in pending.chunks(BLOCK_RECORDS).enumerate() {
            if let Err(error) = self
                .store
                .append_audit_block(block[0].seq, &encode_block(block))
            {
                // Put back what was not written, ahead of anything appended since.
                let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
                let mut unwritten = pending[index * BLOCK_RECORDS..].to_vec();
                unwritten.append(&mut head.pending);
                head.pending = unwritten;
                // Logged once per episode, not once per refused call.
                if self.writable.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %error, "the audit trail cannot be written: calls are refused until it can");
                }
                return Err(error.into());
            }
        }
        if !self.writable.swap(true, Ordering::Relaxed) {
            tracing::warn!("the audit trail is writable again");
        }
        Ok(())
    }

    /// True when records wait for the next commit.
    pub fn has_pending(&self) -> bool {
        !self
            .head
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .is_empty()
    }

    /// One page of records, newest first (pending records are committed first).
    pub fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError> {
        self.commit()?;
        query::run(self.store.as_ref(), query)
    }

    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn event(operation: &str) -> AuditEvent<'_> {
        AuditEvent {
            principal: "p",
            instance: "i",
            operation,
            key_id: None,
            code: 0,
            correlation_id: Uuid::new_v4(),
            peer: None,
        }
    }

    /// A store whose block writes fail while `failing` is set.
    struct FlakyStore {
        inner: SledStore,
        failing: AtomicBool,
    }

    impl AuditStore for FlakyStore {
        fn append_audit_block(&self, first_seq: u64, block: &[u8]) -> Result<(), StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Flush("disk gone".into()));
            }
            self.inner.append_audit_block(first_seq, block)
        }
        fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
            self.inner.last_audit_block()
        }
        fn audit_blocks_before(
            &self,
            before: Option<u64>,
            limit: usize,
        ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            self.inner.audit_blocks_before(before, limit)
        }
        fn audit_blocks_from(
            &self,
            from: u64,
            limit: usize,
        ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            self.inner.audit_blocks_from(from, limit)
        }
        fn audit_anchor(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
            self.inner.audit_anchor()
        }
        fn prune_audit_blocks(
            &self,
            upto: u64,
            anchor_seq: u64,
            anchor_hash: [u8; 32],
        ) -> Result<usize, StoreError> {
            self.inner.prune_audit_blocks(upto, anchor_seq, anchor_hash)
        }
    }

    #[test]
    fn a_trail_that_cannot_be_written_refuses_appends_until_it_can_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FlakyStore {
            inner: SledStore::open(&dir.path().join("db")).unwrap(),
            failing: AtomicBool::new(false),
        });
        let trail = AuditTrail::open(store.clone() as Arc<dyn AuditStore>).unwrap();
        trail.append(&event("A")).unwrap();
        store.failing.store(true, Ordering::SeqCst);
        assert!(trail.commit().is_err());
        // Calls are then refused rather than served unaudited.
        assert!(matches!(
            trail.append(&event("B")),
            Err(AuditError::Unavailable)
        ));
        store.failing.store(false, Ordering::SeqCst);
        trail.commit().unwrap();
        trail.append(&event("C")).unwrap();
        trail.commit().unwrap();
        let report = verify(store.as_ref(), |_| {}).unwrap().unwrap();
        assert_eq!(report.records, 2, "A kept across the failed commit, then C");
    }

    #[test]
    fn the_chain_continues_across_commits_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        let trail = AuditTrail::open(store.clone() as Arc<dyn AuditStore>).unwrap();
        for _ in 0..3 {
            trail.append(&event("A")).unwrap();
        }
        trail.commit().unwrap();
        trail.append(&event("B")).unwrap();
        trail.commit().unwrap();
        // Not committed: gone with the process, as a crash would lose it.
        trail.append(&event("C")).unwrap();
        drop(trail);
        let trail = AuditTrail::open(store.clone() as Arc<dyn AuditStore>).unwrap();
        assert_eq!(trail.append(&event("D")).unwrap(), 5);
        trail.commit().unwrap();
        let report = verify(store.as_ref(), |_| {}).unwrap().unwrap();
        assert_eq!((report.records, report.last_seq), (5, Some(5)));
    }
}
