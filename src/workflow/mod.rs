//! The workflow layer: what happens to a submission — accepted, charted, failed, and what the
//! EHR does with it afterwards — becomes events for the CRM (its stage) and the patient portal
//! (the status the patient sees). Events, never note reading: an EHR resource is read only for
//! its structured fields (`rules`), and each receiver is sent only what it owns (`ownership`).
//!
//! Everything here is pure: given a record and a cause, the events to queue. The store queues
//! them in the same write as the change that causes them (a transactional outbox), so a crash
//! cannot separate a state change from its webhook; the outbox sends them (`delivery::webhook`).
//!
//! - `rules`: `workflows/*.yaml`, EHR resource → event, stage, status.
//! - `ownership`: `ownership.yaml`, who owns what, who is sent what.
//! - `events`: the bodies and ids of what is sent.
//! - `notification`: the shapes EHR events arrive in (Subscriptions Backport, R5, a bare
//!   resource), read into what they are about.

pub mod events;
pub mod notification;
pub mod ownership;
pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;

use crate::mapping::Mapping;
use crate::store::{Consequences, Decide, Event, Receiver, State, SubmissionRecord, Transition};
use events::{Facts, Question, Source};
pub use ownership::Ownership;
pub use rules::Rule;

/// What the CRM is told of a dead letter: the EHR's status, if it answered one, never its
/// text — an EHR's OperationOutcome may quote the values it refused. The whole reason stays in
/// the submission's status, for operators.
fn failure_summary(detail: Option<&str>) -> String {
    let status = detail.and_then(|d| {
        d.match_indices("HTTP ").find_map(|(i, _)| {
            let code = d.get(i + 5..i + 8)?;
            code.bytes().all(|b| b.is_ascii_digit()).then_some(code)
        })
    });
    match status {
        Some(code) => format!(
            "the EHR refused the submission (HTTP {code}); the reason is in its status for operators"
        ),
        None => "the submission could not be delivered; the reason is in its status for operators"
            .to_string(),
    }
}

/// The CRM's receiver name (and its system's in the ownership matrix).
pub const CRM: &str = "crm";
/// The patient portal's.
pub const PORTAL: &str = "portal";

/// The stage and status the gateway's own events set.
const SUBMITTED: (&str, &str) = ("ready_for_review", "received");
const NEEDS_INFORMATION: (&str, &str) = ("needs_information", "action_needed");
const REFILL: (&str, &str) = ("refill_requested", "received");

/// What a mapping tells the workflow: its questions' texts (for the questions the portal asks
/// again) and whether its submissions are refill requests.
#[derive(Debug, Clone, Default)]
struct MappingFacts {
    texts: HashMap<String, String>,
    refill: bool,
}

/// The loaded rules and matrix, the receivers configured, and what the mappings say.
pub struct Workflow {
    rules: Vec<Rule>,
    ownership: Ownership,
    /// The webhook receivers configured (`crm`, `portal`); events go only to these.
    receivers: Vec<Receiver>,
    mappings: HashMap<String, MappingFacts>,
}

impl Workflow {
    /// `receivers`: the names of the configured webhook receivers.
    pub fn new(
        rules: Vec<Rule>,
        ownership: Ownership,
        receivers: &[&str],
        mappings: &[Mapping],
    ) -> Workflow {
        let mappings = mappings
            .iter()
            .map(|m| {
                let texts = m
                    .all_items()
                    .into_iter()
                    .filter_map(|i| Some((i.link_id.clone(), i.text.clone()?)))
                    .collect();
                (
                    m.id.clone(),
                    MappingFacts {
                        texts,
                        refill: m.refill_request,
                    },
                )
            })
            .collect();
        Workflow {
            rules,
            ownership,
            receivers: receivers
                .iter()
                .filter_map(|r| Receiver::webhook(r).ok())
                .collect(),
            mappings,
        }
    }

    /// The webhook receivers configured.
    pub fn receivers(&self) -> &[Receiver] {
        &self.receivers
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    fn configured(&self, name: &str) -> Option<&Receiver> {
        self.receivers.iter().find(|r| r.name() == name)
    }

    /// The questions of `record`'s missing answers, with their texts from its mapping.
    pub fn questions(&self, record: &SubmissionRecord) -> Vec<Question> {
        let texts = self.mappings.get(&record.mapping_id);
        record
            .missing
            .iter()
            .map(|link_id| Question {
                link_id: link_id.clone(),
                text: texts.and_then(|m| m.texts.get(link_id).cloned()),
                reason: None,
            })
            .collect()
    }

    /// The events an accepted submission (or revision) raises, to queue with it: needs
    /// information when answers are missing, else submitted (a refill request for a refill
    /// mapping); a revision is `intake.updated`, at the stage its answers put it in.
    pub fn intake_events(
        &self,
        record: &SubmissionRecord,
        missing: &[Question],
        at: &str,
    ) -> Vec<Event> {
        if self.receivers.is_empty() {
            return Vec::new();
        }
        let refill = self
            .mappings
            .get(&record.mapping_id)
            .is_some_and(|m| m.refill);
        let revision = record.revision();
        let (kind, (stage, status)) = match (revision > 1, missing.is_empty(), refill) {
            (true, true, _) => (events::INTAKE_UPDATED, SUBMITTED),
            (true, false, _) => (events::INTAKE_UPDATED, NEEDS_INFORMATION),
            (false, false, _) => (events::INTAKE_NEEDS_INFORMATION, NEEDS_INFORMATION),
            (false, true, true) => (events::REFILL_REQUESTED, REFILL),
            (false, true, false) => (events::INTAKE_SUBMITTED, SUBMITTED),
        };
        let cause = format!("revision {revision}");
        let facts = Facts {
            kind,
            at,
            record,
            stage: Some(stage),
            status: Some(status),
            missing,
            source: None,
            failure: None,
            cause: &cause,
        };
        self.both(&facts)
    }

    /// The CRM's and the portal's events of `facts`: to each one configured, if the event sets
    /// its stage (the CRM) or status (the portal).
    fn both(&self, facts: &Facts<'_>) -> Vec<Event> {
        let mut out = Vec::new();
        for (name, sets) in [(CRM, facts.stage), (PORTAL, facts.status)] {
            let (Some(receiver), Some(_)) = (self.configured(name), sets) else {
                continue;
            };
            out.push(events::event(
                facts,
                receiver,
                self.ownership.receives(name),
                sets,
            ));
        }
        out
    }

    /// What an EHR delivery outcome causes: charted (the CRM learns the EHR's references) or
    /// failed (dead-lettered: an ops problem for the CRM, nothing for the patient).
    pub fn consequences(self: &Arc<Self>) -> Consequences {
        let this = Arc::clone(self);
        Arc::new(move |record: &SubmissionRecord, t: &Transition| {
            let Some(crm) = this.configured(CRM) else {
                return Vec::new();
            };
            let summary;
            let (kind, failure) = match t.state {
                State::Delivered => (events::INTAKE_CHARTED, None),
                State::DeadLettered => {
                    summary = failure_summary(t.detail.as_deref());
                    (events::INTAKE_FAILED, Some(summary.as_str()))
                }
                _ => return Vec::new(),
            };
            let cause = format!("revision {} {}", record.revision(), t.at);
            let missing = this.questions(record);
            let facts = Facts {
                kind,
                at: &t.at,
                record,
                stage: None,
                status: None,
                missing: &missing,
                source: None,
                failure,
                cause: &cause,
            };
            vec![events::event(
                &facts,
                crm,
                this.ownership.receives(CRM),
                None,
            )]
        })
    }

    /// The first rule that matches `resource`.
    pub fn rule_for(&self, resource: &serde_json::Value) -> Option<&Rule> {
        rules::first_match(&self.rules, resource)
    }

    /// Whether `sender` may send what `rule` is about: only its owner may.
    pub fn may_send(&self, sender: &str, rule: &Rule) -> Result<(), String> {
        match self.ownership.owner_of(&rule.about) {
            Some(owner) if owner == sender => Ok(()),
            Some(owner) => Err(format!(
                "`{}` ({}) is {owner}-owned data: `{sender}` may not send it (ownership: {})",
                rule.event,
                rule.about,
                self.ownership.file.display()
            )),
            None => Err(format!("`{}` is owned by no system", rule.about)),
        }
    }

    /// What `rule` matching the EHR resource `source` (at `at`, caused by `cause`: the
    /// notification's event or the resource's version) comes to for a submission, decided on
    /// its record in the store's write: each receiver's event, unless that receiver was last
    /// sent the same stage or status (an EHR that notifies every update of a Task sends the
    /// CRM one stage change, not one per update).
    pub fn decide(
        self: &Arc<Self>,
        rule: &Rule,
        source: Source,
        cause: String,
        at: String,
    ) -> Decide {
        let this = Arc::clone(self);
        let rule = rule.clone();
        Arc::new(move |record: &SubmissionRecord| {
            let missing = if rule.portal.as_deref() == Some(NEEDS_INFORMATION.1)
                || rule.crm.as_deref() == Some(NEEDS_INFORMATION.0)
            {
                this.questions(record)
            } else {
                Vec::new()
            };
            let facts = Facts {
                kind: &rule.event,
                at: &at,
                record,
                stage: rule.crm.as_deref(),
                status: rule.portal.as_deref(),
                missing: &missing,
                source: Some(&source),
                failure: None,
                cause: &cause,
            };
            this.both(&facts)
                .into_iter()
                .filter(|e| events::last_set(record, &e.receiver) != e.sets.as_deref())
                .collect()
        })
    }

    /// The resource types the rules name (what a poll of the EHR searches).
    pub fn resource_types(&self) -> Vec<String> {
        rules::resource_types(&self.rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EventState, SentEvent};
    use serde_json::json;

    fn workflow(receivers: &[&str]) -> Arc<Workflow> {
        let ownership = Ownership::defaults();
        let rules = rules::defaults(&ownership);
        Arc::new(Workflow::new(rules, ownership, receivers, &[]))
    }

    fn record(revision: usize) -> SubmissionRecord {
        SubmissionRecord {
            mapping_id: "m".into(),
            mapping_version: "1".into(),
            mapping_sha256: "x".into(),
            submission_id: "s".into(),
            payload_sha256: "p".into(),
            patient_system: "urn:p".into(),
            patient_value: "1".into(),
            flags: vec![],
            missing: vec![],
            transitions: vec![Transition::new(State::Mapped, "t")],
            ehr: vec![],
            earlier_payloads: vec!["e".into(); revision - 1],
            events: vec![],
        }
    }

    fn kinds(events: &[Event]) -> Vec<(&str, &str, Option<&str>)> {
        events
            .iter()
            .map(|e| (e.receiver.name(), e.kind.as_str(), e.sets.as_deref()))
            .collect()
    }

    #[test]
    fn an_accepted_submission_raises_the_event_its_answers_call_for() {
        let w = workflow(&[CRM, PORTAL]);
        let missing = [Question {
            link_id: "weight".into(),
            text: None,
            reason: None,
        }];
        assert_eq!(
            kinds(&w.intake_events(&record(1), &[], "t")),
            [
                ("crm", "intake.submitted", Some("ready_for_review")),
                ("portal", "intake.submitted", Some("received"))
            ]
        );
        assert_eq!(
            kinds(&w.intake_events(&record(1), &missing, "t")),
            [
                ("crm", "intake.needs_information", Some("needs_information")),
                ("portal", "intake.needs_information", Some("action_needed"))
            ]
        );
        assert_eq!(
            kinds(&w.intake_events(&record(2), &[], "t"))[0],
            ("crm", "intake.updated", Some("ready_for_review"))
        );
        assert!(workflow(&[]).intake_events(&record(1), &[], "t").is_empty());
        assert_eq!(
            kinds(&workflow(&[PORTAL]).intake_events(&record(1), &[], "t")).len(),
            1
        );
    }

    #[test]
    fn a_delivery_outcome_tells_the_crm_only() {
        let w = workflow(&[CRM, PORTAL]);
        let c = w.consequences();
        let r = record(1);
        let charted = c(&r, &Transition::new(State::Delivered, "t1"));
        assert_eq!(kinds(&charted), [("crm", "intake.charted", None)]);
        let failed = c(
            &r,
            &Transition::new(State::DeadLettered, "t2")
                .because("entry 2 (Observation): HTTP 422: value 81.2 is not allowed"),
        );
        assert_eq!(kinds(&failed), [("crm", "intake.failed", None)]);
        let body: serde_json::Value = serde_json::from_slice(&failed[0].body).unwrap();
        let failure = body["data"]["failure"].as_str().unwrap();
        assert!(
            failure.contains("HTTP 422") && !failure.contains("81.2"),
            "{failure}"
        );
        let lost = c(
            &r,
            &Transition::new(State::DeadLettered, "t4").because("the Bundle is not in the store"),
        );
        let body: serde_json::Value = serde_json::from_slice(&lost[0].body).unwrap();
        assert!(body["data"]["failure"]
            .as_str()
            .unwrap()
            .starts_with("the submission could not"));
        assert!(c(&r, &Transition::new(State::Failed, "t3")).is_empty());
    }

    #[test]
    fn an_ehr_event_sends_only_what_changed_for_each_receiver() {
        let w = workflow(&[CRM, PORTAL]);
        let task = json!({"resourceType": "Task", "businessStatus": {"text": "approved"}});
        let rule = w.rule_for(&task).unwrap().clone();
        let source = events::Source {
            reference: "Task/1".into(),
            version: Some("2".into()),
        };
        let decide = w.decide(&rule, source, "ehr:Task/1/_history/2".into(), "t".into());
        let mut r = record(1);
        let first = decide(&r);
        assert_eq!(
            kinds(&first),
            [
                ("crm", "decision.made", Some("approved")),
                ("portal", "decision.made", Some("approved"))
            ]
        );
        // The CRM was last sent `approved`; the portal something else since.
        for (receiver, sets) in [("crm", "approved"), ("portal", "approved"), ("portal", "x")] {
            r.events.push(SentEvent {
                receiver: receiver.into(),
                id: "evt".into(),
                kind: "k".into(),
                sets: Some(sets.into()),
                state: EventState::Delivered,
                at: "t".into(),
                detail: None,
            });
        }
        assert_eq!(
            kinds(&decide(&r)),
            [("portal", "decision.made", Some("approved"))]
        );
        assert!(w.may_send("ehr", &rule).is_ok());
        assert!(w
            .may_send("portal", &rule)
            .unwrap_err()
            .contains("ehr-owned"));
    }
}
