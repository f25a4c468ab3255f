//! Keys, versions, counters and the expiry index in PostgreSQL.

use std::time::Instant;

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{PostgresStore, db_error};
use crate::domain::model::{KeyFilter, KeyRecord, KeyState, Millis, VersionRecord};
use crate::store::{KeyStore, PageStart, Revision, StoreError};

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

pub(super) fn decode<T: DeserializeOwned>(what: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::corrupt(what, e.to_string()))
}

/// A key from a `revision, record` row.
pub(super) fn key_from(row: &Row) -> Result<KeyRecord, StoreError> {
    let revision: i64 = row.get(0);
    let mut key: KeyRecord = decode("key", row.get::<_, &[u8]>(1))?;
    key.revision = revision as Revision;
    Ok(key)
}

/// Counter rows per (instance, state, extractable): a key counts in the shard its id
/// picks, so concurrent creates in one instance lock different rows instead of queueing
/// on one until each commits. CountKeys sums at most 10 x 16 rows.
const COUNTER_SHARDS: u128 = 16;

/// The counter rows a change touches, each with its delta, in one fixed order (so two
/// transactions never wait on each other's counters in a cycle).
fn counter_changes(previous: Option<&KeyRecord>, next: &KeyRecord) -> Vec<(i16, bool, i16, i64)> {
    let shard = (next.id.as_u128() % COUNTER_SHARDS) as i16;
    let mut changes = vec![(next.state.code() as i16, next.extractable, shard, 1i64)];
    if let Some(previous) = previous {
        let old = (previous.state.code() as i16, previous.extractable);
        if old == (changes[0].0, changes[0].1) {
            return Vec::new();
        }
        changes.push((old.0, old.1, shard, -1));
    }
    changes.sort_by_key(|(state, extractable, shard, _)| (*state, *extractable, *shard));
    changes
}

async fn apply_counters(
    tx: &Transaction<'_>,
    instance: &str,
    changes: &[(i16, bool, i16, i64)],
) -> Result<(), StoreError> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO kms_key_counters (instance, state, extractable, shard, count)
             VALUES ($1, $2, $3, $4, greatest($5::bigint, 0))
             ON CONFLICT (instance, state, extractable, shard)
             DO UPDATE SET count = greatest(kms_key_counters.count + $5::bigint, 0)",
        )
        .await
        .map_err(db_error)?;
    for (state, extractable, shard, delta) in changes {
        tx.execute(&statement, &[&instance, state, extractable, shard, delta])
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

/// Adds a version, or replaces the one with its id (a re-import restores material).
async fn insert_version(tx: &Transaction<'_>, version: &VersionRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO kms_versions (key_id, id, created_at, record) VALUES ($1, $2, $3, $4)
         ON CONFLICT (key_id, id)
         DO UPDATE SET created_at = excluded.created_at, record = excluded.record",
        &[
            &version.key_id,
            &version.id,
            &version.created_at,
            &encode(version),
        ],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn has_keys(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT EXISTS (SELECT 1 FROM kms_keys)", &[])
            .await
            .map_err(db_error)?;
        Ok(row.get(0))
    }

    async fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError> {
        let key = KeyRecord {
            revision: 0,
            ..key.clone()
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let inserted = tx
            .execute(
                "INSERT INTO kms_keys
                     (instance, id, revision, state, extractable, created_at,
                      next_transition_at, record)
                 VALUES ($1, $2, 0, $3, $4, $5, $6, $7)
                 ON CONFLICT DO NOTHING",
                &[
                    &key.instance,
                    &key.id,
                    &(key.state.code() as i16),
                    &key.extractable,
                    &key.created_at,
                    &key.next_transition_at(),
                    &encode(&key),
                ],
            )
            .await
            .map_err(db_error)?;
        if inserted == 0 {
            return Err(StoreError::Conflict);
        }
        apply_counters(&tx, &key.instance, &counter_changes(None, &key)).await?;
        if let Some(version) = version {
            insert_version(&tx, version).await?;
        }
        tx.commit().await.map_err(db_error)?;
        self.cache.put(&key, Instant::now());
        Ok(())
    }

    async fn get_key(&self, instance: &str, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        if let Some(key) = self.cache.get(instance, id) {
            return Ok(Some(key));
        }
        let read_at = Instant::now();
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT revision, record FROM kms_keys WHERE instance = $1 AND id = $2")
            .await
            .map_err(db_error)?;
        let Some(row) = client
            .query_opt(&statement, &[&instance, &id])
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let key = key_from(&row)?;
        self.cache.put(&key, read_at);
        Ok(Some(key))
    }

    async fn replace_key(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError> {
        crate::store::check_key_revision(previous, next)?;
        let outcome = self
            .try_replace(previous, next, new_version, erase_material)
            .await;
        match &outcome {
            Ok(()) => self.cache.put(next, Instant::now()),
            // Whatever is cached is not what the database holds.
            Err(_) => self.cache.evict(&previous.id),
        }
        outcome
    }

    async fn get_version(
        &self,
        key: &KeyRecord,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError> {
        let key_id = key.id;
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT record FROM kms_versions WHERE key_id = $1 AND id = $2")
            .await
            .map_err(db_error)?;
        client
            .query_opt(&statement, &[&key_id, &version_id])
            .await
            .map_err(db_error)?
            .map(|row| decode("version", row.get::<_, &[u8]>(0)))
            .transpose()
    }

    async fn list_versions(&self, key: &KeyRecord) -> Result<Vec<VersionRecord>, StoreError> {
        let key_id = key.id;
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT record FROM kms_versions WHERE key_id = $1
                 ORDER BY created_at DESC, id DESC",
            )
            .await
            .map_err(db_error)?;
        client
            .query(&statement, &[&key_id])
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| decode("version", row.get::<_, &[u8]>(0)))
            .collect()
    }

    async fn list_versions_page(
        &self,
        key: &KeyRecord,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, u64), StoreError> {
        let key_id = key.id;
        let client = self.client().await?;
        let total: i64 = client
            .query_one(
                "SELECT count(*) FROM kms_versions WHERE key_id = $1",
                &[&key_id],
            )
            .await
            .map_err(db_error)?
            .get(0);
        let rows = match start {
            PageStart::Offset(offset) => {
                let statement = client
                    .prepare_cached(
                        "SELECT record FROM kms_versions WHERE key_id = $1
                         ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
                    )
                    .await
                    .map_err(db_error)?;
                client
                    .query(&statement, &[&key_id, &(limit as i64), &(offset as i64)])
                    .await
            }
            PageStart::After(position) => {
                let statement = client
                    .prepare_cached(
                        "SELECT record FROM kms_versions WHERE key_id = $1
                         AND (created_at, id) < ($2, $3)
                         ORDER BY created_at DESC, id DESC LIMIT $4",
                    )
                    .await
                    .map_err(db_error)?;
                client
                    .query(
                        &statement,
                        &[&key_id, &position.created_at, &position.id, &(limit as i64)],
                    )
                    .await
            }
        }
        .map_err(db_error)?;
        let page = rows
            .iter()
            .map(|row| decode("version", row.get::<_, &[u8]>(0)))
            .collect::<Result<_, _>>()?;
        Ok((page, total as u64))
    }

    async fn list_keys(
        &self,
        instance: &str,
        filter: &KeyFilter,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        let total = self.count_keys(instance, filter).await?;
        let states: Option<Vec<i16>> = (!filter.states.is_empty())
            .then(|| filter.states.iter().map(|s| s.code() as i16).collect());
        let client = self.client().await?;
        // Two statements, so that each keeps its plan on the (instance, created_at, id)
        // index: a row comparison seeks to the position, an offset walks to it.
        let rows = match start {
            PageStart::Offset(offset) => {
                let statement = client
                    .prepare_cached(
                        "SELECT revision, record FROM kms_keys
                         WHERE instance = $1
                           AND ($2::smallint[] IS NULL OR state = ANY($2))
                           AND ($3::boolean IS NULL OR extractable = $3)
                         ORDER BY created_at, id
                         OFFSET $4 LIMIT $5",
                    )
                    .await
                    .map_err(db_error)?;
                client
                    .query(
                        &statement,
                        &[
                            &instance,
                            &states,
                            &filter.extractable,
                            &(offset as i64),
                            &(limit as i64),
                        ],
                    )
                    .await
            }
            PageStart::After(after) => {
                let statement = client
                    .prepare_cached(
                        "SELECT revision, record FROM kms_keys
                         WHERE instance = $1
                           AND ($2::smallint[] IS NULL OR state = ANY($2))
                           AND ($3::boolean IS NULL OR extractable = $3)
                           AND (created_at, id) > ($4, $5)
                         ORDER BY created_at, id
                         LIMIT $6",
                    )
                    .await
                    .map_err(db_error)?;
                client
                    .query(
                        &statement,
                        &[
                            &instance,
                            &states,
                            &filter.extractable,
                            &after.created_at,
                            &after.id,
                            &(limit as i64),
                        ],
                    )
                    .await
            }
        }
        .map_err(db_error)?;
        let page = rows.iter().map(key_from).collect::<Result<_, _>>()?;
        Ok((page, total))
    }

    async fn count_keys(&self, instance: &str, filter: &KeyFilter) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT state, extractable, count FROM kms_key_counters WHERE instance = $1",
            )
            .await
            .map_err(db_error)?;
        let mut total = 0u64;
        for row in client
            .query(&statement, &[&instance])
            .await
            .map_err(db_error)?
        {
            let state = KeyState::from_code(row.get::<_, i16>(0) as u8)
                .ok_or_else(|| StoreError::corrupt("key counter", "unknown state"))?;
            if filter.matches(state, row.get(1)) {
                total += row.get::<_, i64>(2).max(0) as u64;
            }
        }
        Ok(total)
    }

    async fn due_for_expiry(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(String, Uuid)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT instance, id FROM kms_keys WHERE next_transition_at <= $1
                 ORDER BY next_transition_at LIMIT $2",
                &[&now, &(limit as i64)],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }
}

impl PostgresStore {
    async fn try_replace(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let statement = tx
            .prepare_cached(
                "UPDATE kms_keys SET revision = $3, state = $4, extractable = $5,
                     next_transition_at = $6, record = $7
                 WHERE instance = $1 AND id = $2 AND revision = $8",
            )
            .await
            .map_err(db_error)?;
        let updated = tx
            .execute(
                &statement,
                &[
                    &previous.instance,
                    &previous.id,
                    &(next.revision as i64),
                    &(next.state.code() as i16),
                    &next.extractable,
                    &next.next_transition_at(),
                    &encode(next),
                    &(previous.revision as i64),
                ],
            )
            .await
            .map_err(db_error)?;
        if updated == 0 {
            return Err(StoreError::Conflict);
        }
        apply_counters(&tx, &next.instance, &counter_changes(Some(previous), next)).await?;
        if erase_material {
            let rows = tx
                .query(
                    "SELECT id, record FROM kms_versions WHERE key_id = $1",
                    &[&previous.id],
                )
                .await
                .map_err(db_error)?;
            for row in rows {
                let version: VersionRecord = decode("version", row.get::<_, &[u8]>(1))?;
                if version.wrapped.is_none() {
                    continue;
                }
                let erased = VersionRecord {
                    wrapped: None,
                    ..version
                };
                tx.execute(
                    "UPDATE kms_versions SET record = $3 WHERE key_id = $1 AND id = $2",
                    &[&previous.id, &row.get::<_, Uuid>(0), &encode(&erased)],
                )
                .await
                .map_err(db_error)?;
            }
        }
        if let Some(version) = new_version {
            insert_version(&tx, version).await?;
        }
        tx.commit().await.map_err(db_error)
    }
}
