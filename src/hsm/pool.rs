//! A bounded pool of PKCS#11 sessions, each owned by one dedicated worker thread.
//!
//! Jobs (closures over a `&Session`) go into one shared, bounded queue; `size` worker
//! threads take them in turn. Each worker owns its session, opening it lazily and
//! replacing it after a job reports the session broken or the module was
//! re-initialised. So at most `size` jobs run at once (besides them only the health
//! probe and the repair thread call the module), no session is ever shared, and no
//! PKCS#11 call runs on the async executor. A full queue refuses new jobs
//! ([`HsmError::Overloaded`]): under a flood, callers are told to back off at once
//! instead of piling up without limit.
//!
//! Why threads rather than `spawn_blocking` per call: under load a worker goes straight
//! from one job to the next without sleeping, so a call costs one wake-up (the reply)
//! instead of a thread hand-off in each direction. Measured with `kms bench`, this is
//! the difference between WrapKey at about half and at about three quarters of the
//! health-check baseline on a 2-core machine.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::error::HsmError;
use super::link::{Connection, WorkerSession};

/// A unit of work for a worker: gets the worker's session slot.
pub(crate) type Job = Box<dyn FnOnce(&mut WorkerSession) + Send>;

pub(crate) struct SessionPool {
    queue: Mutex<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl SessionPool {
    /// `size` workers sharing one queue of at most `queue_size` waiting jobs.
    pub(crate) fn start(
        connection: Arc<Connection>,
        size: usize,
        queue_size: usize,
    ) -> Result<Self, HsmError> {
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(queue_size);
        let mut workers = Vec::with_capacity(size);
        for index in 0..size {
            let receiver: Receiver<Job> = receiver.clone();
            let connection = Arc::clone(&connection);
            let worker = std::thread::Builder::new()
                .name(format!("hsm-{index}"))
                .spawn(move || {
                    let mut session = WorkerSession::default();
                    while let Ok(job) = receiver.recv() {
                        job(&mut session);
                    }
                    session.close_if_current(connection.current().map(|link| link.generation));
                })
                .map_err(|e| HsmError::Worker(format!("cannot start an HSM worker: {e}")))?;
            workers.push(worker);
        }
        Ok(Self {
            queue: Mutex::new(Some(sender)),
            workers: Mutex::new(workers),
        })
    }

    /// Queues a job for the next free worker; [`HsmError::Overloaded`] when the queue
    /// is full.
    pub(crate) fn submit(&self, job: Job) -> Result<(), HsmError> {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let queue = queue
            .as_ref()
            .ok_or_else(|| HsmError::Worker("the HSM session pool is shut down".into()))?;
        match queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(HsmError::Overloaded),
            Err(TrySendError::Disconnected(_)) => {
                Err(HsmError::Worker("the HSM workers stopped".into()))
            }
        }
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
