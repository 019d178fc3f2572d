//! One write round as one sled transaction: what each queued write does to the records, the
//! outbox, the events, the indexes and the inbound marks (`Tx`), as `store::rules` decides it.
//! sled may run the closure more than once (a conflict): everything here is rebuilt on each
//! run, and what it did to the outbox (`Change`s) is handed to the queue only once the round
//! is durable (`writer::write_loop`).

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use super::bundles::BundleAt;
use super::keys::{
    decode, decode_event, encode, encode_event, entered, failures, job_key, outbox_entry, seen_key,
    split_stored, stored, unmatched_key,
};
use super::queue::Change;
use super::writer::{Outcomes, Trees, Write, Written};
use crate::store::model::{
    Accepted, Consequences, EhrResource, Event, EventOutcome, Inbound, JobId, Receiver, State,
    StoreError, SubmissionRecord, Taken, Transition, Unmatched,
};
use crate::store::rules::{self, AcceptDecision, Fate};

/// The round's transaction: what each write did, and what it did to the outbox.
pub(super) fn transact(
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
