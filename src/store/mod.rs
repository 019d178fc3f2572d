//! The provenance store: every accepted submission, its state transitions, what the EHR answered,
//! and the outbox of deliveries still to make — embedded, in sled, on disk.
//!
//! Knows sled and its own records; nothing of HTTP, mapping files or the EHR's API. Every write
//! goes through one writer thread (`writer`) and returns once it is on disk: a submission with
//! its outbox entry (keyed by the submission, so leaving it is O(log n)) and patient index in
//! one transaction, its Bundle in the append-only Bundle log (`bundles`) beside sled. Indexes
//! run both ways: submission ↔ EHR resource ↔ patient.

mod bundles;
mod queue;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use writer::CommitStats;
use writer::{Trees, Write, Writer, Written};

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
    /// From where: the peer address of the connection (`None` in entries of earlier versions).
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

static AUDIT_SEQ: AtomicU64 = AtomicU64::new(0);

/// An audit key: Unix µs, then a sequence number (big-endian), so that the tree is in
/// the order of the accesses even within one microsecond.
fn audit_key() -> [u8; 16] {
    let micros = unix_micros(std::time::SystemTime::now());
    audit_key_at(micros, AUDIT_SEQ.fetch_add(1, Ordering::Relaxed))
}

/// `t` in Unix µs (0 before 1970).
fn unix_micros(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The audit key of `micros` (Unix µs) and sequence number `seq`.
fn audit_key_at(micros: u64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&micros.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// How many audit entries one write round removes at most (a sweep takes several rounds, and
/// submissions get theirs in between).
const FORGET_AT_ONCE: usize = 2048;

/// Which part of the audit trail to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditWindow {
    /// Entries recorded at or after this time (Unix µs).
    pub since: Option<u64>,
    /// Entries before this key (a page's `next`, or `until`'s time as a key).
    pub before: Option<[u8; 16]>,
}

impl AuditWindow {
    /// Entries recorded before `micros` (Unix µs).
    pub fn until(micros: u64) -> [u8; 16] {
        audit_key_at(micros, 0)
    }

    /// A page's `next` (32 hex digits) as a key; `None` if it is not one.
    pub fn cursor(next: &str) -> Option<[u8; 16]> {
        from_hex(next)?.try_into().ok()
    }
}

/// A page of the audit trail, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub accesses: Vec<Access>,
    /// Where the next (older) page begins, as `AuditWindow::cursor` reads it; `None` once the
    /// window holds no more.
    pub next: Option<String>,
}

fn hex_key(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `hex_key` wrote; `None` for anything else.
fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

pub fn key(mapping_id: &str, submission_id: &str) -> String {
    format!("{mapping_id}/{submission_id}")
}

/// A page of a listing of submissions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordPage {
    pub records: Vec<SubmissionRecord>,
    /// How many the listing holds in all (every page).
    pub total: usize,
    /// Where the next page begins (`Cursor::parse` reads it); `None` on the last.
    pub next: Option<String>,
}

/// Where a page of a listing resumes: the last entry of the page before — its place in the
/// listing's order and its key —, as opaque hex to clients (URL-safe, no encoding needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    at: u64,
    key: String,
}

impl Cursor {
    fn render(&self) -> String {
        format!("{:016x}{}", self.at, hex_key(self.key.as_bytes()))
    }

    /// A page's `next`; `None` if it is not one.
    pub fn parse(next: &str) -> Option<Cursor> {
        let at: [u8; 8] = from_hex(next.get(..16)?)?.try_into().ok()?;
        Some(Cursor {
            at: u64::from_be_bytes(at),
            key: String::from_utf8(from_hex(next.get(16..)?)?).ok()?,
        })
    }
}

/// A delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub key: String,
    /// Failed attempts since it entered the outbox (or was put back by a replay): what the
    /// next backoff grows from, known without reading the record.
    pub failures: u32,
}

/// What `accept` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Stored with an outbox entry.
    New,
    /// The same submission with the same payload was already stored: nothing written.
    Duplicate(Box<SubmissionRecord>),
    /// The same submission id with a payload none of its revisions had: a revision
    /// (`Store::revise`). The Bundle given is handed back (empty when a revision was refused
    /// because another came first).
    Conflict(Box<SubmissionRecord>, Vec<u8>),
}

/// Which of a submission's Bundles a delivery attempt sends (its place in the Bundle log;
/// none for Bundles of the earliest versions): the outcome of an attempt that sent an earlier
/// revision's does not take the revision out of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleRef(Option<bundles::BundleAt>);

/// What `requeue` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Requeued {
    /// Back in the outbox (or still there), with a transition saying so.
    Waiting(Box<SubmissionRecord>),
    /// Its Bundle is past the retention (gone, or about to go): nothing to deliver again.
    Expired,
    /// No such submission.
    Unknown,
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
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("store: the write round failed: {0}")]
    Failed(String),
    #[error("store: closed")]
    Closed,
}

/// The sled store.
pub struct Store {
    trees: Arc<Trees>,
    writer: Writer,
}

/// How many Bundles a retention sweep moves in one go (they are held in memory meanwhile).
const MOVES_AT_ONCE: usize = 256;

/// How a store is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The Bundle log begins a new segment once its last one holds this many bytes; retention
    /// deletes whole segments.
    pub bundle_segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            bundle_segment_bytes: 64 << 20,
        }
    }
}

/// What a sweep of the Bundle log did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Segments deleted.
    pub segments: usize,
    /// Bundles deleted with them (their submissions were delivered).
    pub expired: usize,
    /// Bundles still needed (waiting in the outbox or dead-lettered) moved to the end of the
    /// log first.
    pub moved: usize,
    /// Bundles the earliest versions kept in sled itself, moved into the log (where retention
    /// applies to them as to the others; once).
    pub migrated: usize,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// `open`, laid out as `options` say.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        // Every write goes through the writer, which flushes after each round: sled's own
        // background flusher has nothing left to do.
        let db = open_sled(dir)?;
        let (bundles, appender) = bundles::BundleLog::open(
            &dir.join("bundles"),
            &dir.join("bundles.log"),
            options.bundle_segment_bytes,
        )?;
        let outbox = db.open_tree("outbox")?;
        let submissions = db.open_tree("submissions")?;
        let trees = Arc::new(Trees {
            bundle_at: db.open_tree("bundle_at")?,
            bundles,
            legacy_bundles: db.open_tree("bundles")?,
            queue: waiting(&outbox, &submissions)?,
            outbox,
            by_resource: db.open_tree("by_resource")?,
            by_patient: db.open_tree("by_patient")?,
            audit: db.open_tree("audit")?,
            dead_letters: dead_letters(&db, &submissions)?,
            fresh: writer::Fresh::default(),
            submissions,
            db,
        });
        let writer = Writer::start(Arc::clone(&trees), appender, dir)?;
        Ok(Store { trees, writer })
    }

    /// Stores a new submission, its Bundle (JSON bytes) and its outbox entry together, unless
    /// that submission is already there, and returns once that is on disk.
    pub fn accept(
        &self,
        record: &SubmissionRecord,
        bundle: impl Into<Vec<u8>>,
    ) -> Result<Accepted, StoreError> {
        accepted(
            self.writer
                .write(accept_write(record, bundle.into(), None)?)?,
        )
    }

    /// `accept` for async callers: the task waits, no thread is parked. The values are
    /// encoded when this is called, not when the future is first polled, so that the caller
    /// may drop what it built them from before it waits.
    pub fn accept_async(
        &self,
        record: &SubmissionRecord,
        bundle: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Accepted, StoreError>> + Send + '_ {
        let write = accept_write(record, bundle, None);
        async move { accepted(self.writer.write_async(write?).await?) }
    }

    /// Returns once everything written before the call is on disk (every write already
    /// waits for that; this is for shutdown).
    pub fn commit(&self) -> Result<(), StoreError> {
        self.writer.write(Write::Barrier).map(|_| ())
    }

    /// Records an operator's access to the audit trail; returns once it is on disk.
    pub async fn record_access(&self, access: &Access) -> Result<(), StoreError> {
        let encoded = serde_json::to_vec(access).map_err(|source| StoreError::Corrupt {
            key: "audit".into(),
            source,
        })?;
        let write = Write::Audit {
            key: audit_key(),
            access: encoded,
        };
        self.writer.write_async(write).await.map(|_| ())
    }

    /// The audit trail within `window`, newest first, at most `limit` entries; `next` says
    /// where the page after (older entries) begins when there may be one.
    pub fn accesses(&self, window: AuditWindow, limit: usize) -> Result<AuditPage, StoreError> {
        let since = window.since.map_or([0; 16], |t| audit_key_at(t, 0));
        let before = window.before.unwrap_or([0xff; 16]);
        let mut accesses = Vec::new();
        if since >= before {
            return Ok(AuditPage {
                accesses,
                next: None,
            });
        }
        let mut last = None;
        for entry in self.trees.audit.range(since..before).rev().take(limit) {
            let (key, value) = entry?;
            accesses.push(serde_json::from_slice(&value).map_err(|source| {
                StoreError::Corrupt {
                    key: format!("audit {}", hex_key(&key)),
                    source,
                }
            })?);
            last = Some(key);
        }
        let next = last
            .filter(|_| accesses.len() == limit)
            .map(|key| hex_key(&key));
        Ok(AuditPage { accesses, next })
    }

    /// Removes the audit entries older than `retention` at `now`, through the writer, some
    /// thousands at a time; how many went. Durable when it returns.
    pub fn forget_accesses(
        &self,
        retention: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<usize, StoreError> {
        let Some(cutoff) = now.checked_sub(retention) else {
            return Ok(0);
        };
        let below = audit_key_at(unix_micros(cutoff), 0);
        let mut forgotten = 0;
        loop {
            let keys = self
                .trees
                .audit
                .range(..below)
                .keys()
                .take(FORGET_AT_ONCE)
                .collect::<Result<Vec<_>, _>>()?;
            let n = keys.len();
            if n == 0 {
                return Ok(forgotten);
            }
            self.writer.write(Write::Forget { keys })?;
            forgotten += n;
            if n < FORGET_AT_ONCE {
                return Ok(forgotten);
            }
        }
    }

    /// Writes made durable, write rounds, time in flush and fdatasync.
    pub fn commit_stats(&self) -> CommitStats {
        self.writer.stats()
    }

    pub fn get(&self, key: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        self.trees
            .submissions
            .get(key.as_bytes())?
            .map(|b| decode(key, &b))
            .transpose()
    }

    /// The Bundle of a submission, as the JSON bytes that were accepted. A Bundle accepted
    /// moments ago is handed over from memory, once (its first delivery attempt); any later
    /// read, and any after a restart, reads it back from the Bundle log.
    pub fn bundle(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.bundle_to_deliver(key)?.map(|(bundle, _)| bundle))
    }

    /// `bundle`, and which it is: what a delivery attempt sends, and says it sent when it
    /// records its outcome (`transition_of`).
    pub fn bundle_to_deliver(&self, key: &str) -> Result<Option<(Vec<u8>, BundleRef)>, StoreError> {
        if let Some((at, bundle)) = self.trees.fresh.take(key) {
            return Ok(Some((bundle, BundleRef(Some(at)))));
        }
        self.kept_json(key)
    }

    /// A submission's current Bundle, read without taking it from memory: what its next
    /// revision amends.
    pub fn current_bundle(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(bundle) = self.trees.fresh.peek(key) {
            return Ok(Some(bundle));
        }
        Ok(self.kept_json(key)?.map(|(bundle, _)| bundle))
    }

    /// The Bundle kept for `key` (in the log, or in sled for the earliest versions), as JSON.
    fn kept_json(&self, key: &str) -> Result<Option<(Vec<u8>, BundleRef)>, StoreError> {
        // A sweep may move a waiting Bundle and drop its old segment between the read of the
        // record and the read of the log: read again, the record has the new place.
        let (lz4, at) = match self.kept_bundle(key)? {
            Some(kept) => kept,
            None => match self.kept_bundle(key)? {
                Some(kept) => kept,
                None => return Ok(None),
            },
        };
        lz4_flex::decompress_size_prepended(&lz4)
            .map(|json| Some((json, BundleRef(at))))
            .map_err(|e| corrupt(key, format!("bundle is not LZ4: {e}")))
    }

    /// Whether a submission's Bundle went, or is going, with its segment of the Bundle log
    /// (past the retention): the record is there, its Bundle's place is below the oldest
    /// segment kept or below what a sweep under way marked expiring.
    pub fn bundle_expired(&self, key: &str) -> Result<bool, StoreError> {
        let Some(record) = self.trees.submissions.get(key.as_bytes())? else {
            return Ok(false);
        };
        let at = bundle_place(&self.trees, key.as_bytes(), Some(&record))?;
        Ok(replay_expired(&self.trees, at, key, &record))
    }

    /// A submission's Bundle as kept (LZ4) and its place; `None` when there is none, or no
    /// longer.
    #[allow(clippy::type_complexity)]
    fn kept_bundle(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<bundles::BundleAt>)>, StoreError> {
        let record = self.trees.submissions.get(key.as_bytes())?;
        match bundle_place(&self.trees, key.as_bytes(), record.as_deref())? {
            Some(at) => Ok(self.trees.bundles.read(key, at)?.map(|lz4| (lz4, Some(at)))),
            // Accepted before the Bundle log existed: the Bundle is in sled itself.
            None => Ok(self
                .trees
                .legacy_bundles
                .get(key.as_bytes())?
                .map(|lz4| (lz4.to_vec(), None))),
        }
    }

    /// Deletes the Bundles kept longer than `retention`: whole segments of the Bundle log,
    /// oldest first, once the last Bundle appended to one is that old. A Bundle still needed —
    /// its submission waits in the outbox or was dead-lettered (a replay sends it) — is moved
    /// to the end of the log first, durably, so only delivered submissions lose theirs. Reads
    /// every record whose Bundle is in an expiring segment: for now and then (the server
    /// sweeps hourly), not for the hot path.
    pub fn sweep_bundles(
        &self,
        retention: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<Swept, StoreError> {
        let migrated = self.migrate_legacy_bundles()?;
        let Some(below) = self.expire_bundles(retention, now)? else {
            return Ok(Swept {
                migrated,
                ..Swept::default()
            });
        };
        let mut swept = Swept {
            migrated,
            ..Swept::default()
        };
        let mut moves = Vec::new();
        for entry in self.trees.submissions.iter() {
            let (key, value) = entry?;
            let Some(at) = bundle_place(&self.trees, &key, Some(&value))? else {
                continue;
            };
            if at.offset >= below {
                continue;
            }
            let key = String::from_utf8_lossy(&key).into_owned();
            // An unreadable record counts as needed: its Bundle is kept.
            if delivered(&key, &value) {
                swept.expired += 1;
                continue;
            }
            match self.trees.bundles.read(&key, at) {
                Ok(Some(lz4)) => moves.push(Write::Move { key, lz4 }),
                Ok(None) => {}
                // A Bundle that fails its check cannot be delivered from anywhere: nothing to
                // keep (its delivery is dead-lettered, saying so).
                Err(e) => tracing::warn!(key, error = %e, "bundle sweep: an unreadable Bundle"),
            }
            if moves.len() == MOVES_AT_ONCE {
                swept.moved += self.write_all(std::mem::take(&mut moves))?;
            }
        }
        swept.moved += self.write_all(moves)?;
        // Every move is on disk before any segment goes.
        swept.segments = self.trees.bundles.drop_below(below)?;
        Ok(swept)
    }

    /// Moves the Bundles the earliest versions kept in sled's `bundles` tree into the Bundle log,
    /// their records gaining a place (`Write::Move`), then deletes them from the tree — only
    /// once the move is durable, and a reader that raced it reads the record again
    /// (`Store::bundle`). Their retention runs from the move. After the first sweep the tree is
    /// empty and this reads nothing.
    fn migrate_legacy_bundles(&self) -> Result<usize, StoreError> {
        let mut migrated = 0;
        loop {
            // Each batch is removed once moved: the next read starts at what is left.
            let batch = self
                .trees
                .legacy_bundles
                .iter()
                .take(MOVES_AT_ONCE)
                .collect::<Result<Vec<_>, _>>()?;
            if batch.is_empty() {
                return Ok(migrated);
            }
            let moves = batch
                .iter()
                .map(|(key, lz4)| Write::Move {
                    key: String::from_utf8_lossy(key).into_owned(),
                    lz4: lz4.to_vec(),
                })
                .collect();
            migrated += self.write_all(moves)?;
            for (key, _) in batch {
                self.trees.legacy_bundles.remove(key)?;
            }
        }
    }

    /// A sweep's first step: marks the Bundles of the segments past `retention` as expiring —
    /// replays of their submissions are refused from now on — and returns the offset they end
    /// at (`None`: nothing has expired). Every replay that got in before is in the store when
    /// this returns, so the sweep's scan sees it and keeps its Bundle.
    pub fn expire_bundles(
        &self,
        retention: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<Option<u64>, StoreError> {
        let below = self
            .trees
            .bundles
            .closed()?
            .into_iter()
            .take_while(|s| s.modified.checked_add(retention).is_some_and(|t| t <= now))
            .last()
            .map(|s| s.end);
        if let Some(below) = below {
            self.writer.write(Write::Expire { below })?;
        }
        Ok(below)
    }

    /// Queues `writes` at once (the writer takes them in as few rounds as it can) and returns
    /// how many there were once all are durable.
    fn write_all(&self, writes: Vec<Write>) -> Result<usize, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let n = writes.len();
        for write in writes {
            let tx = tx.clone();
            self.writer.submit(
                write,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
        }
        drop(tx);
        for written in rx {
            written?;
        }
        Ok(n)
    }

    /// Appends a transition (and, once delivered, the EHR's resources, indexed) and, when the
    /// submission leaves the outbox (delivered or dead-lettered), removes its entry. Durable on
    /// return; `None` when there is no such submission (and an outbox entry left without its
    /// record by a damaged store is dropped).
    pub fn transition(
        &self,
        key: &str,
        transition: Transition,
        ehr: Vec<EhrResource>,
    ) -> Result<Option<SubmissionRecord>, StoreError> {
        record(
            self.writer
                .write(transition_write(key, transition, ehr, None))?,
        )
    }

    /// `transition` for async callers, of a delivery attempt that sent `sent`: if a revision
    /// came in meanwhile, the attempt's outcome is recorded but the revision stays in the
    /// outbox (with a transition saying it waits).
    pub async fn transition_of(
        &self,
        key: &str,
        transition: Transition,
        ehr: Vec<EhrResource>,
        sent: Option<BundleRef>,
    ) -> Result<Option<SubmissionRecord>, StoreError> {
        let write = transition_write(key, transition, ehr, sent);
        record(self.writer.write_async(write).await?)
    }

    /// Stores `record` as the next revision of its submission — its Bundle (`bundle`, as
    /// `fhir::revision` amends) in the outbox in place of the earlier one's, waiting or not —
    /// if the submission's current payload is still `revises`: `New` once on disk; a
    /// `Duplicate` if some revision already had this payload; a `Conflict` if another
    /// revision came first (amend that one instead).
    pub async fn revise(
        &self,
        record: &SubmissionRecord,
        bundle: Vec<u8>,
        revises: &str,
    ) -> Result<Accepted, StoreError> {
        let write = accept_write(record, bundle, Some(revises))?;
        accepted(self.writer.write_async(write).await?)
    }

    /// Puts a submission back in the outbox (a replay), with a transition saying so; a
    /// submission already waiting stays there once. Refused when its Bundle has expired —
    /// decided by the writer, so a replay and a retention sweep never cross: one that got in
    /// before the sweep marked the Bundle expiring is seen (and its Bundle kept) by the sweep.
    pub fn requeue(&self, key: &str, at: &str) -> Result<Requeued, StoreError> {
        requeued(self.writer.write(requeue_write(key, at))?)
    }

    /// `requeue` for async callers.
    pub async fn requeue_async(&self, key: &str, at: &str) -> Result<Requeued, StoreError> {
        requeued(self.writer.write_async(requeue_write(key, at)).await?)
    }

    /// How many deliveries wait in the outbox.
    pub fn outbox_depth(&self) -> usize {
        self.trees.queue.len()
    }

    /// How many deliveries of `mapping_id`'s submissions wait in the outbox.
    pub fn outbox_depth_of(&self, mapping_id: &str) -> usize {
        self.trees.queue.len_of(mapping_id)
    }

    /// Keys of the submissions waiting in the outbox, oldest first.
    pub fn pending(&self) -> Vec<String> {
        self.pending_where(usize::MAX, |_| true)
            .into_iter()
            .map(|p| p.key)
            .collect()
    }

    /// Up to `limit` waiting deliveries whose keys `want` accepts, oldest first.
    pub fn pending_where(&self, limit: usize, want: impl FnMut(&str) -> bool) -> Vec<Pending> {
        self.trees.queue.first(limit, want)
    }

    /// The submission that produced an EHR resource (`Observation/123`).
    pub fn by_resource(&self, reference: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        match self.trees.by_resource.get(reference.as_bytes())? {
            Some(key) => self.get(&String::from_utf8_lossy(&key)),
            None => Ok(None),
        }
    }

    /// A page of the dead-lettered submissions (waiting for a fix and a replay) — of one
    /// mapping, or all —, latest dead letter first: up to `limit` after `after` (a page's
    /// `next`), and how many there are in all.
    pub fn dead_letter_page(
        &self,
        mapping_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<RecordPage, StoreError> {
        let entries = self.dead_letter_entries(mapping_id)?;
        let total = entries.len();
        let later = entries
            .into_iter()
            .rev()
            .filter(|(when, key)| after.is_none_or(|c| (*when, key) < (c.at, &c.key)));
        self.page(later, total, limit)
    }

    /// A page of `limit` records of the listing `entries` (place, key) goes on with, in its
    /// order, `total` in all: `next` names the last one if more follow.
    fn page(
        &self,
        entries: impl Iterator<Item = (u64, String)>,
        total: usize,
        limit: usize,
    ) -> Result<RecordPage, StoreError> {
        let mut page = RecordPage {
            total,
            ..RecordPage::default()
        };
        let mut last = None;
        for (at, key) in entries {
            if page.records.len() == limit {
                page.next = last.as_ref().map(Cursor::render);
                break;
            }
            page.records.extend(self.get(&key)?);
            last = Some(Cursor { at, key });
        }
        Ok(page)
    }

    /// The keys of the dead-lettered submissions — of one mapping, or all — earliest dead
    /// letter first.
    pub fn dead_letter_keys(&self, mapping_id: Option<&str>) -> Result<Vec<String>, StoreError> {
        Ok(self
            .dead_letter_entries(mapping_id)?
            .into_iter()
            .map(|(_, key)| key)
            .collect())
    }

    /// The dead letters (when, Unix µs; key) of one mapping or all, earliest first.
    fn dead_letter_entries(
        &self,
        mapping_id: Option<&str>,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let prefix = mapping_id.map_or_else(Vec::new, |m| key(m, "").into_bytes());
        let mut entries = Vec::new();
        for entry in self.trees.dead_letters.scan_prefix(prefix) {
            let (key, when) = entry?;
            let when = <[u8; 8]>::try_from(when.as_ref()).map_or(0, i64::from_le_bytes);
            entries.push((
                u64::try_from(when).unwrap_or(0),
                String::from_utf8_lossy(&key).into_owned(),
            ));
        }
        entries.sort();
        Ok(entries)
    }

    /// A page of the submissions waiting in the outbox — of one mapping, or all —, oldest
    /// first: up to `limit` after `after` (a page's `next`, good while this process runs),
    /// and how many wait in all.
    pub fn waiting_page(
        &self,
        mapping_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<RecordPage, StoreError> {
        let queue = &self.trees.queue;
        let prefix = mapping_id.map(|m| key(m, ""));
        let waiting = queue.after(after.map(|c| c.at), limit.saturating_add(1), |k| {
            prefix.as_ref().is_none_or(|p| k.starts_with(p.as_str()))
        });
        let total = mapping_id.map_or_else(|| queue.len(), |m| queue.len_of(m));
        self.page(waiting.into_iter().map(|(at, p)| (at, p.key)), total, limit)
    }

    /// How many submissions are dead-lettered now.
    pub fn dead_letter_count(&self) -> usize {
        self.trees.dead_letters.len()
    }

    /// Keys of a patient's submissions.
    pub fn by_patient(&self, system: &str, value: &str) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{system}|{value}\0");
        self.trees
            .by_patient
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| {
                k.map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
                    .map_err(StoreError::from)
            })
            .collect()
    }
}

/// Opens sled in `dir`. sled lets go of its file lock only when the last reference to the
/// database goes, which can be a moment after a `Store` of this process was dropped (its IO
/// threads and deferred frees hold references; sled's own tests block on the lock for that
/// reason): a reopen waits up to two seconds for the lock before it gives up.
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return opened.map_err(StoreError::from),
        }
    }
}

/// The dead-letter index; built once from the records in a store of an earlier version (which
/// had none), marked done by `DEAD_LETTERS_INDEXED` in sled's default tree.
fn dead_letters(db: &sled::Db, submissions: &sled::Tree) -> Result<sled::Tree, StoreError> {
    let tree = db.open_tree("dead_letters")?;
    if db.contains_key(DEAD_LETTERS_INDEXED)? {
        return Ok(tree);
    }
    for entry in submissions.iter() {
        let (key, value) = entry?;
        let Ok(record) = decode(&String::from_utf8_lossy(&key), &value) else {
            continue;
        };
        if let Some(last) = record
            .transitions
            .last()
            .filter(|t| t.state == State::DeadLettered)
        {
            let micros =
                chrono::DateTime::parse_from_rfc3339(&last.at).map_or(0, |t| t.timestamp_micros());
            tree.insert(key, &micros.to_le_bytes())?;
        }
    }
    db.insert(DEAD_LETTERS_INDEXED, &[1])?;
    db.flush()?;
    Ok(tree)
}

const DEAD_LETTERS_INDEXED: &[u8] = b"dead_letters_indexed";

/// The outbox's entries in the order they entered it (accepted, or put back by a replay), then
/// key: the time the entry keeps, or — written by an earlier version — its record's last
/// `mapped` transition (one record read each). An entry whose record cannot be read comes
/// first (the outbox soon drops or dead-letters it).
fn waiting(outbox: &sled::Tree, submissions: &sled::Tree) -> Result<queue::Queue, StoreError> {
    let mut entries = Vec::new();
    for entry in outbox.iter() {
        let (key, value) = entry?;
        let key = String::from_utf8_lossy(&key).into_owned();
        let entered = match writer::entered(&value) {
            Some(micros) => Some(micros),
            None => match submissions.get(key.as_bytes())? {
                Some(record) => decode(&key, &record).ok().and_then(|r| {
                    r.transitions
                        .iter()
                        .rev()
                        .find(|t| t.state == State::Mapped)
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t.at).ok())
                        .map(|t| t.timestamp_micros())
                }),
                None => None,
            },
        };
        entries.push((entered, key, writer::failures(&value)));
    }
    entries.sort();
    Ok(queue::Queue::load(
        entries
            .into_iter()
            .map(|(_, key, failures)| (key, failures)),
    ))
}

fn corrupt(key: &str, why: String) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        source: serde::de::Error::custom(why),
    }
}

/// A new submission (`revises: None`), or a revision of the one whose payload is `revises`.
fn accept_write(
    record: &SubmissionRecord,
    bundle: Vec<u8>,
    revises: Option<&str>,
) -> Result<Write, StoreError> {
    let key = record.key();
    Ok(Write::Accept {
        record: encode(record)?,
        payload_sha256: record.payload_sha256.clone(),
        lz4: lz4_flex::compress_prepend_size(&bundle),
        bundle,
        patient_key: patient_key(record),
        key,
        revises: revises.map(str::to_string),
    })
}

/// A submission's entry in the patient index: the patient's identifier, then its key.
fn patient_key(record: &SubmissionRecord) -> String {
    let key = record.key();
    format!("{}|{}\0{key}", record.patient_system, record.patient_value)
}

fn transition_write(
    key: &str,
    transition: Transition,
    ehr: Vec<EhrResource>,
    sent: Option<BundleRef>,
) -> Write {
    Write::Transition {
        key: key.to_string(),
        transition,
        ehr,
        sent,
    }
}

fn requeue_write(key: &str, at: &str) -> Write {
    Write::Requeue {
        key: key.to_string(),
        at: at.to_string(),
    }
}

fn accepted(w: Written) -> Result<Accepted, StoreError> {
    match w {
        Written::Accepted(a) => Ok(a),
        _ => Err(StoreError::Failed(
            "the writer answered another write".into(),
        )),
    }
}

/// Where a submission's Bundle is in the Bundle log: in its record, or (accepted by a version
/// that kept the place in a tree of its own) in `bundle_at`; `None`: in sled's `bundles` tree
/// (the earliest versions), or nowhere.
fn bundle_place(
    trees: &Trees,
    key: &[u8],
    stored_record: Option<&[u8]>,
) -> Result<Option<bundles::BundleAt>, StoreError> {
    if let Some(at) = stored_record.and_then(|r| split_stored(r).0) {
        return Ok(Some(at));
    }
    trees
        .bundle_at
        .get(key)?
        .map(|at| {
            bundles::BundleAt::from_bytes(&at).ok_or_else(|| {
                corrupt(
                    &String::from_utf8_lossy(key),
                    "its Bundle's place is unreadable".into(),
                )
            })
        })
        .transpose()
}

/// Whether a stored record says its submission was delivered (or acknowledged): its Bundle is
/// no longer needed once past the retention. An unreadable record counts as not delivered.
fn delivered(key: &str, stored: &[u8]) -> bool {
    decode(key, stored)
        .is_ok_and(|r| matches!(r.state(), Some(State::Delivered | State::Acknowledged)))
}

/// Whether a submission (its stored record; its Bundle at `at`) can no longer be replayed: it
/// was delivered and its Bundle in the log is gone or expiring. A sweep moves the Bundles of
/// the others before it drops their segment; a Bundle still in sled's `bundles` tree moves
/// into the log first.
fn replay_expired(trees: &Trees, at: Option<bundles::BundleAt>, key: &str, stored: &[u8]) -> bool {
    at.is_some_and(|at| !trees.bundles.keeps(at)) && delivered(key, stored)
}

fn requeued(w: Written) -> Result<Requeued, StoreError> {
    match w {
        Written::Expired => Ok(Requeued::Expired),
        w => Ok(match record(w)? {
            Some(r) => Requeued::Waiting(Box::new(r)),
            None => Requeued::Unknown,
        }),
    }
}

fn record(w: Written) -> Result<Option<SubmissionRecord>, StoreError> {
    match w {
        Written::Record(r) => Ok(r.map(|r| *r)),
        _ => Err(StoreError::Failed(
            "the writer answered another write".into(),
        )),
    }
}

/// The first bytes of a record as sled keeps it since the Bundle's place moved into it: as the
/// LZ4 size prefix of a record of earlier versions they would announce a 4 GiB record.
const RECORD_MAGIC: [u8; 4] = [0xff; 4];

/// A record as sled keeps it: `RECORD_MAGIC`, where its Bundle is in the Bundle log, then the
/// encoded record — one value, so that accepting a submission writes one key fewer. `None`:
/// the encoded record alone, as earlier versions wrote it (their Bundle's place is in
/// `bundle_at`); such a record keeps that form when a transition rewrites it.
fn stored(at: Option<bundles::BundleAt>, record: &[u8]) -> Vec<u8> {
    let Some(at) = at else {
        return record.to_vec();
    };
    let mut v = Vec::with_capacity(RECORD_MAGIC.len() + bundles::BundleAt::LEN + record.len());
    v.extend_from_slice(&RECORD_MAGIC);
    v.extend_from_slice(&at.to_bytes());
    v.extend_from_slice(record);
    v
}

/// What `stored` put together: the Bundle's place (if kept there) and the encoded record.
fn split_stored(value: &[u8]) -> (Option<bundles::BundleAt>, &[u8]) {
    value
        .strip_prefix(&RECORD_MAGIC)
        .and_then(|rest| rest.split_at_checked(bundles::BundleAt::LEN))
        .and_then(|(at, record)| Some((bundles::BundleAt::from_bytes(at)?, record)))
        .map_or((None, value), |(at, record)| (Some(at), record))
}

/// Records (and Bundles) are stored as LZ4-compressed JSON: it shrinks about fourfold, and
/// sled's cost (and write amplification) grows with value size.
fn encode(record: &SubmissionRecord) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(record).map_err(|source| StoreError::Corrupt {
        key: record.key(),
        source,
    })?;
    Ok(lz4_flex::compress_prepend_size(&json))
}

fn decode(key: &str, bytes: &[u8]) -> Result<SubmissionRecord, StoreError> {
    let corrupt = |source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    };
    let json = lz4_flex::decompress_size_prepended(split_stored(bytes).1)
        .map_err(|e| corrupt(serde::de::Error::custom(format!("not LZ4: {e}"))))?;
    serde_json::from_slice(&json).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLE: &[u8] = br#"{"resourceType":"Bundle","type":"transaction"}"#;

    fn record(submission_id: &str) -> SubmissionRecord {
        SubmissionRecord {
            mapping_id: "m".into(),
            mapping_version: "1".into(),
            mapping_sha256: "ab".repeat(32),
            submission_id: submission_id.into(),
            payload_sha256: "cd".repeat(32),
            patient_system: "s".into(),
            patient_value: "v".into(),
            flags: vec![],
            missing: vec![],
            transitions: vec![Transition {
                state: State::Mapped,
                at: "2026-01-01T00:00:00Z".into(),
                detail: None,
            }],
            ehr: vec![],
            earlier_payloads: vec![],
        }
    }

    #[test]
    fn each_resource_the_ehr_stored_is_listed_once_at_its_latest_version() {
        let at = |kind: &str, id: &str, version: &str| EhrResource {
            resource_type: kind.into(),
            id: id.into(),
            version: Some(version.into()),
            etag: Some(format!("W/\"{version}\"")),
        };
        let mut r = record("s1");
        r.stored_in_ehr(&[at("Patient", "p", "1"), at("Observation", "o", "1")]);
        // A revision: the Observation amended, the same id in another type, a new Provenance.
        r.stored_in_ehr(&[
            at("Patient", "p", "1"),
            at("Observation", "o", "2"),
            at("Provenance", "o", "1"),
        ]);
        assert_eq!(
            r.ehr,
            [
                at("Patient", "p", "1"),
                at("Observation", "o", "2"),
                at("Provenance", "o", "1")
            ]
        );
    }

    /// A store in `dir` holding `(tree, key, value)`s written straight to sled, as an earlier
    /// version (or damage) left them.
    fn as_written_before(dir: &Path, values: &[(&str, &str, &[u8])]) {
        let db = sled::open(dir).unwrap();
        for (tree, key, value) in values {
            db.open_tree(tree).unwrap().insert(key, *value).unwrap();
        }
        db.flush().unwrap();
    }

    fn delivered() -> Transition {
        Transition {
            state: State::Delivered,
            at: "2026-01-01T00:00:01Z".into(),
            detail: None,
        }
    }

    /// A new record carries its Bundle's place; one written the earlier way (the place in
    /// `bundle_at`) is still read, delivered and rewritten in its own form.
    #[test]
    fn records_with_and_without_their_bundles_place_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let old = record("old");
        let (_, mut log) = bundles::BundleLog::open(
            &dir.path().join("bundles"),
            &dir.path().join("bundles.log"),
            1 << 20,
        )
        .unwrap();
        let at = log
            .append(&[&lz4_flex::compress_prepend_size(BUNDLE)])
            .unwrap()[0];
        drop(log);
        let (key, encoded) = (old.key(), encode(&old).unwrap());
        as_written_before(
            dir.path(),
            &[
                ("submissions", &key, &encoded),
                ("bundle_at", &key, &at.to_bytes()),
                ("outbox", &key, &[]),
            ],
        );
        let store = Store::open(dir.path()).unwrap();
        let new = record("new");
        assert_eq!(store.accept(&new, BUNDLE).unwrap(), Accepted::New);
        assert!(store.trees.bundle_at.get(new.key()).unwrap().is_none());
        for r in [&old, &new] {
            let key = r.key();
            assert_eq!(store.get(&key).unwrap().as_ref(), Some(r));
            assert_eq!(store.bundle(&key).unwrap().as_deref(), Some(BUNDLE));
            let after = store
                .transition(&key, delivered(), vec![])
                .unwrap()
                .unwrap();
            assert_eq!(after.state(), Some(State::Delivered));
            assert_eq!(store.get(&key).unwrap(), Some(after));
            assert_eq!(store.bundle(&key).unwrap().as_deref(), Some(BUNDLE));
            // A replay finds the Bundle kept (its place in the record, or in `bundle_at`).
            assert!(matches!(
                store.requeue(&key, "2026-01-02T00:00:00Z").unwrap(),
                Requeued::Waiting(_)
            ));
            store.transition(&key, delivered(), vec![]).unwrap();
        }
        assert_eq!(store.outbox_depth(), 0);
        let kept = store.trees.submissions.get(old.key()).unwrap().unwrap();
        assert!(!kept.starts_with(&RECORD_MAGIC));
        let kept = store.trees.submissions.get(new.key()).unwrap().unwrap();
        assert!(kept.starts_with(&RECORD_MAGIC));
    }

    /// An outbox entry without its record (a damaged store) is dropped by the transition that
    /// finds nothing to update, instead of being picked again forever.
    #[test]
    fn an_outbox_entry_without_its_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        as_written_before(dir.path(), &[("outbox", "m/orphan", &[])]);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.outbox_depth(), 1);
        assert_eq!(store.bundle("m/orphan").unwrap(), None);
        assert_eq!(
            store.transition("m/orphan", delivered(), vec![]).unwrap(),
            None
        );
        assert_eq!(store.outbox_depth(), 0);
        assert!(store.pending().is_empty());
    }
}
