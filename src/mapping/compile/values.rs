//! Value rules: where a value is and how it is transformed (selectors, split, pick, trim,
//! patterns and their units, value maps, formats, units, defaults), checked.

use serde_json::Value;

use super::{At, Compiler};
use crate::mapping::spec::{self, ValueSpec};
use crate::mapping::units::{self};
use crate::mapping::value::{self, CodingTarget};
use crate::mapping::{ItemType, MapTarget, Pattern, ValueMap, ValueRule};

impl Compiler<'_> {
    pub(super) fn value_rule(&mut self, at: &At, v: ValueSpec, ty: ItemType) -> ValueRule {
        if v.answer.is_some() && v.path.is_some() {
            self.err(
                at,
                "path",
                "give either `answer` (a key of the answer index) or `path`, not both",
                None,
            );
        }
        if v.answer.is_some() && !self.has_answers {
            self.err(
                at,
                "answer",
                "`answer` needs `source.answers` (where the answers are and what keys them)",
                None,
            );
        }
        if v.value.is_some() && v.answer.is_none() {
            self.err(
                at,
                "value",
                "`value` is a path inside the answer element: it needs `answer`",
                Some("use `path` for a path from the payload root".to_string()),
            );
        }
        let value = v
            .value
            .as_deref()
            .and_then(|p| self.selector(at, "value", p));
        let path = v.path.as_deref().and_then(|p| self.selector(at, "path", p));
        if v.split.as_deref() == Some("") {
            self.err(at, "split", "`split` must not be empty", None);
        }
        if v.pick.is_some() && v.split.is_none() {
            self.err(
                at,
                "pick",
                "`pick` chooses a part after `split`: add `split`",
                None,
            );
        }
        let trim = match v.trim {
            None | Some(spec::Trim::Whitespace(false)) => None,
            Some(spec::Trim::Whitespace(true)) => Some(String::new()),
            Some(spec::Trim::Chars(c)) => Some(c),
        };
        if v.pattern.is_some() && v.map.is_some() {
            self.err(
                at,
                "pattern",
                "give `pattern` (a number in free text) or `map` (options), not both",
                None,
            );
        }
        let pattern = v
            .pattern
            .map(|p| self.pattern(at, p.into_vec(), v.units, ty));
        if v.unknown_option.is_some() && v.map.is_none() {
            self.err(
                at,
                "unknown_option",
                "`unknown_option` says what an answer the value map does not know does: it needs `map`",
                None,
            );
        }
        let map = v.map.map(|m| self.value_map(at, m, ty));
        if let Some(f) = &v.format {
            if !matches!(ty, ItemType::Date | ItemType::DateTime) {
                self.err(
                    at,
                    "format",
                    "`format` applies to date and dateTime items only",
                    None,
                );
            } else if !f.contains("YYYY") {
                self.err(
                    at,
                    "format",
                    format!("date format `{f}` has no year (`YYYY`)"),
                    Some("tokens: YYYY MM DD HH mm ss Z".to_string()),
                );
            }
        }
        if let Some(from) = &v.from_unit {
            if ty != ItemType::Quantity {
                self.err(
                    at,
                    "from_unit",
                    "`from_unit` applies to quantity items only",
                    None,
                );
            } else if !units::is_known(from) {
                self.err(
                    at,
                    "from_unit",
                    format!("unknown UCUM unit `{from}`"),
                    Some(format!("known: {}", units::known_codes())),
                );
            }
        }
        if let Some(d) = &v.default {
            if ty != ItemType::Choice && ty != ItemType::Group {
                if let Err(e) = value::coerce(d, ty, v.format.as_deref()) {
                    self.err(
                        at,
                        "default",
                        format!("`default` cannot be a {}: {}", ty.fhir_code(), e.message),
                        None,
                    );
                }
            }
        }
        ValueRule {
            answer: v.answer,
            value,
            path,
            strip_html: v.strip_html,
            split: v.split,
            pick: v.pick,
            trim,
            pattern: pattern.flatten(),
            map,
            unknown_option: v.unknown_option.unwrap_or_default(),
            format: v.format,
            from_unit: v.from_unit,
            default: v.default,
        }
    }

    /// Compiles a `pattern` (its alternatives) and its `units`. Which captures it must have
    /// depends on the item (`value`, or the `sum` parts' captures): `item` checks that.
    pub(super) fn pattern(
        &mut self,
        at: &At,
        alternatives: Vec<String>,
        units_spec: Option<serde_json::Map<String, Value>>,
        ty: ItemType,
    ) -> Option<Pattern> {
        if !matches!(
            ty,
            ItemType::Decimal | ItemType::Integer | ItemType::Quantity
        ) {
            self.err(
                at,
                "pattern",
                format!(
                    "`pattern` reads a number: it applies to decimal, integer and quantity items, not {}",
                    ty.fhir_code()
                ),
                None,
            );
            return None;
        }
        if alternatives.is_empty() {
            self.err(
                at,
                "pattern",
                "`pattern` needs at least one regular expression",
                None,
            );
            return None;
        }
        let mut compiled = Vec::with_capacity(alternatives.len());
        for (i, text) in alternatives.iter().enumerate() {
            let which = if alternatives.len() > 1 {
                format!("pattern {}", i + 1)
            } else {
                "`pattern`".to_string()
            };
            let hint = Some(
                r#"a Rust regular expression with named captures, e.g. '^(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>lbs?|kg)?$'"#
                    .to_string(),
            );
            match regex::Regex::new(text) {
                Err(e) => {
                    let why = e.to_string();
                    let why = why.lines().last().unwrap_or("").trim().to_string();
                    self.err(
                        at,
                        "pattern",
                        format!("{which} is not a valid regular expression: {why}"),
                        hint,
                    );
                }
                Ok(re) => {
                    let never = regex_syntax::parse(text)
                        .map(|hir| hir.properties().minimum_len().is_none())
                        .unwrap_or(false);
                    if never {
                        self.err(
                            at,
                            "pattern",
                            format!("{which} can never match any text"),
                            hint,
                        );
                    } else if re.capture_names().flatten().next().is_none() {
                        self.err(
                            at,
                            "pattern",
                            format!("{which} has no named capture: name the number `(?P<value>…)`"),
                            hint,
                        );
                    } else {
                        compiled.push(re);
                    }
                }
            }
        }
        let mut units_map = std::collections::HashMap::new();
        for (text, code) in units_spec.into_iter().flatten() {
            match code.as_str() {
                Some(code) if units::is_known(code) => {
                    units_map.insert(text.trim().to_lowercase(), code.to_string());
                }
                _ => self.err(
                    at,
                    "units",
                    format!("`units` entry `{text}` must name a known UCUM unit"),
                    Some(format!("known: {}", units::known_codes())),
                ),
            }
        }
        (compiled.len() == alternatives.len()).then_some(Pattern {
            alternatives: compiled,
            units: units_map,
        })
    }

    pub(super) fn value_map(
        &mut self,
        at: &At,
        m: serde_json::Map<String, Value>,
        ty: ItemType,
    ) -> ValueMap {
        let mut entries = Vec::with_capacity(m.len());
        for (key, target) in m {
            match target {
                Value::Object(o) if o.contains_key("code") => {
                    let allowed = ["system", "code", "display", "score", "observe"];
                    if let Some(bad) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
                        self.err(
                            at,
                            "map",
                            format!("map entry `{key}`: unknown key `{bad}`"),
                            Some(format!("a Coding entry takes {}", allowed.join(", "))),
                        );
                    }
                    let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
                    let code = match o.get("code") {
                        Some(Value::String(s)) if !s.is_empty() => s.clone(),
                        Some(Value::Number(n)) => n.to_string(),
                        _ => {
                            self.err(
                                at,
                                "map",
                                format!("map entry `{key}`: `code` must be a non-empty string"),
                                None,
                            );
                            String::new()
                        }
                    };
                    let score = o.get("score").and_then(Value::as_f64);
                    if o.contains_key("score") && score.is_none() {
                        self.err(
                            at,
                            "map",
                            format!("map entry `{key}`: `score` must be a number"),
                            None,
                        );
                    }
                    if ty != ItemType::Choice {
                        self.err(
                            at,
                            "map",
                            format!(
                                "map entry `{key}` yields a Coding, but the item is a {}",
                                ty.fhir_code()
                            ),
                            Some("use `type: choice`, or map to a plain value".to_string()),
                        );
                    }
                    entries.push((
                        key.clone(),
                        MapTarget::Coding(CodingTarget {
                            key,
                            system: text("system"),
                            code,
                            display: text("display"),
                            score,
                            observe: o.get("observe").and_then(Value::as_bool).unwrap_or(true),
                        }),
                    ));
                }
                Value::Object(_) | Value::Array(_) => {
                    self.err(at, "map", format!("map entry `{key}` must be a Coding ({{system, code, display}}) or a plain value"), None);
                }
                v => {
                    if ty == ItemType::Choice {
                        self.err(at, "map", format!("map entry `{key}` is a plain value, but a choice item needs a Coding"), Some("write {system, code, display}".to_string()));
                    } else if ty != ItemType::Group {
                        if let Err(e) = value::coerce(&v, ty, None) {
                            self.err(
                                at,
                                "map",
                                format!(
                                    "map entry `{key}` cannot produce a {}: {}",
                                    ty.fhir_code(),
                                    e.message
                                ),
                                None,
                            );
                        }
                    }
                    entries.push((key, MapTarget::Value(v)));
                }
            }
        }
        ValueMap::new(entries)
    }

    pub(super) fn coding(&mut self, at: &At, key: &str, v: &Value) -> Option<Value> {
        match v {
            Value::Object(o)
                if o.get("code")
                    .and_then(Value::as_str)
                    .is_some_and(|c| !c.is_empty()) =>
            {
                if let Some(bad) = o
                    .keys()
                    .find(|k| !["system", "code", "display"].contains(&k.as_str()))
                {
                    self.err(
                        at,
                        key,
                        format!("unknown key `{bad}` in a Coding"),
                        Some("a Coding has system, code, display".to_string()),
                    );
                    return None;
                }
                Some(v.clone())
            }
            _ => {
                self.err(
                    at,
                    key,
                    format!("`{key}` must be a Coding with a `code`"),
                    Some(
                        "e.g. {system: http://loinc.org, code: 29463-7, display: Body weight}"
                            .to_string(),
                    ),
                );
                None
            }
        }
    }
}
