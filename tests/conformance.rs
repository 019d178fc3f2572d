//! The SDC `$extract` conformance cases (observation-based extraction) of other projects —
//! smart-forms, LForms, cqframework clinical-reasoning and the HL7 SDC examples — run against
//! the gateway by the suite's own runner, so that what is scored is the suite's rule, not ours.
//! The cases and the runner are a copy of the shared suite (`tests/conformance/README.md`).

mod common;

use common::root;

#[test]
fn every_observation_extraction_case_of_the_sdc_suite_passes() {
    let suite = root().join("tests/conformance/sdc-extract");
    let out = std::process::Command::new("python3")
        .arg(suite.join("run.py"))
        .arg(env!("CARGO_BIN_EXE_chartbridge"))
        .arg(suite.join("observation"))
        .current_dir(root())
        .output()
        .expect("run python3 tests/conformance/sdc-extract/run.py");
    let report = String::from_utf8_lossy(&out.stdout);
    let failing: Vec<&str> = report.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        out.status.success() && failing.is_empty(),
        "{} case(s) fail:\n{}\n\n{report}\n{}",
        failing.len(),
        failing.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = report.lines().filter(|l| l.starts_with("PASS")).count();
    assert_eq!(passed, 20, "every case ran: {report}");
}
