//! The store's one writer: every change goes through a single thread that takes whatever has
//! queued up, applies it in **one** sled transaction, makes it durable with **one** flush plus
//! fdatasync, and only then answers each caller. One thread means sled's global transaction
//! lock is never contended (under many threads its multi-tree transactions parked the runtime's
//! workers); one transaction and one flush per round means their cost is shared by everything
//! that arrived while the previous round was on its way to disk (group commit).
//!
//! sled's `flush` writes with `sync_file_range`, which is not an fsync, and `flush_async`
//! deadlocks under concurrency (sled #1308): the thread calls the blocking flush and then
//! fdatasyncs sled's data file. Callers encode their values before they queue (that work is
//! spread over their own threads); the writer only reads, decides and writes.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use super::bundles::{BundleAppender, BundleAt, BundleLog};
use super::queue::{Change, Queue};
use super::{
    decode, encode, split_stored, stored, Accepted, BundleRef, EhrResource, State, StoreError,
    SubmissionRecord, Transition,
};

/// How many writes one round takes at most (the rest wait for the next round).
const MAX_ROUND: usize = 512;

/// How many bytes of fresh Bundles are kept in memory at most; beyond that, deliveries read
/// them back from the Bundle log.
const FRESH_BUDGET: usize = 64 << 20;

/// One change, with its values already encoded by the caller.
pub(crate) enum Write {
    Accept {
        key: String,
        /// The encoded record.
        record: Vec<u8>,
        payload_sha256: String,
        /// The Bundle's JSON, handed to its first delivery from memory (`Fresh`).
        bundle: Vec<u8>,
        /// The Bundle as the log keeps it (LZ4).
        lz4: Vec<u8>,
        patient_key: String,
        /// A revision: of the submission whose payload (hash) this is, else refused (a
        /// `Conflict`: another revision came first). `None`: a new submission.
        revises: Option<String>,
    },
    Transition {
        key: String,
        transition: Transition,
        ehr: Vec<EhrResource>,
        /// Which Bundle the attempt whose outcome this is sent (`None`: not a delivery's).
        sent: Option<BundleRef>,
    },
    Requeue {
        key: String,
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
    Barrier,
}

pub(crate) type Reply = Box<dyn FnOnce(Result<Written, StoreError>) + Send>;

/// How the writer has gone so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Writes made durable.
    pub commits: u64,
    /// Rounds (one transaction, one flush, one fdatasync each).
    pub rounds: u64,
    /// Time spent in sled's flush and in fdatasync (µs).
    pub flush_micros: u64,
    pub sync_micros: u64,
}

pub(crate) struct Trees {
    pub db: sled::Db,
    pub submissions: sled::Tree,
    /// Where each submission's Bundle is in the Bundle log, for submissions accepted before
    /// that went into the record itself (read only).
    pub bundle_at: sled::Tree,
    pub bundles: BundleLog,
    /// Bundles accepted before the Bundle log existed; the retention sweep moves them into the
    /// log and empties it.
    pub legacy_bundles: sled::Tree,
    pub outbox: sled::Tree,
    /// What `outbox` holds, oldest first, kept by the writer (and its length: sled's `len`
    /// reads the whole tree).
    pub queue: Queue,
    pub by_resource: sled::Tree,
    pub by_patient: sled::Tree,
    /// Operators' accesses, oldest first (`audit_key`).
    pub audit: sled::Tree,
    /// The dead-lettered submissions (key → when, Unix µs, eight little-endian bytes): in by
    /// the dead letter, out by a replay.
    pub dead_letters: sled::Tree,
    pub fresh: Fresh,
}

/// Bundles accepted moments ago, by submission key, until their first delivery attempt takes
/// them: most deliveries follow their acceptance within milliseconds, and reading the Bundle
/// back from the log (a read and a decompression) was a tenth of the outbox's work. Only the
/// writer puts one in, once it is durable and before the outbox can see its entry; at most
/// `FRESH_BUDGET` bytes: past that the oldest go (a Bundle nobody took — no EHR configured, a
/// delivery that failed before taking it — must not keep the newer ones out).
pub(crate) struct Fresh {
    bundles: Mutex<FreshBundles>,
    budget: usize,
}

impl Default for Fresh {
    fn default() -> Self {
        Fresh::within(FRESH_BUDGET)
    }
}

#[derive(Default)]
struct FreshBundles {
    /// Each Bundle with its place in the log.
    by_key: std::collections::HashMap<String, (BundleAt, Vec<u8>)>,
    /// Keys in the order they were put; a key taken since is skipped when its turn comes.
    order: std::collections::VecDeque<String>,
    bytes: usize,
}

impl Fresh {
    fn within(budget: usize) -> Fresh {
        Fresh {
            bundles: Mutex::default(),
            budget,
        }
    }

    fn put(&self, key: &str, at: BundleAt, bundle: Vec<u8>) {
        let Ok(mut f) = self.bundles.lock() else {
            return;
        };
        if bundle.len() > self.budget {
            // Not kept; nor is an earlier revision's, which is no longer the one to send.
            if let Some((_, gone)) = f.by_key.remove(key) {
                f.bytes -= gone.len();
            }
            return;
        }
        while f.bytes + bundle.len() > self.budget {
            let Some(oldest) = f.order.pop_front() else {
                break;
            };
            if let Some((_, gone)) = f.by_key.remove(&oldest) {
                f.bytes -= gone.len();
            }
        }
        // Taken keys leave their place in `order` behind: drop those once they outnumber
        // the Bundles held, so the order stays within a constant of `by_key`.
        if f.order.len() > 2 * f.by_key.len() + 1024 {
            let FreshBundles { by_key, order, .. } = &mut *f;
            order.retain(|k| by_key.contains_key(k));
        }
        f.bytes += bundle.len();
        if let Some((_, old)) = f.by_key.insert(key.to_string(), (at, bundle)) {
            f.bytes -= old.len();
        } else {
            f.order.push_back(key.to_string());
        }
    }

    pub(crate) fn take(&self, key: &str) -> Option<(BundleAt, Vec<u8>)> {
        let mut f = self.bundles.lock().ok()?;
        let (at, bundle) = f.by_key.remove(key)?;
        f.bytes -= bundle.len();
        Some((at, bundle))
    }

    /// A copy of `key`'s Bundle, left in place.
    pub(crate) fn peek(&self, key: &str) -> Option<Vec<u8>> {
        let f = self.bundles.lock().ok()?;
        f.by_key.get(key).map(|(_, bundle)| bundle.clone())
    }
}

pub(crate) struct Writer {
    /// `None` only while dropping: the thread ends once the queue is closed and drained.
    queue: Option<mpsc::Sender<(Write, Reply)>>,
    stats: Arc<Mutex<CommitStats>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn start(
        trees: Arc<Trees>,
        mut appender: BundleAppender,
        dir: &Path,
    ) -> Result<Writer, StoreError> {
        let (tx, rx) = mpsc::channel::<(Write, Reply)>();
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        // sled's data file, opened once: every round ends with its fdatasync.
        let path = dir.join("db");
        let data_file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                write_loop(
                    &trees,
                    &mut appender,
                    (&path, &data_file),
                    &rx,
                    &thread_stats,
                )
            })
            .map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Writer {
            queue: Some(tx),
            stats,
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

    pub(crate) fn stats(&self) -> CommitStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
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
    stats: &Mutex<CommitStats>,
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
        let (applied, changes, places) = match applied {
            Ok(((outcomes, changes), places)) => (Ok(outcomes), changes, places),
            Err(e) => (Err(e), Vec::new(), Vec::new()),
        };
        let started = Instant::now();
        let flushed = trees.db.flush().map_err(StoreError::from);
        let flush_time = started.elapsed();
        let durable = flushed.and_then(|_| {
            data_file.sync_data().map_err(|source| StoreError::Io {
                path: data_path.to_path_buf(),
                source,
            })
        });
        let sync_time = started.elapsed() - flush_time;
        if let Ok(mut s) = stats.lock() {
            s.rounds += 1;
            if applied.is_ok() && durable.is_ok() {
                s.commits += writes.len() as u64;
            }
            s.flush_micros += flush_time.as_micros() as u64;
            s.sync_micros += sync_time.as_micros() as u64;
        }
        match (applied, durable) {
            (Ok(mut results), Ok(())) => {
                let mut writes = writes;
                for ((write, result), at) in writes.iter_mut().zip(&mut results).zip(&places) {
                    let Write::Accept { key, bundle, .. } = write else {
                        continue;
                    };
                    match (result, at) {
                        (Ok(Written::Accepted(Accepted::New)), Some(at)) => {
                            trees.fresh.put(key, *at, std::mem::take(bundle));
                        }
                        // A revision: the caller amends what it mapped (it gave the Bundle away).
                        (Ok(Written::Accepted(Accepted::Conflict(_, given))), _) => {
                            *given = std::mem::take(bundle);
                        }
                        _ => {}
                    }
                }
                // Only now can the outbox see the round's entries: it delivers what is on disk,
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
/// it reads here is what the transaction will see. A replay's place is where a record of the
/// earliest versions has its Bundle (`bundle_at`; read here: not in the transaction).
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
                    && !trees.submissions.contains_key(key.as_bytes())? =>
            {
                Some(lz4.as_slice())
            }
            Write::Move { lz4, .. } => Some(lz4.as_slice()),
            _ => None,
        });
    }
    let bundles: Vec<&[u8]> = appended.iter().flatten().copied().collect();
    let mut places = appender.append(&bundles)?.into_iter();
    let mut at = Vec::with_capacity(writes.len());
    for (w, b) in writes.iter().zip(&appended) {
        at.push(match w {
            // A replay of a record of the earliest versions, whose place is in `bundle_at`:
            // read here, outside the transaction (a plain read in one deadlocks sled; the tree
            // is never written any more).
            Write::Requeue { key, .. } => trees
                .bundle_at
                .get(key.as_bytes())?
                .and_then(|at| BundleAt::from_bytes(&at)),
            _ => b.and_then(|_| places.next()),
        });
    }
    Ok(at)
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
                trees.audit.insert(key, access.as_slice())?;
            }
            Write::Forget { keys } => {
                for key in keys {
                    trees.audit.remove(key)?;
                }
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
        &trees.by_resource,
        &trees.by_patient,
        &trees.dead_letters,
    )
        .transaction(|(subs, outbox, resources, patients, dead_letters)| {
            let t = Tx {
                subs,
                outbox,
                resources,
                patients,
                dead_letters,
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
        });
    outcome.map_err(|e| match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

struct Tx<'a> {
    subs: &'a TransactionalTree,
    outbox: &'a TransactionalTree,
    resources: &'a TransactionalTree,
    patients: &'a TransactionalTree,
    dead_letters: &'a TransactionalTree,
    /// For what is read outside the transaction: the Bundle log, legacy Bundle places.
    trees: &'a Trees,
    /// The round's time (Unix µs): when what it puts in the outbox entered it.
    now: i64,
    /// What this run of the transaction did to the outbox.
    changes: std::cell::RefCell<Vec<Change>>,
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// What a change does to a submission's outbox entry.
enum Outbox {
    Leave,
    /// Enters (again) with no failures counted.
    Enter,
    Stay,
    /// Stays, with one more failure counted.
    Failed,
}

/// An outbox entry's value: its failures (four little-endian bytes), then when it entered the
/// outbox (Unix microseconds, eight little-endian bytes), so that opening the store orders the
/// waiting deliveries without reading their records. Earlier versions wrote the failures
/// alone, or nothing.
pub(super) fn failures(value: &[u8]) -> u32 {
    value
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes)
}

/// When an outbox entry entered it (Unix µs), if its value says.
pub(super) fn entered(value: &[u8]) -> Option<i64> {
    value
        .get(4..12)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_le_bytes)
}

fn outbox_entry(failures: u32, entered: i64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&failures.to_le_bytes());
    v[4..].copy_from_slice(&entered.to_le_bytes());
    v
}

impl Tx<'_> {
    fn change(&self, change: Change) {
        self.changes.borrow_mut().push(change);
    }

    fn apply(&self, write: &Write, at: Option<BundleAt>) -> TxResult<Result<Written, StoreError>> {
        Ok(match write {
            Write::Accept {
                key,
                record,
                payload_sha256,
                patient_key,
                revises,
                ..
            } => {
                let existing = match revises {
                    // A revision needs its submission; a new one a place (`bundle_places`
                    // looked: none means stored before, or earlier in this round —
                    // transactions see their own writes).
                    Some(_) => self.subs.get(key.as_bytes())?,
                    None if at.is_none() => self.subs.get(key.as_bytes())?,
                    None => None,
                };
                if let Some(existing) = existing {
                    let existing = match decode(key, &existing) {
                        Ok(existing) => Box::new(existing),
                        Err(e) => return Ok(Err(e)),
                    };
                    if existing.has_payload(payload_sha256) {
                        return Ok(Ok(Written::Accepted(Accepted::Duplicate(existing))));
                    }
                    if revises.as_ref() != Some(&existing.payload_sha256) {
                        return Ok(Ok(Written::Accepted(Accepted::Conflict(
                            existing,
                            Vec::new(),
                        ))));
                    }
                    // The revision takes the submission's place, and its outbox entry: the
                    // earlier one's delivery, waiting or dead-lettered, sends this one now.
                    // Its patient too, if the revision names another.
                    self.dead_letters.remove(key.as_bytes())?;
                    let before = super::patient_key(&existing);
                    if before != *patient_key {
                        self.patients.remove(before.as_bytes())?;
                    }
                }
                let Some(at) = at else {
                    return Ok(Err(StoreError::Failed("no place for the Bundle".into())));
                };
                self.subs.insert(key.as_bytes(), stored(Some(at), record))?;
                let entered = self
                    .outbox
                    .insert(key.as_bytes(), &outbox_entry(0, self.now))?;
                self.change(match entered {
                    None => Change::Enter(key.clone()),
                    Some(_) => Change::Failed(key.clone(), 0),
                });
                self.patients.insert(patient_key.as_bytes(), &[])?;
                Ok(Written::Accepted(Accepted::New))
            }
            Write::Transition {
                key,
                transition,
                ehr,
                sent,
            } => {
                let written = self.update(key, |record, current| {
                    record.transitions.push(transition.clone());
                    record.stored_in_ehr(ehr);
                    let done = matches!(
                        transition.state,
                        State::Delivered | State::DeadLettered | State::Acknowledged
                    );
                    // A revision (or the retention sweep, moving a waiting Bundle) writes the
                    // Bundle's new place into the record: with no place there, none came.
                    let moved =
                        |BundleRef(sent): BundleRef| current.is_some_and(|c| sent != Some(c));
                    if done && sent.is_some_and(moved) {
                        // The attempt sent a Bundle no longer the submission's: this one waits.
                        record.transitions.push(Transition {
                            state: State::Mapped,
                            at: transition.at.clone(),
                            detail: Some(format!(
                                "revision {} waits: that attempt sent a Bundle replaced \
                                 meanwhile (by a revision, or moved by the retention sweep)",
                                record.revision()
                            )),
                        });
                        return Outbox::Stay;
                    }
                    match transition.state {
                        _ if done => Outbox::Leave,
                        State::Failed => Outbox::Failed,
                        _ => Outbox::Stay,
                    }
                })?;
                if let Ok(Written::Record(Some(record))) = &written {
                    if record.state() == Some(State::DeadLettered) {
                        self.dead_letters
                            .insert(key.as_bytes(), &self.now.to_le_bytes())?;
                    }
                }
                written
            }
            Write::Requeue { key, .. } if self.expired(key, at)? => Ok(Written::Expired),
            Write::Requeue { key, at } => {
                self.dead_letters.remove(key.as_bytes())?;
                self.update(key, |record, _| {
                    record.transitions.push(Transition {
                        state: State::Mapped,
                        at: at.clone(),
                        detail: Some("replay requested".into()),
                    });
                    Outbox::Enter
                })?
            }
            Write::Move { key, .. } => {
                let Some(at) = at else {
                    return Ok(Err(StoreError::Failed("no place for the Bundle".into())));
                };
                // The record keeps its encoding; only its Bundle's place changes (a record of
                // the earliest form gains one, as new records have).
                if let Some(value) = self.subs.get(key.as_bytes())? {
                    self.subs
                        .insert(key.as_bytes(), stored(Some(at), split_stored(&value).1))?;
                }
                Ok(Written::Moved)
            }
            Write::Expire { .. } | Write::Audit { .. } | Write::Forget { .. } | Write::Barrier => {
                Ok(Written::Barrier)
            }
        })
    }

    /// Whether `key`'s Bundle is no longer kept for a replay (`super::replay_expired`): its
    /// place is in the record, or (a record of the earliest versions) `legacy`.
    fn expired(&self, key: &str, legacy: Option<BundleAt>) -> TxResult<bool> {
        let Some(stored) = self.subs.get(key.as_bytes())? else {
            return Ok(false);
        };
        let at = split_stored(&stored).0.or(legacy);
        Ok(super::replay_expired(self.trees, at, key, &stored))
    }

    /// Read-modify-write of one record; `change` (given the place of the submission's
    /// current Bundle) says what becomes of its outbox entry. New EHR resources are indexed.
    fn update(
        &self,
        key: &str,
        change: impl FnOnce(&mut SubmissionRecord, Option<BundleAt>) -> Outbox,
    ) -> TxResult<Result<Written, StoreError>> {
        let Some(bytes) = self.subs.get(key.as_bytes())? else {
            // An outbox entry without its record (a damaged store) has nothing to deliver.
            if self.outbox.remove(key.as_bytes())?.is_some() {
                self.change(Change::Leave(key.to_string()));
            }
            return Ok(Ok(Written::Record(None)));
        };
        let mut record = match decode(key, &bytes) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let known = record.ehr.len();
        // The place in the record itself (a plain read of another tree, as `bundle_at` would
        // be for records of the earliest versions, deadlocks in a sled transaction).
        let outbox = change(&mut record, split_stored(&bytes).0);
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
            .insert(key.as_bytes(), stored(split_stored(&bytes).0, &encoded))?;
        match outbox {
            Outbox::Leave if self.outbox.remove(key.as_bytes())?.is_some() => {
                self.change(Change::Leave(key.to_string()))
            }
            // A replay starts the count of failures again, waiting already or not.
            Outbox::Enter => self.change(
                match self
                    .outbox
                    .insert(key.as_bytes(), &outbox_entry(0, self.now))?
                {
                    None => Change::Enter(key.to_string()),
                    Some(_) => Change::Failed(key.to_string(), 0),
                },
            ),
            // Counted only while it waits: a failure recorded after it left changes nothing.
            Outbox::Failed => {
                if let Some(value) = self.outbox.get(key.as_bytes())? {
                    let n = failures(&value).saturating_add(1);
                    // An entry of an earlier version gains this round's time (its order at the
                    // next open is its record's otherwise).
                    let since = entered(&value).unwrap_or(self.now);
                    self.outbox
                        .insert(key.as_bytes(), &outbox_entry(n, since))?;
                    self.change(Change::Failed(key.to_string(), n));
                }
            }
            _ => {}
        }
        Ok(Ok(Written::Record(Some(Box::new(record)))))
    }
}

#[cfg(test)]
mod tests {
    use super::{BundleAt, Fresh};

    const AT: BundleAt = BundleAt { offset: 0, len: 0 };

    fn take(fresh: &Fresh, key: &str) -> Option<Vec<u8>> {
        fresh.take(key).map(|(_, bundle)| bundle)
    }

    #[test]
    fn fresh_bundles_nobody_took_make_room_for_new_ones() {
        let fresh = Fresh::within(10);
        fresh.put("never-taken", AT, vec![0; 4]);
        fresh.put("taken", AT, vec![1; 4]);
        assert_eq!(take(&fresh, "taken"), Some(vec![1; 4]));
        fresh.put("a", AT, vec![2; 4]);
        // Full (8 of 10 bytes): the oldest goes, not the newest.
        fresh.put("b", AT, vec![3; 4]);
        assert_eq!(take(&fresh, "never-taken"), None);
        assert_eq!(take(&fresh, "b"), Some(vec![3; 4]));
        assert_eq!(take(&fresh, "a"), Some(vec![2; 4]));
        // Larger than the whole budget: not kept, and nothing else is dropped for it.
        fresh.put("c", AT, vec![4; 4]);
        fresh.put("huge", AT, vec![5; 11]);
        assert_eq!(take(&fresh, "huge"), None);
        assert_eq!(take(&fresh, "c"), Some(vec![4; 4]));
    }

    #[test]
    fn fresh_forgets_the_places_of_taken_bundles() {
        let fresh = Fresh::within(1 << 20);
        for i in 0..10_000 {
            let key = i.to_string();
            fresh.put(&key, AT, vec![0; 8]);
            assert!(take(&fresh, &key).is_some());
        }
        let f = fresh.bundles.lock().unwrap();
        assert!(f.order.len() <= 2 * f.by_key.len() + 1024 + 1);
        assert_eq!(f.bytes, 0);
    }
}
