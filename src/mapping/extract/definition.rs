//! What a Questionnaire says of each of its items for extraction: whether (and how) it is
//! extracted — `sdc-questionnaire-observationExtract` on it, on one of its Codings, or inherited
//! —, the Codings its Observation's code is made of, its category and its unit.

use std::collections::HashMap;

use serde_json::Value;

use super::items_in;
use crate::mapping::questionnaire::{EXTRACT_CATEGORY, OBSERVATION_EXTRACT, QUESTIONNAIRE_UNIT};

/// Whether (and how) an item is extracted, as its nearest word on it says (SDC 4.0's codes:
/// `independent` is `Extract`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Flag {
    Extract,
    Component,
    /// An Observation of its own that its parent's Observation lists in `hasMember`.
    Member,
    /// An Observation of its own, `derivedFrom` its parent's Observation.
    Derived,
    Off,
}

impl Flag {
    /// Whether the item makes an Observation of its own.
    pub(super) fn own(self) -> bool {
        matches!(self, Flag::Extract | Flag::Member | Flag::Derived)
    }
}

/// What the Questionnaire says of one item, its ancestors' words applied.
pub(super) struct Definition<'q> {
    pub(super) flag: Option<Flag>,
    /// The Codings the Observation's code is made of.
    pub(super) codes: Vec<&'q Value>,
    /// `Observation.category`: the item's own, else its nearest ancestor's.
    pub(super) categories: Vec<&'q Value>,
    pub(super) unit: Option<&'q Value>,
}

/// Every item of a Questionnaire by linkId (the first, where linkIds are not unique).
pub(super) fn by_link_id(questionnaire: &Value) -> HashMap<&str, &Value> {
    fn walk<'q>(items: &'q [Value], out: &mut HashMap<&'q str, &'q Value>) {
        for item in items {
            if let Some(id) = item.get("linkId").and_then(Value::as_str) {
                out.entry(id).or_insert(item);
            }
            walk(items_in(item), out);
        }
    }
    let mut out = HashMap::new();
    walk(items_in(questionnaire), &mut out);
    out
}

/// The value of `v`'s extension `url`, if it has one.
pub(super) fn extension<'v>(v: &'v Value, url: &'v str) -> Option<&'v Value> {
    extensions(v, url).next()
}

/// The values of `v`'s extensions `url`.
pub(super) fn extensions<'v>(v: &'v Value, url: &'v str) -> impl Iterator<Item = &'v Value> {
    v.get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |e| e.get("url").and_then(Value::as_str) == Some(url))
        .filter_map(|e| {
            e.as_object()?
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| v)
        })
}

pub(super) fn flag_of(v: &Value) -> Option<Flag> {
    Some(match extension(v, OBSERVATION_EXTRACT)? {
        Value::Bool(true) => Flag::Extract,
        Value::Bool(false) => Flag::Off,
        Value::String(c) if c == "component" => Flag::Component,
        Value::String(c) if c == "member" => Flag::Member,
        Value::String(c) if c == "derived" => Flag::Derived,
        Value::String(_) => Flag::Extract,
        _ => return None,
    })
}

/// Indexes the Questionnaire's items by linkId (unique within a Questionnaire), each with what
/// applies to it.
pub(super) fn define<'q>(
    items: &'q [Value],
    inherited: Option<Flag>,
    categories: &[&'q Value],
    out: &mut HashMap<&'q str, Definition<'q>>,
) {
    for item in items {
        let Some(link_id) = item.get("linkId").and_then(Value::as_str) else {
            continue;
        };
        let codes: Vec<&Value> = item
            .get("code")
            .and_then(Value::as_array)
            .map_or(Vec::new(), |c| c.iter().collect());
        let flagged: Vec<&Value> = codes
            .iter()
            .copied()
            .filter(|c| flag_of(c).is_some_and(Flag::own))
            .collect();
        let flag = match flag_of(item) {
            Some(f) => Some(f),
            None => flagged.first().and_then(|c| flag_of(c)).or(inherited),
        };
        let codes = if flagged.is_empty() { codes } else { flagged };
        let own: Vec<&Value> = extensions(item, EXTRACT_CATEGORY).collect();
        let categories = if own.is_empty() {
            categories.to_vec()
        } else {
            own
        };
        define(items_in(item), flag, &categories, out);
        out.insert(
            link_id,
            Definition {
                flag,
                codes,
                categories,
                unit: extension(item, QUESTIONNAIRE_UNIT),
            },
        );
    }
}
