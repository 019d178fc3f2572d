//! Loading and checking mapping files: YAML/JSON → `MappingSpec` → `Mapping`.
//!
//! Every problem is collected (not just the first), each with file:line:column, the item's path
//! and a hint. Lines of semantic errors are found in the source text by the item's `link_id`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::condition::{Cmp, Condition};
use super::plausible::{self, Range};
use super::select::{AnswerSource, Selector};
use super::spec::{self, ConditionSpec, ItemSpec, MappingSpec, ValueSpec};
use super::units::{self, Dimension};
use super::value::{self, CodingTarget};
use super::{
    AcceptWhen, Components, Derivation, Flag, Item, ItemType, MapTarget, Mapping, ObservationRule,
    PatientRule, Pattern, Source, SplitPart, SumPart, UnknownOption, ValueMap, ValueRule,
};

/// One problem in a mapping file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Path of the item (`body/weight`) or the section (`source.patient`).
    pub item: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl std::fmt::Display for MappingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(item) = &self.item {
            write!(f, "{item}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    hint: {hint}")?;
        }
        Ok(())
    }
}

/// Why mapping files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<MappingError>),
}

/// Loads and compiles one mapping file.
pub fn load_file(path: &Path) -> Result<Mapping, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text).map_err(LoadError::Invalid)
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file of a directory (sorted by name). All
/// problems of all files are reported together; duplicate mapping ids are an error too.
pub fn load_dir(dir: &Path) -> Result<Vec<Mapping>, LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    paths.sort();
    let mut mappings = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match load_file(&path) {
            Ok(m) => mappings.push(m),
            Err(LoadError::Invalid(mut e)) => errors.append(&mut e),
            Err(e) => return Err(e),
        }
    }
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for m in &mappings {
        if let Some(first) = seen.insert(&m.id, &m.file) {
            errors.push(MappingError {
                file: m.file.clone(),
                line: 1,
                column: 1,
                item: None,
                message: format!("mapping id `{}` is also used by {}", m.id, first.display()),
                hint: Some("each form and version needs its own id".into()),
            });
        }
    }
    if errors.is_empty() {
        Ok(mappings)
    } else {
        Err(LoadError::Invalid(errors))
    }
}

/// Parses and compiles mapping text; `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Mapping, Vec<MappingError>> {
    let spec: MappingSpec = serde_norway::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        vec![MappingError {
            file: path.to_path_buf(),
            line,
            column,
            item: None,
            message: e.to_string(),
            hint: Some("see docs/mapping-files.md for the format".into()),
        }]
    })?;
    let mut c = Compiler {
        file: path.to_path_buf(),
        lines: text.lines().collect(),
        cursor: 0,
        errors: Vec::new(),
        link_ids: HashMap::new(),
        has_answers: spec.source.answers.is_some(),
    };
    let mapping = c.mapping(spec, value_sha(text));
    if c.errors.is_empty() {
        Ok(mapping)
    } else {
        Err(c.errors)
    }
}

fn value_sha(text: &str) -> String {
    crate::fhir::sha256_hex(text.as_bytes())
}

struct Compiler<'t> {
    file: PathBuf,
    lines: Vec<&'t str>,
    /// Items are found in file order: each search starts after the previous item's line.
    cursor: usize,
    errors: Vec<MappingError>,
    /// linkId → (type, line, unit, has scores)
    link_ids: HashMap<String, LinkInfo>,
    has_answers: bool,
}

#[derive(Clone)]
struct LinkInfo {
    item_type: ItemType,
    line: usize,
    unit: Option<String>,
    scored: bool,
}

/// Where an error is: a line and the item path.
#[derive(Clone)]
struct At {
    line: usize,
    item: String,
}

impl Compiler<'_> {
    fn err(
        &mut self,
        at: &At,
        key: &str,
        message: impl Into<String>,
        hint: impl Into<Option<String>>,
    ) {
        let (line, column) = self.key_position(at.line, key);
        self.errors.push(MappingError {
            file: self.file.clone(),
            line,
            column,
            item: Some(at.item.clone()),
            message: message.into(),
            hint: hint.into(),
        });
    }

    /// The line (1-based) and column of `key:` at or after `from` within the same block.
    fn key_position(&self, from: usize, key: &str) -> (usize, usize) {
        if key.is_empty() || from == 0 {
            return (from.max(1), 1);
        }
        let start = from - 1;
        for (i, line) in self.lines.iter().enumerate().skip(start).take(60) {
            if i > start && line.contains("link_id") {
                break; // the next item
            }
            for pat in [format!("{key}:"), format!("\"{key}\":")] {
                if let Some(col) = line.find(&pat) {
                    let before = line[..col].chars().last();
                    if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
                        return (i + 1, col + 1);
                    }
                }
            }
        }
        (from, 1)
    }

    /// The line of `key: value` (a top-level section or an item's link_id), searching from the cursor.
    fn find_line(&mut self, key: &str, value: &str) -> usize {
        let matches = |line: &str| {
            let Some(pos) = line.find(key) else {
                return false;
            };
            let rest = line[pos + key.len()..].trim_start_matches(['"', '\'']);
            let Some(rest) = rest.trim_start().strip_prefix(':') else {
                return false;
            };
            let rest = rest.trim_start().trim_start_matches(['"', '\'']);
            rest.starts_with(value)
                && rest[value.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| matches!(c, '"' | '\'' | ',' | ' ' | '}' | '#'))
        };
        for (i, line) in self.lines.iter().enumerate().skip(self.cursor) {
            if matches(line) {
                self.cursor = i + 1;
                return i + 1;
            }
        }
        self.lines
            .iter()
            .position(|l| matches(l))
            .map(|i| i + 1)
            .unwrap_or(1)
    }

    fn section_line(&self, key: &str) -> usize {
        self.lines
            .iter()
            .position(|l| {
                l.starts_with(&format!("{key}:"))
                    || l.trim_start().starts_with(&format!("\"{key}\":"))
            })
            .map(|i| i + 1)
            .unwrap_or(1)
    }

    fn mapping(&mut self, spec: MappingSpec, content_sha256: String) -> Mapping {
        let top = At {
            line: 1,
            item: "mapping".into(),
        };
        if spec.id.is_empty()
            || !spec
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.err(
                &top,
                "id",
                "`id` must be non-empty letters, digits, `-`, `_` or `.`",
                Some("it appears in URLs: POST /submissions/{id}".to_string()),
            );
        }
        let version = spec.version.into_string();
        if version.is_empty() || version.contains('|') {
            self.err(
                &top,
                "version",
                "`version` must be non-empty and must not contain `|`",
                None,
            );
        }
        if !(spec.url.starts_with("http://")
            || spec.url.starts_with("https://")
            || spec.url.starts_with("urn:"))
        {
            self.err(
                &top,
                "url",
                "`url` must be an absolute canonical URL",
                Some("e.g. https://forms.example-clinic.com/Questionnaire/glp1-intake".to_string()),
            );
        }
        let identifier_system = spec
            .identifier_system
            .unwrap_or_else(|| format!("{}/submission", spec.url.trim_end_matches('/')));

        // Items first (source's patient fields may use the answer index too).
        let items_line = self.section_line("items");
        self.cursor = items_line.saturating_sub(1);
        let items = self.items(spec.items, "");
        if items.is_empty() {
            self.err(
                &At {
                    line: items_line,
                    item: "items".into(),
                },
                "",
                "a mapping needs at least one item",
                None,
            );
        }
        self.check_references(&items, "");

        let source = self.source(spec.source);
        let flags = self.flags(spec.flags);
        let accept_when = spec.accept_when.and_then(|c| self.accept_when(c));
        let projection = super::projection(&source, &items, accept_when.as_ref());
        Mapping {
            id: spec.id,
            version,
            title: spec.title,
            description: spec.description,
            url: spec.url,
            identifier_system,
            content_sha256,
            file: self.file.clone(),
            source,
            items,
            flags,
            accept_when,
            projection,
        }
    }

    fn selector(&mut self, at: &At, key: &str, path: &str) -> Option<Selector> {
        match Selector::compile(path) {
            Ok(s) => Some(s),
            Err(e) => {
                let msg = format!("`{key}` is not a valid JSONPath: {}", jsonpath_error(&e));
                self.err(
                    at,
                    key,
                    msg,
                    Some(
                        "paths start at `$`, e.g. `$.form_response.token` or `$.choice.ref`"
                            .to_string(),
                    ),
                );
                None
            }
        }
    }

    fn source(&mut self, s: spec::SourceSpec) -> Source {
        let at = At {
            line: self.section_line("source"),
            item: "source".into(),
        };
        let submission_id = self
            .selector(&at, "submission_id", &s.submission_id)
            .unwrap_or_else(Selector::root);
        let answers = s.answers.and_then(|a| {
            let at = At { line: self.key_position(at.line, "answers").0, item: "source.answers".into() };
            let decode_json = a.decode == Some(spec::Decode::Json);
            match (a.list, a.key, a.object) {
                (Some(list), Some(key), None) => {
                    let list = self.selector(&at, "list", &list);
                    let key = self.selector(&at, "key", &key);
                    Some(AnswerSource::List { list: list?, key: key? })
                }
                (None, None, Some(object)) => self
                    .selector(&at, "object", &object)
                    .map(|object| AnswerSource::Object { object, decode_json }),
                _ => {
                    self.err(&at, "answers", "`answers` needs either `list` with `key`, or `object`", Some("Typeform: {list: $.form_response.answers[*], key: $.field.ref}; Jotform: {object: $.rawRequest, decode: json}".to_string()));
                    None
                }
            }
        });
        let submitted_at = s.submitted_at.map(|v| {
            let at = At {
                line: self.key_position(at.line, "submitted_at").0,
                item: "source.submitted_at".into(),
            };
            self.value_rule(&at, v, ItemType::DateTime)
        });
        let p = s.patient;
        let pat = At {
            line: self.key_position(at.line, "patient").0,
            item: "source.patient".into(),
        };
        let identifier = self.value_rule(&pat, p.identifier.value, ItemType::String);
        if identifier.is_empty() {
            self.err(
                &pat,
                "identifier",
                "the patient identifier needs `answer` or `path`",
                None,
            );
        }
        let mut field = |name: &str, v: Option<ValueSpec>, ty| {
            v.map(|v| {
                let at = At {
                    line: self.key_position(pat.line, name).0,
                    item: format!("source.patient.{name}"),
                };
                self.value_rule(&at, v, ty)
            })
        };
        let given = field("given", p.given, ItemType::String);
        let family = field("family", p.family, ItemType::String);
        let birth_date = field("birth_date", p.birth_date, ItemType::Date);
        let gender = field("gender", p.gender, ItemType::String);
        if let Some(g) = gender.as_ref().and_then(|g| g.map.as_ref()) {
            for (k, t) in &g.entries {
                let ok = matches!(t, MapTarget::Value(Value::String(s)) if ["male", "female", "other", "unknown"].contains(&s.as_str()));
                if !ok {
                    self.err(
                        &pat,
                        "gender",
                        format!(
                            "gender map entry `{k}` must be one of male, female, other, unknown"
                        ),
                        None,
                    );
                }
            }
        }
        let status = s.status.map(|v| {
            let at = At {
                line: self.key_position(at.line, "status").0,
                item: "source.status".into(),
            };
            let rule = self.value_rule(&at, v, ItemType::String);
            for (k, t) in rule.map.iter().flat_map(|m| &m.entries) {
                let ok = matches!(t, MapTarget::Value(Value::String(s)) if super::QR_STATUSES.contains(&s.as_str()));
                if !ok {
                    self.err(
                        &at,
                        "status",
                        format!("status map entry `{k}` must be one of {}", super::QR_STATUSES.join(", ")),
                        None,
                    );
                }
            }
            rule
        });
        Source {
            submission_id,
            submitted_at,
            status,
            answers,
            patient: PatientRule {
                system: p.identifier.system,
                identifier,
                given,
                family,
                birth_date,
                gender,
            },
        }
    }

    fn value_rule(&mut self, at: &At, v: ValueSpec, ty: ItemType) -> ValueRule {
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
    fn pattern(
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

    fn value_map(&mut self, at: &At, m: serde_json::Map<String, Value>, ty: ItemType) -> ValueMap {
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

    fn coding(&mut self, at: &At, key: &str, v: &Value) -> Option<Value> {
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

    fn items(&mut self, specs: Vec<ItemSpec>, parent: &str) -> Vec<Item> {
        specs
            .into_iter()
            .filter_map(|s| self.item(s, parent))
            .collect()
    }

    fn item(&mut self, s: ItemSpec, parent: &str) -> Option<Item> {
        let line = self.find_line("link_id", &s.link_id);
        let path = if parent.is_empty() {
            s.link_id.clone()
        } else {
            format!("{parent}/{}", s.link_id)
        };
        let at = At {
            line,
            item: format!("item `{path}`"),
        };
        if s.link_id.is_empty() || s.link_id.chars().any(char::is_whitespace) {
            self.err(
                &at,
                "link_id",
                "`link_id` must be non-empty and without spaces",
                None,
            );
        }
        let Some(item_type) = ItemType::parse(&s.item_type) else {
            self.err(
                &at,
                "type",
                format!("unknown item type `{}`", s.item_type),
                Some(format!("one of {}", ItemType::NAMES)),
            );
            return None;
        };
        let unit = s.unit.clone();
        let scored = s
            .value
            .map
            .as_ref()
            .is_some_and(|m| m.values().any(|v| v.get("score").is_some()));
        let info = LinkInfo {
            item_type,
            line,
            unit: unit.clone(),
            scored,
        };
        if let Some(first) = self.link_ids.get(&s.link_id) {
            let msg = format!(
                "duplicate linkId `{}` (first at line {})",
                s.link_id, first.line
            );
            self.err(
                &at,
                "link_id",
                msg,
                Some("linkIds must be unique in the whole mapping".to_string()),
            );
        } else {
            self.link_ids.insert(s.link_id.clone(), info);
        }
        // Declared, even if a selector fails to compile (that error is reported on its own).
        let has_source = s.value.answer.is_some()
            || s.value.path.is_some()
            || s.value.default.is_some()
            || s.sum.is_some()
            || s.derive.is_some();
        let unknown_option_given = s.value.unknown_option.is_some();
        let mut rule = self.value_rule(&at, s.value, item_type);
        // An unexpected option beside the expected ones (an "Other" box's text, an option the
        // form's owner added) must not take a multi-select's other answers with it.
        if !unknown_option_given && item_type == ItemType::Choice && s.repeats {
            rule.unknown_option = UnknownOption::Keep;
        }
        let sum: Vec<SumPart> = s
            .sum
            .unwrap_or_default()
            .into_iter()
            .map(|p| self.sum_part(&at, p, rule.pattern.is_some()))
            .collect();
        if let Some(pattern) = &rule.pattern {
            self.pattern_captures(&at, pattern, &sum, item_type);
        }
        let derive = s.derive.as_deref().and_then(|d| self.derivation(&at, d));

        match item_type {
            ItemType::Group => {
                if s.items.is_empty() {
                    self.err(&at, "items", "a group needs `items`", None);
                }
                if s.repeats && rule.answer.is_none() && rule.path.is_none() {
                    self.err(&at, "repeats", "a repeating group needs `path` (or `answer`) selecting one element per repetition", None);
                }
                if !s.repeats && (rule.answer.is_some() || rule.path.is_some()) {
                    self.err(&at, "path", "only a repeating group selects elements; add `repeats: true` or move the selector to its items", None);
                }
            }
            _ => {
                if !s.items.is_empty() {
                    self.err(
                        &at,
                        "items",
                        format!("a {} item cannot have child items", item_type.fhir_code()),
                        Some("use `type: group`".to_string()),
                    );
                }
                if !has_source {
                    self.err(
                        &at,
                        "answer",
                        "the item has no source",
                        Some("give `answer`, `path`, `sum`, `derive` or `default`".to_string()),
                    );
                }
            }
        }
        if item_type == ItemType::Choice
            && rule
                .map
                .as_ref()
                .is_none_or(|m| m.codings().next().is_none())
            && derive.is_none()
        {
            self.err(
                &at,
                "type",
                "a choice item needs a value map to Codings (`map`)",
                Some("map each vendor label or option id to {system, code, display}".to_string()),
            );
        }
        match item_type {
            ItemType::Quantity => match &unit {
                None => self.err(&at, "type", "a quantity item needs `unit` (UCUM)", None),
                Some(u) if !units::is_known(u) => self.err(
                    &at,
                    "unit",
                    format!("unknown UCUM unit `{u}`"),
                    Some(format!("known: {}", units::known_codes())),
                ),
                Some(u) => {
                    if let Some(from) = &rule.from_unit {
                        if let Err(e) = units::check(from, u) {
                            self.err(&at, "from_unit", e.to_string(), None);
                        }
                    }
                    for part in &sum {
                        if let Err(e) = units::check(&part.unit, u) {
                            self.err(&at, "sum", e.to_string(), None);
                        }
                    }
                    for code in rule.pattern.iter().flat_map(|p| p.units.values()) {
                        if let Err(e) = units::check(code, u) {
                            self.err(&at, "units", e.to_string(), None);
                        }
                    }
                }
            },
            _ => {
                if unit.is_some() {
                    self.err(
                        &at,
                        "unit",
                        format!(
                            "`unit` applies to quantity items, not {}",
                            item_type.fhir_code()
                        ),
                        None,
                    );
                }
                if !sum.is_empty() {
                    self.err(
                        &at,
                        "sum",
                        "`sum` builds a quantity: use `type: quantity`",
                        None,
                    );
                }
            }
        }
        let code = s.code.as_ref().and_then(|c| self.coding(&at, "code", c));
        let required_when = s
            .required_when
            .and_then(|c| self.condition(&at, "required_when", c));
        let children = self.items(s.items, &path);
        let observation = s
            .observation
            .and_then(|o| self.observation(&at, o, item_type, &code, &children, unit.as_deref()));
        let range = self.range(
            &at,
            s.range,
            item_type,
            unit.as_deref(),
            &observation,
            &code,
        );
        Some(Item {
            link_id: s.link_id,
            text: s.text,
            item_type,
            repeats: s.repeats,
            required: s.required,
            required_when,
            line,
            rule,
            sum,
            derive,
            unit,
            precision: s.precision,
            range,
            code,
            observation,
            children,
        })
    }

    /// One `sum` part: an answer of its own, or (with the item's `pattern`) a named capture.
    fn sum_part(&mut self, at: &At, p: spec::SumPartSpec, item_has_pattern: bool) -> SumPart {
        match (&p.capture, item_has_pattern) {
            (Some(_), false) => self.err(
                at,
                "capture",
                "a `sum` part with `capture` reads the item's `pattern`: give the item one",
                None,
            ),
            (None, true) => self.err(
                at,
                "sum",
                "with a `pattern`, each `sum` part names the capture it reads (`capture: ft`)",
                None,
            ),
            (Some(_), true) if p.value.answer.is_some() || p.value.path.is_some() => self.err(
                at,
                "capture",
                "a part reads a capture or an answer of its own, not both",
                None,
            ),
            _ => {}
        }
        let rule = self.value_rule(at, p.value, ItemType::Quantity);
        if p.capture.is_none() && rule.answer.is_none() && rule.path.is_none() {
            self.err(
                at,
                "sum",
                "a `sum` part needs `answer`, `path` or `capture`",
                None,
            );
        }
        if !units::is_known(&p.unit) {
            self.err(
                at,
                "sum",
                format!("unknown UCUM unit `{}`", p.unit),
                Some(format!("known: {}", units::known_codes())),
            );
        }
        SumPart {
            rule,
            capture: p.capture,
            unit: p.unit,
        }
    }

    /// The captures a pattern names fit what reads them: with `sum`, each capture is a part's
    /// and each part's capture is in some alternative; without, each alternative has `value`
    /// (and `unit` only for a quantity).
    fn pattern_captures(&mut self, at: &At, pattern: &Pattern, sum: &[SumPart], ty: ItemType) {
        let used: Vec<&str> = sum.iter().filter_map(|p| p.capture.as_deref()).collect();
        for (i, re) in pattern.alternatives.iter().enumerate() {
            let which = if pattern.alternatives.len() > 1 {
                format!("pattern {}", i + 1)
            } else {
                "`pattern`".to_string()
            };
            let names: Vec<&str> = re.capture_names().flatten().collect();
            for name in &names {
                let ok = if sum.is_empty() {
                    *name == "value" || (*name == "unit" && ty == ItemType::Quantity)
                } else {
                    used.contains(name)
                };
                if !ok {
                    let hint = if sum.is_empty() {
                        "name the number `value` (and, in a quantity, its unit `unit`)"
                    } else {
                        "each capture is read by a `sum` part (`{capture: <name>, unit: …}`)"
                    };
                    self.err(
                        at,
                        "pattern",
                        format!("{which} names a capture `{name}` that nothing uses"),
                        Some(hint.to_string()),
                    );
                }
            }
            if sum.is_empty() && !names.contains(&"value") {
                self.err(
                    at,
                    "pattern",
                    format!("{which} has no capture `value` (the number)"),
                    None,
                );
            }
            if !sum.is_empty() && !names.iter().any(|n| used.contains(n)) {
                self.err(
                    at,
                    "pattern",
                    format!("{which} captures no part of the `sum`"),
                    None,
                );
            }
        }
        for name in &used {
            if !pattern
                .alternatives
                .iter()
                .any(|re| re.capture_names().flatten().any(|n| n == *name))
            {
                self.err(
                    at,
                    "sum",
                    format!("part `{name}` reads a capture that no pattern has"),
                    None,
                );
            }
        }
    }

    /// The item's plausible range: declared (`range`), else the default of the vital sign its
    /// Observation (or, as a component, its code) charts.
    fn range(
        &mut self,
        at: &At,
        declared: Option<spec::RangeSpec>,
        ty: ItemType,
        unit: Option<&str>,
        observation: &Option<ObservationRule>,
        code: &Option<Value>,
    ) -> Option<Range> {
        let numeric = matches!(
            ty,
            ItemType::Decimal | ItemType::Integer | ItemType::Quantity
        );
        if let Some(r) = declared {
            return self.declared_range(at, r, numeric, unit);
        }
        if !numeric {
            return None;
        }
        let codes: Vec<&Value> = match observation {
            Some(o) if !o.codes.is_empty() => o.codes.iter().collect(),
            _ => code.iter().collect(),
        };
        plausible::default_range(&codes, unit)
    }

    fn declared_range(
        &mut self,
        at: &At,
        r: spec::RangeSpec,
        numeric: bool,
        unit: Option<&str>,
    ) -> Option<Range> {
        if !numeric {
            self.err(
                at,
                "range",
                "`range` applies to decimal, integer and quantity items",
                None,
            );
            return None;
        }
        let ok = match (r.min, r.max) {
            (None, None) => false,
            (Some(a), Some(b)) => a.is_finite() && b.is_finite() && a <= b,
            (Some(x), None) | (None, Some(x)) => x.is_finite(),
        };
        if !ok {
            self.err(
                at,
                "range",
                "`range` needs `min`, `max` or both, with min ≤ max",
                Some("in the item's unit, e.g. {min: 30, max: 272} for a height in cm".to_string()),
            );
            return None;
        }
        Some(Range {
            min: r.min,
            max: r.max,
            unit: unit.map(str::to_string),
            default_for: None,
        })
    }

    fn derivation(&mut self, at: &At, d: &str) -> Option<Derivation> {
        let parsed = d
            .trim()
            .strip_suffix(')')
            .and_then(|d| d.split_once('('))
            .map(|(name, args)| {
                let args: Vec<String> = args
                    .split(',')
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect();
                (name.trim().to_string(), args)
            });
        let hint =
            Some("one of bmi(weight, height), sum_scores(item, …), sum(item, …)".to_string());
        match parsed {
            Some((name, args)) if name == "bmi" && args.len() == 2 => Some(Derivation::Bmi {
                weight: args[0].clone(),
                height: args[1].clone(),
            }),
            Some((name, args)) if name == "sum_scores" && !args.is_empty() => {
                Some(Derivation::SumScores(args))
            }
            Some((name, args)) if name == "sum" && !args.is_empty() => Some(Derivation::Sum(args)),
            _ => {
                self.err(at, "derive", format!("unknown derivation `{d}`"), hint);
                None
            }
        }
    }

    fn observation(
        &mut self,
        at: &At,
        o: spec::ObservationSpec,
        item_type: ItemType,
        item_code: &Option<Value>,
        children: &[Item],
        _unit: Option<&str>,
    ) -> Option<ObservationRule> {
        let codes = match &o.code {
            Some(Value::Array(list)) if !list.is_empty() => list
                .iter()
                .filter_map(|c| self.coding(at, "code", c))
                .collect(),
            Some(c) => self.coding(at, "code", c).into_iter().collect(),
            None => item_code.iter().cloned().collect::<Vec<_>>(),
        };
        if codes.is_empty() && o.code.is_none() {
            self.err(
                at,
                "observation",
                "an Observation needs a code",
                Some(
                    "give `observation.code` or the item's `code` (a LOINC or SNOMED Coding)"
                        .to_string(),
                ),
            );
        }
        let categories = match &o.category {
            None => Vec::new(),
            Some(Value::Array(list)) => list.iter().filter_map(|c| self.category(at, c)).collect(),
            Some(c) => self.category(at, c).into_iter().collect(),
        };
        let components = match (o.components, o.split_components) {
            (Some(_), Some(_)) => {
                self.err(
                    at,
                    "components",
                    "give `components` or `split_components`, not both",
                    None,
                );
                Components::None
            }
            (Some(ids), None) => {
                if item_type != ItemType::Group {
                    self.err(
                        at,
                        "components",
                        "`components` lists children of a group",
                        None,
                    );
                }
                for id in &ids {
                    match children.iter().find(|c| &c.link_id == id) {
                        None => self.err(
                            at,
                            "components",
                            format!("component `{id}` is not a child item of this group"),
                            None,
                        ),
                        Some(c) if c.code.is_none() => self.err(
                            at,
                            "components",
                            format!("component `{id}` needs a `code`"),
                            Some("e.g. {system: http://loinc.org, code: 8480-6}".to_string()),
                        ),
                        Some(_) => {}
                    }
                }
                Components::Children(ids)
            }
            (None, Some(split)) => {
                if !matches!(item_type, ItemType::String | ItemType::Text) {
                    self.err(
                        at,
                        "split_components",
                        "`split_components` reads a free-text answer: use `type: string`",
                        None,
                    );
                }
                if split.separator.is_empty() || split.parts.is_empty() {
                    self.err(
                        at,
                        "split_components",
                        "`split_components` needs a separator and parts",
                        None,
                    );
                }
                let parts = split
                    .parts
                    .into_iter()
                    .filter_map(|p| {
                        if !units::is_known(&p.unit) {
                            self.err(
                                at,
                                "split_components",
                                format!("unknown UCUM unit `{}`", p.unit),
                                None,
                            );
                        }
                        let code = self.coding(at, "split_components", &p.code)?;
                        let range = match p.range {
                            Some(r) => self.declared_range(at, r, true, Some(&p.unit)),
                            None => plausible::default_range(&[&code], Some(&p.unit)),
                        };
                        Some(SplitPart {
                            code,
                            unit: p.unit,
                            range,
                        })
                    })
                    .collect();
                Components::Split {
                    separator: split.separator,
                    parts,
                }
            }
            (None, None) => {
                if item_type == ItemType::Group {
                    self.err(
                        at,
                        "observation",
                        "an Observation on a group needs `components`",
                        Some("or put the observation on the child items".to_string()),
                    );
                }
                Components::None
            }
        };
        Some(ObservationRule {
            codes,
            categories,
            components,
        })
    }

    fn category(&mut self, at: &At, c: &Value) -> Option<Value> {
        const KNOWN: [(&str, &str); 9] = [
            ("social-history", "Social History"),
            ("vital-signs", "Vital Signs"),
            ("imaging", "Imaging"),
            ("laboratory", "Laboratory"),
            ("procedure", "Procedure"),
            ("survey", "Survey"),
            ("exam", "Exam"),
            ("therapy", "Therapy"),
            ("activity", "Activity"),
        ];
        match c {
            Value::String(s) => match KNOWN.iter().find(|(k, _)| k == s) {
                Some((code, display)) => Some(serde_json::json!({"coding": [{
                    "system": crate::fhir::OBSERVATION_CATEGORY, "code": code, "display": display}]})),
                None => {
                    self.err(
                        at,
                        "category",
                        format!("unknown observation category `{s}`"),
                        Some(format!(
                            "one of {}, or a Coding",
                            KNOWN.map(|k| k.0).join(", ")
                        )),
                    );
                    None
                }
            },
            other => self
                .coding(at, "category", other)
                .map(|coding| serde_json::json!({"coding": [coding]})),
        }
    }

    fn condition(&mut self, at: &At, key: &str, c: ConditionSpec) -> Option<Condition> {
        self.condition_on(at, key, c, None)
    }

    /// A condition on items' answers (`paths` none) or, for `accept_when`, on values of the
    /// payload at JSONPaths (`paths` collects their selectors; the condition names each by
    /// its text).
    fn condition_on(
        &mut self,
        at: &At,
        key: &str,
        c: ConditionSpec,
        mut paths: Option<&mut Vec<Selector>>,
    ) -> Option<Condition> {
        let combinators = [c.any.is_some(), c.all.is_some(), c.not.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        let ops = [
            c.equals.is_some(),
            c.contains.is_some(),
            c.one_of.is_some(),
            c.answered.is_some(),
            c.gt.is_some(),
            c.gte.is_some(),
            c.lt.is_some(),
            c.lte.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        let subject = if paths.is_some() { "path" } else { "item" };
        let hint = Some(format!("write {{{subject}: <{}>, equals|contains|in|answered|gt|gte|lt|lte: …}}, or any/all/not of conditions", if paths.is_some() { "JSONPath" } else { "linkId" }));
        let wrong = if paths.is_some() {
            c.item.is_some()
        } else {
            c.path.is_some()
        };
        if wrong {
            let msg = if paths.is_some() {
                "`accept_when` reads the payload: name a `path`, not an `item` (a post it ignores is never mapped)"
            } else {
                "`path` is for `accept_when`; conditions here name an `item`"
            };
            self.err(at, key, msg, hint);
            return None;
        }
        let named = c.item.is_some() || c.path.is_some();
        if combinators + usize::from(named) != 1 || (named && ops != 1) || (!named && ops != 0) {
            self.err(
                at,
                key,
                format!("a condition needs exactly one `{subject}` with one test, or one of any/all/not"),
                hint,
            );
            return None;
        }
        if let Some(list) = c.any {
            let cs: Vec<_> = list
                .into_iter()
                .filter_map(|c| self.condition_on(at, key, c, paths.as_deref_mut()))
                .collect();
            return Some(Condition::Any(cs));
        }
        if let Some(list) = c.all {
            let cs: Vec<_> = list
                .into_iter()
                .filter_map(|c| self.condition_on(at, key, c, paths.as_deref_mut()))
                .collect();
            return Some(Condition::All(cs));
        }
        if let Some(inner) = c.not {
            return self
                .condition_on(at, key, *inner, paths)
                .map(|c| Condition::Not(Box::new(c)));
        }
        let item = match (c.item, c.path, paths) {
            (Some(item), _, _) => item,
            (None, Some(path), Some(paths)) => {
                let selector = self.selector(at, key, &path)?;
                paths.push(selector);
                path
            }
            _ => return None,
        };
        Some(if let Some(v) = c.equals.or(c.contains) {
            Condition::AnyOf {
                item,
                values: vec![v],
            }
        } else if let Some(values) = c.one_of {
            Condition::AnyOf { item, values }
        } else if let Some(answered) = c.answered {
            Condition::Answered { item, answered }
        } else {
            let (op, value) = match (c.gt, c.gte, c.lt, c.lte) {
                (Some(v), ..) => (Cmp::Gt, v),
                (_, Some(v), ..) => (Cmp::Gte, v),
                (_, _, Some(v), _) => (Cmp::Lt, v),
                (.., Some(v)) => (Cmp::Lte, v),
                _ => return None,
            };
            Condition::Compare { item, op, value }
        })
    }

    /// `accept_when`: which posts are submissions (a condition on the payload's values).
    fn accept_when(&mut self, c: ConditionSpec) -> Option<AcceptWhen> {
        let at = At {
            line: self.section_line("accept_when"),
            item: "accept_when".into(),
        };
        let mut paths = Vec::new();
        let condition = self.condition_on(&at, "accept_when", c, Some(&mut paths))?;
        Some(AcceptWhen {
            text: condition.describe(),
            condition,
            paths,
        })
    }

    /// Checks what items name of each other (derivations, conditions) once all are known.
    fn check_references(&mut self, items: &[Item], parent: &str) {
        for item in items {
            let path = if parent.is_empty() {
                item.link_id.clone()
            } else {
                format!("{parent}/{}", item.link_id)
            };
            let at = At {
                line: item.line,
                item: format!("item `{path}`"),
            };
            if let Some(c) = &item.required_when {
                for id in c.items() {
                    if !self.link_ids.contains_key(id) {
                        self.err(
                            &at,
                            "required_when",
                            format!("`required_when` names unknown item `{id}`"),
                            None,
                        );
                    }
                }
            }
            match &item.derive {
                Some(Derivation::Bmi { weight, height }) => {
                    let dims = [
                        (weight, Dimension::Mass, "weight"),
                        (height, Dimension::Length, "height"),
                    ];
                    for (id, dim, what) in dims {
                        match self.link_ids.get(id.as_str()).cloned() {
                            None => {
                                self.err(&at, "derive", format!("bmi(): unknown item `{id}`"), None)
                            }
                            Some(info)
                                if info.item_type != ItemType::Quantity
                                    || info.unit.as_deref().and_then(units::dimension)
                                        != Some(dim) =>
                            {
                                self.err(
                                    &at,
                                    "derive",
                                    format!(
                                        "bmi(): `{id}` must be a quantity item measuring {what}"
                                    ),
                                    None,
                                )
                            }
                            Some(_) => {}
                        }
                    }
                    if !(item.item_type == ItemType::Decimal
                        || (item.item_type == ItemType::Quantity
                            && item.unit.as_deref() == Some("kg/m2")))
                    {
                        self.err(
                            &at,
                            "derive",
                            "a bmi() item is a quantity in `kg/m2` (or a decimal)",
                            None,
                        );
                    }
                }
                Some(Derivation::SumScores(ids)) => {
                    for id in ids {
                        match self.link_ids.get(id.as_str()).cloned() {
                            None => self.err(
                                &at,
                                "derive",
                                format!("sum_scores(): unknown item `{id}`"),
                                None,
                            ),
                            Some(info) if !info.scored => self.err(
                                &at,
                                "derive",
                                format!("sum_scores(): `{id}` has no scored options"),
                                Some("give its map entries a `score`".to_string()),
                            ),
                            Some(_) => {}
                        }
                    }
                    if !matches!(item.item_type, ItemType::Integer | ItemType::Decimal) {
                        self.err(
                            &at,
                            "derive",
                            "a sum_scores() item is an integer or a decimal",
                            None,
                        );
                    }
                }
                Some(Derivation::Sum(ids)) => {
                    for id in ids {
                        match self.link_ids.get(id.as_str()).map(|i| i.item_type) {
                            None => {
                                self.err(&at, "derive", format!("sum(): unknown item `{id}`"), None)
                            }
                            Some(ItemType::Integer | ItemType::Decimal | ItemType::Quantity) => {}
                            Some(_) => self.err(
                                &at,
                                "derive",
                                format!("sum(): `{id}` is not numeric"),
                                None,
                            ),
                        }
                    }
                }
                None => {}
            }
            self.check_references(&item.children, &path);
        }
    }

    fn flags(&mut self, specs: Vec<spec::FlagSpec>) -> Vec<Flag> {
        let mut names = HashSet::new();
        let mut flags = Vec::new();
        self.cursor = 0;
        for f in specs {
            let line = self.find_line("name", &f.name);
            let at = At {
                line,
                item: format!("flag `{}`", f.name),
            };
            if f.name.is_empty()
                || !f
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                self.err(&at, "name", "flag names are snake_case (a-z, 0-9, _)", None);
            }
            if !names.insert(f.name.clone()) {
                self.err(&at, "name", format!("duplicate flag `{}`", f.name), None);
            }
            if let Some(when) = self.condition(&at, "when", f.when) {
                for id in when.items() {
                    if !self.link_ids.contains_key(id) {
                        self.err(
                            &at,
                            "when",
                            format!("the condition names unknown item `{id}`"),
                            None,
                        );
                    }
                }
                flags.push(Flag {
                    name: f.name,
                    description: f.description,
                    when,
                });
            }
        }
        flags
    }
}

/// jsonpath-rust's (pest) error in one line: `column 22: expected int`.
fn jsonpath_error(e: &str) -> String {
    let column = e
        .lines()
        .find_map(|l| l.split_once("--> ").map(|(_, pos)| pos.trim()))
        .and_then(|pos| pos.split(':').nth(1))
        .map(|c| format!("column {c}: "));
    let expected = e
        .lines()
        .find_map(|l| l.trim().strip_prefix("= "))
        .map(str::to_string);
    match (column, expected) {
        (Some(c), Some(x)) => format!("{c}{x}"),
        _ => e.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}
