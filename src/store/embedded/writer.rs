//! The store's one writer: every change goes through a single thread that takes whatever has
//! queued up, applies it in **one** sled transaction, makes it durable with **one** flush plus
//! fdatasync, and only then answers each caller. One thread means sled's global transaction
//! lock is never contended; one transaction and one flush per round means their cost is shared
//! by everything that arrived while the previous round was on its way to disk (group commit).
//!
//! sled's `flush` writes with `sync_file_range`, which is not an fsync, and `flush_async`
//! deadlocks under concurrency (sled #1308): the thread calls the blocking flush and then
//! fdatasyncs sled's data file. Callers encode their values before they queue (that work is
//! spread over their own threads); the writer reads, asks `store::rules` what to do, and writes.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use super::bundles::{BundleAppender, BundleAt, BundleLog};
use super::fresh::Fresh;
use super::keys::{
    decode, decode_event, encode, encode_event, entered, failures, job_key, outbox_entry, seen_key,
    split_stored, stored, unmatched_key,
};
use super::queue::{Change, Queue};
use crate::store::model::{
    Accepted, CommitStats, Consequences, EhrResource, Event, EventOutcome, Health, Inbound, JobId,
    Receiver, State, StoreError, SubmissionRecord, Taken, Transition, Unmatched,
};
use crate::store::rules::{self, AcceptDecision, Fate};

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

type Outcomes = Vec<Result<Written, StoreError>>;

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
    transact(trees, writes, places)
}

/// The round's transaction: what each write did, and what it did to the outbox.
fn transact(
    trees: &Trees,
    writes: &[Write],
    places: &[Option<BundleAt>],
) -> Result<(Outcomes, Vec<Change>), StoreError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let outcome = (
        &trees.submissions,
        &trees.outbox,
        &trees.events,
        &trees.by_resource,
        &trees.by_patient,
        &trees.dead_letters,
        &trees.inbound,
    )
        .transaction(
            |(subs, outbox, events, resources, patients, dead_letters, inbound)| {
                let t = Tx {
                    subs,
                    outbox,
                    events,
                    resources,
                    patients,
                    dead_letters,
                    inbound,
                    trees,
                    now,
                    changes: std::cell::RefCell::new(Vec::new()),
                };
                // Re-run from the start if sled retries the closure: outcomes are rebuilt.
                let mut out = Vec::with_capacity(writes.len());
                for (w, at) in writes.iter().zip(places) {
                    out.push(t.apply(w, *at)?);
                }
                Ok((out, t.changes.take()))
            },
        );
    outcome.map_err(|e| match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => super::engine(e),
    })
}

struct Tx<'a> {
    subs: &'a TransactionalTree,
    outbox: &'a TransactionalTree,
    events: &'a TransactionalTree,
    resources: &'a TransactionalTree,
    patients: &'a TransactionalTree,
    dead_letters: &'a TransactionalTree,
    inbound: &'a TransactionalTree,
    /// For what is read outside the transaction: the Bundle log.
    trees: &'a Trees,
    /// The round's time (Unix µs): when what it puts in the outbox entered it.
    now: i64,
    /// What this run of the transaction did to the outbox.
    changes: std::cell::RefCell<Vec<Change>>,
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn failed(why: &str) -> StoreError {
    StoreError::Failed(why.to_string())
}

impl Tx<'_> {
    fn change(&self, change: Change) {
        self.changes.borrow_mut().push(change);
    }

    fn apply(&self, write: &Write, at: Option<BundleAt>) -> TxResult<Result<Written, StoreError>> {
        match write {
            Write::Accept {
                key,
                record,
                payload_sha256,
                revision,
                patient,
                revises,
                events,
                ..
            } => self.accept(
                key,
                record,
                payload_sha256,
                *revision,
                patient,
                revises,
                events,
                at,
            ),
            Write::Delivery {
                key,
                transition,
                ehr,
                sent,
                consequences,
            } => self.delivery(key, transition, ehr, *sent, consequences),
            Write::Settle {
                job,
                failures,
                outcome,
            } => self.settle(job, *failures, outcome),
            Write::Requeue { job, at } => self.requeue(job, at),
            Write::Move { key, .. } => {
                let Some(at) = at else {
                    return Ok(Err(failed("no place for the Bundle")));
                };
                // The record keeps its encoding; only its Bundle's place changes.
                if let Some(value) = self.subs.get(key.as_bytes())? {
                    match split_stored(key, &value) {
                        Ok((_, revision, record)) => {
                            self.subs
                                .insert(key.as_bytes(), stored(at, revision, record))?;
                        }
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(Ok(Written::Moved))
            }
            Write::Inbound {
                seen,
                inbound,
                key,
                at,
            } => self.inbound(seen, inbound, key, at),
            Write::Expire { .. }
            | Write::Audit { .. }
            | Write::Forget { .. }
            | Write::Cursor { .. }
            | Write::Barrier => Ok(Ok(Written::Barrier)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &self,
        key: &str,
        record: &[u8],
        payload_sha256: &str,
        revision: u32,
        patient: &str,
        revises: &Option<String>,
        events: &[Event],
        at: Option<BundleAt>,
    ) -> TxResult<Result<Written, StoreError>> {
        // A revision needs its submission; a new one a place (`bundle_places` looked: none
        // means stored before, or earlier in this round — transactions see their own writes).
        let existing = match (revises, at) {
            (Some(_), _) | (None, None) => self.subs.get(key.as_bytes())?,
            (None, Some(_)) => None,
        };
        let existing = match existing.map(|e| decode(key, &e)).transpose() {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
        match rules::accept(existing.as_ref(), payload_sha256, revises.as_deref()) {
            AcceptDecision::Duplicate => {
                return Ok(Ok(Written::Accepted(Accepted::Duplicate(Box::new(
                    existing
                        .ok_or_else(|| ConflictableTransactionError::Abort(failed("no record")))?,
                )))))
            }
            AcceptDecision::Conflict => {
                return Ok(Ok(Written::Accepted(Accepted::Conflict(
                    Box::new(
                        existing.ok_or_else(|| {
                            ConflictableTransactionError::Abort(failed("no record"))
                        })?,
                    ),
                    Vec::new(),
                ))))
            }
            AcceptDecision::Revision => {
                // The revision takes the submission's place, and its outbox job: the earlier
                // one's delivery, waiting or dead-lettered, sends this one now. Its patient
                // too, if the revision names another.
                self.dead_letters
                    .remove(job_key(&JobId::ehr(key)).as_slice())?;
                if let Some(before) = existing {
                    if before.patient() != patient {
                        self.patients
                            .remove(patient_entry(&before.patient(), key).as_slice())?;
                    }
                }
            }
            AcceptDecision::New => {}
        }
        let Some(at) = at else {
            return Ok(Err(failed("no place for the Bundle")));
        };
        self.subs
            .insert(key.as_bytes(), stored(at, revision, record))?;
        self.enter(&JobId::ehr(key), 0)?;
        self.patients
            .insert(patient_entry(patient, key).as_slice(), &[])?;
        self.queue_events(key, events)?;
        Ok(Ok(Written::Accepted(Accepted::New)))
    }

    /// Puts `job` in the outbox with `failures` counted (a job there already stays at its
    /// place, its failures set).
    fn enter(&self, job: &JobId, failures: u32) -> TxResult<()> {
        let before = self
            .outbox
            .insert(job_key(job), &outbox_entry(failures, self.now))?;
        self.change(match before {
            None => Change::Enter(job.clone()),
            Some(_) => Change::Failed(job.clone(), failures),
        });
        Ok(())
    }

    /// Queues events of submission `key`, each a job of its receiver numbered after every
    /// earlier one.
    fn queue_events(&self, key: &str, events: &[Event]) -> TxResult<()> {
        for event in events {
            // Above every job's number there is (`Trees::next_seq`): a submission's events keep
            // their order. A number taken by a run of the transaction that is run again is
            // never used (gaps do not matter). sled's own `generate_id` would deadlock here.
            let seq = self
                .trees
                .next_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let job = JobId {
                receiver: event.receiver.clone(),
                key: key.to_string(),
                seq,
            };
            self.events.insert(job_key(&job), encode_event(event))?;
            self.enter(&job, 0)?;
        }
        Ok(())
    }

    fn delivery(
        &self,
        key: &str,
        transition: &Transition,
        ehr: &[EhrResource],
        sent: Option<u32>,
        consequences: &Consequences,
    ) -> TxResult<Result<Written, StoreError>> {
        let job = JobId::ehr(key);
        let mut stands = false;
        let mut events = Vec::new();
        let written = self.update(key, |record| {
            let (fate, outcome_stands) =
                rules::delivery_outcome(record, transition.clone(), ehr, sent);
            stands = outcome_stands;
            if stands {
                events = consequences(record, transition);
                rules::queued(record, &events, &transition.at);
            }
            fate
        })?;
        if let Ok(Written::Record(Some(record))) = &written {
            if stands {
                self.queue_events(key, &events)?;
            }
            if stands && record.state() == Some(State::DeadLettered) {
                self.dead_letters
                    .insert(job_key(&job), &self.now.to_le_bytes())?;
            }
        }
        Ok(written)
    }

    fn settle(
        &self,
        job: &JobId,
        failures: u32,
        outcome: &EventOutcome,
    ) -> TxResult<Result<Written, StoreError>> {
        let k = job_key(job);
        let Some(event) = self
            .events
            .get(k.as_slice())?
            .and_then(|e| decode_event(&job.receiver, &e))
        else {
            // Settled before (or its record is gone): nothing waits for it any more.
            if self.outbox.remove(k.as_slice())?.is_some() {
                self.change(Change::Leave(job.clone()));
            }
            return Ok(Ok(Written::Record(None)));
        };
        let mut fate = Fate::Stay;
        let written = self.record_only(&job.key, |record| {
            fate = rules::event_outcome(record, &event.id, failures, outcome);
        })?;
        self.settle_job(job, fate, outcome)?;
        Ok(written)
    }

    /// What an event job's fate does to the outbox, its event and the dead letters.
    fn settle_job(&self, job: &JobId, fate: Fate, outcome: &EventOutcome) -> TxResult<()> {
        let k = job_key(job);
        match fate {
            Fate::Leave => {
                if self.outbox.remove(k.as_slice())?.is_some() {
                    self.change(Change::Leave(job.clone()));
                }
                if let EventOutcome::DeadLettered { .. } = outcome {
                    // Kept, for a replay.
                    self.dead_letters
                        .insert(k.as_slice(), &self.now.to_le_bytes())?;
                } else {
                    self.events.remove(k.as_slice())?;
                }
            }
            Fate::Failed => self.count_failure(job)?,
            Fate::Enter | Fate::Stay => {}
        }
        Ok(())
    }

    /// Takes an inbound event once: marks `seen`, and queues its events or keeps it unmatched.
    fn inbound(
        &self,
        seen: &str,
        inbound: &Inbound,
        key: &[u8; 16],
        at: &str,
    ) -> TxResult<Result<Written, StoreError>> {
        let mark = seen_key(seen);
        if self.inbound.get(mark.as_slice())?.is_some() {
            return Ok(Ok(Written::Taken(Taken::Duplicate)));
        }
        self.inbound
            .insert(mark.as_slice(), &self.now.to_le_bytes())?;
        let keep = |u: &Unmatched| -> TxResult<Result<(), StoreError>> {
            match serde_json::to_vec(u) {
                Ok(json) => {
                    self.inbound.insert(unmatched_key(key).as_slice(), json)?;
                    Ok(Ok(()))
                }
                Err(source) => Ok(Err(StoreError::Corrupt {
                    key: "unmatched".into(),
                    source,
                })),
            }
        };
        let taken = match inbound {
            Inbound::Nothing => Taken::Seen,
            Inbound::Unmatched(u) => {
                if let Err(e) = keep(u)? {
                    return Ok(Err(e));
                }
                Taken::Unmatched
            }
            Inbound::Events {
                key: submission,
                decide,
                sender,
                resource,
            } => {
                let mut events = Vec::new();
                let written = self.record_only(submission, |record| {
                    events = decide(record);
                    rules::queued(record, &events, at);
                })?;
                match written {
                    Ok(Written::Record(Some(_))) => {
                        self.queue_events(submission, &events)?;
                        Taken::Queued(events.len())
                    }
                    Ok(_) => {
                        let gone = Unmatched {
                            at: at.to_string(),
                            sender: sender.clone(),
                            resource: resource.clone(),
                            why: "its submission is no longer in the store".into(),
                        };
                        if let Err(e) = keep(&gone)? {
                            return Ok(Err(e));
                        }
                        Taken::Gone
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
        };
        Ok(Ok(Written::Taken(taken)))
    }

    fn requeue(&self, job: &JobId, at: &str) -> TxResult<Result<Written, StoreError>> {
        let k = job_key(job);
        match job.receiver {
            Receiver::Ehr => {
                if self.expired(&job.key)? {
                    return Ok(Ok(Written::Expired));
                }
                self.dead_letters.remove(k.as_slice())?;
                self.update(&job.key, |record| rules::requeue(record, at))
            }
            Receiver::Webhook(_) => {
                let Some(event) = self
                    .events
                    .get(k.as_slice())?
                    .and_then(|e| decode_event(&job.receiver, &e))
                else {
                    return Ok(Ok(Written::Record(None)));
                };
                self.dead_letters.remove(k.as_slice())?;
                let written = self.record_only(&job.key, |record| {
                    rules::event_requeue(record, &event.id, at);
                })?;
                self.enter(job, 0)?;
                Ok(written)
            }
        }
    }

    /// Whether `key`'s Bundle is no longer kept for a replay: it was delivered and its Bundle
    /// in the log is gone or expiring. A sweep moves the Bundles of the others before it drops
    /// their segment.
    fn expired(&self, key: &str) -> TxResult<bool> {
        let Some(value) = self.subs.get(key.as_bytes())? else {
            return Ok(false);
        };
        Ok(super::replay_expired(self.trees, key, &value))
    }

    /// Counts one more failure of a waiting job (counted only while it waits: a failure
    /// recorded after it left changes nothing).
    fn count_failure(&self, job: &JobId) -> TxResult<()> {
        let k = job_key(job);
        if let Some(value) = self.outbox.get(k.as_slice())? {
            let n = failures(&value).saturating_add(1);
            self.outbox
                .insert(k.as_slice(), &outbox_entry(n, entered(&value)))?;
            self.change(Change::Failed(job.clone(), n));
        }
        Ok(())
    }

    /// Read-modify-write of one record, its EHR job's fate as `change` says. New EHR
    /// resources are indexed.
    fn update(
        &self,
        key: &str,
        change: impl FnOnce(&mut SubmissionRecord) -> Fate,
    ) -> TxResult<Result<Written, StoreError>> {
        let job = JobId::ehr(key);
        let mut fate = Fate::Stay;
        let written = self.record_only(key, |record| fate = change(record))?;
        if let Ok(Written::Record(None)) = &written {
            // An outbox job without its record (a damaged store) has nothing to deliver.
            if self.outbox.remove(job_key(&job))?.is_some() {
                self.change(Change::Leave(job));
            }
            return Ok(written);
        }
        match fate {
            Fate::Leave => {
                if self.outbox.remove(job_key(&job))?.is_some() {
                    self.change(Change::Leave(job));
                }
            }
            // A replay starts the count of failures again, waiting already or not.
            Fate::Enter => self.enter(&job, 0)?,
            Fate::Failed => self.count_failure(&job)?,
            Fate::Stay => {}
        }
        Ok(written)
    }

    /// Read-modify-write of one record alone (indexing the EHR resources it gains).
    fn record_only(
        &self,
        key: &str,
        change: impl FnOnce(&mut SubmissionRecord),
    ) -> TxResult<Result<Written, StoreError>> {
        let Some(bytes) = self.subs.get(key.as_bytes())? else {
            return Ok(Ok(Written::Record(None)));
        };
        let (at, revision) = match split_stored(key, &bytes) {
            Ok((at, revision, _)) => (at, revision),
            Err(e) => return Ok(Err(e)),
        };
        let mut record = match decode(key, &bytes) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let known = record.ehr.len();
        change(&mut record);
        let encoded = match encode(&record) {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        for r in &record.ehr[known..] {
            self.resources.insert(
                format!("{}/{}", r.resource_type, r.id).as_bytes(),
                key.as_bytes(),
            )?;
        }
        self.subs
            .insert(key.as_bytes(), stored(at, revision, &encoded))?;
        Ok(Ok(Written::Record(Some(Box::new(record)))))
    }
}

/// A submission's entry in the patient index: the patient (`<system>|<value>`), a NUL, its key.
pub(crate) fn patient_entry(patient: &str, key: &str) -> Vec<u8> {
    format!("{patient}\0{key}").into_bytes()
}
