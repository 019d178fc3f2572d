//! Mapping files: what integration engineers write, compiled once into a `Mapping` that turns a
//! vendor payload into FHIR (see `engine`) and yields its own `Questionnaire`.
//!
//! Pure logic: no HTTP, no store. Loading parses every JSONPath and checks every unit, code and
//! reference up front; a file with any error never becomes a `Mapping`.

mod answers;
mod compile;
pub mod condition;
mod derived;
pub mod engine;
pub mod extract;
pub mod fit;
pub mod plausible;
pub mod questionnaire;
mod read;
mod resources;
pub mod response;
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
    /// When a post is a submission at all (`accept_when`); none: always.
    pub accept_when: Option<AcceptWhen>,
    /// Its submissions are refill requests (`refill_request: true`).
    pub refill_request: bool,
    /// Each submission's Bundle asks for a review `Task` (`review_task: true`).
    pub review_task: bool,
    /// The parts of a payload this mapping reads.
    pub(crate) projection: Projection,
}

/// The QuestionnaireResponse statuses a mapping's `source.status` may give: a form still being
/// filled in, or finished (`amended` is the gateway's, for revisions).
pub const QR_STATUSES: [&str; 2] = ["in-progress", "completed"];

/// A mapping's `accept_when`: a condition on values of the payload, each read at a JSONPath.
#[derive(Debug)]
pub struct AcceptWhen {
    /// The condition; its item names are the JSONPaths' text.
    pub condition: Condition,
    pub paths: Vec<Selector>,
    /// The condition as the mapping file wrote it, for the reason a post is ignored.
    pub text: String,
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

    /// What the map decides on the patient's behalf, in plain words, for `check` to show
    /// its author: which parts of a composite answer must be given, which values are held
    /// back as implausible, what an unknown option does, which posts are ignored.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(a) = &self.accept_when {
            notes.push(format!(
                "a post is a submission only when {}; others are answered 200 `ignored` and stored nowhere",
                a.text
            ));
        }
        for item in self.all_items() {
            let id = &item.link_id;
            if !item.sum.is_empty() {
                let (must, may): (Vec<&SumPart>, Vec<&SumPart>) =
                    item.sum.iter().partition(|p| p.rule.default.is_none());
                let names =
                    |ps: &[&SumPart]| ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ");
                let mut note = format!("item `{id}` sums its parts");
                if !must.is_empty() {
                    note.push_str(&format!(
                        "; without {} it is not charted but listed as missing (give a part `default: 0` if it may be skipped)",
                        names(&must)
                    ));
                }
                if !may.is_empty() {
                    note.push_str(&format!("; {} may be skipped (its default)", names(&may)));
                }
                notes.push(note);
            }
            if let Some(r) = &item.range {
                let whose = match r.default_for {
                    Some(name) => format!(" (the default for {name}; `range` overrides it)"),
                    None => String::new(),
                };
                notes.push(format!(
                    "item `{id}`: a value outside {} is held back as implausible{whose}",
                    r.describe()
                ));
            }
            if item.rule.map.is_some() && item.rule.unknown_option == UnknownOption::Keep {
                notes.push(format!(
                    "item `{id}`: an option the map does not know is kept as text and flagged `unmapped_option`"
                ));
            }
        }
        notes
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
fn projection(source: &Source, items: &[Item], accept_when: Option<&AcceptWhen>) -> Projection {
    // Every value rule, and whether it reads at the payload root. A repeating group's children
    // read inside each of its elements (built whole, as the group's rule ends there); their
    // answer rules still read the answer index.
    fn collect<'a>(items: &'a [Item], root: bool, rules: &mut Vec<(&'a ValueRule, bool)>) {
        for item in items {
            rules.push((&item.rule, root));
            rules.extend(item.sum.iter().map(|p| (&p.rule, root)));
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
        source.status.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|r| (r, true))
    .collect();
    collect(items, true, &mut all);

    let mut p = Projection::none();
    p.add_whole(&source.submission_id);
    for path in accept_when.iter().flat_map(|a| &a.paths) {
        p.add_whole(path);
    }
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
    pub status: Option<ValueRule>,
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
    /// The n-th part after `split`; negative from the end (-1: the last).
    pub pick: Option<i64>,
    /// Characters trimmed from each part besides whitespace; `Some("")`: whitespace only.
    pub trim: Option<String>,
    pub pattern: Option<Pattern>,
    pub map: Option<ValueMap>,
    /// What an answer the map does not know does.
    pub unknown_option: UnknownOption,
    pub format: Option<String>,
    pub from_unit: Option<String>,
    pub default: Option<Value>,
}

impl ValueRule {
    pub fn is_empty(&self) -> bool {
        self.answer.is_none() && self.path.is_none() && self.default.is_none()
    }
}

pub use spec::UnknownOption;

/// Regular expressions that read a number (and its unit) in free text, tried in order.
#[derive(Debug)]
pub struct Pattern {
    pub alternatives: Vec<regex::Regex>,
    /// The text of a `unit` capture (lower case, trimmed) → UCUM code.
    pub units: std::collections::HashMap<String, String>,
}

impl Pattern {
    /// The first alternative that matches `text`, and its captures.
    pub fn matching<'t>(&self, text: &'t str) -> Option<(&regex::Regex, regex::Captures<'t>)> {
        self.alternatives
            .iter()
            .find_map(|re| re.captures(text).map(|c| (re, c)))
    }

    /// The UCUM code of a unit as the text wrote it: the map's `units`, else a common
    /// spelling (`lbs`, `feet`).
    pub fn unit_of(&self, text: &str) -> Option<&str> {
        self.units
            .get(&text.trim().to_lowercase())
            .map(String::as_str)
            .or_else(|| units::spelled(text))
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
    pub sum: Vec<SumPart>,
    pub derive: Option<Derivation>,
    pub unit: Option<String>,
    pub precision: Option<u32>,
    /// The plausible values, declared or the default for the vital sign the item charts.
    pub range: Option<plausible::Range>,
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

/// One part of a composite quantity (`sum`): its own answer, or a capture of the item's pattern.
#[derive(Debug)]
pub struct SumPart {
    /// Where the part's answer is; for a capture, only its `default`.
    pub rule: ValueRule,
    /// The named capture of the item's `pattern` the part reads.
    pub capture: Option<String>,
    pub unit: String,
}

impl SumPart {
    /// How the part is named in errors and in `check`'s notes.
    pub fn name(&self) -> String {
        match (&self.capture, &self.rule.answer, &self.rule.path) {
            (Some(c), _, _) => format!("capture `{c}`"),
            (None, Some(a), _) => format!("answer `{a}`"),
            (None, None, Some(p)) => format!("`{}`", p.source()),
            _ => "a part".to_string(),
        }
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
        parts: Vec<SplitPart>,
    },
}

/// One number of a free-text answer split into components.
#[derive(Debug)]
pub struct SplitPart {
    pub code: Value,
    pub unit: String,
    pub range: Option<plausible::Range>,
}

/// A named ops flag for the CRM, raised when its condition holds.
#[derive(Debug)]
pub struct Flag {
    pub name: String,
    pub description: Option<String>,
    pub when: Condition,
}
