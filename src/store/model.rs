//! What the store keeps and answers, in terms any engine can implement: records, transitions,
//! outbox jobs, pages and cursors. Nothing here knows sled (or PostgreSQL): an engine encodes
//! these as it likes, and cursors are opaque text to clients.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a submission is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Received,
    Mapped,
    Delivered,
    Failed,
    DeadLettered,
    Acknowledged,
}

/// One state transition, with when it happened and why (never PHI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: State,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Transition {
    pub fn new(state: State, at: impl Into<String>) -> Transition {
        Transition {
            state,
            at: at.into(),
            detail: None,
        }
    }

    pub fn because(mut self, detail: impl Into<String>) -> Transition {
        self.detail = Some(detail.into());
        self
    }
}

/// A resource as the EHR stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EhrResource {
    pub resource_type: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// Where an event sent to a receiver stands (a webhook job's state, kept in its submission's
/// record so that the status view says what the CRM and the portal were sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventState {
    Waiting,
    Delivered,
    Failed,
    DeadLettered,
}

/// An event of a submission for a receiver other than the EHR, as its record lists it: which,
/// what kind, and where its delivery stands — never its body (it may name the patient).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentEvent {
    pub receiver: String,
    /// The event's id (`webhook-id`: the same on every attempt).
    pub id: String,
    /// Its type (`intake.submitted`, `decision.made`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The CRM stage or portal status it sets, if it sets one: an event that would set what
    /// its receiver was last sent is not sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sets: Option<String>,
    pub state: EventState,
    /// When it last changed.
    pub at: String,
    /// Failures so far, or why it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What the store keeps of one submission. The raw payload is not kept (PHI): only its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmissionRecord {
    pub mapping_id: String,
    pub mapping_version: String,
    pub mapping_sha256: String,
    pub submission_id: String,
    pub payload_sha256: String,
    pub patient_system: String,
    pub patient_value: String,
    pub flags: Vec<String>,
    pub missing: Vec<String>,
    pub transitions: Vec<Transition>,
    #[serde(default)]
    pub ehr: Vec<EhrResource>,
    /// The payload hashes of the revisions before this one, earliest first (empty: this is
    /// the first). A re-send of any of them is a duplicate, never a revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_payloads: Vec<String>,
    /// The events queued for receivers other than the EHR, in the order they were queued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<SentEvent>,
}

impl SubmissionRecord {
    /// The store key: `<mapping id>/<submission id>`.
    pub fn key(&self) -> String {
        key(&self.mapping_id, &self.submission_id)
    }

    pub fn state(&self) -> Option<State> {
        self.transitions.last().map(|t| t.state)
    }

    /// Which revision of the submission this is: 1 for the first payload.
    pub fn revision(&self) -> u32 {
        u32::try_from(self.earlier_payloads.len()).map_or(u32::MAX, |n| n.saturating_add(1))
    }

    /// Notes what a delivery stored in the EHR: a resource listed already (a replay, a
    /// revision) is listed once, as it is now (its latest version); a new one is added at the
    /// end.
    pub fn stored_in_ehr(&mut self, resources: &[EhrResource]) {
        for r in resources {
            let listed = self
                .ehr
                .iter_mut()
                .find(|e| e.resource_type == r.resource_type && e.id == r.id);
            match listed {
                Some(listed) => *listed = r.clone(),
                None => self.ehr.push(r.clone()),
            }
        }
    }

    /// Whether `payload_sha256` is this revision's payload or an earlier one's.
    pub fn has_payload(&self, payload_sha256: &str) -> bool {
        self.payload_sha256 == payload_sha256
            || self.earlier_payloads.iter().any(|p| p == payload_sha256)
    }

    /// The patient index's name of this submission's patient: `<system>|<value>`.
    pub fn patient(&self) -> String {
        format!("{}|{}", self.patient_system, self.patient_value)
    }
}

/// `<mapping id>/<submission id>`: a submission's key. Mapping ids have no `/`, so the key
/// splits back at its first one.
pub fn key(mapping_id: &str, submission_id: &str) -> String {
    format!("{mapping_id}/{submission_id}")
}

/// The mapping id of a submission key.
pub fn mapping_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(m, _)| m)
}

/// Who an outbox job goes to: the EHR (a submission's Bundle), or a webhook receiver by name
/// (the CRM, the patient portal, any other configured), each with its own retry policy, dead
/// letters and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Receiver {
    Ehr,
    Webhook(String),
}

impl Receiver {
    /// A webhook receiver: its name is 1 to 32 of `a-z 0-9 - _`, and not `ehr`.
    pub fn webhook(name: &str) -> Result<Receiver, String> {
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && name != "ehr";
        if ok {
            Ok(Receiver::Webhook(name.to_string()))
        } else {
            Err(format!(
                "`{name}` is not a receiver name: 1 to 32 of a-z, 0-9, - and _, not `ehr`"
            ))
        }
    }

    /// `ehr`, or a webhook receiver's name.
    pub fn parse(name: &str) -> Option<Receiver> {
        if name == "ehr" {
            Some(Receiver::Ehr)
        } else {
            Receiver::webhook(name).ok()
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Receiver::Ehr => "ehr",
            Receiver::Webhook(name) => name,
        }
    }
}

impl fmt::Display for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One outbox job: a delivery to `receiver` about submission `key`. The EHR has one job per
/// submission (`seq` 0: the submission's current Bundle); a webhook receiver has one per event,
/// numbered in the order they were queued, and gets a submission's events in that order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId {
    pub receiver: Receiver,
    pub key: String,
    pub seq: u64,
}

impl JobId {
    /// The EHR delivery of submission `key`.
    pub fn ehr(key: impl Into<String>) -> JobId {
        JobId {
            receiver: Receiver::Ehr,
            key: key.into(),
            seq: 0,
        }
    }

    /// The sequence this job is one of: a receiver's jobs about one submission, in order.
    pub fn lane(&self) -> (&Receiver, &str) {
        (&self.receiver, &self.key)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.receiver {
            Receiver::Ehr => f.write_str(&self.key),
            _ => write!(f, "{}:{}#{}", self.receiver, self.key, self.seq),
        }
    }
}

/// A job waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub job: JobId,
    /// Failed attempts since it entered the outbox (or was put back by a replay): what the
    /// next backoff grows from, known without reading the record.
    pub failures: u32,
}

/// An event for a webhook receiver, queued in the same store transaction as the change that
/// causes it (a transactional outbox: a crash cannot separate the two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// A webhook receiver (never the EHR).
    pub receiver: Receiver,
    /// Stable across attempts and replays, so that receivers de-duplicate (`webhook-id`).
    pub id: String,
    /// Its type (`intake.submitted`, …).
    pub kind: String,
    /// The stage or status it sets (`SentEvent::sets`).
    pub sets: Option<String>,
    /// The JSON body sent.
    pub body: Vec<u8>,
}

/// What an EHR delivery outcome causes, as the workflow layer words it: given the record as
/// the outcome leaves it and the outcome, the events to queue in the same write. Pure — an
/// engine may call it more than once for one write (a transaction run again).
pub type Consequences =
    std::sync::Arc<dyn Fn(&SubmissionRecord, &Transition) -> Vec<Event> + Send + Sync>;

/// Consequences of none.
pub fn no_consequences() -> Consequences {
    std::sync::Arc::new(|_: &SubmissionRecord, _: &Transition| Vec::new())
}

/// An event from the EHR (or another sender) that resolved to no submission: kept for an
/// operator, never dropped and never sent anywhere. Names what it was about, never its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmatched {
    /// When it came (RFC 3339).
    pub at: String,
    /// Who sent it (`ehr`, or another sender's name).
    pub sender: String,
    /// What it was about (`Task/123`, `Task/123/_history/4`).
    pub resource: String,
    /// Why it resolved to nothing.
    pub why: String,
}

/// What an inbound event causes for submission `key`, as the workflow layer words it: given its
/// record as it stands, the events to queue in the same write. Pure, like `Consequences`.
pub type Decide = std::sync::Arc<dyn Fn(&SubmissionRecord) -> Vec<Event> + Send + Sync>;

/// What an inbound event comes to, recorded at once with the mark that it was seen.
#[derive(Clone)]
pub enum Inbound {
    /// Events for receivers about submission `key`, as `decide` says. `sender` and `resource`
    /// say what it was (as `Unmatched` does), kept if the submission is gone.
    Events {
        key: String,
        decide: Decide,
        sender: String,
        resource: String,
    },
    /// It resolved to no submission.
    Unmatched(Unmatched),
    /// Nothing to send (no rule matched): only seen.
    Nothing,
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inbound::Events { key, .. } => write!(f, "Events({key})"),
            Inbound::Unmatched(u) => write!(f, "Unmatched({})", u.resource),
            Inbound::Nothing => f.write_str("Nothing"),
        }
    }
}

/// What `take_inbound` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Seen before: nothing written.
    Duplicate,
    /// This many events queued (none: nothing changed for any receiver).
    Queued(usize),
    /// Kept as unmatched.
    Unmatched,
    /// Only marked seen.
    Seen,
    /// Its submission is not in the store (any more): kept as unmatched.
    Gone,
}

/// What became of one attempt to deliver an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    Delivered {
        at: String,
    },
    /// To be tried again; why (never PHI).
    Failed {
        at: String,
        why: String,
    },
    DeadLettered {
        at: String,
        why: String,
    },
}

/// What `accept` and `revise` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Stored with an outbox job (and its events).
    New,
    /// The same submission with the same payload (of any revision) was already stored:
    /// nothing written.
    Duplicate(Box<SubmissionRecord>),
    /// The same submission id with a payload none of its revisions had: a revision to make
    /// (`revise`); or, from `revise`, another revision came first (amend that one). The
    /// Bundle given is handed back (empty when `revise` refused it).
    Conflict(Box<SubmissionRecord>, Vec<u8>),
}

/// What `requeue` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Requeued {
    /// Back in the outbox (or still there), with a transition saying so.
    Waiting(Box<SubmissionRecord>),
    /// Its Bundle is past the retention (gone, or about to go): nothing to deliver again.
    Expired,
    /// No such submission or job.
    Unknown,
}

/// A page of a listing of submissions (and, for a listing of jobs, each record's job).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordPage {
    pub records: Vec<SubmissionRecord>,
    /// The job each record is listed for, in the same order (dead letters, waiting jobs).
    pub jobs: Vec<JobId>,
    /// How many the listing holds in all (every page).
    pub total: usize,
    /// Where the next page begins (`Cursor::parse` reads it); `None` on the last.
    pub next: Option<String>,
}

/// Where a page of a listing resumes: the last entry of the page before — its place in the
/// listing's order and its job —, as opaque hex to clients (URL-safe, no encoding needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub at: u64,
    pub job: String,
}

impl Cursor {
    pub fn render(&self) -> String {
        format!("{:016x}{}", self.at, hex(self.job.as_bytes()))
    }

    /// A page's `next`; `None` if it is not one.
    pub fn parse(next: &str) -> Option<Cursor> {
        let at: [u8; 8] = from_hex(next.get(..16)?)?.try_into().ok()?;
        Some(Cursor {
            at: u64::from_be_bytes(at),
            job: String::from_utf8(from_hex(next.get(16..)?)?).ok()?,
        })
    }
}

/// One access to an operators' endpoint, as the audit trail keeps it. It may name a patient
/// (a lookup's identifier): it stays in the store, as the patient index does, never in logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Access {
    /// RFC 3339.
    pub at: String,
    /// Who asked: which operator (by name), which admin key (its fingerprint), or why none was
    /// accepted.
    pub who: String,
    /// From where: the peer address of the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// `X-Forwarded-For` (or `Forwarded`) as the request carried it: what a proxy in front
    /// says of the client, unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<String>,
    pub request_id: String,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Whether it was let through.
    pub allowed: bool,
    /// How many refused attempts came since the entry before this one without an entry of
    /// their own (over the rate at which refusals are recorded one by one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecorded_refusals: Option<u64>,
}

/// Where an audit entry is in the trail: when it was recorded (Unix µs) and its number among
/// the entries of that microsecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct AuditCursor {
    pub micros: u64,
    pub seq: u64,
}

impl AuditCursor {
    /// A page's `next` (32 hex digits); `None` if it is not one.
    pub fn parse(next: &str) -> Option<AuditCursor> {
        let b: [u8; 16] = from_hex(next)?.try_into().ok()?;
        let (micros, seq) = b.split_at(8);
        Some(AuditCursor {
            micros: u64::from_be_bytes(micros.try_into().ok()?),
            seq: u64::from_be_bytes(seq.try_into().ok()?),
        })
    }

    pub fn render(&self) -> String {
        format!("{:016x}{:016x}", self.micros, self.seq)
    }
}

/// Which part of the audit trail to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditWindow {
    /// Entries recorded at or after this time (Unix µs).
    pub since: Option<u64>,
    /// Entries before this one (a page's `next`, or `until`'s time).
    pub before: Option<AuditCursor>,
}

impl AuditWindow {
    /// Entries recorded before `micros` (Unix µs).
    pub fn until(micros: u64) -> AuditCursor {
        AuditCursor { micros, seq: 0 }
    }
}

/// A page of the audit trail, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub accesses: Vec<Access>,
    /// Where the next (older) page begins, as `AuditCursor::parse` reads it; `None` once the
    /// window holds no more.
    pub next: Option<String>,
}

/// What a sweep of the kept Bundles did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Pieces of storage freed (Bundle log segments, for sled).
    pub segments: usize,
    /// Bundles deleted with them (their submissions were delivered).
    pub expired: usize,
    /// Bundles still needed (waiting in the outbox or dead-lettered) kept by moving them first.
    pub moved: usize,
}

/// How the store's writes have gone so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Writes made durable.
    pub commits: u64,
    /// Write rounds (each made durable at once).
    pub rounds: u64,
    /// Time spent making rounds durable, in the engine's two steps (µs).
    pub flush_micros: u64,
    pub sync_micros: u64,
}

/// Whether the store can take writes now (what `/ready` reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Writes are taken and made durable.
    Writing,
    /// The last write round failed (why): writes may fail until one succeeds.
    Failing(String),
    /// Writes cannot be taken any more (the writer stopped: why); the gateway must restart.
    Stopped(String),
}

/// Why the store failed. Always the server's problem, never the client's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The storage engine's own failure, in its words.
    #[error("store: {0}")]
    Engine(String),
    #[error("store record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The data directory holds a store this version cannot read.
    #[error("store: {0}")]
    Format(String),
    #[error("store: the write round failed: {0}")]
    Failed(String),
    #[error("store: closed")]
    Closed,
}

impl StoreError {
    /// A record (or value) that cannot be read: `key` and why.
    pub fn corrupt(key: &str, why: impl fmt::Display) -> StoreError {
        StoreError::Corrupt {
            key: key.to_string(),
            source: serde::de::Error::custom(why.to_string()),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `hex` wrote; `None` for anything else.
pub(crate) fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_what_they_wrote() {
        let c = Cursor {
            at: 42,
            job: "ehr m/s".into(),
        };
        assert_eq!(Cursor::parse(&c.render()), Some(c));
        assert_eq!(Cursor::parse("zz"), None);
        let a = AuditCursor {
            micros: 1_700_000_000_000_000,
            seq: 7,
        };
        assert_eq!(AuditCursor::parse(&a.render()), Some(a));
        assert_eq!(AuditCursor::parse("0123"), None);
    }

    #[test]
    fn receivers_are_named_plainly() {
        assert_eq!(Receiver::parse("ehr"), Some(Receiver::Ehr));
        assert_eq!(
            Receiver::parse("crm"),
            Some(Receiver::Webhook("crm".into()))
        );
        assert!(Receiver::webhook("ehr").is_err());
        assert!(Receiver::webhook("CRM").is_err());
        assert!(Receiver::webhook("").is_err());
        assert_eq!(JobId::ehr("m/s").to_string(), "m/s");
    }
}
