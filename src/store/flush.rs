//! Group commit: every mutating call waits for a flush that started after its write,
//! and all callers waiting at the same moment share that one flush.
//!
//! A flush first runs the `before_sync` step (the audit trail writes its pending
//! records there, as one block for the whole group), then syncs the database.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Clone)]
pub struct GroupFlusher {
    requests: mpsc::UnboundedSender<Waiter>,
}

impl GroupFlusher {
    /// Starts the flush worker on the current tokio runtime.
    pub fn start(
        db: sled::Db,
        before_sync: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        let before_sync = Arc::new(before_sync);
        let (requests, mut incoming) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(first) = incoming.recv().await {
                // Everyone who asked before this flush starts is covered by it.
                let mut waiters = vec![first];
                while let Ok(more) = incoming.try_recv() {
                    waiters.push(more);
                }
                let db = db.clone();
                let before_sync = Arc::clone(&before_sync);
                let outcome = tokio::task::spawn_blocking(move || {
                    before_sync()?;
                    db.flush().map(|_| ()).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
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
