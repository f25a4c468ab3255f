//! A consistent snapshot of the PostgreSQL store: one REPEATABLE READ, READ ONLY
//! transaction sees one moment of every table while replicas go on writing. Tables are
//! read through portals a few hundred rows at a time; a key's versions are merged in
//! from a second portal ordered the same way, so the walk is two scans, not one query
//! per key.

use async_trait::async_trait;
use tokio_postgres::{IsolationLevel, Row};
use uuid::Uuid;

use super::audit::chain_end;
use super::keys::{decode, key_from};
use super::{PostgresStore, db_error};
use crate::domain::model::VersionRecord;
use crate::store::{Snapshot, SnapshotSink, StoreError, StoreItem};

/// Rows fetched per round trip.
const ROWS: i32 = 500;

#[async_trait]
impl Snapshot for PostgresStore {
    async fn snapshot(&self, sink: SnapshotSink) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_error)?;
        let row = tx
            .query_one(
                "SELECT end_seq, end_hash, anchor_seq, anchor_hash FROM kms_audit_chain WHERE id = 1",
                &[],
            )
            .await
            .map_err(db_error)?;
        let chain = StoreItem::AuditChain {
            end: chain_end(row.get(0), row.get(1), "audit chain end")?,
            anchor: chain_end(row.get(2), row.get(3), "audit anchor")?,
        };
        if sink.send(chain).await.is_err() {
            return Ok(());
        }

        let keys = tx
            .bind("SELECT revision, record, id FROM kms_keys ORDER BY id", &[])
            .await
            .map_err(db_error)?;
        let versions = tx
            .bind(
                "SELECT record, key_id FROM kms_versions ORDER BY key_id, created_at, id",
                &[],
            )
            .await
            .map_err(db_error)?;
        let mut pending: std::collections::VecDeque<Row> = Default::default();
        let mut versions_done = false;
        loop {
            let rows = tx.query_portal(&keys, ROWS).await.map_err(db_error)?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let key = key_from(&row)?;
                let id: Uuid = row.get(2);
                let mut own: Vec<VersionRecord> = Vec::new();
                loop {
                    if pending.is_empty() && !versions_done {
                        pending.extend(tx.query_portal(&versions, ROWS).await.map_err(db_error)?);
                        versions_done = pending.is_empty();
                    }
                    let Some(next) = pending.front() else { break };
                    let key_id: Uuid = next.get(1);
                    if key_id > id {
                        break;
                    }
                    let next = pending.pop_front().expect("looked at");
                    // A version whose key is gone (none should be) is left out.
                    if key_id == id {
                        own.push(decode("version", next.get::<_, &[u8]>(0))?);
                    }
                }
                if sink
                    .send(StoreItem::Key { key, versions: own })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
        }

        let tables: [(&str, fn(&Row) -> Result<StoreItem, StoreError>); 4] = [
            (
                "SELECT revision, record FROM kms_import_tokens ORDER BY instance",
                |row| Ok(StoreItem::ImportToken(super::imports::token_from(row)?)),
            ),
            (
                "SELECT record FROM kms_import_parameters ORDER BY key_id",
                |row| {
                    Ok(StoreItem::ImportParameters(decode(
                        "import parameters",
                        row.get::<_, &[u8]>(0),
                    )?))
                },
            ),
            ("SELECT record FROM kms_rsa_pool ORDER BY id", |row| {
                Ok(StoreItem::KeyPair(decode(
                    "RSA key pair",
                    row.get::<_, &[u8]>(0),
                )?))
            }),
            (
                "SELECT first_seq, block FROM kms_audit_blocks ORDER BY first_seq",
                |row| {
                    Ok(StoreItem::AuditBlock {
                        first_seq: row.get::<_, i64>(0) as u64,
                        block: row.get(1),
                    })
                },
            ),
        ];
        for (query, item_from) in tables {
            let portal = tx.bind(query, &[]).await.map_err(db_error)?;
            loop {
                let rows = tx.query_portal(&portal, ROWS).await.map_err(db_error)?;
                if rows.is_empty() {
                    break;
                }
                for row in &rows {
                    if sink.send(item_from(row)?).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        tx.commit().await.map_err(db_error)
    }
}
