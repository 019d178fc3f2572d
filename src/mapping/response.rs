//! The ops signals of a FHIR-native form: a QuestionnaireResponse to a mapping's Questionnaire
//! read as that mapping's items read a vendor payload, so that it raises the same flags.

use std::collections::HashMap;

use serde_json::Value;

use super::answers::{in_unit, Run};
use super::condition::Answers;
use super::select::AnswerIndex;
use super::value::Answer;
use super::{Item, Mapping};

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
