//! The audit trail in PostgreSQL: one chain for every replica. `kms_audit_chain` holds
//! its end and anchor in one row; locking that row serialises appends across replicas.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::{PostgresStore, db_error};
use crate::store::{AuditStore, ChainEnd, Seal, StoreError};

pub(super) fn chain_end(
    seq: Option<i64>,
    hash: Option<Vec<u8>>,
    what: &str,
) -> Result<Option<ChainEnd>, StoreError> {
    match (seq, hash) {
        (Some(seq), Some(hash)) => Ok(Some(ChainEnd {
            seq: seq as u64,
            hash: hash
                .try_into()
                .map_err(|_| StoreError::corrupt(what, "hash is not 32 bytes"))?,
        })),
        (None, None) => Ok(None),
        _ => Err(StoreError::corrupt(what, "half set")),
    }
}

fn block_from(row: &Row) -> (u64, Vec<u8>) {
    (row.get::<_, i64>(0) as u64, row.get(1))
}

#[async_trait]
impl AuditStore for PostgresStore {
    async fn append_audit(&self, seal: Seal<'_>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let row = tx
            .query_one(
                "SELECT end_seq, end_hash FROM kms_audit_chain WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(db_error)?;
        let sealed = seal(chain_end(row.get(0), row.get(1), "audit chain end")?);
        let (seqs, blocks): (Vec<i64>, Vec<Vec<u8>>) = sealed
            .blocks
            .into_iter()
            .map(|(seq, block)| (seq as i64, block))
            .unzip();
        if !seqs.is_empty() {
            tx.execute(
                "INSERT INTO kms_audit_blocks (first_seq, block)
                 SELECT * FROM unnest($1::bigint[], $2::bytea[])",
                &[&seqs, &blocks],
            )
            .await
            .map_err(db_error)?;
        }
        if let Some(end) = sealed.end {
            tx.execute(
                "UPDATE kms_audit_chain SET end_seq = $1, end_hash = $2 WHERE id = 1",
                &[&(end.seq as i64), &end.hash.as_slice()],
            )
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)
    }

    async fn audit_chain_end(&self) -> Result<Option<ChainEnd>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT end_seq, end_hash FROM kms_audit_chain WHERE id = 1",
                &[],
            )
            .await
            .map_err(db_error)?;
        chain_end(row.get(0), row.get(1), "audit chain end")
    }

    async fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT first_seq, block FROM kms_audit_blocks ORDER BY first_seq DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(db_error)?
            .map(|row| block_from(&row)))
    }

    async fn audit_blocks_before(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let before = before.map_or(i64::MAX, |seq| seq as i64);
        Ok(client
            .query(
                "SELECT first_seq, block FROM kms_audit_blocks WHERE first_seq < $1
                 ORDER BY first_seq DESC LIMIT $2",
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(block_from)
            .collect())
    }

    async fn audit_blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT first_seq, block FROM kms_audit_blocks WHERE first_seq >= $1
                 ORDER BY first_seq LIMIT $2",
                &[&(from.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(block_from)
            .collect())
    }

    async fn audit_anchor(&self) -> Result<Option<ChainEnd>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT anchor_seq, anchor_hash FROM kms_audit_chain WHERE id = 1",
                &[],
            )
            .await
            .map_err(db_error)?;
        chain_end(row.get(0), row.get(1), "audit anchor")
    }

    /// Another replica may prune at the same time: the anchor only ever moves forward,
    /// so the later of two prunes cannot point the chain back at removed records.
    async fn prune_audit_blocks(&self, upto: u64, anchor: ChainEnd) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let row = tx
            .query_one(
                "SELECT anchor_seq FROM kms_audit_chain WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(db_error)?;
        if row
            .get::<_, Option<i64>>(0)
            .is_some_and(|current| current as u64 >= anchor.seq)
        {
            return Ok(0);
        }
        let removed = tx
            .execute(
                "DELETE FROM kms_audit_blocks WHERE first_seq <= $1",
                &[&(upto as i64)],
            )
            .await
            .map_err(db_error)?;
        tx.execute(
            "UPDATE kms_audit_chain SET anchor_seq = $1, anchor_hash = $2 WHERE id = 1",
            &[&(anchor.seq as i64), &anchor.hash.as_slice()],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(removed as usize)
    }
}
