//! Group commit: concurrent writes share one transaction and one flush. A committer thread
//! takes every write waiting when it is free (up to [`MAX_BATCH`]), runs them one after the
//! other in one transaction and commits once; a write that fails in the store rolls the batch
//! back, and then each write of the batch runs again alone, so one bad write never takes the
//! others with it. With [`GroupCommit::Off`] every write is its own transaction, as the
//! caller's thread runs it.

use std::sync::mpsc;
use std::sync::Arc;

use crate::error::{Error, Result};
use skydd_sql::{Backend, Sql};

/// The most writes one transaction takes.
pub const MAX_BATCH: usize = 256;

/// Whether concurrent writes share transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupCommit {
    /// Each write commits alone (one flush each).
    #[default]
    Off,
    /// Writes waiting together commit together (one flush per batch).
    On,
}

/// One write waiting for the committer, with the channel its caller waits on.
trait Job: Send {
    /// Runs the write in the open transaction; `false` if the store failed (the
    /// transaction must not commit).
    fn run(&mut self, sql: &mut dyn Sql) -> bool;
    /// Hands the outcome to the caller: the write's own if the transaction committed, the
    /// commit's failure otherwise.
    fn finish(self: Box<Self>, committed: Result<()>);
}

struct Pending<T, F> {
    work: F,
    outcome: Option<Result<T>>,
    reply: mpsc::SyncSender<Result<T>>,
}

impl<T: Send, F: Fn(&mut dyn Sql) -> Result<T> + Send> Job for Pending<T, F> {
    fn run(&mut self, sql: &mut dyn Sql) -> bool {
        let outcome = (self.work)(sql);
        let stored = !matches!(outcome, Err(Error::Store(_) | Error::AuditChainBroken(_)));
        self.outcome = Some(outcome);
        stored
    }

    fn finish(self: Box<Self>, committed: Result<()>) {
        let outcome = match committed {
            Ok(()) => self.outcome.unwrap_or_else(|| Err(Error::Store("a write was never run".into()))),
            Err(error) => Err(error),
        };
        // A caller that gave up waiting no longer listens; nothing to tell it.
        let _ = self.reply.send(outcome);
    }
}

/// Runs writes, grouped or alone.
pub(super) struct Committer {
    backend: Arc<Backend>,
    queue: Option<mpsc::Sender<Box<dyn Job>>>,
}

impl Committer {
    /// A committer over `backend`; with [`GroupCommit::On`] its thread starts now and ends
    /// when the committer is dropped.
    pub(super) fn start(backend: Arc<Backend>, mode: GroupCommit) -> Result<Self> {
        let queue = match mode {
            GroupCommit::Off => None,
            GroupCommit::On => {
                let (sender, receiver) = mpsc::channel::<Box<dyn Job>>();
                let thread_backend = backend.clone();
                std::thread::Builder::new()
                    .name("ttp-group-commit".into())
                    .spawn(move || commit_loop(&thread_backend, &receiver))
                    .map_err(|e| Error::Store(format!("start the group-commit thread: {e}")))?;
                Some(sender)
            }
        };
        Ok(Self { backend, queue })
    }

    /// Runs `work` in a write transaction and returns its outcome once committed.
    pub(super) fn run<T: Send + 'static>(
        &self,
        work: impl Fn(&mut dyn Sql) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, outcome) = mpsc::sync_channel(1);
        let job: Box<dyn Job> = Box::new(Pending { work, outcome: None, reply });
        match &self.queue {
            None => run_alone(&self.backend, job),
            Some(queue) => queue.send(job).map_err(|_| Error::Store("the group-commit thread has stopped".into()))?,
        }
        outcome.recv().map_err(|_| Error::Store("the group-commit thread dropped a write".into()))?
    }
}

fn run_alone(backend: &Backend, mut job: Box<dyn Job>) {
    // Rolled back (`Ok(false)`): the job's own outcome is the store's failure, and nothing
    // of it was written.
    let committed = backend.transaction(|sql| job.run(sql)).map(drop).map_err(Error::from);
    job.finish(committed);
}

fn commit_loop(backend: &Backend, queue: &mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() == 1 {
            batch.into_iter().for_each(|job| run_alone(backend, job));
            continue;
        }
        match backend.transaction(|sql| batch.iter_mut().all(|job| job.run(sql))) {
            Ok(true) => batch.into_iter().for_each(|job| job.finish(Ok(()))),
            // One write failed in the store and the batch rolled back: each runs again alone.
            Ok(false) => batch.into_iter().for_each(|job| run_alone(backend, job)),
            // No transaction, or a commit whose outcome is unknown: nothing is run twice.
            Err(error) => batch.into_iter().for_each(|job| job.finish(Err(Error::Store(error.to_string())))),
        }
    }
}
