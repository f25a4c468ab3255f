//! The audit trail: one record per KMS call (refused ones included) and per
//! time-driven change, append-only and hash-chained so that a changed, deleted or
//! reordered record is detected by [`verify`].
//!
//! Decisions:
//! - One chain per store, whatever number of replicas write to it. [`AuditTrail::append`]
//!   puts the record in the trail's pending list, in memory, before the call is
//!   answered. [`AuditTrail::commit`] numbers and hashes the pending records onto the
//!   chain's end *as stored* and writes them in blocks, in one store step that no other
//!   process can interleave with (redb, sled: one process; PostgreSQL: a transaction holding the
//!   lock on the chain's row). So sequence numbers follow commit order across replicas, and a
//!   record's time is when its call was answered (replicas' clocks may differ a little).
//! - Blocks, not single records: a store insert costs several microseconds, too much per
//!   call at 25k calls/s. A mutating call waits for [`AuditTrail::persist`] (commit, then
//!   the store's durability point) before answering; on redb and sled the record and the
//!   change become durable in the same group commit; on PostgreSQL the change's transaction
//!   commits first, then the record's, and the answer waits for both. Read calls'
//!   records are committed by a background task every [`BACKGROUND_COMMIT`], or like
//!   mutating calls with `audit.sync_reads = true`.
//! - If records cannot be written, a mutating call is answered UNAVAILABLE (its record
//!   cannot be made durable with its change). Other calls are still answered: their
//!   records wait in the pending list and reach the store when it takes writes again.
//!   The list is bounded ([`MAX_PENDING`]); once full, every call is answered
//!   UNAVAILABLE (Vault's rule: nothing served unaudited), so a stuck store cannot grow
//!   memory.
//! - Retention ([`retention`]) removes the oldest blocks beyond a count or an age and
//!   keeps the hash of the last removed record as the chain's anchor, so what remains
//!   still verifies. The store also keeps the chain's end, so records cut from the end
//!   are found; an attacker with write access could rewrite the end and the anchor too,
//!   so ship the newest hash (`kms audit verify` prints it) elsewhere if that matters.

mod query;
mod record;
pub mod retention;
mod verify;

pub use query::{AuditPage, AuditQuery, PageTokenError};
pub use record::{AuditRecord, GENESIS_HASH, decode_block, encode_block};
pub use verify::{VerifyFailure, VerifyReport, verify};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::domain::model::now_millis;
use crate::store::{AuditStore, ChainEnd, SealedBlocks, StoreError};

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

pub struct AuditTrail {
    store: Arc<dyn AuditStore>,
    /// Appended, not yet in the store, in append order; sequence numbers and hashes are
    /// given when they are sealed onto the chain's stored end.
    pending: Arc<Mutex<Vec<AuditRecord>>>,
    /// Records appended so far (counted under `pending`'s lock).
    appended: Arc<AtomicU64>,
    /// Held while committing, so this process seals one batch at a time; it holds how
    /// many of the records appended first are known durable.
    writing: Arc<tokio::sync::Mutex<u64>>,
    /// False after a failed commit, until one succeeds (to log each episode once).
    writable: Arc<AtomicBool>,
}

impl AuditTrail {
    /// Opens the trail of `store`. A store written before chain ends were recorded has
    /// its end derived from its newest record (or anchor) and recorded now.
    pub async fn open(store: Arc<dyn AuditStore>) -> Result<Self, AuditError> {
        if store.audit_chain_end().await?.is_none() {
            let newest = match store.last_audit_block().await? {
                Some((seq, raw)) => {
                    let records =
                        decode_block(&raw).map_err(|reason| AuditError::Corrupt { seq, reason })?;
                    records.last().map(|(r, _)| ChainEnd {
                        seq: r.seq,
                        hash: r.hash,
                    })
                }
                None => None,
            };
            if let Some(end) = newest.or(store.audit_anchor().await?) {
                store
                    .append_audit(&|_| SealedBlocks {
                        blocks: Vec::new(),
                        end: Some(end),
                    })
                    .await?;
            }
        }
        Ok(Self {
            store,
            pending: Arc::new(Mutex::new(Vec::new())),
            appended: Arc::new(AtomicU64::new(0)),
            writing: Arc::new(tokio::sync::Mutex::new(0)),
            writable: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Adds one record to the trail. It is chained and reaches the store at the next
    /// [`commit`](Self::commit).
    pub fn append(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        let record = AuditRecord {
            seq: 0,
            time_ms: now_millis(),
            principal: event.principal.to_owned(),
            instance: event.instance.to_owned(),
            operation: event.operation.to_owned(),
            key_id: event.key_id.map(|id| id.to_string()).unwrap_or_default(),
            code: event.code,
            correlation_id: event.correlation_id.to_string(),
            peer: event.peer.map(|p| p.to_string()).unwrap_or_default(),
            prev_hash: GENESIS_HASH,
            hash: [0; 32],
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING {
            return Err(AuditError::Unavailable);
        }
        pending.push(record);
        self.appended.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Chains every pending record onto the stored end of the chain and writes them,
    /// in blocks, as one store step (durable at the next [`Durability::sync`] of the
    /// store). Records appended before this call are written when it returns Ok.
    ///
    /// The write runs as a task of its own: a caller that goes away (a cancelled call,
    /// an aborted background task) cannot stop it between taking the batch and storing
    /// it, which would lose the batch.
    pub async fn commit(&self) -> Result<(), AuditError> {
        self.write_pending(None).await
    }

    /// Writes the pending records; with `durable_through`, until the first that many
    /// appended records are durable, with every store write made before them: at once
    /// if an earlier durable commit covered them, else by an append that is durable
    /// itself (one trip through the store, where an append and a sync were two).
    async fn write_pending(&self, durable_through: Option<u64>) -> Result<(), AuditError> {
        let (store, pending, appended, writing, writable) = (
            Arc::clone(&self.store),
            Arc::clone(&self.pending),
            Arc::clone(&self.appended),
            Arc::clone(&self.writing),
            Arc::clone(&self.writable),
        );
        tokio::spawn(async move {
            let mut durable_records = writing.lock_owned().await;
            if durable_through.is_some_and(|wanted| *durable_records >= wanted) {
                return Ok(());
            }
            let (batch, taken_through) = {
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                (
                    std::mem::take(&mut *pending),
                    appended.load(Ordering::Relaxed),
                )
            };
            if batch.is_empty() {
                // Written by a commit that was not durable: a sync makes them so.
                if durable_through.is_some() {
                    store.sync().await?;
                    *durable_records = taken_through;
                }
                return Ok(());
            }
            let seal = |end: Option<ChainEnd>| seal(&batch, end);
            let written = match durable_through {
                Some(_) => store.append_audit_durably(&seal).await,
                None => store.append_audit(&seal).await,
            };
            if let Err(error) = written {
                // Put the batch back, ahead of anything appended since.
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                let mut unwritten = batch;
                unwritten.append(&mut pending);
                *pending = unwritten;
                // Logged once per episode, not once per refused call.
                if writable.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        error = %error,
                        "the audit trail cannot be written: mutating calls are refused; the \
                         records of other calls wait in memory (at most {MAX_PENDING}) until it can"
                    );
                }
                return Err(error.into());
            }
            if !writable.swap(true, Ordering::Relaxed) {
                tracing::warn!("the audit trail is writable again");
            }
            if durable_through.is_some() {
                *durable_records = taken_through;
            }
            Ok(())
        })
        .await
        .map_err(|_| AuditError::Unavailable)?
    }

    /// Commits and makes the store durable: what a mutating call waits for before it
    /// answers, so its change and its record are durable together.
    pub async fn persist(&self) -> Result<(), AuditError> {
        self.commit().await?;
        self.store.sync().await?;
        Ok(())
    }

    /// What a mutating call waits for after appending its record: that record, and
    /// the change the call made before it, durable. Unlike [`Self::persist`] it does
    /// not cover store writes made after the last record appended.
    pub async fn persist_appended(&self) -> Result<(), AuditError> {
        let through = self.appended.load(Ordering::Relaxed);
        self.write_pending(Some(through)).await
    }

    /// True when records wait for the next commit.
    pub fn has_pending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// One page of records, newest first (pending records are committed first).
    pub async fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError> {
        self.commit().await?;
        query::run(self.store.as_ref(), query).await
    }

    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }
}

/// Numbers and hashes `batch` as the records after `end`, in blocks.
fn seal(batch: &[AuditRecord], end: Option<ChainEnd>) -> SealedBlocks {
    let (mut seq, mut prev_hash) = end.map_or((1, GENESIS_HASH), |end| (end.seq + 1, end.hash));
    let mut chained = Vec::with_capacity(batch.len());
    for record in batch {
        let mut record = AuditRecord {
            seq,
            prev_hash,
            ..record.clone()
        };
        record.hash = record.compute_hash();
        prev_hash = record.hash;
        seq += 1;
        chained.push(record);
    }
    SealedBlocks {
        blocks: chained
            .chunks(BLOCK_RECORDS)
            .map(|block| (block[0].seq, encode_block(block)))
            .collect(),
        end: chained.last().map(|r| ChainEnd {
            seq: r.seq,
            hash: r.hash,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Durability, Seal, SledStore};
    use async_trait::async_trait;

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

    /// A store whose appends fail while `failing` is set, and take 100 ms with `slow`;
    /// it counts its syncs.
    struct FlakyStore {
        inner: SledStore,
        failing: AtomicBool,
        slow: AtomicBool,
        syncs: AtomicU64,
    }

    /// A trail over a new [`FlakyStore`] in a temporary directory.
    async fn flaky_trail(slow: bool) -> (tempfile::TempDir, Arc<FlakyStore>, AuditTrail) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FlakyStore {
            inner: SledStore::open(&dir.path().join("db")).unwrap(),
            failing: AtomicBool::new(false),
            slow: AtomicBool::new(slow),
            syncs: AtomicU64::new(0),
        });
        let trail = AuditTrail::open(store.clone() as Arc<dyn AuditStore>)
            .await
            .unwrap();
        (dir, store, trail)
    }

    #[async_trait]
    impl Durability for FlakyStore {
        async fn sync(&self) -> Result<(), StoreError> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            self.inner.sync().await
        }
    }

    #[async_trait]
    impl AuditStore for FlakyStore {
        async fn append_audit(&self, seal: Seal<'_>) -> Result<(), StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable("test", "disk gone"));
            }
            if self.slow.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            self.inner.append_audit(seal).await
        }
        async fn audit_chain_end(&self) -> Result<Option<ChainEnd>, StoreError> {
            self.inner.audit_chain_end().await
        }
        async fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
            self.inner.last_audit_block().await
        }
        async fn audit_blocks_before(
            &self,
            before: Option<u64>,
            limit: usize,
        ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            self.inner.audit_blocks_before(before, limit).await
        }
        async fn audit_blocks_from(
            &self,
            from: u64,
            limit: usize,
        ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            self.inner.audit_blocks_from(from, limit).await
        }
        async fn audit_anchor(&self) -> Result<Option<ChainEnd>, StoreError> {
            self.inner.audit_anchor().await
        }
        async fn prune_audit_blocks(
            &self,
            upto: u64,
            anchor: ChainEnd,
        ) -> Result<usize, StoreError> {
            self.inner.prune_audit_blocks(upto, anchor).await
        }
    }

    #[tokio::test]
    async fn a_trail_that_cannot_be_written_holds_records_until_it_can_and_loses_nothing() {
        let (_dir, store, trail) = flaky_trail(false).await;
        trail.append(&event("A")).unwrap();
        store.failing.store(true, Ordering::SeqCst);
        assert!(trail.commit().await.is_err());
        assert!(trail.persist().await.is_err(), "a mutating call is refused");
        // Other calls' records wait in memory for the store.
        trail.append(&event("B")).unwrap();
        assert!(trail.has_pending());
        store.failing.store(false, Ordering::SeqCst);
        trail.commit().await.unwrap();
        trail.append(&event("C")).unwrap();
        trail.commit().await.unwrap();
        let report = verify(store.as_ref(), |_| {}).await.unwrap().unwrap();
        assert_eq!(
            report.records, 3,
            "A and B kept across the failed commits, then C"
        );
    }

    #[tokio::test]
    async fn a_commit_whose_caller_goes_away_still_writes_its_batch() {
        let (_dir, store, trail) = flaky_trail(true).await;
        trail.append(&event("A")).unwrap();
        trail.append(&event("B")).unwrap();
        // The caller gives up while the store is writing (a cancelled call, an aborted
        // background task): the batch it took must not be lost.
        let cancelled = tokio::time::timeout(std::time::Duration::from_millis(10), trail.commit());
        assert!(cancelled.await.is_err(), "still writing when abandoned");
        trail.append(&event("C")).unwrap();
        trail.commit().await.unwrap();
        let report = verify(store.as_ref(), |_| {}).await.unwrap().unwrap();
        assert_eq!(
            report.records, 3,
            "A and B written by the abandoned commit, then C"
        );
    }

    #[tokio::test]
    async fn a_persisted_record_is_synced_once_and_never_left_unsynced() {
        let (_dir, store, trail) = flaky_trail(false).await;
        let syncs = || store.syncs.load(Ordering::SeqCst);
        trail.append(&event("A")).unwrap();
        trail.persist_appended().await.unwrap();
        assert_eq!(syncs(), 1, "A's append was durable");
        trail.persist_appended().await.unwrap();
        assert_eq!(syncs(), 1, "nothing appended since: already durable");
        // Written by a commit that was not durable: persisting it still syncs.
        trail.append(&event("B")).unwrap();
        trail.commit().await.unwrap();
        trail.persist_appended().await.unwrap();
        assert_eq!(syncs(), 2);
        let report = verify(store.as_ref(), |_| {}).await.unwrap().unwrap();
        assert_eq!(report.records, 2);
    }

    #[tokio::test]
    async fn the_chain_continues_across_commits_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        let trail = AuditTrail::open(store.clone() as Arc<dyn AuditStore>)
            .await
            .unwrap();
        for _ in 0..3 {
            trail.append(&event("A")).unwrap();
        }
        trail.commit().await.unwrap();
        trail.append(&event("B")).unwrap();
        trail.commit().await.unwrap();
        // Not committed: gone with the process, as a crash would lose it.
        trail.append(&event("C")).unwrap();
        drop(trail);
        let trail = AuditTrail::open(store.clone() as Arc<dyn AuditStore>)
            .await
            .unwrap();
        trail.append(&event("D")).unwrap();
        trail.commit().await.unwrap();
        let report = verify(store.as_ref(), |_| {}).await.unwrap().unwrap();
        assert_eq!((report.records, report.last_seq), (5, Some(5)));
    }
}
