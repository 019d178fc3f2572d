//! Delivery to the real FHIR server: a submission reaches the EHR with its identifiers and
//! provenance, once; revisions amend; an EHR that is down, strict, throttling, redirecting or
//! answering without bodies; dead letters and their replay.

use serde_json::Value;

use super::*;
use crate::common::{self, forward, free_port, front, App, FhirServer};

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
