//! Collecting answers: the first half of mapping a payload. Each item's rule selects raw JSON
//! (through the answer index built once per payload, or a compiled JSONPath), the declared
//! transforms make typed `Answer`s of it, and what cannot be read with certainty is left out
//! and listed as missing, never guessed. The result is a tree of `Node`s that `resources`
//! turns into FHIR.

use std::borrow::Cow;

use serde_json::Value;

use super::condition::Answers;
use super::engine::MissingAnswer;
use super::select::AnswerIndex;
use super::value::{self, Answer};
use super::{Derivation, Item, ItemType, MapTarget, Mapping, ValueRule};
use crate::fhir::{Issue, Json};

/// An item with its answers, or a group with its children; repeating groups give one node each.
pub(super) struct Node<'m> {
    pub item: &'m Item,
    /// `weight`, `meds[1]/med-name`: unique within the submission, stable across re-sends.
    pub key: String,
    pub answers: Vec<Answer<'m>>,
    pub children: Vec<Node<'m>>,
}

pub(super) struct Run<'m, 'p> {
    pub mapping: &'m Mapping,
    pub index: AnswerIndex<'p>,
    pub issues: Vec<Issue>,
    pub missing: Vec<MissingAnswer>,
}

pub(super) fn collect<'m>(nodes: &[Node<'m>], flat: &mut Answers<'m>) {
    for n in nodes {
        if !n.answers.is_empty() {
            flat.entry(n.item.link_id.as_str())
                .or_default()
                .extend(n.answers.iter().cloned());
        }
        collect(&n.children, flat);
    }
}

/// `n` `from` one UCUM unit in `to`, rounded to `item`'s precision (2 places by default);
/// `None` if the units do not convert.
pub(super) fn in_unit(
    item: &Item,
    n: &serde_json::Number,
    from: &str,
    to: &str,
) -> Option<serde_json::Number> {
    let x = super::units::convert(n.as_f64()?, from, to).ok()?;
    value::rounded(x, item.precision.unwrap_or(2))
}

/// Where an item's raw value comes from, for error expressions (never the value).
pub(super) fn origin(rule: &ValueRule) -> String {
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
    pub(super) fn values(
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

    pub(super) fn first_string(
        &mut self,
        rule: &'m ValueRule,
        ctx: &Value,
        at: &str,
    ) -> Option<String> {
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

    pub(super) fn extract(
        &mut self,
        items: &'m [Item],
        ctx: &Value,
        prefix: &str,
    ) -> Vec<Node<'m>> {
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
    pub(super) fn derive(&mut self, nodes: &mut Vec<Node<'m>>, flat: &mut Answers<'m>) {
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
    pub(super) fn derive_all(&mut self, items: &'m [Item], flat: &mut Answers<'m>) {
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

    pub(super) fn required_when(&mut self, items: &'m [Item], flat: &Answers<'m>) {
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
    pub(super) fn demographics(&mut self, payload: &Value) -> Vec<(&'static str, Json<'static>)> {
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
