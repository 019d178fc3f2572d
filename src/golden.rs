//! Golden fixtures: `fixtures/<mapping-id>/<case>.input.json` → `<case>.expected.json`.
//!
//! The expected file holds what the engine decided (mapped with flags and missing answers, or
//! rejected with its OperationOutcome) and the Bundle. Every Bundle produced is also validated
//! against the typed R4 model. `--update` re-blesses.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::fhir::validate::validate;
use crate::mapping::{Mapping, SubmissionInput};

/// The receive time used for golden runs, so that `issued` and `recorded` are reproducible.
pub const GOLDEN_RECEIVED_AT: &str = "2026-01-01T00:00:00Z";

/// One case's result.
#[derive(Debug)]
pub struct CaseReport {
    pub mapping_id: String,
    pub input: PathBuf,
    pub outcome: CaseOutcome,
}

#[derive(Debug)]
pub enum CaseOutcome {
    Passed,
    Updated,
    /// Differences, one line each (`$.bundle.entry[2]…: expected …, got …`).
    Mismatch(Vec<String>),
    Invalid(String),
    Io(String),
}

/// Maps one payload and renders the golden document: the decision and the Bundle.
pub fn render(mapping: &Mapping, raw: &[u8], received_at: &str) -> Result<Value, String> {
    let payload = mapping
        .parse_payload(raw)
        .map_err(|e| format!("input: {e}"))?;
    if let Err(why) = mapping.accepts(&payload) {
        return Ok(json!({"outcome": "ignored", "reason": why}));
    }
    Ok(
        match mapping.map_submission(SubmissionInput {
            payload: &payload,
            raw,
            received_at,
        }) {
            Ok(m) => {
                let bundle = m
                    .bundle_json()
                    .map_err(|e| format!("the Bundle is not JSON: {e}"))?;
                json!({
                    "outcome": "mapped",
                    "submission_id": m.submission_id,
                    "flags": m.flags,
                    "missing": m.missing,
                    "bundle": bundle,
                })
            }
            Err(f) => json!({"outcome": "rejected", "operationOutcome": f.outcome().to_json()}),
        },
    )
}

/// The input files of a mapping's fixture folder, sorted.
pub fn cases(fixtures: &Path, mapping_id: &str) -> Vec<PathBuf> {
    let dir = fixtures.join(mapping_id);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".input.json"))
        .collect();
    v.sort();
    v
}

/// Runs every case of every mapping.
pub fn run(mappings: &[Mapping], fixtures: &Path, update: bool) -> Vec<CaseReport> {
    let mut reports = Vec::new();
    for m in mappings {
        for input in cases(fixtures, &m.id) {
            let outcome = run_case(m, &input, update);
            reports.push(CaseReport {
                mapping_id: m.id.clone(),
                input,
                outcome,
            });
        }
    }
    reports
}

fn run_case(m: &Mapping, input: &Path, update: bool) -> CaseOutcome {
    let raw = match std::fs::read(input) {
        Ok(r) => r,
        Err(e) => return CaseOutcome::Io(format!("{}: {e}", input.display())),
    };
    let actual = match render(m, &raw, GOLDEN_RECEIVED_AT) {
        Ok(v) => v,
        Err(e) => return CaseOutcome::Io(e),
    };
    if let Some(bundle) = actual.get("bundle") {
        if let Err(oo) = validate(bundle) {
            return CaseOutcome::Invalid(
                oo.issues
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
    }
    let expected_path = expected_path(input);
    if update {
        let text = serde_json::to_string_pretty(&actual).unwrap_or_default() + "\n";
        return match std::fs::write(&expected_path, text) {
            Ok(()) => CaseOutcome::Updated,
            Err(e) => CaseOutcome::Io(format!("{}: {e}", expected_path.display())),
        };
    }
    let expected: Value = match std::fs::read(&expected_path).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            return CaseOutcome::Io(format!("{}: not JSON: {e}", expected_path.display()))
        }
        Err(e) => {
            return CaseOutcome::Io(format!(
                "{}: {e} (run with --update to create it)",
                expected_path.display()
            ))
        }
    };
    let mut diffs = Vec::new();
    diff("$", &expected, &actual, &mut diffs);
    if diffs.is_empty() {
        CaseOutcome::Passed
    } else {
        CaseOutcome::Mismatch(diffs)
    }
}

/// `x.input.json` → `x.expected.json`.
pub fn expected_path(input: &Path) -> PathBuf {
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().replace(".input.json", ".expected.json"));
    input.with_file_name(name.unwrap_or_default())
}

/// Structural differences between two JSON values, one line each, at most 50.
pub fn diff(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    if out.len() >= 50 {
        return;
    }
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => diff(&format!("{path}.{k}"), ev, av, out),
                    None => out.push(format!("{path}.{k}: missing (expected {})", short(ev))),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    out.push(format!("{path}.{k}: unexpected {}", short(av)));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                diff(&format!("{path}[{i}]"), ev, av, out);
            }
            if e.len() != a.len() {
                out.push(format!(
                    "{path}: expected {} elements, got {}",
                    e.len(),
                    a.len()
                ));
            }
        }
        (e, a) if e != a => out.push(format!("{path}: expected {}, got {}", short(e), short(a))),
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_the_path() {
        let mut out = Vec::new();
        diff(
            "$",
            &json!({"a": [1, {"b": 2}], "c": 1}),
            &json!({"a": [1, {"b": 3}], "d": 1}),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                "$.a[1].b: expected 2, got 3",
                "$.c: missing (expected 1)",
                "$.d: unexpected 1"
            ]
        );
    }
}
