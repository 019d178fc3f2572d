//! The gateway end to end: `chartbridge serve` as a process on a random port, the real FHIR test
//! server as the EHR, sled on disk, crashes and restarts.

#[path = "../common/mod.rs"]
mod common;
mod intake_safety;
mod response_fit;

use common::{forward, free_port, front, root, App, FhirServer};
use serde_json::Value;

const MAYA: &str = "fixtures/glp1-intake-typeform/maya-happy-path.input.json";
const KEY: &str = "glp1-intake-typeform/b7e1c9d24f6a38e0c5b1d7f29a4e6c83";

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(root().join(path)).expect("fixture")
}

/// The states a submission went through, in order.
fn states(view: &Value) -> Vec<&str> {
    view["transitions"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["state"].as_str()).collect())
        .unwrap_or_default()
}

/// Waits until `key` is delivered and checks the EHR stored its QuestionnaireResponse.
fn delivered_with_a_questionnaire_response(app: &App, key: &str) {
    let view = app.wait_for_state(key, "delivered", 30);
    assert!(
        view["ehr"]
            .as_array()
            .is_some_and(|refs| refs.iter().any(|r| r["reference"]
                .as_str()
                .is_some_and(|r| r.starts_with("QuestionnaireResponse/")))),
        "{view}"
    );
}

fn count(server: &FhirServer, kind: &str) -> u64 {
    server.counts()[kind].as_u64().unwrap_or(0)
}

#[test]
fn a_typeform_intake_reaches_the_ehr_with_its_identifiers_and_provenance() {
    let ehr = FhirServer::start();
    let app = App::start(Some(&ehr.url));
    let (status, body, headers) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["key"], KEY);
    assert_eq!(body["status_url"], format!("/submissions/{KEY}"));
    assert_eq!(body["event"], "intake.submitted");
    assert_eq!(headers["location"], format!("/submissions/{KEY}").as_str());

    let view = app.wait_for_state(KEY, "delivered", 30);
    let states = states(&view);
    assert_eq!(states, ["received", "mapped", "delivered"]);
    assert_eq!(view["mapping"]["id"], "glp1-intake-typeform");
    assert!(
        view.get("bundle").is_none() && !view.to_string().contains("Okafor"),
        "no PHI in the status view"
    );

    let search = ehr.search("QuestionnaireResponse?identifier=https://forms.example-clinic.com/Questionnaire/glp1-intake/submission|b7e1c9d24f6a38e0c5b1d7f29a4e6c83");
    assert_eq!(
        search["entry"].as_array().map(Vec::len),
        Some(1),
        "{search}"
    );
    let obs = view["ehr"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reference"].as_str().unwrap().starts_with("Observation/"))
        .unwrap();
    let (status, prov) = app.get(&format!(
        "/provenance?target={}",
        obs["reference"].as_str().unwrap()
    ));
    assert_eq!(status, 200, "{prov}");
    assert_eq!(prov["submission"], KEY);
    assert_eq!(
        prov["payload_sha256"],
        chartbridge::fhir::sha256_hex(&fixture(MAYA))
    );
}

#[test]
fn logs_are_json_lines_with_request_ids_and_no_payload_values() {
    let ehr = FhirServer::start();
    let mut app = App::start_logged(Some(&ehr.url));
    let (status, body, headers) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202, "{body}");
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();
    app.wait_for_state(KEY, "delivered", 30);
    app.terminate();

    let (lines, text) = app.log_lines();
    for line in &lines {
        assert!(
            line["timestamp"].is_string()
                && line["level"].is_string()
                && line["message"].is_string(),
            "{line}"
        );
    }
    let of_request: Vec<&Value> = lines
        .iter()
        .filter(|l| l["request_id"] == request_id.as_str())
        .collect();
    let messages: Vec<&str> = of_request
        .iter()
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert_eq!(messages, ["submission accepted", "handled"], "{text}");
    let handled = of_request[1];
    assert_eq!(handled["status"], 202);
    assert_eq!(handled["method"], "POST");
    assert_eq!(handled["path"], "/submissions/glp1-intake-typeform");
    assert_eq!(of_request[0]["key"], KEY);
    assert!(lines
        .iter()
        .any(|l| l["message"] == "delivered" && l["key"] == KEY));
    // Names, contact details, birth date, free text: the payload's values stay out of the log.
    for phi in [
        "Maya",
        "Okafor",
        "maya.okafor",
        "4155550142",
        "1986-03-14",
        "Metformin",
        "Sulfa",
    ] {
        assert!(!text.contains(phi), "{phi} in the log");
    }
}

#[test]
fn a_jotform_form_webhook_multipart_or_urlencoded_is_read_as_its_fields_and_reaches_the_ehr() {
    let ehr = FhirServer::start();
    let app = App::start(Some(&ehr.url));
    let stored = String::from_utf8(fixture(
        "fixtures/vendors/jotform.webhook.glp1-intake.multipart",
    ))
    .unwrap();
    let old = stored.lines().next().unwrap()[2..].to_string();
    // On the wire: CRLF, and a boundary of the sender's choosing (another one on a re-send).
    let post = |boundary: &str| {
        let body = stored.replace(&old, boundary).replace('\n', "\r\n");
        app.post(
            "/submissions/glp1-intake-jotform",
            body.as_bytes(),
            &[
                ("x-api-key", "test-key".into()),
                (
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                ),
            ],
        )
    };
    let (status, first, _) = post("------------------------aaaa1111");
    assert_eq!(status, 202, "{first}");
    let key = "glp1-intake-jotform/6231907715427700618";
    assert_eq!(first["key"], key);
    delivered_with_a_questionnaire_response(&app, key);

    let (status, again, headers) = post("------------------------bbbb2222");
    assert_eq!((status, &again), (202, &first));
    assert_eq!(headers["x-chartbridge-duplicate"], "true");

    // The same fields urlencoded (as a relay would forward them) are the same submission.
    let fields: serde_json::Map<String, Value> = serde_json::from_slice(&fixture(
        "fixtures/vendors/jotform.webhook.glp1-intake.form-fields.json",
    ))
    .unwrap();
    let escape = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                    char::from(b).to_string()
                }
                b' ' => "+".into(),
                b => format!("%{b:02X}"),
            })
            .collect()
    };
    let urlencoded: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v.as_str().unwrap())))
        .collect();
    let form = [
        ("x-api-key", "test-key".to_string()),
        ("content-type", "application/x-www-form-urlencoded".into()),
    ];
    let (status, again, headers) = app.post(
        "/submissions/glp1-intake-jotform",
        urlencoded.join("&").as_bytes(),
        &form,
    );
    assert_eq!((status, &again), (202, &first));
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    // Percent-escapes that do not decode to text are refused, saying which field.
    let (status, outcome, _) = app.post(
        "/submissions/glp1-intake-jotform",
        b"submissionID=1&rawRequest=%FF",
        &form,
    );
    assert_eq!(status, 400, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("field 2 is not UTF-8"));

    // A file part is refused, with what and where.
    let file = "--b\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"id.png\"\r\n\r\nPNG\r\n--b--\r\n";
    let (status, outcome, _) = app.post(
        "/submissions/glp1-intake-jotform",
        file.as_bytes(),
        &[
            ("x-api-key", "test-key".into()),
            ("content-type", "multipart/form-data; boundary=b".into()),
        ],
    );
    assert_eq!(status, 400, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("`upload` is a file"));
}

#[test]
fn a_duplicate_post_gets_the_same_answer_and_creates_nothing() {
    let ehr = FhirServer::start();
    let app = App::start(Some(&ehr.url));
    let (s1, first, _) = app.post_typeform(&fixture(MAYA));
    app.wait_for_state(KEY, "delivered", 30);
    let counts = ehr.counts();
    let (s2, second, headers) = app.post_typeform(&fixture(MAYA));
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first, second);
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(ehr.counts(), counts);
    let (_, view) = app.get(&format!("/submissions/{KEY}"));
    assert_eq!(
        view["transitions"].as_array().unwrap().len(),
        3,
        "delivered once"
    );
}

/// The field note's "intake updated": the same submission id with another payload amends what
/// the first one put in the chart — new versions of the same resources (`amended`), an answer
/// taken back retracted (`entered-in-error`), a Provenance of its own — and creates nothing
/// twice; a late re-send of the first payload changes nothing.
fn a_revision_amends_the_chart(mode: &str) {
    // In parts: an EHR that refuses transactions of more than 3 entries sees none.
    let ehr = if mode.contains("max_transaction_entries") {
        FhirServer::start_with(&[("PORT", "0"), ("MAX_STRICT_TX_ENTRIES", "3")])
    } else {
        FhirServer::start()
    };
    let app = App::start_with(Some(&ehr.url), mode);
    let original = fixture(MAYA);
    let (status, _, _) = app.post_typeform(&original);
    assert_eq!(status, 202);
    app.wait_for_state(KEY, "delivered", 30);
    let before = ehr.counts();

    // More information arrived: the weight was 210 lb, and the blood pressure is taken back.
    let mut payload: Value = serde_json::from_slice(&original).unwrap();
    let answers = payload["form_response"]["answers"].as_array_mut().unwrap();
    answers.retain(|a| !a["field"]["ref"].as_str().unwrap().starts_with("bp_"));
    for a in answers.iter_mut() {
        if a["field"]["ref"] == "weight_lb" {
            a["number"] = 210.into();
        }
    }
    let revised = serde_json::to_vec(&payload).unwrap();
    let (status, receipt, _) = app.post_typeform(&revised);
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(
        (&receipt["event"], &receipt["revision"], &receipt["key"]),
        (&"intake.updated".into(), &2.into(), &KEY.into())
    );
    let view = app.wait_for_state(KEY, "delivered", 30);
    assert_eq!(
        states(&view),
        [
            "received",
            "mapped",
            "delivered",
            "received",
            "mapped",
            "delivered"
        ]
    );
    assert_eq!(view["revision"], 2);
    assert_eq!(
        view["transitions"][4]["detail"],
        "revision 2: 5 amended, 1 retracted"
    );
    // Each resource listed once, as the EHR has it now (the revision's Provenance added).
    let listed = view["ehr"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 9, "{view}");

    // Nothing created twice: the same QuestionnaireResponse and Observations, a second
    // Provenance (the revision's).
    let after = ehr.counts();
    for kind in ["Patient", "QuestionnaireResponse", "Observation"] {
        assert_eq!(after[kind], before[kind], "{kind}: {after}");
    }
    assert_eq!(
        after["Provenance"].as_u64(),
        before["Provenance"].as_u64().map(|n| n + 1)
    );
    let system = "https://forms.example-clinic.com/Questionnaire/glp1-intake/submission";
    let id = "b7e1c9d24f6a38e0c5b1d7f29a4e6c83";
    let only = |query: &str| -> Value {
        let found = ehr.search(query);
        assert_eq!(
            found["entry"].as_array().map(Vec::len),
            Some(1),
            "{query}: {found}"
        );
        found["entry"][0]["resource"].clone()
    };
    // Versions of the same resource (the server's history says how many).
    let versions = |r: &Value| -> usize {
        let kind = r["resourceType"].as_str().unwrap();
        let history = ehr.search(&format!("{kind}/{}/_history", r["id"].as_str().unwrap()));
        history["entry"].as_array().map_or(0, Vec::len)
    };
    let qr = only(&format!("QuestionnaireResponse?identifier={system}|{id}"));
    assert_eq!((&qr["status"], versions(&qr)), (&"amended".into(), 2));
    let qr_listed = listed
        .iter()
        .find(|r| r["reference"] == format!("QuestionnaireResponse/{}", qr["id"].as_str().unwrap()))
        .unwrap();
    assert_eq!(
        qr_listed["version"], qr["meta"]["versionId"],
        "at its latest version"
    );
    let weight = only(&format!("Observation?identifier={system}|{id}/weight"));
    assert_eq!(
        (&weight["status"], versions(&weight)),
        (&"amended".into(), 2)
    );
    assert!(
        weight["valueQuantity"]["value"].as_f64().unwrap() < 95.3,
        "{weight}"
    );
    let bp = only(&format!("Observation?identifier={system}|{id}/bp"));
    assert_eq!(bp["status"], "entered-in-error");
    let sex = only(&format!(
        "Observation?identifier={system}|{id}/sex-at-birth"
    ));
    assert_eq!(sex["status"], "amended");
    let provenance = only(&format!("Provenance?_tag={system}|{id}/revision-2"));
    assert_eq!(provenance["activity"]["coding"][0]["code"], "UPDATE");
    assert!(provenance["entity"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["role"] == "revision"));

    // The first payload again (a vendor's late retry): the same answer as now, nothing sent.
    let (status, again, headers) = app.post_typeform(&original);
    assert_eq!((status, &again["revision"]), (202, &2.into()));
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    let (_, view) = app.get(&format!("/submissions/{KEY}"));
    assert_eq!(view["transitions"].as_array().unwrap().len(), 6);
    assert_eq!(ehr.counts(), after);
    let metrics = app.get_text("/metrics");
    for outcome in ["accepted", "revised", "duplicate"] {
        let line = format!(
            "chartbridge_submissions_total{{mapping=\"glp1-intake-typeform\",outcome=\"{outcome}\"}} 1"
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
}

#[test]
fn a_revision_amends_the_chart_in_one_transaction() {
    a_revision_amends_the_chart("");
}

#[test]
fn a_revision_amends_the_chart_resource_by_resource() {
    a_revision_amends_the_chart("mode = \"per_resource\"\n");
}

#[test]
fn a_revision_amends_the_chart_in_transactions_of_three() {
    a_revision_amends_the_chart("max_transaction_entries = 3\n");
}

#[test]
fn ehr_down_then_up_delivers_and_a_restart_resumes_the_outbox() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/fhir/R4");
    let mut app = App::start(Some(&url));
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202);
    // Failing attempts are recorded while the EHR is down.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, view) = app.get(&format!("/submissions/{KEY}"));
        if view["state"] == "failed" {
            assert!(
                view["transitions"][2]["detail"]
                    .as_str()
                    .unwrap()
                    .contains("unreachable"),
                "{view}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed attempt recorded: {view}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Operators see what waits, and that nothing is dead-lettered.
    let (status, waiting) = app.get("/submissions?state=waiting");
    assert_eq!(status, 200, "{waiting}");
    assert_eq!(waiting["submissions"][0]["key"], KEY);
    assert_eq!(waiting["submissions"].as_array().unwrap().len(), 1);
    assert_eq!(waiting["total"], 1);
    let (_, dead) = app.get("/submissions?state=dead-lettered");
    assert_eq!(dead["submissions"], serde_json::json!([]));
    // Stop the gateway while the delivery is pending; bring the EHR up; restart.
    app.terminate();
    let ehr = FhirServer::start_with(&[("PORT", &port.to_string())]);
    app.restart();
    app.wait_for_state(KEY, "delivered", 30);
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);
    let metrics = app.get_text("/metrics");
    assert!(
        metrics.contains("chartbridge_deliveries_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("chartbridge_outbox_depth 0"), "{metrics}");
}

/// The intake the strict EHR below refuses (its transaction is too long).
const LONG_INTAKE: &str = "fixtures/glp1-intake-typeform/contraindications.input.json";

/// An EHR that refuses `LONG_INTAKE`'s transaction — as hosted Medplum refuses transactions
/// of more than 8 entries that hold conditional ones — on a port a fixed EHR can take over,
/// and the gateway delivering to it.
fn strict_ehr() -> (u16, FhirServer, App) {
    let port = free_port();
    let strict =
        FhirServer::start_with(&[("PORT", &port.to_string()), ("MAX_STRICT_TX_ENTRIES", "8")]);
    let app = App::start(Some(&strict.url));
    (port, strict, app)
}

const LONG_KEY: &str = "glp1-intake-typeform/e4a91f0c7b2d5836a1c9e07f4b2d8a15";

/// Medplum refuses a transaction of more than 8 entries when any is conditional (an intake's
/// all are): with `max_transaction_entries = 8` the long intake goes to such an EHR as
/// consecutive transactions, the later ones naming what the earlier ones stored; a replay
/// matches every part and creates nothing.
#[test]
fn a_long_intake_reaches_a_strict_ehr_in_transactions_within_its_limit() {
    let ehr = FhirServer::start_with(&[("PORT", "0"), ("MAX_STRICT_TX_ENTRIES", "8")]);
    let app = App::start_with(Some(&ehr.url), "max_transaction_entries = 8");
    let (status, _, _) = app.post_typeform(&fixture(LONG_INTAKE));
    assert_eq!(status, 202);
    let view = app.wait_for_state(LONG_KEY, "delivered", 30);
    let refs: Vec<String> = view["ehr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reference"].as_str().unwrap().to_string())
        .collect();
    assert!(refs.len() > 8, "one transaction would have done: {refs:?}");
    let counts = ehr.counts();
    let on_server: u64 = [
        "Patient",
        "QuestionnaireResponse",
        "Observation",
        "Provenance",
    ]
    .iter()
    .map(|k| counts[k].as_u64().unwrap_or(0))
    .sum();
    assert_eq!(on_server, refs.len() as u64, "{counts}");
    // Every reference of every resource names one of the delivery's resources by the id the
    // server gave it (none is left a urn:uuid of another part).
    let mut provenance_targets = 0;
    for r in &refs {
        let resource = ehr.search(r);
        let mut named = Vec::new();
        chartbridge::delivery::references(&resource, &mut named);
        assert!(!named.is_empty() || r.starts_with("Patient/"), "{resource}");
        for n in named {
            assert!(
                refs.iter().any(|r| r == n),
                "{r} names {n}, not one of {refs:?}"
            );
        }
        if r.starts_with("Provenance/") {
            provenance_targets = resource["target"].as_array().map_or(0, Vec::len);
        }
    }
    assert_eq!(
        provenance_targets,
        refs.len() - 2,
        "all but the Patient and itself"
    );

    let (status, _, _) = app.post(&format!("/submissions/{LONG_KEY}/replay"), b"", &[]);
    assert_eq!(status, 202);
    let view = app.wait_for_state(LONG_KEY, "delivered", 30);
    assert_eq!(states(&view).len(), 5, "{view}");
    assert_eq!(ehr.counts(), counts);
}

/// The log says an EHR refused a delivery, with its status, not what it said: some EHRs
/// quote the values they refuse (PHI). Operators read that in the submission's status.
#[test]
fn a_refusal_is_logged_by_its_status_alone() {
    let strict = FhirServer::start_with(&[("PORT", "0"), ("MAX_STRICT_TX_ENTRIES", "8")]);
    let app = App::start_logged(Some(&strict.url));
    let (status, _, _) = app.post_typeform(&fixture(LONG_INTAKE));
    assert_eq!(status, 202);
    let view = app.wait_for_state(LONG_KEY, "dead-lettered", 30);
    let said = "too many entries";
    assert!(view.to_string().contains(said), "{view}");
    let (lines, text) = app.log_lines();
    let dead = lines
        .iter()
        .find(|l| l["message"] == "dead letter")
        .unwrap_or_else(|| panic!("no dead letter logged: {text}"));
    assert_eq!(dead["reason"], "HTTP 400", "{dead}");
    assert!(!text.contains(said), "{text}");
}

#[test]
fn a_rejected_submission_is_dead_lettered_then_replayed_after_the_fix() {
    let (port, strict, app) = strict_ehr();
    let (status, _, _) = app.post_typeform(&fixture(LONG_INTAKE));
    assert_eq!(status, 202);
    let key = LONG_KEY;
    let view = app.wait_for_state(key, "dead-lettered", 30);
    let reason = view["transitions"][2]["detail"].as_str().unwrap();
    assert!(reason.starts_with("HTTP 4"), "{reason}");
    // Medplum's words for its limit get the gateway's hint of what to set.
    assert!(
        reason.contains("too many entries") && reason.contains("max_transaction_entries"),
        "{reason}"
    );
    assert_eq!(count(&strict, "QuestionnaireResponse"), 0);
    // Operators find it among the dead letters, with the reason (CLI and HTTP alike).
    let listed: Value = serde_json::from_slice(
        &common::succeeds(
            common::chartbridge()
                .args(["dead-letters", "--url", &app.url])
                .env("CHARTBRIDGE_ADMIN_KEY", common::ADMIN_KEY),
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(listed["submissions"][0]["key"], key);
    assert_eq!(listed["submissions"][0]["transitions"][2]["detail"], reason);
    assert_eq!(listed["submissions"].as_array().unwrap().len(), 1);
    assert!(app
        .get_text("/metrics")
        .contains("chartbridge_dead_lettered 1"));
    let (status, _) = app.get("/submissions?state=delivered");
    assert_eq!(status, 400, "only dead-lettered and waiting are listed");

    // The cause is fixed (the EHR lifts the limit); an operator replays it.
    drop(strict);
    let ehr = FhirServer::start_with(&[("PORT", &port.to_string())]);
    // Without the admin key the gateway refuses (exit 1, the OperationOutcome printed).
    let refused = common::chartbridge()
        .args(["replay", key, "--url", &app.url])
        .env_remove("CHARTBRIDGE_ADMIN_KEY")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout).contains("security"));
    common::succeeds(
        common::chartbridge()
            .args(["replay", key, "--url", &app.url])
            .env("CHARTBRIDGE_ADMIN_KEY", common::ADMIN_KEY),
    );
    app.wait_for_state(key, "delivered", 30);
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);
    let out = common::chartbridge()
        .args(["inspect", key, "--url", &app.url])
        .env("CHARTBRIDGE_ADMIN_KEY", common::ADMIN_KEY)
        .output()
        .unwrap();
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let states = states(&view);
    assert_eq!(
        states,
        ["received", "mapped", "dead-lettered", "mapped", "delivered"]
    );
    // Replayed: no longer a dead letter.
    let (_, dead) = app.get("/submissions?state=dead-lettered");
    assert_eq!(dead["submissions"], serde_json::json!([]));
    assert!(app
        .get_text("/metrics")
        .contains("chartbridge_dead_lettered 0"));
}

/// Many submissions dead-lettered for one cause (an EHR limit) are replayed at once once it
/// is fixed — of one mapping, earliest first — and each reaches the EHR once.
#[test]
fn dead_letters_are_replayed_in_bulk_after_the_fix() {
    use serde_json::json;
    let (port, strict, app) = strict_ehr();
    let body = String::from_utf8(fixture(LONG_INTAKE)).unwrap();
    let id = "e4a91f0c7b2d5836a1c9e07f4b2d8a15";
    assert!(body.contains(id));
    let ids: Vec<String> = (0..3).map(|n| format!("bulk-{n}")).collect();
    for other in &ids {
        let (status, _, _) = app.post_typeform(body.replace(id, other).as_bytes());
        assert_eq!(status, 202);
    }
    let keys: Vec<String> = ids
        .iter()
        .map(|i| format!("glp1-intake-typeform/{i}"))
        .collect();
    for key in &keys {
        app.wait_for_state(key, "dead-lettered", 30);
    }
    // Operators page through them (latest first), from the command line: two, then the rest
    // after the first page's `next`; each page says how many there are in all.
    let list = |extra: &[&str]| -> Value {
        let out = common::succeeds(
            common::chartbridge()
                .args(["dead-letters", "--mapping", "glp1-intake-typeform"])
                .args(["--limit", "2", "--url", &app.url])
                .args(extra)
                .env("CHARTBRIDGE_ADMIN_KEY", common::ADMIN_KEY),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let listed_keys = |page: &Value| -> Vec<String> {
        page["submissions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["key"].as_str().unwrap().to_string())
            .collect()
    };
    let first = list(&[]);
    assert_eq!(first["total"], 3, "{first}");
    let next = first["next"].as_str().unwrap();
    let rest = list(&["--after", next]);
    assert_eq!((&rest["total"], rest.get("next")), (&json!(3), None));
    let mut paged = listed_keys(&first);
    paged.extend(listed_keys(&rest));
    paged.sort();
    assert_eq!(paged, keys);
    let (_, other) = app.get("/submissions?state=dead-lettered&mapping=phq9-typeform");
    assert_eq!(other, json!({"submissions": [], "total": 0}));
    let (status, _) = app.get("/submissions?state=dead-lettered&mapping=nope");
    assert_eq!(status, 404);
    let (status, bad) = app.get("/submissions?state=dead-lettered&after=zz");
    assert_eq!(status, 400, "{bad}");
    // Another mapping's dead letters: none; an unknown mapping: 404.
    let (status, none, _) = app.post("/dead-letters/replay?mapping=phq9-typeform", b"", &[]);
    assert_eq!(status, 202, "{none}");
    assert_eq!(none, json!({"replayed": [], "expired": [], "left": 0}));
    let (status, outcome, _) = app.post("/dead-letters/replay?mapping=nope", b"", &[]);
    assert_eq!(
        (status, outcome["resourceType"].as_str()),
        (404, Some("OperationOutcome"))
    );

    drop(strict);
    let ehr = FhirServer::start_with(&[("PORT", &port.to_string())]);
    // The earliest one first (a limit), then the rest from the command line.
    let (status, first, _) = app.post(
        "/dead-letters/replay?mapping=glp1-intake-typeform&limit=1",
        b"",
        &[],
    );
    assert_eq!(status, 202, "{first}");
    assert_eq!((&first["expired"], &first["left"]), (&json!([]), &json!(2)));
    assert_eq!(
        first["replayed"].as_array().map(Vec::len),
        Some(1),
        "{first}"
    );
    let earliest = first["replayed"][0].as_str().unwrap();
    assert!(keys.iter().any(|k| k == earliest), "{first}");
    let rest: Vec<&String> = keys.iter().filter(|k| *k != earliest).collect();
    let out = common::succeeds(
        common::chartbridge()
            .args([
                "replay",
                "--dead-lettered",
                "--mapping",
                "glp1-intake-typeform",
            ])
            .args(["--url", &app.url])
            .env("CHARTBRIDGE_ADMIN_KEY", common::ADMIN_KEY),
    );
    let replayed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        replayed,
        json!({"replayed": rest, "expired": [], "left": 0})
    );
    for key in &keys {
        let view = app.wait_for_state(key, "delivered", 30);
        assert_eq!(
            states(&view),
            ["received", "mapped", "dead-lettered", "mapped", "delivered"]
        );
    }
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 3);
    // Nothing left to replay; the trail says who did it.
    let (_, again, _) = app.post("/dead-letters/replay", b"", &[]);
    assert_eq!(again, json!({"replayed": [], "expired": [], "left": 0}));
    let (_, trail) = app.get("/audit?limit=2");
    assert_eq!(trail["accesses"][1]["path"], "/dead-letters/replay");
    // A key or --dead-lettered, not both, not neither.
    for args in [&["replay"][..], &["replay", "k/1", "--dead-lettered"]] {
        let refused = common::chartbridge().args(args).output().unwrap();
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
    }
}

/// An EHR URL that answers with a redirect: the Bundle (PHI) is not sent where the answer
/// points. A temporary redirect is retried; a permanent one is a dead letter that names the
/// new location — nothing reaches the server behind it until an operator decides.
#[test]
fn deliveries_do_not_follow_redirects() {
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Arc;
    let ehr = FhirServer::start();
    let code = Arc::new(AtomicU16::new(307));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (answered, to) = (Arc::clone(&code), ehr.url.clone());
    let redirector = front(&runtime, move |_, _, _, _, _| {
        let status = answered.load(Ordering::SeqCst);
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::LOCATION, to.parse().unwrap());
        async move { (status, headers, String::new()) }
    });
    let app = App::start(Some(&redirector));
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202);
    let view = app.wait_for_state(KEY, "failed", 30);
    let reason = view["transitions"][2]["detail"].as_str().unwrap();
    assert!(
        reason.starts_with("HTTP 307: the EHR redirects to") && reason.contains(&ehr.url),
        "{reason}"
    );
    code.store(308, Ordering::SeqCst);
    let view = app.wait_for_state(KEY, "dead-lettered", 30);
    assert!(states(&view).len() >= 4, "{view}");
    let last = view["transitions"].as_array().unwrap().last().unwrap();
    assert!(
        last["detail"].as_str().unwrap().starts_with("HTTP 308"),
        "{view}"
    );
    assert_eq!(
        count(&ehr, "QuestionnaireResponse"),
        0,
        "nothing was sent on"
    );
}

/// An EHR that throttles is left alone as long as it asks: `429` with `Retry-After` as an
/// HTTP-date, then `429` with only Medplum's `RateLimit` header (a policy with nothing
/// remaining, reset in 2 s) — with a backoff of at most 400 ms of its own, the gateway waits
/// out each before it tries again, then delivers.
#[test]
fn a_throttling_ehr_is_left_alone_as_long_as_it_asks() {
    let ehr = FhirServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let to = ehr.url.clone();
    let throttling = front(&runtime, move |n, method, path, headers, body| {
        let to = to.clone();
        async move {
            let mut throttled = axum::http::HeaderMap::new();
            match n {
                0 => {
                    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
                    let date = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                    throttled.insert("retry-after", date.parse().unwrap());
                }
                1 => {
                    let limit = r#""requests";r=0;t=2, "fhirInteractions";r=50;t=2"#;
                    throttled.insert("ratelimit", limit.parse().unwrap());
                }
                _ => return forward(&to, method, &path, &headers, body).await,
            }
            let oo = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"throttled","diagnostics":"too many requests"}]}"#;
            (429, throttled, oo.to_string())
        }
    });
    // The tests' backoff: at most 400 ms.
    let app = App::start(Some(&throttling));
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202);
    let view = app.wait_for_state(KEY, "delivered", 30);
    assert_eq!(
        states(&view),
        ["received", "mapped", "failed", "failed", "delivered"]
    );
    let at = |i: usize| {
        let t = view["transitions"][i]["at"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(t).unwrap()
    };
    for i in [2, 3] {
        let why = view["transitions"][i]["detail"].as_str().unwrap();
        assert!(why.starts_with("HTTP 429: too many requests"), "{why}");
    }
    // The date is to the second: at least 2 s ahead of the first refusal.
    let first_wait = (at(3) - at(2)).num_milliseconds();
    assert!(
        first_wait >= 1_900,
        "Retry-After date not waited for: {first_wait} ms"
    );
    let second_wait = (at(4) - at(3)).num_milliseconds();
    assert!(
        second_wait >= 1_900,
        "RateLimit reset not waited for: {second_wait} ms"
    );
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);
}

/// Epic and Oracle Health answer a create with `201`, a `Location` and no body: resource by
/// resource, the ids come from there. A replay's creates all match (`200`, no body, no
/// `Location`): what each matched is found by searching its condition — the same resources,
/// references rewritten to them, nothing created.
#[test]
fn per_resource_mode_finds_the_ids_of_answers_without_a_body() {
    let ehr = FhirServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let to = ehr.url.clone();
    let bodiless = front(&runtime, move |_, method, path, headers, body| {
        let to = to.clone();
        async move {
            let write = method != axum::http::Method::GET;
            let (status, kept, body) = forward(&to, method, &path, &headers, body).await;
            let body = if write && (200..300).contains(&status) {
                String::new()
            } else {
                body
            };
            (status, kept, body)
        }
    });
    let app = App::start_with(Some(&bodiless), "mode = \"per_resource\"");
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202);
    let refs = |view: &Value| -> Vec<String> {
        view["ehr"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["reference"].as_str().unwrap().to_string())
            .collect()
    };
    let first = refs(&app.wait_for_state(KEY, "delivered", 30));
    assert_eq!(first.len(), 8, "{first:?}");
    let qr = ehr.search(&first[1]);
    assert_eq!(qr["subject"]["reference"], first[0].as_str());
    let counts = ehr.counts();

    let (status, _, _) = app.post(&format!("/submissions/{KEY}/replay"), b"", &[]);
    assert_eq!(status, 202);
    let view = app.wait_for_state(KEY, "delivered", 30);
    assert_eq!(states(&view).len(), 5, "{view}");
    assert_eq!(refs(&view), first);
    assert_eq!(ehr.counts(), counts);
}

/// Slow clients hold nothing for good: one that has not finished its request's headers within
/// `request_timeout_ms` is disconnected; one trickling its body gets a `408` (an
/// OperationOutcome) and the connection closes. The gateway serves others meanwhile and after.
#[test]
fn slow_clients_are_cut_off() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let app = App::start_configured(None, "", "request_timeout_ms = 600\n");
    let addr = app.url.trim_start_matches("http://").to_string();
    let read_all = |stream: &mut std::net::TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    // Headers never finished.
    let started = Instant::now();
    let mut slow_headers = std::net::TcpStream::connect(&addr).unwrap();
    slow_headers
        .write_all(b"POST /submissions/glp1-intake-typeform HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // A body that never arrives whole.
    let mut slow_body = std::net::TcpStream::connect(&addr).unwrap();
    slow_body
        .write_all(
            b"POST /submissions/glp1-intake-typeform HTTP/1.1\r\nHost: x\r\nx-api-key: test-key\r\n\
              content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"form_response\"",
        )
        .unwrap();
    // Others are served meanwhile.
    let (status, _) = app.get("/health");
    assert_eq!(status, 200);
    let cut = read_all(&mut slow_headers);
    assert!(!cut.starts_with("HTTP/1.1 2"), "{cut}");
    let answered = read_all(&mut slow_body);
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    assert!(answered.contains("\"timeout\""), "{answered}");
    assert!(started.elapsed() < Duration::from_secs(8), "cut off late");
    // On a new connection: the test client's kept-alive one has been idle past the limit too.
    let health = reqwest::blocking::get(format!("{}/health", app.url)).unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

/// SIGTERM while a request is in flight (its body half sent): the gateway finishes it — the
/// client gets its `202` — and only then exits, cleanly; the submission is in the store.
#[test]
fn sigterm_finishes_the_request_in_flight() {
    use std::io::{Read, Write};
    let mut app = App::start(None);
    let body = fixture(MAYA);
    let (first, rest) = body.split_at(body.len() / 2);
    let addr = app.url.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let signature = chartbridge::http::auth::sign(
        common::TYPEFORM_SECRET,
        &body,
        chartbridge::config::SignatureEncoding::Base64,
    );
    let head = format!(
        "POST /submissions/glp1-intake-typeform HTTP/1.1\r\nHost: x\r\n\
         typeform-signature: sha256={signature}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(first).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let rest = rest.to_vec();
    let client = std::thread::spawn(move || {
        // The rest of the body arrives after the signal.
        std::thread::sleep(std::time::Duration::from_millis(500));
        stream.write_all(&rest).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    app.terminate();
    let answer = client.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    app.restart();
    let (status, view) = app.get(&format!("/submissions/{KEY}"));
    assert_eq!(status, 200, "{view}");
}

#[test]
fn killed_right_after_202_the_submission_is_delivered_exactly_once() {
    let ehr = FhirServer::start();
    let mut app = App::start(Some(&ehr.url));
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202);
    app.kill();
    app.restart();
    app.wait_for_state(KEY, "delivered", 30);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);
    assert_eq!(count(&ehr, "Observation"), 5);
    assert_eq!(count(&ehr, "Provenance"), 1);
}

#[test]
fn bad_input_gets_a_4xx_operation_outcome() {
    let app = App::start(None);
    let body = fixture(MAYA);
    let post = |path: &str, body: &[u8], headers: &[(&str, String)]| {
        let (status, oo, h) = app.post(path, body, headers);
        assert_eq!(oo["resourceType"], "OperationOutcome", "{path}: {oo}");
        assert_eq!(h["content-type"], "application/fhir+json");
        (status, oo)
    };
    // Signatures.
    let (status, oo) = post("/submissions/glp1-intake-typeform", &body, &[]);
    assert_eq!(status, 401, "{oo}");
    let (status, _) = post(
        "/submissions/glp1-intake-typeform",
        &body,
        &[("typeform-signature", "sha256=AAAA".into())],
    );
    assert_eq!(status, 401);
    let key = [("x-api-key", "test-key".to_string())];
    let (status, _) = post(
        "/submissions/refill-request-portal",
        b"{}",
        &[("x-api-key", "wrong".into())],
    );
    assert_eq!(status, 401);
    // Unknown mapping, malformed, oversized, too deep, wrong type, not fitting the map.
    assert_eq!(post("/submissions/no-such-form", b"{}", &key).0, 404);
    assert_eq!(
        post("/echo", b"{}", &key).0,
        404,
        "the bench's route is off"
    );
    let (status, oo) = post(
        "/submissions/refill-request-portal",
        b"{\"request_id\": ",
        &key,
    );
    assert_eq!(status, 400);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("line 1"),
        "{oo}"
    );
    assert_eq!(
        post(
            "/submissions/refill-request-portal",
            &vec![b' '; 100 * 1024], // over the 64 KiB limit, yet small enough to be written whole before the 413
            &key
        )
        .0,
        413
    );
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(
        post("/submissions/refill-request-portal", deep.as_bytes(), &key).0,
        400
    );
    let xml = [
        ("x-api-key", "test-key".to_string()),
        ("content-type", "application/xml".to_string()),
    ];
    assert_eq!(
        post("/submissions/refill-request-portal", b"<a/>", &xml).0,
        415
    );
    let (status, oo) = post(
        "/submissions/refill-request-portal",
        &fixture("fixtures/refill-request-portal/wrong-types.input.json"),
        &key,
    );
    assert_eq!(status, 422);
    // Five problems; the unknown side effect of the multi-select is kept (unknown_option: keep).
    assert_eq!(oo["issue"].as_array().unwrap().len(), 5);
    assert!(!oo.to_string().contains("half a milligram"));
    // Nothing of that reached the store.
    let metrics = app.get_text("/metrics");
    assert!(metrics.contains("chartbridge_outbox_depth 0"), "{metrics}");
    // Counted by mapping and outcome; an unknown mapping's id is not a label.
    for line in [
        "chartbridge_submissions_total{mapping=\"glp1-intake-typeform\",outcome=\"unauthorized\"} 2",
        "chartbridge_submissions_total{mapping=\"refill-request-portal\",outcome=\"unauthorized\"} 1",
        "chartbridge_submissions_total{mapping=\"refill-request-portal\",outcome=\"rejected\"} 5",
        "chartbridge_submissions_total{mapping=\"refill-request-portal\",outcome=\"accepted\"} 0",
        "chartbridge_submissions_total{outcome=\"rejected\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    assert!(!metrics.contains("no-such-form"));
}

#[test]
fn without_an_ehr_submissions_wait_in_the_outbox_and_ready_says_so() {
    let app = App::start(None);
    let (status, health) = app.get("/health");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, ready) = app.get("/ready");
    assert_eq!(status, 200, "{ready}");
    assert!(ready["ehr"].as_str().unwrap().starts_with("not configured"));
    let (status, body, _) = app.post(
        "/submissions/refill-request-portal",
        &fixture("fixtures/refill-request-portal/missing-inputs.input.json"),
        &[("x-api-key", "test-key".into())],
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["flags"][2], "more_information_needed");
    let (_, view) = app.get("/submissions/refill-request-portal/rf_2025_11_28_0007");
    assert_eq!(view["state"], "mapped");
    let (_, ready) = app.get("/ready");
    assert_eq!(ready["outbox_depth"], 1);
    assert_eq!(app.get("/submissions/refill-request-portal/nope").0, 404);
    assert!(app.data_dir().exists());
}

#[test]
fn per_resource_mode_creates_each_resource_conditionally_with_rewritten_references() {
    let ehr = FhirServer::start();
    let app = App::start_with(Some(&ehr.url), "mode = \"per_resource\"");
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202);
    let view = app.wait_for_state(KEY, "delivered", 30);
    let refs: Vec<&str> = view["ehr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reference"].as_str().unwrap())
        .collect();
    assert_eq!(refs.len(), 8);
    let (patient, qr) = (refs[0], refs[1]);
    assert!(
        patient.starts_with("Patient/") && qr.starts_with("QuestionnaireResponse/"),
        "{refs:?}"
    );
    // References point at the ids the server assigned, not at urn:uuids.
    let stored_qr = ehr.search(qr);
    assert_eq!(stored_qr["subject"]["reference"], patient);
    let obs = ehr.search(&format!("Observation?derived-from={qr}"));
    assert_eq!(obs["entry"].as_array().map(Vec::len), Some(5), "{obs}");
    let prov = ehr.search(refs[7]);
    assert_eq!(prov["target"][0]["reference"], qr);

    // Delivering again (a replay) matches every resource and creates nothing.
    let counts = ehr.counts();
    let (status, _, _) = app.post(&format!("/submissions/{KEY}/replay"), b"", &[]);
    assert_eq!(status, 202);
    let view = app.wait_for_state(KEY, "delivered", 30);
    assert_eq!(view["transitions"].as_array().unwrap().len(), 5);
    assert_eq!(ehr.counts(), counts);
}

#[test]
fn a_replayed_standard_webhooks_request_is_refused() {
    let app = App::start(None);
    let body = fixture("fixtures/consult-intake-portal/complex-intake.input.json");
    let now = unix_now();
    let signed = |ts: u64| portal_signed_at(&body, ts);
    let (status, receipt, _) = app.post("/submissions/consult-intake-portal", &body, &signed(now));
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["flags"][0], "medication_reconciliation_needed");
    // The same request captured and sent again an hour later.
    let (status, oo, _) = app.post(
        "/submissions/consult-intake-portal",
        &body,
        &signed(now - 3600),
    );
    assert_eq!(status, 401, "{oo}");
    assert!(oo["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("window"));
}

#[test]
fn a_full_outbox_refuses_new_submissions_with_retry_after_and_stores_nothing() {
    let app = App::start_configured(None, "", "max_outbox = 1");
    let outcome = refill_refused_while_full(&app);
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("1 deliveries"));
    let (_, ready) = app.get("/ready");
    assert_eq!(ready["outbox_depth"], 1);
}

/// With room for one refill request in the outbox: the first is taken, its re-send answered
/// as ever (a duplicate takes no room), a second refused with `503`, `Retry-After` and a
/// `throttled` OperationOutcome (returned), and nothing of it stored.
fn refill_refused_while_full(app: &App) -> Value {
    let first = fixture("fixtures/refill-request-portal/missing-inputs.input.json");
    let key = [("x-api-key", "test-key".to_string())];
    let (status, body, _) = app.post("/submissions/refill-request-portal", &first, &key);
    assert_eq!(status, 202, "{body}");
    let (status, again, headers) = app.post("/submissions/refill-request-portal", &first, &key);
    assert_eq!(status, 202, "{again}");
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    assert_eq!(again["key"], body["key"]);
    let second = String::from_utf8(first)
        .unwrap()
        .replace("rf_2025_11_28_0007", "rf_2025_11_28_0008");
    let (status, outcome, headers) = app.post(
        "/submissions/refill-request-portal",
        second.as_bytes(),
        &key,
    );
    assert_eq!(status, 503, "{outcome}");
    assert_eq!(headers["retry-after"], "30");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "throttled");
    assert_eq!(
        app.get("/submissions/refill-request-portal/rf_2025_11_28_0008")
            .0,
        404,
        "nothing of a refused submission is stored"
    );
    outcome
}

/// One form's flood takes only its own room: past `max_outbox_per_mapping` its new
/// submissions are refused (nothing stored) while another form's are still taken.
#[test]
fn one_mappings_backlog_does_not_take_the_others_room() {
    let app = App::start_configured(None, "", "max_outbox_per_mapping = 1");
    let outcome = refill_refused_while_full(&app);
    let why = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(why.contains("`refill-request-portal`"), "{why}");
    // Another form is still taken.
    let (status, receipt, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202, "{receipt}");
    let (_, ready) = app.get("/ready");
    assert_eq!(ready["outbox_depth"], 2);
}

/// The same for a FHIR-native form's response: while the outbox is full, a re-send is
/// answered as before and a new response is refused.
#[test]
fn a_full_outbox_still_answers_a_resent_questionnaire_response() {
    let app = App::start_configured(None, "", "max_outbox = 1");
    let (_, q) = app.get("/Questionnaire/consult-intake-portal");
    let post = |id: &str| {
        let body = portal_response(&q, id).to_string().into_bytes();
        app.post("/QuestionnaireResponse", &body, &portal_signed(&body))
    };
    let (status, receipt, _) = post("resp-full-1");
    assert_eq!(status, 202, "{receipt}");
    let (status, again, headers) = post("resp-full-1");
    assert_eq!((status, &again["key"]), (202, &receipt["key"]));
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    let (status, outcome, _) = post("resp-full-2");
    assert_eq!(status, 503, "{outcome}");
    assert_eq!(outcome["issue"][0]["code"], "throttled");
}

#[test]
fn a_submission_whose_bundle_is_lost_is_dead_lettered_not_retried_forever() {
    // The segment of the Bundle log that held its Bundle is gone; a later one is there.
    let view = dead_letter_after_damage(|data, _, _| {
        let bundles = data.join("bundles");
        std::fs::rename(
            bundles.join("00000000000000000000.log"),
            bundles.join("00000000000001000000.log"),
        )
        .unwrap();
    });
    assert_eq!(
        last_detail(&view),
        "the submission's Bundle is not in the store",
        "{view}"
    );
}

#[test]
fn a_submission_whose_bundle_is_damaged_is_dead_lettered_not_retried_forever() {
    // A byte of the Bundle's frame in the log flipped: its checksum fails.
    let view = dead_letter_after_damage(|data, _, kept| {
        let offset = u64::from_le_bytes(kept[..8].try_into().unwrap()) as usize;
        let path = data.join("bundles/00000000000000000000.log");
        let mut log = std::fs::read(&path).unwrap();
        log[offset + 8] ^= 1;
        std::fs::write(&path, log).unwrap();
    });
    assert!(last_detail(&view).contains("fails its check"), "{view}");
}

#[test]
fn an_outbox_entry_without_its_submission_is_dropped_and_counts_as_no_dead_letter() {
    let app = restarted_after_damage(|db, _| {
        db.open_tree("submissions").unwrap().remove(KEY).unwrap();
        assert_eq!(
            db.open_tree("outbox").unwrap().len(),
            1,
            "its job still waits"
        );
    });
    let metrics = app.wait_for_metrics(&["chartbridge_outbox_depth 0"]);
    assert!(
        metrics.contains("chartbridge_dead_letters_total 0"),
        "{metrics}"
    );
    assert_eq!(app.get(&format!("/submissions/{KEY}")).0, 404);
}

/// Accepts a submission while the EHR is unreachable, stops the gateway, damages its store
/// with `damage(data dir, submissions tree, the record as kept: its Bundle's place first)`,
/// restarts it and returns the submission once it is dead-lettered (with the outbox empty).
fn dead_letter_after_damage(
    damage: impl FnOnce(&std::path::Path, &sled::Tree, sled::IVec),
) -> Value {
    let app = restarted_after_damage(|db, data| {
        let submissions = db.open_tree("submissions").unwrap();
        let kept = submissions.get(KEY).unwrap().expect("the record");
        damage(data, &submissions, kept);
    });
    let view = app.wait_for_state(KEY, "dead-lettered", 30);
    // Counted once the outbox has seen its outcome recorded: a moment after the record shows it.
    app.wait_for_metrics(&[
        "chartbridge_outbox_depth 0",
        "chartbridge_dead_letters_total 1",
    ]);
    view
}

/// The gateway, restarted after a submission was accepted (the EHR unreachable) and its store
/// then damaged by `damage(sled, data dir)` while the gateway was down.
fn restarted_after_damage(damage: impl FnOnce(&sled::Db, &std::path::Path)) -> App {
    let url = format!("http://127.0.0.1:{}/fhir/R4", free_port());
    let mut app = App::start(Some(&url));
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202);
    app.kill();
    {
        let db = sled::open(app.data_dir()).unwrap();
        damage(&db, &app.data_dir());
        db.flush().unwrap();
    }
    // sled lets go of its lock a moment after the last handle goes.
    std::thread::sleep(std::time::Duration::from_millis(200));
    app.restart();
    app
}

fn last_detail(view: &Value) -> &str {
    view["transitions"].as_array().unwrap().last().unwrap()["detail"]
        .as_str()
        .unwrap_or_default()
}

#[test]
fn bundles_past_their_retention_are_swept_and_a_waiting_one_is_still_delivered() {
    let port = free_port();
    let mut app = App::start(Some(&format!("http://127.0.0.1:{port}/fhir/R4")));
    let (status, _, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202, "Maya's delivery waits: the EHR is down");
    app.kill();
    // Two more submissions, both delivered, each in a segment of its own (segments of a byte);
    // then every segment but the last is made 40 days old.
    let data = app.data_dir();
    {
        use chartbridge::store::{SledStore, State, Store, StoreOptions, Transition};
        let options = StoreOptions {
            bundle_segment_bytes: 1,
        };
        let store = SledStore::open_with(&data, options).unwrap();
        let mut record = store.get(KEY).unwrap().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        for id in ["old", "latest"] {
            record.submission_id = id.into();
            runtime
                .block_on(store.accept(&record, b"{}".to_vec(), vec![]))
                .unwrap();
            let delivered = Transition::new(State::Delivered, "2026-01-02T00:00:00Z");
            runtime
                .block_on(store.record_delivery(
                    &record.key(),
                    delivered,
                    vec![],
                    None,
                    chartbridge::store::no_consequences(),
                ))
                .unwrap();
        }
    }
    let mut segments: Vec<_> = std::fs::read_dir(data.join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert_eq!(segments.len(), 3);
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86_400);
    for segment in &segments[..2] {
        let file = std::fs::File::options().write(true).open(segment).unwrap();
        file.set_modified(long_ago).unwrap();
    }

    // The sweep at start: the old delivered Bundle goes with its segment; Maya's, still
    // waiting, moves to the end of the log before hers goes.
    app.restart();
    app.wait_for_metrics(&[
        "chartbridge_bundles_expired_total 1",
        "chartbridge_bundles_moved_total 1",
        "chartbridge_bundle_segments_deleted_total 2",
    ]);
    let (status, old) = app.get("/submissions/glp1-intake-typeform/old");
    assert_eq!((status, &old["state"]), (200, &Value::from("delivered")));
    let (status, oo, _) = app.post("/submissions/glp1-intake-typeform/old/replay", b"", &[]);
    assert_eq!(status, 410, "nothing left to send again: {oo}");
    assert_eq!(oo["issue"][0]["code"], "deleted");

    // With the EHR up, Maya's moved Bundle is delivered.
    let ehr = FhirServer::start_with(&[("PORT", &port.to_string())]);
    app.wait_for_state(KEY, "delivered", 30);
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);
}

/// Healthie's GraphQL API as the gateway meets it: `formAnswerGroup(id:)` answered with the
/// recorded answer of the Healthie fixture for its id, `null` for any other id, GraphQL's
/// "API Key is Invalid" error for a wrong key, `503` while `down`. It answers from the
/// recording because Healthie itself cannot run here; what it checks of the request is what
/// Healthie's documentation asks for.
struct HealthieApi {
    url: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    queries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

const HEALTHIE_KEY: &str = "healthie-test-key";
const HEALTHIE_FORM: &str = "fixtures/glp1-intake-healthie/priya-unknown-family-history.input.json";

impl HealthieApi {
    fn start() -> HealthieApi {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use std::sync::atomic::Ordering;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (d, q) = (down.clone(), queries.clone());
        let recorded = fixture(HEALTHIE_FORM);
        let url = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/graphql", listener.local_addr().unwrap());
            let graphql = move |headers: HeaderMap, body: axum::body::Bytes| async move {
                q.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                let json = |v: &Value| ([("content-type", "application/json")], v.to_string());
                if header("authorization") != Some(&format!("Basic {HEALTHIE_KEY}"))
                    || header("authorizationsource") != Some("API")
                {
                    let e = serde_json::json!({"data": null, "errors": [{"message": "API Key is Invalid"}]});
                    return json(&e).into_response();
                }
                let query: Value = serde_json::from_slice(&body).unwrap();
                assert!(query["query"]
                    .as_str()
                    .unwrap()
                    .contains("formAnswerGroup(id: $id)"));
                match query["variables"]["id"].as_str() {
                    Some("4718203") => (
                        [("content-type", "application/json")],
                        recorded.clone(),
                    )
                        .into_response(),
                    _ => json(&serde_json::json!({"data": {"formAnswerGroup": null}})).into_response(),
                }
            };
            let app = axum::Router::new().route("/graphql", axum::routing::post(graphql));
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        });
        HealthieApi {
            url,
            down,
            queries,
            _runtime: runtime,
        }
    }

    /// The configuration of the Healthie source: its webhooks signed, its forms fetched with
    /// `key`.
    fn tables(&self, key: &str) -> String {
        format!(
            "\n[sources.glp1-intake-healthie]\ntype = \"healthie\"\nsecret = \"{HEALTHIE_WEBHOOK_SECRET}\"\n\
             \n[fetch.glp1-intake-healthie]\ntype = \"healthie_graphql\"\nurl = \"{}\"\napi_key = \"{key}\"\ntimeout_ms = 5000\n",
            self.url
        )
    }
}

const HEALTHIE_WEBHOOK_SECRET: &str = "healthie-webhook-secret";
const HEALTHIE_PATH: &str = "/submissions/glp1-intake-healthie";

/// POSTs a notification signed as Healthie signs its webhooks.
fn notify_healthie(app: &App, body: &[u8]) -> (u16, Value, reqwest::header::HeaderMap) {
    let target = chartbridge::http::auth::Target {
        method: "POST",
        path: HEALTHIE_PATH,
        query: "",
    };
    let (digest, signature) =
        chartbridge::http::auth::sign_healthie(HEALTHIE_WEBHOOK_SECRET, &target, body);
    app.post(
        HEALTHIE_PATH,
        body,
        &[
            ("content-type", "application/json".into()),
            ("content-digest", digest),
            ("signature", signature),
            ("signature-input", "sig1=(\"@method\" \"@path\" \"@query\" \"content-digest\" \"content-type\" \"content-length\")".into()),
        ],
    )
}

#[test]
fn a_healthie_notification_is_exchanged_for_its_form_and_reaches_the_ehr() {
    use std::sync::atomic::Ordering;
    let ehr = FhirServer::start();
    let healthie = HealthieApi::start();
    let app = App::start_with_tables(Some(&ehr.url), &healthie.tables(HEALTHIE_KEY));
    let notify = |body: &[u8]| notify_healthie(&app, body);
    let created = fixture("fixtures/vendors/healthie.webhook.form_answer_group.created.json");
    let key = "glp1-intake-healthie/4718203";
    let target = chartbridge::http::auth::Target {
        method: "POST",
        path: HEALTHIE_PATH,
        query: "",
    };
    let (_, signed_created) =
        chartbridge::http::auth::sign_healthie(HEALTHIE_WEBHOOK_SECRET, &target, &created);
    let sha256_of = |body: &[u8]| {
        chartbridge::http::auth::sign_healthie(HEALTHIE_WEBHOOK_SECRET, &target, body).0
    };

    // Healthie's API down: a 502 the source retries, and nothing stored.
    healthie.down.store(true, Ordering::SeqCst);
    let (status, outcome, headers) = notify(&created);
    assert_eq!(status, 502, "{outcome}");
    assert_eq!(outcome["issue"][0]["code"], "transient");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(app.get(&format!("/submissions/{key}")).0, 404);
    app.wait_for_metrics(&[
        "chartbridge_submissions_total{mapping=\"glp1-intake-healthie\",outcome=\"unfetched\"} 1",
    ]);

    // Up: the form is fetched, mapped, stored and delivered.
    healthie.down.store(false, Ordering::SeqCst);
    let (status, receipt, _) = notify(&created);
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["key"], key);
    assert_eq!(
        receipt["flags"],
        serde_json::json!(["family_history_unknown"])
    );
    delivered_with_a_questionnaire_response(&app, key);
    let found = ehr.search("Patient?identifier=https://secure.gethealthie.com/users|3029471");
    assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "{found}");

    // A later event about the same form (locked) fetches the same answer: a duplicate.
    let locked = String::from_utf8(created.clone())
        .unwrap()
        .replace("form_answer_group.created", "form_answer_group.locked");
    let (status, again, headers) = notify(locked.as_bytes());
    assert_eq!((status, &again), (202, &receipt));
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);

    // A form Healthie does not have, a notification about something else, and not JSON.
    let (status, outcome, _) =
        notify(br#"{"resource_id":"999","resource_id_type":"FormAnswerGroup","event_type":"form_answer_group.created"}"#);
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (422, Some("not-found")),
        "{outcome}"
    );
    let before = healthie.queries.load(Ordering::SeqCst);
    for bad in [
        &br#"{"resource_id":"77","resource_id_type":"Appointment","event_type":"appointment.created"}"#[..],
        b"{not json",
    ] {
        let (status, outcome, _) = notify(bad);
        assert_eq!((status, outcome["issue"][0]["code"].as_str()), (422, Some("structure")), "{outcome}");
    }
    assert_eq!(
        healthie.queries.load(Ordering::SeqCst),
        before,
        "no query for a bad notification"
    );
    // The notification is authenticated before anything is fetched: unsigned, or its
    // signature over another body.
    let (status, _, _) = app.post(HEALTHIE_PATH, &created, &[]);
    assert_eq!(status, 401);
    let (status, outcome, _) = app.post(
        HEALTHIE_PATH,
        br#"{"resource_id":"4718204","resource_id_type":"FormAnswerGroup"}"#,
        &[
            ("content-digest", sha256_of(&created)),
            ("signature", signed_created),
        ],
    );
    assert_eq!(status, 401, "{outcome}");
    assert_eq!(healthie.queries.load(Ordering::SeqCst), before);
}

#[test]
fn a_wrong_healthie_api_key_is_a_502_that_says_so() {
    let healthie = HealthieApi::start();
    let app = App::start_with_tables(None, &healthie.tables("wrong-key"));
    let (status, outcome, _) = notify_healthie(
        &app,
        &fixture("fixtures/vendors/healthie.webhook.form_answer_group.created.json"),
    );
    assert_eq!(status, 502, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("API Key is Invalid"));
}

#[test]
fn operator_endpoints_need_the_admin_key_and_find_a_patients_submissions() {
    let app = App::start(None);
    let (status, receipt, _) = app.post_typeform(&fixture(MAYA));
    assert_eq!(status, 202, "{receipt}");
    let anyone = reqwest::blocking::Client::new();
    for (method, path) in [
        ("GET", format!("/submissions/{KEY}")),
        ("POST", format!("/submissions/{KEY}/replay")),
        ("GET", "/provenance?target=Observation/1".to_string()),
        (
            "GET",
            "/submissions?patient=https://crm.example-clinic.com/patient|pt_8f3c2a91".to_string(),
        ),
    ] {
        for authorization in [None, Some("Bearer wrong"), Some("test-admin-key")] {
            let mut request = anyone.request(method.parse().unwrap(), format!("{}{path}", app.url));
            if let Some(a) = authorization {
                request = request.header("authorization", a);
            }
            let r = request.send().unwrap();
            assert_eq!(
                r.status().as_u16(),
                401,
                "{method} {path} {authorization:?}"
            );
            let outcome: Value = r.json().unwrap();
            assert_eq!(outcome["issue"][0]["code"], "security");
        }
    }
    // Liveness, readiness and metrics stay open (probes and scrapers).
    for path in ["/health", "/ready", "/metrics"] {
        let r = anyone.get(format!("{}{path}", app.url)).send().unwrap();
        assert_ne!(r.status().as_u16(), 401, "{path}");
    }

    let (status, found) =
        app.get("/submissions?patient=https://crm.example-clinic.com/patient|pt_8f3c2a91");
    assert_eq!(status, 200, "{found}");
    let keys: Vec<&str> = found["submissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, [KEY]);
    assert!(!found.to_string().contains("Okafor"), "no PHI values");
    // The same from the command line (the identifier URL-encoded on the way).
    let out = common::succeeds(
        common::chartbridge()
            .args([
                "patient",
                "https://crm.example-clinic.com/patient|pt_8f3c2a91",
                "--url",
                &app.url,
            ])
            .env("CHARTBRIDGE_ADMIN_KEY", common::ADMIN_KEY),
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, found);
    let (status, none) =
        app.get("/submissions?patient=https://crm.example-clinic.com/patient|nobody");
    assert_eq!(
        (status, &none["submissions"]),
        (200, &serde_json::json!([]))
    );
    for bad in ["/submissions?patient=no-bar", "/submissions"] {
        let (status, outcome) = app.get(bad);
        assert_eq!(
            (status, outcome["issue"][0]["code"].as_str()),
            (400, Some("invalid")),
            "{bad}"
        );
    }
}

#[test]
fn the_mappings_questionnaires_are_served_as_fhir_with_a_capability_statement() {
    use chartbridge::fhir::validate::validate;
    let app = App::start(None);
    let valid = |v: &Value| {
        validate(v).unwrap_or_else(|o| panic!("{}: {}", v["resourceType"], o.to_json()));
    };
    let (status, capability) = app.get("/metadata");
    assert_eq!(status, 200, "{capability}");
    valid(&capability);
    assert_eq!(
        capability["rest"][0]["resource"][0]["type"],
        "Questionnaire"
    );
    assert_eq!(
        capability["rest"][0]["resource"][1]["operation"][0]["definition"],
        "http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract"
    );

    let url = "https://forms.example-clinic.com/Questionnaire/glp1-intake";
    let (status, q) = app.get("/Questionnaire/glp1-intake-typeform");
    assert_eq!(status, 200, "{q}");
    valid(&q);
    assert_eq!(
        (q["resourceType"].as_str(), q["url"].as_str()),
        (Some("Questionnaire"), Some(url))
    );
    let (status, found) = app.get(&format!("/Questionnaire?url={url}"));
    assert_eq!(status, 200, "{found}");
    valid(&found);
    assert_eq!(found["total"], 1);
    assert_eq!(found["entry"][0]["resource"], q);
    let (_, all) = app.get("/Questionnaire");
    valid(&all);
    let shipped = std::fs::read_dir(root().join("mappings")).unwrap().count();
    assert_eq!(all["total"].as_u64(), Some(shipped as u64));
    // What the mapping's QuestionnaireResponses point at (its golden Bundle) is what is served.
    let golden = common::read_json(
        &root().join("fixtures/glp1-intake-typeform/maya-happy-path.expected.json"),
    );
    let canonical = format!("{url}|{}", q["version"].as_str().unwrap());
    assert!(
        golden
            .to_string()
            .contains(&format!("\"questionnaire\":\"{canonical}\"")),
        "{canonical}"
    );
    // ... and that versioned canonical finds it; another version does not.
    let (_, by_version) = app.get(&format!("/Questionnaire?url={canonical}"));
    assert_eq!(by_version["entry"][0]["resource"], q);
    let (_, other) = app.get(&format!("/Questionnaire?url={url}|999"));
    assert_eq!(other["total"], 0);

    let (status, none) = app.get("/Questionnaire?url=https://example.org/nothing");
    assert_eq!((status, &none["total"]), (200, &serde_json::json!(0)));
    assert!(none.get("entry").is_none());
    valid(&none);
    let (status, outcome) = app.get("/Questionnaire/nothing");
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (404, Some("not-found"))
    );
}

/// POSTs `body` to `$extract`.
fn post_extract(app: &App, body: &[u8]) -> (u16, Value, reqwest::header::HeaderMap) {
    app.post("/QuestionnaireResponse/$extract", body, &[])
}

/// An answer of `item`'s type (what a form renderer would post), or none for a group.
fn some_answer(item: &Value) -> Option<Value> {
    use serde_json::json;
    let unit = item["extension"].as_array().and_then(|es| {
        es.iter()
            .find(|e| e["url"] == "http://hl7.org/fhir/StructureDefinition/questionnaire-unit")
    });
    // A plausible number: inside the item's bounds when it has them (81.5 without).
    let bound = |which: &str| {
        item["extension"].as_array().and_then(|es| {
            es.iter()
                .find(|e| e["url"].as_str().is_some_and(|u| u.ends_with(which)))
                .and_then(|e| e["valueQuantity"]["value"].as_f64())
        })
    };
    let value = match (bound("minQuantity"), bound("maxQuantity")) {
        (Some(low), Some(high)) => ((low + high) / 2.0).round(),
        _ => 81.5,
    };
    Some(match item["type"].as_str()? {
        "quantity" => {
            let u = &unit?["valueCoding"];
            json!({"valueQuantity": {"value": value, "unit": u["display"], "system": u["system"], "code": u["code"]}})
        }
        "decimal" => json!({"valueDecimal": 1.5}),
        "integer" => json!({"valueInteger": 0}),
        "boolean" => json!({"valueBoolean": false}),
        "date" => json!({"valueDate": "1990-04-02"}),
        "string" | "text" => json!({"valueString": "ça va"}),
        "choice" => json!({"valueCoding": item["answerOption"][0]["valueCoding"].clone()}),
        _ => return None,
    })
}

/// A QuestionnaireResponse answering every question of `questionnaire`'s items.
fn answering(items: &Value) -> Vec<Value> {
    items
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| {
            let mut r = serde_json::json!({"linkId": item["linkId"]});
            if let Some(a) = some_answer(item) {
                r["answer"] = serde_json::json!([a]);
            }
            if item.get("item").is_some() {
                r["item"] = Value::from(answering(&item["item"]));
            }
            r
        })
        .collect()
}

/// A FHIR-native form: the EHR holds a QuestionnaireResponse to one of the mappings'
/// Questionnaires; `$extract` (resolving the Questionnaire by its canonical) gives the
/// Observations as a transaction the real FHIR server accepts, and extracting again updates
/// them instead of adding more.
#[test]
fn extract_turns_a_questionnaire_response_into_observations_the_ehr_accepts() {
    use chartbridge::fhir::validate::validate;
    use serde_json::json;
    let ehr = FhirServer::start();
    let app = App::start(None);
    let (_, q) = app.get("/Questionnaire/glp1-intake-typeform");
    let (status, patient) = ehr.post("/Patient", &json!({"resourceType": "Patient"}));
    assert_eq!(status, 201, "{patient}");
    let (status, qr) = ehr.post(
        "/QuestionnaireResponse",
        &json!({
            "resourceType": "QuestionnaireResponse",
            "identifier": {"system": "https://portal.example-clinic.com/responses", "value": "r-1"},
            "questionnaire": format!("{}|{}", q["url"].as_str().unwrap(), q["version"].as_str().unwrap()),
            "status": "completed",
            "subject": {"reference": format!("Patient/{}", patient["id"].as_str().unwrap())},
            "authored": "2026-11-26T09:30:00Z",
            "item": answering(&q["item"]),
        }),
    );
    assert_eq!(status, 201, "{qr}");

    let (status, bundle, headers) = post_extract(&app, qr.to_string().as_bytes());
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(headers["content-type"], "application/fhir+json");
    assert_eq!(
        bundle["type"], "transaction",
        "no warnings: the Bundle itself"
    );
    validate(&bundle).unwrap_or_else(|o| panic!("{}", o.to_json()));
    let extracted = common::entries_of(&bundle, "Observation");
    assert!(extracted >= 5, "{bundle}");
    let weight = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|o| o["code"]["coding"][0]["code"] == "29463-7")
        .expect("the weight");
    // Midway between the weight's plausible bounds (0.3–650 kg).
    assert_eq!(weight["valueQuantity"]["value"].as_f64(), Some(325.0));
    assert_eq!(
        weight["valueQuantity"]["system"],
        "http://unitsofmeasure.org"
    );
    let qr_ref = format!("QuestionnaireResponse/{}", qr["id"].as_str().unwrap());
    assert_eq!(weight["derivedFrom"][0]["reference"], qr_ref.as_str());
    // The Questionnaire says what the mapping does: each Observation $extract makes has the
    // category and component codes of the one with its code the mapping makes from a vendor
    // payload (the blood pressure panel included; Maya's payload answers all but one).
    let golden = common::read_json(
        &root().join("fixtures/glp1-intake-typeform/maya-happy-path.expected.json"),
    );
    let shape = |o: &Value| {
        let components: Vec<Value> = o["component"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["code"].clone())
            .collect();
        (
            o["code"]["coding"][0]["code"].clone(),
            o["category"].clone(),
            components,
        )
    };
    let mapped: Vec<_> = golden["bundle"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "Observation")
        .map(shape)
        .collect();
    let mut compared = 0;
    for e in bundle["entry"].as_array().unwrap() {
        let extracted = shape(&e["resource"]);
        if let Some(m) = mapped.iter().find(|m| m.0 == extracted.0) {
            assert_eq!(&extracted, m);
            compared += 1;
        }
    }
    assert_eq!(
        compared,
        mapped.len(),
        "every Observation the mapping makes"
    );
    assert!(
        mapped.iter().any(|m| m.2.len() == 2),
        "the BP panel is compared"
    );

    let (status, answer) = ehr.transaction(&bundle);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(count(&ehr, "Observation"), extracted as u64);
    let (status, answer) = ehr.transaction(&bundle);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        count(&ehr, "Observation"),
        extracted as u64,
        "updated, not duplicated"
    );
    assert_eq!(count(&ehr, "Provenance"), 1, "one Provenance per response");
    let found = ehr.search(&format!("Observation?derived-from={qr_ref}&code=29463-7"));
    assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "{found}");
}

#[test]
fn extract_takes_parameters_with_an_inline_questionnaire_and_says_what_it_cannot_do() {
    use serde_json::json;
    let app = App::start(None);
    let q =
        common::read_json(&root().join("fixtures/sdc/qObservationSampleWithExtractExtension.json"));
    let qr = common::read_json(&root().join("fixtures/sdc/qrObservationSample.json"));
    // The Questionnaire is not one of the mappings': without it inline, a 422 that says so.
    let (status, outcome, _) = post_extract(&app, qr.to_string().as_bytes());
    assert_eq!(status, 422, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| d.contains("phq-2-questionnaire") && d.contains("`questionnaire`")),
        "{outcome}"
    );
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "questionnaire-response", "resource": qr},
        {"name": "questionnaire", "resource": q}]});
    let (status, out, _) = post_extract(&app, parameters.to_string().as_bytes());
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["resourceType"], "Parameters");
    assert_eq!(out["parameter"][0]["name"], "return");
    let types: Vec<&str> = out["parameter"][0]["resource"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["resourceType"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "Observation",
            "Observation",
            "Observation",
            "Observation",
            "Provenance"
        ]
    );
    // The response has no identifier: re-extraction would duplicate, and the issues say so.
    assert_eq!(out["parameter"][1]["name"], "issues");
    assert_eq!(
        out["parameter"][1]["resource"]["issue"][0]["severity"],
        "warning"
    );
    // Not a QuestionnaireResponse; not JSON; too deep.
    let (status, outcome, _) = post_extract(
        &app,
        json!({"resourceType": "Patient"}).to_string().as_bytes(),
    );
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (422, Some("invalid"))
    );
    let (status, outcome, _) = post_extract(&app, b"{\"item\": [");
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (400, Some("structure"))
    );
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    let (status, _, _) = post_extract(&app, deep.as_bytes());
    assert_eq!(status, 400);
}

/// SDC 4.0 `member` and `derived` through `$extract`, and the Bundle through the real FHIR
/// server: the panel's `hasMember` and the derived value's `derivedFrom` end up pointing at the
/// Observations the server stored.
#[test]
fn extracted_panels_point_at_their_members_on_the_ehr() {
    use serde_json::json;
    let ehr = FhirServer::start();
    let app = App::start(None);
    let loinc = |code: &str| json!([{"system": "http://loinc.org", "code": code}]);
    let flag = |v: &str| {
        json!([{"url": "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observationExtract",
                "valueCode": v}])
    };
    let q = json!({
        "resourceType": "Questionnaire", "status": "active",
        "url": "https://portal.example/Questionnaire/vitals",
        "item": [{"linkId": "panel", "type": "group", "code": loinc("85353-1"),
                  "extension": flag("independent"), "item": [
            {"linkId": "weight", "type": "decimal", "code": loinc("29463-7"),
             "extension": flag("member")},
            {"linkId": "bmi", "type": "decimal", "code": loinc("39156-5"),
             "extension": flag("derived")}]}]
    });
    let qr = json!({
        "resourceType": "QuestionnaireResponse", "status": "completed",
        "questionnaire": "https://portal.example/Questionnaire/vitals",
        "identifier": {"system": "https://portal.example/qr", "value": "vitals-1"},
        "authored": "2026-11-27T09:00:00Z",
        "item": [{"linkId": "panel", "item": [
            {"linkId": "weight", "answer": [{"valueDecimal": 70.5}]},
            {"linkId": "bmi", "answer": [{"valueDecimal": 23.0}]}]}]
    });
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "questionnaire-response", "resource": qr},
        {"name": "questionnaire", "resource": q}]});
    let (status, bundle, _) = post_extract(&app, parameters.to_string().as_bytes());
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["resourceType"], "Bundle", "no warnings: {bundle}");
    let (status, answer) = ehr.transaction(&bundle);
    assert_eq!(status, 200, "{answer}");
    let find = |code: &str| {
        let found = ehr.search(&format!("Observation?code=http://loinc.org|{code}"));
        assert_eq!(found["total"], 1, "{found}");
        found["entry"][0]["resource"].clone()
    };
    let (panel, weight, bmi) = (find("85353-1"), find("29463-7"), find("39156-5"));
    let id = |o: &Value| format!("Observation/{}", o["id"].as_str().unwrap());
    assert_eq!(panel["hasMember"], json!([{"reference": id(&weight)}]));
    assert_eq!(bmi["derivedFrom"][1], json!({"reference": id(&panel)}));
}

/// Every use of an operators' endpoint, let through or refused, is in the audit trail before
/// it is served — with which admin key, from where, the request id and the query (a patient
/// lookup's identifier stays there, not in the log).
#[test]
fn every_operator_access_is_recorded_in_the_audit_trail() {
    let app = App::start_logged(None);
    let lookup = "/submissions?patient=https://crm.example-clinic.com/patient|pt_audited";
    let anyone = reqwest::blocking::Client::new();
    let r = anyone
        .get(format!("{}{lookup}", app.url))
        .header("x-forwarded-for", "203.0.113.7, 10.0.0.2")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let refused_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (status, _) = app.get(lookup);
    assert_eq!(status, 200);
    let (status, _) = app.get(&format!("/submissions/{KEY}"));
    assert_eq!(status, 404);
    let r = anyone.get(format!("{}/audit", app.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 401, "the trail is for operators too");

    let (status, trail) = app.get("/audit?limit=5");
    assert_eq!(status, 200, "{trail}");
    let accesses = trail["accesses"].as_array().unwrap();
    let key = format!(
        "admin key {}",
        &chartbridge::fhir::sha256_hex(common::ADMIN_KEY.as_bytes())[..16]
    );
    let seen: Vec<(&str, &str, bool)> = accesses
        .iter()
        .map(|a| {
            (
                a["path"].as_str().unwrap(),
                a["who"].as_str().unwrap(),
                a["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    let status_path = format!("/submissions/{KEY}");
    assert_eq!(
        seen,
        [
            ("/audit", key.as_str(), true),
            (
                "/audit",
                "refused: this endpoint is for operators: send `Authorization: Bearer <the admin key>`",
                false
            ),
            (status_path.as_str(), key.as_str(), true),
            ("/submissions", key.as_str(), true),
            (
                "/submissions",
                "refused: this endpoint is for operators: send `Authorization: Bearer <the admin key>`",
                false
            ),
        ]
    );
    assert_eq!(
        accesses[3]["query"],
        "patient=https://crm.example-clinic.com/patient|pt_audited"
    );
    assert_eq!(accesses[4]["request_id"], refused_id.as_str());
    // From where: the connection's peer; what a proxy says of the client, as it says it.
    for a in accesses {
        let client = a["client"].as_str().unwrap();
        let addr: std::net::SocketAddr = client.parse().unwrap();
        assert!(addr.ip().is_loopback(), "{client}");
    }
    assert_eq!(accesses[4]["forwarded_for"], "203.0.113.7, 10.0.0.2");
    assert!(accesses[3].get("forwarded_for").is_none());
    assert!(!accesses
        .iter()
        .any(|a| a.to_string().contains(common::ADMIN_KEY)));
    let (lines, _) = app.log_lines();
    assert!(
        !lines.iter().any(|l| l.to_string().contains("pt_audited")),
        "the identifier is in the trail, not the log"
    );
    // The same from the command line.
    let out = common::succeeds(
        common::chartbridge()
            .args(["audit", "--limit", "1", "--since", "2000-01-01T00:00:00Z"])
            .args(["--url", &app.url])
            .env("CHARTBRIDGE_ADMIN_KEY", common::ADMIN_KEY),
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["accesses"][0]["path"], "/audit");
    assert_eq!(
        printed["accesses"][0]["query"],
        "limit=1&since=2000-01-01T00%3A00%3A00Z"
    );
    assert!(printed["next"].is_string(), "{printed}");
}

/// The audit trail is read by time window and page by page; entries older than
/// `audit_retention_days` go at start (then hourly), counted in `/metrics`.
#[test]
fn the_audit_trail_pages_by_time_and_forgets_past_its_retention() {
    use serde_json::json;
    let mut app = App::start(None);
    for n in 0..3 {
        let (status, _) = app.get(&format!("/provenance?target=Observation/{n}"));
        assert_eq!(status, 404);
    }
    // Page by page, newest first: each page's `next` is where the one after begins.
    let mut pages = Vec::new();
    let mut next = None::<String>;
    loop {
        let query = match &next {
            Some(before) => format!("/audit?limit=2&before={before}&until=2999-01-01T00:00:00Z"),
            None => "/audit?limit=2&until=2999-01-01T00:00:00Z".to_string(),
        };
        let (status, page) = app.get(&query);
        assert_eq!(status, 200, "{page}");
        pages.push(page["accesses"].clone());
        match page["next"].as_str() {
            Some(n) => next = Some(n.to_string()),
            None => break,
        }
        assert!(pages.len() < 10, "pages never end");
    }
    let queries: Vec<&str> = pages
        .iter()
        .flat_map(|p| p.as_array().unwrap())
        .filter_map(|a| a["query"].as_str())
        .filter(|q| q.starts_with("target="))
        .collect();
    assert_eq!(
        queries,
        [
            "target=Observation/2",
            "target=Observation/1",
            "target=Observation/0"
        ]
    );
    // A window in the future holds nothing; a time that is not one is the caller's mistake.
    let (_, future) = app.get("/audit?since=2999-01-01T00:00:00Z");
    assert_eq!(future["accesses"], json!([]));
    assert!(future.get("next").is_none());
    for bad in ["since=yesterday", "until=2026-13-01T00:00:00Z", "before=zz"] {
        let (status, outcome) = app.get(&format!("/audit?{bad}"));
        assert_eq!(
            (status, outcome["resourceType"].as_str()),
            (400, Some("OperationOutcome")),
            "{bad}: {outcome}"
        );
    }

    // Two entries from weeks ago (as an older gateway recorded them); a retention of 30 days.
    app.kill();
    let day = 86_400_000_000u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    {
        let db = sled::open(app.data_dir()).unwrap();
        let audit = db.open_tree("audit").unwrap();
        for (age, path) in [(31, "/old"), (29, "/recent")] {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&(now - age * day).to_be_bytes());
            let access = json!({"at": "then", "who": "admin key 0123456789abcdef",
                "request_id": "req-1", "method": "GET", "path": path, "allowed": true});
            audit
                .insert(key, serde_json::to_vec(&access).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
    }
    let config = std::fs::read_to_string(&app.config_path).unwrap();
    std::fs::write(
        &app.config_path,
        format!("audit_retention_days = 30\n{config}"),
    )
    .unwrap();
    app.restart();
    app.wait_for_metrics(&["chartbridge_audit_entries_forgotten_total 1"]);
    let twenty_days = now - 20 * day;
    let until = chrono::DateTime::from_timestamp_micros(twenty_days as i64)
        .unwrap()
        .to_rfc3339();
    let (_, old) = app.get(&format!("/audit?until={}", until.replace('+', "%2B")));
    let paths: Vec<&str> = old["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/recent"]);
}

/// Operators with keys of their own: each is let through and named in the audit trail (the
/// admin key still works); a key two of them would share keeps the gateway from starting.
#[test]
fn named_operators_are_told_apart_in_the_audit_trail() {
    // Bob's key is configured by its SHA-256 alone: the file does not hold it.
    let app = App::start_with_tables(
        None,
        &format!(
            "\n[operators]\nalice = \"alice-key-7f3e\"\nbob = \"sha256:{}\"\n",
            chartbridge::fhir::sha256_hex(b"bob-key-91c2")
        ),
    );
    let as_operator = |key: &str| {
        reqwest::blocking::Client::new()
            .get(format!("{}/provenance?target=Observation/9", app.url))
            .bearer_auth(key)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(as_operator("alice-key-7f3e"), 404);
    assert_eq!(as_operator("bob-key-91c2"), 404);
    assert_eq!(as_operator("carol-key"), 401);
    let (status, trail) = app.get("/audit?limit=4");
    assert_eq!(status, 200);
    let who: Vec<&str> = trail["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["who"].as_str().unwrap())
        .collect();
    let admin = format!(
        "admin key {}",
        &chartbridge::fhir::sha256_hex(common::ADMIN_KEY.as_bytes())[..16]
    );
    assert_eq!(
        who,
        [
            admin.as_str(),
            "refused: the key given is not your operator key or the admin key",
            "operator bob",
            "operator alice"
        ]
    );
    assert!(!trail.to_string().contains("-key-"), "no key in the trail");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shared.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nmappings_dir = {:?}\n\
             [operators]\nalice = \"same\"\nbob = \"same\"\n",
            dir.path().join("data"),
            common::root().join("mappings"),
        ),
    )
    .unwrap();
    let refused = common::chartbridge()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("bob: the same key as operator alice"),
        "{stderr}"
    );
}

/// A script hammering the operators' endpoints without the key is refused every time, but
/// fills no disk: past a burst, its refusals are counted (into the next entry recorded and a
/// metric), not recorded one by one.
#[test]
fn refused_attempts_beyond_the_audit_rate_are_counted_not_recorded() {
    let app = App::start(None);
    let anyone = reqwest::blocking::Client::new();
    let attempts = 300;
    for _ in 0..attempts {
        let r = anyone
            .get(format!("{}/provenance?target=Observation/1", app.url))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    let (status, trail) = app.get("/audit?limit=1000");
    assert_eq!(status, 200, "{trail}");
    let accesses = trail["accesses"].as_array().unwrap();
    let recorded = accesses.iter().filter(|a| a["allowed"] == false).count();
    // Each count is in the entry recorded next (a refusal once the rate allows, or this read).
    let counted: u64 = accesses
        .iter()
        .filter_map(|a| a["unrecorded_refusals"].as_u64())
        .sum();
    assert_eq!(accesses[0]["path"], "/audit");
    assert_eq!(
        recorded as u64 + counted,
        attempts,
        "{recorded} + {counted}"
    );
    assert!(recorded >= 100 && counted > 0, "{recorded} recorded");
    let metrics = app.get_text("/metrics");
    assert!(
        metrics.contains(&format!(
            "chartbridge_operator_refusals_unrecorded_total {counted}"
        )),
        "{metrics}"
    );
}

/// A FHIR-native form: the clinic's portal posts a QuestionnaireResponse to one of the
/// mappings' Questionnaires, signed as that mapping's source. It is a submission like any
/// other — durable, then delivered once: the EHR gets its Patient, the response, the extracted
/// Observations and the Provenance, and a re-sent response creates nothing more.
#[test]
fn a_questionnaire_response_is_a_submission_delivered_with_its_observations() {
    a_questionnaire_response_delivered_in_mode("");
}

/// The same resource by resource (an EHR without transactions): every entry a conditional
/// create, references rewritten to the ids the EHR gave.
#[test]
fn a_questionnaire_response_submission_is_delivered_resource_by_resource_too() {
    a_questionnaire_response_delivered_in_mode("mode = \"per_resource\"");
}

/// The clinic portal's QuestionnaireResponse `id` to the consult intake's Questionnaire `q`:
/// every question answered but the reason for the visit (required).
fn portal_response(q: &Value, id: &str) -> Value {
    serde_json::json!({
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": "https://portal.example-clinic.com/responses", "value": id},
        "questionnaire": format!("{}|{}", q["url"].as_str().unwrap(), q["version"].as_str().unwrap()),
        "status": "completed",
        "subject": {"identifier": {"system": "https://crm.example-clinic.com/patient", "value": "pt_fhir_native"}},
        "authored": "2026-11-26T09:30:00Z",
        "item": answering(&q["item"])
            .into_iter()
            .filter(|i| i["linkId"] != "reason")
            .collect::<Vec<_>>(),
    })
}

/// The Standard Webhooks headers the portal signs `body` with, now.
fn portal_signed(body: &[u8]) -> Vec<(&'static str, String)> {
    portal_signed_at(body, unix_now())
}

/// The same, signed at `ts` (Unix seconds).
fn portal_signed_at(body: &[u8], ts: u64) -> Vec<(&'static str, String)> {
    let signature =
        chartbridge::http::auth::sign_standard_webhooks(common::PORTAL_SECRET, "msg_1", ts, body);
    vec![
        ("webhook-id", "msg_1".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signature),
    ]
}

/// Now, in Unix seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn a_questionnaire_response_delivered_in_mode(ehr_extra: &str) {
    use serde_json::json;
    let ehr = FhirServer::start();
    let app = App::start_with(Some(&ehr.url), ehr_extra);
    let (_, q) = app.get("/Questionnaire/consult-intake-portal");
    let response = portal_response(&q, "resp-42");
    let body = response.to_string().into_bytes();
    let signed = portal_signed;
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &body, &[]);
    assert_eq!(status, 401, "{outcome}");
    let (status, receipt, _) = app.post("/QuestionnaireResponse", &body, &signed(&body));
    assert_eq!(status, 202, "{receipt}");
    let key = "consult-intake-portal/resp-42";
    assert_eq!(receipt["key"], key);
    assert_eq!(receipt["missing"], json!(["reason"]));
    // The mapping's flags, as a vendor payload would raise them: medications listed.
    assert_eq!(
        receipt["flags"],
        json!([
            "medication_reconciliation_needed",
            "more_information_needed"
        ])
    );
    app.wait_for_state(key, "delivered", 30);
    let (_, view) = app.get(&format!("/submissions/{key}"));
    assert_eq!(view["flags"], receipt["flags"], "{view}");
    let observations = count(&ehr, "Observation");
    assert!(observations >= 3, "{}", ehr.counts());
    for kind in ["Patient", "QuestionnaireResponse", "Provenance"] {
        assert_eq!(count(&ehr, kind), 1, "{kind}: {}", ehr.counts());
    }
    let found = ehr.search(
        "QuestionnaireResponse?identifier=https://portal.example-clinic.com/responses|resp-42",
    );
    let stored = &found["entry"][0]["resource"];
    let patient = stored["subject"]["reference"].as_str().unwrap_or_default();
    assert!(patient.starts_with("Patient/"), "{stored}");
    let qr = format!("QuestionnaireResponse/{}", stored["id"].as_str().unwrap());
    let derived = ehr.search(&format!("Observation?derived-from={qr}"));
    assert_eq!(
        derived["entry"].as_array().map(Vec::len),
        Some(observations as usize)
    );
    assert!(derived["entry"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["resource"]["subject"]["reference"] == patient));
    let (status, patients) =
        app.get("/submissions?patient=https://crm.example-clinic.com/patient|pt_fhir_native");
    assert_eq!(status, 200);
    assert_eq!(patients["submissions"][0]["key"], key);

    // Sent again: the same answer, nothing new in the EHR.
    let (status, again, headers) = app.post("/QuestionnaireResponse", &body, &signed(&body));
    assert_eq!((status, &again["key"]), (202, &json!(key)));
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    assert_eq!(count(&ehr, "Observation"), observations);
    assert_eq!(count(&ehr, "QuestionnaireResponse"), 1);

    // The patient adds the reason asked for: a revision, amending the same response.
    let mut amended = response.clone();
    amended["status"] = json!("amended");
    amended["item"] = json!(answering(&q["item"]));
    let amended = amended.to_string().into_bytes();
    let (status, revised, _) = app.post("/QuestionnaireResponse", &amended, &signed(&amended));
    assert_eq!(status, 202, "{revised}");
    assert_eq!(
        (&revised["event"], &revised["revision"], &revised["missing"]),
        (&json!("intake.updated"), &json!(2), &json!([]))
    );
    assert_eq!(
        revised["flags"],
        json!(["medication_reconciliation_needed"])
    );
    let view = app.wait_for_state(key, "delivered", 30);
    assert_eq!(view["revision"], 2, "{view}");
    for kind in ["Patient", "QuestionnaireResponse"] {
        assert_eq!(count(&ehr, kind), 1, "{kind}: {}", ehr.counts());
    }
    assert_eq!(count(&ehr, "Provenance"), 2, "one per revision");
    assert_eq!(count(&ehr, "Observation"), observations);
    let found = ehr.search(
        "QuestionnaireResponse?identifier=https://portal.example-clinic.com/responses|resp-42",
    );
    let stored = &found["entry"][0]["resource"];
    assert_eq!(stored["status"], "amended");
    assert!(stored.to_string().contains("\"reason\""), "{stored}");

    // What cannot be a submission: not a response (422); a Questionnaire not defined here
    // (404); no identifier (422).
    let patient = json!({"resourceType": "Patient"}).to_string().into_bytes();
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &patient, &signed(&patient));
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (422, Some("invalid"))
    );
    let mut other = response.clone();
    other["questionnaire"] = json!("https://example.org/Questionnaire/x|1");
    let other = other.to_string().into_bytes();
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &other, &signed(&other));
    // No mapping defines it: the map it needs is missing.
    assert_eq!(
        (status, outcome["issue"][0]["code"].as_str()),
        (404, Some("not-found"))
    );
    let mut anonymous = response.clone();
    anonymous.as_object_mut().unwrap().remove("identifier");
    let anonymous = anonymous.to_string().into_bytes();
    let (status, outcome, _) = app.post("/QuestionnaireResponse", &anonymous, &signed(&anonymous));
    assert_eq!(status, 422, "{outcome}");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("submission id"));
    // Counted under the mapping whose Questionnaire it answers, once that is known.
    let metrics = app.get_text("/metrics");
    for line in [
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"unauthorized\"} 1",
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"accepted\"} 1",
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"duplicate\"} 1",
        "chartbridge_submissions_total{mapping=\"consult-intake-portal\",outcome=\"rejected\"} 1",
        "chartbridge_submissions_total{outcome=\"rejected\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}
