//! Loading and checking mapping files: YAML/JSON → `MappingSpec` → `Mapping`.
//!
//! Every problem is collected (not just the first), each with file:line:column, the item's path
//! and a hint. Lines of semantic errors are found in the source text by the item's `link_id`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

mod checks;
mod items;
mod values;

use super::select::{AnswerSource, Selector};
use super::spec::{self, MappingSpec, ValueSpec};
use super::{ItemType, MapTarget, Mapping, PatientRule, Source};

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
            refill_request: spec.refill_request,
            review_task: spec.review_task,
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
