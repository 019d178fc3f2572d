//! Every golden Bundle goes to the real FHIR R4 test server (strict validation, atomic
//! transactions): it is accepted, and posting it again creates nothing new.

mod common;

use chartbridge::golden::{self, GOLDEN_RECEIVED_AT};
use chartbridge::mapping;
use common::{root, FhirServer};
use serde_json::Value;

#[test]
fn golden_bundles_are_accepted_and_reposting_creates_nothing() {
    let server = FhirServer::start();
    let mappings = mapping::load_dir(&root().join("mappings")).expect("mappings load");
    let mut posted = 0;
    for m in &mappings {
        // The generated Questionnaire is valid FHIR for the server too.
        let (status, body) = server.post("/Questionnaire", &m.questionnaire());
        assert_eq!(status, 201, "{}: Questionnaire rejected: {body}", m.id);

        for input in golden::cases(&root().join("fixtures"), &m.id) {
            let raw = std::fs::read(&input).expect("read fixture");
            let rendered = golden::render(m, &raw, GOLDEN_RECEIVED_AT).expect("render");
            let Some(bundle) = rendered.get("bundle") else {
                continue;
            };
            server.reset();
            let name = input.display();

            let (status, body) = server.transaction(bundle);
            assert_eq!(status, 200, "{name}: transaction rejected: {body}");
            let statuses = entry_statuses(&body);
            assert!(
                statuses.iter().all(|s| s.starts_with("201")),
                "{name}: first post: {statuses:?}"
            );
            let expected = bundle["entry"].as_array().map(Vec::len).unwrap_or(0);
            assert_eq!(statuses.len(), expected, "{name}");
            let counts = server.counts();

            let (status, body) = server.transaction(bundle);
            assert_eq!(status, 200, "{name}: re-post rejected: {body}");
            let statuses = entry_statuses(&body);
            assert!(
                statuses.iter().all(|s| s.starts_with("200")),
                "{name}: re-post created something: {statuses:?}"
            );
            assert_eq!(
                server.counts(),
                counts,
                "{name}: re-posting changed the server's contents"
            );

            // The server resolved every reference: Observations point at the stored QR.
            let qr_id = &m.identifier_system;
            let search = server.search(&format!(
                "QuestionnaireResponse?identifier={}|{}",
                qr_id,
                rendered["submission_id"].as_str().unwrap_or_default()
            ));
            assert_eq!(
                search["total"]
                    .as_u64()
                    .or(search["entry"].as_array().map(|e| e.len() as u64)),
                Some(1),
                "{name}: QR by identifier"
            );
            posted += 1;
        }
    }
    assert!(posted >= 10, "only {posted} golden Bundles posted");
}

#[test]
fn golden_bundles_and_questionnaires_pass_the_offline_validator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for m in mapping::load_dir(&root().join("mappings")).expect("mappings load") {
        let q = dir.path().join(format!("{}.questionnaire.json", m.id));
        std::fs::write(&q, m.questionnaire().to_string()).expect("write");
        files.push(q);
        for input in golden::cases(&root().join("fixtures"), &m.id) {
            let raw = std::fs::read(&input).expect("read fixture");
            let rendered = golden::render(&m, &raw, GOLDEN_RECEIVED_AT).expect("render");
            if let Some(bundle) = rendered.get("bundle") {
                let name = input
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("case")
                    .replace(".input.json", ".bundle.json");
                let path = dir.path().join(format!("{}.{name}", m.id));
                std::fs::write(&path, bundle.to_string()).expect("write");
                files.push(path);
            }
        }
    }
    let out = std::process::Command::new("bash")
        .arg(root().join("tests/fhir-server/validate.sh"))
        .args(&files)
        .output()
        .expect("run validate.sh");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "validator found errors:\n{report}");
    assert_eq!(
        report
            .lines()
            .filter(|l| l.contains("\"valid\":true"))
            .count(),
        files.len(),
        "{report}"
    );
}

#[test]
fn the_server_rejects_an_invalid_bundle_atomically() {
    // A guard that the server really validates: a broken Observation fails the whole Bundle.
    let server = FhirServer::start();
    let mut rendered = maya();
    rendered["bundle"]["entry"][3]["resource"]["status"] = Value::from("finalized");
    let (status, _) = server.transaction(&rendered["bundle"]);
    assert_eq!(status, 400);
    let counts = server.counts();
    assert!(
        counts.get("Observation").is_none_or(|c| c == 0),
        "partial write: {counts}"
    );
}

fn entry_statuses(response: &Value) -> Vec<String> {
    response["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| e["response"]["status"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn delivery_reads_the_servers_transaction_response_and_rejections() {
    use chartbridge::delivery::{classify, Attempt};
    let server = FhirServer::start();
    let mut rendered = maya();
    let (status, body) = server.transaction(&rendered["bundle"]);
    let Attempt::Delivered(resources) = classify(status, None, &body) else {
        panic!("not delivered: {status} {body}");
    };
    let kinds: Vec<&str> = resources.iter().map(|r| r.resource_type.as_str()).collect();
    assert_eq!(kinds[..2], ["Patient", "QuestionnaireResponse"]);
    assert_eq!(
        kinds.len(),
        rendered["bundle"]["entry"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    );
    // The ids are the server's: reading one back works.
    let qr = server.search(&format!("QuestionnaireResponse/{}", resources[1].id));
    assert_eq!(
        qr["identifier"]["value"],
        "b7e1c9d24f6a38e0c5b1d7f29a4e6c83"
    );

    // (On a server that already holds the resource, a conditional create matches and is not
    // validated again: the rejection needs a fresh server.)
    server.reset();
    rendered["bundle"]["entry"][3]["resource"]["status"] = Value::from("finalized");
    let (status, body) = server.transaction(&rendered["bundle"]);
    match classify(status, None, &body) {
        Attempt::Reject(failure) => assert_eq!(failure.status, Some(400), "{}", failure.reason()),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The Typeform happy path as the golden runner renders it.
fn maya() -> Value {
    let m = mapping::load_file(&root().join("mappings/glp1-intake-typeform.yaml")).expect("load");
    let raw =
        std::fs::read(root().join("fixtures/glp1-intake-typeform/maya-happy-path.input.json"))
            .expect("read");
    golden::render(&m, &raw, GOLDEN_RECEIVED_AT).expect("render")
}
