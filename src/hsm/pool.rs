//! A bounded pool of PKCS#11 sessions, each owned by one dedicated worker thread.
//!
//! Jobs (closures over a `&Session`) go into one shared queue; `size` worker threads take
//! them in turn. Each worker owns its session for its whole life, opening it lazily and
//! replacing it after a job reports the session broken. So at most `size` PKCS#11 calls
//! run at once, no session is ever shared, and no PKCS#11 call runs on the async
//! executor.
//!
//! Why threads rather than `spawn_blocking` per call: under load a worker goes straight
//! from one job to the next without sleeping, so a call costs one wake-up (the reply)
//! instead of a thread hand-off in each direction. Measured with `kms bench`, this is
//! the difference between WrapKey at about half and at about three quarters of the
//! health-check baseline on a 2-core machine.

use std::sync::Mutex;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::error::HsmError;

/// A unit of work for a worker: gets the worker's session slot.
pub(crate) type Job = Box<dyn FnOnce(&mut WorkerSession) + Send>;

/// A worker's session, opened on first use and reopened after it breaks.
pub(crate) struct WorkerSession {
    ctx: Pkcs11,
    slot: Slot,
    session: Option<Session>,
}

impl WorkerSession {
    /// The session, opened now if needed. Login state belongs to the application (held
    /// by the anchor session), so a new session is already logged in.
    pub(crate) fn session(&mut self) -> Result<&Session, HsmError> {
        if self.session.is_none() {
            self.session = Some(self.ctx.open_rw_session(self.slot)?);
        }
        Ok(self.session.as_ref().expect("session just opened"))
    }

    /// Closes the session; the next job gets a new one.
    pub(crate) fn discard(&mut self) {
        if let Some(session) = self.session.take() {
            // Closing a dead session may fail too; nothing more can be done with it.
            let _ = session.close();
        }
    }
}

pub(crate) struct SessionPool {
    queue: Mutex<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl SessionPool {
    pub(crate) fn start(ctx: Pkcs11, slot: Slot, size: usize) -> Result<Self, HsmError> {
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let mut workers = Vec::with_capacity(size);
        for index in 0..size {
            let receiver: Receiver<Job> = receiver.clone();
            let mut slot_state = WorkerSession {
                ctx: ctx.clone(),
                slot,
                session: None,
            };
            let worker = std::thread::Builder::new()
                .name(format!("hsm-{index}"))
                .spawn(move || {
                    while let Ok(job) = receiver.recv() {
                        job(&mut slot_state);
                    }
                    if let Some(session) = slot_state.session.take()
                        && let Err(e) = session.close()
                    {
                        tracing::warn!(error = %HsmError::from(e), "closing a pooled session");
                    }
                })
                .map_err(|e| HsmError::Worker(format!("cannot start an HSM worker: {e}")))?;
            workers.push(worker);
        }
        Ok(Self {
            queue: Mutex::new(Some(sender)),
            workers: Mutex::new(workers),
        })
    }

    /// Queues a job for the next free worker.
    pub(crate) fn submit(&self, job: Job) -> Result<(), HsmError> {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue
            .as_ref()
            .ok_or_else(|| HsmError::Worker("the HSM session pool is shut down".into()))?
            .send(job)
            .map_err(|_| HsmError::Worker("the HSM workers stopped".into()))
    }

    /// Lets the workers finish queued jobs, then closes every session. Blocking.
    pub(crate) fn close_all(&self) {
        drop(self.queue.lock().unwrap_or_else(|e| e.into_inner()).take());
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for worker in workers {
            let _ = worker.join();
        }
    }
}
