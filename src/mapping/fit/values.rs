//! Answers' values as the fit checks compare them: their JSON types, options, order and bounds.

use serde_json::Value;

use super::*;

/// Whether an answer's value is of the JSON type its `value[x]` requires (R4 JSON format).
pub(super) fn json_type(kind: &str, value: &Value) -> Result<(), String> {
    let ok = match kind {
        "valueBoolean" => value.is_boolean(),
        "valueDecimal" => value.is_number(),
        "valueInteger" => value.as_i64().is_some(),
        "valueDate" | "valueDateTime" | "valueTime" | "valueString" | "valueUri" => {
            value.as_str().is_some_and(|s| !s.is_empty())
        }
        "valueCoding" | "valueAttachment" | "valueReference" => value.is_object(),
        "valueQuantity" => value.is_object() && value.get("value").is_none_or(Value::is_number),
        _ => {
            return Err(format!(
                "`{kind}` is not a QuestionnaireResponse answer type"
            ))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{kind}` holds a {}",
            crate::fhir::outcome::json_type(value)
        ))
    }
}

/// Whether an option's value and an answer's are the same option: Codings by code (and by
/// system when both say one), the rest by value.
pub(super) fn same_value(kind: &str, option: &Value, answer: &Value) -> bool {
    match kind {
        "valueCoding" => {
            let code = |v: &Value| v.get("code").and_then(Value::as_str).map(str::to_string);
            let system = |v: &Value| v.get("system").and_then(Value::as_str).map(str::to_string);
            code(option).is_some()
                && code(option) == code(answer)
                && match (system(option), system(answer)) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        }
        "valueReference" => option.get("reference") == answer.get("reference"),
        _ => compare(kind, option, answer) == Some(std::cmp::Ordering::Equal),
    }
}

/// Orders two values of one `value[x]` kind: numbers as numbers (a Quantity by its value, in
/// one unit), dates and times as text of one precision, Codings and the rest equal or not.
pub(super) fn compare(kind: &str, a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    match kind {
        "valueDecimal" | "valueInteger" => a.as_f64()?.partial_cmp(&b.as_f64()?),
        "valueQuantity" => {
            let code = |q: &Value| q.get("code").and_then(Value::as_str).map(str::to_string);
            if code(a).is_some() && code(b).is_some() && code(a) != code(b) {
                return None;
            }
            a.get("value")?
                .as_f64()?
                .partial_cmp(&b.get("value")?.as_f64()?)
        }
        "valueDate" | "valueDateTime" | "valueTime" => {
            let (x, y) = (a.as_str()?, b.as_str()?);
            (x.len() == y.len()).then(|| x.cmp(y))
        }
        "valueCoding" => same_value(kind, a, b)
            .then_some(Ordering::Equal)
            .or(Some(Ordering::Less)),
        _ => Some(if a == b {
            Ordering::Equal
        } else {
            Ordering::Less
        }),
    }
}

/// The bounds an answer lies outside of, if it does (`minValue`/`maxValue` for numbers and
/// dates, SDC's `minQuantity`/`maxQuantity` for quantities in the same unit).
pub(super) fn out_of_range(item: &Value, answer: &Value) -> Option<String> {
    let (kind, value) = value_entry(answer)?;
    let (min, max) = if kind == "valueQuantity" {
        (extension(item, MIN_QUANTITY), extension(item, MAX_QUANTITY))
    } else {
        (extension(item, MIN_VALUE), extension(item, MAX_VALUE))
    };
    if min.is_none() && max.is_none() {
        return None;
    }
    let number = |v: &Value| -> Option<f64> {
        if kind == "valueQuantity" {
            v.get("value")?.as_f64()
        } else {
            v.as_f64()
        }
    };
    let unit = |v: &Value| v.get("code").and_then(Value::as_str).map(str::to_string);
    let x = number(value)?;
    let in_units = |bound: &Value| -> Option<f64> {
        let b = number(bound)?;
        if kind != "valueQuantity" {
            return Some(b);
        }
        match (unit(bound), unit(value)) {
            (Some(from), Some(to)) if from != to => {
                crate::mapping::units::convert(b, &from, &to).ok()
            }
            _ => Some(b),
        }
    };
    let low = min.and_then(in_units);
    let high = max.and_then(in_units);
    let below = low.is_some_and(|l| x < l);
    let above = high.is_some_and(|h| x > h);
    if !(below || above) {
        return None;
    }
    let show = |b: Option<f64>| b.map(crate::mapping::plausible::short).unwrap_or_default();
    let unit_text = unit(value).map(|u| format!(" {u}")).unwrap_or_default();
    Some(match (low, high) {
        (Some(_), Some(_)) => format!("{}–{}{unit_text}", show(low), show(high)),
        (Some(_), None) => format!("at least {}{unit_text}", show(low)),
        _ => format!("at most {}{unit_text}", show(high)),
    })
}
