//! The events the CRM and the portal are sent: their ids, their bodies, and what each receiver
//! may read in them.
//!
//! A body is `{"type": "<event>", "timestamp": "<RFC 3339>", "data": {…}}` (Standard Webhooks'
//! payload shape). `data` is built from everything the gateway knows of the event, then cut to
//! the fields the receiver `receives` in the ownership matrix: the portal never gets a flag, the
//! CRM never gets the portal's status. No field ever carries an answer's value or a note's text
//! — the gateway does not keep them — so no configuration can leak them.
//!
//! An event's id (`webhook-id`) is derived from what caused it: the same cause gives the same
//! id on every attempt, replay and restart, so receivers can de-duplicate.

use serde_json::{json, Map, Value};

use super::ownership::Field;
use crate::store::{Event, Receiver, SubmissionRecord};

/// The events the gateway raises itself.
pub const INTAKE_SUBMITTED: &str = "intake.submitted";
pub const INTAKE_UPDATED: &str = "intake.updated";
pub const INTAKE_NEEDS_INFORMATION: &str = "intake.needs_information";
pub const INTAKE_CHARTED: &str = "intake.charted";
pub const INTAKE_FAILED: &str = "intake.failed";
pub const REFILL_REQUESTED: &str = "refill.requested";

/// A question the patient is asked (again): an answer missing or not charted. Never the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub link_id: String,
    /// The question's text, as the mapping words it.
    pub text: Option<String>,
    /// Why an answer given is not charted (unreadable, implausible); none when it was not given.
    pub reason: Option<String>,
}

/// The EHR resource an event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `Task/123`.
    pub reference: String,
    pub version: Option<String>,
}

/// Everything an event can say, before it is cut to a receiver's fields.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The event's type.
    pub kind: &'a str,
    /// When it happened (RFC 3339).
    pub at: &'a str,
    pub record: &'a SubmissionRecord,
    /// The CRM stage it sets.
    pub stage: Option<&'a str>,
    /// The portal status it sets.
    pub status: Option<&'a str>,
    /// The answers missing (for the CRM) and the questions to answer (for the portal).
    pub missing: &'a [Question],
    pub source: Option<&'a Source>,
    /// Why a delivery was dead-lettered.
    pub failure: Option<&'a str>,
    /// What caused it, uniquely (`revision 2`, `Task/1/_history/3`): its id derives from this.
    pub cause: &'a str,
}

/// The event `receiver` is sent of `facts`, with the `fields` it may read; what it sets is the
/// stage for the CRM, the status for the portal, and whatever `sets` says for another receiver.
pub fn event(
    facts: &Facts<'_>,
    receiver: &Receiver,
    fields: &[Field],
    sets: Option<&str>,
) -> Event {
    let key = facts.record.key();
    Event {
        receiver: receiver.clone(),
        id: event_id(receiver.name(), &key, facts.kind, facts.cause),
        kind: facts.kind.to_string(),
        sets: sets.map(str::to_string),
        body: body(facts, fields).to_string().into_bytes(),
    }
}

/// `evt_` and 32 hex digits of SHA-256 over the receiver, the submission, the event's type and
/// its cause.
pub fn event_id(receiver: &str, key: &str, kind: &str, cause: &str) -> String {
    let digest = crate::fhir::sha256_hex(format!("{receiver}\n{key}\n{kind}\n{cause}").as_bytes());
    format!("evt_{}", &digest[..32])
}

/// The body: `type`, `timestamp`, and `data` with only `fields`.
pub fn body(facts: &Facts<'_>, fields: &[Field]) -> Value {
    let r = facts.record;
    let mut data = Map::new();
    for field in fields {
        let value = match field {
            Field::Submission => json!({
                "key": r.key(),
                "mapping": r.mapping_id,
                "id": r.submission_id,
                "revision": r.revision(),
            }),
            Field::Patient => json!({"system": r.patient_system, "value": r.patient_value}),
            Field::Stage => match facts.stage {
                Some(s) => json!(s),
                None => continue,
            },
            Field::Status => match facts.status {
                Some(s) => json!(s),
                None => continue,
            },
            Field::Flags => json!(r.flags),
            Field::Missing => Value::Array(
                facts
                    .missing
                    .iter()
                    .map(|q| {
                        let mut m = json!({"link_id": q.link_id});
                        if let Some(t) = &q.text {
                            m["text"] = json!(t);
                        }
                        if let Some(why) = &q.reason {
                            m["reason"] = json!(why);
                        }
                        m
                    })
                    .collect(),
            ),
            Field::Questions => {
                if facts.missing.is_empty() {
                    continue;
                }
                Value::Array(
                    facts
                        .missing
                        .iter()
                        .map(|q| match &q.text {
                            Some(t) => json!({"link_id": q.link_id, "text": t}),
                            None => json!({"link_id": q.link_id}),
                        })
                        .collect(),
                )
            }
            Field::Ehr => Value::Array(
                r.ehr
                    .iter()
                    .map(|e| {
                        let mut m = json!({"reference": format!("{}/{}", e.resource_type, e.id)});
                        if let Some(v) = &e.version {
                            m["version"] = json!(v);
                        }
                        m
                    })
                    .collect(),
            ),
            Field::Source => match facts.source {
                Some(s) => {
                    let mut m = json!({"reference": s.reference});
                    if let Some(v) = &s.version {
                        m["version"] = json!(v);
                    }
                    m
                }
                None => continue,
            },
            Field::Failure => match facts.failure {
                Some(f) => json!(f),
                None => continue,
            },
        };
        data.insert(field.name().to_string(), value);
    }
    json!({"type": facts.kind, "timestamp": facts.at, "data": data})
}

/// What `receiver` was last sent as a stage or status for this submission, if anything.
pub fn last_set<'r>(record: &'r SubmissionRecord, receiver: &Receiver) -> Option<&'r str> {
    record
        .events
        .iter()
        .rev()
        .filter(|e| e.receiver == receiver.name())
        .find_map(|e| e.sets.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EhrResource, State, Transition};

    fn record() -> SubmissionRecord {
        SubmissionRecord {
            mapping_id: "glp1".into(),
            mapping_version: "1".into(),
            mapping_sha256: "x".into(),
            submission_id: "s-1".into(),
            payload_sha256: "p".into(),
            patient_system: "urn:clinic".into(),
            patient_value: "pt-1".into(),
            flags: vec!["contraindication_reported".into()],
            missing: vec!["weight".into()],
            transitions: vec![Transition::new(State::Mapped, "t")],
            ehr: vec![EhrResource {
                resource_type: "QuestionnaireResponse".into(),
                id: "q1".into(),
                version: Some("2".into()),
                etag: None,
            }],
            earlier_payloads: vec![],
            events: vec![],
        }
    }

    #[test]
    fn each_receiver_reads_only_its_fields() {
        let r = record();
        let missing = [Question {
            link_id: "weight".into(),
            text: Some("Your weight?".into()),
            reason: Some("outside the plausible range".into()),
        }];
        let facts = Facts {
            kind: "intake.needs_information",
            at: "2026-01-01T00:00:00Z",
            record: &r,
            stage: Some("needs_information"),
            status: Some("action_needed"),
            missing: &missing,
            source: None,
            failure: None,
            cause: "revision 1",
        };
        let o = super::super::Ownership::defaults();
        let portal = body(&facts, o.receives("portal"));
        assert_eq!(
            portal["data"],
            json!({
                "submission": {"key": "glp1/s-1", "mapping": "glp1", "id": "s-1", "revision": 1},
                "patient": {"system": "urn:clinic", "value": "pt-1"},
                "status": "action_needed",
                "questions": [{"link_id": "weight", "text": "Your weight?"}],
            })
        );
        let crm = body(&facts, o.receives("crm"));
        assert_eq!(crm["data"]["stage"], "needs_information");
        assert_eq!(crm["data"]["flags"], json!(["contraindication_reported"]));
        assert_eq!(
            crm["data"]["missing"][0]["reason"],
            "outside the plausible range"
        );
        assert_eq!(
            crm["data"]["ehr"],
            json!([{"reference": "QuestionnaireResponse/q1", "version": "2"}])
        );
        assert!(crm["data"].get("status").is_none());
        assert!(crm["data"].get("questions").is_none());
        assert_eq!(crm["type"], "intake.needs_information");
    }

    #[test]
    fn an_event_id_is_its_cause() {
        let a = event_id("crm", "m/s", "decision.made", "Task/1/_history/2");
        assert_eq!(
            a,
            event_id("crm", "m/s", "decision.made", "Task/1/_history/2")
        );
        assert_ne!(
            a,
            event_id("portal", "m/s", "decision.made", "Task/1/_history/2")
        );
        assert_ne!(
            a,
            event_id("crm", "m/s", "decision.made", "Task/1/_history/3")
        );
        assert!(a.starts_with("evt_") && a.len() == 36);
    }
}
