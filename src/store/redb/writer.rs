//! The one writer: every change to the database runs on this thread, in batches. What
//! callers send while a commit is under way waits in the channel; the next batch takes
//! all of it and runs it in one write transaction, so a write costs one redb commit
//! shared with whatever else arrived meanwhile, not one each.
//!
//! Durability is the same group commit as sled's flush: a batch commits with
//! [`Durability::None`] (visible to readers at once, in memory) unless someone in it
//! asked for [`Writer::sync`] or wrote durably ([`Writer::write`]), or the oldest change not yet on disk is older than
//! [`FLUSH_EVERY`]; then it commits with [`Durability::Immediate`], which puts every
//! earlier commit on disk as well. A crash loses only what no `sync` returned for.
//!
//! A job checks what it must (a revision, an existing id) and decodes what it reads
//! before it changes anything, and returns its refusal (a conflict, a corrupt record)
//! without writing. A job that fails part way (the
//! database's own error) poisons the transaction: the batch is aborted and every job
//! in it answers UNAVAILABLE, since none of their changes were committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::oneshot;

use super::{BACKEND, redb_error};
use crate::store::StoreError;

/// Changes are put on disk at least this often even when nobody asks (sled's periodic
/// flush, the same bound), so a quiet server does not hold unflushed pages for long.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// What a job leaves to be told once its batch is committed (or not).
type Completion = Box<dyn FnOnce(Result<(), &str>) + Send>;
/// Run with the batch's transaction, or with none when there is no transaction to run
/// in (its completion is then told why).
type Job = Box<dyn FnOnce(Option<&WriteTransaction>) -> (Completion, bool) + Send>;

enum Request {
    /// A job, and whether its batch must reach the disk before it is answered.
    Write(Job, bool),
    Sync(oneshot::Sender<Result<(), String>>),
}

pub(super) struct Writer {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The last commit failed: the database may need reopening.
    failing: Arc<AtomicBool>,
}

/// The thread holds the database: it is stopped and joined when the writer is dropped,
/// so the file can be opened again at once.
impl Drop for Writer {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Writer {
    pub(super) fn start(db: Arc<Database>) -> Self {
        let (requests, incoming) = mpsc::channel::<Request>();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&failing);
        let thread = std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || run(&db, &incoming, &flag))
            .expect("spawning the redb writer thread");
        Self {
            requests: Some(requests),
            thread: Some(thread),
            failing,
        }
    }

    pub(super) fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        self.requests
            .as_ref()
            .and_then(|requests| requests.send(request).ok())
            .ok_or_else(gone)
    }

    /// Runs `work` in the next batch's transaction; its result once the batch is
    /// committed. `work` must return a refusal before it changes anything.
    /// With `durable`, answered once its batch is on disk with every earlier write: a
    /// write and a [`Writer::sync`] in one trip through the writer instead of two.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
        durable: bool,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |txn| {
            let result = match txn {
                Some(txn) => work(txn),
                None => Err(gone()),
            };
            // A refusal (a conflict) or a corrupt record is found before anything is
            // written; only the database's own failure can leave the job half done.
            let poisoned = matches!(result, Err(StoreError::Unavailable { .. }));
            let completion: Completion = Box::new(move |committed| {
                let _ = reply.send(match committed {
                    Ok(()) => result,
                    Err(cause) => Err(StoreError::unavailable(BACKEND, cause.to_owned())),
                });
            });
            (completion, poisoned)
        });
        self.send(Request::Write(job, durable))?;
        answer.await.map_err(|_| gone())?
    }

    /// Returns once every write that returned before this call is on disk.
    pub(super) async fn sync(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Sync(reply))?;
        answer
            .await
            .map_err(|_| gone())?
            .map_err(|e| StoreError::unavailable(BACKEND, e))
    }
}

fn gone() -> StoreError {
    StoreError::unavailable(BACKEND, "the writer thread stopped")
}

fn run(db: &Database, incoming: &mpsc::Receiver<Request>, failing: &AtomicBool) {
    // When the oldest commit not yet on disk was made.
    let mut unflushed_since: Option<Instant> = None;
    loop {
        let first = match unflushed_since {
            Some(since) => {
                let left = FLUSH_EVERY.saturating_sub(since.elapsed());
                match incoming.recv_timeout(left) {
                    Ok(request) => Some(request),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            None => match incoming.recv() {
                Ok(request) => Some(request),
                Err(_) => break,
            },
        };
        let batch: Vec<Request> = first.into_iter().chain(incoming.try_iter()).collect();
        let outcome = commit_batch(db, batch, &mut unflushed_since);
        report(outcome.as_ref().err(), failing);
    }
    // Whatever was committed in memory goes to disk before the database closes.
    if unflushed_since.is_some() {
        let _ = commit(db, Durability::Immediate, Vec::new());
    }
}

/// Runs one batch. Returns the commit's error, if it failed.
fn commit_batch(
    db: &Database,
    batch: Vec<Request>,
    unflushed_since: &mut Option<Instant>,
) -> Result<(), String> {
    let mut jobs = Vec::new();
    let mut syncs = Vec::new();
    let mut durable_write = false;
    for request in batch {
        match request {
            Request::Write(job, durable) => {
                durable_write |= durable;
                jobs.push(job);
            }
            Request::Sync(reply) => syncs.push(reply),
        }
    }
    let due = durable_write || unflushed_since.is_some_and(|since| since.elapsed() >= FLUSH_EVERY);
    if jobs.is_empty() && (syncs.is_empty() || unflushed_since.is_none()) && !due {
        // Nothing changed since the last commit to disk.
        for reply in syncs {
            let _ = reply.send(Ok(()));
        }
        return Ok(());
    }
    let durability = if syncs.is_empty() && !due {
        Durability::None
    } else {
        Durability::Immediate
    };
    let outcome = commit(db, durability, jobs);
    match (&outcome, durability) {
        (Ok(()), Durability::Immediate) => *unflushed_since = None,
        (Ok(()), _) => {
            unflushed_since.get_or_insert_with(Instant::now);
        }
        (Err(_), _) => {}
    }
    for reply in syncs {
        let _ = reply.send(outcome.clone());
    }
    outcome
}

/// One write transaction with every job of the batch, then its commit; each job is
/// told the outcome.
fn commit(db: &Database, durability: Durability, jobs: Vec<Job>) -> Result<(), String> {
    let mut txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => return fail_all(jobs, &redb_error(e).to_string()),
    };
    if let Err(e) = txn.set_durability(durability) {
        return fail_all(jobs, &redb_error(e).to_string());
    }
    let mut completions = Vec::with_capacity(jobs.len());
    let mut poisoned = false;
    for job in jobs {
        let (completion, failed) = job(Some(&txn));
        completions.push(completion);
        poisoned |= failed;
    }
    let outcome = if poisoned {
        let _ = txn.abort();
        Err("a change in the batch failed; nothing in it was committed".to_owned())
    } else {
        txn.commit().map_err(|e| redb_error(e).to_string())
    };
    for completion in completions {
        completion(outcome.as_ref().map(|_| ()).map_err(String::as_str));
    }
    outcome
}

fn fail_all(jobs: Vec<Job>, cause: &str) -> Result<(), String> {
    for job in jobs {
        let (completion, _) = job(None);
        completion(Err(cause));
    }
    Err(cause.to_owned())
}

/// Logged once per episode, like sled's flush failures.
fn report(error: Option<&String>, failing: &AtomicBool) {
    let was = failing.swap(error.is_some(), Ordering::AcqRel);
    match error {
        Some(error) if !was => tracing::error!(
            error = %error,
            "committing to the store failed: mutating calls are refused until it works"
        ),
        None if was => tracing::warn!("committing to the store works again"),
        _ => {}
    }
}
