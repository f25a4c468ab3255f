//! What every KMS request meets before tonic decodes it, as a tower layer around the
//! services:
//! - authentication: a request without a valid bearer token is answered UNAUTHENTICATED
//!   here, so an unauthenticated caller learns nothing about its request, not even that
//!   it is too large or does not decode. The principal found goes to the call gate in the
//!   request's extensions;
//! - an audit record for calls that never reach the gate: refused here, or by gRPC
//!   itself before a handler runs (a message over the size limit, bytes that do not
//!   decode, an unknown method). The gate marks each call it audits; a response to an
//!   unmarked call is recorded here with the code gRPC answered. tonic enforces the
//!   client's `grpc-timeout` outside every layer by dropping the call's future, and a
//!   client that cancels has its future dropped too: an unmarked call dropped before it
//!   was answered is recorded DEADLINE_EXCEEDED (its deadline had passed) or CANCELLED
//!   (the gate records the calls it has taken over the same way);
//! - a message over the size limit is RESOURCE_EXHAUSTED naming the limit: gRPC refuses
//!   it before decoding with OUT_OF_RANGE, which says "a value out of range" to a caller
//!   whose only fault is the size. Only such an answer (OUT_OF_RANGE, the gate never
//!   reached) is rewritten; no handler answers OUT_OF_RANGE. Likewise tonic answers
//!   INTERNAL to malformed gRPC framing before any handler runs; that is the caller's
//!   malformed input, so INVALID_ARGUMENT (an operator is paged for INTERNAL).
//!
//! Health and reflection are not KMS calls: neither authenticated nor audited.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpConnectInfo;
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

use super::call::{
    CORRELATION_HEADER, ICP_INSTANCE_HEADER, INSTANCE_HEADER, authenticate, correlation_from,
    instance_from,
};
use super::correlation_value;
use crate::audit::{ANONYMOUS, AuditEvent, AuditTrail};
use crate::auth::{Authenticator, Principal};

const KMS_PATH_PREFIX: &str = "/kms.v1.";
/// The answer to a request whose gRPC framing tonic refused.
pub const MALFORMED_FRAME: &str =
    "the request is not a well-formed gRPC message (length-prefixed, uncompressed)";

/// Put on each KMS request: who the edge authenticated, and whether the call gate has
/// audited the call.
#[derive(Clone, Default)]
pub struct GateReached(Arc<EdgeState>);

#[derive(Default)]
struct EdgeState {
    audited: AtomicBool,
    principal: OnceLock<Arc<Principal>>,
    deadline: OnceLock<(Instant, Duration)>,
}

impl GateReached {
    pub fn mark(&self) {
        self.0.audited.store(true, Ordering::Relaxed);
    }

    pub fn principal(&self) -> Option<Arc<Principal>> {
        self.0.principal.get().cloned()
    }

    /// When the client's `grpc-timeout` runs out, and the timeout, if it sent one.
    pub fn deadline(&self) -> Option<(Instant, Duration)> {
        self.0.deadline.get().copied()
    }

    fn audited(&self) -> bool {
        self.0.audited.load(Ordering::Relaxed)
    }
}

/// The code recorded for a call dropped before it was answered: tonic drops a call whose
/// deadline passed, and the call of a client that went away. A client's own timer
/// usually fires a little before the server's and resets the stream, and the request
/// may reach this layer late on a busy server, so a call dropped in the last fifth of
/// its time (at least 5 ms) counts as cut off by its deadline.
pub fn dropped_call_code(deadline: Option<(Instant, Duration)>) -> tonic::Code {
    match deadline {
        Some((deadline, timeout))
            if Instant::now() + (timeout / 5).max(Duration::from_millis(5)) >= deadline =>
        {
            tonic::Code::DeadlineExceeded
        }
        _ => tonic::Code::Cancelled,
    }
}

/// The `grpc-timeout` header's value (gRPC over HTTP/2: at most eight digits and a
/// unit); `None` when absent or malformed, as tonic treats it.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Records, when dropped unanswered, a call neither the gate nor the edge has recorded.
struct RecordIfDropped {
    audit: Arc<AuditTrail>,
    principal: Arc<Principal>,
    reached: GateReached,
    uri: Uri,
    kept: Option<Kept>,
    peer: Option<std::net::SocketAddr>,
}

impl RecordIfDropped {
    /// The call was answered: what remains to record is the edge's to do, with the code.
    fn answered(mut self) -> Kept {
        self.kept.take().unwrap_or_default()
    }
}

impl Drop for RecordIfDropped {
    fn drop(&mut self) {
        let Some(kept) = self.kept.take() else {
            return;
        };
        if self.reached.audited() {
            return;
        }
        let code = dropped_call_code(self.reached.deadline()) as i32;
        let metadata = metadata_of(kept);
        let operation = operation_of(&self.uri);
        record(
            &self.audit,
            Some(&self.principal),
            operation,
            &metadata,
            code,
            self.peer,
        );
    }
}

#[derive(Clone)]
pub struct EdgeLayer {
    audit: Arc<AuditTrail>,
    auth: Arc<Authenticator>,
    max_request_bytes: usize,
}

impl EdgeLayer {
    pub fn new(audit: Arc<AuditTrail>, auth: Arc<Authenticator>, max_request_bytes: usize) -> Self {
        Self {
            audit,
            auth,
            max_request_bytes,
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge {
            inner,
            audit: Arc::clone(&self.audit),
            auth: Arc::clone(&self.auth),
            max_request_bytes: self.max_request_bytes,
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    audit: Arc<AuditTrail>,
    auth: Arc<Authenticator>,
    max_request_bytes: usize,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The headers a record of a call the gate never saw needs (who is known already).
const KEPT_HEADERS: [&str; 3] = [INSTANCE_HEADER, ICP_INSTANCE_HEADER, CORRELATION_HEADER];

/// Up to two values of each kept header (enough to tell a repeated one), as values that
/// share the request's bytes: nothing is allocated per call.
type Kept = [(&'static str, Option<HeaderValue>); 2 * KEPT_HEADERS.len()];

fn keep(headers: &HeaderMap) -> Kept {
    let mut kept = Kept::default();
    for (i, name) in KEPT_HEADERS.into_iter().enumerate() {
        let mut values = headers.get_all(name).iter();
        kept[2 * i] = (name, values.next().cloned());
        kept[2 * i + 1] = (name, values.next().cloned());
    }
    kept
}

fn metadata_of(kept: Kept) -> MetadataMap {
    let mut headers = HeaderMap::new();
    for (name, value) in kept {
        if let Some(value) = value {
            headers.append(name, value);
        }
    }
    MetadataMap::from_headers(headers)
}

fn operation_of(uri: &Uri) -> &str {
    uri.path().rsplit('/').next().unwrap_or_default()
}

impl<S, B, R> Service<Request<B>> for Edge<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
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
        let peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|info| info.remote_addr);
        let audit = Arc::clone(&self.audit);
        let kept = keep(request.headers());
        let principal = match authenticate(&self.auth, request.headers()) {
            Ok(principal) => principal,
            Err(status) => {
                let code = status.code() as i32;
                let metadata = metadata_of(kept);
                let operation = operation_of(request.uri());
                let correlation_id = record(&audit, None, operation, &metadata, code, peer);
                let mut status = status;
                if let Some(value) = correlation_value(correlation_id) {
                    status.metadata_mut().insert(CORRELATION_HEADER, value);
                }
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let reached = GateReached::default();
        let _ = reached.0.principal.set(Arc::clone(&principal));
        if let Some(timeout) = grpc_timeout(request.headers()) {
            let _ = reached.0.deadline.set((Instant::now() + timeout, timeout));
        }
        let guard = RecordIfDropped {
            audit,
            principal,
            reached: reached.clone(),
            uri: request.uri().clone(),
            kept: Some(kept),
            peer,
        };
        request.extensions_mut().insert(reached.clone());
        let answer = self.inner.call(request);
        let max_request_bytes = self.max_request_bytes;
        Box::pin(async move {
            let answer = answer.await;
            let audit = Arc::clone(&guard.audit);
            let principal = Arc::clone(&guard.principal);
            let uri = guard.uri.clone();
            let kept = guard.answered();
            let mut response = answer?;
            if !reached.audited() {
                let mut code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(tonic::Code::Unknown as i32);
                if code == tonic::Code::OutOfRange as i32 {
                    response = tonic::Status::resource_exhausted(format!(
                        "the request message is larger than the {max_request_bytes} bytes \
                         this server accepts"
                    ))
                    .into_http();
                    code = tonic::Code::ResourceExhausted as i32;
                } else if code == tonic::Code::Internal as i32 {
                    // Before any handler, INTERNAL is tonic refusing the request's gRPC
                    // framing (a compressed flag with no encoding, a body cut short):
                    // the caller's malformed input, not a fault of the service.
                    response = tonic::Status::invalid_argument(MALFORMED_FRAME).into_http();
                    code = tonic::Code::InvalidArgument as i32;
                }
                let metadata = metadata_of(kept);
                let operation = operation_of(&uri);
                record(&audit, Some(&principal), operation, &metadata, code, peer);
            }
            Ok(response)
        })
    }
}

/// Appends the record of a call the gate did not see; returns its correlation id.
fn record(
    audit: &AuditTrail,
    principal: Option<&Principal>,
    operation: &str,
    metadata: &MetadataMap,
    code: i32,
    peer: Option<std::net::SocketAddr>,
) -> Uuid {
    let instance = instance_from(metadata).unwrap_or_default();
    let correlation_id = correlation_from(metadata).unwrap_or_else(|_| Uuid::new_v4());
    let event = AuditEvent {
        principal: principal.map_or(ANONYMOUS, |p| p.name.as_str()),
        instance: &instance,
        operation,
        key_id: None,
        code,
        correlation_id,
        peer,
    };
    if let Err(error) = audit.append(&event) {
        tracing::debug!(operation, error = %error, "cannot audit a call refused before its handler");
    }
    correlation_id
}
