//! HL7 SDC observation-based extraction, as `QuestionnaireResponse/$extract` does it: a
//! QuestionnaireResponse and the Questionnaire it answers become a `transaction` Bundle of
//! Observations, by the rules in SDC 4.0.0 (`notes/sdc-extraction.md`).
//!
//! - An item is extracted where `sdc-questionnaire-observationExtract` says so on it, on one of
//!   its `code` Codings (then only the flagged Codings become the code), or on its nearest
//!   ancestor (the Questionnaire itself included) that says anything; `false` turns it off
//!   below. Of the 4.0.0 codes, `component` makes an item's answers `component`s of its
//!   parent's Observation (a group's Observation has only those: a blood pressure panel);
//!   `independent`, `member` and `derived` extract the item as an Observation of its own
//!   (links between extracted Observations are not made).
//! - Each answer is an Observation of its own: `false` and `0` are answers; an unanswered item
//!   makes none. A number with `questionnaire-unit` becomes a `valueQuantity`; a decimal without
//!   one too (R4 Observations have no `valueDecimal`); a `date` becomes a `valueDateTime`.
//! - `status` final (amended for an amended response, preliminary for one in progress or
//!   stopped; one entered in error is refused), `subject`, `encounter`, `basedOn` and
//!   the Procedures of `partOf` from the response; `effectiveDateTime` — and `issued`, when it is
//!   an instant — from `authored`; `performer` from `author` where an Observation allows it;
//!   `derivedFrom` the response; the category from `sdc-questionnaire-observation-extract-category`
//!   (a lower item's replaces its ancestors').
//! - A `Provenance` (the gateway as assembler, the response as source) targets them all.
//! - A response with a business identifier yields Observations with identifiers of their own
//!   (the response's, `/<linkId path>`) written as conditional updates: extracting the same or an
//!   amended response again updates them, never duplicates. Without one, plain creates (and a
//!   warning saying so).
//!
//! `submission` takes a response to one of the mappings' Questionnaires as that mapping's
//! submission (a FHIR-native form): the same Observations, as conditional creates, with the
//! Patient, the response itself and the submission's Provenance, for the outbox to deliver.
//!
//! - A group whose Questionnaire item has a child marked `sdc-questionnaire-isSubject` is about
//!   the one that child's answer references: its Observations (and those of the groups inside
//!   it) get that subject. Without such an answer they are charted on nobody: left out, with a
//!   warning naming the group — never put on the response's subject.
//! - First the response is held against its Questionnaire (`fit`): a response that does not fit
//!   is refused (`ExtractError::Unfit`) when anything would be charted from it, and answers
//!   that must not be charted (disabled by `enableWhen`, outside their item's bounds) are left
//!   out with a warning.
//!
//! Pure logic: no HTTP, no store. What cannot be extracted is an `Issue` in the answer, not an
//! error; only input that is not a Questionnaire and a QuestionnaireResponse, a response that
//! does not fit its Questionnaire (and, for a submission, one without the identifiers it needs,
//! or not finished) is refused.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::fhir::bundle::{entry, Conditional};
use crate::fhir::{identifier_query, tag_query, urn_uuid, Issue};

use super::fit::{self, Fit};
mod definition;
mod values;

use definition::{by_link_id, define, extension, extensions, flag_of, Definition, Flag};
use values::{coding, is_a, is_instant, may_be, observation_value};

use super::questionnaire::EXTRACT_CATEGORY;

/// SDC's extension on the item whose answer (a Reference) is the subject of its group.
const IS_SUBJECT: &str =
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-isSubject";

/// What `$extract` answers: the Bundle, and what it could not extract (warnings).
#[derive(Debug)]
pub struct Extraction {
    pub bundle: Value,
    pub issues: Vec<Issue>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExtractError {
    #[error("expected a {expected}, got {got}")]
    NotA { expected: &'static str, got: String },
    #[error("the QuestionnaireResponse was entered in error: nothing is extracted from it")]
    EnteredInError,
    #[error("{0}")]
    Unidentified(&'static str),
    #[error(
        "the QuestionnaireResponse is not finished (in progress or stopped): send it completed"
    )]
    NotFinished,
    /// An identifier value that cannot be an id (`ids::check`): which one, and why.
    #[error("{0} {1}")]
    BadId(&'static str, crate::ids::IdProblem),
    /// The response does not fit its Questionnaire, or the Questionnaire is invalid
    /// (`fit::check`): every problem, each at its FHIRPath.
    #[error("the QuestionnaireResponse does not fit its Questionnaire: {}", .0.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("; "))]
    Unfit(Vec<Issue>),
}

/// Extracts `response`'s Observations by `questionnaire`'s SDC rules, with their Provenance
/// (`recorded`: now, a FHIR instant).
pub fn extract(
    questionnaire: &Value,
    response: &Value,
    recorded: &str,
) -> Result<Extraction, ExtractError> {
    let mut run = Run::new(questionnaire, response)?;
    // A response that does not fit its form is refused when anything would be charted from
    // it; a Questionnaire that marks nothing for extraction extracts nothing either way, and
    // only hears of the problems.
    if !run.fit.refusals.is_empty() {
        if run.extracts_anything() {
            return Err(ExtractError::Unfit(std::mem::take(&mut run.fit.refusals)));
        }
        let refusals = std::mem::take(&mut run.fit.refusals);
        run.issues.extend(refusals.into_iter().map(|i| Issue {
            severity: crate::fhir::outcome::IssueSeverity::Warning,
            ..i
        }));
    }
    if run.identity.is_none() {
        run.issues.push(Issue::warning(
            "incomplete",
            "the QuestionnaireResponse has no identifier (system and value): its Observations \
             are plain creates, and extracting it again creates them again",
        ));
    }
    run.observations();
    run.provenance(recorded);
    Ok(run.finish())
}

fn expect_type(v: &Value, expected: &'static str) -> Result<(), ExtractError> {
    match v.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == expected => Ok(()),
        Some(t) => Err(ExtractError::NotA {
            expected,
            got: format!("a {t}"),
        }),
        None => Err(ExtractError::NotA {
            expected,
            got: "something without a resourceType".into(),
        }),
    }
}

pub(in crate::mapping) fn items_in(v: &Value) -> &[Value] {
    v.get("item")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// How an Observation relates to its parent item's (SDC 4.0 `member`, `derived`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Link {
    Member,
    Derived,
}

impl Link {
    fn code(self) -> &'static str {
        match self {
            Link::Member => "member",
            Link::Derived => "derived",
        }
    }
}

pub(in crate::mapping) struct Run<'a> {
    pub(in crate::mapping) response: &'a Value,
    /// What the Observations are about and derived from, when not the response's own subject
    /// and the response itself as the server knows it (a submission's are in its Bundle).
    pub(in crate::mapping) subject: Option<Value>,
    pub(in crate::mapping) source: Option<Value>,
    /// Observations as conditional creates (`POST` + `ifNoneExist`), not updates: what the
    /// outbox delivers, resource by resource too (`delivery::client` knows only creates).
    pub(in crate::mapping) create_only: bool,
    /// The Observations' status, from the response's.
    pub(in crate::mapping) status: &'static str,
    definitions: HashMap<&'a str, Definition<'a>>,
    /// How the response fits its Questionnaire: what is refused, what is left out.
    pub(in crate::mapping) fit: Fit,
    /// The response's business identifier (system, value).
    pub(in crate::mapping) identity: Option<(&'a str, &'a str)>,
    pub(in crate::mapping) entries: Vec<Value>,
    pub(in crate::mapping) issues: Vec<Issue>,
    /// The FHIRPaths of answers and items not extracted (`fit`'s left out).
    pub(in crate::mapping) skip: std::collections::HashSet<String>,
    /// The Questionnaire's items by linkId (for what an item's children say of it).
    pub(in crate::mapping) questionnaire_items: HashMap<&'a str, &'a Value>,
    /// The subject of the group being walked, when an isSubject item named another.
    pub(in crate::mapping) group_subject: Option<Value>,
}

/// Whose the Observations of a group are (SDC isSubject).
enum GroupSubject {
    /// The same as around the group.
    Same,
    /// The one its isSubject item's answer references.
    Of(Value),
    /// Its isSubject item is unanswered or not a reference: nobody's, so none are made.
    Nobody,
}

/// The submission id of a QuestionnaireResponse posted as a submission: its identifier's
/// value (`submission`).
pub fn submission_id(response: &Value) -> Option<&str> {
    identity(response).map(|(_, value)| value)
}

fn identity(response: &Value) -> Option<(&str, &str)> {
    let id = response.get("identifier")?;
    // R4: 0..1 Identifier; tolerate the array form of later versions.
    let id = id.as_array().and_then(|a| a.first()).unwrap_or(id);
    Some((id.get("system")?.as_str()?, id.get("value")?.as_str()?))
}

impl<'a> Run<'a> {
    pub(in crate::mapping) fn new(
        questionnaire: &'a Value,
        response: &'a Value,
    ) -> Result<Run<'a>, ExtractError> {
        expect_type(questionnaire, "Questionnaire")?;
        expect_type(response, "QuestionnaireResponse")?;
        let status = match response.get("status").and_then(Value::as_str) {
            Some("entered-in-error") => return Err(ExtractError::EnteredInError),
            Some("amended") => "amended",
            // Not finished: what it says so far.
            Some("in-progress" | "stopped") => "preliminary",
            _ => "final",
        };
        let mut definitions = HashMap::new();
        define(
            items_in(questionnaire),
            flag_of(questionnaire),
            &extensions(questionnaire, EXTRACT_CATEGORY).collect::<Vec<_>>(),
            &mut definitions,
        );
        let fit = fit::check(questionnaire, response);
        Ok(Run {
            response,
            subject: None,
            source: None,
            create_only: false,
            status,
            definitions,
            fit,
            identity: identity(response),
            entries: Vec::new(),
            issues: Vec::new(),
            skip: std::collections::HashSet::new(),
            questionnaire_items: by_link_id(questionnaire),
            group_subject: None,
        })
    }

    /// Whether the Questionnaire marks anything for extraction that has a code to chart.
    pub(in crate::mapping) fn extracts_anything(&self) -> bool {
        self.definitions
            .values()
            .any(|d| d.flag.is_some_and(|f| f.own() || f == Flag::Component) && !d.codes.is_empty())
    }

    /// The FHIRPaths of what is left out (`fit`).
    pub(in crate::mapping) fn left_out_paths(&self) -> std::collections::HashSet<String> {
        self.fit.left_out.iter().map(|l| l.at.clone()).collect()
    }

    /// Extracts every Observation into `entries`.
    pub(in crate::mapping) fn observations(&mut self) {
        let left_out = std::mem::take(&mut self.fit.left_out);
        self.issues.extend(left_out.iter().map(fit::LeftOut::issue));
        self.skip = left_out.iter().map(|l| l.at.clone()).collect();
        self.fit.left_out = left_out;
        self.walk(
            items_in(self.response),
            "QuestionnaireResponse",
            "",
            false,
            None,
        );
        if self.entries.is_empty() {
            self.issues.push(Issue::warning(
                "not-found",
                "nothing to extract: no answered item is marked for observation extraction",
            ));
        }
    }

    /// The transaction Bundle of what was extracted (FHIR has no empty arrays).
    fn finish(self) -> Extraction {
        let mut bundle = json!({"resourceType": "Bundle", "type": "transaction"});
        if !self.entries.is_empty() {
            bundle["entry"] = Value::Array(self.entries);
        }
        Extraction {
            bundle,
            issues: self.issues,
        }
    }

    /// Walks the response's items (`at`: their FHIRPath, for issues; `path`: the linkId path
    /// that names an Observation; `parent`: the fullUrl of the Observation their parent item or
    /// answer made, if it made one).
    fn walk(
        &mut self,
        items: &'a [Value],
        at: &str,
        path: &str,
        parent_extracted: bool,
        parent: Option<&str>,
    ) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let here = format!("{at}.item[{i}]");
            if self.skip.contains(&here) {
                continue;
            }
            let Some(link_id) = item.get("linkId").and_then(Value::as_str) else {
                self.issues
                    .push(Issue::warning("structure", "an item without a linkId").at(here));
                continue;
            };
            // Repeated groups: the second and later occurrences of a linkId are numbered.
            let n = seen.entry(link_id).or_default();
            let name = if *n == 0 {
                link_id.to_string()
            } else {
                format!("{link_id}[{n}]")
            };
            *n += 1;
            let path = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            let answers = item
                .get("answer")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            // A group about someone else (SDC isSubject): its Observations are about the one its
            // subject item names — or about nobody, and left out, when it names no one.
            let outer_subject = self.group_subject.clone();
            match self.group_subject_of(link_id, item) {
                GroupSubject::Same => {}
                GroupSubject::Of(subject) => self.group_subject = Some(subject),
                GroupSubject::Nobody => {
                    self.issues.push(
                        Issue::warning(
                            "incomplete",
                            format!(
                                "group `{link_id}` is about the subject its isSubject item names, \
                                 and that answer is missing or not a reference: its Observations \
                                 are left out, not charted on the response's subject"
                            ),
                        )
                        .at(here.clone()),
                    );
                    continue;
                }
            }
            // Which answer, when there are several: the names (identifiers, fullUrls) of what is
            // extracted from it, and from under it, stay unique.
            let answer_path = |k: usize| {
                if answers.len() > 1 {
                    format!("{path}#{k}")
                } else {
                    path.clone()
                }
            };
            let flag = self.definitions.get(link_id).map(|d| d.flag);
            let link = match flag {
                Some(Some(Flag::Member)) => Some(Link::Member),
                Some(Some(Flag::Derived)) => Some(Link::Derived),
                _ => None,
            };
            let link = match (link, parent) {
                (Some(link), Some(parent)) => Some((link, parent)),
                (Some(link), None) if !answers.is_empty() => {
                    self.issues.push(
                        Issue::warning(
                            "incomplete",
                            format!(
                                "item `{link_id}` is marked `{}` of its parent's Observation, \
                                 and its parent makes none: extracted on its own",
                                link.code()
                            ),
                        )
                        .at(here.clone()),
                    );
                    None
                }
                _ => None,
            };
            // The Observation(s) this item makes: of the group, or one per answer.
            let mut made: Option<String> = None;
            let mut per_answer: Vec<Option<String>> = vec![None; answers.len()];
            match flag {
                None => self.issues.push(
                    Issue::warning(
                        "not-found",
                        format!("the Questionnaire has no item `{link_id}`: not extracted"),
                    )
                    .at(here.clone()),
                ),
                // A group: one Observation of its components (a blood pressure panel) and
                // members, if it has any.
                Some(Some(f)) if f.own() && answers.is_empty() => {
                    let components = self.components(items_in(item), &here);
                    if !components.is_empty() || self.has_members(items_in(item)) {
                        made = self.observation(link_id, None, components, &path, &here, link);
                    }
                }
                Some(Some(f)) if f.own() => {
                    for (k, answer) in answers.iter().enumerate() {
                        let name = answer_path(k);
                        let at = format!("{here}.answer[{k}]");
                        if self.skip.contains(&at) {
                            continue;
                        }
                        let components = self.components(items_in(answer), &at);
                        per_answer[k] =
                            self.observation(link_id, Some(answer), components, &name, &at, link);
                    }
                }
                // Taken by the parent's Observation (`components`).
                Some(Some(Flag::Component)) if parent_extracted => {}
                Some(Some(Flag::Component)) if !answers.is_empty() => self.issues.push(
                    Issue::warning(
                        "incomplete",
                        format!(
                            "item `{link_id}` is a component of its parent's Observation, \
                             and its parent makes none: not extracted"
                        ),
                    )
                    .at(here.clone()),
                ),
                Some(_) => {}
            }
            let extracted = flag.flatten().is_some_and(Flag::own);
            // Children: of a group directly, of a question under each answer.
            self.walk(items_in(item), &here, &path, extracted, made.as_deref());
            for (k, answer) in answers.iter().enumerate() {
                let at = format!("{here}.answer[{k}]");
                if self.skip.contains(&at) {
                    continue;
                }
                let parent = per_answer[k].as_deref();
                self.walk(items_in(answer), &at, &answer_path(k), extracted, parent);
            }
            self.group_subject = outer_subject;
        }
    }

    /// Whose a response item's group is: the same subject as around it, unless its
    /// Questionnaire item has a child marked `sdc-questionnaire-isSubject` — then the one that
    /// child's answer references, or nobody.
    fn group_subject_of(&self, link_id: &str, item: &Value) -> GroupSubject {
        let Some(marked) = self
            .questionnaire_items
            .get(link_id)
            .into_iter()
            .flat_map(|q| items_in(q))
            .find(|child| extension(child, IS_SUBJECT) == Some(&Value::Bool(true)))
            .and_then(|child| child.get("linkId").and_then(Value::as_str))
        else {
            return GroupSubject::Same;
        };
        let reference = items_in(item)
            .iter()
            .filter(|c| c.get("linkId").and_then(Value::as_str) == Some(marked))
            .flat_map(|c| {
                c.get("answer")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .find_map(|a| a.get("valueReference"))
            .filter(|r| {
                r.get("reference")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
            });
        match reference {
            Some(r) => GroupSubject::Of(r.clone()),
            None => GroupSubject::Nobody,
        }
    }

    /// Whether any of `items` is an answered `member` (its parent's Observation lists it).
    fn has_members(&self, items: &[Value]) -> bool {
        items.iter().any(|item| {
            item.get("answer")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
                && item
                    .get("linkId")
                    .and_then(Value::as_str)
                    .and_then(|l| self.definitions.get(l))
                    .is_some_and(|d| d.flag == Some(Flag::Member))
        })
    }

    /// The `Observation.component`s of the answered items among `items` marked `component`.
    fn components(&mut self, items: &'a [Value], at: &str) -> Vec<Value> {
        let mut components = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Some(def) = item
                .get("linkId")
                .and_then(Value::as_str)
                .and_then(|l| self.definitions.get(l))
                .filter(|d| d.flag == Some(Flag::Component))
            else {
                continue;
            };
            if self.skip.contains(&format!("{at}.item[{i}]")) {
                continue;
            }
            let answers = item.get("answer").and_then(Value::as_array);
            for (k, answer) in answers.into_iter().flatten().enumerate() {
                let here = format!("{at}.item[{i}].answer[{k}]");
                if self.skip.contains(&here) {
                    continue;
                }
                if def.codes.is_empty() {
                    self.issues
                        .push(Issue::warning("incomplete", "a component without a code").at(here));
                    continue;
                }
                match observation_value(answer, def.unit) {
                    Ok((key, value)) => {
                        let codes: Vec<Value> = def.codes.iter().map(|c| coding(c)).collect();
                        components.push(json!({"code": {"coding": codes}, key: value}));
                    }
                    Err(why) => self.issues.push(
                        Issue::warning("not-supported", format!("a component: {why}")).at(here),
                    ),
                }
            }
        }
        components
    }

    /// One Observation: of `answer` (its value), with `components`; a group's has only those
    /// (and its members). `link`: how it relates to its parent's Observation (that fullUrl).
    /// Its fullUrl, if it was made.
    fn observation(
        &mut self,
        link_id: &str,
        answer: Option<&'a Value>,
        components: Vec<Value>,
        name: &str,
        at: &str,
        link: Option<(Link, &str)>,
    ) -> Option<String> {
        let def = self.definitions.get(link_id)?;
        if def.codes.is_empty() {
            self.issues.push(
                Issue::warning(
                    "incomplete",
                    format!("item `{link_id}` is marked for extraction but has no code"),
                )
                .at(at),
            );
            return None;
        }
        let value = match answer.map(|a| observation_value(a, def.unit)).transpose() {
            Ok(v) => v,
            Err(why) => {
                self.issues.push(
                    Issue::warning("not-supported", format!("item `{link_id}`: {why}")).at(at),
                );
                return None;
            }
        };
        let r = self.response;
        let mut obs = Map::new();
        obs.insert("resourceType".into(), json!("Observation"));
        // Its own identifier: the response's, and where in it the answer is.
        let own = self
            .identity
            .map(|(system, value)| (system, format!("{value}/{name}")));
        if let Some((system, value)) = &own {
            obs.insert(
                "identifier".into(),
                json!([{"system": system, "value": value}]),
            );
        }
        if let Some(b) = r.get("basedOn") {
            obs.insert("basedOn".into(), b.clone());
        }
        let procedures: Vec<&Value> = r
            .get("partOf")
            .and_then(Value::as_array)
            .map_or(Vec::new(), |p| {
                p.iter().filter(|p| is_a(p, &["Procedure"])).collect()
            });
        if !procedures.is_empty() {
            obs.insert("partOf".into(), json!(procedures));
        }
        obs.insert("status".into(), json!(self.status));
        if !def.categories.is_empty() {
            obs.insert("category".into(), json!(def.categories));
        }
        let codes: Vec<Value> = def.codes.iter().map(|c| coding(c)).collect();
        obs.insert("code".into(), json!({ "coding": codes }));
        // A response may be about anything; an Observation only about these.
        if let Some(v) = self
            .group_subject
            .as_ref()
            .or(self.subject.as_ref())
            .or_else(|| {
                r.get("subject")
                    .filter(|s| may_be(s, &["Patient", "Group", "Device", "Location"]))
            })
        {
            obs.insert("subject".into(), v.clone());
        }
        if let Some(v) = r.get("encounter") {
            obs.insert("encounter".into(), v.clone());
        }
        if let Some(authored) = r.get("authored").and_then(Value::as_str) {
            obs.insert("effectiveDateTime".into(), json!(authored));
            if is_instant(authored) {
                obs.insert("issued".into(), json!(authored));
            }
        }
        if let Some(author) = r.get("author").filter(|a| {
            may_be(
                a,
                &[
                    "Practitioner",
                    "PractitionerRole",
                    "Organization",
                    "CareTeam",
                    "Patient",
                    "RelatedPerson",
                ],
            )
        }) {
            obs.insert("performer".into(), json!([author]));
        }
        if let Some((key, v)) = value {
            obs.insert(key.into(), v);
        }
        if !components.is_empty() {
            obs.insert("component".into(), Value::Array(components));
        }
        // From the response; and from the parent's Observation when `derived`.
        let sources: Vec<Value> = self
            .derived_from()
            .into_iter()
            .chain(link.and_then(|(l, parent)| {
                (l == Link::Derived).then(|| json!({ "reference": parent }))
            }))
            .collect();
        if !sources.is_empty() {
            obs.insert("derivedFrom".into(), Value::Array(sources));
        }
        let full_url = urn_uuid(&[
            "sdc-extract",
            self.identity.map_or("", |i| i.0),
            self.identity.map_or("", |i| i.1),
            r.get("id").and_then(Value::as_str).unwrap_or(""),
            name,
        ]);
        let conditional = own.map(|(system, value)| {
            let query = identifier_query(system, &value);
            if self.create_only {
                Conditional::Create {
                    if_none_exist: query,
                }
            } else {
                Conditional::Update { query }
            }
        });
        if let Some((Link::Member, parent)) = link {
            self.add_member(parent, &full_url);
        }
        self.entries
            .push(entry(full_url.clone(), Value::Object(obs), conditional));
        Some(full_url)
    }

    /// Lists `member` in `hasMember` of the Observation at `parent` (made before its members),
    /// where R4 orders it: before `derivedFrom` and `component`.
    fn add_member(&mut self, parent: &str, member: &str) {
        let Some(Value::Object(obs)) = self
            .entries
            .iter_mut()
            .find(|e| e["fullUrl"] == parent)
            .and_then(|e| e.get_mut("resource"))
        else {
            return;
        };
        let reference = json!({ "reference": member });
        if let Some(Value::Array(members)) = obs.get_mut("hasMember") {
            members.push(reference);
            return;
        }
        let later: Vec<(String, Value)> = ["derivedFrom", "component"]
            .into_iter()
            .filter_map(|k| obs.remove(k).map(|v| (k.to_string(), v)))
            .collect();
        obs.insert("hasMember".into(), json!([reference]));
        obs.extend(later);
    }

    /// The extracted Observations' Provenance (SDC: they SHOULD have one), when there are
    /// some and the response can be referred to. With the response's identifier it is tagged
    /// with it and written as a conditional update: one Provenance per response, however often
    /// it is extracted (R4 Provenance has no identifier).
    fn provenance(&mut self, recorded: &str) {
        let Some(source) = self.derived_from() else {
            return;
        };
        if self.entries.is_empty() {
            return;
        }
        let targets: Vec<String> = self
            .entries
            .iter()
            .filter_map(|e| e["fullUrl"].as_str().map(str::to_string))
            .collect();
        let software = concat!("chartbridge ", env!("CARGO_PKG_VERSION"));
        let mut provenance =
            crate::fhir::provenance::extracted(&targets, recorded, software, &source);
        let conditional = self.identity.map(|(system, value)| {
            provenance["meta"] = json!({"tag": [{"system": system, "code": value}]});
            Conditional::Update {
                query: tag_query(system, value),
            }
        });
        let full_url = urn_uuid(&[
            "sdc-extract-provenance",
            self.identity.map_or("", |i| i.0),
            self.identity.map_or("", |i| i.1),
            self.response
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or(""),
        ]);
        self.entries.push(entry(full_url, provenance, conditional));
    }

    /// The response as a reference: its id on the server, else its identifier.
    fn derived_from(&self) -> Option<Value> {
        if let Some(source) = &self.source {
            return Some(source.clone());
        }
        if let Some(id) = self.response.get("id").and_then(Value::as_str) {
            return Some(json!({"reference": format!("QuestionnaireResponse/{id}")}));
        }
        let (system, value) = self.identity?;
        Some(json!({"type": "QuestionnaireResponse",
                     "identifier": {"system": system, "value": value}}))
    }
}

#[cfg(test)]
mod tests;
