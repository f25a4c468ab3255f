//! `kms store migrate --from <sled data dir> --to <postgres url>`: moves an embedded
//! default's store to PostgreSQL, so the same token serves it from there.
//!
//! Decisions: the target must hold no keys and no audit records (a migration never
//! merges); the source server must be stopped (sled's lock says so). Every record is
//! copied through the store traits, so the target's own invariants (counters, indexes)
//! are built by the target: keys with their versions oldest first, import tokens,
//! import parameters, pooled RSA pairs, then the audit trail's blocks as stored (the
//! chain is not re-hashed, so `kms audit verify --store-url` checks the same chain) and
//! its anchor. Key revisions start again at 0 in the target.

use std::path::PathBuf;

use crate::cli::audit::{AuditCommandError, open_data_dir};
use crate::cli::progress::Progress;
use crate::config::{ProcessEnv, postgres_for_command};
use crate::store::snapshot::{NotEmpty, copy, ensure_empty};
use crate::store::{ItemCounts, PostgresStore, StoreError, StoreItem};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Open(#[from] AuditCommandError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotEmpty(#[from] NotEmpty),
}

pub async fn migrate(from: PathBuf, to: String) -> Result<ItemCounts, MigrateError> {
    let sled = open_data_dir(&from)?;
    let target = PostgresStore::connect(&postgres_for_command(to, &ProcessEnv)?).await?;
    ensure_empty(&target).await?;
    let progress = Progress::new("migrated records", None);
    let copied = copy(&sled, &target, &|_: &StoreItem| progress.add(1)).await?;
    progress.finish();
    Ok(copied)
}

/// `kms store stats`: a table of the sled trees and the size on disk.
pub async fn stats(data_dir: PathBuf) -> Result<String, MigrateError> {
    let sled = open_data_dir(&data_dir)?;
    let (trees, on_disk) = sled.tree_sizes().await?;
    let mut out = String::from("| tree | entries | bytes (keys + values) |\n|---|---:|---:|\n");
    for (name, entries, bytes) in trees {
        out.push_str(&format!("| {name} | {entries} | {bytes} |\n"));
    }
    out.push_str(&format!("\nsize on disk: {on_disk} bytes\n"));
    Ok(out)
}
