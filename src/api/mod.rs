//! The gRPC layer only: one call gate for every RPC (authentication, authorization,
//! audit, logging), request validation, proto <-> domain conversion, and domain errors
//! to gRPC statuses.

mod audit;
mod call;
mod convert;
mod edge;
mod import_tokens;
mod keys;

pub use audit::AuditApi;
pub use call::{CORRELATION_HEADER, CallGate, GateOptions, Rpc};
pub use edge::EdgeLayer;
pub use import_tokens::ImportTokenApi;
pub use keys::KeyApi;

use tonic::Status;
use tonic::metadata::MetadataValue;
use uuid::Uuid;

use crate::domain::KmsError;
use crate::store::StoreError;

fn with_correlation(mut status: Status, correlation_id: Uuid) -> Status {
    if let Some(value) = correlation_value(correlation_id) {
        status.metadata_mut().insert(CORRELATION_HEADER, value);
    }
    status
}

/// The correlation id as a header value that HPACK sends as a never-indexed literal:
/// a value unique to each response would only churn the connection's header table,
/// evicting the entries that do repeat.
fn correlation_value(correlation_id: Uuid) -> Option<MetadataValue<tonic::metadata::Ascii>> {
    let mut value = MetadataValue::try_from(correlation_id.to_string()).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Every domain error to one gRPC status. Internal and HSM faults get a generic message;
/// the detail is logged by the call gate.
fn status_from(error: &KmsError) -> Status {
    match error {
        KmsError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
        KmsError::NotFound { .. } => Status::not_found(error.to_string()),
        KmsError::PermissionDenied(_) => Status::permission_denied(error.to_string()),
        KmsError::WrongState { .. } | KmsError::FailedPrecondition(_) => {
            Status::failed_precondition(error.to_string())
        }
        KmsError::Conflict => Status::aborted(error.to_string()),
        KmsError::Hsm(e) if e.is_unavailable() => {
            Status::unavailable("the HSM is unavailable; retry later")
        }
        KmsError::Hsm(_) => Status::internal("internal HSM error"),
        KmsError::Store(StoreError::Unavailable { .. }) => {
            Status::unavailable("the key store is unavailable; retry later")
        }
        KmsError::Store(_) => Status::internal("internal storage error"),
        KmsError::Internal(_) => Status::internal("internal error"),
    }
}

/// Parses a key id field: a v4 UUID.
pub(crate) fn parse_key_id(field: &'static str, value: &str) -> Result<Uuid, KmsError> {
    match key_field(value) {
        Some(id) => Ok(id),
        None if value.is_empty() => Err(KmsError::invalid(field, "required (a v4 UUID)")),
        None => Err(KmsError::invalid(field, "must be a v4 UUID")),
    }
}

/// A key id field if it holds a valid key id (a v4 UUID); what the audit trail records.
pub(crate) fn key_field(value: &str) -> Option<Uuid> {
    Uuid::parse_str(value)
        .ok()
        .filter(|id| id.get_version_num() == 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::HsmError;
    use tonic::Code;

    #[test]
    fn hsm_and_store_faults_never_leak_detail() {
        let e = KmsError::Hsm(HsmError::Binding("C_WrapKey detail".into()));
        let status = status_from(&e);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("C_WrapKey"));
        let e = KmsError::Hsm(HsmError::Worker("gone".into()));
        assert_eq!(status_from(&e).code(), Code::Internal);
        let e = KmsError::Store(StoreError::unavailable(
            "postgres",
            "connection to host=/tmp/secret-path refused",
        ));
        let status = status_from(&e);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("secret-path"));
    }
}
