//! The engine: one payload through one `Mapping` → QuestionnaireResponse, Observations,
//! Provenance (one `transaction` Bundle), ops flags and the list of missing answers.
//!
//! The answer index is built once per payload; every selector was compiled at load. Resources
//! are built directly as JSON. Errors are collected, never thrown: a payload that does not fit
//! its map yields every problem at once, each with the linkId and path, never the value.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::{json, Value};

use super::condition::Answers;
use super::select::AnswerIndex;
use super::value::{self, Answer};
use super::{Components, Derivation, Item, ItemType, MapTarget, Mapping, ValueRule};
use crate::fhir::bundle::reference;
use crate::fhir::provenance::{provenance, ProvenanceInput};
use crate::fhir::{
    identifier_query, urn_uuid, Conditional, Issue, Json, OperationOutcome, TransactionBuilder,
};

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

/// An item with its answers, or a group with its children; repeating groups give one node each.
struct Node<'m> {
    item: &'m Item,
    /// `weight`, `meds[1]/med-name`: unique within the submission, stable across re-sends.
    key: String,
    answers: Vec<Answer<'m>>,
    children: Vec<Node<'m>>,
}

struct Run<'m, 'p> {
    mapping: &'m Mapping,
    index: AnswerIndex<'p>,
    issues: Vec<Issue>,
    missing: Vec<MissingAnswer>,
}

impl Mapping {
    /// The submission id (idempotency key) a payload carries, if it carries one.
    pub fn submission_id(&self, payload: &Value) -> Option<String> {
        match self.source.submission_id.first(payload) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
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
        let mut run = Run {
            mapping: self,
            index,
            issues: Vec::new(),
            missing: Vec::new(),
        };

        let submission_id = match self.submission_id(input.payload) {
            Some(id) => Some(id),
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
        if patient_value.is_none() {
            run.issues.push(
                Issue::error("required", "the patient identifier is missing")
                    .at("source.patient.identifier"),
            );
        }
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

        let flags = self.raised(&flat, !run.missing.is_empty());
        for m in &run.missing {
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

fn collect<'m>(nodes: &[Node<'m>], flat: &mut Answers<'m>) {
    for n in nodes {
        if !n.answers.is_empty() {
            flat.entry(n.item.link_id.as_str())
                .or_default()
                .extend(n.answers.iter().cloned());
        }
        collect(&n.children, flat);
    }
}

/// What a QuestionnaireResponse raises for ops (`Mapping::response_signals`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    /// Flags raised, in mapping order; `more_information_needed` when answers are missing.
    pub flags: Vec<String>,
    /// The linkIds of answers missing.
    pub missing: Vec<String>,
}

impl Mapping {
    /// The flags whose conditions `flat` meets, in mapping order, and
    /// `more_information_needed` when answers are `missing`.
    fn raised(&self, flat: &Answers<'_>, missing: bool) -> Vec<String> {
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

    /// The ops signals of a QuestionnaireResponse to this mapping's Questionnaire (a
    /// FHIR-native form), as a vendor payload through the mapping would raise them: its
    /// answers read as this mapping's items read theirs (a Coding is the mapped option with
    /// that code, so a condition naming the option's key or its code holds alike; answers to
    /// linkIds the mapping has not are ignored), the values its items derive computed from
    /// them (the gateway's computation wins over a total the form sent), answers a
    /// `required_when` asks for added to `missing` (the Questionnaire's required questions
    /// left unanswered), then the flags.
    pub fn response_signals(&self, response: &Value, mut missing: Vec<String>) -> Signals {
        let mut items = HashMap::new();
        index_items(&self.items, &mut items);
        let mut flat: Answers<'_> = HashMap::new();
        response_answers(response, &items, &mut flat);
        let mut run = Run {
            mapping: self,
            index: AnswerIndex::Empty,
            issues: Vec::new(),
            missing: Vec::new(),
        };
        run.derive_all(&self.items, &mut flat);
        run.required_when(&self.items, &flat);
        for m in run.missing {
            if !missing.contains(&m.link_id) {
                missing.push(m.link_id);
            }
        }
        Signals {
            flags: self.raised(&flat, !missing.is_empty()),
            missing,
        }
    }
}

/// Every item of the tree by linkId.
fn index_items<'m>(items: &'m [Item], out: &mut HashMap<&'m str, &'m Item>) {
    for item in items {
        out.insert(item.link_id.as_str(), item);
        index_items(&item.children, out);
    }
}

/// The answers of a QuestionnaireResponse (or of one of its items or answers, nested items
/// included) to the mapping's `items`, by linkId.
fn response_answers<'m>(node: &Value, items: &HashMap<&str, &'m Item>, flat: &mut Answers<'m>) {
    for r in node
        .get("item")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let item = r
            .get("linkId")
            .and_then(Value::as_str)
            .and_then(|id| items.get(id).copied());
        for answer in r
            .get("answer")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some((item, a)) = item.and_then(|i| Some((i, response_answer(i, answer)?))) {
                flat.entry(item.link_id.as_str()).or_default().push(a);
            }
            response_answers(answer, items, flat);
        }
        response_answers(r, items, flat);
    }
}

/// `n` `from` one UCUM unit in `to`, rounded to `item`'s precision (2 places by default);
/// `None` if the units do not convert.
fn in_unit(
    item: &Item,
    n: &serde_json::Number,
    from: &str,
    to: &str,
) -> Option<serde_json::Number> {
    let x = super::units::convert(n.as_f64()?, from, to).ok()?;
    value::rounded(x, item.precision.unwrap_or(2))
}

/// One QuestionnaireResponse answer (`value[x]`) as `item`'s answer: a Coding as the item's
/// mapped option of that code (and system, if given) or else its bare code; a quantity in the
/// item's unit (converted from another UCUM unit if it can be) or else a bare number.
fn response_answer<'m>(item: &'m Item, answer: &Value) -> Option<Answer<'m>> {
    let (kind, v) = answer
        .as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("value"))?;
    Some(match (kind.as_str(), v) {
        ("valueBoolean", Value::Bool(b)) => Answer::Bool(*b),
        ("valueInteger", Value::Number(n)) => Answer::Int(n.as_i64()?),
        ("valueDecimal", Value::Number(n)) => Answer::Dec(n.clone()),
        ("valueString", Value::String(s)) => Answer::Str(s.clone()),
        ("valueDate", Value::String(s)) => Answer::Date(s.clone()),
        ("valueDateTime", Value::String(s)) => Answer::DateTime(s.clone()),
        ("valueCoding", c) => {
            let code = c.get("code")?.as_str()?;
            let system = c.get("system").and_then(Value::as_str);
            let option = item.rule.map.as_ref().and_then(|m| {
                m.codings().find(|t| {
                    t.code == code && system.is_none_or(|s| t.system.as_deref() == Some(s))
                })
            });
            match option {
                Some(t) => Answer::Coding(t),
                None => Answer::Str(code.to_string()),
            }
        }
        ("valueQuantity", q) => {
            let Value::Number(n) = q.get("value")? else {
                return None;
            };
            let code = q.get("code").and_then(Value::as_str);
            match (item.unit.as_deref(), code) {
                (Some(unit), Some(c)) if c == unit => Answer::Quantity(n.clone(), unit),
                (Some(unit), Some(c)) => match in_unit(item, n, c, unit) {
                    Some(x) => Answer::Quantity(x, unit),
                    None => Answer::Dec(n.clone()),
                },
                _ => Answer::Dec(n.clone()),
            }
        }
        _ => return None,
    })
}

/// Where an item's raw value comes from, for error expressions (never the value).
fn origin(rule: &ValueRule) -> String {
    match (&rule.answer, &rule.value, &rule.path) {
        (Some(a), Some(v), _) => format!("answers['{a}']{}", v.source().trim_start_matches('$')),
        (Some(a), None, _) => format!("answers['{a}']"),
        (None, _, Some(p)) => p.source().to_string(),
        _ => "default".to_string(),
    }
}

fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Object(o) => {
            !o.is_empty()
                && o.values()
                    .all(|x| x.as_str().is_some_and(|s| s.trim().is_empty()))
        }
        _ => false,
    }
}

impl<'m, 'p> Run<'m, 'p> {
    /// The raw JSON values a rule selects in `ctx` (arrays flattened one level, blanks dropped).
    fn raw<'a>(&'a self, rule: &ValueRule, ctx: &'a Value) -> Vec<&'a Value> {
        raw(&self.index, rule, ctx)
    }

    /// Typed answers of a rule in `ctx`, after every declared transform.
    fn values(
        &mut self,
        rule: &'m ValueRule,
        ty: ItemType,
        ctx: &Value,
        at: &str,
    ) -> Vec<Answer<'m>> {
        let mut out = Vec::new();
        let issues = &mut self.issues;
        let mut convert_all = |raw: &Value| {
            for part in split(rule, raw) {
                match convert(rule, ty, &part) {
                    Ok(a) => out.push(a),
                    Err((code, msg)) => {
                        issues.push(Issue::error(code, msg).at(at.to_string()).at(origin(rule)))
                    }
                }
            }
        };
        let raws = raw(&self.index, rule, ctx);
        if raws.is_empty() {
            rule.default.iter().for_each(&mut convert_all);
        } else {
            raws.into_iter().for_each(&mut convert_all);
        }
        out
    }

    fn first_string(&mut self, rule: &'m ValueRule, ctx: &Value, at: &str) -> Option<String> {
        match self
            .values(rule, ItemType::String, ctx, at)
            .into_iter()
            .next()
        {
            Some(Answer::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn item_answers(&mut self, item: &'m Item, ctx: &Value, key: &str) -> Vec<Answer<'m>> {
        if !item.sum.is_empty() {
            return self.sum_parts(item, ctx, key);
        }
        let mut answers = self.values(&item.rule, item.item_type, ctx, key);
        if item.item_type == ItemType::Quantity {
            let unit = item.unit.as_deref().unwrap_or("1");
            answers = answers
                .into_iter()
                .filter_map(|a| {
                    let n = match a {
                        Answer::Dec(n) => n,
                        other => return Some(other),
                    };
                    match item.rule.from_unit.as_deref() {
                        Some(from) if from != unit => {
                            let n = in_unit(item, &n, from, unit);
                            if n.is_none() {
                                self.issues.push(
                                    Issue::error("value", "the number could not be converted")
                                        .at(key.to_string()),
                                );
                            }
                            n.map(|n| Answer::Quantity(n, unit))
                        }
                        _ => Some(Answer::Quantity(n, unit)),
                    }
                })
                .collect();
        }
        if answers.len() > 1 && !item.repeats {
            self.issues.push(
                Issue::error(
                    "structure",
                    format!("{} answers for an item that does not repeat", answers.len()),
                )
                .at(key.to_string())
                .at(origin(&item.rule)),
            );
            answers.truncate(1);
        }
        answers
    }

    /// A composite quantity (feet + inches): parts that are present are summed; 0 is an answer.
    fn sum_parts(&mut self, item: &'m Item, ctx: &Value, key: &str) -> Vec<Answer<'m>> {
        let unit = item.unit.as_deref().unwrap_or("1");
        let mut total = None::<f64>;
        for (rule, part_unit) in &item.sum {
            if let Some(a) = self.values(rule, ItemType::Decimal, ctx, key).first() {
                let x = a
                    .as_f64()
                    .and_then(|x| super::units::convert(x, part_unit, unit).ok());
                match x {
                    Some(x) => total = Some(total.unwrap_or(0.0) + x),
                    None => self.issues.push(
                        Issue::error("value", "a part could not be converted").at(key.to_string()),
                    ),
                }
            }
        }
        total
            .and_then(|t| value::rounded(t, item.precision.unwrap_or(2)))
            .map(|n| Answer::Quantity(n, unit))
            .into_iter()
            .collect()
    }

    fn extract(&mut self, items: &'m [Item], ctx: &Value, prefix: &str) -> Vec<Node<'m>> {
        let mut nodes = Vec::new();
        for item in items {
            let key = format!("{prefix}{}", item.link_id);
            if item.is_repeating_group() {
                let elements: Vec<Value> = self.raw(&item.rule, ctx).into_iter().cloned().collect();
                for (i, element) in elements.iter().enumerate() {
                    let children = self.extract(&item.children, element, &format!("{key}[{i}]/"));
                    if !children.is_empty() {
                        nodes.push(Node {
                            item,
                            key: format!("{key}[{i}]"),
                            answers: Vec::new(),
                            children,
                        });
                    }
                }
                if nodes.last().is_none_or(|n| n.item.link_id != item.link_id) {
                    self.note_missing(item);
                }
            } else if item.item_type == ItemType::Group {
                let children = self.extract(&item.children, ctx, prefix);
                if children.is_empty() {
                    self.note_missing(item);
                } else {
                    nodes.push(Node {
                        item,
                        key,
                        answers: Vec::new(),
                        children,
                    });
                }
            } else if item.derive.is_some() {
                nodes.push(Node {
                    item,
                    key,
                    answers: Vec::new(),
                    children: Vec::new(),
                });
            } else {
                let answers = self.item_answers(item, ctx, &key);
                if answers.is_empty() {
                    self.note_missing(item);
                } else {
                    nodes.push(Node {
                        item,
                        key,
                        answers,
                        children: Vec::new(),
                    });
                }
            }
        }
        nodes
    }

    fn note_missing(&mut self, item: &'m Item) {
        if item.required {
            self.missing.push(MissingAnswer {
                link_id: item.link_id.clone(),
                text: item.text.clone(),
            });
        }
    }

    /// Fills derived items (in file order, so a derivation may use an earlier one) and drops
    /// those that could not be computed.
    fn derive(&mut self, nodes: &mut Vec<Node<'m>>, flat: &mut Answers<'m>) {
        for node in nodes.iter_mut() {
            self.derive(&mut node.children, flat);
            let Some(d) = &node.item.derive else { continue };
            if let Some(a) = self.derived_value(node.item, d, flat) {
                flat.entry(node.item.link_id.as_str())
                    .or_default()
                    .push(a.clone());
                node.answers.push(a);
            } else {
                self.note_missing(node.item);
            }
        }
        nodes.retain(|n| !n.answers.is_empty() || !n.children.is_empty());
    }

    /// Every derived value the answers allow, children first and in item order (a later
    /// derivation may read an earlier one), in place of an answer given for it.
    fn derive_all(&mut self, items: &'m [Item], flat: &mut Answers<'m>) {
        for item in items {
            self.derive_all(&item.children, flat);
            let Some(d) = &item.derive else { continue };
            if let Some(a) = self.derived_value(item, d, flat) {
                flat.insert(item.link_id.as_str(), vec![a]);
            }
        }
    }

    fn derived_value(
        &mut self,
        item: &'m Item,
        d: &Derivation,
        flat: &Answers<'m>,
    ) -> Option<Answer<'m>> {
        let first_quantity = |id: &str, to: &str| {
            flat.get(id)?.iter().find_map(|a| match a {
                Answer::Quantity(n, u) => super::units::convert(n.as_f64()?, u, to).ok(),
                _ => None,
            })
        };
        let places = item.precision;
        let out = |x: f64, places: u32| -> Option<Answer<'m>> {
            match item.item_type {
                ItemType::Integer if x.fract() == 0.0 => Some(Answer::Int(x as i64)),
                ItemType::Quantity => value::rounded(x, places)
                    .map(|n| Answer::Quantity(n, item.unit.as_deref().unwrap_or("1"))),
                _ => value::rounded(x, places).map(Answer::Dec),
            }
        };
        match d {
            Derivation::Bmi { weight, height } => {
                let kg = first_quantity(weight, "kg")?;
                let m = first_quantity(height, "m")?;
                if m <= 0.0 {
                    self.issues.push(
                        Issue::warning("value", "BMI not computed: height is zero")
                            .at(item.link_id.clone()),
                    );
                    return None;
                }
                out(kg / (m * m), places.unwrap_or(1))
            }
            Derivation::SumScores(ids) => {
                let mut total = 0.0;
                let unanswered: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|id| !flat.contains_key(id))
                    .collect();
                if !unanswered.is_empty() {
                    self.issues.push(
                        Issue::warning(
                            "incomplete",
                            format!("total not computed: {} unanswered", unanswered.join(", ")),
                        )
                        .at(item.link_id.clone()),
                    );
                    return None;
                }
                for a in ids.iter().filter_map(|id| flat.get(id.as_str())).flatten() {
                    match a {
                        Answer::Coding(c) => total += c.score.unwrap_or(0.0),
                        _ => return None,
                    }
                }
                out(total, places.unwrap_or(2))
            }
            Derivation::Sum(ids) => {
                let values: Vec<f64> = ids
                    .iter()
                    .filter_map(|id| flat.get(id.as_str()))
                    .flatten()
                    .filter_map(Answer::as_f64)
                    .collect();
                if values.is_empty() {
                    return None;
                }
                out(values.iter().sum(), places.unwrap_or(2))
            }
        }
    }

    fn required_when(&mut self, items: &'m [Item], flat: &Answers<'m>) {
        for item in items {
            if let Some(c) = &item.required_when {
                if !flat.contains_key(item.link_id.as_str()) && c.eval(flat) && !item.required {
                    self.missing.push(MissingAnswer {
                        link_id: item.link_id.clone(),
                        text: item.text.clone(),
                    });
                }
            }
            self.required_when(&item.children, flat);
        }
    }

    /// The Patient's name, gender and birth date, as members of the Patient resource.
    fn demographics(&mut self, payload: &Value) -> Vec<(&'static str, Json<'static>)> {
        let p = &self.mapping.source.patient;
        let mut patient = Vec::new();
        let given = p
            .given
            .as_ref()
            .and_then(|r| self.first_string(r, payload, "source.patient.given"));
        let family = p
            .family
            .as_ref()
            .and_then(|r| self.first_string(r, payload, "source.patient.family"));
        if given.is_some() || family.is_some() {
            let mut name = Vec::new();
            if let Some(f) = family {
                name.push(("family", f.into()));
            }
            if let Some(g) = given {
                name.push(("given", Json::Arr(vec![g.into()])));
            }
            patient.push(("name", Json::Arr(vec![Json::Obj(name)])));
        }
        if let Some(g) = p
            .gender
            .as_ref()
            .and_then(|r| self.first_string(r, payload, "source.patient.gender"))
        {
            match g.to_ascii_lowercase().as_str() {
                g @ ("male" | "female" | "other" | "unknown") => {
                    patient.push(("gender", g.to_string().into()));
                }
                _ => self.issues.push(
                    Issue::warning(
                        "code-invalid",
                        "gender is not male, female, other or unknown; map it",
                    )
                    .at("source.patient.gender"),
                ),
            }
        }
        if let Some(rule) = &p.birth_date {
            if let Some(Answer::Date(d)) = self
                .values(rule, ItemType::Date, payload, "source.patient.birth_date")
                .into_iter()
                .next()
            {
                patient.push(("birthDate", d.into()));
            }
        }
        patient
    }
}

/// The raw JSON values a rule selects in `ctx` (arrays flattened one level, blanks dropped).
fn raw<'a>(index: &'a AnswerIndex<'_>, rule: &ValueRule, ctx: &'a Value) -> Vec<&'a Value> {
    let selected: Vec<&Value> = if let Some(key) = &rule.answer {
        match index.get(key) {
            None => Vec::new(),
            Some(element) => match &rule.value {
                Some(sel) => sel.select(element),
                None => vec![element],
            },
        }
    } else if let Some(path) = &rule.path {
        path.select(ctx)
    } else {
        Vec::new()
    };
    let mut out = Vec::with_capacity(selected.len());
    for v in selected {
        match v {
            Value::Array(items) => out.extend(items.iter().filter(|x| !is_blank(x))),
            v if !is_blank(v) => out.push(v),
            _ => {}
        }
    }
    out
}

/// One raw value through the value map (if any) and coercion to the item's type.
fn convert<'m>(
    rule: &'m ValueRule,
    ty: ItemType,
    raw: &Value,
) -> Result<Answer<'m>, (&'static str, String)> {
    let mapped = match &rule.map {
        None => raw,
        Some(map) => {
            let key: Cow<'_, str> = match raw {
                Value::String(s) => Cow::Borrowed(s.trim()),
                Value::Number(n) => Cow::Owned(n.to_string()),
                Value::Bool(b) => Cow::Owned(b.to_string()),
                other => {
                    let kind = crate::fhir::outcome::json_type(other);
                    return Err(("value", format!("expected an option, got {kind}")));
                }
            };
            match map.get(&key) {
                Some(MapTarget::Coding(c)) => return Ok(Answer::Coding(c)),
                Some(MapTarget::Value(v)) => v,
                None => {
                    let n = map.entries.len();
                    let msg = format!("the answer is not one of the {n} options of the value map");
                    return Err(("code-invalid", msg));
                }
            }
        }
    };
    value::coerce(mapped, ty, rule.format.as_deref()).map_err(|e| (e.code, e.message))
}

/// Splits a raw string into parts as the rule says (after stripping HTML); other values pass.
fn split<'a>(rule: &ValueRule, raw: &'a Value) -> Vec<Cow<'a, Value>> {
    let Value::String(s) = raw else {
        return vec![Cow::Borrowed(raw)];
    };
    if !rule.strip_html && rule.split.is_none() {
        return if s.trim().is_empty() {
            Vec::new()
        } else {
            vec![Cow::Borrowed(raw)]
        };
    }
    let s: Cow<'_, str> = if rule.strip_html {
        Cow::Owned(value::strip_html(s))
    } else {
        Cow::Borrowed(s.as_str())
    };
    match &rule.split {
        Some(sep) => {
            let parts = s
                .split(sep.as_str())
                .map(str::trim)
                .filter(|p| !p.is_empty());
            let owned = |p: &str| Cow::Owned(Value::String(p.to_string()));
            match rule.pick {
                Some(n) => parts.skip(n).take(1).map(owned).collect(),
                None => parts.map(owned).collect(),
            }
        }
        None if s.trim().is_empty() => Vec::new(),
        None => vec![Cow::Owned(Value::String(s.into_owned()))],
    }
}

/// Everything that names the resources of one submission.
struct Resources<'a> {
    mapping: &'a Mapping,
    submission_id: &'a str,
    patient: &'a PatientIdentity,
    authored: &'a str,
    recorded: &'a str,
    payload_sha256: &'a str,
}

/// An Observation with its fullUrl and business identifier value.
type Keyed<'x> = (String, String, Json<'x>);

impl Resources<'_> {
    fn url(&self, kind: &str, key: &str) -> String {
        urn_uuid(&[&self.mapping.id, self.submission_id, kind, key])
    }

    /// The transaction Bundle, written as JSON text.
    fn bundle(
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
            ("status", "completed".into()),
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
                                        .map(|(n, (code, unit))| {
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
                            if matches!(a, Answer::Coding(c) if !c.observe) {
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
        obs.push(("status", "final".into()));
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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::{Signals, MORE_INFORMATION_NEEDED};
    use crate::mapping::value::Answer;
    use crate::mapping::Mapping;

    fn mapping(file: &str) -> Mapping {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("mappings")
            .join(file);
        crate::mapping::load_file(&path).unwrap()
    }

    fn coding(code: &str) -> Value {
        json!([{"valueCoding": {"system": "http://loinc.org", "code": code}}])
    }

    /// A PHQ-9 response: items 1–8 "several days" (1 each), item 9 as given, and the total
    /// the form computed.
    fn phq9(item9: &str, total: i64) -> Value {
        let mut items: Vec<Value> = (1..=8)
            .map(|i| json!({"linkId": format!("phq9-{i}"), "answer": coding("LA6569-3")}))
            .collect();
        items.push(json!({"linkId": "phq9-9", "answer": coding(item9)}));
        items.push(json!({"linkId": "phq9-total", "answer": [{"valueInteger": total}]}));
        json!({"resourceType": "QuestionnaireResponse",
               "item": [{"linkId": "phq9", "item": items}]})
    }

    /// A FHIR-native form's response raises the flags a vendor payload would: options matched
    /// by code, totals computed by the gateway (not taken from the form), and
    /// `more_information_needed` with what is missing.
    #[test]
    fn a_response_raises_the_mappings_flags_from_its_answers() {
        let m = mapping("phq9-typeform.yaml");
        // 8 + 2 = 10, whatever total the form sent.
        assert_eq!(
            m.response_signals(&phq9("LA6570-1", 3), Vec::new()),
            Signals {
                flags: vec![
                    "self_harm_risk_reported".into(),
                    "phq9_moderate_or_higher".into()
                ],
                missing: vec![],
            }
        );
        // 8 + 0: nothing to raise, even if the form said 27.
        assert_eq!(
            m.response_signals(&phq9("LA6568-5", 27), Vec::new()),
            Signals::default()
        );
        // A total the gateway cannot compute (an item unanswered) is the form's.
        let mut partial = phq9("LA6568-5", 12);
        partial["item"][0]["item"].as_array_mut().unwrap().remove(0);
        let signals = m.response_signals(&partial, vec!["phq9-1".into()]);
        assert_eq!(
            signals.flags,
            ["phq9_moderate_or_higher", MORE_INFORMATION_NEEDED]
        );
        assert_eq!(signals.missing, ["phq9-1"]);
    }

    /// Conditions naming an option's key (`hx_mtc`) hold for a Coding of its code;
    /// `required_when` adds to what is missing; a quantity in another unit is converted to
    /// the item's (what a derivation such as BMI reads).
    #[test]
    fn a_response_meets_conditions_on_option_keys_and_conditional_requirements() {
        let m = mapping("glp1-intake-typeform.yaml");
        let response = json!({"resourceType": "QuestionnaireResponse", "item": [
            {"linkId": "medications", "item": [
                {"linkId": "takes-meds", "answer": [{"valueBoolean": true}]},
                {"linkId": "has-allergies", "answer": [{"valueBoolean": false}]}]},
            {"linkId": "history", "item": [
                {"linkId": "conditions", "answer": [
                    {"valueCoding": {"system": "http://snomed.info/sct", "code": "255032005"}}]},
                {"linkId": "unknown-item", "answer": [{"valueString": "ignored"}]}]}]});
        let signals = m.response_signals(&response, Vec::new());
        assert_eq!(
            signals,
            Signals {
                flags: vec![
                    "contraindication_reported".into(),
                    MORE_INFORMATION_NEEDED.into()
                ],
                missing: vec!["current-meds".into()],
            }
        );
        // The same code in another system is not that option.
        let mut other = response.clone();
        other["item"][1]["item"][0]["answer"][0]["valueCoding"]["system"] = json!("urn:other");
        assert_eq!(
            m.response_signals(&other, Vec::new()).flags,
            [MORE_INFORMATION_NEEDED]
        );
        // A weight in pounds is the item's kilograms (as the vendor payload's is).
        let mut items = std::collections::HashMap::new();
        super::index_items(&m.items, &mut items);
        let pounds = json!({"valueQuantity": {"value": 180, "unit": "lb", "code": "[lb_av]"}});
        assert!(matches!(
            super::response_answer(items["weight"], &pounds),
            Some(Answer::Quantity(n, "kg")) if n.to_string() == "81.65"
        ));
        let unknown = json!({"valueQuantity": {"value": 180, "code": "stone"}});
        assert!(matches!(
            super::response_answer(items["weight"], &unknown),
            Some(Answer::Dec(n)) if n.to_string() == "180"
        ));
    }
}
