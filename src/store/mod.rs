//! The provenance store: every accepted submission, its state transitions, what the EHR answered,
//! and the outbox of deliveries still to make — embedded, in sled, on disk.
//!
//! Knows sled and its own records; nothing of HTTP, mapping files or the EHR's API. A submission
//! is written with its outbox entry (keyed by the submission, so leaving it is O(log n)) in one
//! multi-tree transaction, and `commit` makes it durable
//! (sled's flush, then an fdatasync of its data file, grouped across concurrent callers) before
//! anyone may answer 2xx. Indexes run both ways: submission ↔ EHR resource ↔ patient.

mod durability;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

pub use durability::CommitStats;
use durability::GroupCommit;

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
}

impl SubmissionRecord {
    /// The store key: `<mapping id>/<submission id>`.
    pub fn key(&self) -> String {
        key(&self.mapping_id, &self.submission_id)
    }

    pub fn state(&self) -> Option<State> {
        self.transitions.last().map(|t| t.state)
    }
}

pub fn key(mapping_id: &str, submission_id: &str) -> String {
    format!("{mapping_id}/{submission_id}")
}

/// What `accept` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Stored with an outbox entry.
    New,
    /// The same submission with the same payload was already stored: nothing written.
    Duplicate(Box<SubmissionRecord>),
    /// The same submission id with a different payload: a revision, not handled here.
    Conflict(Box<SubmissionRecord>),
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
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// The sled store.
pub struct Store {
    submissions: sled::Tree,
    /// The Bundle to deliver, as JSON bytes (LZ4): written once, read once per attempt, never
    /// decoded and re-encoded with the record's transitions.
    bundles: sled::Tree,
    outbox: sled::Tree,
    by_resource: sled::Tree,
    by_patient: sled::Tree,
    commits: GroupCommit,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let db = sled::open(dir)?;
        Ok(Store {
            submissions: db.open_tree("submissions")?,
            bundles: db.open_tree("bundles")?,
            outbox: db.open_tree("outbox")?,
            by_resource: db.open_tree("by_resource")?,
            by_patient: db.open_tree("by_patient")?,
            commits: GroupCommit::start(db, dir.join("db")),
        })
    }

    /// Stores a new submission, its Bundle (JSON bytes) and its outbox entry in one
    /// transaction, unless that submission is already there. Not durable until `commit` returns.
    pub fn accept(&self, record: &SubmissionRecord, bundle: &[u8]) -> Result<Accepted, StoreError> {
        let key = record.key();
        let bytes = encode(record)?;
        let bundle = lz4_flex::compress_prepend_size(bundle);
        let patient_key = format!("{}|{}\0{key}", record.patient_system, record.patient_value);
        let outcome = (
            &self.submissions,
            &self.bundles,
            &self.outbox,
            &self.by_patient,
        )
            .transaction(|(subs, bundles, outbox, patients)| {
                if let Some(existing) = subs.get(key.as_bytes())? {
                    let existing =
                        decode(&key, &existing).map_err(ConflictableTransactionError::Abort)?;
                    return Ok(if existing.payload_sha256 == record.payload_sha256 {
                        Accepted::Duplicate(Box::new(existing))
                    } else {
                        Accepted::Conflict(Box::new(existing))
                    });
                }
                subs.insert(key.as_bytes(), bytes.as_slice())?;
                bundles.insert(key.as_bytes(), bundle.as_slice())?;
                outbox.insert(key.as_bytes(), &[])?;
                patients.insert(patient_key.as_bytes(), &[])?;
                Ok(Accepted::New)
            })?;
        Ok(outcome)
    }

    /// Makes everything written so far durable; concurrent callers share one flush.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.commits.wait()
    }

    /// `commit` for async callers: the task waits, no thread is parked.
    pub async fn commit_async(&self) -> Result<(), StoreError> {
        self.commits.wait_async().await
    }

    /// Commits asked for, flush rounds made, time in flush and fdatasync.
    pub fn commit_stats(&self) -> CommitStats {
        self.commits.stats()
    }

    pub fn get(&self, key: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        self.submissions
            .get(key.as_bytes())?
            .map(|b| decode(key, &b))
            .transpose()
    }

    /// The Bundle of a submission, as the JSON bytes that were accepted.
    pub fn bundle(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.bundles.get(key.as_bytes())? {
            None => Ok(None),
            Some(b) => lz4_flex::decompress_size_prepended(&b)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: key.to_string(),
                    source: serde::de::Error::custom(format!("bundle is not LZ4: {e}")),
                }),
        }
    }

    /// Appends a transition (and, once delivered, the EHR's resources) and, when the
    /// submission leaves the outbox (delivered or dead-lettered), removes its entry.
    pub fn transition(
        &self,
        key: &str,
        transition: Transition,
        ehr: Vec<EhrResource>,
    ) -> Result<Option<SubmissionRecord>, StoreError> {
        let leaves_outbox = matches!(
            transition.state,
            State::Delivered | State::DeadLettered | State::Acknowledged
        );
        let updated = (&self.submissions, &self.outbox, &self.by_resource).transaction(
            |(subs, outbox, resources)| {
                let Some(bytes) = subs.get(key.as_bytes())? else {
                    return Ok(None);
                };
                let mut record =
                    decode(key, &bytes).map_err(ConflictableTransactionError::Abort)?;
                record.transitions.push(transition.clone());
                for r in &ehr {
                    resources.insert(
                        format!("{}/{}", r.resource_type, r.id).as_bytes(),
                        key.as_bytes(),
                    )?;
                }
                record.ehr.extend(ehr.iter().cloned());
                subs.insert(
                    key.as_bytes(),
                    encode(&record).map_err(ConflictableTransactionError::Abort)?,
                )?;
                if leaves_outbox {
                    outbox.remove(key.as_bytes())?;
                }
                Ok(Some(record))
            },
        )?;
        Ok(updated)
    }

    /// Puts a submission back in the outbox (a replay), with a transition saying so. `None`
    /// when there is no such submission; a submission already waiting stays there once.
    pub fn requeue(&self, key: &str, at: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        let transition = Transition {
            state: State::Mapped,
            at: at.to_string(),
            detail: Some("replay requested".into()),
        };
        let updated = (&self.submissions, &self.outbox).transaction(|(subs, outbox)| {
            let Some(bytes) = subs.get(key.as_bytes())? else {
                return Ok(None);
            };
            let mut record = decode(key, &bytes).map_err(ConflictableTransactionError::Abort)?;
            record.transitions.push(transition.clone());
            subs.insert(
                key.as_bytes(),
                encode(&record).map_err(ConflictableTransactionError::Abort)?,
            )?;
            outbox.insert(key.as_bytes(), &[])?;
            Ok(Some(record))
        })?;
        Ok(updated)
    }

    /// How many deliveries wait in the outbox.
    pub fn outbox_depth(&self) -> usize {
        self.outbox.len()
    }

    /// Keys of the submissions waiting in the outbox (in key order).
    pub fn pending(&self) -> Result<Vec<String>, StoreError> {
        self.pending_where(usize::MAX, |_| true)
    }

    /// Up to `limit` waiting keys that `want` accepts; stops reading once it has them.
    pub fn pending_where(
        &self,
        limit: usize,
        mut want: impl FnMut(&str) -> bool,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for key in self.outbox.iter().keys() {
            if out.len() >= limit {
                break;
            }
            let key = String::from_utf8_lossy(&key?).into_owned();
            if want(&key) {
                out.push(key);
            }
        }
        Ok(out)
    }

    /// The submission that produced an EHR resource (`Observation/123`).
    pub fn by_resource(&self, reference: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        match self.by_resource.get(reference.as_bytes())? {
            Some(key) => self.get(&String::from_utf8_lossy(&key)),
            None => Ok(None),
        }
    }

    /// Keys of a patient's submissions.
    pub fn by_patient(&self, system: &str, value: &str) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{system}|{value}\0");
        self.by_patient
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| {
                k.map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
                    .map_err(StoreError::from)
            })
            .collect()
    }
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
    let json = lz4_flex::decompress_size_prepended(bytes)
        .map_err(|e| corrupt(serde::de::Error::custom(format!("not LZ4: {e}"))))?;
    serde_json::from_slice(&json).map_err(corrupt)
}
