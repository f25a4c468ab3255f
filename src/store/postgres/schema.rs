//! The PostgreSQL schema and its migrations.
//!
//! Migrations are numbered from 1 and applied in order at start, all in one transaction
//! that first takes a transaction-level advisory lock: replicas starting together
//! serialise there, and the second finds the work done. A database whose newest applied
//! migration is beyond [`MIGRATIONS`] was written by a newer build and is refused.
//!
//! Record bodies are the same JSON the sled backend stores; the columns beside them are
//! what queries filter, order and compare on (revision, state, times).

use deadpool_postgres::Client;

use super::{BACKEND, db_error};
use crate::store::StoreError;

/// `pg_advisory_xact_lock` key of the migration step ("kmsschem" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b6d_7373_6368_656d;

/// Each entry is one migration; its number is its position plus one.
pub const MIGRATIONS: &[&str] = &[
    // 1: keys, versions, counters, import state, audit trail.
    r#"
    CREATE TABLE kms_keys (
        instance text NOT NULL,
        id uuid NOT NULL,
        revision bigint NOT NULL,
        state smallint NOT NULL,
        extractable boolean NOT NULL,
        created_at bigint NOT NULL,
        next_transition_at bigint,
        record bytea NOT NULL,
        PRIMARY KEY (instance, id)
    );
    CREATE UNIQUE INDEX kms_keys_id ON kms_keys (id);
    CREATE INDEX kms_keys_order ON kms_keys (instance, created_at, id);
    CREATE INDEX kms_keys_due ON kms_keys (next_transition_at)
        WHERE next_transition_at IS NOT NULL;
    CREATE TABLE kms_key_counters (
        instance text NOT NULL,
        state smallint NOT NULL,
        extractable boolean NOT NULL,
        shard smallint NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (instance, state, extractable, shard)
    );
    CREATE TABLE kms_versions (
        key_id uuid NOT NULL,
        id uuid NOT NULL,
        created_at bigint NOT NULL,
        record bytea NOT NULL,
        PRIMARY KEY (key_id, id)
    );
    CREATE INDEX kms_versions_order ON kms_versions (key_id, created_at DESC, id DESC);
    CREATE TABLE kms_import_tokens (
        instance text PRIMARY KEY,
        id uuid NOT NULL,
        revision bigint NOT NULL,
        record bytea NOT NULL
    );
    CREATE TABLE kms_import_parameters (
        key_id uuid PRIMARY KEY,
        expires_at bigint NOT NULL,
        record bytea NOT NULL
    );
    CREATE TABLE kms_rsa_pool (
        id bigserial PRIMARY KEY,
        bits integer NOT NULL,
        record bytea NOT NULL
    );
    CREATE INDEX kms_rsa_pool_bits ON kms_rsa_pool (bits, id);
    CREATE TABLE kms_audit_blocks (
        first_seq bigint PRIMARY KEY,
        block bytea NOT NULL
    );
    CREATE TABLE kms_audit_chain (
        id smallint PRIMARY KEY CHECK (id = 1),
        end_seq bigint,
        end_hash bytea,
        anchor_seq bigint,
        anchor_hash bytea
    );
    INSERT INTO kms_audit_chain (id) VALUES (1);
    "#,
];

/// The schema version this build writes: the number of migrations it knows.
pub fn known_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// Applies what is missing; refuses a newer schema. Returns the version found before.
pub(super) async fn migrate(client: &mut Client, location: &str) -> Result<u32, StoreError> {
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kms_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db_error)?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM kms_schema", &[])
        .await
        .map_err(db_error)?
        .get(0);
    let found = found as u32;
    if found > known_version() {
        return Err(StoreError::SchemaTooNew {
            location: location.to_owned(),
            found,
            known: known_version(),
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(migration).await.map_err(db_error)?;
        tx.execute(
            "INSERT INTO kms_schema (version) VALUES ($1)",
            &[&(index as i32 + 1)],
        )
        .await
        .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    if found < known_version() {
        tracing::info!(
            backend = BACKEND,
            from = found,
            to = known_version(),
            "migrated the store's schema"
        );
    }
    Ok(found)
}

/// The newest applied migration.
pub(super) async fn version(client: &Client) -> Result<u32, StoreError> {
    let found: i32 = client
        .query_one("SELECT coalesce(max(version), 0) FROM kms_schema", &[])
        .await
        .map_err(db_error)?
        .get(0);
    Ok(found as u32)
}
