//! Mapping files: what integration engineers write, compiled once into a `Mapping` that turns a
//! vendor payload into FHIR (see `engine`) and yields its own `Questionnaire`.
//!
//! Pure logic: no HTTP, no store. Loading parses every JSONPath and checks every unit, code and
//! reference up front; a file with any error never becomes a `Mapping`.

mod answers;
mod compile;
pub mod condition;
pub mod engine;
pub mod extract;
pub mod questionnaire;
mod read;
mod resources;
mod response;
pub mod select;
pub mod spec;
pub mod units;
pub mod value;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use compile::{load_dir, load_file, parse, LoadError, MappingError};
pub use condition::Condition;
pub use engine::{MappedSubmission, MappingFailure, SubmissionInput};
pub use read::PayloadError;
pub use response::Signals;
use select::{AnswerSource, Projection, Selector};
use value::CodingTarget;

/// FHIR R4 `Questionnaire.item.type`s a mapping may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    Boolean,
    Decimal,
    Integer,
    Date,
    DateTime,
    String,
    Text,
    Choice,
    Quantity,
    Group,
}

impl ItemType {
    pub const NAMES: &'static str =
        "boolean, decimal, integer, date, dateTime, string, text, choice (or coding), quantity, group";

    pub fn parse(s: &str) -> Option<ItemType> {
        Some(match s {
            "boolean" => ItemType::Boolean,
            "decimal" => ItemType::Decimal,
            "integer" => ItemType::Integer,
            "date" => ItemType::Date,
            "dateTime" => ItemType::DateTime,
            "string" => ItemType::String,
            "text" => ItemType::Text,
            "choice" | "coding" => ItemType::Choice,
            "quantity" => ItemType::Quantity,
            "group" => ItemType::Group,
            _ => return None,
        })
    }

    /// The R4 code.
    pub fn fhir_code(self) -> &'static str {
        match self {
            ItemType::Boolean => "boolean",
            ItemType::Decimal => "decimal",
            ItemType::Integer => "integer",
            ItemType::Date => "date",
            ItemType::DateTime => "dateTime",
            ItemType::String => "string",
            ItemType::Text => "text",
            ItemType::Choice => "choice",
            ItemType::Quantity => "quantity",
            ItemType::Group => "group",
        }
    }
}

/// A compiled, checked mapping file.
#[derive(Debug)]
pub struct Mapping {
    pub id: String,
    pub version: String,
    pub title: String,
    pub description: Option<String>,
    /// Canonical URL of the generated Questionnaire.
    pub url: String,
    pub identifier_system: String,
    /// SHA-256 (hex) of the file's bytes.
    pub content_sha256: String,
    pub file: PathBuf,
    pub(crate) source: Source,
    pub items: Vec<Item>,
    pub flags: Vec<Flag>,
    /// The parts of a payload this mapping reads.
    pub(crate) projection: Projection,
}

impl Mapping {
    /// `url|version`: what `QuestionnaireResponse.questionnaire` points at.
    pub fn canonical(&self) -> String {
        format!("{}|{}", self.url, self.version)
    }

    /// Parses a payload for this mapping: the parts it reads become a `Value`, the rest is
    /// only checked to be JSON (see `Projection`). Nesting is bounded only by serde_json's
    /// recursion limit; the gateway uses `parse_payload_within`.
    pub fn parse_payload(&self, raw: &[u8]) -> Result<Value, PayloadError> {
        self.parse_payload_within(raw, usize::MAX)
    }

    /// `parse_payload`, refusing JSON nested deeper than `max_depth` arrays and objects.
    pub fn parse_payload_within(
        &self,
        raw: &[u8],
        max_depth: usize,
    ) -> Result<Value, PayloadError> {
        self.projection.parse(raw, max_depth)
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Every item, depth first.
    pub fn all_items(&self) -> Vec<&Item> {
        fn walk<'a>(items: &'a [Item], out: &mut Vec<&'a Item>) {
            for i in items {
                out.push(i);
                walk(&i.children, out);
            }
        }
        let mut out = Vec::new();
        walk(&self.items, &mut out);
        out
    }
}

/// What a mapping reads from the payload root: every root selector, built whole where it ends.
/// The elements of an answer list are built only as far as the key and the rules that read
/// answers look into them (a Typeform answer's `field` and `type` are skipped).
fn projection(source: &Source, items: &[Item]) -> Projection {
    // Every value rule, and whether it reads at the payload root. A repeating group's children
    // read inside each of its elements (built whole, as the group's rule ends there); their
    // answer rules still read the answer index.
    fn collect<'a>(items: &'a [Item], root: bool, rules: &mut Vec<(&'a ValueRule, bool)>) {
        for item in items {
            rules.push((&item.rule, root));
            rules.extend(item.sum.iter().map(|(r, _)| (r, root)));
            collect(&item.children, root && !item.is_repeating_group(), rules);
        }
    }
    let patient = &source.patient;
    let mut all: Vec<(&ValueRule, bool)> = [
        source.submitted_at.as_ref(),
        Some(&patient.identifier),
        patient.given.as_ref(),
        patient.family.as_ref(),
        patient.birth_date.as_ref(),
        patient.gender.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|r| (r, true))
    .collect();
    collect(items, true, &mut all);

    let mut p = Projection::none();
    p.add_whole(&source.submission_id);
    for (rule, at_root) in &all {
        if let (Some(path), true) = (&rule.path, at_root) {
            p.add_whole(path);
        }
    }
    match &source.answers {
        Some(AnswerSource::List { list, key }) => {
            let mut element = Projection::none();
            element.add_whole(key);
            for (rule, _) in &all {
                match (&rule.answer, &rule.value) {
                    (Some(_), Some(value)) => element.add_whole(value),
                    (Some(_), None) => element = Projection::all(),
                    _ => {}
                }
            }
            p.add_within(list, &element);
        }
        Some(AnswerSource::Object { object, .. }) => p.add_whole(object),
        None => {}
    }
    p.finish();
    p
}

#[derive(Debug)]
pub(crate) struct Source {
    pub submission_id: Selector,
    pub submitted_at: Option<ValueRule>,
    pub answers: Option<AnswerSource>,
    pub patient: PatientRule,
}

#[derive(Debug)]
pub(crate) struct PatientRule {
    pub system: String,
    pub identifier: ValueRule,
    pub given: Option<ValueRule>,
    pub family: Option<ValueRule>,
    pub birth_date: Option<ValueRule>,
    pub gender: Option<ValueRule>,
}

/// Where one value comes from and the transforms it goes through, compiled.
#[derive(Debug, Default)]
pub struct ValueRule {
    pub answer: Option<String>,
    pub value: Option<Selector>,
    pub path: Option<Selector>,
    pub strip_html: bool,
    pub split: Option<String>,
    pub pick: Option<usize>,
    pub map: Option<ValueMap>,
    pub format: Option<String>,
    pub from_unit: Option<String>,
    pub default: Option<Value>,
}

impl ValueRule {
    pub fn is_empty(&self) -> bool {
        self.answer.is_none() && self.path.is_none() && self.default.is_none()
    }
}

/// A value map: vendor label or option id → Coding or plain value, in file order.
#[derive(Debug, Default)]
pub struct ValueMap {
    pub entries: Vec<(String, MapTarget)>,
    lookup: std::collections::HashMap<String, usize>,
}

impl ValueMap {
    pub fn new(entries: Vec<(String, MapTarget)>) -> Self {
        let lookup = entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        ValueMap { entries, lookup }
    }

    pub fn get(&self, key: &str) -> Option<&MapTarget> {
        self.lookup.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn codings(&self) -> impl Iterator<Item = &CodingTarget> {
        self.entries.iter().filter_map(|(_, t)| match t {
            MapTarget::Coding(c) => Some(c),
            MapTarget::Value(_) => None,
        })
    }
}

#[derive(Debug)]
pub enum MapTarget {
    Coding(CodingTarget),
    Value(Value),
}

/// A value computed from other items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Derivation {
    /// Body mass index from a weight and a height item (any mass and length units).
    Bmi { weight: String, height: String },
    /// Sum of the scores of the coded answers of the named items (PHQ-9 total).
    SumScores(Vec<String>),
    /// Sum of numeric answers.
    Sum(Vec<String>),
}

/// A compiled item.
#[derive(Debug)]
pub struct Item {
    pub link_id: String,
    pub text: Option<String>,
    pub item_type: ItemType,
    pub repeats: bool,
    pub required: bool,
    pub required_when: Option<Condition>,
    /// 1-based line in the mapping file.
    pub line: usize,
    pub rule: ValueRule,
    pub sum: Vec<(ValueRule, String)>,
    pub derive: Option<Derivation>,
    pub unit: Option<String>,
    pub precision: Option<u32>,
    pub code: Option<Value>,
    pub observation: Option<ObservationRule>,
    pub children: Vec<Item>,
}

impl Item {
    /// A repeating group reads one set of children per selected element.
    pub fn is_repeating_group(&self) -> bool {
        self.item_type == ItemType::Group && self.repeats
    }
}

/// What Observation an item (or group) yields.
#[derive(Debug)]
pub struct ObservationRule {
    /// Codings (`Observation.code.coding`).
    pub codes: Vec<Value>,
    /// `Observation.category` CodeableConcepts.
    pub categories: Vec<Value>,
    pub components: Components,
}

#[derive(Debug)]
pub enum Components {
    None,
    /// Children of a group, by linkId.
    Children(Vec<String>),
    /// A free-text answer such as `142/91`.
    Split {
        separator: String,
        parts: Vec<(Value, String)>,
    },
}

/// A named ops flag for the CRM, raised when its condition holds.
#[derive(Debug)]
pub struct Flag {
    pub name: String,
    pub description: Option<String>,
    pub when: Condition,
}
