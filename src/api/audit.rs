//! `kms.v1.AuditService`: an Administrator reads the audit trail of an instance; an
//! Administrator on `*` may read every instance's with `all_instances`.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::call::{AuditedKey, CallGate, Rpc};
use super::{convert, parse_key_id};
use crate::audit::{AuditQuery, AuditRecord, AuditTrail};
use crate::auth::Role;
use crate::domain::KmsError;
use crate::proto;
use crate::proto::audit_service_server::AuditService;

pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

pub struct AuditApi {
    trail: Arc<AuditTrail>,
    gate: Arc<CallGate>,
}

impl AuditApi {
    pub fn new(trail: Arc<AuditTrail>, gate: Arc<CallGate>) -> Self {
        Self { trail, gate }
    }
}

impl AuditedKey for proto::ListAuditEventsRequest {}
impl AuditedKey for proto::ListAuditEventsResponse {}

fn event(record: AuditRecord) -> proto::AuditEvent {
    proto::AuditEvent {
        sequence: record.seq,
        time: Some(convert::timestamp(record.time_ms)),
        code_name: format!("{:?}", Code::from(record.code)),
        principal: record.principal,
        instance: record.instance,
        operation: record.operation,
        key_id: record.key_id,
        code: record.code,
        correlation_id: record.correlation_id,
        peer: record.peer,
        hash: hex::encode(record.hash),
        prev_hash: hex::encode(record.prev_hash),
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        self.gate
            .call(
                Rpc::ListAuditEvents,
                request,
                |caller, request| async move {
                    let instance = if request.all_instances {
                        if !caller
                            .principal
                            .grants
                            .everywhere_at_least(Role::Administrator)
                        {
                            return Err(KmsError::PermissionDenied(
                                "all_instances needs the Administrator role on every instance (*)"
                                    .into(),
                            ));
                        }
                        None
                    } else {
                        Some(caller.ctx.instance.clone())
                    };
                    let page_size = match request.page_size {
                        0 => DEFAULT_PAGE_SIZE,
                        n if n > 0 && n as usize <= MAX_PAGE_SIZE => n as usize,
                        n => {
                            return Err(KmsError::invalid(
                                "page_size",
                                format!("must be 1..{MAX_PAGE_SIZE}; got {n}"),
                            ));
                        }
                    };
                    let optional = |text: String| (!text.is_empty()).then_some(text);
                    let mut query = AuditQuery {
                        instance,
                        since_ms: request
                            .start_time
                            .as_ref()
                            .map(|t| convert::millis_from("start_time", t))
                            .transpose()?,
                        until_ms: request
                            .end_time
                            .as_ref()
                            .map(|t| convert::millis_from("end_time", t))
                            .transpose()?,
                        key_id: if request.key_id.is_empty() {
                            None
                        } else {
                            Some(parse_key_id("key_id", &request.key_id)?)
                        },
                        principal: optional(request.principal),
                        operation: optional(request.operation),
                        code: request.code,
                        page_size,
                        before_seq: None,
                    };
                    if !request.page_token.is_empty() {
                        query
                            .resume_from(&request.page_token)
                            .map_err(|e| KmsError::invalid("page_token", e.to_string()))?;
                    }
                    let page = self
                        .trail
                        .query(&query)
                        .await
                        .map_err(|e| KmsError::Internal(e.to_string()))?;
                    Ok(proto::ListAuditEventsResponse {
                        events: page.records.into_iter().map(event).collect(),
                        next_page_token: page.next_page_token.unwrap_or_default(),
                    })
                },
            )
            .await
    }
}
