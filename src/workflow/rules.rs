//! Workflow rules (`workflows/*.yaml`): which EHR resource means which event, CRM stage and
//! portal status. A rule looks only at structured fields — the resource type, `status`, a code
//! or the text of `Task.businessStatus`, `DocumentReference.docStatus`, whether `Task.owner` is
//! set — never at a note's text. The first rule that matches wins.
//!
//! Loading checks everything a rule names (its event's name, the stage and status spellings,
//! who owns what it is about) and reports each problem with file:line, as the mapping checker
//! does. Matching is pure.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::ownership::{line_of, Ownership};

/// The shipped rules, used when the workflows directory holds none.
pub const DEFAULT: &str = include_str!("../../workflows/default.yaml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    when: WhenSpec,
    event: String,
    #[serde(default)]
    about: Option<String>,
    #[serde(default)]
    crm: Option<String>,
    #[serde(default)]
    portal: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhenSpec {
    resource: String,
    #[serde(default)]
    status: Vec<String>,
    #[serde(default)]
    business_status: Vec<String>,
    #[serde(default)]
    doc_status: Vec<String>,
    #[serde(default)]
    owner: Option<Presence>,
}

/// Whether a field is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Set,
    Unset,
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct When {
    pub resource: String,
    pub status: Vec<String>,
    /// Normalised (`normal`).
    pub business_status: Vec<String>,
    pub doc_status: Vec<String>,
    pub owner: Option<Presence>,
}

/// One checked rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub file: PathBuf,
    pub line: usize,
    pub when: When,
    /// The event's type (`decision.made`).
    pub event: String,
    /// The kind of data it is about (`clinical_decisions`): only its owner may send it.
    pub about: String,
    /// The CRM stage it sets, if it sends the CRM anything.
    pub crm: Option<String>,
    /// The portal status it sets, if it sends the portal anything.
    pub portal: Option<String>,
}

/// A problem in a rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

impl std::error::Error for RuleError {}

/// The resource types rules may match: the ones whose fields they read.
const RESOURCES: [&str; 6] = [
    "Task",
    "MedicationRequest",
    "DocumentReference",
    "Composition",
    "ServiceRequest",
    "Appointment",
];

/// What the events the shipped rules name are about, so that a rule need not say it.
pub fn known_about(event: &str) -> Option<&'static str> {
    Some(match event {
        "decision.made" | "information.requested" | "follow_up.required" => "clinical_decisions",
        "provider.assigned" => "provider_assignment",
        "prescription.sent" => "orders",
        "note.signed" => "chart_notes",
        _ => return None,
    })
}

/// The events the gateway raises itself: a rule may not name them.
pub const GATEWAY_EVENTS: [&str; 6] = [
    "intake.submitted",
    "intake.updated",
    "intake.needs_information",
    "intake.charted",
    "intake.failed",
    "refill.requested",
];

/// Lower case, with spaces and `_` as `-`: `More information needed` and
/// `more-information-needed` are the same business status.
pub fn normal(text: &str) -> String {
    text.trim()
        .chars()
        .map(|c| match c {
            ' ' | '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

fn is_event_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() >= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

fn is_state_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Parses and checks the rules of one file.
pub fn parse(file: &Path, text: &str, ownership: &Ownership) -> Result<Vec<Rule>, Vec<RuleError>> {
    let error = |line: usize, message: String| RuleError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let spec: FileSpec = serde_norway::from_str(text).map_err(|e| {
        let line = e.location().map_or(0, |l| l.line());
        vec![error(line, format!("not a workflow file: {e}"))]
    })?;
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    let mut names = std::collections::HashSet::new();
    for r in spec.rules {
        let line = line_of(text, &format!("name: {}", r.name));
        let mut problem = |message: String| errors.push(error(line, message));
        let what = format!("rule `{}`", r.name);
        if !names.insert(r.name.clone()) {
            problem(format!("{what}: another rule has this name"));
        }
        if !RESOURCES.contains(&r.when.resource.as_str()) {
            problem(format!(
                "{what}: `when.resource: {}` is not one rules can match (one of {})",
                r.when.resource,
                RESOURCES.join(", ")
            ));
        }
        if !r.when.business_status.is_empty() && r.when.resource != "Task" {
            problem(format!("{what}: `business_status` is a Task's"));
        }
        if !r.when.doc_status.is_empty() && r.when.resource != "DocumentReference" {
            problem(format!("{what}: `doc_status` is a DocumentReference's"));
        }
        if r.when.owner.is_some() && r.when.resource != "Task" {
            problem(format!("{what}: `owner` is a Task's"));
        }
        if !is_event_name(&r.event) {
            problem(format!(
                "{what}: `event: {}` is not an event's name (words of a-z, 0-9 and _, joined by dots: `decision.made`)",
                r.event
            ));
        }
        if GATEWAY_EVENTS.contains(&r.event.as_str()) {
            problem(format!(
                "{what}: `{}` is raised by the gateway itself, not by an EHR resource",
                r.event
            ));
        }
        for (receiver, state) in [("crm", &r.crm), ("portal", &r.portal)] {
            if let Some(s) = state.as_deref().filter(|s| !is_state_name(s)) {
                problem(format!(
                    "{what}: `{receiver}: {s}` is not a stage or status (a-z, 0-9 and _)"
                ));
            }
        }
        if r.crm.is_none() && r.portal.is_none() {
            problem(format!(
                "{what}: sets neither a `crm` stage nor a `portal` status: it would send nothing"
            ));
        }
        let about = r
            .about
            .clone()
            .or_else(|| known_about(&r.event).map(str::to_string));
        let about = match about {
            Some(a) if ownership.owner_of(&a).is_some() => a,
            Some(a) => {
                problem(format!(
                    "{what}: `about: {a}` is owned by no system in {}",
                    ownership.file.display()
                ));
                a
            }
            None => {
                problem(format!(
                    "{what}: say what `{}` is `about` (a kind of data in {})",
                    r.event,
                    ownership.file.display()
                ));
                String::new()
            }
        };
        rules.push(Rule {
            name: r.name,
            file: file.to_path_buf(),
            line,
            when: When {
                resource: r.when.resource,
                status: r.when.status,
                business_status: r.when.business_status.iter().map(|s| normal(s)).collect(),
                doc_status: r.when.doc_status,
                owner: r.when.owner,
            },
            event: r.event,
            about,
            crm: r.crm,
            portal: r.portal,
        });
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

/// The shipped rules.
pub fn defaults(ownership: &Ownership) -> Vec<Rule> {
    parse(
        Path::new("workflows/default.yaml (shipped)"),
        DEFAULT,
        ownership,
    )
    .unwrap_or_default()
}

/// Every rule in the `*.yaml` files of `dir`, in the files' name order; the shipped rules if
/// the directory is absent or holds none.
pub fn load_dir(dir: &Path, ownership: &Ownership) -> Result<Vec<Rule>, Vec<RuleError>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect(),
        Err(_) => Vec::new(),
    };
    if files.is_empty() {
        return Ok(defaults(ownership));
    }
    files.sort();
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => match parse(&file, &text, ownership) {
                Ok(mut r) => rules.append(&mut r),
                Err(mut e) => errors.append(&mut e),
            },
            Err(e) => errors.push(RuleError {
                file: file.clone(),
                line: 0,
                message: format!("cannot read it: {e}"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

impl Rule {
    /// Whether `resource` (a FHIR resource as JSON) is what this rule is about.
    pub fn matches(&self, resource: &Value) -> bool {
        let w = &self.when;
        if resource["resourceType"].as_str() != Some(w.resource.as_str()) {
            return false;
        }
        let any_of = |wanted: &[String], got: Option<&str>| {
            wanted.is_empty() || got.is_some_and(|g| wanted.iter().any(|s| s == g))
        };
        if !any_of(&w.status, resource["status"].as_str())
            || !any_of(&w.doc_status, resource["docStatus"].as_str())
        {
            return false;
        }
        if !w.business_status.is_empty() {
            let concept = &resource["businessStatus"];
            let codes = concept["coding"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["code"].as_str());
            let text = concept["text"].as_str();
            let said = codes.chain(text).map(normal);
            if !said.into_iter().any(|s| w.business_status.contains(&s)) {
                return false;
            }
        }
        match w.owner {
            Some(Presence::Set) => resource.get("owner").is_some_and(|o| !o.is_null()),
            Some(Presence::Unset) => resource.get("owner").is_none_or(Value::is_null),
            None => true,
        }
    }
}

/// The first rule that matches `resource`.
pub fn first_match<'r>(rules: &'r [Rule], resource: &Value) -> Option<&'r Rule> {
    rules.iter().find(|r| r.matches(resource))
}

/// The resource types the rules name (what a poll of the EHR searches).
pub fn resource_types(rules: &[Rule]) -> Vec<String> {
    let mut types: Vec<String> = rules.iter().map(|r| r.when.resource.clone()).collect();
    types.sort();
    types.dedup();
    types
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shipped() -> Vec<Rule> {
        let rules = parse(Path::new("default.yaml"), DEFAULT, &Ownership::defaults()).unwrap();
        assert_eq!(rules.len(), 9);
        rules
    }

    fn event_of(resource: Value) -> Option<(String, Option<String>, Option<String>)> {
        first_match(&shipped(), &resource)
            .map(|r| (r.event.clone(), r.crm.clone(), r.portal.clone()))
    }

    fn task(status: &str, business: Value) -> Value {
        json!({"resourceType": "Task", "status": status, "intent": "order", "businessStatus": business})
    }

    #[test]
    fn the_shipped_rules_follow_the_field_note() {
        let says = |r: Value, event: &str, crm: &str, portal: &str| {
            assert_eq!(
                event_of(r.clone()),
                Some((
                    event.to_string(),
                    Some(crm.to_string()),
                    Some(portal.to_string())
                )),
                "{r}"
            );
        };
        says(
            task(
                "completed",
                json!({"coding": [{"system": "https://clinic.example/x", "code": "approved"}]}),
            ),
            "decision.made",
            "approved",
            "approved",
        );
        says(
            task("completed", json!({"text": "Ineligible"})),
            "decision.made",
            "denied",
            "not_eligible",
        );
        says(
            task("in-progress", json!({"text": "More information needed"})),
            "information.requested",
            "needs_information",
            "action_needed",
        );
        says(
            task(
                "completed",
                json!({"coding": [{"code": "follow_up_required"}]}),
            ),
            "follow_up.required",
            "follow_up_required",
            "follow_up_needed",
        );
        let mut assigned = task("requested", json!({"text": "ready for review"}));
        assigned["owner"] = json!({"reference": "Practitioner/1"});
        says(assigned, "provider.assigned", "in_review", "under_review");
        says(
            task("in-progress", json!({"text": "ready for review"})),
            "provider.assigned",
            "in_review",
            "under_review",
        );
        says(
            json!({"resourceType": "MedicationRequest", "status": "active"}),
            "prescription.sent",
            "prescription_sent",
            "prescription_sent",
        );
        says(
            json!({"resourceType": "DocumentReference", "status": "current", "docStatus": "final"}),
            "note.signed",
            "chart_complete",
            "visit_complete",
        );
        says(
            json!({"resourceType": "Composition", "status": "final"}),
            "note.signed",
            "chart_complete",
            "visit_complete",
        );
    }

    #[test]
    fn what_no_rule_names_matches_nothing() {
        for r in [
            task("requested", json!({"text": "ready for review"})),
            json!({"resourceType": "MedicationRequest", "status": "draft"}),
            json!({"resourceType": "DocumentReference", "docStatus": "preliminary"}),
            json!({"resourceType": "Observation", "status": "final"}),
            json!({"resourceType": "Task", "businessStatus": "approved"}),
            json!("approved"),
        ] {
            assert_eq!(event_of(r.clone()), None, "{r}");
        }
    }

    #[test]
    fn a_rule_that_cannot_work_is_refused_with_its_line() {
        let text = "rules:\n  - name: one\n    when: {resource: Task}\n    event: decision.made\n    crm: ok\n  - name: two\n    when: {resource: Patient, doc_status: [final]}\n    event: Made\n    crm: Not Ok\n  - name: three\n    when: {resource: Task}\n    event: intake.submitted\n    portal: x\n  - name: four\n    when: {resource: Task}\n    event: custom.thing\n    crm: y\n";
        let errors = parse(Path::new("w.yaml"), text, &Ownership::defaults()).unwrap_err();
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let all = messages.join("\n");
        assert!(
            all.contains("w.yaml:6: rule `two`: `when.resource: Patient`"),
            "{all}"
        );
        assert!(
            all.contains("`doc_status` is a DocumentReference's"),
            "{all}"
        );
        assert!(
            all.contains("`event: Made` is not an event's name"),
            "{all}"
        );
        assert!(all.contains("`crm: Not Ok` is not a stage"), "{all}");
        assert!(
            all.contains("w.yaml:10: rule `three`: `intake.submitted` is raised by the gateway"),
            "{all}"
        );
        assert!(
            all.contains("w.yaml:14: rule `four`: say what `custom.thing` is `about`"),
            "{all}"
        );
        assert!(!all.contains("rule `one`"), "{all}");
        let unknown = parse(Path::new("w.yaml"), "rules:\n  - name: x\n    when: {resource: Task, text: signed}\n    event: a.b\n    crm: c\n", &Ownership::defaults()).unwrap_err();
        assert!(
            unknown[0].message.contains("unknown field `text`"),
            "{}",
            unknown[0]
        );
    }
}
