//! The one path every KMS call takes: authenticate, validate the metadata, authorize by
//! the RPC's declared role, run the handler, write the audit record, make it durable
//! where the RPC requires, log, answer.
//!
//! Order matters: the bearer token is checked before anything else is looked at, so
//! an unauthenticated caller learns nothing, not even whether its request is
//! well-formed. The edge layer ([`super::edge`]) checks it before tonic decodes the
//! request and hands the principal over; the gate checks it itself where no edge runs. Every outcome, refusals included, is audited; if the record cannot be
//! written the call is answered UNAVAILABLE (Vault's rule: nothing served unaudited).
//! A handler can only reach the domain through the [`Caller`] this gate hands it, and
//! an RPC cannot be served without an [`Rpc`] variant, whose role is an exhaustive
//! match.

use std::future::Future;
use std::sync::Arc;

use http::HeaderMap;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use super::edge::{GateReached, dropped_call_code};
use super::{correlation_value, status_from, with_correlation};
use crate::audit::{ANONYMOUS, AuditEvent, AuditTrail};
use crate::auth::{
    Authenticator, BearerToken, MAX_INSTANCE_LEN, Principal, Role, WILDCARD_INSTANCE,
    valid_instance_id,
};
use crate::domain::{CallerContext, KmsError};

pub const AUTHORIZATION_HEADER: &str = "authorization";
pub const INSTANCE_HEADER: &str = "bluemix-instance";
pub const ICP_INSTANCE_HEADER: &str = "icp-instance";
pub const CORRELATION_HEADER: &str = "correlation-id";
/// The one answer to every authentication failure, so none tells them apart.
pub(super) const UNAUTHENTICATED_MESSAGE: &str =
    "authentication required: send a valid token as \"authorization: Bearer kms_...\"";

/// Every RPC of the KMS services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    CreateKey,
    GetKey,
    ListKeys,
    CountKeys,
    WrapKey,
    UnwrapKey,
    RewrapKey,
    RotateKey,
    ListKeyVersions,
    DisableKey,
    EnableKey,
    DeleteKey,
    GetParametersForImport,
    ImportKeyMaterial,
    DeleteImportedKeyMaterial,
    CreateImportToken,
    GetImportToken,
    ListAuditEvents,
    ExportBackup,
}

impl Rpc {
    pub const ALL: [Rpc; 19] = [
        Rpc::CreateKey,
        Rpc::GetKey,
        Rpc::ListKeys,
        Rpc::CountKeys,
        Rpc::WrapKey,
        Rpc::UnwrapKey,
        Rpc::RewrapKey,
        Rpc::RotateKey,
        Rpc::ListKeyVersions,
        Rpc::DisableKey,
        Rpc::EnableKey,
        Rpc::DeleteKey,
        Rpc::GetParametersForImport,
        Rpc::ImportKeyMaterial,
        Rpc::DeleteImportedKeyMaterial,
        Rpc::CreateImportToken,
        Rpc::GetImportToken,
        Rpc::ListAuditEvents,
        Rpc::ExportBackup,
    ];

    /// The RPC's name as in the proto, for logs and the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::CreateKey => "CreateKey",
            Rpc::GetKey => "GetKey",
            Rpc::ListKeys => "ListKeys",
            Rpc::CountKeys => "CountKeys",
            Rpc::WrapKey => "WrapKey",
            Rpc::UnwrapKey => "UnwrapKey",
            Rpc::RewrapKey => "RewrapKey",
            Rpc::RotateKey => "RotateKey",
            Rpc::ListKeyVersions => "ListKeyVersions",
            Rpc::DisableKey => "DisableKey",
            Rpc::EnableKey => "EnableKey",
            Rpc::DeleteKey => "DeleteKey",
            Rpc::GetParametersForImport => "GetParametersForImport",
            Rpc::ImportKeyMaterial => "ImportKeyMaterial",
            Rpc::DeleteImportedKeyMaterial => "DeleteImportedKeyMaterial",
            Rpc::CreateImportToken => "CreateImportToken",
            Rpc::GetImportToken => "GetImportToken",
            Rpc::ListAuditEvents => "ListAuditEvents",
            Rpc::ExportBackup => "ExportBackup",
        }
    }

    /// The least role that may make the call in an instance (seed 003's access levels).
    pub fn required_role(self) -> Role {
        match self {
            Rpc::WrapKey | Rpc::UnwrapKey | Rpc::RewrapKey => Role::Viewer,
            Rpc::CreateKey
            | Rpc::GetKey
            | Rpc::ListKeys
            | Rpc::CountKeys
            | Rpc::ListKeyVersions
            | Rpc::CreateImportToken
            | Rpc::GetImportToken
            | Rpc::GetParametersForImport
            | Rpc::ImportKeyMaterial => Role::Editor,
            Rpc::RotateKey
            | Rpc::DisableKey
            | Rpc::EnableKey
            | Rpc::DeleteKey
            | Rpc::DeleteImportedKeyMaterial
            | Rpc::ListAuditEvents
            | Rpc::ExportBackup => Role::Administrator,
        }
    }

    /// Changes stored state (GetImportToken spends a retrieval): answered only after one
    /// group flush that covers the change and its audit record.
    pub fn mutates(self) -> bool {
        match self {
            Rpc::CreateKey
            | Rpc::RotateKey
            | Rpc::DisableKey
            | Rpc::EnableKey
            | Rpc::DeleteKey
            | Rpc::GetParametersForImport
            | Rpc::ImportKeyMaterial
            | Rpc::DeleteImportedKeyMaterial
            | Rpc::CreateImportToken
            | Rpc::GetImportToken => true,
            Rpc::GetKey
            | Rpc::ListKeys
            | Rpc::CountKeys
            | Rpc::WrapKey
            | Rpc::UnwrapKey
            | Rpc::RewrapKey
            | Rpc::ListKeyVersions
            | Rpc::ListAuditEvents
            | Rpc::ExportBackup => false,
        }
    }
}

/// An authenticated, authorized caller: what a handler gets from the gate.
pub struct Caller {
    pub ctx: CallerContext,
    pub principal: Arc<Principal>,
}

/// The key a request or response is about, for the audit record.
pub trait AuditedKey {
    fn audited_key(&self) -> Option<Uuid> {
        None
    }
}

/// Settings of the gate.
#[derive(Clone, Copy, Debug)]
pub struct GateOptions {
    /// Flush after every call's record, reads included, instead of relying on the
    /// store's periodic flush for reads.
    pub sync_reads: bool,
}

pub struct CallGate {
    auth: Arc<Authenticator>,
    audit: Arc<AuditTrail>,
    options: GateOptions,
}

/// A call refused before its handler ran.
struct Refusal {
    status: Status,
    principal: Option<Arc<Principal>>,
    instance: String,
    correlation_id: Uuid,
}

impl CallGate {
    pub fn new(auth: Arc<Authenticator>, audit: Arc<AuditTrail>, options: GateOptions) -> Self {
        Self {
            auth,
            audit,
            options,
        }
    }

    /// Runs `handler` for `request` if the caller may make `rpc`, and audits the outcome.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        handler: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: AuditedKey,
        Resp: AuditedKey,
        F: FnOnce(Caller, Req) -> Fut,
        Fut: Future<Output = Result<Resp, KmsError>>,
    {
        let peer = request.remote_addr();
        // The edge layer authenticated the call before tonic decoded it (when present).
        let (authenticated, deadline) = match request.extensions().get::<GateReached>() {
            Some(reached) => {
                reached.mark();
                (reached.principal(), reached.deadline())
            }
            None => (None, None),
        };
        let (metadata, _, message) = request.into_parts();
        let request_key = message.audited_key();
        let admitted = self.admit(rpc, &metadata, authenticated);
        let (outcome, principal, instance, correlation_id) = match admitted {
            Ok(caller) => {
                let principal = Arc::clone(&caller.principal);
                let instance = caller.ctx.instance.clone();
                let correlation_id = caller.ctx.correlation_id;
                let unanswered = RecordIfDropped {
                    audit: &self.audit,
                    rpc,
                    principal: &principal,
                    instance: &instance,
                    key_id: request_key,
                    correlation_id,
                    peer,
                    deadline,
                    armed: true,
                };
                let outcome = handler(caller, message).await;
                unanswered.disarm();
                (Ok(outcome), Some(principal), instance, correlation_id)
            }
            Err(refusal) => (
                Err(refusal.status),
                refusal.principal,
                refusal.instance,
                refusal.correlation_id,
            ),
        };
        let principal_name = principal.as_ref().map_or(ANONYMOUS, |p| p.name.as_str());
        let answer = match outcome {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                let status = status_from(&error);
                // A fault of the service is logged with its detail; an unusable HSM or
                // store is logged once per episode by its monitor, so each call it
                // refuses only at debug level.
                if status.code() == Code::Unavailable {
                    tracing::debug!(
                        operation = rpc.name(),
                        %correlation_id,
                        error = %error,
                        "call failed: a dependency is unavailable"
                    );
                } else if status.code() == Code::Internal {
                    tracing::error!(
                        operation = rpc.name(),
                        principal = principal_name,
                        instance = %instance,
                        %correlation_id,
                        error = %error,
                        "call failed"
                    );
                }
                Err(status)
            }
            Err(status) => Err(status),
        };
        let key_id = request_key.or_else(|| answer.as_ref().ok().and_then(|r| r.audited_key()));
        let code = match &answer {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        let event = AuditEvent {
            principal: principal_name,
            instance: &instance,
            operation: rpc.name(),
            key_id,
            code: code as i32,
            correlation_id,
            peer,
        };
        self.record(rpc, &event, answer.is_ok())
            .await
            .map_err(|status| with_correlation(status, correlation_id))?;
        tracing::debug!(
            operation = rpc.name(),
            principal = principal_name,
            instance = %instance,
            key_id = key_id.map(tracing::field::display),
            %correlation_id,
            code = ?code,
        );
        match answer {
            Ok(message) => {
                let mut response = Response::new(message);
                if let Some(value) = correlation_value(correlation_id) {
                    response.metadata_mut().insert(CORRELATION_HEADER, value);
                }
                Ok(response)
            }
            Err(status) => Err(with_correlation(status, correlation_id)),
        }
    }

    /// Appends the record and, for a mutating call that succeeded (or every call with
    /// `sync_reads`), waits for the group flush that writes the trail's pending records
    /// and makes them durable together with the change the handler made. A refused
    /// call changed nothing: its record is committed in the background, like a read's,
    /// so a flood of bad requests costs no flush each.
    async fn record(&self, rpc: Rpc, event: &AuditEvent<'_>, changed: bool) -> Result<(), Status> {
        if let Err(error) = self.audit.append(event) {
            // The trail logs the episode once; each refused call only at debug.
            tracing::debug!(operation = rpc.name(), error = %error, "call refused: audit trail unavailable");
            return Err(audit_unavailable());
        }
        if !((rpc.mutates() && changed) || self.options.sync_reads) {
            return Ok(());
        }
        if let Err(error) = self.audit.persist_appended().await {
            tracing::debug!(
                operation = rpc.name(),
                error = %error,
                "call refused: its audit record could not be made durable"
            );
            return Err(audit_unavailable());
        }
        Ok(())
    }

    fn admit(
        &self,
        rpc: Rpc,
        metadata: &MetadataMap,
        authenticated: Option<Arc<Principal>>,
    ) -> Result<Caller, Refusal> {
        let correlation = correlation_from(metadata);
        let correlation_id = *correlation.as_ref().unwrap_or(&Uuid::new_v4());
        // Kept for the record even when the call is refused, if it is a valid id.
        let instance = instance_from(metadata);
        let recorded_instance = instance.clone().unwrap_or_default();
        let refuse = |status: Status, principal: Option<Arc<Principal>>| Refusal {
            status,
            principal,
            instance: recorded_instance.clone(),
            correlation_id,
        };

        let principal = match authenticated {
            Some(principal) => principal,
            None => authenticate(&self.auth, metadata.as_ref()).map_err(|s| refuse(s, None))?,
        };
        let with = |status| refuse(status, Some(Arc::clone(&principal)));
        correlation.map_err(with)?;
        let instance = instance.map_err(|m| with(Status::invalid_argument(m)))?;
        let required = rpc.required_role();
        if principal
            .grants
            .role_in(&instance)
            .is_none_or(|held| held < required)
        {
            return Err(with(Status::permission_denied(format!(
                "permission denied: {} needs the {required} role in this instance",
                rpc.name()
            ))));
        }
        Ok(Caller {
            ctx: CallerContext {
                instance,
                correlation_id,
            },
            principal,
        })
    }
}

/// Records a call whose handler was dropped before it finished: tonic drops it when the
/// client's deadline passes or the client cancels. What the handler did before is not
/// undone (each change is one store step, whole or not at all); the record says the
/// call was cut off, so the trail still has one record per call.
struct RecordIfDropped<'a> {
    audit: &'a AuditTrail,
    rpc: Rpc,
    principal: &'a Principal,
    instance: &'a str,
    key_id: Option<Uuid>,
    correlation_id: Uuid,
    peer: Option<std::net::SocketAddr>,
    deadline: Option<(std::time::Instant, std::time::Duration)>,
    armed: bool,
}

impl RecordIfDropped<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RecordIfDropped<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let event = AuditEvent {
            principal: &self.principal.name,
            instance: self.instance,
            operation: self.rpc.name(),
            key_id: self.key_id,
            code: dropped_call_code(self.deadline) as i32,
            correlation_id: self.correlation_id,
            peer: self.peer,
        };
        if let Err(error) = self.audit.append(&event) {
            tracing::debug!(operation = self.rpc.name(), error = %error, "cannot audit a call cut off");
        }
    }
}

/// The principal holding the request's bearer token. A repeated header is refused as
/// malformed; every other failure gets the one UNAUTHENTICATED message.
pub(super) fn authenticate(
    auth: &Authenticator,
    headers: &HeaderMap,
) -> Result<Arc<Principal>, Status> {
    let mut values = headers.get_all(AUTHORIZATION_HEADER).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Status::invalid_argument(format!(
            "{AUTHORIZATION_HEADER}: give the header once"
        )));
    }
    first
        .and_then(|value| value.to_str().ok())
        .and_then(BearerToken::from_header)
        .and_then(|token| auth.authenticate(&token))
        .ok_or_else(|| Status::unauthenticated(UNAUTHENTICATED_MESSAGE))
}

fn audit_unavailable() -> Status {
    Status::unavailable(
        "the audit trail cannot be written; the call was not completed, retry later",
    )
}

pub(super) fn correlation_from(metadata: &MetadataMap) -> Result<Uuid, Status> {
    let mut values = metadata.get_all(CORRELATION_HEADER).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Status::invalid_argument(format!(
            "{CORRELATION_HEADER}: give the header once"
        )));
    }
    match first {
        None => Ok(Uuid::new_v4()),
        Some(value) => match value.to_str().ok().and_then(|v| Uuid::parse_str(v).ok()) {
            Some(id) if id.get_version_num() == 4 => Ok(id),
            _ => Err(Status::invalid_argument(format!(
                "{CORRELATION_HEADER}: must be a v4 UUID"
            ))),
        },
    }
}

pub(super) fn instance_from(metadata: &MetadataMap) -> Result<String, String> {
    let read = |header: &str| -> Result<Option<String>, String> {
        let mut values = metadata.get_all(header).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(format!("{header}: give the header once"));
        }
        match first {
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
    if instance == WILDCARD_INSTANCE {
        return Err(format!(
            "{INSTANCE_HEADER}: \"*\" is not an instance id (it only means every instance in \
             the tokens file)"
        ));
    }
    if !valid_instance_id(&instance) {
        return Err(format!(
            "{INSTANCE_HEADER}: must be 1..{MAX_INSTANCE_LEN} printable ASCII characters without spaces"
        ));
    }
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_header_rules() {
        let mut md = MetadataMap::new();
        assert!(instance_from(&md).is_err());
        md.insert(ICP_INSTANCE_HEADER, "tenant-a".parse().unwrap());
        assert_eq!(instance_from(&md).unwrap(), "tenant-a");
        md.insert(INSTANCE_HEADER, "tenant-b".parse().unwrap());
        assert!(instance_from(&md).is_err());
        let mut md = MetadataMap::new();
        md.insert(INSTANCE_HEADER, "*".parse().unwrap());
        assert!(
            instance_from(&md)
                .unwrap_err()
                .contains("not an instance id")
        );
        let mut md = MetadataMap::new();
        md.append(INSTANCE_HEADER, "a".parse().unwrap());
        md.append(INSTANCE_HEADER, "a".parse().unwrap());
        assert!(instance_from(&md).unwrap_err().contains("once"));
    }

    #[test]
    fn every_method_of_the_kms_services_is_an_rpc_with_a_role() {
        use prost::Message;
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == "kms.v1")
            .flat_map(|f| f.service.iter())
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect();
        methods.sort();
        let mut declared: Vec<String> = Rpc::ALL.iter().map(|r| r.name().to_owned()).collect();
        declared.sort();
        assert_eq!(
            methods, declared,
            "a method of the proto has no Rpc (and so no role)"
        );
    }

    #[test]
    fn every_rpc_declares_a_role_and_the_levels_nest() {
        let viewer: Vec<_> = Rpc::ALL
            .iter()
            .filter(|r| r.required_role() == Role::Viewer)
            .map(|r| r.name())
            .collect();
        assert_eq!(viewer, ["WrapKey", "UnwrapKey", "RewrapKey"]);
        assert_eq!(Rpc::ListAuditEvents.required_role(), Role::Administrator);
        assert!(!Rpc::WrapKey.mutates() && Rpc::GetImportToken.mutates());
    }
}
