//! Group commit: every caller of [`GroupFlusher::flush`] waits for a flush that started
//! after its call, and all callers waiting at the same moment share that one fsync. The
//! fsync runs on the flusher's own thread, never on the async executor.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::{BACKEND, StoreError};

type Waiter = oneshot::Sender<Result<(), String>>;

pub(super) struct GroupFlusher {
    requests: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The last flush failed.
    failing: Arc<AtomicBool>,
}

/// The thread holds the database open: it is stopped and joined when the store is
/// dropped, so the same directory can be opened again at once.
impl Drop for GroupFlusher {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl GroupFlusher {
    /// Starts the flush thread; it ends when the flusher is dropped.
    pub(super) fn start(db: ::sled::Db) -> Self {
        let (requests, incoming) = mpsc::channel::<Waiter>();
        let failing_flag = Arc::new(AtomicBool::new(false));
        let shared_flag = Arc::clone(&failing_flag);
        let thread = std::thread::Builder::new()
            .name("sled-flush".into())
            .spawn(move || {
                let mut failing = false;
                while let Ok(first) = incoming.recv() {
                    // Everyone who asked before this flush starts is covered by it.
                    let mut waiters = vec![first];
                    waiters.extend(incoming.try_iter());
                    let outcome = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    // Once per episode: every waiter's call fails, and says so at debug.
                    match &outcome {
                        Err(error) if !failing => {
                            tracing::error!(error = %error, "flushing the store failed: mutating calls are refused until it works");
                            failing = true;
                        }
                        Ok(()) if failing => {
                            tracing::warn!("flushing the store works again");
                            failing = false;
                        }
                        _ => {}
                    }
                    shared_flag.store(failing, Ordering::Release);
                    for waiter in waiters {
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })
            .expect("spawning the flush thread");
        Self {
            requests: Some(requests),
            thread: Some(thread),
            failing: failing_flag,
        }
    }

    /// True when the last flush failed.
    pub(super) fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Returns once everything written before this call is on disk.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let gone = || StoreError::unavailable(BACKEND, "the flush thread stopped");
        let (tx, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(gone)?
            .send(tx)
            .map_err(|_| gone())?;
        rx.await
            .map_err(|_| gone())?
            .map_err(|e| StoreError::unavailable(BACKEND, e))
    }
}
