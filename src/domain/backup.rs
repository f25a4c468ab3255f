//! Taking a backup while serving: the manifest (with the KEK's check value, computed in
//! the HSM now), then the store's consistent snapshot, written as a backup file's bytes
//! at the pace of whoever reads them. A reader that goes away ends the snapshot (and,
//! on sled, releases the write gate at once).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::KmsError;
use super::model::now_millis;
use crate::backup::{BackupWriter, FORMAT_VERSION, Manifest};
use crate::hsm::Hsm;
use crate::store::snapshot::SNAPSHOT_CHANNEL;
use crate::store::{STORE_SCHEMA, Store};

/// Backup chunks buffered before the writer waits for the reader.
const CHUNKS: usize = 8;
/// Bytes gathered into one chunk before it is sent.
const CHUNK_BYTES: usize = 256 * 1024;

pub struct BackupExporter {
    hsm: Arc<Hsm>,
    store: Arc<dyn Store>,
    kek_label: String,
    backend: &'static str,
}

impl BackupExporter {
    pub fn new(
        hsm: Arc<Hsm>,
        store: Arc<dyn Store>,
        kek_label: String,
        backend: &'static str,
    ) -> Self {
        Self {
            hsm,
            store,
            kek_label,
            backend,
        }
    }

    /// Starts a backup; its bytes arrive on the receiver, in order, ending with the
    /// trailer (or an error, after which nothing more comes).
    pub async fn export(&self) -> Result<mpsc::Receiver<Result<Vec<u8>, KmsError>>, KmsError> {
        let manifest = Manifest {
            format: FORMAT_VERSION,
            schema: STORE_SCHEMA,
            backend: self.backend.to_owned(),
            taken_at: now_millis(),
            service_version: env!("CARGO_PKG_VERSION").to_owned(),
            kek_label: self.kek_label.clone(),
            kek_check: self.hsm.kek_check(None).await?,
        };
        let writer = BackupWriter::start(&manifest).map_err(written)?;
        let (chunks, received) = mpsc::channel(CHUNKS);
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            if let Err(error) = write(store, writer, &chunks).await {
                let _ = chunks.send(Err(error)).await;
            }
        });
        Ok(received)
    }
}

/// Walks the store's snapshot into `writer`, sending its bytes on `chunks` as they
/// gather. Returns early, with `Ok`, if the reader has gone: dropping the records'
/// receiver then ends the walk.
async fn write(
    store: Arc<dyn Store>,
    mut writer: BackupWriter,
    chunks: &mpsc::Sender<Result<Vec<u8>, KmsError>>,
) -> Result<(), KmsError> {
    let (sink, mut records) = mpsc::channel(SNAPSHOT_CHANNEL);
    let walk = tokio::spawn(async move { store.snapshot(sink).await });
    while let Some(item) = records.recv().await {
        writer.record(item).map_err(written)?;
        if writer.buffered() >= CHUNK_BYTES && chunks.send(Ok(writer.take())).await.is_err() {
            return Ok(());
        }
    }
    walk.await
        .map_err(|e| KmsError::Internal(e.to_string()))??;
    let (last, counts) = writer.finish().map_err(written)?;
    tracing::info!(
        keys = counts.keys,
        versions = counts.versions,
        audit_blocks = counts.audit_blocks,
        "backup taken"
    );
    let _ = chunks.send(Ok(last)).await;
    Ok(())
}

fn written(e: std::io::Error) -> KmsError {
    KmsError::Internal(format!("writing the backup: {e}"))
}
