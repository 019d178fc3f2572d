//! Answers: the typed values an item yields, and the declared transforms that make them from
//! the vendor's raw JSON (HTML stripping, splitting, value maps, type coercion, dates, units).

use std::borrow::Cow;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime};
use serde_json::{Number, Value};

use super::units;
use super::ItemType;
use crate::fhir::Json;

/// A value-map target that is a Coding (`{system, code, display}`), with what the map adds.
#[derive(Debug, Clone, PartialEq)]
pub struct CodingTarget {
    /// The vendor label or option id that maps here (conditions may name it).
    pub key: String,
    pub system: Option<String>,
    pub code: String,
    pub display: Option<String>,
    /// The option's score (`itemWeight`), summed by `sum_scores`.
    pub score: Option<f64>,
    /// `false` for answers that are answers but not findings ("None of these").
    pub observe: bool,
}

impl CodingTarget {
    pub fn to_coding(&self) -> Json<'_> {
        let mut c = Vec::with_capacity(3);
        if let Some(s) = &self.system {
            c.push(("system", s.as_str().into()));
        }
        c.push(("code", self.code.as_str().into()));
        if let Some(d) = &self.display {
            c.push(("display", d.as_str().into()));
        }
        Json::Obj(c)
    }
}

/// One typed answer. Codings and units borrow from the compiled mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer<'m> {
    Bool(bool),
    Int(i64),
    Dec(Number),
    Str(String),
    Date(String),
    DateTime(String),
    Coding(&'m CodingTarget),
    Quantity(Number, &'m str),
}

impl<'m> Answer<'m> {
    /// The FHIR `value[x]` of a QuestionnaireResponse answer.
    pub fn qr_value(&self) -> (&'static str, Json<'_>) {
        match self {
            Answer::Bool(b) => ("valueBoolean", Json::Bool(*b)),
            Answer::Int(i) => ("valueInteger", Json::Int(*i)),
            Answer::Dec(n) => ("valueDecimal", Json::Num(Cow::Borrowed(n))),
            Answer::Str(s) => ("valueString", s.as_str().into()),
            Answer::Date(d) => ("valueDate", d.as_str().into()),
            Answer::DateTime(d) => ("valueDateTime", d.as_str().into()),
            Answer::Coding(c) => ("valueCoding", c.to_coding()),
            Answer::Quantity(n, u) => ("valueQuantity", quantity(Cow::Borrowed(n), u)),
        }
    }

    /// The FHIR `value[x]` of an Observation (R4 has no valueDecimal or valueDate).
    pub fn observation_value(&self) -> (&'static str, Json<'_>) {
        match self {
            Answer::Dec(n) => (
                "valueQuantity",
                Json::obj([("value", Json::Num(Cow::Borrowed(n)))]),
            ),
            Answer::Date(d) => ("valueDateTime", d.as_str().into()),
            Answer::Coding(c) => (
                "valueCodeableConcept",
                Json::obj([("coding", Json::Arr(vec![c.to_coding()]))]),
            ),
            other => other.qr_value(),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Answer::Int(i) => Some(*i as f64),
            Answer::Dec(n) | Answer::Quantity(n, _) => n.as_f64(),
            _ => None,
        }
    }

    /// Whether the answer equals a value written in a mapping condition.
    pub fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Answer::Bool(a), Value::Bool(b)) => a == b,
            (Answer::Coding(c), Value::String(s)) => &c.code == s || &c.key == s,
            (Answer::Str(a) | Answer::Date(a) | Answer::DateTime(a), Value::String(s)) => a == s,
            (a, Value::Number(n)) => match (a.as_f64(), n.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() < 1e-9,
                _ => false,
            },
            _ => false,
        }
    }

    /// A short stable key for identifiers of multi-answer items: the code for a Coding.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Answer::Coding(c) => Some(&c.code),
            _ => None,
        }
    }
}

/// `{value, unit, system: UCUM, code}`.
pub fn quantity<'a>(n: Cow<'a, Number>, unit: &'a str) -> Json<'a> {
    Json::obj([
        ("value", Json::Num(n)),
        ("unit", units::display(unit).into()),
        ("system", crate::fhir::UCUM.into()),
        ("code", unit.into()),
    ])
}

/// A number rounded to `places` decimals, as a JSON number without trailing zeros.
pub fn rounded(x: f64, places: u32) -> Option<Number> {
    if !x.is_finite() {
        return None;
    }
    let s = format!("{:.*}", places as usize, x);
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    let s = if s == "-0" { "0".to_string() } else { s };
    s.parse().ok()
}

/// Why a raw value could not become the item's type. Never carries the value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoerceError {
    pub code: &'static str,
    pub message: String,
}

fn bad(code: &'static str, message: impl Into<String>) -> CoerceError {
    CoerceError {
        code,
        message: message.into(),
    }
}

/// Turns a (mapped) raw value into an answer of `ty`. Strings are coerced for vendors that send
/// every answer as text (Jotform, Healthie): `"118.4"` → 118.4, `"Yes"` → true.
pub fn coerce<'m>(
    raw: &Value,
    ty: ItemType,
    format: Option<&str>,
) -> Result<Answer<'m>, CoerceError> {
    let kind = crate::fhir::outcome::json_type(raw);
    match ty {
        ItemType::Boolean => match raw {
            Value::Bool(b) => Ok(Answer::Bool(*b)),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" | "1" => Ok(Answer::Bool(true)),
                "false" | "no" | "n" | "0" => Ok(Answer::Bool(false)),
                _ => Err(bad(
                    "value",
                    "a string that is not yes/no/true/false; add a value map",
                )),
            },
            Value::Number(n) if n.as_f64() == Some(1.0) => Ok(Answer::Bool(true)),
            Value::Number(n) if n.as_f64() == Some(0.0) => Ok(Answer::Bool(false)),
            _ => Err(bad("value", format!("expected a boolean, got {kind}"))),
        },
        ItemType::Integer => {
            let n = number(raw).ok_or_else(|| bad("value", not_a_number("an integer", raw)))?;
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() != 0.0 || !f.is_finite() || f.abs() > 9.0e15 {
                return Err(bad(
                    "value",
                    "expected an integer, got a number with a fraction",
                ));
            }
            Ok(Answer::Int(f as i64))
        }
        ItemType::Decimal | ItemType::Quantity => number(raw)
            .map(Answer::Dec)
            .ok_or_else(|| bad("value", not_a_number("a number", raw))),
        ItemType::Date => date(raw, format).map(Answer::Date),
        ItemType::DateTime => date_time(raw, format).map(Answer::DateTime),
        ItemType::String | ItemType::Text => match raw {
            Value::String(s) => Ok(Answer::Str(s.clone())),
            Value::Number(n) => Ok(Answer::Str(n.to_string())),
            Value::Bool(b) => Ok(Answer::Str(b.to_string())),
            _ => Err(bad("value", format!("expected text, got {kind}"))),
        },
        ItemType::Choice => Err(bad(
            "code-invalid",
            "a choice answer must come from the value map",
        )),
        ItemType::Group => Err(bad("structure", "a group has no value")),
    }
}

/// Why `raw` is not the number expected, with the way to read one out of text.
fn not_a_number(expected: &str, raw: &Value) -> String {
    match raw {
        Value::String(_) => format!(
            "expected {expected}, got a string that is not one; add `pattern` to read the number in the text (or `split` to cut it out)"
        ),
        other => format!(
            "expected {expected}, got {}",
            crate::fhir::outcome::json_type(other)
        ),
    }
}

/// A JSON number, or a string holding one; the text is kept exactly (`72.50` stays `72.50`).
pub fn number(raw: &Value) -> Option<Number> {
    match raw {
        Value::Number(n) => Some(n.clone()),
        Value::String(s) => {
            let t = s.trim();
            let ok = !t.is_empty()
                && t.parse::<f64>().map(f64::is_finite).unwrap_or(false)
                && t.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
            if !ok {
                return None;
            }
            let t = t.strip_prefix('+').unwrap_or(t);
            let (sign, digits) = match t.strip_prefix('-') {
                Some(d) => ("-", d),
                None => ("", t),
            };
            // JSON numbers have no leading zeros (`"02"` → 2) and no bare leading point.
            let digits = digits.trim_start_matches('0');
            let digits = if digits.is_empty() || !digits.starts_with(|c: char| c.is_ascii_digit()) {
                format!("0{digits}")
            } else {
                digits.to_string()
            };
            format!("{sign}{digits}").parse().ok()
        }
        _ => None,
    }
}

/// Converts the user-facing format tokens (`YYYY MM DD HH mm ss Z`) to chrono's.
pub fn chrono_format(format: &str) -> String {
    format
        .replace("YYYY", "%Y")
        .replace("MM", "%m")
        .replace("DD", "%d")
        .replace("HH", "%H")
        .replace("mm", "%M")
        .replace("ss", "%S")
        .replace('Z', "%z")
}

fn date(raw: &Value, format: Option<&str>) -> Result<String, CoerceError> {
    match raw {
        Value::Object(o) => {
            let part = |k: &str| o.get(k).and_then(number).and_then(|n| n.as_f64());
            match (part("year"), part("month"), part("day")) {
                (Some(y), Some(m), Some(d)) => {
                    NaiveDate::from_ymd_opt(y as i32, m as u32, d as u32)
                        .map(|d| d.format("%Y-%m-%d").to_string())
                        .ok_or_else(|| {
                            bad(
                                "value",
                                "a {month, day, year} object that is not a calendar date",
                            )
                        })
                }
                _ => Err(bad(
                    "value",
                    "a date object without numeric month, day and year",
                )),
            }
        }
        Value::String(s) => {
            let s = s.trim();
            if let Some(f) = format {
                return NaiveDate::parse_from_str(s, &chrono_format(f))
                    .map(|d| d.format("%Y-%m-%d").to_string())
                    .map_err(|_| {
                        bad(
                            "value",
                            format!("a date that does not match the format `{f}`"),
                        )
                    });
            }
            if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                return Ok(d.format("%Y-%m-%d").to_string());
            }
            if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
                return Ok(dt.format("%Y-%m-%d").to_string());
            }
            Err(bad(
                "value",
                "a date that is not YYYY-MM-DD; declare its `format`",
            ))
        }
        other => Err(bad(
            "value",
            format!(
                "expected a date, got {}",
                crate::fhir::outcome::json_type(other)
            ),
        )),
    }
}

fn date_time(raw: &Value, format: Option<&str>) -> Result<String, CoerceError> {
    let Value::String(s) = raw else {
        return Err(bad(
            "value",
            format!(
                "expected a date-time, got {}",
                crate::fhir::outcome::json_type(raw)
            ),
        ));
    };
    let s = s.trim();
    let parsed: Option<DateTime<FixedOffset>> = match format {
        Some(f) => DateTime::parse_from_str(s, &chrono_format(f)).ok(),
        None => DateTime::parse_from_rfc3339(s).ok(),
    };
    match parsed {
        Some(dt) => Ok(fhir_instant(&dt)),
        None if format.is_none()
            && NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").is_ok() =>
        {
            Err(bad(
                "value",
                "a date-time without a time zone; FHIR needs one",
            ))
        }
        None => Err(bad(
            "value",
            match format {
                Some(f) => format!("a date-time that does not match the format `{f}`"),
                None => "a date-time that is not RFC 3339; declare its `format`".to_string(),
            },
        )),
    }
}

/// RFC 3339 with seconds, `Z` for UTC, milliseconds only when present.
pub fn fhir_instant(dt: &DateTime<FixedOffset>) -> String {
    use chrono::SecondsFormat;
    dt.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Strips HTML tags; paragraph and line breaks become `\n`; the common entities are decoded.
pub fn strip_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('>') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let tag = rest[start + 1..start + end].trim().to_ascii_lowercase();
        if (tag.starts_with("br") || tag == "/p" || tag == "/div" || tag == "/li")
            && !out.ends_with('\n')
        {
            out.push('\n');
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn false_and_zero_are_answers() {
        assert_eq!(
            coerce(&json!(false), ItemType::Boolean, None),
            Ok(Answer::Bool(false))
        );
        assert_eq!(
            coerce(&json!(0), ItemType::Integer, None),
            Ok(Answer::Int(0))
        );
        assert_eq!(
            coerce(&json!("No"), ItemType::Boolean, None),
            Ok(Answer::Bool(false))
        );
    }

    #[test]
    fn decimals_stay_numbers_with_their_text() {
        let a = coerce(&json!("118.40"), ItemType::Decimal, None).unwrap();
        assert_eq!(a.qr_value().1.to_value().to_string(), "118.40");
        assert!(coerce(&json!("12abc"), ItemType::Decimal, None).is_err());
        assert!(coerce(&json!("NaN"), ItemType::Decimal, None).is_err());
        assert_eq!(number(&json!("007")).unwrap().to_string(), "7");
        assert_eq!(number(&json!("-.5")).unwrap().to_string(), "-0.5");
        assert_eq!(number(&json!("0")).unwrap().to_string(), "0");
        assert_eq!(number(&json!("0.25")).unwrap().to_string(), "0.25");
        assert_eq!(rounded(96.161_582_44, 2).unwrap().to_string(), "96.16");
        assert_eq!(rounded(167.640_000_1, 2).unwrap().to_string(), "167.64");
        assert_eq!(rounded(80.0, 2).unwrap().to_string(), "80");
    }

    #[test]
    fn dates_from_vendor_forms() {
        let obj = json!({"month": "11", "day": "02", "year": "1979"});
        assert_eq!(
            coerce(&obj, ItemType::Date, None),
            Ok(Answer::Date("1979-11-02".into()))
        );
        assert_eq!(
            coerce(&json!("03/14/1986"), ItemType::Date, Some("MM/DD/YYYY")),
            Ok(Answer::Date("1986-03-14".into()))
        );
        assert!(coerce(&json!("03/14/1986"), ItemType::Date, None).is_err());
        assert!(coerce(&json!("1986-02-30"), ItemType::Date, None).is_err());
        assert_eq!(
            coerce(
                &json!("2025-11-18 09:41:07 -0800"),
                ItemType::DateTime,
                Some("YYYY-MM-DD HH:mm:ss Z")
            ),
            Ok(Answer::DateTime("2025-11-18T09:41:07-08:00".into()))
        );
        assert_eq!(
            coerce(&json!("2025-11-18T16:09:47Z"), ItemType::DateTime, None),
            Ok(Answer::DateTime("2025-11-18T16:09:47Z".into()))
        );
        assert!(coerce(&json!("2025-11-18T16:09:47"), ItemType::DateTime, None).is_err());
    }

    #[test]
    fn html_is_stripped_to_lines() {
        assert_eq!(
            strip_html("<p>Levothyroxine 75 mcg</p><p>Sertraline &amp; more</p>"),
            "Levothyroxine 75 mcg\nSertraline & more"
        );
    }

    #[test]
    fn errors_never_echo_the_value() {
        let e = coerce(&json!("Maya secret"), ItemType::Integer, None).unwrap_err();
        assert!(!e.message.contains("Maya"));
    }
}
