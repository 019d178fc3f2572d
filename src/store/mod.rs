//! The provenance store: every accepted submission, its state transitions, what the EHR
//! answered, the outbox of deliveries still to make (to the EHR and to webhook receivers), the
//! indexes both ways (submission ↔ EHR resource ↔ patient), and the operators' audit trail.
//!
//! `Store` is the contract the rest of the gateway relies on; `SledStore` (embedded, the
//! zero-configuration default) is its first implementation, and a second engine must pass the
//! same suite (`tests/store.rs`, one function given a store). The contract's promises:
//!
//! - **Durable before an answer.** Every write method returns (or its future resolves) only once
//!   what it wrote survives a crash and a power loss.
//! - **Atomic.** A submission, its Bundle, its EHR outbox job, the events queued with it and its
//!   patient index entry are written together or not at all; so are an outcome, the record's
//!   transition, the job's fate, the events the outcome causes and the dead-letter index. An
//!   event is never queued "after" the change that causes it (a transactional outbox).
//! - **Decided by the rules.** Whether a submission is new, a duplicate, a revision or a
//!   conflict, and what an outcome does to a record and its job, is `rules` — pure functions,
//!   the same for every engine.
//! - **Ordered.** `waiting` gives the oldest jobs first, and a receiver's jobs about one
//!   submission one at a time, in the order they were queued; the EHR has one job per
//!   submission, which a revision replaces. The order survives a restart.
//! - **Exactly one job.** A job stays waiting until its outcome is recorded: a crash between an
//!   attempt and its outcome delivers it again (receivers de-duplicate: conditional requests,
//!   stable event ids), never loses it.
//! - **Engine-neutral.** Nothing of an engine shows: keys are submission keys and `JobId`s,
//!   cursors are opaque text, errors are `StoreError`.

mod embedded;
mod model;
pub mod rules;

use std::future::Future;
use std::time::{Duration, SystemTime};

pub use embedded::{SledStore, StoreOptions};
pub use model::{
    key, mapping_of, no_consequences, Accepted, Access, AuditCursor, AuditPage, AuditWindow,
    CommitStats, Consequences, Cursor, Decide, EhrResource, Event, EventOutcome, EventState,
    Health, Inbound, JobId, Pending, Receiver, RecordPage, Requeued, SentEvent, State, StoreError,
    SubmissionRecord, Swept, Taken, Transition, Unmatched,
};

/// The store the gateway runs on: one engine, chosen when it is built (static dispatch: the
/// hot path pays for no indirection).
pub type Backend = SledStore;

/// What the gateway asks of its store. Methods whose callers are async return futures (the
/// caller's task waits, no thread is parked); reads and the rare maintenance calls are plain.
pub trait Store: Send + Sync + 'static {
    // Submissions.

    /// Stores a new submission — its record, its Bundle (JSON), its EHR outbox job, `events`
    /// and its patient index entry — unless that submission is there already: `New` once on
    /// disk; `Duplicate` (nothing written) when one of its revisions had this payload;
    /// `Conflict` when its id came with another payload (a revision: `revise`).
    fn accept<'s>(
        &'s self,
        record: &SubmissionRecord,
        bundle: Vec<u8>,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Accepted, StoreError>> + Send + use<'s, Self>;

    /// Stores `record` as the next revision of its submission — its Bundle in place of the
    /// earlier one's, in the outbox (waiting, dead-lettered or delivered) — if the current
    /// payload is still `revises`: `New` once on disk; `Duplicate` if some revision already had
    /// this payload; `Conflict` if another revision came first (amend that one instead).
    fn revise<'s>(
        &'s self,
        record: &SubmissionRecord,
        bundle: Vec<u8>,
        revises: &str,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Accepted, StoreError>> + Send + use<'s, Self>;

    fn get(&self, key: &str) -> Result<Option<SubmissionRecord>, StoreError>;

    /// A submission's current Bundle (what its next revision amends), left where it is.
    fn current_bundle(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The submission that produced an EHR resource (`Observation/123`).
    fn by_resource(&self, reference: &str) -> Result<Option<SubmissionRecord>, StoreError>;

    /// Keys of a patient's submissions, by the identifier their mapping recorded.
    fn by_patient(&self, system: &str, value: &str) -> Result<Vec<String>, StoreError>;

    // The outbox.

    /// Up to `limit` jobs that can start, oldest first: each the oldest waiting job of its
    /// receiver and submission, and accepted by `want` (not in flight, not backing off).
    fn waiting(&self, limit: usize, want: &mut dyn FnMut(&JobId) -> bool) -> Vec<Pending>;

    /// The Bundle an EHR delivery of `key` sends, and which revision it is (what the attempt
    /// says it sent when its outcome is recorded).
    fn bundle_to_deliver(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;

    /// A webhook job's event (kept while it waits, and while it is dead-lettered).
    fn event(&self, job: &JobId) -> Result<Option<Event>, StoreError>;

    /// Records an EHR delivery attempt's outcome (`rules::delivery_outcome`): the transition,
    /// the resources the EHR stored (indexed), the job's fate; if the outcome stands, the
    /// events `consequences` gives for the record as it leaves it are queued with it. `None`
    /// when there is no such submission (a job left without its record by a damaged store is
    /// dropped).
    fn record_delivery<'s>(
        &'s self,
        key: &str,
        transition: Transition,
        ehr: Vec<EhrResource>,
        sent: Option<u32>,
        consequences: Consequences,
    ) -> impl Future<Output = Result<Option<SubmissionRecord>, StoreError>> + Send + use<'s, Self>;

    /// Records a webhook job's outcome after `failures` failed attempts (`rules::event_outcome`):
    /// delivered (out), failed (stays, counted) or dead-lettered (out, kept for a replay).
    fn settle<'s>(
        &'s self,
        job: &JobId,
        failures: u32,
        outcome: EventOutcome,
    ) -> impl Future<Output = Result<Option<SubmissionRecord>, StoreError>> + Send + use<'s, Self>;

    /// Puts a job back in the outbox (a replay), failures counted again, out of the dead
    /// letters. An EHR job whose Bundle is past the retention is `Expired`.
    fn requeue<'s>(
        &'s self,
        job: &JobId,
        at: &str,
    ) -> impl Future<Output = Result<Requeued, StoreError>> + Send + use<'s, Self>;

    /// How many jobs of `receiver` wait.
    fn outbox_depth(&self, receiver: &Receiver) -> usize;

    /// How many EHR jobs of `mapping_id`'s submissions wait.
    fn outbox_depth_of(&self, mapping_id: &str) -> usize;

    /// How many of `receiver`'s jobs are dead-lettered now.
    fn dead_letter_count(&self, receiver: &Receiver) -> usize;

    /// `receiver`'s dead-lettered jobs (of one mapping's submissions, or all), earliest first.
    fn dead_letter_jobs(
        &self,
        receiver: &Receiver,
        mapping_id: Option<&str>,
    ) -> Result<Vec<JobId>, StoreError>;

    /// A page of `receiver`'s dead letters (of one mapping, or all), latest first: up to
    /// `limit` after `after`, and how many there are in all.
    fn dead_letter_page(
        &self,
        receiver: &Receiver,
        mapping_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<RecordPage, StoreError>;

    /// A page of `receiver`'s waiting jobs (of one mapping, or all), oldest first: up to
    /// `limit` after `after` (good while the process runs), and how many wait in all.
    fn waiting_page(
        &self,
        receiver: &Receiver,
        mapping_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<RecordPage, StoreError>;

    // Events from the EHR.

    /// Records an inbound event named `seen` (a subscription's event number, or a resource's
    /// version) and what it comes to — its events queued, or kept as unmatched — in one write,
    /// unless `seen` was recorded before: `Taken::Duplicate` then, and nothing is written (the
    /// same notification twice sends nothing twice).
    fn take_inbound<'s>(
        &'s self,
        seen: &str,
        inbound: Inbound,
    ) -> impl Future<Output = Result<Taken, StoreError>> + Send + use<'s, Self>;

    /// The unmatched events, newest first, at most `limit`, before `before` (a page's `next`).
    fn unmatched(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Unmatched>, Option<String>), StoreError>;

    /// How many unmatched events are kept.
    fn unmatched_count(&self) -> usize;

    /// A named position kept across restarts (how far a poll of the EHR has read).
    fn cursor(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Sets it; durable on return.
    fn set_cursor<'s>(
        &'s self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + use<'s, Self>;

    // The audit trail.

    /// Records an operator's access; resolves once it is on disk.
    fn record_access<'s>(
        &'s self,
        access: &Access,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + use<'s, Self>;

    /// The audit trail within `window`, newest first, at most `limit` entries; `next` says
    /// where the page after (older entries) begins when there may be one.
    fn accesses(&self, window: AuditWindow, limit: usize) -> Result<AuditPage, StoreError>;

    /// Removes the audit entries older than `retention` at `now`; how many went.
    fn forget_accesses(&self, retention: Duration, now: SystemTime) -> Result<usize, StoreError>;

    // Retention, health.

    /// Deletes the Bundles of delivered submissions kept longer than `retention`; the
    /// Bundles of waiting and dead-lettered ones are kept. A replay of a submission whose
    /// Bundle went is `Expired`; a replay and a sweep never cross.
    fn sweep_bundles(&self, retention: Duration, now: SystemTime) -> Result<Swept, StoreError>;

    /// Whether writes are taken and made durable now.
    fn health(&self) -> Health;

    fn stats(&self) -> CommitStats;

    /// Returns once everything written before the call is on disk (every write already waits
    /// for that; this is for shutdown).
    fn commit(&self) -> Result<(), StoreError>;
}
