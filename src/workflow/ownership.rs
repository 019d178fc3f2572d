//! The ownership matrix (`ownership.yaml`): which system owns which data, and which fields of an
//! event each receiver is sent. It is what keeps the stack from charting in parallel: intake and
//! the portal own what the patient entered and sees, the CRM owns stages and queues, the EHR owns
//! notes, decisions, orders and signatures.
//!
//! The gateway enforces it three ways, all through this module: `check_mapping` refuses a mapping
//! that would write EHR-owned data; `receives` filters each webhook's `data` to its receiver's
//! fields; `owner_of` says who may send an event about a kind of data (anyone else gets 403).
//! Pure: loading reads a file, nothing else does I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The shipped matrix, used when the configuration names none.
pub const DEFAULT: &str = include_str!("../../ownership.yaml");

/// A field of an event's `data`: what a receiver may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// Which submission (mapping, id, revision): every receiver needs it to file the event.
    Submission,
    /// The patient's identifier from the intake (system and value).
    Patient,
    /// The CRM's stage.
    Stage,
    /// The portal's patient-visible status.
    Status,
    /// Ops flags raised by the mapping (`contraindication_reported`, …).
    Flags,
    /// The answers missing or not charted: linkId, question text, why (never a value).
    Missing,
    /// The questions the patient is asked to answer: linkId and text.
    Questions,
    /// What the EHR stored for the submission: references and versions.
    Ehr,
    /// The EHR resource an event came from (`Task/123`, its version).
    Source,
    /// Why a delivery was dead-lettered (an ops problem).
    Failure,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::Submission => "submission",
            Field::Patient => "patient",
            Field::Stage => "stage",
            Field::Status => "status",
            Field::Flags => "flags",
            Field::Missing => "missing",
            Field::Questions => "questions",
            Field::Ehr => "ehr",
            Field::Source => "source",
            Field::Failure => "failure",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemSpec {
    #[serde(default)]
    owns: Vec<String>,
    #[serde(default)]
    receives: Vec<Field>,
    #[serde(default)]
    observation_categories: Vec<String>,
    #[serde(default)]
    decisions: Vec<String>,
}

/// One system of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct System {
    pub owns: Vec<String>,
    pub receives: Vec<Field>,
    /// Observation categories only this system may write (a mapping may not).
    pub observation_categories: Vec<String>,
    /// Flag names that are this system's decisions (a mapping may not raise them).
    pub decisions: Vec<String>,
}

/// The loaded matrix.
#[derive(Debug, Clone)]
pub struct Ownership {
    /// Where it was read from (`ownership.yaml (shipped)` for the default).
    pub file: PathBuf,
    systems: BTreeMap<String, System>,
}

/// A problem in the matrix, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for OwnershipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

impl std::error::Error for OwnershipError {}

impl Ownership {
    /// The shipped matrix.
    pub fn defaults() -> Ownership {
        match Ownership::parse(Path::new("ownership.yaml (shipped)"), DEFAULT) {
            Ok(o) => o,
            // The shipped file is tested (`the_shipped_matrix_loads`): this cannot happen.
            Err(_) => Ownership {
                file: PathBuf::from("ownership.yaml (shipped)"),
                systems: BTreeMap::new(),
            },
        }
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Ownership, Vec<OwnershipError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![OwnershipError {
                file: path.to_path_buf(),
                line: 0,
                message: format!("cannot read it: {e}"),
            }]
        })?;
        Ownership::parse(path, &text)
    }

    /// Parses and checks the matrix in `text`: every data kind owned by one system at most,
    /// every system named as the gateway names them (`a-z`, `0-9`, `_`, `-`).
    pub fn parse(file: &Path, text: &str) -> Result<Ownership, Vec<OwnershipError>> {
        let error = |line: usize, message: String| OwnershipError {
            file: file.to_path_buf(),
            line,
            message,
        };
        let specs: BTreeMap<String, SystemSpec> = serde_norway::from_str(text).map_err(|e| {
            let line = e.location().map_or(0, |l| l.line());
            vec![error(line, format!("not an ownership matrix: {e}"))]
        })?;
        let mut errors = Vec::new();
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, spec) in &specs {
            let line = line_of(text, &format!("{name}:"));
            if crate::store::Receiver::webhook(name).is_err() && name != "ehr" {
                errors.push(error(
                    line,
                    format!("`{name}` is not a system's name: 1 to 32 of a-z, 0-9, - and _"),
                ));
            }
            for kind in &spec.owns {
                if let Some(other) = owner.insert(kind, name) {
                    errors.push(error(
                        line_of(text, kind),
                        format!("`{kind}` is owned by both `{other}` and `{name}`: one owner each"),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let systems = specs
            .into_iter()
            .map(|(name, s)| {
                (
                    name,
                    System {
                        owns: s.owns,
                        receives: s.receives,
                        observation_categories: s.observation_categories,
                        decisions: s.decisions,
                    },
                )
            })
            .collect();
        Ok(Ownership {
            file: file.to_path_buf(),
            systems,
        })
    }

    /// The system that owns data of `kind`, if one does.
    pub fn owner_of(&self, kind: &str) -> Option<&str> {
        self.systems
            .iter()
            .find(|(_, s)| s.owns.iter().any(|k| k == kind))
            .map(|(name, _)| name.as_str())
    }

    /// The fields of an event `receiver` is sent (none for a system the matrix does not name).
    pub fn receives(&self, receiver: &str) -> &[Field] {
        self.systems
            .get(receiver)
            .map_or(&[], |s| s.receives.as_slice())
    }

    pub fn system(&self, name: &str) -> Option<&System> {
        self.systems.get(name)
    }

    /// What in `mapping` writes data another system owns: an Observation category or a flag
    /// that is another system's. One message per problem, naming the item or flag, with the
    /// item's line in the mapping file (flags have none).
    pub fn check_mapping(&self, mapping: &crate::mapping::Mapping) -> Vec<(Option<usize>, String)> {
        let mut problems = Vec::new();
        for (name, system) in &self.systems {
            if name == "intake" {
                continue;
            }
            for item in mapping.all_items() {
                let Some(observation) = &item.observation else {
                    continue;
                };
                for category in observation.categories.iter().flat_map(category_codes) {
                    if system.observation_categories.iter().any(|c| c == category) {
                        problems.push((
                            Some(item.line),
                            format!(
                                "item `{}` writes an Observation of category `{category}`, \
                                 which is the {name}'s (ownership: {}): a mapping charts what \
                                 the patient entered, never a clinician's findings",
                                item.link_id,
                                self.file.display()
                            ),
                        ));
                    }
                }
            }
            for flag in &mapping.flags {
                if system.decisions.iter().any(|d| d == &flag.name) {
                    problems.push((
                        None,
                        format!(
                            "flag `{}` is one of the {name}'s decisions (ownership: {}): the \
                             gateway raises ops flags, a provider decides; name it for what the \
                             answers say (e.g. `{}_criteria_met`)",
                            flag.name,
                            self.file.display(),
                            flag.name
                        ),
                    ));
                }
            }
        }
        problems
    }
}

/// `file:line: message`, or `file: message` without a line.
pub fn located(file: &Path, (line, message): &(Option<usize>, String)) -> String {
    match line {
        Some(line) => format!("{}:{line}: {message}", file.display()),
        None => format!("{}: {message}", file.display()),
    }
}

/// The codes of an Observation category as a mapping holds it (a CodeableConcept).
fn category_codes(category: &serde_json::Value) -> impl Iterator<Item = &str> {
    category["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["code"].as_str())
}

/// The 1-based line of the first line of `text` that contains `needle` (1 if none does).
pub(crate) fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_matrix_loads() {
        let o = Ownership::parse(Path::new("ownership.yaml"), DEFAULT).unwrap();
        assert_eq!(o.owner_of("clinical_decisions"), Some("ehr"));
        assert_eq!(o.owner_of("stages"), Some("crm"));
        assert_eq!(o.owner_of("patient_visible_status"), Some("portal"));
        assert_eq!(o.owner_of("nothing"), None);
        assert_eq!(
            o.receives("portal"),
            [
                Field::Submission,
                Field::Patient,
                Field::Status,
                Field::Questions
            ]
        );
        assert!(!o.receives("crm").contains(&Field::Questions));
        assert!(o.receives("pharmacy").is_empty());
        assert_eq!(Ownership::defaults().owner_of("orders"), Some("ehr"));
    }

    #[test]
    fn one_owner_per_kind_and_errors_say_where() {
        let text = "crm:\n  owns: [stages]\nportal:\n  owns: [status, stages]\n";
        let errors = Ownership::parse(Path::new("o.yaml"), text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("`stages` is owned by both"));
        assert_eq!(errors[0].line, 2);
        let errors = Ownership::parse(Path::new("o.yaml"), "crm:\n  gives: [x]\n").unwrap_err();
        assert!(
            errors[0].to_string().starts_with("o.yaml:"),
            "{}",
            errors[0]
        );
        let errors =
            Ownership::parse(Path::new("o.yaml"), "crm:\n  receives: [answers]\n").unwrap_err();
        assert!(errors[0].message.contains("answers"), "{}", errors[0]);
    }
}
