//! `kms.v1.ImportTokenService`: the instance's import token (IBM Key Protect style).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{caller_context, convert, finish};
use crate::domain::import_tokens::ImportTokenManager;
use crate::proto;
use crate::proto::import_token_service_server::ImportTokenService;

pub struct ImportTokenApi {
    tokens: Arc<ImportTokenManager>,
}

impl ImportTokenApi {
    pub fn new(tokens: Arc<ImportTokenManager>) -> Self {
        Self { tokens }
    }
}

#[tonic::async_trait]
impl ImportTokenService for ImportTokenApi {
    async fn create_import_token(
        &self,
        request: Request<proto::CreateImportTokenRequest>,
    ) -> Result<Response<proto::ImportToken>, Status> {
        let ctx = caller_context(&request)?;
        let request = request.into_inner();
        let result = self
            .tokens
            .create(&ctx, request.expiration, request.max_allowed_retrievals)
            .await
            .map(|token| convert::import_token(&token));
        finish(&ctx, "CreateImportToken", None, result)
    }

    async fn get_import_token(
        &self,
        request: Request<proto::GetImportTokenRequest>,
    ) -> Result<Response<proto::GetImportTokenResponse>, Status> {
        let ctx = caller_context(&request)?;
        let result = self.tokens.retrieve(&ctx).await.map(|retrieved| {
            let metadata = convert::import_token(&retrieved.token);
            proto::GetImportTokenResponse {
                creation_date: metadata.creation_date,
                expiration_date: metadata.expiration_date,
                max_allowed_retrievals: metadata.max_allowed_retrievals,
                remaining_retrievals: metadata.remaining_retrievals,
                payload: retrieved.public_key,
                nonce: retrieved.token.nonce,
            }
        });
        finish(&ctx, "GetImportToken", None, result)
    }
}
