//! The store's one writer: every change goes through a single thread that takes whatever has
//! queued up, applies it in **one** sled transaction, makes it durable with **one** flush plus
//! fdatasync, and only then answers each caller. One thread means sled's global transaction
//! lock is never contended; one transaction and one flush per round means their cost is shared
//! by everything that arrived while the previous round was on its way to disk (group commit).
//!
//! sled's `flush` writes with `sync_file_range`, which is not an fsync, and `flush_async`
//! deadlocks under concurrency (sled #1308): the thread calls the blocking flush and then
//! fdatasyncs sled's data file. Callers encode their values before they queue (that work is
//! spread over their own threads); `transaction` applies a round, as `store::rules` decides.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::bundles::{BundleAppender, BundleAt, BundleLog};
use super::fresh::Fresh;
use super::queue::{Change, Queue};
use crate::store::model::{
    Accepted, CommitStats, Consequences, EhrResource, Event, EventOutcome, Health, Inbound, JobId,
    StoreError, SubmissionRecord, Taken, Transition,
};

/// How many writes one round takes at most (the rest wait for the next round).
const MAX_ROUND: usize = 512;

/// One change, with its values already encoded by the caller.
pub(crate) enum Write {
    Accept {
        key: String,
        /// The encoded record (its queued events noted).
        record: Vec<u8>,
        payload_sha256: String,
        revision: u32,
        /// The Bundle's JSON, handed to its first delivery from memory (`Fresh`).
        bundle: Vec<u8>,
        /// The Bundle as the log keeps it (LZ4).
        lz4: Vec<u8>,
        /// The patient index entry: `<system>|<value>`.
        patient: String,
        /// A revision: of the submission whose payload (hash) this is, else refused (a
        /// `Conflict`: another revision came first). `None`: a new submission.
        revises: Option<String>,
        /// Queued with it, if it is stored.
        events: Vec<Event>,
    },
    /// A delivery attempt's outcome (the EHR job of submission `key`).
    Delivery {
        key: String,
        transition: Transition,
        ehr: Vec<EhrResource>,
        /// Which revision the attempt sent (`None`: not a delivery's outcome).
        sent: Option<u32>,
        /// The events to queue if the outcome stands.
        consequences: Consequences,
    },
    /// An event delivery's outcome.
    Settle {
        job: JobId,
        failures: u32,
        outcome: EventOutcome,
    },
    Requeue {
        job: JobId,
        at: String,
    },
    /// Appends a kept Bundle (LZ4) again, at the end of the log, and points its record there:
    /// the retention sweep moves what must outlive an old segment before dropping it.
    Move {
        key: String,
        lz4: Vec<u8>,
    },
    /// Bundles below this offset of the log are expiring (a retention sweep is about to drop
    /// their segments): replays of their submissions are refused from this round on. Answered
    /// once every write before it is durable, so the sweep's scan sees every replay that got
    /// in before.
    Expire {
        below: u64,
    },
    /// An operator's access, into the audit trail (outside the round's transaction: it
    /// stands on its own), answered once durable.
    Audit {
        key: [u8; 16],
        access: Vec<u8>,
    },
    /// Audit entries past their retention, out of the trail (outside the transaction, as
    /// they went in).
    Forget {
        keys: Vec<sled::IVec>,
    },
    /// An inbound event seen as `seen`, and what it comes to (`Store::take_inbound`); `key` is
    /// where it is kept if unmatched (`keys::audit_key`).
    Inbound {
        seen: String,
        inbound: Inbound,
        key: [u8; 16],
        at: String,
    },
    /// A named cursor set (outside the transaction: it stands on its own).
    Cursor {
        name: String,
        value: String,
    },
    /// Nothing to write: answered once everything queued before it is durable.
    Barrier,
}

/// What a write did.
pub(crate) enum Written {
    Accepted(Accepted),
    Record(Option<Box<SubmissionRecord>>),
    /// A `Move` (its record, if there, points at the new place).
    Moved,
    /// A `Requeue` refused: the submission's Bundle has expired (or is expiring).
    Expired,
    Taken(Taken),
    Barrier,
}

pub(crate) type Reply = Box<dyn FnOnce(Result<Written, StoreError>) + Send>;

pub(crate) struct Trees {
    pub db: sled::Db,
    pub submissions: sled::Tree,
    pub bundles: BundleLog,
    /// Jobs waiting: job key → `outbox_entry`.
    pub outbox: sled::Tree,
    /// Webhook jobs' events (job key → `encode_event`), while waiting or dead-lettered.
    pub events: sled::Tree,
    /// The next event job's number: above every number of a job still in the store (read at
    /// open), so that a submission's later events always come after its earlier ones.
    pub next_seq: std::sync::atomic::AtomicU64,
    /// What `outbox` holds, oldest first, kept by the writer.
    pub queue: Queue,
    /// `<resource type>/<id>` → submission key.
    pub by_resource: sled::Tree,
    /// `<system>|<value>\0<submission key>` → nothing.
    pub by_patient: sled::Tree,
    /// Operators' accesses, oldest first (`keys::audit_key`).
    pub audit: sled::Tree,
    /// Dead-lettered jobs: job key → when (Unix µs, eight little-endian bytes); in by the dead
    /// letter, out by a replay.
    pub dead_letters: sled::Tree,
    /// Inbound events: `keys::seen_key` → when (a mark that one was taken), and
    /// `keys::unmatched_key` → an `Unmatched` (JSON), oldest first.
    pub inbound: sled::Tree,
    /// Named cursors (how far a poll has read): name → value.
    pub cursors: sled::Tree,
    pub fresh: Fresh,
}

/// What the writer thread says of itself (read by `/ready`).
#[derive(Default)]
pub(crate) struct Status {
    stats: Mutex<CommitStats>,
    /// Why the last round failed, if it did.
    failing: Mutex<Option<String>>,
    /// Why the thread stopped, once it has.
    stopped: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Status {
    pub(crate) fn health(&self) -> Health {
        if let Some(why) = lock(&self.stopped).clone() {
            return Health::Stopped(why);
        }
        match lock(&self.failing).clone() {
            Some(why) => Health::Failing(why),
            None => Health::Writing,
        }
    }

    pub(crate) fn stats(&self) -> CommitStats {
        *lock(&self.stats)
    }
}

/// Marks the writer stopped when its thread ends, whether it returns or panics.
struct Stopping(Arc<Status>);

impl Drop for Stopping {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            "the store's writer thread panicked"
        } else {
            "the store is closed"
        };
        *lock(&self.0.stopped) = Some(why.to_string());
    }
}

pub(crate) struct Writer {
    /// `None` only while dropping: the thread ends once the queue is closed and drained.
    queue: Option<mpsc::Sender<(Write, Reply)>>,
    pub(crate) status: Arc<Status>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn start(
        trees: Arc<Trees>,
        mut appender: BundleAppender,
        dir: &Path,
    ) -> Result<Writer, StoreError> {
        let (tx, rx) = mpsc::channel::<(Write, Reply)>();
        let status = Arc::new(Status::default());
        // sled's data file, opened once: every round ends with its fdatasync.
        let path = dir.join("db");
        let data_file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let thread_status = Arc::clone(&status);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let _stopping = Stopping(Arc::clone(&thread_status));
                write_loop(
                    &trees,
                    &mut appender,
                    (&path, &data_file),
                    &rx,
                    &thread_status,
                )
            })
            .map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Writer {
            queue: Some(tx),
            status,
            thread: Some(thread),
        })
    }

    /// Queues a write; `reply` is called from the writer thread once it is durable (or failed).
    pub(crate) fn submit(&self, write: Write, reply: Reply) {
        match &self.queue {
            Some(queue) => {
                if let Err(mpsc::SendError((_, reply))) = queue.send((write, reply)) {
                    reply(Err(StoreError::Closed));
                }
            }
            None => reply(Err(StoreError::Closed)),
        }
    }

    /// Blocks until the write is durable.
    pub(crate) fn write(&self, write: Write) -> Result<Written, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            write,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Waits (as a task: no thread is parked) until the write is durable.
    pub(crate) async fn write_async(&self, write: Write) -> Result<Written, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            write,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
}

impl Drop for Writer {
    /// Stops taking writes, lets the thread finish what is queued (with a last flush), joins it.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(
    trees: &Trees,
    appender: &mut BundleAppender,
    (data_path, data_file): (&Path, &std::fs::File),
    queue: &mpsc::Receiver<(Write, Reply)>,
    status: &Status,
) {
    // Ends when every sender is gone (the store is closing) and the queue is empty.
    while let Ok(first) = queue.recv() {
        let mut round = vec![first];
        while round.len() < MAX_ROUND {
            match queue.try_recv() {
                Ok(w) => round.push(w),
                Err(_) => break,
            }
        }
        let (writes, replies): (Vec<Write>, Vec<Reply>) = round.into_iter().unzip();
        // Bundles first, on disk before any sled write that points at them can be.
        let applied = bundle_places(trees, appender, &writes)
            .and_then(|at| Ok((apply(trees, &writes, &at)?, at)));
        let (applied, changes) = match applied {
            Ok(((outcomes, changes), _)) => (Ok(outcomes), changes),
            Err(e) => (Err(e), Vec::new()),
        };
        let started = Instant::now();
        let flushed = trees.db.flush().map_err(super::engine);
        let flush_time = started.elapsed();
        let durable = flushed.and_then(|_| {
            data_file.sync_data().map_err(|source| StoreError::Io {
                path: data_path.to_path_buf(),
                source,
            })
        });
        let sync_time = started.elapsed() - flush_time;
        {
            let mut s = lock(&status.stats);
            s.rounds += 1;
            if applied.is_ok() && durable.is_ok() {
                s.commits += writes.len() as u64;
            }
            s.flush_micros += flush_time.as_micros() as u64;
            s.sync_micros += sync_time.as_micros() as u64;
        }
        match (applied, durable) {
            (Ok(mut results), Ok(())) => {
                *lock(&status.failing) = None;
                let mut writes = writes;
                for (write, result) in writes.iter_mut().zip(&mut results) {
                    let Write::Accept {
                        key,
                        bundle,
                        revision,
                        ..
                    } = write
                    else {
                        continue;
                    };
                    match result {
                        Ok(Written::Accepted(Accepted::New)) => {
                            trees.fresh.put(key, *revision, std::mem::take(bundle));
                        }
                        // A revision: the caller amends what it mapped (it gave the Bundle away).
                        Ok(Written::Accepted(Accepted::Conflict(_, given))) => {
                            *given = std::mem::take(bundle);
                        }
                        _ => {}
                    }
                }
                // Only now can the outbox see the round's jobs: it delivers what is on disk,
                // and finds a new Bundle in `fresh` rather than reading the log. Before the
                // replies: whoever is answered (a replay, a sweep's `Expire`) sees the queue
                // as the round left it.
                trees.queue.apply(changes);
                for (reply, result) in replies.into_iter().zip(results) {
                    reply(result);
                }
            }
            // Whatever the round wrote stays in sled, unacknowledged: a caller that retries finds
            // it (a duplicate) and is answered after a round that does reach the disk.
            (Err(e), _) | (Ok(_), Err(e)) => {
                let why = e.to_string();
                tracing::error!(error = %why, writes = writes.len(), "store: a write round failed");
                *lock(&status.failing) = Some(why.clone());
                // What sled holds is what the queue follows, durable or not (a retry is answered
                // as a duplicate and must still be delivered).
                trees.queue.apply(changes);
                for reply in replies {
                    reply(Err(StoreError::Failed(why.clone())));
                }
            }
        }
    }
}

pub(super) type Outcomes = Vec<Result<Written, StoreError>>;

/// Appends the round's new and moved Bundles to the log; one place per write (`None` for other
/// writes, and for a submission already stored or earlier in the round: a re-send's Bundle is
/// not kept twice; a revision's always gets one, whether it is taken is the transaction's to
/// say). The transaction tells such duplicates apart again; only this thread writes, so what
/// it reads here is what the transaction will see.
fn bundle_places(
    trees: &Trees,
    appender: &mut BundleAppender,
    writes: &[Write],
) -> Result<Vec<Option<BundleAt>>, StoreError> {
    let mut seen = std::collections::HashSet::new();
    let mut appended = Vec::with_capacity(writes.len());
    for w in writes {
        appended.push(match w {
            Write::Accept {
                lz4,
                revises: Some(_),
                ..
            } => Some(lz4.as_slice()),
            Write::Accept { key, lz4, .. }
                if seen.insert(key.as_str())
                    && !trees
                        .submissions
                        .contains_key(key.as_bytes())
                        .map_err(super::engine)? =>
            {
                Some(lz4.as_slice())
            }
            Write::Move { lz4, .. } => Some(lz4.as_slice()),
            _ => None,
        });
    }
    let bundles: Vec<&[u8]> = appended.iter().flatten().copied().collect();
    let mut places = appender.append(&bundles)?.into_iter();
    Ok(appended
        .iter()
        .map(|b| b.and_then(|_| places.next()))
        .collect())
}

/// Applies a round in one transaction; what it did to the outbox goes to the queue once the
/// round is durable (`write_loop`). A write that cannot be applied (an unreadable record) gets
/// its own error; only a storage error fails the round.
fn apply(
    trees: &Trees,
    writes: &[Write],
    places: &[Option<BundleAt>],
) -> Result<(Outcomes, Vec<Change>), StoreError> {
    // Before the transaction: a replay in the same round may see either horizon — it commits
    // before the `Expire` is answered, so the sweep's scan sees it either way.
    for w in writes {
        match w {
            Write::Expire { below } => trees.bundles.expire_below(*below),
            Write::Audit { key, access } => {
                trees
                    .audit
                    .insert(key, access.as_slice())
                    .map_err(super::engine)?;
            }
            Write::Forget { keys } => {
                for key in keys {
                    trees.audit.remove(key).map_err(super::engine)?;
                }
            }
            Write::Cursor { name, value } => {
                trees
                    .cursors
                    .insert(name.as_bytes(), value.as_bytes())
                    .map_err(super::engine)?;
            }
            _ => {}
        }
    }
    super::transaction::transact(trees, writes, places)
}
