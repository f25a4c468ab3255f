//! Group commit: every mutating call waits for a flush that started after its write,
//! and all callers waiting at the same moment share that one flush.

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Clone)]
pub struct GroupFlusher {
    requests: mpsc::UnboundedSender<Waiter>,
}

impl GroupFlusher {
    /// Starts the flush worker on the current tokio runtime.
    pub fn start(db: sled::Db) -> Self {
        let (requests, mut incoming) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            while let Some(first) = incoming.recv().await {
                // Everyone who asked before this flush starts is covered by it.
                let mut waiters = vec![first];
                while let Ok(more) = incoming.try_recv() {
                    waiters.push(more);
                }
                let db = db.clone();
                let outcome = tokio::task::spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
            }
        });
        Self { requests }
    }

    /// Returns once everything written before this call is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .map_err(|_| StoreError::FlushWorkerGone)?;
        rx.await
            .map_err(|_| StoreError::FlushWorkerGone)?
            .map_err(StoreError::Flush)
    }
}
