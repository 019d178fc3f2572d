//! What the gateway does under pressure and damage: logs without payload values, slow
//! clients, SIGTERM and SIGKILL, bad input, a full outbox, a damaged store, retention.

use serde_json::Value;

use super::*;
use crate::common::{self, free_port, App, FhirServer};

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
