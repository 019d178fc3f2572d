//! Building resources: the second half of mapping a payload. The answers collected (`answers`)
//! become one `transaction` Bundle — the Patient by conditional create, the
//! QuestionnaireResponse, the Observations the items declare and the submission's Provenance —
//! written directly as JSON text.

use std::borrow::Cow;

use serde_json::{json, Value};

use super::answers::{origin, Node};
use super::engine::PatientIdentity;
use super::value::{self, Answer};
use super::{Components, ItemType, Mapping};
use crate::fhir::bundle::reference;
use crate::fhir::provenance::{provenance, ProvenanceInput};
use crate::fhir::{identifier_query, urn_uuid, Conditional, Issue, Json, TransactionBuilder};

/// Everything that names the resources of one submission.
pub(super) struct Resources<'a> {
    pub mapping: &'a Mapping,
    pub submission_id: &'a str,
    pub patient: &'a PatientIdentity,
    pub authored: &'a str,
    /// The QuestionnaireResponse's status: `completed`, or `in-progress` for a form the
    /// source says is not finished (its Observations are then `preliminary`).
    pub status: &'a str,
    pub recorded: &'a str,
    pub payload_sha256: &'a str,
}

/// An Observation with its fullUrl and business identifier value.
type Keyed<'x> = (String, String, Json<'x>);

impl Resources<'_> {
    fn url(&self, kind: &str, key: &str) -> String {
        urn_uuid(&[&self.mapping.id, self.submission_id, kind, key])
    }

    /// The transaction Bundle, written as JSON text.
    pub(super) fn bundle(
        &self,
        nodes: &[Node<'_>],
        demographics: Vec<(&'static str, Json<'static>)>,
        issues: &mut Vec<Issue>,
    ) -> Vec<u8> {
        let m = self.mapping;
        let system = m.identifier_system.as_str();
        let patient_url = urn_uuid(&["Patient", &self.patient.system, &self.patient.value]);
        let qr_url = self.url("QuestionnaireResponse", "");
        let canonical = m.canonical();
        let patient_ref = || reference(patient_url.as_str(), "Patient");

        let mut tx = TransactionBuilder::new();
        let mut patient = vec![
            ("resourceType", "Patient".into()),
            (
                "identifier",
                Json::Arr(vec![Json::obj([
                    ("system", self.patient.system.as_str().into()),
                    ("value", self.patient.value.as_str().into()),
                ])]),
            ),
        ];
        patient.extend(demographics);
        tx.push(
            patient_url.as_str(),
            Json::Obj(patient),
            Conditional::Create {
                if_none_exist: identifier_query(&self.patient.system, &self.patient.value),
            },
        );

        let mut qr = Json::obj([
            ("resourceType", "QuestionnaireResponse".into()),
            (
                "identifier",
                Json::obj([
                    ("system", system.into()),
                    ("value", self.submission_id.into()),
                ]),
            ),
            ("questionnaire", canonical.as_str().into()),
            ("status", self.status.into()),
            ("subject", patient_ref()),
            ("authored", self.authored.into()),
            ("author", patient_ref()),
            ("source", patient_ref()),
        ]);
        let items = qr_items(nodes);
        if !items.is_empty() {
            qr.set("item", Json::Arr(items));
        }
        tx.push(
            qr_url.as_str(),
            qr,
            Conditional::Create {
                if_none_exist: identifier_query(system, self.submission_id),
            },
        );

        let mut observations = Vec::new();
        self.observations(nodes, &patient_url, &qr_url, &mut observations, issues);
        let mut targets = vec![(qr_url.clone(), "QuestionnaireResponse")];
        for (url, ident, obs) in observations {
            targets.push((url.clone(), "Observation"));
            tx.push(
                url,
                obs,
                Conditional::Create {
                    if_none_exist: identifier_query(system, &ident),
                },
            );
        }

        if m.review_task {
            // The provider's work item: the decision is recorded on it, in the EHR, and comes
            // back as an event. Created once (a revision matches it, never overwrites it).
            let task_id = format!("{}/review", self.submission_id);
            let status = Json::obj([
                (
                    "coding",
                    Json::Arr(vec![Json::obj([
                        ("system", crate::fhir::WORKFLOW_STATUS.into()),
                        ("code", "ready-for-review".into()),
                        ("display", "Ready for review".into()),
                    ])]),
                ),
                ("text", "Ready for review".into()),
            ]);
            let task = Json::obj([
                ("resourceType", "Task".into()),
                (
                    "identifier",
                    Json::Arr(vec![Json::obj([
                        ("system", system.into()),
                        ("value", task_id.clone().into()),
                    ])]),
                ),
                ("status", "requested".into()),
                ("businessStatus", status),
                ("intent", "order".into()),
                ("description", format!("Review: {}", m.title).into()),
                ("focus", reference(qr_url.as_str(), "QuestionnaireResponse")),
                ("for", patient_ref()),
                ("authoredOn", self.recorded.into()),
            ]);
            tx.push(
                self.url("Task", "review"),
                task,
                Conditional::Create {
                    if_none_exist: identifier_query(system, &task_id),
                },
            );
        }

        let software = concat!("chartbridge ", env!("CARGO_PKG_VERSION"));
        let mut prov = provenance(ProvenanceInput {
            targets,
            recorded: self.recorded,
            patient: &patient_url,
            submission_system: system,
            submission_id: self.submission_id,
            payload_sha256: self.payload_sha256,
            mapping_id: &m.id,
            mapping_version: &m.version,
            mapping_sha256: &m.content_sha256,
            software,
        });
        // Provenance has no identifier in R4: a tag names its submission so that a re-sent
        // Bundle matches the first one instead of creating a second Provenance.
        let tag = Json::obj([
            ("system", system.into()),
            ("code", self.submission_id.into()),
        ]);
        prov.set("meta", Json::obj([("tag", Json::Arr(vec![tag]))]));
        tx.push(
            self.url("Provenance", ""),
            prov,
            Conditional::Create {
                if_none_exist: crate::fhir::tag_query(system, self.submission_id),
            },
        );
        tx.build().to_vec(BUNDLE_CAPACITY)
    }

    fn observations<'x>(
        &'x self,
        nodes: &'x [Node<'_>],
        patient_url: &'x str,
        qr_url: &'x str,
        out: &mut Vec<Keyed<'x>>,
        issues: &mut Vec<Issue>,
    ) {
        for node in nodes {
            if let Some(rule) = &node.item.observation {
                match &rule.components {
                    Components::Children(ids) => {
                        let components: Vec<Json<'x>> = ids
                            .iter()
                            .filter_map(|id| node.children.iter().find(|c| &c.item.link_id == id))
                            .filter_map(|c| {
                                let (k, v) = c.answers.first()?.observation_value();
                                let coding = Json::Arr(vec![Json::Value(c.item.code.as_ref()?)]);
                                Some(Json::Obj(vec![
                                    ("code", Json::obj([("coding", coding)])),
                                    (k, v),
                                ]))
                            })
                            .collect();
                        if !components.is_empty() {
                            let mut obs = self.observation(node, rule, patient_url, qr_url);
                            obs.set("component", Json::Arr(components));
                            out.push(self.keyed(node, None, obs));
                        }
                    }
                    Components::Split { separator, parts } => {
                        for (i, a) in node.answers.iter().enumerate() {
                            let Answer::Str(s) = a else { continue };
                            let pieces: Vec<&str> =
                                s.split(separator.as_str()).map(str::trim).collect();
                            let numbers: Option<Vec<serde_json::Number>> =
                                pieces.iter().map(|p| value::number(&json!(p))).collect();
                            match numbers {
                                Some(ns) if ns.len() == parts.len() => {
                                    let components: Vec<Json<'x>> = ns
                                        .into_iter()
                                        .zip(parts)
                                        .map(|(n, part)| {
                                            let (code, unit) = (&part.code, &part.unit);
                                            let coding = Json::Arr(vec![Json::Value(code)]);
                                            Json::obj([
                                                ("code", Json::obj([("coding", coding)])),
                                                (
                                                    "valueQuantity",
                                                    value::quantity(Cow::Owned(n), unit),
                                                ),
                                            ])
                                        })
                                        .collect();
                                    let mut obs = self.observation(node, rule, patient_url, qr_url);
                                    obs.set("component", Json::Arr(components));
                                    out.push(self.keyed(
                                        node,
                                        (node.answers.len() > 1).then_some(i.to_string()),
                                        obs,
                                    ));
                                }
                                _ => issues.push(
                                    Issue::error(
                                        "value",
                                        format!(
                                            "expected {} numbers separated by `{separator}`",
                                            parts.len()
                                        ),
                                    )
                                    .at(node.key.clone())
                                    .at(origin(&node.item.rule)),
                                ),
                            }
                        }
                    }
                    Components::None => {
                        let multi = node.answers.len() > 1;
                        for (i, a) in node.answers.iter().enumerate() {
                            // "None of these" is an answer, not a finding; an option the
                            // map does not know (kept as text) has no code to chart.
                            if matches!(a, Answer::Coding(c) if !c.observe)
                                || (node.item.item_type == ItemType::Choice
                                    && matches!(a, Answer::Str(_)))
                            {
                                continue;
                            }
                            let (k, v) = a.observation_value();
                            let mut obs = self.observation(node, rule, patient_url, qr_url);
                            obs.set(k, v);
                            let suffix = multi.then(|| {
                                a.identity()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| i.to_string())
                            });
                            out.push(self.keyed(node, suffix, obs));
                        }
                    }
                }
            }
            self.observations(&node.children, patient_url, qr_url, out, issues);
        }
    }

    /// Gives an Observation its business identifier and fullUrl.
    fn keyed<'x>(
        &'x self,
        node: &Node<'_>,
        suffix: Option<String>,
        mut obs: Json<'x>,
    ) -> Keyed<'x> {
        let key = match suffix {
            Some(s) => format!("{}:{s}", node.key),
            None => node.key.clone(),
        };
        let ident = format!("{}/{key}", self.submission_id);
        let identifier = Json::obj([
            ("system", self.mapping.identifier_system.as_str().into()),
            ("value", ident.clone().into()),
        ]);
        obs.set("identifier", Json::Arr(vec![identifier]));
        (self.url("Observation", &key), ident, obs)
    }

    fn observation<'x>(
        &'x self,
        node: &'x Node<'_>,
        rule: &'x super::ObservationRule,
        patient_url: &'x str,
        qr_url: &'x str,
    ) -> Json<'x> {
        let mut obs = Vec::with_capacity(12);
        obs.push(("resourceType", "Observation".into()));
        let status = if self.status == "in-progress" {
            "preliminary"
        } else {
            "final"
        };
        obs.push(("status", status.into()));
        if !rule.categories.is_empty() {
            obs.push(("category", values(&rule.categories)));
        }
        let mut code = vec![("coding", values(&rule.codes))];
        if let Some(t) = &node.item.text {
            code.push(("text", t.as_str().into()));
        }
        obs.push(("code", Json::Obj(code)));
        obs.push(("subject", reference(patient_url, "Patient")));
        obs.push(("effectiveDateTime", self.authored.into()));
        obs.push(("issued", self.recorded.into()));
        obs.push((
            "performer",
            Json::Arr(vec![reference(patient_url, "Patient")]),
        ));
        obs.push((
            "derivedFrom",
            Json::Arr(vec![reference(qr_url, "QuestionnaireResponse")]),
        ));
        Json::Obj(obs)
    }
}

/// What the Bundle's text is given to grow into (a typical intake's is 10–25 KB).
const BUNDLE_CAPACITY: usize = 16 * 1024;

/// A mapping's JSON values (codes, categories) as an array, written from where they are.
fn values(vs: &[Value]) -> Json<'_> {
    Json::Arr(vs.iter().map(Json::Value).collect())
}

fn qr_items<'x>(nodes: &'x [Node<'_>]) -> Vec<Json<'x>> {
    nodes
        .iter()
        .map(|n| {
            let mut item = Vec::with_capacity(4);
            item.push(("linkId", n.item.link_id.as_str().into()));
            if let Some(t) = &n.item.text {
                item.push(("text", t.as_str().into()));
            }
            if !n.answers.is_empty() {
                let answers: Vec<Json<'x>> = n
                    .answers
                    .iter()
                    .map(|a| {
                        let (k, v) = a.qr_value();
                        Json::Obj(vec![(k, v)])
                    })
                    .collect();
                item.push(("answer", Json::Arr(answers)));
            }
            if !n.children.is_empty() {
                item.push(("item", Json::Arr(qr_items(&n.children))));
            }
            Json::Obj(item)
        })
        .collect()
}
