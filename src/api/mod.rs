//! The gRPC layer only: one call gate for every RPC (authentication, authorization,
//! audit, logging), request validation, proto <-> domain conversion, and domain errors
//! to gRPC statuses.

mod audit;
mod backup;
mod call;
pub mod codec;
mod convert;
mod edge;
mod import_tokens;
mod keys;
mod page_token;

pub use audit::AuditApi;
pub use backup::BackupApi;
pub use call::{CORRELATION_HEADER, CallGate, GateOptions, INSTANCE_HEADER, Rpc};
pub use edge::EdgeLayer;
pub use import_tokens::ImportTokenApi;
pub use keys::KeyApi;

use tonic::Status;
use tonic::metadata::MetadataValue;
use uuid::Uuid;

use crate::domain::KmsError;
use crate::hsm::HsmError;
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
        KmsError::Hsm(HsmError::Overloaded) => Status::resource_exhausted(
            "the HSM is saturated; retry with backoff (the request was not started)",
        ),
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
        None => Err(KmsError::invalid(
            field,
            "must be a v4 UUID in canonical form (lowercase, hyphenated)",
        )),
    }
}

/// A key id field if it holds a valid key id: a v4 UUID in its one canonical text form
/// (36 characters, lowercase, hyphenated), as the service writes them; braces, `urn:`,
/// upper case or no hyphens are refused, so one key has one spelling in requests,
/// logs and the audit trail.
pub(crate) fn key_field(value: &str) -> Option<Uuid> {
    Uuid::try_parse(value)
        .ok()
        .filter(|id| id.get_version_num() == 4)
        .filter(|id| id.hyphenated().to_string() == value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::HsmError;
    use tonic::Code;

    #[test]
    fn key_ids_have_one_canonical_spelling() {
        let id = Uuid::new_v4();
        let canonical = id.to_string();
        assert_eq!(key_field(&canonical), Some(id));
        for other in [
            canonical.to_uppercase(),
            id.simple().to_string(),
            format!("{{{canonical}}}"),
            format!("urn:uuid:{canonical}"),
            format!(" {canonical}"),
        ] {
            assert_eq!(key_field(&other), None, "{other}");
            let error = parse_key_id("id", &other).unwrap_err().to_string();
            assert!(error.starts_with("id: must be a v4 UUID"), "{error}");
        }
        assert_eq!(key_field(&Uuid::nil().to_string()), None, "not v4");
    }

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
