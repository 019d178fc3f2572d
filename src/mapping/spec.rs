//! The mapping file as written: serde structs that mirror the YAML (or JSON) one to one.
//!
//! Unknown keys are errors (a typo must not silently do nothing). Nothing here is checked
//! beyond its shape; `compile` turns a `MappingSpec` into a checked, ready-to-run `Mapping`.

use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    pub id: String,
    pub version: Scalar,
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Canonical URL of the generated Questionnaire (`|version` is appended where referenced).
    pub url: String,
    /// System of the business identifiers; default `<url>/submission`.
    #[serde(default)]
    pub identifier_system: Option<String>,
    pub source: SourceSpec,
    pub items: Vec<ItemSpec>,
    #[serde(default)]
    pub flags: Vec<FlagSpec>,
    /// When a post is a submission at all: a condition on `path`s of the payload (a multi-step
    /// form posts every step with `finalized: false`, then the final one). A post that does not
    /// meet it is answered `200` with `ignored` and stored nowhere.
    #[serde(default)]
    pub accept_when: Option<ConditionSpec>,
    /// Its submissions are refill requests: an accepted one raises `refill.requested`.
    #[serde(default)]
    pub refill_request: bool,
    /// Each submission asks the EHR for a review `Task` (focus: the QuestionnaireResponse;
    /// `businessStatus` `ready-for-review`): the provider's work item, where the decision lives.
    #[serde(default)]
    pub review_task: bool,
}

/// A string or a number written where a string is meant (`version: 3`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
}

impl Scalar {
    pub fn into_string(self) -> String {
        match self {
            Scalar::Str(s) => s,
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// JSONPath to the submission id: the idempotency key.
    pub submission_id: String,
    /// Where the submission time is; absent: the time the gateway received it.
    #[serde(default)]
    pub submitted_at: Option<ValueSpec>,
    /// Where the answers are and what keys them: one index per payload.
    #[serde(default)]
    pub answers: Option<AnswersSpec>,
    pub patient: PatientSpec,
    /// Where the QuestionnaireResponse's `status` is (`in-progress` or `completed`, after the
    /// rule's `map`); absent: `completed`.
    #[serde(default)]
    pub status: Option<ValueSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswersSpec {
    /// JSONPath to a list of answer elements (Typeform `answers`, Tally `fields`) …
    #[serde(default)]
    pub list: Option<String>,
    /// … with the key of each element, relative to it (`$.field.ref`).
    #[serde(default)]
    pub key: Option<String>,
    /// Or JSONPath to an object keyed by field (Jotform `rawRequest`).
    #[serde(default)]
    pub object: Option<String>,
    /// `json` when the answers arrive as a JSON document inside a string (Jotform).
    #[serde(default)]
    pub decode: Option<Decode>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Decode {
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientSpec {
    pub identifier: PatientIdentifierSpec,
    #[serde(default)]
    pub given: Option<ValueSpec>,
    #[serde(default)]
    pub family: Option<ValueSpec>,
    #[serde(default)]
    pub birth_date: Option<ValueSpec>,
    #[serde(default)]
    pub gender: Option<ValueSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientIdentifierSpec {
    pub system: String,
    #[serde(flatten)]
    pub value: ValueSpec,
}

/// Where a value is and how it is transformed: shared by items and patient fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueSpec {
    /// Key into the answer index.
    #[serde(default)]
    pub answer: Option<String>,
    /// JSONPath relative to the answer element (default `$`: the element itself).
    #[serde(default)]
    pub value: Option<String>,
    /// JSONPath relative to the payload (or to the element of a repeating group).
    #[serde(default)]
    pub path: Option<String>,
    /// Strip HTML tags (`</p><p>` and `<br>` become line breaks).
    #[serde(default)]
    pub strip_html: bool,
    /// Split a joined string into several answers (`"\n"`, `","`).
    #[serde(default)]
    pub split: Option<String>,
    /// Keep only the n-th part (0-based; -1 the last) after `split`.
    #[serde(default)]
    pub pick: Option<i64>,
    /// Trim whitespace (`true`) or these characters and whitespace (`".,"`) from each part.
    #[serde(default)]
    pub trim: Option<Trim>,
    /// Read the number in free text (`5'11"`, `245 lbs`): a regular expression, or a list of
    /// them tried in order, with named captures (`value` and `unit`, or the `capture`s of the
    /// item's `sum` parts).
    #[serde(default)]
    pub pattern: Option<OneOrMany>,
    /// The text of a pattern's `unit` capture → UCUM, beside the spellings the gateway knows.
    #[serde(default)]
    pub units: Option<Map<String, Value>>,
    /// Vendor label or option id → Coding (`{system, code, display}`) or a plain value.
    #[serde(default)]
    pub map: Option<Map<String, Value>>,
    /// What an answer the map does not know does: `keep` it as text and raise
    /// `unmapped_option`, or `reject` the submission.
    #[serde(default)]
    pub unknown_option: Option<UnknownOption>,
    /// Date format of the vendor (`MM/DD/YYYY`, `YYYY-MM-DD HH:mm:ss Z`); ISO and
    /// `{month, day, year}` objects are read without one.
    #[serde(default)]
    pub format: Option<String>,
    /// Unit the vendor's number is in (UCUM), converted to `unit`.
    #[serde(default)]
    pub from_unit: Option<String>,
    /// Used when the answer is absent.
    #[serde(default)]
    pub default: Option<Value>,
}

/// `trim: true`, or `trim: ".,"` (these characters as well as whitespace).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Trim {
    Whitespace(bool),
    Chars(String),
}

/// One string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownOption {
    Keep,
    #[default]
    Reject,
}

/// A plausible range, in the item's unit.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeSpec {
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemSpec {
    pub link_id: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(rename = "type")]
    pub item_type: String,
    #[serde(default)]
    pub repeats: bool,
    #[serde(default)]
    pub required: bool,
    /// Required only when this condition holds (e.g. `{item: takes-meds, equals: true}`).
    #[serde(default)]
    pub required_when: Option<ConditionSpec>,
    #[serde(flatten)]
    pub value: ValueSpec,
    /// Target unit (UCUM) of a quantity item.
    #[serde(default)]
    pub unit: Option<String>,
    /// Decimal places kept after a unit conversion or derivation (default 2; BMI 1).
    #[serde(default)]
    pub precision: Option<u32>,
    /// The values that are plausible, in the item's unit; the vital signs the gateway knows
    /// have defaults. A value outside is not charted.
    #[serde(default)]
    pub range: Option<RangeSpec>,
    /// Composite quantity: the sum of parts in different units (feet + inches).
    #[serde(default)]
    pub sum: Option<Vec<SumPartSpec>>,
    /// A value computed from other items: `bmi(weight, height)`, `sum_scores(a, b, …)`.
    #[serde(default)]
    pub derive: Option<String>,
    /// Coding of this item (`item.code`; the component code inside a component group).
    #[serde(default)]
    pub code: Option<Value>,
    #[serde(default)]
    pub observation: Option<ObservationSpec>,
    #[serde(default)]
    pub items: Vec<ItemSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SumPartSpec {
    #[serde(flatten)]
    pub value: ValueSpec,
    /// A named capture of the item's `pattern`, instead of an answer of its own.
    #[serde(default)]
    pub capture: Option<String>,
    pub unit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationSpec {
    /// A Coding, or a list of Codings.
    #[serde(default)]
    pub code: Option<Value>,
    /// `vital-signs`, `survey`, `social-history`, … or a Coding.
    #[serde(default)]
    pub category: Option<Value>,
    /// On a group: the linkIds of the children that become `component`s.
    #[serde(default)]
    pub components: Option<Vec<String>>,
    /// On a string item: a free-text answer such as `142/91` split into components.
    #[serde(default)]
    pub split_components: Option<SplitComponentsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitComponentsSpec {
    pub separator: String,
    pub parts: Vec<ComponentPartSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentPartSpec {
    pub code: Value,
    pub unit: String,
    #[serde(default)]
    pub range: Option<RangeSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagSpec {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub when: ConditionSpec,
}

/// `{item | path, equals|contains|in|answered|gt|gte|lt|lte}`, or `any` / `all` / `not` of
/// conditions.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    #[serde(default)]
    pub item: Option<String>,
    /// A JSONPath into the payload (`accept_when`), instead of an item.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub equals: Option<Value>,
    #[serde(default)]
    pub contains: Option<Value>,
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub answered: Option<bool>,
    #[serde(default)]
    pub gt: Option<f64>,
    #[serde(default)]
    pub gte: Option<f64>,
    #[serde(default)]
    pub lt: Option<f64>,
    #[serde(default)]
    pub lte: Option<f64>,
    #[serde(default)]
    pub any: Option<Vec<ConditionSpec>>,
    #[serde(default)]
    pub all: Option<Vec<ConditionSpec>>,
    #[serde(default)]
    pub not: Option<Box<ConditionSpec>>,
}
