//! Collecting answers: the first half of mapping a payload. Each item's rule selects raw JSON
//! (through the answer index built once per payload, or a compiled JSONPath), the declared
//! transforms make typed `Answer`s of it, and what cannot be read with certainty is left out
//! and listed as missing, never guessed. The result is a tree of `Node`s that `resources`
//! turns into FHIR.

use std::borrow::Cow;

use serde_json::Value;

use super::condition::Answers;
use super::engine::{MissingAnswer, UNMAPPED_OPTION};
use super::plausible::IMPLAUSIBLE_VALUE;
use super::select::AnswerIndex;
use super::value::{self, Answer};
use super::{Item, ItemType, MapTarget, Mapping, UnknownOption, ValueRule};
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
    /// The flags the gateway raises itself (`implausible_value`, `unmapped_option`).
    pub raised: Vec<&'static str>,
}

impl<'m, 'p> Run<'m, 'p> {
    pub fn new(mapping: &'m Mapping, index: AnswerIndex<'p>) -> Self {
        Run {
            mapping,
            index,
            issues: Vec::new(),
            missing: Vec::new(),
            raised: Vec::new(),
        }
    }
}

/// The reason an answer its item's pattern does not match is missing.
const NO_MATCH: &str = "the answer does not match the item's pattern";

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

/// One raw value read through a rule's transforms.
enum Read<'m> {
    Answer(Answer<'m>),
    /// Text that cannot be read as the item's value with certainty (a pattern that does not
    /// match, a unit nobody named): the answer is missing, with this reason, never guessed.
    Unreadable(String),
}

/// What an item's answers came to: those read, and why others could not be.
pub(super) struct Collected<'m> {
    pub answers: Vec<Answer<'m>>,
    pub unreadable: Option<String>,
}

impl<'m, 'p> Run<'m, 'p> {
    /// The raw JSON values a rule selects in `ctx` (arrays flattened one level, blanks dropped).
    fn raw<'a>(&'a self, rule: &ValueRule, ctx: &'a Value) -> Vec<&'a Value> {
        raw(&self.index, rule, ctx)
    }

    /// Typed answers of a rule in `ctx`, after every declared transform; what cannot be read
    /// is left out.
    pub(super) fn values(
        &mut self,
        rule: &'m ValueRule,
        ty: ItemType,
        ctx: &Value,
        at: &str,
    ) -> Vec<Answer<'m>> {
        let mut answers = Vec::new();
        self.reads(rule, ty, ctx, at, String::new, &mut answers);
        answers
    }

    /// Every value a rule selects in `ctx` (its `default` when it selects none) read through
    /// its transforms, into `answers`; why the first one that could not be read with certainty
    /// was not (none: all were). A value that does not fit is an error naming `at`, where the
    /// value came from (`[i]` of several) and `label` (a `sum` part: made only for an error),
    /// never the value.
    fn reads(
        &mut self,
        rule: &'m ValueRule,
        ty: ItemType,
        ctx: &Value,
        at: &str,
        label: impl Fn() -> String,
        answers: &mut Vec<Answer<'m>>,
    ) -> Option<String> {
        let (index, issues, raised) = (&self.index, &mut self.issues, &mut self.raised);
        let raws = raw(index, rule, ctx);
        let sources: Vec<&Value> = if raws.is_empty() {
            rule.default.iter().collect()
        } else {
            raws
        };
        let several = sources.len() > 1;
        let mut unreadable = None;
        for (i, raw) in sources.into_iter().enumerate() {
            let parts = split(rule, raw);
            let many = several || parts.len() > 1;
            for (j, part) in parts.iter().enumerate() {
                match read(rule, ty, part) {
                    Ok(Read::Answer(a)) => {
                        let kept = matches!(a, Answer::Str(_));
                        if ty == ItemType::Choice && kept && !raised.contains(&UNMAPPED_OPTION) {
                            raised.push(UNMAPPED_OPTION);
                        }
                        answers.push(a);
                    }
                    Ok(Read::Unreadable(why)) => {
                        unreadable.get_or_insert(why);
                    }
                    Err((code, msg)) => {
                        let mut whence = origin(rule);
                        if several {
                            whence.push_str(&format!("[{i}]"));
                        }
                        let which = if !many {
                            String::new()
                        } else if several && parts.len() > 1 {
                            format!("answer {}, part {}: ", i + 1, j + 1)
                        } else {
                            format!("answer {}: ", i.max(j) + 1)
                        };
                        issues.push(
                            Issue::error(code, format!("{}{which}{msg}", label()))
                                .at(at.to_string())
                                .at(whence),
                        );
                    }
                }
            }
        }
        unreadable
    }

    /// Raises a flag of the gateway's own (`implausible_value`, `unmapped_option`) once.
    fn raise(&mut self, flag: &'static str) {
        if !self.raised.contains(&flag) {
            self.raised.push(flag);
        }
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

    fn item_answers(&mut self, item: &'m Item, ctx: &Value, key: &str) -> Collected<'m> {
        if !item.sum.is_empty() {
            return self.sum_parts(item, ctx, key);
        }
        let mut answers = Vec::new();
        let unreadable = self.reads(
            &item.rule,
            item.item_type,
            ctx,
            key,
            String::new,
            &mut answers,
        );
        if item.item_type == ItemType::Quantity {
            let unit = item.unit.as_deref().unwrap_or("1");
            answers = answers
                .into_iter()
                .filter_map(|a| {
                    // A number in the unit the vendor uses (`from_unit`), or in the unit its
                    // text named (a pattern's `unit` capture).
                    let (n, from) = match a {
                        Answer::Dec(n) => (n, item.rule.from_unit.as_deref().unwrap_or(unit)),
                        Answer::Quantity(n, from) => (n, from),
                        other => return Some(other),
                    };
                    if from == unit {
                        return Some(Answer::Quantity(n, unit));
                    }
                    let n = in_unit(item, &n, from, unit);
                    if n.is_none() {
                        self.issues.push(
                            Issue::error("value", "the number could not be converted")
                                .at(key.to_string()),
                        );
                    }
                    n.map(|n| Answer::Quantity(n, unit))
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
        Collected {
            answers,
            unreadable,
        }
    }

    /// A composite quantity (feet + inches, or the captures of a pattern): the sum of its
    /// parts, each converted to the item's unit; 0 is an answer. A part that selects nothing
    /// and has no `default` makes the whole item unreadable — a height of 6 inches is not a
    /// height with its feet skipped.
    fn sum_parts(&mut self, item: &'m Item, ctx: &Value, key: &str) -> Collected<'m> {
        let unit = item.unit.as_deref().unwrap_or("1");
        let nothing = |unreadable: Option<String>| Collected {
            answers: Vec::new(),
            unreadable,
        };
        // Each part's number in its own unit; `None` for a part that selected nothing.
        let mut numbers: Vec<(usize, Option<f64>)> = Vec::with_capacity(item.sum.len());
        let mut answered = false;
        if let Some(pattern) = &item.rule.pattern {
            let Some(text) = self.first_text(&item.rule, ctx) else {
                return nothing(None);
            };
            let Some((re, caps)) = pattern.matching(&text) else {
                return nothing(Some(NO_MATCH.to_string()));
            };
            answered = true;
            for (i, part) in item.sum.iter().enumerate() {
                let Some(name) = part.capture.as_deref() else {
                    continue;
                };
                // A capture of another alternative: this part does not apply to this text.
                if !re.capture_names().flatten().any(|n| n == name) {
                    continue;
                }
                let n = match caps.name(name) {
                    Some(m) => match value::number(&Value::String(m.as_str().to_string())) {
                        Some(n) => n.as_f64(),
                        None => {
                            return nothing(Some(format!(
                                "the pattern's capture `{name}` is not a number"
                            )))
                        }
                    },
                    None => part
                        .rule
                        .default
                        .as_ref()
                        .and_then(|d| value::number(d)?.as_f64()),
                };
                numbers.push((i, n));
            }
        } else {
            for (i, part) in item.sum.iter().enumerate() {
                answered |= !raw(&self.index, &part.rule, ctx).is_empty();
                let label = || format!("sum part {} ({}): ", i + 1, part.name());
                let mut read = Vec::new();
                self.reads(&part.rule, ItemType::Decimal, ctx, key, label, &mut read);
                let n = read.iter().find_map(Answer::as_f64);
                numbers.push((i, n));
            }
        }
        if !answered {
            return nothing(None);
        }
        let mut total = 0.0;
        for (i, n) in numbers {
            let part = &item.sum[i];
            let Some(n) = n else {
                return nothing(Some(format!(
                    "sum part {} ({}) was not answered: the item cannot be read without it",
                    i + 1,
                    part.name()
                )));
            };
            match super::units::convert(n, &part.unit, unit) {
                Ok(x) => total += x,
                Err(_) => {
                    self.issues.push(
                        Issue::error(
                            "value",
                            format!(
                                "sum part {} ({}) could not be converted",
                                i + 1,
                                part.name()
                            ),
                        )
                        .at(key.to_string()),
                    );
                    return nothing(None);
                }
            }
        }
        Collected {
            answers: value::rounded(total, item.precision.unwrap_or(2))
                .map(|n| Answer::Quantity(n, unit))
                .into_iter()
                .collect(),
            unreadable: None,
        }
    }

    /// The first text a rule selects, after `strip_html`, `split`, `pick` and `trim` (what a
    /// `sum` item's pattern reads); numbers as written.
    fn first_text(&self, rule: &ValueRule, ctx: &Value) -> Option<String> {
        let raws = raw(&self.index, rule, ctx);
        let first = raws.first()?;
        split(rule, first)
            .into_iter()
            .find_map(|v| match v.as_ref() {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
    }

    /// The answers of `item` that are plausible. Each one outside its range (a quantity's, or
    /// a part of a free-text blood pressure) is held back: the item is listed as missing with
    /// the reason, and `implausible_value` is raised.
    pub(super) fn plausible(
        &mut self,
        item: &'m Item,
        mut answers: Vec<Answer<'m>>,
    ) -> Collected<'m> {
        let mut unreadable = None;
        // In place: most items have nothing to hold back, and no second list is made for them.
        answers.retain(|a| match implausible(item, a) {
            Some(why) => {
                unreadable.get_or_insert(why);
                false
            }
            None => true,
        });
        if unreadable.is_some() {
            self.raise(IMPLAUSIBLE_VALUE);
        }
        Collected {
            answers,
            unreadable,
        }
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
                let read = self.item_answers(item, ctx, &key);
                let checked = self.plausible(item, read.answers);
                if let Some(why) = read.unreadable.or(checked.unreadable) {
                    self.note_unreadable(item, &key, why);
                } else if checked.answers.is_empty() {
                    self.note_missing(item);
                }
                if !checked.answers.is_empty() {
                    nodes.push(Node {
                        item,
                        key,
                        answers: checked.answers,
                        children: Vec::new(),
                    });
                }
            }
        }
        nodes
    }

    /// An answer given but not charted (unreadable or implausible): listed as missing with
    /// the reason, whether or not the item is required — the patient meant to answer it.
    pub(super) fn note_unreadable(&mut self, item: &'m Item, key: &str, reason: String) {
        self.issues.push(
            Issue::warning("value", format!("`{}` not charted: {reason}", item.link_id))
                .at(key.to_string()),
        );
        self.missing.push(MissingAnswer {
            link_id: item.link_id.clone(),
            text: item.text.clone(),
            reason: Some(reason),
        });
    }

    pub(super) fn note_missing(&mut self, item: &'m Item) {
        if item.required {
            self.missing.push(MissingAnswer {
                link_id: item.link_id.clone(),
                text: item.text.clone(),
                reason: None,
            });
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

/// Why an answer is implausible for its item (`None`: it is plausible, or nothing says).
fn implausible(item: &Item, a: &Answer<'_>) -> Option<String> {
    if let (Some(range), Some(x)) = (&item.range, a.as_f64()) {
        if !range.contains(x) {
            return Some(range.reason());
        }
    }
    // A free-text blood pressure: each number against its component's range.
    if let (Answer::Str(s), Some(o)) = (a, &item.observation) {
        if let super::Components::Split { separator, parts } = &o.components {
            let numbers: Vec<Option<f64>> = s
                .split(separator.as_str())
                .map(|p| value::number(&Value::String(p.trim().to_string()))?.as_f64())
                .collect();
            if numbers.len() == parts.len() {
                for (n, part) in numbers.iter().zip(parts) {
                    if let (Some(n), Some(r)) = (n, &part.range) {
                        if !r.contains(*n) {
                            let code = part.code.get("code").and_then(Value::as_str).unwrap_or("");
                            return Some(format!("component {code}: {}", r.reason()));
                        }
                    }
                }
            }
        }
    }
    None
}

/// One raw value (a part, after `split`) read as the item's type: through its pattern (a
/// number, and the unit its text names), or its value map and coercion.
fn read<'m>(
    rule: &'m ValueRule,
    ty: ItemType,
    raw: &Value,
) -> Result<Read<'m>, (&'static str, String)> {
    let Some(pattern) = &rule.pattern else {
        return convert(rule, ty, raw).map(Read::Answer);
    };
    let text: Cow<'_, str> = match raw {
        Value::String(s) => Cow::Borrowed(s.as_str()),
        Value::Number(n) => Cow::Owned(n.to_string()),
        other => {
            let kind = crate::fhir::outcome::json_type(other);
            return Err((
                "value",
                format!("expected text for `pattern` to read, got {kind}"),
            ));
        }
    };
    let Some((_, caps)) = pattern.matching(&text) else {
        return Ok(Read::Unreadable(NO_MATCH.to_string()));
    };
    let Some(number) = caps
        .name("value")
        .and_then(|m| value::number(&Value::String(m.as_str().to_string())))
    else {
        return Ok(Read::Unreadable(
            "the pattern's capture `value` is not a number".to_string(),
        ));
    };
    let unit = match caps.name("unit") {
        None => None,
        Some(m) => match pattern.unit_of(m.as_str()) {
            Some(code) => Some(code),
            None => {
                return Ok(Read::Unreadable(
                    "the answer names a unit the map does not know (add it to `units`)".to_string(),
                ))
            }
        },
    };
    let answer =
        value::coerce(&Value::Number(number), ty, None).map_err(|e| (e.code, e.message))?;
    Ok(Read::Answer(match (answer, unit) {
        (Answer::Dec(n), Some(code)) => Answer::Quantity(n, code),
        (a, _) => a,
    }))
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
                // Kept as the text it is (the QuestionnaireResponse's `valueString`), charted
                // as no Observation, and flagged for a person to look at.
                None if rule.unknown_option == UnknownOption::Keep && ty == ItemType::Choice => {
                    return Ok(Answer::Str(key.into_owned()));
                }
                None => {
                    let n = map.entries.len();
                    let msg = format!(
                        "an option that is not one of the {n} of the value map; add it to `map`, or set `unknown_option: keep`"
                    );
                    return Err(("code-invalid", msg));
                }
            }
        }
    };
    value::coerce(mapped, ty, rule.format.as_deref()).map_err(|e| (e.code, e.message))
}

/// Splits a raw string into parts as the rule says (after stripping HTML), picks one, trims
/// them; other values pass. With `pick`, a text without the separator has no part to pick.
fn split<'a>(rule: &ValueRule, raw: &'a Value) -> Vec<Cow<'a, Value>> {
    let Value::String(s) = raw else {
        return vec![Cow::Borrowed(raw)];
    };
    if !rule.strip_html && rule.split.is_none() && rule.trim.is_none() {
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
    let trim = |p: &'_ str| -> String {
        match &rule.trim {
            Some(chars) => p
                .trim_matches(|c: char| c.is_whitespace() || chars.contains(c))
                .to_string(),
            None => p.trim().to_string(),
        }
    };
    let parts: Vec<String> = match &rule.split {
        Some(sep) if rule.pick.is_some() && !s.contains(sep.as_str()) => Vec::new(),
        Some(sep) => s
            .split(sep.as_str())
            .map(trim)
            .filter(|p| !p.is_empty())
            .collect(),
        None => vec![trim(&s)],
    };
    let picked: Vec<String> = match rule.pick {
        None => parts,
        Some(n) => {
            let i = if n < 0 {
                usize::try_from(n.unsigned_abs())
                    .ok()
                    .and_then(|back| parts.len().checked_sub(back))
            } else {
                usize::try_from(n).ok()
            };
            i.and_then(|i| parts.into_iter().nth(i))
                .into_iter()
                .collect()
        }
    };
    picked
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| Cow::Owned(Value::String(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::split;
    use crate::mapping::ValueRule;

    fn parts(rule: &ValueRule, text: &str) -> Vec<String> {
        split(rule, &json!(text))
            .into_iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// `pick` counts from the end when negative; past the parts, or without the separator,
    /// there is nothing to pick (never the whole text); `trim` takes the characters it names.
    #[test]
    fn pick_and_trim_take_only_what_is_there() {
        let rule = |pick: i64, trim: Option<&str>| ValueRule {
            split: Some(" ".into()),
            pick: Some(pick),
            trim: trim.map(str::to_string),
            ..ValueRule::default()
        };
        assert_eq!(parts(&rule(0, None), "Thomas J. Becker"), ["Thomas"]);
        assert_eq!(parts(&rule(-1, None), "Thomas J. Becker"), ["Becker"]);
        assert_eq!(parts(&rule(-2, Some(".")), "Thomas J. Becker"), ["J"]);
        assert!(parts(&rule(3, None), "Thomas J. Becker").is_empty());
        assert!(parts(&rule(-4, None), "Thomas J. Becker").is_empty());
        assert!(parts(&rule(0, None), "Madonna").is_empty(), "no separator");
        let whole = ValueRule {
            trim: Some(".,".into()),
            ..ValueRule::default()
        };
        assert_eq!(parts(&whole, " Becker., "), ["Becker"]);
        assert_eq!(
            split(&whole, &Value::Bool(true)).len(),
            1,
            "non-text passes"
        );
    }
}
