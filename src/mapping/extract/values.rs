//! How an answer becomes an Observation's value, and what a Reference may point at.

use serde_json::{json, Map, Value};

/// The resource type a Reference names (by its literal reference or its `type`), if it does.
pub(super) fn named_type(reference: &Value) -> Option<&str> {
    reference
        .get("reference")
        .and_then(Value::as_str)
        .and_then(|r| r.split('/').rev().nth(1))
        .or_else(|| reference.get("type").and_then(Value::as_str))
}

/// Whether a Reference points at one of `types`.
pub(super) fn is_a(reference: &Value, types: &[&str]) -> bool {
    named_type(reference).is_some_and(|t| types.contains(&t))
}

/// Whether a Reference may point at one of `types`: it does, or it does not say.
pub(super) fn may_be(reference: &Value, types: &[&str]) -> bool {
    named_type(reference).is_none_or(|t| types.contains(&t))
}

/// A FHIR `instant` has a time and a zone; a `dateTime` may have neither.
pub(super) fn is_instant(s: &str) -> bool {
    match s.split_once('T') {
        Some((_, time)) => time.ends_with('Z') || time.contains('+') || time.contains('-'),
        None => false,
    }
}

/// A Coding as the Observation carries it: without the Questionnaire's own extensions (the
/// extraction flag).
pub(super) fn coding(c: &Value) -> Value {
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
pub(super) fn observation_value(
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
