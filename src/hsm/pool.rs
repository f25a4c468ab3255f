//! A bounded pool of PKCS#11 sessions handed out as owned guards.
//!
//! Sessions are opened lazily up to `capacity`; a guard returns its session on drop unless
//! the session was marked broken, in which case it is closed and a fresh one is opened on
//! the next checkout. Callers wait on a semaphore, so at most `capacity` PKCS#11 calls
//! run at once and no caller spins.

use std::sync::{Arc, Mutex};

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::HsmError;

pub(crate) struct SessionPool {
    ctx: Pkcs11,
    slot: Slot,
    idle: Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
}

impl SessionPool {
    pub(crate) fn new(ctx: Pkcs11, slot: Slot, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            slot,
            idle: Mutex::new(Vec::with_capacity(capacity)),
            permits: Arc::new(Semaphore::new(capacity)),
        })
    }

    /// Waits for a free place, then hands out an idle session or opens a new one.
    /// Opening is a PKCS#11 call, so it happens on the blocking thread in `PooledSession::session`.
    pub(crate) async fn checkout(self: &Arc<Self>) -> Result<PooledSession, HsmError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HsmError::Worker("session pool closed".into()))?;
        let session = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Ok(PooledSession {
            pool: Arc::clone(self),
            session,
            broken: false,
            _permit: permit,
        })
    }

    /// Closes every idle session; called once at shutdown after in-flight calls ended.
    pub(crate) fn close_all(&self) {
        self.permits.close();
        let sessions: Vec<Session> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for session in sessions {
            if let Err(e) = session.close() {
                tracing::warn!(error = %HsmError::from(e), "closing pooled session");
            }
        }
    }
}

/// An exclusive session for one blocking PKCS#11 job.
pub(crate) struct PooledSession {
    pool: Arc<SessionPool>,
    session: Option<Session>,
    broken: bool,
    _permit: OwnedSemaphorePermit,
}

impl PooledSession {
    /// The session, opened now if the pool had no idle one. Blocking: call off the executor.
    pub(crate) fn session(&mut self) -> Result<&Session, HsmError> {
        if self.session.is_none() {
            // Login state is per application, held by the anchor session, so a new
            // session is already in the logged-in user state.
            self.session = Some(self.pool.ctx.open_rw_session(self.pool.slot)?);
        }
        Ok(self.session.as_ref().expect("session just opened"))
    }

    /// Do not return this session to the pool.
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if self.broken {
                // Closing a dead session may fail too; nothing more can be done with it.
                let _ = session.close();
            } else {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(session);
            }
        }
    }
}
