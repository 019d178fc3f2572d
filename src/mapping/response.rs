//! A FHIR-native form's response as a submission of the mapping whose Questionnaire it answers:
//! what the store records of it and the Bundle its delivery sends (`submission`: the Patient, the
//! response without what is not charted, its extracted Observations, the submission's
//! Provenance), the required questions it leaves unanswered, and its ops signals — its answers
//! read as that mapping's items read a vendor payload, so that it raises the same flags.
//! This is intake, not extraction: extraction (`extract`) makes its Observations.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::extract::{self, items_in, ExtractError};
use super::fit;
use super::plausible::IMPLAUSIBLE_VALUE;
use crate::fhir::bundle::{entry, Conditional};
use crate::fhir::{identifier_query, tag_query, urn_uuid, Issue};

use super::answers::{in_unit, Run};
use super::condition::Answers;
use super::select::AnswerIndex;
use super::value::Answer;
use super::{Item, Mapping};

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
    let mut run = extract::Run::new(questionnaire, response)?;
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

/// What a QuestionnaireResponse raises for ops (`Mapping::response_signals`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    /// Flags raised, in mapping order; `more_information_needed` when answers are missing.
    pub flags: Vec<String>,
    /// The linkIds of answers missing.
    pub missing: Vec<String>,
}

impl Mapping {
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
        let mut run = Run::new(self, AnswerIndex::Empty);
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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::Signals;
    use crate::mapping::engine::MORE_INFORMATION_NEEDED;
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
