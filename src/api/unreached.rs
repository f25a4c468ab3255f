//! Audits the KMS calls that never reach the call gate: refused by gRPC itself before a
//! handler runs (a message over the size limit, bytes that do not decode, an unknown
//! method). A tower layer around the services marks each KMS request; the gate sets the
//! mark when it audits; a response to an unmarked call is recorded here, with the code
//! gRPC answered, the principal if the token is valid, and the instance if the header
//! is. Health and reflection are not KMS calls and are not audited.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpConnectInfo;
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

use super::call::{AUTHORIZATION_HEADER, CORRELATION_HEADER, ICP_INSTANCE_HEADER, INSTANCE_HEADER};
use crate::audit::{ANONYMOUS, AuditEvent, AuditTrail};
use crate::auth::{Authenticator, BearerToken};

const KMS_PATH_PREFIX: &str = "/kms.v1.";

/// Put on each KMS request; set by the call gate once it has audited the call.
#[derive(Clone, Default)]
pub struct GateReached(Arc<AtomicBool>);

impl GateReached {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct AuditUnreachedLayer {
    audit: Arc<AuditTrail>,
    auth: Arc<Authenticator>,
}

impl AuditUnreachedLayer {
    pub fn new(audit: Arc<AuditTrail>, auth: Arc<Authenticator>) -> Self {
        Self { audit, auth }
    }
}

impl<S> Layer<S> for AuditUnreachedLayer {
    type Service = AuditUnreached<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuditUnreached {
            inner,
            audit: Arc::clone(&self.audit),
            auth: Arc::clone(&self.auth),
        }
    }
}

#[derive(Clone)]
pub struct AuditUnreached<S> {
    inner: S,
    audit: Arc<AuditTrail>,
    auth: Arc<Authenticator>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> Service<Request<B>> for AuditUnreached<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Response<R>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if !request.uri().path().starts_with(KMS_PATH_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let reached = GateReached::default();
        request.extensions_mut().insert(reached.clone());
        // Only what a record needs, kept in case the gate never sees the call.
        let operation = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|info| info.remote_addr);
        let mut headers = HeaderMap::new();
        for name in [
            AUTHORIZATION_HEADER,
            INSTANCE_HEADER,
            ICP_INSTANCE_HEADER,
            CORRELATION_HEADER,
        ] {
            if let Some(value) = request.headers().get(name) {
                headers.insert(name, value.clone());
            }
        }
        let (audit, auth) = (Arc::clone(&self.audit), Arc::clone(&self.auth));
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            if !reached.0.load(Ordering::Relaxed) {
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(tonic::Code::Unknown as i32);
                record(
                    &audit,
                    &auth,
                    &operation,
                    MetadataMap::from_headers(headers),
                    code,
                    peer,
                );
            }
            Ok(response)
        })
    }
}

fn record(
    audit: &AuditTrail,
    auth: &Authenticator,
    operation: &str,
    metadata: MetadataMap,
    code: i32,
    peer: Option<std::net::SocketAddr>,
) {
    let principal = metadata
        .get(AUTHORIZATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(BearerToken::from_header)
        .and_then(|token| auth.authenticate(&token));
    let instance = super::call::instance_from(&metadata).unwrap_or_default();
    let correlation_id =
        super::call::correlation_from(&metadata).unwrap_or_else(|_| Uuid::new_v4());
    let event = AuditEvent {
        principal: principal.as_ref().map_or(ANONYMOUS, |p| p.name.as_str()),
        instance: &instance,
        operation,
        key_id: None,
        code,
        correlation_id,
        peer,
    };
    if let Err(error) = audit.append(&event) {
        tracing::error!(operation, error = %error, "cannot audit a call refused before its handler");
    }
}
