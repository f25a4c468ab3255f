//! `kms.v1.ImportTokenService`: declared, not built yet; every call answers UNIMPLEMENTED.

use tonic::{Request, Response, Status};

use super::keys::unimplemented;
use crate::proto;
use crate::proto::import_token_service_server::ImportTokenService;

#[derive(Default)]
pub struct ImportTokenApi;

#[tonic::async_trait]
impl ImportTokenService for ImportTokenApi {
    async fn create_import_token(
        &self,
        _: Request<proto::CreateImportTokenRequest>,
    ) -> Result<Response<proto::ImportToken>, Status> {
        Err(unimplemented("CreateImportToken"))
    }

    async fn get_import_token(
        &self,
        _: Request<proto::GetImportTokenRequest>,
    ) -> Result<Response<proto::GetImportTokenResponse>, Status> {
        Err(unimplemented("GetImportToken"))
    }
}
