//! Import tokens, import parameters and the shared RSA key-pair pool in PostgreSQL.

use async_trait::async_trait;
use tokio_postgres::Row;
use uuid::Uuid;

use super::keys::{decode, encode};
use super::{PostgresStore, db_error};
use crate::domain::model::{ImportParametersRecord, ImportTokenRecord, Millis};
use crate::hsm::RsaKeyPair;
use crate::store::{ImportStore, Revision, StoreError};

pub(super) fn token_from(row: &Row) -> Result<ImportTokenRecord, StoreError> {
    let mut token: ImportTokenRecord = decode("import token", row.get::<_, &[u8]>(1))?;
    token.revision = row.get::<_, i64>(0) as Revision;
    Ok(token)
}

#[async_trait]
impl ImportStore for PostgresStore {
    async fn get_import_token(
        &self,
        instance: &str,
    ) -> Result<Option<ImportTokenRecord>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT revision, record FROM kms_import_tokens WHERE instance = $1")
            .await
            .map_err(db_error)?;
        client
            .query_opt(&statement, &[&instance])
            .await
            .map_err(db_error)?
            .map(|row| token_from(&row))
            .transpose()
    }

    async fn swap_import_token(
        &self,
        instance: &str,
        previous: Option<&ImportTokenRecord>,
        next: Option<&ImportTokenRecord>,
    ) -> Result<(), StoreError> {
        crate::store::check_token_revision(previous, next)?;
        let client = self.client().await?;
        let changed = match (previous, next) {
            (None, Some(next)) => client
                .execute(
                    "INSERT INTO kms_import_tokens (instance, id, revision, record)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[&instance, &next.id, &(next.revision as i64), &encode(next)],
                )
                .await
                .map_err(db_error)?,
            (Some(previous), Some(next)) => client
                .execute(
                    "UPDATE kms_import_tokens SET id = $2, revision = $3, record = $4
                     WHERE instance = $1 AND id = $5 AND revision = $6",
                    &[
                        &instance,
                        &next.id,
                        &(next.revision as i64),
                        &encode(next),
                        &previous.id,
                        &(previous.revision as i64),
                    ],
                )
                .await
                .map_err(db_error)?,
            (Some(previous), None) => client
                .execute(
                    "DELETE FROM kms_import_tokens
                     WHERE instance = $1 AND id = $2 AND revision = $3",
                    &[&instance, &previous.id, &(previous.revision as i64)],
                )
                .await
                .map_err(db_error)?,
            (None, None) => {
                let present = client
                    .query_opt(
                        "SELECT 1 FROM kms_import_tokens WHERE instance = $1",
                        &[&instance],
                    )
                    .await
                    .map_err(db_error)?;
                u64::from(present.is_none())
            }
        };
        if changed == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn import_tokens(&self) -> Result<Vec<ImportTokenRecord>, StoreError> {
        let client = self.client().await?;
        client
            .query("SELECT revision, record FROM kms_import_tokens", &[])
            .await
            .map_err(db_error)?
            .iter()
            .map(token_from)
            .collect()
    }

    async fn get_import_parameters(
        &self,
        key_id: Uuid,
    ) -> Result<Option<ImportParametersRecord>, StoreError> {
        let client = self.client().await?;
        client
            .query_opt(
                "SELECT record FROM kms_import_parameters WHERE key_id = $1",
                &[&key_id],
            )
            .await
            .map_err(db_error)?
            .map(|row| decode("import parameters", row.get::<_, &[u8]>(0)))
            .transpose()
    }

    async fn put_import_parameters(
        &self,
        parameters: &ImportParametersRecord,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO kms_import_parameters (key_id, expires_at, record)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (key_id) DO UPDATE
                     SET expires_at = excluded.expires_at, record = excluded.record",
                &[
                    &parameters.key_id,
                    &parameters.expires_at,
                    &encode(parameters),
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn remove_import_parameters(&self, key_id: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM kms_import_parameters WHERE key_id = $1",
                &[&key_id],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn expired_import_parameters(&self, now: Millis) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT key_id FROM kms_import_parameters WHERE expires_at <= $1",
                &[&now],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    async fn push_key_pair(&self, pair: &RsaKeyPair) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO kms_rsa_pool (bits, record) VALUES ($1, $2)",
                &[&(pair.bits as i32), &encode(pair)],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn take_key_pair(&self, bits: u32) -> Result<Option<RsaKeyPair>, StoreError> {
        let client = self.client().await?;
        client
            .query_opt(
                "DELETE FROM kms_rsa_pool WHERE id = (
                     SELECT id FROM kms_rsa_pool WHERE bits = $1
                     ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
                 ) RETURNING record",
                &[&(bits as i32)],
            )
            .await
            .map_err(db_error)?
            .map(|row| decode("RSA key pair", row.get::<_, &[u8]>(0)))
            .transpose()
    }

    async fn count_key_pairs(&self, bits: u32) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM kms_rsa_pool WHERE bits = $1",
                &[&(bits as i32)],
            )
            .await
            .map_err(db_error)?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    async fn clear_import_state(&self) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let mut dropped = 0;
        for table in ["kms_import_tokens", "kms_import_parameters", "kms_rsa_pool"] {
            dropped += tx
                .execute(&format!("DELETE FROM {table}"), &[])
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(dropped as usize)
    }
}
