//! Whether a QuestionnaireResponse fits its Questionnaire, before anything of it is charted.
//!
//! A response to another version of a form, a weight sent as the text `"81.2 kg"` where the form
//! asks for a decimal, two body weights for a question that takes one: each would reach the EHR
//! as data that looks right and is not. `check` reads the Questionnaire and the response side
//! by side and sorts what it finds into three kinds:
//!
//! - **Refusals**: the Questionnaire itself is invalid (duplicate linkIds, wrong JSON types), or
//!   the response does not fit it (an unknown linkId, an item where the form does not have it,
//!   an answer of the wrong type, several answers to an item that does not repeat, an option the
//!   form never offered, text past `maxLength`). The caller answers 4xx and stores nothing; each
//!   issue names the linkId and the FHIRPath location.
//! - **Left out**: answers that fit the form but must not be charted — those to an item that
//!   `enableWhen` disables (a pregnancy status for a patient who answered male), and numbers
//!   outside the item's `minValue`/`maxValue` (or SDC's `minQuantity`/`maxQuantity`). The rest
//!   of the response is charted.
//! - Nothing else: unknown elements on a response item (some forms copy `code` onto it) are not
//!   this check's business.
//!
//! Each rule names its source (FHIR R4 `Questionnaire` and `QuestionnaireResponse` invariants
//! and element definitions, and what HAPI's QuestionnaireResponse validator reports as errors).
//! Pure logic: JSON in, findings out.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::fhir::Issue;

use super::questionnaire::{MAX_QUANTITY, MAX_VALUE, MIN_QUANTITY, MIN_VALUE};

/// R5's `answerConstraint`, as R4 carries it (the cross-version extension).
const ANSWER_CONSTRAINT: &str =
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-Questionnaire.item.answerConstraint";

/// What `check` found.
#[derive(Debug, Default)]
pub struct Fit {
    /// Why the response cannot be charted at all (errors, each at its FHIRPath).
    pub refusals: Vec<Issue>,
    /// Answers that are not to be charted, the rest of the response being fine.
    pub left_out: Vec<LeftOut>,
}

/// An answer (or a whole item, with what is under it) that is not charted.
#[derive(Debug, Clone, PartialEq)]
pub struct LeftOut {
    pub link_id: String,
    /// FHIRPath of the response item (`QuestionnaireResponse.item[1].item[0]`) or of one of its
    /// answers (`….answer[0]`).
    pub at: String,
    pub why: Why,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Why {
    /// Its item is disabled by `enableWhen` (or under a disabled item).
    Disabled,
    /// Outside the item's bounds: the bounds, never the value.
    OutOfRange(String),
}

impl LeftOut {
    /// The warning the caller gives for it.
    pub fn issue(&self) -> Issue {
        let text = match &self.why {
            Why::Disabled => format!(
                "item `{}` is disabled by its enableWhen: its answer is left out",
                self.link_id
            ),
            Why::OutOfRange(bounds) => format!(
                "item `{}`: an answer outside {bounds} is left out (implausible)",
                self.link_id
            ),
        };
        Issue::warning("business-rule", text).at(self.at.clone())
    }
}

/// One Questionnaire item, as the checks need it.
struct Def<'q> {
    item: &'q Value,
    kind: &'q str,
    repeats: bool,
    /// The linkId of the item it is nested in (none at the top).
    parent: Option<&'q str>,
}

/// One item of the response, with where it is.
struct Node<'r> {
    link_id: &'r str,
    item: &'r Value,
    parent: Option<usize>,
    depth: usize,
    at: String,
    /// FHIRPath of what holds it: the response, its parent item, or one of its parent's
    /// answers (siblings are the items of one container).
    container: String,
}

/// Checks `response` against `questionnaire` (both already known to be of those types).
pub fn check(questionnaire: &Value, response: &Value) -> Fit {
    let mut fit = Fit::default();
    let mut defs = HashMap::new();
    define(
        items_in(questionnaire),
        None,
        "Questionnaire",
        &mut defs,
        &mut fit.refusals,
    );
    if !fit.refusals.is_empty() {
        // An invalid Questionnaire says nothing reliable about its responses.
        return fit;
    }
    let mut nodes = Vec::new();
    collect(
        items_in(response),
        None,
        0,
        "QuestionnaireResponse",
        &mut nodes,
    );
    let checker = Checker {
        defs: &defs,
        nodes: &nodes,
        by_link: index(&nodes),
    };
    checker.structure(&mut fit.refusals);
    if !fit.refusals.is_empty() {
        return fit;
    }
    let mut enabled = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let own_disabled = !checker.enabled(i, &mut enabled, &mut HashSet::new());
        let parent_disabled = node
            .parent
            .is_some_and(|p| !checker.enabled(p, &mut enabled, &mut HashSet::new()));
        if own_disabled && !parent_disabled && has_answers(node.item) {
            fit.left_out.push(LeftOut {
                link_id: node.link_id.to_string(),
                at: node.at.clone(),
                why: Why::Disabled,
            });
        }
        if own_disabled {
            continue;
        }
        if let Some(def) = defs.get(node.link_id) {
            for (k, answer) in answers_of(node.item).iter().enumerate() {
                if let Some(bounds) = out_of_range(def.item, answer) {
                    fit.left_out.push(LeftOut {
                        link_id: node.link_id.to_string(),
                        at: format!("{}.answer[{k}]", node.at),
                        why: Why::OutOfRange(bounds),
                    });
                }
            }
        }
    }
    fit
}

/// The linkIds of the Questionnaire's items that `response` leaves disabled where they would
/// stand (`enableWhen` read against its enabled answers): a required one of them is not missing.
pub fn disabled_items(questionnaire: &Value, response: &Value) -> HashSet<String> {
    let mut defs = HashMap::new();
    let mut ignored = Vec::new();
    define(
        items_in(questionnaire),
        None,
        "Questionnaire",
        &mut defs,
        &mut ignored,
    );
    let mut nodes = Vec::new();
    collect(
        items_in(response),
        None,
        0,
        "QuestionnaireResponse",
        &mut nodes,
    );
    let checker = Checker {
        defs: &defs,
        nodes: &nodes,
        by_link: index(&nodes),
    };
    let mut memo = HashMap::new();
    defs.keys()
        .filter(|id| !checker.enabled_absent(id, &mut memo))
        .map(|id| id.to_string())
        .collect()
}

fn items_in(v: &Value) -> &[Value] {
    v.get("item")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn answers_of(item: &Value) -> &[Value] {
    item.get("answer")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn has_answers(item: &Value) -> bool {
    !answers_of(item).is_empty() || items_in(item).iter().any(has_answers)
}

/// The value of `v`'s extension `url`.
fn extension<'v>(v: &'v Value, url: &str) -> Option<&'v Value> {
    v.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
        .and_then(value_of)
}

/// The `value[x]` of an answer, an option or an extension: its name and value.
fn value_entry(v: &Value) -> Option<(&str, &Value)> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("value"))
        .map(|(k, v)| (k.as_str(), v))
}

fn value_of(v: &Value) -> Option<&Value> {
    value_entry(v).map(|(_, v)| v)
}

/// The item types of FHIR R4 (`Questionnaire.item.type`, required binding).
const ITEM_TYPES: [&str; 17] = [
    "group",
    "display",
    "boolean",
    "decimal",
    "integer",
    "date",
    "dateTime",
    "time",
    "string",
    "text",
    "url",
    "choice",
    "open-choice",
    "attachment",
    "reference",
    "quantity",
    "question",
];

/// Indexes the Questionnaire's items by linkId, refusing what makes it invalid: an item
/// without a linkId (R4: 1..1), a linkId used twice (que-2), members of the wrong JSON type
/// (`"repeats": "true"`: R4 makes `required`, `repeats`, `readOnly` booleans and `maxLength`
/// an integer; HAPI's parser refuses such a resource), an unknown `type`.
fn define<'q>(
    items: &'q [Value],
    parent: Option<&'q str>,
    at: &str,
    defs: &mut HashMap<&'q str, Def<'q>>,
    refusals: &mut Vec<Issue>,
) {
    for (i, item) in items.iter().enumerate() {
        let here = format!("{at}.item[{i}]");
        let Some(link_id) = item.get("linkId").and_then(Value::as_str) else {
            refusals.push(
                Issue::error(
                    "structure",
                    "a Questionnaire item without a linkId (R4: 1..1)",
                )
                .at(here),
            );
            continue;
        };
        let wrong = |member: &str, wanted: &str| {
            Issue::error(
                "structure",
                format!("Questionnaire item `{link_id}`: `{member}` must be {wanted}"),
            )
            .at(format!("{here}.{member}"))
        };
        for member in ["required", "repeats", "readOnly"] {
            if item.get(member).is_some_and(|v| !v.is_boolean()) {
                refusals.push(wrong(member, "a boolean (true or false, not text)"));
            }
        }
        if item.get("maxLength").is_some_and(|v| v.as_u64().is_none()) {
            refusals.push(wrong("maxLength", "a non-negative integer"));
        }
        for member in ["item", "answerOption", "enableWhen", "code", "extension"] {
            if item.get(member).is_some_and(|v| !v.is_array()) {
                refusals.push(wrong(member, "an array"));
            }
        }
        let kind = match item.get("type") {
            Some(Value::String(t)) if ITEM_TYPES.contains(&t.as_str()) => t.as_str(),
            _ => {
                refusals.push(wrong("type", "one of R4's item types"));
                ""
            }
        };
        if defs.contains_key(link_id) {
            refusals.push(
                Issue::error(
                    "structure",
                    format!(
                        "the Questionnaire has two items with linkId `{link_id}` (que-2: linkIds are unique): which one an answer is for cannot be told"
                    ),
                )
                .at(format!("{here}.linkId")),
            );
        } else {
            defs.insert(
                link_id,
                Def {
                    item,
                    kind,
                    repeats: item.get("repeats").and_then(Value::as_bool) == Some(true),
                    parent,
                },
            );
        }
        define(items_in(item), Some(link_id), &here, defs, refusals);
    }
}

/// Every item of the response, depth first, with its parent and FHIRPath (children of a
/// question sit under its answers: `….answer[k].item[j]`).
fn collect<'r>(
    items: &'r [Value],
    parent: Option<usize>,
    depth: usize,
    at: &str,
    out: &mut Vec<Node<'r>>,
) {
    for (i, item) in items.iter().enumerate() {
        let here = format!("{at}.item[{i}]");
        let index = out.len();
        out.push(Node {
            link_id: item.get("linkId").and_then(Value::as_str).unwrap_or(""),
            item,
            parent,
            depth,
            at: here.clone(),
            container: at.to_string(),
        });
        collect(items_in(item), Some(index), depth + 1, &here, out);
        for (k, answer) in answers_of(item).iter().enumerate() {
            collect(
                items_in(answer),
                Some(index),
                depth + 1,
                &format!("{here}.answer[{k}]"),
                out,
            );
        }
    }
}

fn index<'r>(nodes: &[Node<'r>]) -> HashMap<&'r str, Vec<usize>> {
    let mut by_link: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        by_link.entry(n.link_id).or_default().push(i);
    }
    by_link
}

struct Checker<'q, 'r> {
    defs: &'q HashMap<&'q str, Def<'q>>,
    nodes: &'r [Node<'r>],
    by_link: HashMap<&'r str, Vec<usize>>,
}

impl Checker<'_, '_> {
    /// Refuses a response that does not fit the Questionnaire's structure and types.
    fn structure(&self, refusals: &mut Vec<Issue>) {
        // Occurrences of each linkId under one parent (R4 qrs-2: one item per question, its
        // answers together; only a repeating group occurs more than once).
        let mut siblings: HashMap<(&str, &str), usize> = HashMap::new();
        for node in self.nodes {
            *siblings
                .entry((node.container.as_str(), node.link_id))
                .or_default() += 1;
        }
        let mut told: HashSet<(&str, &str)> = HashSet::new();
        for node in self.nodes {
            let id = node.link_id;
            if id.is_empty() {
                refusals.push(
                    Issue::error("structure", "a response item without a linkId (R4: 1..1)")
                        .at(node.at.clone()),
                );
                continue;
            }
            let Some(def) = self.defs.get(id) else {
                refusals.push(
                    Issue::error(
                        "structure",
                        format!(
                            "item `{id}`: the Questionnaire has no such item (is the response to another version of the form?)"
                        ),
                    )
                    .at(node.at.clone()),
                );
                continue;
            };
            let parent_link = node.parent.map(|p| self.nodes[p].link_id);
            if parent_link != def.parent {
                let wanted = match def.parent {
                    Some(p) => format!("under item `{p}`"),
                    None => "at the top of the response".to_string(),
                };
                refusals.push(
                    Issue::error(
                        "structure",
                        format!("item `{id}` is not where the Questionnaire has it ({wanted})"),
                    )
                    .at(node.at.clone()),
                );
                continue;
            }
            let key = (node.container.as_str(), id);
            let times = siblings.get(&key).copied().unwrap_or(1);
            if times > 1 && !(def.kind == "group" && def.repeats) && told.insert(key) {
                refusals.push(
                    Issue::error(
                        "structure",
                        format!(
                            "item `{id}` occurs {times} times; the Questionnaire has it once (several answers go in one item's `answer`)"
                        ),
                    )
                    .at(node.at.clone()),
                );
            }
            self.answers(node, def, refusals);
        }
    }

    /// The answers of one item against its definition: how many, of what type, which option.
    fn answers(&self, node: &Node<'_>, def: &Def<'_>, refusals: &mut Vec<Issue>) {
        let id = node.link_id;
        let answers = answers_of(node.item);
        if answers.is_empty() {
            return;
        }
        if matches!(def.kind, "group" | "display") {
            refusals.push(
                Issue::error(
                    "structure",
                    format!("item `{id}` is a {} and takes no answer", def.kind),
                )
                .at(format!("{}.answer", node.at)),
            );
            return;
        }
        if answers.len() > 1 && !def.repeats {
            refusals.push(
                Issue::error(
                    "structure",
                    format!(
                        "item `{id}` has {} answers and does not repeat",
                        answers.len()
                    ),
                )
                .at(format!("{}.answer", node.at)),
            );
        }
        let options: Vec<(&str, &Value)> = def
            .item
            .get("answerOption")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(value_entry)
            .collect();
        let constraint = def
            .item
            .get("answerConstraint")
            .and_then(Value::as_str)
            .or_else(|| extension(def.item, ANSWER_CONSTRAINT).and_then(Value::as_str));
        for (k, answer) in answers.iter().enumerate() {
            let at = format!("{}.answer[{k}]", node.at);
            let Some((kind, value)) = value_entry(answer) else {
                if items_in(answer).is_empty() {
                    refusals.push(
                        Issue::error(
                            "required",
                            format!("item `{id}`: an answer without a value"),
                        )
                        .at(at),
                    );
                }
                continue;
            };
            if let Err(why) = json_type(kind, value) {
                refusals.push(Issue::error("structure", format!("item `{id}`: {why}")).at(at));
                continue;
            }
            if let Some(why) = self.allowed(def, kind, value, &options, constraint) {
                refusals.push(Issue::error("value", format!("item `{id}`: {why}")).at(at));
                continue;
            }
            if let (Some(max), Value::String(s)) =
                (def.item.get("maxLength").and_then(Value::as_u64), value)
            {
                let len = s.chars().count() as u64;
                if len > max {
                    refusals.push(
                        Issue::error(
                            "too-long",
                            format!(
                                "item `{id}`: an answer of {len} characters; maxLength is {max}"
                            ),
                        )
                        .at(at),
                    );
                }
            }
        }
    }

    /// Why an answer of kind `kind` does not fit an item (`None`: it does). R4's item types
    /// take one `value[x]` each (`Questionnaire.item.type`'s definitions); a `choice` takes its
    /// options (of the kind they are) and nothing else, an `open-choice` its options or text;
    /// `answerConstraint` (R5, by extension in R4) says the same for any type.
    fn allowed(
        &self,
        def: &Def<'_>,
        kind: &str,
        value: &Value,
        options: &[(&str, &Value)],
        constraint: Option<&str>,
    ) -> Option<String> {
        let own = match def.kind {
            "boolean" => "valueBoolean",
            "decimal" => "valueDecimal",
            "integer" => "valueInteger",
            "date" => "valueDate",
            "dateTime" => "valueDateTime",
            "time" => "valueTime",
            "string" | "text" => "valueString",
            "url" => "valueUri",
            "attachment" => "valueAttachment",
            "reference" => "valueReference",
            "quantity" => "valueQuantity",
            "choice" | "open-choice" => "valueCoding",
            _ => "",
        };
        let constraint = constraint.unwrap_or(match def.kind {
            "choice" => "optionsOnly",
            "open-choice" => "optionsOrString",
            _ => "optionsOrType",
        });
        let is_option = || {
            options
                .iter()
                .any(|(k, option)| *k == kind && same_value(kind, option, value))
        };
        let option_kind = options.iter().any(|(k, _)| *k == kind);
        let choice_like = matches!(def.kind, "choice" | "open-choice");
        // A choice whose options come from a value set (no answerOption) cannot be checked
        // against them here: its Codings are taken.
        if options.is_empty() {
            let ok = kind == own
                || (constraint == "optionsOrString" && kind == "valueString")
                || (choice_like && kind == "valueCoding");
            return (!ok).then(|| format!("a {kind} answer to a {} item", def.kind));
        }
        match constraint {
            "optionsOnly" if is_option() => None,
            "optionsOrString" if is_option() || kind == "valueString" => None,
            "optionsOrType" if is_option() || (kind == own && !choice_like) => None,
            _ if option_kind || kind == own => Some(format!(
                "an answer that is not one of the {} options the form offers",
                options.len()
            )),
            _ => Some(format!("a {kind} answer to a {} item", def.kind)),
        }
    }

    /// Whether response item `i` is enabled: its item's `enableWhen` holds (against enabled
    /// answers, the nearest ones first) and so does its parent's.
    fn enabled(
        &self,
        i: usize,
        memo: &mut HashMap<usize, bool>,
        visiting: &mut HashSet<usize>,
    ) -> bool {
        if let Some(&e) = memo.get(&i) {
            return e;
        }
        // A cycle of enableWhen through answers: not enabled (an invalid Questionnaire; not
        // charting is the safe side).
        if !visiting.insert(i) {
            return false;
        }
        let node = &self.nodes[i];
        let parent_ok = node.parent.is_none_or(|p| self.enabled(p, memo, visiting));
        let own = match self.defs.get(node.link_id) {
            Some(def) => self.conditions_hold(def.item, Some(i), memo, visiting),
            None => true,
        };
        visiting.remove(&i);
        let e = parent_ok && own;
        memo.insert(i, e);
        e
    }

    /// Whether an item the response does not have would be enabled: its `enableWhen`, and its
    /// ancestors', read against the whole response.
    fn enabled_absent(&self, link_id: &str, memo: &mut HashMap<usize, bool>) -> bool {
        let mut id = Some(link_id);
        while let Some(current) = id {
            let Some(def) = self.defs.get(current) else {
                return true;
            };
            if !self.conditions_hold(def.item, None, memo, &mut HashSet::new()) {
                return false;
            }
            id = def.parent;
        }
        true
    }

    /// An item's `enableWhen` conditions, combined by `enableBehavior` (`all` when it is not
    /// given: R4's que-12 asks for it with more than one, and holding back is the safe side).
    fn conditions_hold(
        &self,
        item: &Value,
        context: Option<usize>,
        memo: &mut HashMap<usize, bool>,
        visiting: &mut HashSet<usize>,
    ) -> bool {
        let Some(conditions) = item.get("enableWhen").and_then(Value::as_array) else {
            return true;
        };
        if conditions.is_empty() {
            return true;
        }
        let any = item.get("enableBehavior").and_then(Value::as_str) == Some("any");
        let mut results = conditions
            .iter()
            .map(|c| self.condition(c, context, memo, visiting));
        if any {
            results.any(|r| r)
        } else {
            results.all(|r| r)
        }
    }

    /// One `enableWhen`: its question's enabled answers (the occurrences nearest to
    /// `context`) compared with `answer[x]` by `operator` (R4: `exists`, `=`, `!=`, `>`, `<`,
    /// `>=`, `<=`; `!=` holds when no answer is equal).
    fn condition(
        &self,
        c: &Value,
        context: Option<usize>,
        memo: &mut HashMap<usize, bool>,
        visiting: &mut HashSet<usize>,
    ) -> bool {
        let question = c.get("question").and_then(Value::as_str).unwrap_or("");
        let operator = c.get("operator").and_then(Value::as_str).unwrap_or("=");
        let expected = c
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.starts_with("answer")))
            .map(|(k, v)| (format!("value{}", &k["answer".len()..]), v));
        let occurrences: Vec<usize> = self
            .nearest(question, context)
            .into_iter()
            .filter(|&q| self.enabled(q, memo, visiting))
            .collect();
        let answers: Vec<(&str, &Value)> = occurrences
            .iter()
            .flat_map(|&q| answers_of(self.nodes[q].item))
            .filter_map(value_entry)
            .collect();
        if operator == "exists" {
            let wanted = expected.and_then(|(_, v)| v.as_bool()).unwrap_or(true);
            return answers.is_empty() != wanted;
        }
        let Some((kind, expected)) = expected else {
            return false;
        };
        let compared = |(k, v): &(&str, &Value)| -> Option<std::cmp::Ordering> {
            (*k == kind.as_str())
                .then(|| compare(&kind, v, expected))
                .flatten()
        };
        use std::cmp::Ordering::*;
        match operator {
            "=" => answers.iter().any(|a| compared(a) == Some(Equal)),
            "!=" => !answers.iter().any(|a| compared(a) == Some(Equal)),
            ">" => answers.iter().any(|a| compared(a) == Some(Greater)),
            "<" => answers.iter().any(|a| compared(a) == Some(Less)),
            ">=" => answers
                .iter()
                .any(|a| matches!(compared(a), Some(Greater | Equal))),
            "<=" => answers
                .iter()
                .any(|a| matches!(compared(a), Some(Less | Equal))),
            _ => false,
        }
    }

    /// The occurrences of `link_id` nearest to `context` (those sharing its deepest
    /// ancestor); all of them without a context.
    fn nearest(&self, link_id: &str, context: Option<usize>) -> Vec<usize> {
        let Some(all) = self.by_link.get(link_id) else {
            return Vec::new();
        };
        let Some(context) = context else {
            return all.clone();
        };
        let mut ancestors = Vec::new();
        let mut cur = Some(context);
        while let Some(c) = cur {
            ancestors.push(c);
            cur = self.nodes[c].parent;
        }
        // The depth of the deepest ancestor of `context` that is also one of `candidate`'s.
        let shared = |candidate: usize| -> Option<usize> {
            let mut cur = Some(candidate);
            while let Some(c) = cur {
                if ancestors.contains(&c) {
                    return Some(self.nodes[c].depth);
                }
                cur = self.nodes[c].parent;
            }
            None
        };
        let scored: Vec<(usize, Option<usize>)> = all.iter().map(|&c| (c, shared(c))).collect();
        let best = scored.iter().map(|(_, d)| *d).max().flatten();
        scored
            .into_iter()
            .filter(|(_, d)| *d == best)
            .map(|(c, _)| c)
            .collect()
    }
}

/// Whether an answer's value is of the JSON type its `value[x]` requires (R4 JSON format).
fn json_type(kind: &str, value: &Value) -> Result<(), String> {
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
fn same_value(kind: &str, option: &Value, answer: &Value) -> bool {
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
fn compare(kind: &str, a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
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
fn out_of_range(item: &Value, answer: &Value) -> Option<String> {
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
            (Some(from), Some(to)) if from != to => super::units::convert(b, &from, &to).ok(),
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
    let show = |b: Option<f64>| b.map(super::plausible::short).unwrap_or_default();
    let unit_text = unit(value).map(|u| format!(" {u}")).unwrap_or_default();
    Some(match (low, high) {
        (Some(_), Some(_)) => format!("{}–{}{unit_text}", show(low), show(high)),
        (Some(_), None) => format!("at least {}{unit_text}", show(low)),
        _ => format!("at most {}{unit_text}", show(high)),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// A small intake form: sex, a pregnancy question enabled only for females, a decimal
    /// weight in kg with bounds, a choice with two options, a note of at most 20 characters,
    /// and a repeating group of medications.
    fn form() -> Value {
        json!({"resourceType": "Questionnaire", "status": "active", "item": [
            {"linkId": "sex", "type": "choice", "required": true, "answerOption": [
                {"valueCoding": {"system": "http://hl7.org/fhir/administrative-gender", "code": "female"}},
                {"valueCoding": {"system": "http://hl7.org/fhir/administrative-gender", "code": "male"}}]},
            {"linkId": "pregnant", "type": "boolean", "required": true,
             "enableWhen": [{"question": "sex", "operator": "=",
                             "answerCoding": {"system": "http://hl7.org/fhir/administrative-gender", "code": "female"}}]},
            {"linkId": "weight", "type": "decimal", "extension": [
                {"url": MIN_VALUE, "valueDecimal": 0.3}, {"url": MAX_VALUE, "valueDecimal": 650}]},
            {"linkId": "note", "type": "string", "maxLength": 20},
            {"linkId": "smoker", "type": "string", "answerConstraint": "optionsOnly",
             "answerOption": [{"valueString": "never"}, {"valueString": "former"}, {"valueString": "current"}]},
            {"linkId": "meds", "type": "group", "repeats": true, "item": [
                {"linkId": "med-name", "type": "string"}]}
        ]})
    }

    fn response(items: Value) -> Value {
        json!({"resourceType": "QuestionnaireResponse", "status": "completed", "item": items})
    }

    fn sex(code: &str) -> Value {
        json!({"linkId": "sex", "answer": [{"valueCoding": {
            "system": "http://hl7.org/fhir/administrative-gender", "code": code}}]})
    }

    /// The refusals' locations and texts.
    fn refused(items: Value) -> Vec<(String, String)> {
        check(&form(), &response(items))
            .refusals
            .into_iter()
            .map(|i| (i.expression.join(" "), i.diagnostics))
            .collect()
    }

    #[test]
    fn a_response_that_fits_is_neither_refused_nor_trimmed() {
        let fit = check(
            &form(),
            &response(json!([sex("female"),
                {"linkId": "pregnant", "answer": [{"valueBoolean": false}]},
                {"linkId": "weight", "answer": [{"valueDecimal": 81.2}]},
                {"linkId": "meds", "item": [{"linkId": "med-name", "answer": [{"valueString": "metformin"}]}]},
                {"linkId": "meds", "item": [{"linkId": "med-name", "answer": [{"valueString": "lisinopril"}]}]}])),
        );
        assert!(fit.refusals.is_empty(), "{:?}", fit.refusals);
        assert!(fit.left_out.is_empty(), "{:?}", fit.left_out);
    }

    /// The ways a response does not fit: each refused, named by linkId and FHIRPath.
    #[test]
    fn what_does_not_fit_is_refused_where_it_is() {
        let weight_as_text =
            refused(json!([{"linkId": "weight", "answer": [{"valueString": "81.2 kg"}]}]));
        assert_eq!(
            weight_as_text[0].0,
            "QuestionnaireResponse.item[0].answer[0]"
        );
        assert!(weight_as_text[0]
            .1
            .contains("item `weight`: a valueString answer to a decimal item"));

        let two_weights = refused(
            json!([{"linkId": "weight", "answer": [{"valueDecimal": 81.2}, {"valueDecimal": 90}]}]),
        );
        assert!(two_weights[0]
            .1
            .contains("item `weight` has 2 answers and does not repeat"));

        let other_version = refused(json!([{"linkId": "waist", "answer": [{"valueDecimal": 90}]}]));
        assert_eq!(other_version[0].0, "QuestionnaireResponse.item[0]");
        assert!(other_version[0]
            .1
            .contains("the Questionnaire has no such item"));

        let misplaced = refused(json!([{"linkId": "med-name", "answer": [{"valueString": "x"}]}]));
        assert!(misplaced[0]
            .1
            .contains("is not where the Questionnaire has it (under item `meds`)"));

        let twice = refused(json!([sex("male"), sex("male")]));
        assert!(twice[0].1.contains("item `sex` occurs 2 times"));

        let not_offered = refused(json!([sex("unknown")]));
        assert!(not_offered[0]
            .1
            .contains("not one of the 2 options the form offers"));
        let other_system = refused(
            json!([{"linkId": "sex", "answer": [{"valueCoding": {"system": "urn:x", "code": "male"}}]}]),
        );
        assert_eq!(other_system.len(), 1);

        let free_text =
            refused(json!([{"linkId": "smoker", "answer": [{"valueString": "socially"}]}]));
        assert!(free_text[0].1.contains("not one of the 3 options"));
        assert!(
            refused(json!([{"linkId": "smoker", "answer": [{"valueString": "former"}]}]))
                .is_empty()
        );

        let long =
            refused(json!([{"linkId": "note", "answer": [{"valueString": "x".repeat(21)}]}]));
        assert!(long[0]
            .1
            .contains("an answer of 21 characters; maxLength is 20"));

        let wrong_json =
            refused(json!([{"linkId": "weight", "answer": [{"valueDecimal": "81.2"}]}]));
        assert!(wrong_json[0].1.contains("`valueDecimal` holds a string"));

        let group_answer = refused(json!([{"linkId": "meds", "answer": [{"valueString": "x"}]}]));
        assert!(group_answer[0].1.contains("is a group and takes no answer"));
    }

    /// An invalid Questionnaire is refused before any answer is read: duplicate linkIds
    /// (que-2), members of the wrong JSON type.
    #[test]
    fn an_invalid_questionnaire_is_refused() {
        let mut q = form();
        q["item"][3]["linkId"] = json!("weight");
        q["item"][5]["repeats"] = json!("true");
        let fit = check(&q, &response(json!([])));
        let texts: Vec<&str> = fit
            .refusals
            .iter()
            .map(|i| i.diagnostics.as_str())
            .collect();
        assert!(
            texts
                .iter()
                .any(|t| t.contains("two items with linkId `weight` (que-2")),
            "{texts:?}"
        );
        assert!(
            texts
                .iter()
                .any(|t| t.contains("`repeats` must be a boolean")),
            "{texts:?}"
        );
        assert_eq!(fit.refusals[0].expression, ["Questionnaire.item[3].linkId"]);
    }

    /// An answer to a disabled item is left out (the rest stays); a number outside its bounds
    /// too; a required question that is disabled is not missing.
    #[test]
    fn disabled_and_out_of_bounds_answers_are_left_out() {
        let r = response(json!([sex("male"),
            {"linkId": "pregnant", "answer": [{"valueBoolean": true}]},
            {"linkId": "weight", "answer": [{"valueDecimal": 2450}]}]));
        let fit = check(&form(), &r);
        assert!(fit.refusals.is_empty());
        assert_eq!(
            fit.left_out,
            [
                LeftOut {
                    link_id: "pregnant".into(),
                    at: "QuestionnaireResponse.item[1]".into(),
                    why: Why::Disabled
                },
                LeftOut {
                    link_id: "weight".into(),
                    at: "QuestionnaireResponse.item[2].answer[0]".into(),
                    why: Why::OutOfRange("0.3–650".into())
                }
            ]
        );
        assert!(fit.left_out[0]
            .issue()
            .diagnostics
            .contains("disabled by its enableWhen"));
        let disabled = disabled_items(&form(), &response(json!([sex("male")])));
        assert!(disabled.contains("pregnant"));
        assert!(disabled_items(&form(), &response(json!([sex("female")]))).is_empty());
        // Unanswered, the question its condition reads has no answer equal to `female`.
        assert!(disabled_items(&form(), &response(json!([]))).contains("pregnant"));
    }

    /// enableWhen operators, `enableBehavior`, and the nearest occurrence of the question in a
    /// repeating group.
    #[test]
    fn enable_when_reads_the_nearest_answers() {
        let q = json!({"resourceType": "Questionnaire", "item": [
            {"linkId": "child", "type": "group", "repeats": true, "item": [
                {"linkId": "age", "type": "integer"},
                {"linkId": "school", "type": "string",
                 "enableWhen": [{"question": "age", "operator": ">=", "answerInteger": 5},
                                {"question": "age", "operator": "exists", "answerBoolean": true}],
                 "enableBehavior": "all"},
                {"linkId": "nap", "type": "boolean",
                 "enableWhen": [{"question": "age", "operator": "<", "answerInteger": 5}]}]}]});
        let child = |age: i64, school: bool| {
            let mut items = vec![json!({"linkId": "age", "answer": [{"valueInteger": age}]})];
            if school {
                items.push(json!({"linkId": "school", "answer": [{"valueString": "Oak"}]}));
            } else {
                items.push(json!({"linkId": "nap", "answer": [{"valueBoolean": true}]}));
            }
            json!({"linkId": "child", "item": items})
        };
        let fit = check(&q, &response(json!([child(7, true), child(3, false)])));
        assert!(fit.left_out.is_empty(), "{:?}", fit.left_out);
        let fit = check(&q, &response(json!([child(3, true), child(7, false)])));
        let at: Vec<&str> = fit.left_out.iter().map(|l| l.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "QuestionnaireResponse.item[0].item[1]",
                "QuestionnaireResponse.item[1].item[1]"
            ]
        );
    }

    #[test]
    fn quantities_are_bounded_in_their_unit() {
        let q = json!({"resourceType": "Questionnaire", "item": [
            {"linkId": "height", "type": "quantity", "extension": [
                {"url": MIN_QUANTITY, "valueQuantity": {"value": 30, "code": "cm"}},
                {"url": MAX_QUANTITY, "valueQuantity": {"value": 272, "code": "cm"}}]}]});
        let height = |value: f64, code: &str| {
            response(
                json!([{"linkId": "height", "answer": [{"valueQuantity": {"value": value, "code": code}}]}]),
            )
        };
        assert!(check(&q, &height(180.0, "cm")).left_out.is_empty());
        assert!(
            check(&q, &height(71.0, "[in_i]")).left_out.is_empty(),
            "180 cm in inches"
        );
        assert_eq!(
            check(&q, &height(6.0, "[in_i]")).left_out[0].why,
            Why::OutOfRange("11.81–107.09 [in_i]".into())
        );
    }
}
