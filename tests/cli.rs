//! The CLI as an integration engineer uses it: `check`, `map`, `test`, `questionnaire`, with
//! their exit codes (0 ok, 1 problems found, 2 usage or I/O).

mod common;

use std::path::Path;

use common::{chartbridge, root};
use serde_json::Value;

const BROKEN: &str = r#"id: broken-form
version: 1
title: A map with one of every mistake
url: https://forms.example.org/Questionnaire/broken

source:
  submission_id: $.id
  answers: { list: "$.answers[*]", key: $.ref }
  patient:
    identifier: { system: https://crm.example.org/patient, path: $.patient }

items:
  - link_id: weight
    type: quantity
    answer: weight
    from_unit: "[lb_av]"
    unit: cm
  - link_id: mood
    type: feeling
    answer: mood
  - link_id: height
    type: decimal
    path: $.answers[?(@.ref == 'height'
  - link_id: weight
    type: integer
    answer: weight2
  - link_id: smoker
    type: boolean
    answer: smoker
    map: { "Yes": { system: http://snomed.info/sct, code: "77176002" } }
  - link_id: pulse
    type: integer
    answer: pulse
    observation: { category: vital-signs }
  - link_id: bmi
    type: decimal
    derive: bmi(weight, stature)

flags:
  - name: risky
    when: { item: nowhere, equals: true }
"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_passes_on_the_shipped_mappings() {
    common::succeeds(chartbridge().args(["check", "mappings"]));
}

#[test]
fn check_reports_every_problem_with_file_line_and_item() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "broken.yaml", BROKEN);
    let out = chartbridge().arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display().to_string();
    for (line, needle) in [
        (16, "item `weight`: cannot convert `[lb_av]` to `cm`"),
        (19, "item `mood`: unknown item type `feeling`"),
        (23, "item `height`: `path` is not a valid JSONPath"),
        (
            24,
            "item `weight`: duplicate linkId `weight` (first at line 13)",
        ),
        (
            30,
            "item `smoker`: map entry `Yes` yields a Coding, but the item is a boolean",
        ),
        (34, "item `pulse`: an Observation needs a code"),
        (37, "item `bmi`: bmi(): unknown item `stature`"),
        (
            41,
            "flag `risky`: the condition names unknown item `nowhere`",
        ),
    ] {
        let prefix = format!("{f}:{line}:");
        assert!(
            err.lines()
                .any(|l| l.starts_with(&prefix) && l.contains(needle)),
            "expected `{prefix}… {needle}` in:\n{err}"
        );
    }
    assert!(
        err.contains("column 22: expected int"),
        "JSONPath errors say where: {err}"
    );
    assert!(err.contains("hint:"), "{err}");
    assert!(err.contains("9 problem(s) found"), "{err}");
}

#[test]
fn check_names_yaml_syntax_errors_and_unknown_keys_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "typo.yaml",
        &BROKEN.replace("    answer: pulse\n", "    anwser: pulse\n"),
    );
    let out = chartbridge().arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `anwser`"), "{err}");
    assert!(err.contains(&format!("{}:", file.display())), "{err}");

    let file = write(dir.path(), "syntax.yaml", "id: x\nitems: [ { link_id: a\n");
    let out = chartbridge().arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("syntax.yaml:"));
}

#[test]
fn check_of_a_missing_path_is_an_io_error() {
    let out = chartbridge()
        .args(["check", "does/not/exist"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn map_prints_the_bundle_or_an_operation_outcome() {
    let out = common::succeeds(chartbridge().args([
        "map",
        "-m",
        "glp1-intake-typeform",
        "fixtures/glp1-intake-typeform/maya-happy-path.input.json",
    ]));
    let bundle: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(bundle["type"], "transaction");

    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.json", "{\"form_response\": ");
    let out = chartbridge()
        .args(["map", "-m", "glp1-intake-typeform"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let oo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");

    let out = chartbridge()
        .args(["map", "-m", "no-such-map", "x.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mapping `no-such-map`"));

    let out = chartbridge().args(["map", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn map_report_includes_flags_and_missing_answers() {
    let out = chartbridge()
        .args([
            "map",
            "--report",
            "-m",
            "refill-request-portal",
            "fixtures/refill-request-portal/missing-inputs.input.json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["flags"][2], "more_information_needed");
    let missing: Vec<&str> = report["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["link_id"].as_str().unwrap())
        .collect();
    assert_eq!(missing, vec!["last-dose-date", "weight", "pharmacy"]);
}

#[test]
fn golden_test_passes_then_shows_a_readable_diff_then_rebless_fixes_it() {
    let out = common::succeeds(chartbridge().args(["test", "mappings"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0 failed"));

    // A copy of one mapping and its fixtures, with one expected value changed.
    let dir = tempfile::tempdir().unwrap();
    let maps = dir.path().join("mappings");
    let fx = dir.path().join("fixtures/glp1-intake-typeform");
    std::fs::create_dir_all(&maps).unwrap();
    std::fs::create_dir_all(&fx).unwrap();
    std::fs::copy(
        root().join("mappings/glp1-intake-typeform.yaml"),
        maps.join("glp1-intake-typeform.yaml"),
    )
    .unwrap();
    let src = root().join("fixtures/glp1-intake-typeform");
    std::fs::copy(
        src.join("maya-happy-path.input.json"),
        fx.join("maya-happy-path.input.json"),
    )
    .unwrap();
    let expected = std::fs::read_to_string(src.join("maya-happy-path.expected.json")).unwrap();
    std::fs::write(
        fx.join("maya-happy-path.expected.json"),
        expected.replace("96.16", "96.2"),
    )
    .unwrap();

    let run = |update: bool| {
        let mut c = chartbridge();
        c.current_dir(dir.path()).args(["test", "mappings"]);
        if update {
            c.arg("--update");
        }
        c.output().unwrap()
    };
    let out = run(false);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FAILED"), "{err}");
    assert!(
        err.contains("valueQuantity.value: expected 96.2, got 96.16"),
        "{err}"
    );
    assert!(run(true).status.success());
    assert!(run(false).status.success());
}

#[test]
fn questionnaire_is_printed_with_the_canonical_the_responses_use() {
    let out = chartbridge()
        .args(["questionnaire", "glp1-intake-typeform"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let q: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q["resourceType"], "Questionnaire");
    assert_eq!(
        q["url"],
        "https://forms.example-clinic.com/Questionnaire/glp1-intake"
    );
    assert_eq!(q["version"], "3");
    let body = &q["item"][1]["item"];
    assert_eq!(body[1]["linkId"], "weight");
    assert_eq!(body[1]["code"][0]["code"], "29463-7");
    assert_eq!(body[3]["readOnly"], true, "BMI is derived");
}

#[test]
fn extract_prints_the_observations_and_says_what_it_left_out() {
    let out = common::succeeds(chartbridge().args([
        "extract",
        "-q",
        "fixtures/sdc/qObservationSampleWithExtractExtension.json",
        "fixtures/sdc/qrObservationSample.json",
    ]));
    let bundle: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(bundle["type"], "transaction");
    assert_eq!(common::entries_of(&bundle, "Observation"), 4);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("incomplete: the QuestionnaireResponse has no identifier"),
        "{stderr}"
    );
    // A mapping's Questionnaire by mapping id; a response that is not one: exit 1.
    let out = chartbridge()
        .args([
            "extract",
            "-q",
            "glp1-intake-typeform",
            "fixtures/sdc/qObservationSampleWithExtractExtension.json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("expected a QuestionnaireResponse, got a Questionnaire"));
}

/// A map that uses every free-text and unknown-option rule wrongly.
const BAD_PATTERNS: &str = r#"id: bad-patterns
version: 1
title: Patterns that cannot work
url: https://forms.example.org/Questionnaire/bad-patterns

source:
  submission_id: $.id
  answers: { object: $.answers }
  patient:
    identifier: { system: https://crm.example.org/patient, path: $.patient }

items:
  - link_id: weight
    type: quantity
    unit: kg
    answer: weight
    pattern: '^(?P<value>\d+'
  - link_id: height
    type: quantity
    unit: cm
    answer: height
    pattern: '^(?P<value>\d+)[^\s\S]$'
  - link_id: length
    type: quantity
    unit: cm
    answer: length
    pattern: '^(?P<ft>\d)''(?P<in>\d+)$'
    sum:
      - { capture: ft, unit: "[ft_i]" }
      - { capture: inches, unit: "[in_i]" }
  - link_id: pulse
    type: integer
    answer: pulse
    pattern: '^(?P<value>\d+) (?P<beats>bpm)$'
  - link_id: mood
    type: string
    answer: mood
    unknown_option: keep
  - link_id: waist
    type: quantity
    unit: cm
    answer: waist
    range: { min: 200, max: 30 }
"#;

#[test]
fn check_refuses_patterns_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad-patterns.yaml", BAD_PATTERNS);
    let out = chartbridge().arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "item `weight`: `pattern` is not a valid regular expression",
        "item `height`: `pattern` can never match any text",
        "item `length`: part `inches` reads a capture that no pattern has",
        "item `length`: `pattern` names a capture `in` that nothing uses",
        "item `pulse`: `pattern` names a capture `beats` that nothing uses",
        "item `mood`: `unknown_option` says what an answer the value map does not know does: it needs `map`",
        "item `waist`: `range` needs `min`, `max` or both, with min ≤ max",
    ] {
        assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
    }
}

/// `check` says, for its author, what the map decides on the patient's behalf: which parts of
/// a sum may be skipped, the range each vital sign gets, what an unknown option does.
#[test]
fn check_explains_sums_ranges_and_unknown_options() {
    let out = common::succeeds(chartbridge().args(["check", "mappings/glp1-intake-typeform.yaml"]));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "note: item `height` sums its parts; without answer `height_ft` it is not charted but listed as missing",
        "answer `height_in` may be skipped (its default)",
        "note: item `weight`: a value outside 0.3–650 kg is held back as implausible (the default for Body weight",
        "note: item `conditions`: an option the map does not know is kept as text and flagged `unmapped_option`",
    ] {
        assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
    }
}

/// `chartbridge questionnaire … | head` stops quietly when the reader goes away, and `test
/// --update` names the file it wrote.
#[test]
fn a_closed_pipe_ends_output_quietly_and_update_names_what_it_wrote() {
    use std::io::Read;
    let mut child = chartbridge()
        .args(["questionnaire", "glp1-intake-typeform"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the first line is written (as `| head -c0` would).
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.code().is_some(), "killed by a signal: {status:?}");

    let dir = tempfile::tempdir().unwrap();
    let maps = dir.path().join("mappings");
    let fx = dir.path().join("fixtures/phq9-typeform");
    std::fs::create_dir_all(&maps).unwrap();
    std::fs::create_dir_all(&fx).unwrap();
    std::fs::copy(
        root().join("mappings/phq9-typeform.yaml"),
        maps.join("phq9-typeform.yaml"),
    )
    .unwrap();
    std::fs::copy(
        root().join("fixtures/phq9-typeform/all-zero.input.json"),
        fx.join("all-zero.input.json"),
    )
    .unwrap();
    let out = common::succeeds(
        chartbridge()
            .current_dir(dir.path())
            .args(["test", "mappings", "--update"]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("updated  fixtures/phq9-typeform/all-zero.expected.json"),
        "{err}"
    );
    assert!(fx.join("all-zero.expected.json").is_file());
}

/// `check` enforces the ownership matrix: a map that would chart a clinician's finding or raise
/// one of the EHR's decisions is refused, with where; and it reads the workflow rules, each
/// problem with file:line.
#[test]
fn check_refuses_a_map_that_writes_ehr_owned_data_and_reads_the_workflow_rules() {
    let dir = tempfile::tempdir().unwrap();
    let map = write(
        dir.path(),
        "overreach.yaml",
        "id: overreach\nversion: 1\ntitle: Overreach\nurl: https://forms.example.org/Questionnaire/overreach\n\n\
         source:\n  submission_id: $.id\n  patient:\n    identifier: { system: https://crm.example.org/patient, path: $.patient }\n\n\
         items:\n  - link_id: exam\n    type: string\n    text: Lung exam\n    path: $.exam\n    observation:\n      code: { system: http://loinc.org, code: 32449-3 }\n      category: exam\n\n\
         flags:\n  - name: approved\n    when: { item: exam, answered: true }\n",
    );
    let out = chartbridge()
        .args(["check", "--workflows", "no-such-dir"])
        .arg(&map)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("overreach.yaml:12: item `exam` writes an Observation of category `exam`, which is the ehr's"), "{stderr}");
    assert!(
        stderr.contains("flag `approved` is one of the ehr's decisions"),
        "{stderr}"
    );
    assert!(
        stderr.contains("9 workflow rule(s) ok (shipped)"),
        "{stderr}"
    );

    let workflows = dir.path().join("workflows");
    std::fs::create_dir(&workflows).unwrap();
    write(
        &workflows,
        "clinic.yaml",
        "rules:\n  - name: signed\n    when: { resource: DocumentReference, doc_status: [final] }\n    event: note.signed\n    crm: chart complete\n",
    );
    let out = chartbridge()
        .args(["check", "--workflows"])
        .arg(&workflows)
        .arg(root().join("mappings"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("clinic.yaml:2: rule `signed`: `crm: chart complete` is not a stage"),
        "{stderr}"
    );
}
