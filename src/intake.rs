//! Intake: one submission from arrival to acceptance — map it through its `Mapping`, record it
//! with its outbox entry and the events it raises for the CRM and the portal (`workflow`: all
//! on disk together when `accept` returns), and say what happened. Transport is the caller's:
//! this module knows nothing of HTTP.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::mapping::{Mapping, MappingFailure, SubmissionInput};
use crate::store::{
    self, Accepted, Backend, State, Store, StoreError, SubmissionRecord, Transition,
};

use crate::workflow::events::{Question, INTAKE_SUBMITTED, INTAKE_UPDATED};
use crate::workflow::Workflow;

/// How many times a revision is amended again because another revision of the same
/// submission was stored first, before the source is asked to send it again.
const REVISION_RACES: usize = 3;

/// The loaded mappings, by id, and the store they write to.
pub struct Intake {
    mappings: HashMap<String, Arc<Mapping>>,
    store: Arc<Backend>,
    workflow: Arc<Workflow>,
}

/// What the gateway tells the source about an accepted submission (no PHI).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receipt {
    /// `<mapping id>/<submission id>`: the key of the status URL.
    pub key: String,
    pub mapping_id: String,
    pub submission_id: String,
    /// `false` when the same submission had already been accepted.
    pub new: bool,
    /// Which revision of the submission is the current one: 1 until a payload that differs
    /// comes with the same submission id.
    pub revision: u32,
    pub event: &'static str,
    pub flags: Vec<String>,
    pub missing: Vec<String>,
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("no mapping `{0}`")]
    UnknownMapping(String),
    #[error(transparent)]
    Invalid(#[from] MappingFailure),
    /// A QuestionnaireResponse that cannot be a submission.
    #[error(transparent)]
    Response(#[from] crate::mapping::extract::ExtractError),
    #[error("submission {key} was revised by another request at the same moment; send it again")]
    Revision { key: String },
    /// A revision's Bundle could not be built from the earlier one (the store's or the
    /// gateway's fault).
    #[error(transparent)]
    Amend(#[from] crate::fhir::revision::RevisionError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Intake {
    pub fn new(mappings: Vec<Mapping>, store: Arc<Backend>, workflow: Arc<Workflow>) -> Intake {
        let mappings = mappings
            .into_iter()
            .map(|m| (m.id.clone(), Arc::new(m)))
            .collect();
        Intake {
            mappings,
            store,
            workflow,
        }
    }

    pub fn mapping(&self, id: &str) -> Option<&Arc<Mapping>> {
        self.mappings.get(id)
    }

    /// Every loaded mapping, in no particular order.
    pub fn mappings(&self) -> impl Iterator<Item = &Arc<Mapping>> {
        self.mappings.values()
    }

    /// The mappings whose Questionnaire a canonical names: `url` (any version) or `url|version`,
    /// as `QuestionnaireResponse.questionnaire` and `GET /Questionnaire?url=` give it.
    pub fn defining<'a>(&'a self, canonical: &'a str) -> impl Iterator<Item = &'a Arc<Mapping>> {
        let (url, version) = match canonical.split_once('|') {
            Some((url, version)) => (url, Some(version)),
            None => (canonical, None),
        };
        self.mappings()
            .filter(move |m| m.url == url && version.is_none_or(|v| m.version == v))
    }

    pub fn mapping_count(&self) -> usize {
        self.mappings.len()
    }

    pub fn store(&self) -> &Arc<Backend> {
        &self.store
    }

    /// Maps and records a submission; durable once this returns. The payload and everything
    /// built from it are dropped before the wait for the disk, on the thread that made them —
    /// but the Bundle's text, which goes to the store (its first delivery takes it from
    /// memory). `mapping` is one of `self.mapping(…)`; `payload` was parsed through its
    /// projection.
    pub async fn accept(
        &self,
        mapping: &Mapping,
        raw: impl AsRef<[u8]>,
        payload: Value,
        received_at: &str,
    ) -> Result<Receipt, IntakeError> {
        let mut mapped = mapping.map_submission(SubmissionInput {
            payload: &payload,
            raw: raw.as_ref(),
            received_at,
        })?;
        let record = record(
            mapping,
            Recorded {
                submission_id: mapped.submission_id.clone(),
                payload_sha256: mapped.payload_sha256.clone(),
                patient: (mapped.patient.system.clone(), mapped.patient.value.clone()),
                flags: mapped.flags.clone(),
                missing: mapped.missing.iter().map(|m| m.link_id.clone()).collect(),
            },
            received_at,
        );
        let missing: Vec<Question> = mapped
            .missing
            .iter()
            .map(|m| Question {
                link_id: m.link_id.clone(),
                text: m.text.clone(),
                reason: m.reason.clone(),
            })
            .collect();
        let events = self.workflow.intake_events(&record, &missing, received_at);
        let written = self
            .store
            .accept(&record, std::mem::take(&mut mapped.bundle), events);
        drop((mapped, payload, raw));
        self.answer(record, written.await?, &missing).await
    }

    /// Records a QuestionnaireResponse to one of the mappings' Questionnaires as a submission
    /// (a FHIR-native form): the response, its extracted Observations and their Provenance are
    /// what its delivery sends (`mapping::extract::submission`). Durable once this returns.
    pub async fn accept_response(
        &self,
        mapping: &Mapping,
        raw: &[u8],
        response: &Value,
        received_at: &str,
    ) -> Result<Receipt, IntakeError> {
        let payload_sha256 = crate::fhir::sha256_hex(raw);
        let submitted = crate::mapping::response::submission(
            &mapping.questionnaire(),
            response,
            crate::mapping::response::Source {
                mapping,
                payload_sha256: &payload_sha256,
                received_at,
            },
        )?;
        // The response goes to the EHR whole; what of it was not extracted is for the operators
        // (linkIds and paths, never answers).
        for issue in &submitted.issues {
            tracing::info!(
                mapping = %mapping.id,
                code = issue.code,
                at = issue.expression.first().map(String::as_str).unwrap_or(""),
                "response submission, not extracted: {}",
                issue.diagnostics
            );
        }
        let record = record(
            mapping,
            Recorded {
                submission_id: submitted.submission_id,
                payload_sha256,
                patient: submitted.patient,
                flags: submitted.flags,
                missing: submitted.missing,
            },
            received_at,
        );
        let missing = self.workflow.questions(&record);
        let events = self.workflow.intake_events(&record, &missing, received_at);
        let written = self
            .store
            .accept(&record, submitted.bundle.to_string().into_bytes(), events);
        self.answer(record, written.await?, &missing).await
    }

    /// What the source is told of what the store did with `record`: a new submission, a
    /// re-send of one (of any of its revisions), or a revision — stored here.
    async fn answer(
        &self,
        record: SubmissionRecord,
        accepted: Accepted,
        missing: &[Question],
    ) -> Result<Receipt, IntakeError> {
        match accepted {
            Accepted::New => Ok(receipt_of(&record, true)),
            Accepted::Duplicate(existing) => Ok(receipt_of(&existing, false)),
            Accepted::Conflict(existing, bundle) => {
                self.revise(record, *existing, bundle, missing).await
            }
        }
    }

    /// Stores `record` (its Bundle `bundle`, as mapped) as the next revision of `existing`:
    /// the Bundle amends what the current revision's did (`fhir::revision`), the record
    /// keeps the submission's history and EHR resources, the outbox sends the revision.
    async fn revise(
        &self,
        record: SubmissionRecord,
        mut existing: SubmissionRecord,
        bundle: Vec<u8>,
        missing: &[Question],
    ) -> Result<Receipt, IntakeError> {
        let key = record.key();
        for _ in 0..REVISION_RACES {
            let number = existing.revision().saturating_add(1);
            let earlier = self.store.current_bundle(&key)?;
            let revision = crate::fhir::revision::amend(earlier.as_deref(), &bundle, number)?;
            let past_retention = if earlier.is_none() {
                " (the earlier Bundle is past its retention)"
            } else {
                ""
            };
            let mut next = record.clone();
            next.earlier_payloads = existing.earlier_payloads.clone();
            next.earlier_payloads.push(existing.payload_sha256.clone());
            next.ehr = existing.ehr.clone();
            next.events = existing.events.clone();
            let details = [
                format!("revision {number}"),
                format!(
                    "revision {number}: {} amended, {} retracted{past_retention}",
                    revision.amended, revision.retracted
                ),
            ];
            for (t, detail) in next.transitions.iter_mut().zip(details) {
                t.detail = Some(detail);
            }
            let mut transitions = existing.transitions.clone();
            transitions.append(&mut next.transitions);
            next.transitions = transitions;
            let at = next
                .transitions
                .last()
                .map(|t| t.at.clone())
                .unwrap_or_default();
            let events = self.workflow.intake_events(&next, missing, &at);
            match self
                .store
                .revise(&next, revision.bundle, &existing.payload_sha256, events)
                .await?
            {
                Accepted::New => {
                    tracing::info!(
                        key,
                        revision = number,
                        amended = revision.amended,
                        retracted = revision.retracted,
                        "submission revised"
                    );
                    return Ok(receipt_of(&next, true));
                }
                Accepted::Duplicate(r) => return Ok(receipt_of(&r, false)),
                Accepted::Conflict(r, _) => existing = *r,
            }
        }
        Err(IntakeError::Revision { key })
    }
}

impl Intake {
    /// The receipt of this very submission (`submission_id` of `mapping`, the same bytes) if it
    /// was accepted before — what a re-send is still answered while new submissions are
    /// refused for want of room in the outbox.
    pub fn accepted_before(
        &self,
        mapping: &Mapping,
        submission_id: Option<&str>,
        raw: &[u8],
    ) -> Result<Option<Receipt>, IntakeError> {
        let Some(id) = submission_id else {
            return Ok(None);
        };
        let Some(record) = self.store.get(&store::key(&mapping.id, id))? else {
            return Ok(None);
        };
        Ok(record
            .has_payload(&crate::fhir::sha256_hex(raw))
            .then(|| receipt_of(&record, false)))
    }
}

/// What a submission's record says of it beyond its mapping and times.
struct Recorded {
    submission_id: String,
    payload_sha256: String,
    patient: (String, String),
    flags: Vec<String>,
    missing: Vec<String>,
}

/// A new submission's record: received and mapped at `received_at`.
fn record(mapping: &Mapping, r: Recorded, received_at: &str) -> SubmissionRecord {
    SubmissionRecord {
        mapping_id: mapping.id.clone(),
        mapping_version: mapping.version.clone(),
        mapping_sha256: mapping.content_sha256.clone(),
        submission_id: r.submission_id,
        payload_sha256: r.payload_sha256,
        patient_system: r.patient.0,
        patient_value: r.patient.1,
        flags: r.flags,
        missing: r.missing,
        transitions: [State::Received, State::Mapped]
            .into_iter()
            .map(|state| Transition {
                state,
                at: received_at.to_string(),
                detail: None,
            })
            .collect(),
        ehr: Vec::new(),
        earlier_payloads: Vec::new(),
        events: Vec::new(),
    }
}

/// The receipt of a recorded submission; `new` if this request recorded it.
fn receipt_of(r: &SubmissionRecord, new: bool) -> Receipt {
    Receipt {
        key: store::key(&r.mapping_id, &r.submission_id),
        mapping_id: r.mapping_id.clone(),
        submission_id: r.submission_id.clone(),
        new,
        revision: r.revision(),
        event: if r.revision() > 1 {
            INTAKE_UPDATED
        } else {
            INTAKE_SUBMITTED
        },
        flags: r.flags.clone(),
        missing: r.missing.clone(),
    }
}
