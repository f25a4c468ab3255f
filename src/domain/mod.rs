//! The key-management domain: who is calling, what may happen to a key, and the
//! invariants between the HSM and the store (create in the HSM, then persist).

pub mod backup;
pub mod ciphertext;
pub mod import_tokens;
pub mod key_pairs;
pub mod keys;
pub mod model;

/// Where a page of a key listing starts (the store's types, as the domain hands them on).
pub use crate::store::{KeyPosition, PageStart};

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use crate::hsm::HsmError;
use crate::store::StoreError;
use model::KeyState;

/// Everything an operation knows about its caller, built once per request by the API
/// layer's call gate once the caller is authenticated and authorized.
#[derive(Clone, Debug)]
pub struct CallerContext {
    pub instance: String,
    pub correlation_id: Uuid,
}

/// Domain errors. The API layer maps each variant to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    #[error("{what} not found")]
    NotFound { what: String },

    #[error("{operation} is not allowed: key {key_id} is {}", .state.name())]
    WrongState {
        operation: &'static str,
        key_id: Uuid,
        state: KeyState,
    },

    #[error("{0}")]
    FailedPrecondition(String),

    /// A scope beyond the caller's role (for example the audit trail of every instance).
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    #[error("the key was modified concurrently; retry")]
    Conflict,

    /// A fault of the service itself; logged in detail, answered generically.
    #[error("internal error: {0}")]
    Internal(String),

    #[error(transparent)]
    Hsm(#[from] HsmError),

    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for KmsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => KmsError::Conflict,
            other => KmsError::Store(other),
        }
    }
}

impl KmsError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        KmsError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// Attempts of a read-modify-write step before a conflict is given up.
const CAS_ATTEMPTS: u32 = 16;

/// Runs a read-modify-write step (read, compute, compare-and-swap by revision) until it
/// does not meet a concurrent change, at most [`CAS_ATTEMPTS`] times: the one retry
/// loop of the domain. After the first conflict each attempt waits a short random time
/// (up to 1 ms, then 2, ...), so replicas racing for one record do not collide in step.
pub async fn retry_on_conflict<T, F, Fut>(mut step: F) -> Result<T, KmsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KmsError>>,
{
    for attempt in 0..CAS_ATTEMPTS {
        if attempt > 0 {
            let ceiling_us = 1000u64 << (attempt - 1).min(4);
            let mut byte = [0u8; 2];
            let jitter = match getrandom::fill(&mut byte) {
                Ok(()) => u64::from(u16::from_le_bytes(byte)) % ceiling_us,
                Err(_) => ceiling_us / 2,
            };
            tokio::time::sleep(Duration::from_micros(jitter)).await;
        }
        match step().await {
            Err(KmsError::Conflict) => continue,
            other => return other,
        }
    }
    Err(KmsError::Conflict)
}
