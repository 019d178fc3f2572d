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

mod enable_when;
#[cfg(test)]
mod tests;
mod values;

pub use enable_when::disabled_items;
use values::{compare, json_type, out_of_range, same_value};

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
    let defs = definitions(questionnaire, &mut fit.refusals);
    if !fit.refusals.is_empty() {
        // An invalid Questionnaire says nothing reliable about its responses.
        return fit;
    }
    let nodes = nodes_of(response);
    let checker = Checker::new(&defs, &nodes);
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

/// The Questionnaire's items by linkId; what makes it invalid goes to `refusals`.
fn definitions<'q>(
    questionnaire: &'q Value,
    refusals: &mut Vec<Issue>,
) -> HashMap<&'q str, Def<'q>> {
    let mut defs = HashMap::new();
    define(
        items_in(questionnaire),
        None,
        "Questionnaire",
        &mut defs,
        refusals,
    );
    defs
}

/// Every item of the response, depth first.
fn nodes_of(response: &Value) -> Vec<Node<'_>> {
    let mut nodes = Vec::new();
    collect(
        items_in(response),
        None,
        0,
        "QuestionnaireResponse",
        &mut nodes,
    );
    nodes
}

impl<'q, 'r> Checker<'q, 'r> {
    fn new(defs: &'q HashMap<&'q str, Def<'q>>, nodes: &'r [Node<'r>]) -> Checker<'q, 'r> {
        Checker {
            defs,
            nodes,
            by_link: index(nodes),
        }
    }
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
}
