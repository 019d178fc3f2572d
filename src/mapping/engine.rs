//! The engine: one payload through one `Mapping` → QuestionnaireResponse, Observations,
//! Provenance (one `transaction` Bundle), ops flags and the list of missing answers.
//!
//! The answer index is built once per payload; every selector was compiled at load. Resources
//! are built directly as JSON. Errors are collected, never thrown: a payload that does not fit
//! its map yields every problem at once, each with the linkId and path, never the value.

use std::collections::HashMap;

use serde_json::Value;

use super::answers::{collect, Run};
use super::condition::Answers;
use super::resources::Resources;
use super::select::AnswerIndex;
use super::value::Answer;
use super::{ItemType, Mapping};
use crate::fhir::{Issue, OperationOutcome};
use crate::ids::{IdProblem, SubmissionId};

/// One submission as received.
#[derive(Debug, Clone, Copy)]
pub struct SubmissionInput<'p> {
    /// The parsed payload.
    pub payload: &'p Value,
    /// The raw bytes as received (their SHA-256 goes into the Provenance).
    pub raw: &'p [u8],
    /// When the gateway received it (FHIR instant); the submission time when the payload has none.
    pub received_at: &'p str,
}

/// The identity of the patient a submission is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PatientIdentity {
    pub system: String,
    pub value: String,
}

/// A required answer that is missing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MissingAnswer {
    pub link_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Why an answer given is not charted (unreadable, implausible); none when it was not
    /// given. Never the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A payload mapped to FHIR.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MappedSubmission {
    pub mapping_id: String,
    pub mapping_version: String,
    pub submission_id: String,
    pub patient: PatientIdentity,
    pub authored: String,
    pub payload_sha256: String,
    /// Ops flags raised (names, in mapping order); `more_information_needed` when answers are missing.
    pub flags: Vec<String>,
    pub missing: Vec<MissingAnswer>,
    /// Warnings (missing answers, totals not computed); never values.
    #[serde(skip)]
    pub warnings: Vec<Issue>,
    /// The `transaction` Bundle — Patient (conditional), QuestionnaireResponse, Observations,
    /// Provenance — as the JSON text stored and sent; `bundle_json()` reads it back.
    #[serde(serialize_with = "as_json")]
    pub bundle: Vec<u8>,
}

impl MappedSubmission {
    /// The Bundle as a `Value` (tests, the CLI, validation; not the hot path).
    pub fn bundle_json(&self) -> serde_json::Result<Value> {
        serde_json::from_slice(&self.bundle)
    }
}

/// Writes the Bundle's text as JSON (not as an array of bytes) where a `MappedSubmission` is
/// serialised whole (`chartbridge map --report`).
fn as_json<S: serde::Serializer>(bundle: &[u8], s: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    serde_json::from_slice::<Value>(bundle)
        .map_err(serde::ser::Error::custom)?
        .serialize(s)
}

/// The flag raised when required answers are missing.
pub const MORE_INFORMATION_NEEDED: &str = "more_information_needed";
/// The flag raised when an answer was kept as text because the value map does not know it.
pub const UNMAPPED_OPTION: &str = "unmapped_option";

/// Why a payload could not be mapped: every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the payload does not fit mapping `{mapping_id}`: {}", .issues.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("; "))]
pub struct MappingFailure {
    pub mapping_id: String,
    pub issues: Vec<Issue>,
}

impl MappingFailure {
    pub fn outcome(&self) -> OperationOutcome {
        OperationOutcome::new(self.issues.clone())
    }
}

impl Mapping {
    /// The submission id (idempotency key) a payload carries: `None` if it carries none,
    /// an error if what it carries cannot be an id (`ids::check`).
    pub fn submission_id(&self, payload: &Value) -> Option<Result<SubmissionId, IdProblem>> {
        let id = match self.source.submission_id.first(payload) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return None,
        };
        Some(SubmissionId::parse(id))
    }

    /// Whether a post is a submission (`accept_when`); `Err` says why not, in the mapping's
    /// words (never a payload value).
    pub fn accepts(&self, payload: &Value) -> Result<(), String> {
        let Some(accept) = &self.accept_when else {
            return Ok(());
        };
        let mut values: Answers<'_> = HashMap::new();
        for path in &accept.paths {
            let found = path
                .select(payload)
                .into_iter()
                .flat_map(|v| match v {
                    Value::Array(items) => items.iter().collect(),
                    v => vec![v],
                })
                .filter_map(super::condition::plain_answer)
                .collect();
            values.insert(path.source(), found);
        }
        if accept.condition.eval(&values) {
            Ok(())
        } else {
            Err(format!(
                "not a submission: the mapping's accept_when ({}) does not hold",
                accept.text
            ))
        }
    }

    /// Maps one payload. Pure: same input, same Bundle, byte for byte.
    pub fn map_submission(
        &self,
        input: SubmissionInput<'_>,
    ) -> Result<MappedSubmission, MappingFailure> {
        let fail = |issues| MappingFailure {
            mapping_id: self.id.clone(),
            issues,
        };
        let index = match &self.source.answers {
            None => AnswerIndex::Empty,
            Some(src) => src.index(input.payload).map_err(|e| match e {
                super::select::IndexError::NotJson { path } => fail(vec![Issue::error(
                    "structure",
                    "the answers are not a JSON document",
                )
                .at(path)]),
            })?,
        };
        let mut run = Run::new(self, index);

        let submission_id = match self.submission_id(input.payload) {
            Some(Ok(id)) => Some(id.into_string()),
            Some(Err(problem)) => {
                run.issues.push(
                    Issue::error("value", format!("the submission id {problem}"))
                        .at(self.source.submission_id.source()),
                );
                None
            }
            None => {
                run.issues.push(
                    Issue::error(
                        "required",
                        "the submission id (idempotency key) is missing or not a string",
                    )
                    .at(self.source.submission_id.source()),
                );
                None
            }
        };
        let patient_value = run.first_string(
            &self.source.patient.identifier,
            input.payload,
            "source.patient.identifier",
        );
        let patient_value = match patient_value {
            None => {
                run.issues.push(
                    Issue::error("required", "the patient identifier is missing")
                        .at("source.patient.identifier"),
                );
                None
            }
            Some(v) => match crate::ids::check(&v) {
                Ok(()) => Some(v),
                Err(problem) => {
                    run.issues.push(
                        Issue::error("value", format!("the patient identifier {problem}"))
                            .at("source.patient.identifier"),
                    );
                    None
                }
            },
        };
        let status = match &self.source.status {
            None => "completed".to_string(),
            Some(rule) => {
                let found = run.first_string(rule, input.payload, "source.status");
                match found.as_deref() {
                    None => "completed".to_string(),
                    Some(s) if super::QR_STATUSES.contains(&s) => s.to_string(),
                    Some(_) => {
                        run.issues.push(
                            Issue::error(
                                "code-invalid",
                                format!(
                                    "the response status is not one of {}; map the vendor's values in `source.status`",
                                    super::QR_STATUSES.join(", ")
                                ),
                            )
                            .at("source.status"),
                        );
                        "completed".to_string()
                    }
                }
            }
        };
        let authored = match &self.source.submitted_at {
            Some(rule) => match run
                .values(
                    rule,
                    ItemType::DateTime,
                    input.payload,
                    "source.submitted_at",
                )
                .first()
            {
                Some(Answer::DateTime(s)) => s.clone(),
                _ => input.received_at.to_string(),
            },
            None => input.received_at.to_string(),
        };

        let mut nodes = run.extract(&self.items, input.payload, "");
        let mut flat: Answers<'_> = HashMap::new();
        collect(&nodes, &mut flat);
        run.derive(&mut nodes, &mut flat);
        run.required_when(&self.items, &flat);

        if run.issues.iter().any(Issue::is_error) {
            return Err(fail(run.issues));
        }
        let (Some(submission_id), Some(patient_value)) = (submission_id, patient_value) else {
            return Err(fail(run.issues));
        };

        let mut flags = self.raised(&flat, !run.missing.is_empty());
        for flag in &run.raised {
            if !flags.iter().any(|f| f == flag) {
                flags.push(flag.to_string());
            }
        }
        for m in run.missing.iter().filter(|m| m.reason.is_none()) {
            run.issues.push(
                Issue::warning(
                    "required",
                    format!("required answer `{}` is missing", m.link_id),
                )
                .at(m.link_id.clone()),
            );
        }

        let patient = PatientIdentity {
            system: self.source.patient.system.clone(),
            value: patient_value,
        };
        let payload_sha256 = crate::fhir::sha256_hex(input.raw);
        let demographics = run.demographics(input.payload);
        let bundle = Resources {
            mapping: self,
            submission_id: &submission_id,
            patient: &patient,
            authored: &authored,
            status: &status,
            recorded: input.received_at,
            payload_sha256: &payload_sha256,
        }
        .bundle(&nodes, demographics, &mut run.issues);
        if run.issues.iter().any(Issue::is_error) {
            return Err(fail(run.issues));
        }
        Ok(MappedSubmission {
            mapping_id: self.id.clone(),
            mapping_version: self.version.clone(),
            submission_id,
            patient,
            authored,
            payload_sha256,
            flags,
            missing: run.missing,
            warnings: run.issues,
            bundle,
        })
    }
}

impl Mapping {
    /// The flags whose conditions `flat` meets, in mapping order, and
    /// `more_information_needed` when answers are `missing`.
    pub(super) fn raised(&self, flat: &Answers<'_>, missing: bool) -> Vec<String> {
        let mut flags: Vec<String> = self
            .flags
            .iter()
            .filter(|f| f.when.eval(flat))
            .map(|f| f.name.clone())
            .collect();
        if missing && !flags.iter().any(|f| f == MORE_INFORMATION_NEEDED) {
            flags.push(MORE_INFORMATION_NEEDED.to_string());
        }
        flags
    }
}
