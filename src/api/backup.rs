//! `kms.v1.BackupService`: an Administrator on every instance (`*`) streams a backup
//! of the whole store. The call is audited when the stream starts; a failure part-way
//! ends the stream with UNAVAILABLE (detail in the server log), and the file it leaves
//! fails its trailer check, so it is never mistaken for a whole backup.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::call::{AuditedKey, CallGate, Rpc};
use super::status_from;
use crate::auth::Role;
use crate::domain::KmsError;
use crate::domain::backup::BackupExporter;
use crate::proto;
use crate::proto::backup_service_server::BackupService;

pub struct BackupApi {
    exporter: Arc<BackupExporter>,
    gate: Arc<CallGate>,
}

impl BackupApi {
    pub fn new(exporter: Arc<BackupExporter>, gate: Arc<CallGate>) -> Self {
        Self { exporter, gate }
    }
}

/// The chunks of one backup, as tonic sends them.
pub type BackupChunks = Pin<Box<dyn Stream<Item = Result<proto::BackupChunk, Status>> + Send>>;

impl AuditedKey for proto::ExportBackupRequest {}
impl AuditedKey for BackupChunks {}

#[tonic::async_trait]
impl BackupService for BackupApi {
    type ExportBackupStream = BackupChunks;

    async fn export_backup(
        &self,
        request: Request<proto::ExportBackupRequest>,
    ) -> Result<Response<BackupChunks>, Status> {
        self.gate
            .call(Rpc::ExportBackup, request, |caller, _| async move {
                if !caller
                    .principal
                    .grants
                    .everywhere_at_least(Role::Administrator)
                {
                    return Err(KmsError::PermissionDenied(
                        "a backup holds every instance: it needs the Administrator role on \
                         every instance (*)"
                            .into(),
                    ));
                }
                let chunks = self.exporter.export().await?;
                let stream = ReceiverStream::new(chunks).map(|chunk| match chunk {
                    Ok(data) => Ok(proto::BackupChunk { data }),
                    Err(error) => {
                        tracing::error!(error = %error, "backup failed part-way");
                        Err(status_from(&error))
                    }
                });
                Ok(Box::pin(stream) as BackupChunks)
            })
            .await
    }
}
