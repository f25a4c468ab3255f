//! `kms backup --out FILE` (from a running server) and `kms restore --from FILE`
//! (into a new store, on the token the backup was taken under).
//!
//! Decisions:
//! - The backup is written to `FILE.partial`, synced, checked (trailer, digest, counts)
//!   and only then renamed to `FILE`: a file named `FILE` is always a whole backup.
//! - A restore reads the file twice: once to check it whole, then to load it, so a
//!   damaged file changes nothing. It then opens the HSM the configuration names and
//!   refuses unless the master KEK's check value matches the manifest's: a backup
//!   restored onto the wrong token would hold keys nobody can unwrap.
//! - The target must be empty (a restore never merges). On redb and sled the records are
//!   loaded into `<path>.restoring` and renamed to `<path>` at the end, so an interrupted restore
//!   leaves no half-filled store where the server looks; on PostgreSQL the loader
//!   writes into the database itself (empty it again before a retry).

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use tonic::metadata::MetadataValue;

use crate::api::INSTANCE_HEADER;
use crate::backup::{BackupReader, Manifest, ReadError};
use crate::cli::connect::{ConnectError, Target, connect};
use crate::cli::progress::Progress;
use crate::config::Config;
use crate::hsm::{Hsm, HsmError};
use crate::proto::ExportBackupRequest;
use crate::proto::backup_service_client::BackupServiceClient;
use crate::store::snapshot::{Loader, NotEmpty, ensure_empty};
use crate::store::{ItemCounts, Store, StoreError, StoreItem};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("the server refused or failed the backup: {}", .0.message())]
    Call(tonic::Status),
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("--instance: {0:?} is not an instance id")]
    Instance(String),
    #[error("the HSM: {0}")]
    Hsm(#[from] HsmError),
    #[error(
        "the backup was taken under another master key (KEK {label:?}, check value {expected}); \
         this token's KEK has check value {found}: restore onto the token the backup was \
         taken with (or a clone of it)"
    )]
    WrongKek {
        label: String,
        expected: String,
        found: String,
    },
    #[error("{0}")]
    NotEmpty(#[from] NotEmpty),
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    #[error("a task failed: {0}")]
    Task(String),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::File {
        path: path.display().to_string(),
        source,
    }
}

/// What a backup or restore did.
pub struct Outcome {
    pub manifest: Manifest,
    pub counts: ItemCounts,
    pub bytes: u64,
}

/// Streams a backup from the server into `out`.
pub async fn backup(
    target: Target,
    instance: String,
    out: PathBuf,
) -> Result<Outcome, BackupError> {
    let (_, channel) = connect(&target).await?;
    let mut request = tonic::Request::new(ExportBackupRequest {});
    request.metadata_mut().insert(
        INSTANCE_HEADER,
        MetadataValue::try_from(instance.as_str()).map_err(|_| BackupError::Instance(instance))?,
    );
    let mut chunks = BackupServiceClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .export_backup(request)
        .await
        .map_err(BackupError::Call)?
        .into_inner();
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let mut file = File::create(&partial).map_err(file_error(&partial))?;
    let progress = Progress::new("backup bytes received", None);
    let mut bytes = 0u64;
    while let Some(chunk) = chunks.message().await.map_err(BackupError::Call)? {
        file.write_all(&chunk.data).map_err(file_error(&partial))?;
        bytes += chunk.data.len() as u64;
        progress.add(chunk.data.len() as u64);
    }
    progress.finish();
    file.sync_all().map_err(file_error(&partial))?;
    drop(file);
    let reader = BackupReader::open(BufReader::new(
        File::open(&partial).map_err(file_error(&partial))?,
    ))?;
    let manifest = reader.manifest.clone();
    let counts = reader.check_all()?;
    std::fs::rename(&partial, &out).map_err(file_error(&out))?;
    Ok(Outcome {
        manifest,
        counts,
        bytes,
    })
}

/// Restores `from` into the store `config` names, after checking the file and the
/// token's KEK. The embedded token's SOFTHSM2_CONF must already be in the environment.
pub async fn restore(config: Config, from: PathBuf) -> Result<Outcome, BackupError> {
    let checked = BackupReader::open(BufReader::new(
        File::open(&from).map_err(file_error(&from))?,
    ))?;
    let manifest = checked.manifest.clone();
    let counts = checked.check_all()?;
    let bytes = std::fs::metadata(&from).map_err(file_error(&from))?.len();

    let hsm_config = config.hsm.clone();
    let hsm = tokio::task::spawn_blocking(move || Hsm::open(&hsm_config, false))
        .await
        .map_err(|e| BackupError::Task(e.to_string()))??;
    let found = hsm.kek_check(Some(manifest.kek_check.format)).await;
    hsm.shutdown();
    let found = found?;
    if found != manifest.kek_check {
        return Err(BackupError::WrongKek {
            label: manifest.kek_label.clone(),
            expected: hex::encode(manifest.kek_check.value),
            found: hex::encode(found.value),
        });
    }

    let progress = Progress::new("restored records", Some(counts.records()));
    let loaded = match config.store.embedded_path() {
        Some(path) => {
            if path.exists() {
                ensure_empty(crate::store::open(&config.store).await?.as_ref()).await?;
            }
            let staging = PathBuf::from(format!("{}.restoring", path.display()));
            remove_store_files(&staging)?;
            let store = crate::store::open(&config.store.at_path(staging.clone())).await?;
            let loaded = load(store.as_ref(), &from, &progress).await?;
            drop(store);
            remove_store_files(path)?;
            std::fs::rename(&staging, path).map_err(file_error(path))?;
            loaded
        }
        None => {
            let store = crate::store::open(&config.store).await?;
            load(store.as_ref(), &from, &progress).await?
        }
    };
    progress.finish();
    Ok(Outcome {
        manifest,
        counts: loaded,
        bytes,
    })
}

/// Removes an embedded store's files, if any: sled's directory or redb's file.
fn remove_store_files(path: &Path) -> Result<(), BackupError> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        return Ok(());
    };
    removed.map_err(file_error(path))
}

/// Loads the (already checked) file into the empty `store`.
async fn load(
    store: &dyn Store,
    from: &Path,
    progress: &Progress,
) -> Result<ItemCounts, BackupError> {
    ensure_empty(store).await?;
    let mut records =
        BackupReader::open(BufReader::new(File::open(from).map_err(file_error(from))?))?;
    let mut loader = Loader::new(store);
    while let Some(item) = records.next_record()? {
        let counted = !matches!(item, StoreItem::AuditChain { .. });
        loader.load(item).await?;
        progress.add(u64::from(counted));
    }
    Ok(loader.finish().await?)
}
