//! `kms audit verify`: checks the whole hash chain of an audit trail: an embedded data
//! directory's (redb or sled) (offline: the server must be stopped, or run it on a copy) or a
//! PostgreSQL store's (online: replicas may keep appending; what was committed when the
//! walk reached the end is checked).

use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::{VerifyFailure, VerifyReport, verify};
use crate::cli::progress::Progress;
use crate::config::{ConfigError, ProcessEnv, postgres_for_command};
use crate::store::{PostgresStore, RedbStore, SledStore, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AuditCommandError {
    #[error("no database at {0}")]
    NoDatabase(String),
    #[error(
        "cannot open the database at {path} (a running server holds it: stop the server, or \
         verify a copy of the data directory): {source}"
    )]
    Open { path: String, source: StoreError },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("reading the audit trail: {0}")]
    Store(#[from] StoreError),
    #[error("the audit trail is broken at {0}")]
    Broken(VerifyFailure),
    #[error("give --data-dir (sled or redb) or --store-url / KMS_STORE_URL (PostgreSQL)")]
    NoTarget,
}

/// Which store a command works on.
pub enum StoreTarget {
    DataDir(PathBuf),
    Url(String),
}

impl StoreTarget {
    pub fn from_args(
        data_dir: Option<PathBuf>,
        store_url: Option<String>,
    ) -> Result<Self, AuditCommandError> {
        match (store_url, data_dir) {
            (Some(url), _) => Ok(StoreTarget::Url(url)),
            (None, Some(dir)) => Ok(StoreTarget::DataDir(dir)),
            (None, None) => Err(AuditCommandError::NoTarget),
        }
    }

    /// Opens the store: a data directory's existing redb or sled database, or PostgreSQL.
    pub async fn open(&self) -> Result<Arc<dyn Store>, AuditCommandError> {
        match self {
            StoreTarget::DataDir(dir) => Ok(open_data_dir(dir)?.into_store()),
            StoreTarget::Url(url) => {
                let config = postgres_for_command(url.clone(), &ProcessEnv)?;
                Ok(Arc::new(PostgresStore::connect(&config).await?))
            }
        }
    }
}

/// A stopped server's embedded store, as found in its data directory.
pub enum EmbeddedStore {
    Sled(SledStore),
    Redb(RedbStore),
}

impl EmbeddedStore {
    pub fn into_store(self) -> Arc<dyn Store> {
        match self {
            EmbeddedStore::Sled(store) => Arc::new(store),
            EmbeddedStore::Redb(store) => Arc::new(store),
        }
    }

    pub fn store(&self) -> &dyn Store {
        match self {
            EmbeddedStore::Sled(store) => store,
            EmbeddedStore::Redb(store) => store,
        }
    }
}

/// Opens a data directory's existing embedded store: redb's `kms.redb` if there is one,
/// else sled's `db`. Its server must be stopped: both hold a lock on their files.
pub fn open_data_dir(dir: &std::path::Path) -> Result<EmbeddedStore, AuditCommandError> {
    let open_error = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| AuditCommandError::Open { path, source }
    };
    let redb = dir.join("kms.redb");
    if redb.is_file() {
        return RedbStore::open(&redb, crate::store::DEFAULT_CACHE_BYTES)
            .map(EmbeddedStore::Redb)
            .map_err(open_error(&redb));
    }
    let db = dir.join("db");
    if !db.exists() {
        return Err(AuditCommandError::NoDatabase(format!(
            "{} or {}",
            redb.display(),
            db.display()
        )));
    }
    SledStore::open(&db)
        .map(EmbeddedStore::Sled)
        .map_err(open_error(&db))
}

/// Verifies the target's trail, showing progress on stderr.
pub async fn verify_store(target: &StoreTarget) -> Result<VerifyReport, AuditCommandError> {
    let store = target.open().await?;
    // The records between the anchor and the chain's end, as far as they are known now.
    let first = store
        .audit_anchor()
        .await?
        .map_or(1, |anchor| anchor.seq + 1);
    let total = store
        .audit_chain_end()
        .await?
        .map(|end| (end.seq + 1).saturating_sub(first));
    let progress = Progress::new("verified audit records", total);
    let mut shown = 0;
    let outcome = verify(store.as_ref(), |checked| {
        progress.add(checked - shown);
        shown = checked;
    })
    .await?;
    progress.finish();
    outcome.map_err(AuditCommandError::Broken)
}
