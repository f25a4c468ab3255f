//! `kms.v1.ImportTokenService`: the instance's import token (IBM Key Protect style).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::call::{AuditedKey, CallGate, Rpc};
use super::convert;
use crate::domain::import_tokens::ImportTokenManager;
use crate::proto;
use crate::proto::import_token_service_server::ImportTokenService;

pub struct ImportTokenApi {
    tokens: Arc<ImportTokenManager>,
    gate: Arc<CallGate>,
}

impl ImportTokenApi {
    pub fn new(tokens: Arc<ImportTokenManager>, gate: Arc<CallGate>) -> Self {
        Self { tokens, gate }
    }
}

impl AuditedKey for proto::CreateImportTokenRequest {}
impl AuditedKey for proto::GetImportTokenRequest {}
impl AuditedKey for proto::ImportToken {}
impl AuditedKey for proto::GetImportTokenResponse {}

#[tonic::async_trait]
impl ImportTokenService for ImportTokenApi {
    async fn create_import_token(
        &self,
        request: Request<proto::CreateImportTokenRequest>,
    ) -> Result<Response<proto::ImportToken>, Status> {
        self.gate
            .call(
                Rpc::CreateImportToken,
                request,
                |caller, request| async move {
                    self.tokens
                        .create(
                            &caller.ctx,
                            request.expiration,
                            request.max_allowed_retrievals,
                        )
                        .await
                        .map(|token| convert::import_token(&token))
                },
            )
            .await
    }

    async fn get_import_token(
        &self,
        request: Request<proto::GetImportTokenRequest>,
    ) -> Result<Response<proto::GetImportTokenResponse>, Status> {
        self.gate
            .call(Rpc::GetImportToken, request, |caller, _| async move {
                let retrieved = self.tokens.retrieve(&caller.ctx).await?;
                let metadata = convert::import_token(&retrieved.token);
                Ok(proto::GetImportTokenResponse {
                    creation_date: metadata.creation_date,
                    expiration_date: metadata.expiration_date,
                    max_allowed_retrievals: metadata.max_allowed_retrievals,
                    remaining_retrievals: metadata.remaining_retrievals,
                    payload: retrieved.public_key,
                    nonce: retrieved.token.nonce,
                })
            })
            .await
    }
}
