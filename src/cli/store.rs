//! `kms store migrate --from <data dir> (--to <postgres url> | --to-redb <file>)`: moves
//! an embedded store (sled or redb) to PostgreSQL, or a sled store to redb, so the same
//! token serves it from there.
//!
//! Decisions: the target must hold no keys and no audit records (a migration never
//! merges); the source server must be stopped (the embedded stores' locks say so). Every record is
//! copied through the store traits, so the target's own invariants (counters, indexes)
//! are built by the target: keys with their versions oldest first, import tokens,
//! import parameters, pooled RSA pairs, then the audit trail's blocks as stored (the
//! chain is not re-hashed, so `kms audit verify --store-url` checks the same chain) and
//! its anchor. Key revisions start again at 0 in the target.

use std::path::PathBuf;

use crate::cli::audit::{AuditCommandError, EmbeddedStore, open_data_dir};
use crate::cli::progress::Progress;
use crate::config::{ProcessEnv, postgres_for_command};
use crate::store::snapshot::{NotEmpty, copy, ensure_empty};
use crate::store::{
    DEFAULT_CACHE_BYTES, ItemCounts, PostgresStore, RedbStore, SledStore, Store, StoreError,
    StoreItem,
};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "cannot compact the database at {path} (a running server holds it: stop the server \
         first): {source}"
    )]
    Compact { path: String, source: StoreError },
    #[error("{0}")]
    Open(#[from] AuditCommandError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotEmpty(#[from] NotEmpty),
    #[error("give --to (a PostgreSQL URL) or --to-redb (a new redb file)")]
    NoTarget,
}

/// Where a migration writes.
pub enum MigrateTarget {
    Postgres(String),
    Redb(PathBuf),
}

impl MigrateTarget {
    /// From `--to` and `--to-redb` (the command line lets only one through).
    pub fn from_args(to: Option<String>, to_redb: Option<PathBuf>) -> Result<Self, MigrateError> {
        match (to, to_redb) {
            (_, Some(file)) => Ok(MigrateTarget::Redb(file)),
            (Some(url), None) => Ok(MigrateTarget::Postgres(url)),
            (None, None) => Err(MigrateError::NoTarget),
        }
    }
}

pub async fn migrate(from: PathBuf, to: MigrateTarget) -> Result<ItemCounts, MigrateError> {
    let source = open_data_dir(&from)?;
    let target: Box<dyn Store> = match to {
        MigrateTarget::Postgres(url) => {
            Box::new(PostgresStore::connect(&postgres_for_command(url, &ProcessEnv)?).await?)
        }
        MigrateTarget::Redb(path) => Box::new(RedbStore::open(&path, DEFAULT_CACHE_BYTES)?),
    };
    ensure_empty(target.as_ref()).await?;
    let progress = Progress::new("migrated records", None);
    let copied = copy(source.store(), target.as_ref(), &|_: &StoreItem| {
        progress.add(1)
    })
    .await?;
    progress.finish();
    Ok(copied)
}

/// `kms store compact`: gives back the space an embedded store's file keeps for dead
/// data, with the server stopped. sled: a copy into a fresh database put in the old
/// one's place ([`SledStore::compact`]); redb: its own compaction, in place. A store
/// opens the same afterwards, record for record. PostgreSQL has its own (`VACUUM
/// FULL`, README).
pub async fn compact(data_dir: PathBuf) -> Result<String, MigrateError> {
    let redb = data_dir.join("kms.redb");
    let sled = data_dir.join("db");
    let run = move || -> Result<String, MigrateError> {
        let failed = |path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| MigrateError::Compact { path, source }
        };
        if redb.is_file() {
            let (before, after) = crate::store::redb::compact_file(&redb).map_err(failed(&redb))?;
            return Ok(format!(
                "compacted {}: {before} -> {after} bytes on disk",
                redb.display()
            ));
        }
        if !sled.exists() {
            return Err(AuditCommandError::NoDatabase(format!(
                "{} or {}",
                redb.display(),
                sled.display()
            ))
            .into());
        }
        let progress = Progress::new("compacted entries", None);
        let shown = std::sync::atomic::AtomicU64::new(0);
        let done = SledStore::compact(&sled, &|copied| {
            let before = shown.swap(copied, std::sync::atomic::Ordering::Relaxed);
            progress.add(copied - before);
        })
        .map_err(failed(&sled))?;
        progress.finish();
        if done.replaced {
            Ok(format!(
                "compacted {}: {} -> {} bytes on disk ({} entries)",
                sled.display(),
                done.bytes_before,
                done.bytes_copied,
                done.entries
            ))
        } else {
            Ok(format!(
                "left {} as it was: a fresh copy took {} bytes on disk, not less than its {} \
                 ({} entries)",
                sled.display(),
                done.bytes_copied,
                done.bytes_before,
                done.entries
            ))
        }
    };
    tokio::task::spawn_blocking(run)
        .await
        .map_err(|e| StoreError::unavailable("embedded", e))?
}

/// `kms store stats`: a table of the embedded store's trees (tables) and its size on
/// disk.
pub async fn stats(data_dir: PathBuf) -> Result<String, MigrateError> {
    let sizes = match open_data_dir(&data_dir)? {
        EmbeddedStore::Sled(sled) => sled.tree_sizes().await?,
        EmbeddedStore::Redb(redb) => redb.table_sizes().await?,
    };
    let mut out = String::from(
        "| tree | entries | bytes (keys + values) | pages (bytes) | of them unused |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for tree in sizes.trees {
        let (pages, unused) = match tree.pages {
            Some(pages) => (pages.bytes.to_string(), pages.unused.to_string()),
            None => ("-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {pages} | {unused} |\n",
            tree.name, tree.entries, tree.bytes
        ));
    }
    out.push_str(&format!("\nsize on disk: {} bytes\n", sizes.on_disk));
    if let Some(in_use) = sizes.in_use {
        out.push_str(&format!(
            "in pages the database uses: {in_use} bytes (the rest is free space, reused as \
             it writes on; `kms store compact` gives it back)\n"
        ));
    }
    Ok(out)
}
