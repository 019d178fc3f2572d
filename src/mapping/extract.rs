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
use super::plausible::IMPLAUSIBLE_VALUE;
use super::questionnaire::{EXTRACT_CATEGORY, OBSERVATION_EXTRACT, QUESTIONNAIRE_UNIT};

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

/// Whether (and how) an item is extracted, as its nearest word on it says (SDC 4.0's codes:
/// `independent` is `Extract`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Flag {
    Extract,
    Component,
    /// An Observation of its own that its parent's Observation lists in `hasMember`.
    Member,
    /// An Observation of its own, `derivedFrom` its parent's Observation.
    Derived,
    Off,
}

impl Flag {
    /// Whether the item makes an Observation of its own.
    fn own(self) -> bool {
        matches!(self, Flag::Extract | Flag::Member | Flag::Derived)
    }
}

/// What the Questionnaire says of one item, its ancestors' words applied.
struct Definition<'q> {
    flag: Option<Flag>,
    /// The Codings the Observation's code is made of.
    codes: Vec<&'q Value>,
    /// `Observation.category`: the item's own, else its nearest ancestor's.
    categories: Vec<&'q Value>,
    unit: Option<&'q Value>,
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

/// A QuestionnaireResponse posted as a submission (a FHIR-native form): what the store records
/// of it, and the Bundle its delivery sends.
#[derive(Debug)]
pub struct ResponseSubmission {
    /// The response's identifier value.
    pub submission_id: String,
    /// The patient's identifier (system, value), from the response's subject.
    pub patient: (String, String),
    /// The Patient (conditional create by identifier), the response (conditional create by
    /// its identifier, its subject that Patient), its extracted Observations and the
    /// submission's Provenance.
    pub bundle: Value,
    /// What could not be extracted.
    pub issues: Vec<Issue>,
    /// The linkIds of required questions left unanswered (`missing_answers`, and what the
    /// mapping's `required_when` asks for).
    pub missing: Vec<String>,
    /// The mapping's ops flags its answers raise (`Mapping::response_signals`).
    pub flags: Vec<String>,
}

/// Where a response submission comes from, for its Provenance.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub mapping: &'a super::Mapping,
    /// SHA-256 (hex) of the bytes as received.
    pub payload_sha256: &'a str,
    /// When it was received (FHIR instant).
    pub received_at: &'a str,
}

/// `response` (to `questionnaire`) as a submission: it needs an identifier (the submission id:
/// a re-sent response is told from a new one by it) and a subject known by identifier (the
/// patient the store indexes it by), and must be completed or amended.
pub fn submission(
    questionnaire: &Value,
    response: &Value,
    source: Source<'_>,
) -> Result<ResponseSubmission, ExtractError> {
    let mut run = Run::new(questionnaire, response)?;
    if !run.fit.refusals.is_empty() {
        return Err(ExtractError::Unfit(std::mem::take(&mut run.fit.refusals)));
    }
    let (system, value) = run.identity.ok_or(ExtractError::Unidentified(
        "the QuestionnaireResponse has no identifier (system and value): it is the \
         submission id",
    ))?;
    if run.status == "preliminary" {
        return Err(ExtractError::NotFinished);
    }
    let patient = response
        .get("subject")
        .and_then(|s| s.get("identifier"))
        .and_then(|i| Some((i.get("system")?.as_str()?, i.get("value")?.as_str()?)))
        .ok_or(ExtractError::Unidentified(
            "the QuestionnaireResponse's subject has no identifier (system and value): the \
             patient is found and indexed by it",
        ))?;
    crate::ids::check(value)
        .map_err(|p| ExtractError::BadId("the QuestionnaireResponse's identifier value", p))?;
    crate::ids::check(patient.1)
        .map_err(|p| ExtractError::BadId("the subject's identifier value", p))?;
    let patient_url = urn_uuid(&["sdc-submission-patient", patient.0, patient.1]);
    let response_url = urn_uuid(&["sdc-submission-response", system, value]);
    let subject = json!({"reference": patient_url, "type": "Patient"});
    // What is not charted is not sent either: the response goes without its left-out answers.
    let mut qr = without(response, &run.left_out_paths());
    if let Some(o) = qr.as_object_mut() {
        // The EHR's to assign.
        o.remove("id");
        o.remove("meta");
        o.insert("subject".into(), subject.clone());
    }
    run.subject = Some(subject);
    run.create_only = true;
    run.source = Some(json!({"reference": response_url, "type": "QuestionnaireResponse"}));
    run.observations();
    let mut entries = vec![
        entry(
            patient_url.clone(),
            json!({"resourceType": "Patient",
                   "identifier": [{"system": patient.0, "value": patient.1}]}),
            Some(Conditional::Create {
                if_none_exist: identifier_query(patient.0, patient.1),
            }),
        ),
        entry(
            response_url.clone(),
            qr,
            Some(Conditional::Create {
                if_none_exist: identifier_query(system, value),
            }),
        ),
    ];
    let mut targets = vec![(response_url, "QuestionnaireResponse")];
    targets.extend(
        run.entries
            .iter()
            .filter_map(|e| Some((e["fullUrl"].as_str()?.to_string(), "Observation"))),
    );
    entries.append(&mut run.entries);
    let m = source.mapping;
    let mut provenance =
        crate::fhir::provenance::provenance(crate::fhir::provenance::ProvenanceInput {
            targets,
            recorded: source.received_at,
            patient: &patient_url,
            submission_system: system,
            submission_id: value,
            payload_sha256: source.payload_sha256,
            mapping_id: &m.id,
            mapping_version: &m.version,
            mapping_sha256: &m.content_sha256,
            software: concat!("chartbridge ", env!("CARGO_PKG_VERSION")),
        })
        .to_value();
    // Provenance has no identifier in R4: tagged with the submission, matched by the tag (as
    // the mapping engine's).
    provenance["meta"] = json!({"tag": [{"system": system, "code": value}]});
    entries.push(entry(
        urn_uuid(&["sdc-submission-provenance", system, value]),
        provenance,
        Some(Conditional::Create {
            if_none_exist: tag_query(system, value),
        }),
    ));
    // Flags from what is charted; what was left out is missing, for the CRM to ask again.
    let charted = without(response, &run.left_out_paths());
    let mut missing = missing_answers(questionnaire, &charted);
    for left in &run.fit.left_out {
        if !missing.contains(&left.link_id) {
            missing.push(left.link_id.clone());
        }
    }
    let mut signals = m.response_signals(&charted, missing);
    let implausible = run
        .fit
        .left_out
        .iter()
        .any(|l| matches!(l.why, fit::Why::OutOfRange(_)));
    if implausible && !signals.flags.iter().any(|f| f == IMPLAUSIBLE_VALUE) {
        signals.flags.push(IMPLAUSIBLE_VALUE.to_string());
    }
    Ok(ResponseSubmission {
        missing: signals.missing,
        flags: signals.flags,
        submission_id: value.to_string(),
        patient: (patient.0.to_string(), patient.1.to_string()),
        bundle: json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        issues: run.issues,
    })
}

/// The linkIds of the Questionnaire's required questions that `response` leaves unanswered,
/// in Questionnaire order. A question counts where its group does: at the top, under a
/// required group, or under a group (or answered question) the response has answers in — a
/// skipped optional section asks nothing.
pub fn missing_answers(questionnaire: &Value, response: &Value) -> Vec<String> {
    fn answered<'v>(items: &'v [Value], out: &mut std::collections::HashSet<&'v str>) {
        for item in items {
            let answers = item.get("answer").and_then(Value::as_array);
            if let (Some(id), Some(a)) = (item.get("linkId").and_then(Value::as_str), answers) {
                if !a.is_empty() {
                    out.insert(id);
                }
            }
            answered(items_in(item), out);
            for answer in answers.into_iter().flatten() {
                answered(items_in(answer), out);
            }
        }
    }
    /// Whether anything under `item` (itself included) is answered.
    fn any_answered(item: &Value, done: &std::collections::HashSet<&str>) -> bool {
        item.get("linkId")
            .and_then(Value::as_str)
            .is_some_and(|id| done.contains(id))
            || items_in(item).iter().any(|i| any_answered(i, done))
    }
    fn walk(items: &[Value], done: &std::collections::HashSet<&str>, out: &mut Vec<String>) {
        for item in items {
            let required = item.get("required").and_then(Value::as_bool) == Some(true);
            let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
            let id = item.get("linkId").and_then(Value::as_str).unwrap_or("");
            if required && !matches!(kind, "group" | "display") && !done.contains(id) {
                out.push(id.to_string());
            }
            if (required && kind == "group") || any_answered(item, done) {
                walk(items_in(item), done, out);
            }
        }
    }
    let mut done = std::collections::HashSet::new();
    answered(items_in(response), &mut done);
    let mut out = Vec::new();
    walk(items_in(questionnaire), &done, &mut out);
    // A required question its enableWhen disables is not asked, so not missing.
    let disabled = fit::disabled_items(questionnaire, response);
    out.retain(|id| !disabled.contains(id));
    out
}

/// `response` without the answers (or whole items) at `paths` (FHIRPaths as `fit` gives them).
fn without(response: &Value, paths: &std::collections::HashSet<String>) -> Value {
    fn strip(v: &mut Value, at: &str, paths: &std::collections::HashSet<String>) {
        let Some(o) = v.as_object_mut() else { return };
        if let Some(Value::Array(items)) = o.get_mut("item") {
            let mut i = 0;
            items.retain_mut(|item| {
                let here = format!("{at}.item[{i}]");
                i += 1;
                if paths.contains(&here) {
                    return false;
                }
                strip_item(item, &here, paths);
                true
            });
            if items.is_empty() {
                o.remove("item");
            }
        }
    }
    fn strip_item(item: &mut Value, here: &str, paths: &std::collections::HashSet<String>) {
        strip(item, here, paths);
        let Some(o) = item.as_object_mut() else {
            return;
        };
        if let Some(Value::Array(answers)) = o.get_mut("answer") {
            let mut k = 0;
            answers.retain_mut(|answer| {
                let at = format!("{here}.answer[{k}]");
                k += 1;
                if paths.contains(&at) {
                    return false;
                }
                strip(answer, &at, paths);
                true
            });
            if answers.is_empty() {
                o.remove("answer");
            }
        }
    }
    let mut out = response.clone();
    if !paths.is_empty() {
        strip(&mut out, "QuestionnaireResponse", paths);
    }
    out
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

fn items_in(v: &Value) -> &[Value] {
    v.get("item")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Every item of a Questionnaire by linkId (the first, where linkIds are not unique).
fn by_link_id(questionnaire: &Value) -> HashMap<&str, &Value> {
    fn walk<'q>(items: &'q [Value], out: &mut HashMap<&'q str, &'q Value>) {
        for item in items {
            if let Some(id) = item.get("linkId").and_then(Value::as_str) {
                out.entry(id).or_insert(item);
            }
            walk(items_in(item), out);
        }
    }
    let mut out = HashMap::new();
    walk(items_in(questionnaire), &mut out);
    out
}

/// The value of `v`'s extension `url`, if it has one.
fn extension<'v>(v: &'v Value, url: &'v str) -> Option<&'v Value> {
    extensions(v, url).next()
}

/// The values of `v`'s extensions `url`.
fn extensions<'v>(v: &'v Value, url: &'v str) -> impl Iterator<Item = &'v Value> {
    v.get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |e| e.get("url").and_then(Value::as_str) == Some(url))
        .filter_map(|e| {
            e.as_object()?
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| v)
        })
}

fn flag_of(v: &Value) -> Option<Flag> {
    Some(match extension(v, OBSERVATION_EXTRACT)? {
        Value::Bool(true) => Flag::Extract,
        Value::Bool(false) => Flag::Off,
        Value::String(c) if c == "component" => Flag::Component,
        Value::String(c) if c == "member" => Flag::Member,
        Value::String(c) if c == "derived" => Flag::Derived,
        Value::String(_) => Flag::Extract,
        _ => return None,
    })
}

/// Indexes the Questionnaire's items by linkId (unique within a Questionnaire), each with what
/// applies to it.
fn define<'q>(
    items: &'q [Value],
    inherited: Option<Flag>,
    categories: &[&'q Value],
    out: &mut HashMap<&'q str, Definition<'q>>,
) {
    for item in items {
        let Some(link_id) = item.get("linkId").and_then(Value::as_str) else {
            continue;
        };
        let codes: Vec<&Value> = item
            .get("code")
            .and_then(Value::as_array)
            .map_or(Vec::new(), |c| c.iter().collect());
        let flagged: Vec<&Value> = codes
            .iter()
            .copied()
            .filter(|c| flag_of(c).is_some_and(Flag::own))
            .collect();
        let flag = match flag_of(item) {
            Some(f) => Some(f),
            None => flagged.first().and_then(|c| flag_of(c)).or(inherited),
        };
        let codes = if flagged.is_empty() { codes } else { flagged };
        let own: Vec<&Value> = extensions(item, EXTRACT_CATEGORY).collect();
        let categories = if own.is_empty() {
            categories.to_vec()
        } else {
            own
        };
        define(items_in(item), flag, &categories, out);
        out.insert(
            link_id,
            Definition {
                flag,
                codes,
                categories,
                unit: extension(item, QUESTIONNAIRE_UNIT),
            },
        );
    }
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

struct Run<'a> {
    response: &'a Value,
    /// What the Observations are about and derived from, when not the response's own subject
    /// and the response itself as the server knows it (a submission's are in its Bundle).
    subject: Option<Value>,
    source: Option<Value>,
    /// Observations as conditional creates (`POST` + `ifNoneExist`), not updates: what the
    /// outbox delivers, resource by resource too (`delivery::client` knows only creates).
    create_only: bool,
    /// The Observations' status, from the response's.
    status: &'static str,
    definitions: HashMap<&'a str, Definition<'a>>,
    /// How the response fits its Questionnaire: what is refused, what is left out.
    fit: Fit,
    /// The response's business identifier (system, value).
    identity: Option<(&'a str, &'a str)>,
    entries: Vec<Value>,
    issues: Vec<Issue>,
    /// The FHIRPaths of answers and items not extracted (`fit`'s left out).
    skip: std::collections::HashSet<String>,
    /// The Questionnaire's items by linkId (for what an item's children say of it).
    questionnaire_items: HashMap<&'a str, &'a Value>,
    /// The subject of the group being walked, when an isSubject item named another.
    group_subject: Option<Value>,
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
    fn new(questionnaire: &'a Value, response: &'a Value) -> Result<Run<'a>, ExtractError> {
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
    fn extracts_anything(&self) -> bool {
        self.definitions
            .values()
            .any(|d| d.flag.is_some_and(|f| f.own() || f == Flag::Component) && !d.codes.is_empty())
    }

    /// The FHIRPaths of what is left out (`fit`).
    fn left_out_paths(&self) -> std::collections::HashSet<String> {
        self.fit.left_out.iter().map(|l| l.at.clone()).collect()
    }

    /// Extracts every Observation into `entries`.
    fn observations(&mut self) {
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

/// The resource type a Reference names (by its literal reference or its `type`), if it does.
fn named_type(reference: &Value) -> Option<&str> {
    reference
        .get("reference")
        .and_then(Value::as_str)
        .and_then(|r| r.split('/').rev().nth(1))
        .or_else(|| reference.get("type").and_then(Value::as_str))
}

/// Whether a Reference points at one of `types`.
fn is_a(reference: &Value, types: &[&str]) -> bool {
    named_type(reference).is_some_and(|t| types.contains(&t))
}

/// Whether a Reference may point at one of `types`: it does, or it does not say.
fn may_be(reference: &Value, types: &[&str]) -> bool {
    named_type(reference).is_none_or(|t| types.contains(&t))
}

/// A FHIR `instant` has a time and a zone; a `dateTime` may have neither.
fn is_instant(s: &str) -> bool {
    match s.split_once('T') {
        Some((_, time)) => time.ends_with('Z') || time.contains('+') || time.contains('-'),
        None => false,
    }
}

/// A Coding as the Observation carries it: without the Questionnaire's own extensions (the
/// extraction flag).
fn coding(c: &Value) -> Value {
    match c.as_object() {
        Some(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| k.as_str() != "extension")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => c.clone(),
    }
}

/// The Observation's `value[x]` for an answer.
fn observation_value(
    answer: &Value,
    unit: Option<&Value>,
) -> Result<(&'static str, Value), String> {
    let Some((kind, v)) = answer
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| k.starts_with("value")))
    else {
        return Err("an answer without a value".into());
    };
    let quantity = |value: &Value| {
        let mut q = Map::new();
        q.insert("value".into(), value.clone());
        if let Some(u) = unit {
            if let Some(d) = u.get("display").or_else(|| u.get("code")) {
                q.insert("unit".into(), d.clone());
            }
            if let Some(s) = u.get("system") {
                q.insert("system".into(), s.clone());
            }
            if let Some(c) = u.get("code") {
                q.insert("code".into(), c.clone());
            }
        }
        Value::Object(q)
    };
    Ok(match kind.as_str() {
        "valueBoolean" => ("valueBoolean", v.clone()),
        "valueInteger" if unit.is_some() => ("valueQuantity", quantity(v)),
        "valueInteger" => ("valueInteger", v.clone()),
        "valueDecimal" => ("valueQuantity", quantity(v)),
        "valueQuantity" => ("valueQuantity", v.clone()),
        "valueDate" | "valueDateTime" => ("valueDateTime", v.clone()),
        "valueTime" => ("valueTime", v.clone()),
        "valueString" | "valueUri" => ("valueString", v.clone()),
        "valueCoding" => (
            "valueCodeableConcept",
            match v.get("display") {
                Some(d) => json!({"coding": [v], "text": d}),
                None => json!({"coding": [v]}),
            },
        ),
        other => {
            return Err(format!(
                "a {} answer has no Observation value[x] to go to: not extracted",
                other.trim_start_matches("value")
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDED: &str = "2026-11-27T08:00:00Z";

    fn extract(q: &Value, qr: &Value) -> Result<Extraction, ExtractError> {
        super::extract(q, qr, RECORDED)
    }

    fn fixture(name: &str) -> Value {
        let path = format!("{}/fixtures/sdc/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The Bundle's entries of `resource_type`.
    fn entries<'b>(bundle: &'b Value, resource_type: &str) -> Vec<&'b Value> {
        bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["resource"]["resourceType"] == resource_type)
            .collect()
    }

    fn observations(bundle: &Value) -> Vec<&Value> {
        entries(bundle, "Observation")
            .into_iter()
            .map(|e| &e["resource"])
            .collect()
    }

    /// CSIRO's PHQ-2 sample: the Questionnaire's `false` reaches every item that says nothing;
    /// an item's `true` reaches its children; an item's own `true` under a `false` parent turns
    /// it on again.
    #[test]
    fn the_flag_is_inherited_and_false_turns_it_off_below() {
        let q = fixture("qObservationSampleWithExtractExtension.json");
        let qr = fixture("qrObservationSample.json");
        let out = extract(&q, &qr).unwrap();
        let ids: Vec<&str> = observations(&out.bundle)
            .iter()
            .map(|o| o["code"]["coding"][0]["code"].as_str().unwrap())
            .collect();
        // phq2-1, phq2-8 (inherits phq2-1's), phq2-4 (its own, under phq2-2's false), phq2-5
        // (its own); not phq2-2, phq2-6 (their own false), phq2-3 (the Questionnaire's false)
        // nor phq2-7 (phq2-3's) — the 4 CSIRO's own test expects.
        assert_eq!(ids.len(), 4, "{:#}", out.bundle);
        assert!(ids.iter().all(|c| *c == "28669007"));
        let first = observations(&out.bundle)[0];
        // As CSIRO's expected `obs-phq2-1`, field by field.
        assert_eq!(first["status"], "final");
        assert_eq!(first["subject"], json!({"reference": "Patient/123"}));
        assert_eq!(
            first["derivedFrom"],
            json!([{"reference": "QuestionnaireResponse/phq2-response"}])
        );
        assert_eq!(first["effectiveDateTime"], "2024-08-29T12:00:00Z");
        assert_eq!(first["issued"], "2024-08-29T12:00:00Z");
        assert_eq!(
            first["valueCodeableConcept"]["coding"],
            json!([{"code": "2", "display": "More than half the days"}])
        );
        assert_eq!(
            first["code"]["coding"],
            json!([{"system": "http://snomed.info/sct", "code": "28669007", "display": "Anhedonia"}])
        );
        // No identifier on the response: plain creates, and a warning that says why.
        assert!(entries(&out.bundle, "Observation")
            .iter()
            .all(|e| e["request"] == json!({"method": "POST", "url": "Observation"})));
        // Their Provenance: every one of them, from the response.
        let provenance = entries(&out.bundle, "Provenance");
        assert_eq!(provenance.len(), 1);
        assert_eq!(
            provenance[0]["request"],
            json!({"method": "POST", "url": "Provenance"})
        );
        let p = &provenance[0]["resource"];
        assert_eq!(p["recorded"], RECORDED);
        assert_eq!(
            p["entity"],
            json!([{"role": "source", "what": {"reference": "QuestionnaireResponse/phq2-response"}}])
        );
        let targets: Vec<&Value> = p["target"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["reference"])
            .collect();
        let full_urls: Vec<&Value> = entries(&out.bundle, "Observation")
            .iter()
            .map(|e| &e["fullUrl"])
            .collect();
        assert_eq!(targets, full_urls);
        assert!(out.issues.iter().any(|i| i.code == "incomplete"));
        crate::fhir::validate::validate(&out.bundle).unwrap();
    }

    /// A child's weight is charted on the child an isSubject item names — and, when that
    /// answer is missing or not a reference, on nobody: left out, with the group named.
    #[test]
    fn a_group_about_another_subject_is_charted_on_it_or_not_at_all() {
        let weight = json!([{"system": "http://loinc.org", "code": "29463-7"}]);
        let q = json!({"resourceType": "Questionnaire", "extension": flag(json!(true)), "item": [
            {"linkId": "mother-weight", "type": "decimal", "code": weight},
            {"linkId": "child", "type": "group", "repeats": true, "item": [
                {"linkId": "child-ref", "type": "reference", "extension": [{
                    "url": IS_SUBJECT, "valueBoolean": true}]},
                {"linkId": "child-weight", "type": "decimal", "code": weight}]}]});
        let child = |who: Value| {
            let mut items =
                vec![json!({"linkId": "child-weight", "answer": [{"valueDecimal": 4.1}]})];
            if !who.is_null() {
                items.insert(0, json!({"linkId": "child-ref", "answer": [who]}));
            }
            json!({"linkId": "child", "item": items})
        };
        let qr = json!({"resourceType": "QuestionnaireResponse", "status": "completed",
            "subject": {"reference": "Patient/mother"}, "item": [
                {"linkId": "mother-weight", "answer": [{"valueDecimal": 70}]},
                child(json!({"valueReference": {"reference": "Patient/baby"}})),
                child(Value::Null),
                child(json!({"valueString": "Bolade"}))]});
        let fit = fit::check(&q, &qr);
        // The third child's subject answered as text is a refusal of its own (wrong type);
        // without it, the second child still has none.
        assert_eq!(fit.refusals.len(), 1);
        let mut qr = qr;
        qr["item"].as_array_mut().unwrap().pop();
        let out = extract(&q, &qr).unwrap();
        let subjects: Vec<&Value> = out.bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "Observation")
            .map(|e| &e["resource"]["subject"]["reference"])
            .collect();
        assert_eq!(subjects, [&json!("Patient/mother"), &json!("Patient/baby")]);
        let named: Vec<&Issue> = out
            .issues
            .iter()
            .filter(|i| i.diagnostics.contains("group `child`"))
            .collect();
        assert_eq!(named.len(), 1, "{:?}", out.issues);
        assert_eq!(named[0].expression, ["QuestionnaireResponse.item[2]"]);
    }

    fn flag(on: Value) -> Value {
        let key = if on.is_boolean() {
            "valueBoolean"
        } else {
            "valueCode"
        };
        json!([{"url": OBSERVATION_EXTRACT, key: on}])
    }

    /// SDC 4.0 `member` and `derived`: a panel's Observation lists its members in `hasMember`
    /// (a group with members and no components still makes one); a derived answer's Observation
    /// is `derivedFrom` its parent's and the response; with no parent Observation, a member is
    /// extracted on its own, with a warning.
    #[test]
    fn members_and_derived_observations_are_linked_to_their_parents() {
        let loinc = |code: &str| json!([{"system": "http://loinc.org", "code": code}]);
        let q = json!({
            "resourceType": "Questionnaire", "status": "active",
            "item": [
                {"linkId": "panel", "type": "group", "code": loinc("85353-1"),
                 "extension": flag(json!(true)), "item": [
                    {"linkId": "weight", "type": "decimal", "code": loinc("29463-7"),
                     "extension": flag(json!("member"))},
                    {"linkId": "height", "type": "decimal", "code": loinc("8302-2"),
                     "extension": flag(json!("member"))},
                    {"linkId": "bmi", "type": "decimal", "code": loinc("39156-5"),
                     "extension": flag(json!("derived"))}]},
                {"linkId": "lone", "type": "group", "item": [
                    {"linkId": "pulse", "type": "integer", "code": loinc("8867-4"),
                     "extension": flag(json!("member"))}]}]
        });
        let qr = json!({
            "resourceType": "QuestionnaireResponse", "status": "completed",
            "identifier": {"system": "https://portal.example/qr", "value": "r-9"},
            "subject": {"reference": "Patient/p1"}, "authored": "2026-11-27T09:00:00Z",
            "item": [
                {"linkId": "panel", "item": [
                    {"linkId": "weight", "answer": [{"valueDecimal": 70.5}]},
                    {"linkId": "height", "answer": [{"valueDecimal": 1.75}]},
                    {"linkId": "bmi", "answer": [{"valueDecimal": 23.0}]}]},
                {"linkId": "lone", "item": [
                    {"linkId": "pulse", "answer": [{"valueInteger": 64}]}]}]
        });
        let out = extract(&q, &qr).unwrap();
        crate::fhir::validate::validate(&out.bundle).unwrap();
        let obs = entries(&out.bundle, "Observation");
        let url_of = |code: &str| {
            obs.iter()
                .find(|e| e["resource"]["code"]["coding"][0]["code"] == code)
                .map(|e| e["fullUrl"].as_str().unwrap().to_string())
                .unwrap()
        };
        let resource = |code: &str| {
            &obs.iter()
                .find(|e| e["resource"]["code"]["coding"][0]["code"] == code)
                .unwrap()["resource"]
        };
        assert_eq!(obs.len(), 5, "the panel, its three, and the pulse");
        let panel = resource("85353-1");
        assert_eq!(
            panel["hasMember"],
            json!([{"reference": url_of("29463-7")}, {"reference": url_of("8302-2")}])
        );
        assert!(panel.get("valueQuantity").is_none());
        // R4's order: hasMember before derivedFrom.
        let keys: Vec<&String> = panel.as_object().unwrap().keys().collect();
        let at = |k: &str| keys.iter().position(|x| *x == k).unwrap();
        assert!(at("hasMember") < at("derivedFrom"), "{keys:?}");
        assert_eq!(
            resource("39156-5")["derivedFrom"],
            json!([{"type": "QuestionnaireResponse",
                    "identifier": {"system": "https://portal.example/qr", "value": "r-9"}},
                   {"reference": url_of("85353-1")}])
        );
        assert!(resource("29463-7").get("hasMember").is_none());
        assert_eq!(
            resource("8867-4")["derivedFrom"].as_array().unwrap().len(),
            1
        );
        let warned: Vec<String> = out.issues.iter().map(|i| i.to_string()).collect();
        assert!(
            warned
                .iter()
                .any(|w| w.contains("`pulse` is marked `member`")),
            "{warned:?}"
        );
    }

    fn traps() -> (Value, Value) {
        let loinc = |code: &str| json!([{"system": "http://loinc.org", "code": code}]);
        let q = json!({
            "resourceType": "Questionnaire", "status": "active",
            "item": [
                {"linkId": "vitals", "type": "group", "extension": [
                    {"url": OBSERVATION_EXTRACT, "valueBoolean": true},
                    {"url": EXTRACT_CATEGORY, "valueCodeableConcept": {"coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs"}]}}],
                 "item": [
                    {"linkId": "weight", "type": "decimal", "code": loinc("29463-7"),
                     "extension": [{"url": QUESTIONNAIRE_UNIT, "valueCoding": {
                        "system": "http://unitsofmeasure.org", "code": "kg", "display": "kg"}}]},
                    {"linkId": "pulse", "type": "integer", "code": loinc("8867-4")},
                    {"linkId": "bp", "type": "group", "code": loinc("85354-9"), "item": [
                        {"linkId": "systolic", "type": "integer", "code": loinc("8480-6"),
                         "extension": flag(json!("component"))}]}]},
                {"linkId": "smoker", "type": "boolean", "code": loinc("72166-2"),
                 "extension": flag(json!(true))},
                {"linkId": "score", "type": "decimal", "code": loinc("44261-6"),
                 "extension": [
                    {"url": OBSERVATION_EXTRACT, "valueCode": "independent"},
                    {"url": EXTRACT_CATEGORY, "valueCodeableConcept": {"text": "survey"}},
                    {"url": EXTRACT_CATEGORY, "valueCodeableConcept": {"text": "mood"}}]},
                {"linkId": "symptoms", "type": "choice", "repeats": true,
                 "extension": flag(json!(true)),
                 "code": [{"system": "http://snomed.info/sct", "code": "418799008",
                           "extension": flag(json!(true))},
                          {"system": "http://example.org/local", "code": "sx"}]},
                {"linkId": "meds", "type": "group", "repeats": true, "item": [
                    {"linkId": "med-start", "type": "date", "code": loinc("80276-9"),
                     "extension": flag(json!(true))}]},
                {"linkId": "note", "type": "string", "code": loinc("48767-8"),
                 "extension": flag(json!(false))},
                {"linkId": "photo", "type": "attachment", "code": loinc("72170-4"),
                 "extension": flag(json!(true))},
                {"linkId": "unanswered", "type": "integer", "code": loinc("8310-5"),
                 "extension": flag(json!(true))},
                {"linkId": "orphan", "type": "integer", "code": loinc("8462-4"),
                 "extension": flag(json!("component"))},
                {"linkId": "drinks", "type": "choice", "repeats": true, "item": [
                    {"linkId": "per-week", "type": "integer", "code": loinc("11287-0"),
                     "extension": flag(json!(true))}]}
            ]
        });
        let qr = json!({
            "resourceType": "QuestionnaireResponse", "id": "qr-1", "status": "amended",
            "identifier": {"system": "https://forms.example.org/responses", "value": "r-7"},
            "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            "author": {"reference": "Practitioner/dr"}, "authored": "2026-11-20",
            "basedOn": [{"reference": "ServiceRequest/s1"}],
            "partOf": [{"reference": "Observation/o9"}, {"reference": "Procedure/x1"}],
            "item": [
                {"linkId": "vitals", "item": [
                    {"linkId": "weight", "answer": [{"valueDecimal": 72.50}]},
                    {"linkId": "pulse", "answer": [{"valueInteger": 0}]},
                    {"linkId": "bp", "item": [
                        {"linkId": "systolic", "answer": [{"valueInteger": 120}]}]}]},
                {"linkId": "smoker", "answer": [{"valueBoolean": false}]},
                {"linkId": "score", "answer": [{"valueDecimal": 7}]},
                {"linkId": "symptoms", "answer": [
                    {"valueCoding": {"system": "http://snomed.info/sct", "code": "25064002",
                                     "display": "Headache"}},
                    {"valueCoding": {"system": "http://snomed.info/sct", "code": "422587007",
                                     "display": "Nausea"}}]},
                {"linkId": "meds", "item": [
                    {"linkId": "med-start", "answer": [{"valueDate": "2026-10-01"}]}]},
                {"linkId": "meds", "item": [
                    {"linkId": "med-start", "answer": [{"valueDate": "2026-11-01"}]}]},
                {"linkId": "note", "answer": [{"valueString": "Ünïcode ok"}]},
                {"linkId": "photo", "answer": [{"valueAttachment": {"contentType": "image/png"}}]},
                {"linkId": "unanswered"},
                {"linkId": "orphan", "answer": [{"valueInteger": 80}]},
                {"linkId": "drinks", "answer": [
                    {"valueCoding": {"code": "beer"}, "item": [
                        {"linkId": "per-week", "answer": [{"valueInteger": 3}]}]},
                    {"valueCoding": {"code": "wine"}, "item": [
                        {"linkId": "per-week", "answer": [{"valueInteger": 2}]}]}]}
            ]
        });
        (q, qr)
    }

    fn by_code<'b>(bundle: &'b Value, code: &str) -> Vec<&'b Value> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"]["code"]["coding"][0]["code"] == code)
            .collect()
    }

    /// The traps peer engines fall into (notes/sdc-extraction.md), each answered.
    #[test]
    fn false_zero_decimals_units_and_every_answer_are_extracted() {
        let (q, qr) = traps();
        let out = extract(&q, &qr).unwrap();
        let b = &out.bundle;
        crate::fhir::validate::validate(b).unwrap();
        let weight = &by_code(b, "29463-7")[0]["resource"];
        // A number stays a number; the unit makes it a Quantity; the group's category applies.
        assert_eq!(
            weight["valueQuantity"],
            json!({"value": 72.50, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"})
        );
        assert_eq!(weight["category"][0]["coding"][0]["code"], "vital-signs");
        assert_eq!(
            by_code(b, "8867-4")[0]["resource"]["valueInteger"],
            json!(0)
        );
        assert_eq!(
            by_code(b, "72166-2")[0]["resource"]["valueBoolean"],
            json!(false)
        );
        assert!(by_code(b, "72166-2")[0]["resource"]
            .get("category")
            .is_none());
        // Every category the item names.
        assert_eq!(
            by_code(b, "44261-6")[0]["resource"]["category"],
            json!([{"text": "survey"}, {"text": "mood"}])
        );
        // A decimal without a unit: R4 has no valueDecimal.
        assert_eq!(
            by_code(b, "44261-6")[0]["resource"]["valueQuantity"],
            json!({"value": 7})
        );
        // Only the flagged Coding; each answer its own Observation.
        let symptoms = by_code(b, "418799008");
        assert_eq!(symptoms.len(), 2);
        assert_eq!(
            symptoms[0]["resource"]["code"]["coding"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(symptoms[0]["resource"]["code"]["coding"][0]
            .get("extension")
            .is_none());
        // A repeated group: one Observation per occurrence, dates as dateTimes.
        let starts = by_code(b, "80276-9");
        assert_eq!(starts.len(), 2);
        assert_eq!(starts[1]["resource"]["valueDateTime"], "2026-11-01");
        // A group of components: one panel, its value the components'.
        let bp = &by_code(b, "85354-9")[0]["resource"];
        assert_eq!(
            bp["component"],
            json!([{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                    "valueInteger": 120}])
        );
        assert_eq!(bp["category"][0]["coding"][0]["code"], "vital-signs");
        // Off, unanswered, a component (its own or without a parent Observation), an
        // attachment: none. (An answer to an item the Questionnaire has not is refused:
        // `fit`.)
        for code in ["48767-8", "8310-5", "8480-6", "8462-4", "72170-4"] {
            assert!(by_code(b, code).is_empty(), "{code}");
        }
        let codes: Vec<&str> = out.issues.iter().map(|i| i.code).collect();
        assert_eq!(codes, ["not-supported", "incomplete"], "{:?}", out.issues);
        // Under each of several answers: an Observation each.
        assert_eq!(by_code(b, "11287-0").len(), 2);
        assert_eq!(observations(b).len(), 11);
        // What every Observation takes from the response.
        let o = &starts[0]["resource"];
        assert_eq!(o["status"], "amended");
        assert_eq!(o["subject"]["reference"], "Patient/p1");
        assert_eq!(o["encounter"]["reference"], "Encounter/e1");
        assert_eq!(o["performer"], json!([{"reference": "Practitioner/dr"}]));
        assert_eq!(o["effectiveDateTime"], "2026-11-20");
        assert!(o.get("issued").is_none(), "a date is no instant");
        assert_eq!(o["basedOn"], json!([{"reference": "ServiceRequest/s1"}]));
        assert_eq!(o["partOf"], json!([{"reference": "Procedure/x1"}]));
        assert_eq!(
            o["derivedFrom"],
            json!([{"reference": "QuestionnaireResponse/qr-1"}])
        );
    }

    /// With the response's identifier every Observation has its own, written as a conditional
    /// update: the same response extracted again (or amended) updates, never duplicates.
    #[test]
    fn an_identified_response_yields_conditional_updates_that_repeat_exactly() {
        let (q, qr) = traps();
        let out = extract(&q, &qr).unwrap();
        let again = extract(&q, &qr).unwrap();
        assert_eq!(out.bundle, again.bundle);
        let observed = entries(&out.bundle, "Observation");
        let mut values: Vec<&str> = observed
            .iter()
            .map(|e| e["resource"]["identifier"][0]["value"].as_str().unwrap())
            .collect();
        assert!(values.contains(&"r-7/meds[1]/med-start"));
        assert!(values.contains(&"r-7/symptoms#1"));
        assert!(values.contains(&"r-7/drinks#1/per-week"));
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), observed.len(), "identifiers are unique");
        for e in observed {
            assert_eq!(e["request"]["method"], "PUT");
            let url = e["request"]["url"].as_str().unwrap();
            assert!(
                url.starts_with("Observation?identifier=https://forms.example.org/responses|r-7/"),
                "{url}"
            );
            assert!(!url.contains('#'), "encoded: {url}");
        }
        // One Provenance per response, tagged with its identifier, however often extracted.
        let provenance = entries(&out.bundle, "Provenance");
        assert_eq!(
            provenance[0]["request"],
            json!({"method": "PUT",
                   "url": "Provenance?_tag=https://forms.example.org/responses|r-7"})
        );
        assert_eq!(
            provenance[0]["resource"]["meta"]["tag"],
            json!([{"system": "https://forms.example.org/responses", "code": "r-7"}])
        );
    }

    #[test]
    fn nothing_to_extract_is_a_warning_and_wrong_resources_are_refused() {
        let q =
            json!({"resourceType": "Questionnaire", "item": [{"linkId": "a", "type": "string"}]});
        let qr = json!({"resourceType": "QuestionnaireResponse", "item": [
            {"linkId": "a", "answer": [{"valueString": "x"}]}]});
        let out = extract(&q, &qr).unwrap();
        assert!(out.bundle.get("entry").is_none(), "{}", out.bundle);
        crate::fhir::validate::validate(&out.bundle).unwrap();
        assert!(out.issues.iter().any(|i| i.code == "not-found"));
        assert_eq!(
            extract(&qr, &qr).unwrap_err().to_string(),
            "expected a Questionnaire, got a QuestionnaireResponse"
        );
        assert!(extract(&q, &json!({"item": []})).is_err());
        let mut draft = qr.clone();
        draft["status"] = json!("entered-in-error");
        assert_eq!(
            extract(&q, &draft).unwrap_err(),
            ExtractError::EnteredInError
        );
        draft["status"] = json!("in-progress");
        draft["item"][0]["linkId"] = json!("b");
        let q = json!({"resourceType": "Questionnaire", "item": [{"linkId": "b", "type": "string",
            "code": [{"code": "c"}], "extension": flag(json!(true))}]});
        let out = extract(&q, &draft).unwrap();
        assert_eq!(observations(&out.bundle)[0]["status"], "preliminary");
        // About something an Observation cannot be about: no subject; an author that cannot
        // perform: no performer; a subject known only by identifier: kept.
        draft["subject"] = json!({"reference": "Practitioner/x"});
        draft["author"] = json!({"reference": "Device/d"});
        let obs = &extract(&q, &draft).unwrap().bundle["entry"][0]["resource"];
        assert!(
            obs.get("subject").is_none() && obs.get("performer").is_none(),
            "{obs}"
        );
        draft["subject"] = json!({"identifier": {"system": "urn:s", "value": "v"}});
        let out = extract(&q, &draft).unwrap();
        assert_eq!(
            observations(&out.bundle)[0]["subject"]["identifier"]["value"],
            "v"
        );
    }

    /// A response posted as a submission: the Patient and the response itself go with the
    /// Observations, every reference inside the Bundle; what a submission needs is checked.
    #[test]
    fn a_response_as_a_submission_carries_its_patient_response_and_provenance() {
        let mapping = crate::mapping::load_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/mappings/glp1-intake-typeform.yaml"
        )))
        .unwrap();
        let source = Source {
            mapping: &mapping,
            payload_sha256: &"ab".repeat(32),
            received_at: RECORDED,
        };
        let (q, mut qr) = traps();
        qr["status"] = json!("completed");
        qr["subject"] = json!({"identifier": {"system": "https://crm.example/p", "value": "p-9"}});
        let out = submission(&q, &qr, source).unwrap();
        crate::fhir::validate::validate(&out.bundle).unwrap();
        assert_eq!(out.submission_id, "r-7");
        assert_eq!(out.patient, ("https://crm.example/p".into(), "p-9".into()));
        let types: Vec<&str> = out.bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["resourceType"].as_str().unwrap())
            .collect();
        assert_eq!(types.first(), Some(&"Patient"));
        assert_eq!(types[1], "QuestionnaireResponse");
        assert_eq!(types.last(), Some(&"Provenance"));
        let patient = entries(&out.bundle, "Patient")[0];
        let response = entries(&out.bundle, "QuestionnaireResponse")[0];
        assert_eq!(
            patient["request"]["ifNoneExist"],
            "identifier=https://crm.example/p|p-9"
        );
        assert_eq!(
            response["request"]["ifNoneExist"],
            "identifier=https://forms.example.org/responses|r-7"
        );
        assert!(response["resource"].get("id").is_none());
        assert_eq!(
            response["resource"]["subject"]["reference"],
            patient["fullUrl"]
        );
        for o in observations(&out.bundle) {
            assert_eq!(o["subject"]["reference"], patient["fullUrl"]);
            assert_eq!(o["derivedFrom"][0]["reference"], response["fullUrl"]);
        }
        let provenance = &entries(&out.bundle, "Provenance")[0]["resource"];
        assert_eq!(
            provenance["target"].as_array().unwrap().len(),
            observations(&out.bundle).len() + 1
        );
        assert_eq!(provenance["meta"]["tag"][0]["code"], "r-7");
        // Every entry a conditional create: delivered resource by resource too, a retry matches
        // what the first attempt created.
        for e in out.bundle["entry"].as_array().unwrap() {
            assert_eq!(e["request"]["method"], "POST", "{e}");
            assert!(e["request"]["ifNoneExist"].is_string(), "{e}");
        }

        // What a submission needs.
        let mut bad = qr.clone();
        bad.as_object_mut().unwrap().remove("identifier");
        assert!(matches!(
            submission(&q, &bad, source),
            Err(ExtractError::Unidentified(_))
        ));
        let mut bad = qr.clone();
        bad["subject"] = json!({"reference": "Patient/p1"});
        assert!(matches!(
            submission(&q, &bad, source),
            Err(ExtractError::Unidentified(_))
        ));
        let mut bad = qr.clone();
        bad["status"] = json!("in-progress");
        assert_eq!(
            submission(&q, &bad, source).unwrap_err(),
            ExtractError::NotFinished
        );
    }

    #[test]
    fn missing_answers_are_the_required_questions_of_the_sections_answered() {
        let q = json!({"resourceType": "Questionnaire", "item": [
            {"linkId": "name", "type": "string", "required": true},
            {"linkId": "note", "type": "string"},
            {"linkId": "intro", "type": "display", "required": true},
            {"linkId": "meds", "type": "group", "item": [
                {"linkId": "med", "type": "string", "required": true},
                {"linkId": "dose", "type": "string", "required": true}]},
            {"linkId": "skipped", "type": "group", "item": [
                {"linkId": "why", "type": "string", "required": true}]},
            {"linkId": "consent", "type": "group", "required": true, "item": [
                {"linkId": "agree", "type": "boolean", "required": true}]}]});
        let qr = json!({"resourceType": "QuestionnaireResponse", "item": [
            {"linkId": "meds", "item": [{"linkId": "med", "answer": [{"valueString": "x"}]}]},
            {"linkId": "consent", "item": [{"linkId": "agree", "answer": [{"valueBoolean": false}]}]}]});
        // `false` is an answer; the skipped optional section asks nothing.
        assert_eq!(missing_answers(&q, &qr), ["name", "dose"]);
    }
}
