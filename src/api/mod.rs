//! The gRPC layer only: request metadata to a caller context, request validation,
//! proto <-> domain conversion, and domain errors to gRPC statuses.

mod convert;
mod import_tokens;
mod keys;

pub use import_tokens::ImportTokenApi;
pub use keys::KeyApi;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::domain::{CallerContext, KmsError};

pub const INSTANCE_HEADER: &str = "bluemix-instance";
pub const ICP_INSTANCE_HEADER: &str = "icp-instance";
pub const CORRELATION_HEADER: &str = "correlation-id";
const MAX_INSTANCE_LEN: usize = 128;

/// Builds the caller context from metadata. The one place every RPC goes through, so
/// that authentication can be added here.
pub(crate) fn caller_context<T>(request: &Request<T>) -> Result<CallerContext, Status> {
    let metadata = request.metadata();
    let correlation_id = match metadata.get(CORRELATION_HEADER) {
        None => Uuid::new_v4(),
        Some(value) => match value.to_str().ok().and_then(|v| Uuid::parse_str(v).ok()) {
            Some(id) if id.get_version_num() == 4 => id,
            _ => {
                return Err(Status::invalid_argument(
                    "correlation-id: must be a v4 UUID",
                ));
            }
        },
    };
    let instance = instance_from(metadata)
        .map_err(|message| with_correlation(Status::invalid_argument(message), correlation_id))?;
    Ok(CallerContext {
        instance,
        correlation_id,
    })
}

fn instance_from(metadata: &MetadataMap) -> Result<String, String> {
    let read = |header: &str| -> Result<Option<String>, String> {
        match metadata.get(header) {
            None => Ok(None),
            Some(value) => value
                .to_str()
                .map(|v| Some(v.to_owned()))
                .map_err(|_| format!("{header}: must be printable ASCII")),
        }
    };
    let instance = match (read(INSTANCE_HEADER)?, read(ICP_INSTANCE_HEADER)?) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "{INSTANCE_HEADER} and {ICP_INSTANCE_HEADER} name different instances"
            ));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => {
            return Err(format!(
                "{INSTANCE_HEADER}: required (the instance id; {ICP_INSTANCE_HEADER} is accepted too)"
            ));
        }
    };
    if instance.is_empty()
        || instance.len() > MAX_INSTANCE_LEN
        || !instance.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "{INSTANCE_HEADER}: must be 1..{MAX_INSTANCE_LEN} printable ASCII characters without spaces"
        ));
    }
    Ok(instance)
}

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

/// Logs the outcome and returns the response or status, both carrying the correlation id.
pub(crate) fn finish<T>(
    ctx: &CallerContext,
    operation: &'static str,
    key_id: Option<Uuid>,
    result: Result<T, KmsError>,
) -> Result<Response<T>, Status> {
    // Formatted only if the event is actually logged.
    let key_id = key_id.map(tracing::field::display);
    match result {
        Ok(message) => {
            tracing::info!(
                operation,
                instance = %ctx.instance,
                key_id,
                correlation_id = %ctx.correlation_id,
                outcome = "ok",
            );
            let mut response = Response::new(message);
            if let Some(value) = correlation_value(ctx.correlation_id) {
                response.metadata_mut().insert(CORRELATION_HEADER, value);
            }
            Ok(response)
        }
        Err(error) => {
            let status = status_from(&error);
            if matches!(status.code(), Code::Internal | Code::Unavailable) {
                tracing::error!(
                    operation,
                    instance = %ctx.instance,
                    key_id,
                    correlation_id = %ctx.correlation_id,
                    error = %error,
                    outcome = "error",
                );
            } else {
                tracing::info!(
                    operation,
                    instance = %ctx.instance,
                    key_id,
                    correlation_id = %ctx.correlation_id,
                    code = ?status.code(),
                    outcome = "refused",
                );
            }
            Err(with_correlation(status, ctx.correlation_id))
        }
    }
}

/// Every domain error to one gRPC status. Internal and HSM faults get a generic message;
/// the detail is logged by `finish`.
fn status_from(error: &KmsError) -> Status {
    match error {
        KmsError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
        KmsError::NotFound { .. } => Status::not_found(error.to_string()),
        KmsError::WrongState { .. } | KmsError::FailedPrecondition(_) => {
            Status::failed_precondition(error.to_string())
        }
        KmsError::Conflict => Status::aborted(error.to_string()),
        KmsError::Hsm(e) if e.is_unavailable() => {
            Status::unavailable("the HSM is unavailable; retry later")
        }
        KmsError::Hsm(_) => Status::internal("internal HSM error"),
        KmsError::Store(_) => Status::internal("internal storage error"),
    }
}

/// Parses a key id field: a v4 UUID.
pub(crate) fn parse_key_id(field: &'static str, value: &str) -> Result<Uuid, KmsError> {
    match Uuid::parse_str(value) {
        Ok(id) if id.get_version_num() == 4 => Ok(id),
        _ if value.is_empty() => Err(KmsError::invalid(field, "required (a v4 UUID)")),
        _ => Err(KmsError::invalid(field, "must be a v4 UUID")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::HsmError;

    #[test]
    fn hsm_and_store_faults_never_leak_detail() {
        let e = KmsError::Hsm(HsmError::Binding("C_WrapKey detail".into()));
        let status = status_from(&e);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("C_WrapKey"));
        let e = KmsError::Hsm(HsmError::Worker("gone".into()));
        assert_eq!(status_from(&e).code(), Code::Internal);
    }

    #[test]
    fn instance_header_rules() {
        let mut md = MetadataMap::new();
        assert!(instance_from(&md).is_err());
        md.insert(ICP_INSTANCE_HEADER, "tenant-a".parse().unwrap());
        assert_eq!(instance_from(&md).unwrap(), "tenant-a");
        md.insert(INSTANCE_HEADER, "tenant-b".parse().unwrap());
        assert!(instance_from(&md).is_err());
    }
}
