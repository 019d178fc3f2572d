//! Events in, when they are wrong: unknown senders and shapes, forged credentials, a sender
//! posting what it does not own, a notification of 10,000 events, events about nothing the
//! gateway delivered. Each gets a clear 4xx or is kept as unmatched; nothing is half-taken,
//! nothing is sent anywhere, nothing of a patient is logged or listed.

use serde_json::{json, Value};

use super::common::{front, root, App, FhirServer};
use super::receiver::WebhookReceiver;

const TOKEN: &str = "ehr-token";
const PORTAL_TOKEN: &str = "portal-token";

fn post(app: &App, sender: &str, token: &str, body: &[u8]) -> (u16, Value) {
    let (status, answer, _) = app.post(
        &format!("/events/{sender}"),
        body,
        &[
            ("authorization", format!("Bearer {token}")),
            ("content-type", "application/fhir+json".into()),
        ],
    );
    (status, answer)
}

fn diagnostics(outcome: &Value) -> String {
    outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A Backport notification of `events` events, each about `Task/t<n>`.
fn notification(events: usize) -> Value {
    let mut parameters = vec![json!({"name": "type", "valueCode": "event-notification"})];
    parameters.extend((0..events).map(|n| {
        json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": n.to_string()},
            {"name": "focus", "valueReference": {"reference": format!("Task/t{n}")}}]})
    }));
    json!({"resourceType": "Bundle", "type": "history",
        "entry": [{"resource": {"resourceType": "Parameters", "parameter": parameters}}]})
}

fn app_with_events(ehr: &FhirServer, crm: &WebhookReceiver) -> App {
    App::start_with_tables(
        Some(&ehr.url),
        &format!(
            "{}\n[ehr.events]\nauth = {{ type = \"bearer\", token = \"{TOKEN}\" }}\n\n[events.portal]\ntype = \"bearer\"\ntoken = \"{PORTAL_TOKEN}\"\n",
            crm.table()
        ),
    )
}

#[test]
fn events_from_an_unconfigured_sender_or_with_wrong_credentials_are_refused() {
    let ehr = FhirServer::start();
    let plain = App::start(Some(&ehr.url));
    let (status, outcome) = post(&plain, "ehr", TOKEN, b"{}");
    assert_eq!(status, 404);
    assert!(diagnostics(&outcome).contains("[ehr.events]"), "{outcome}");

    let crm = WebhookReceiver::crm();
    let app = app_with_events(&ehr, &crm);
    assert_eq!(post(&app, "pharmacy", TOKEN, b"{}").0, 404);
    let (status, outcome) = post(&app, "ehr", "forged", b"{}");
    assert_eq!(status, 401);
    assert_eq!(outcome["issue"][0]["code"], "security");
    assert_eq!(
        post(&app, "ehr", PORTAL_TOKEN, b"{}").0,
        401,
        "the portal's token is not the EHR's"
    );
    let (status, _, _) = app.post("/events/ehr", b"{}", &[]);
    assert_eq!(status, 401, "the operators' key is not the EHR's token");
    app.wait_for_metrics(&[
        "chartbridge_inbound_events_total{sender=\"ehr\",outcome=\"unauthorized\"} 3",
    ]);
}

#[test]
fn what_is_not_a_notification_is_answered_with_what_and_where() {
    let ehr = FhirServer::start();
    let crm = WebhookReceiver::crm();
    let app = app_with_events(&ehr, &crm);
    let cases: [(&[u8], u16, &str); 5] = [
        (b"{not json", 400, "not JSON"),
        (br#"{"resourceType": "Bundle", "type": "transaction", "entry": []}"#, 422, "type `transaction`"),
        (br#"{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]}"#, 422, "first entry"),
        (br#"{"resourceType": "Task", "status": "completed"}"#, 422, "no `id`"),
        (br#"[1, 2]"#, 422, "not a FHIR resource"),
    ];
    for (body, status, says) in cases {
        let (got, outcome) = post(&app, "ehr", TOKEN, body);
        assert_eq!(got, status, "{}: {outcome}", String::from_utf8_lossy(body));
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert!(diagnostics(&outcome).contains(says), "{outcome}");
    }
    // Too many events: refused whole, before any is read or taken — past the body limit, or
    // within it and past 100 events.
    let (status, outcome) = post(
        &app,
        "ehr",
        TOKEN,
        notification(10_000).to_string().as_bytes(),
    );
    assert_eq!(status, 413, "{outcome}");
    let (status, outcome) = post(&app, "ehr", TOKEN, notification(150).to_string().as_bytes());
    assert_eq!(status, 413, "{outcome}");
    assert!(diagnostics(&outcome).contains("at most 100"), "{outcome}");
    assert_eq!(app.get("/events/unmatched").1["total"], 0);
    // Handshakes and heartbeats are answered and recorded, nothing more.
    for file in [
        "Bundle-r4-notification-handshake.json",
        "Bundle-r4-notification-heartbeat.json",
    ] {
        let body = std::fs::read(root().join("tests/fixtures/notifications").join(file)).unwrap();
        let (status, answer) = post(&app, "ehr", TOKEN, &body);
        assert_eq!(
            (status, answer["events"].clone()),
            (200, json!([])),
            "{file}"
        );
    }
    app.wait_for_metrics(&[
        "chartbridge_inbound_events_total{sender=\"ehr\",outcome=\"status\"} 2",
    ]);
    assert!(crm.events().is_empty());
}

/// A decision posted with the portal's credentials is the EHR's data: 403, and nothing of the
/// notification is taken — not even its events that were the portal's to send.
#[test]
fn a_sender_posting_what_it_does_not_own_is_refused_and_nothing_is_taken() {
    let ehr = FhirServer::start();
    let crm = WebhookReceiver::crm();
    let app = app_with_events(&ehr, &crm);
    let decision = json!({"resourceType": "Task", "id": "t1", "meta": {"versionId": "2"},
        "status": "completed", "intent": "order", "businessStatus": {"text": "approved"}});
    let (status, outcome) = post(
        &app,
        "portal",
        PORTAL_TOKEN,
        decision.to_string().as_bytes(),
    );
    assert_eq!(status, 403, "{outcome}");
    assert_eq!(outcome["issue"][0]["code"], "forbidden");
    assert!(diagnostics(&outcome).contains("ehr-owned"), "{outcome}");
    // The same from the EHR is taken (and, about nothing delivered, kept as unmatched).
    let (status, answer) = post(&app, "ehr", TOKEN, decision.to_string().as_bytes());
    assert_eq!(
        (status, answer["events"][0]["outcome"].as_str()),
        (200, Some("unmatched")),
        "{answer}"
    );
    app.wait_for_metrics(&[
        "chartbridge_inbound_events_total{sender=\"portal\",outcome=\"refused\"} 1",
    ]);
    assert!(crm.events().is_empty());
}

/// Events that resolve to no submission are kept for operators (what they were about and why,
/// never a patient's data), listed newest first, counted; never sent anywhere. A patient with
/// two submissions is not a guess at one of them.
#[test]
fn events_about_nothing_delivered_are_kept_as_unmatched() {
    let ehr = FhirServer::start();
    let crm = WebhookReceiver::crm();
    let app = app_with_events(&ehr, &crm);
    let orphan = json!({"resourceType": "Task", "id": "orphan", "meta": {"versionId": "1"},
        "status": "completed", "intent": "order", "businessStatus": {"text": "denied"},
        "for": {"reference": "Patient/nobody", "display": "Jane Roe"}});
    let (status, answer) = post(&app, "ehr", TOKEN, orphan.to_string().as_bytes());
    assert_eq!(
        (status, answer["events"][0]["outcome"].as_str()),
        (200, Some("unmatched")),
        "{answer}"
    );

    // Two submissions of one patient, delivered; an order naming only the patient.
    for id in ["rf_a", "rf_b"] {
        let mut body = super::common::read_json(
            &root().join("fixtures/refill-request-portal/complete.input.json"),
        );
        body["request_id"] = json!(id);
        let (status, _, _) = app.post(
            "/submissions/refill-request-portal",
            body.to_string().as_bytes(),
            &[("x-api-key", "test-key".into())],
        );
        assert_eq!(status, 202);
        app.wait_for_state(&format!("refill-request-portal/{id}"), "delivered", 30);
    }
    let patient = ehr.search("Patient")["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let order = json!({"resourceType": "MedicationRequest", "id": "mr1", "meta": {"versionId": "1"},
        "status": "active", "intent": "order", "medicationCodeableConcept": {"text": "semaglutide"},
        "subject": {"reference": format!("Patient/{patient}")}});
    let (_, answer) = post(&app, "ehr", TOKEN, order.to_string().as_bytes());
    assert_eq!(answer["events"][0]["outcome"], "unmatched", "{answer}");
    // An `empty` notification names nothing: kept too.
    let empty = std::fs::read(
        root().join("tests/fixtures/notifications/Bundle-r4-notification-empty.json"),
    )
    .unwrap();
    let (_, answer) = post(&app, "ehr", TOKEN, &empty);
    assert_eq!(answer["events"][0]["outcome"], "unmatched", "{answer}");

    let (status, listed) = app.get("/events/unmatched?limit=2");
    assert_eq!(status, 200);
    assert_eq!(listed["total"], 3);
    let kept = listed["unmatched"].as_array().unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0]["resource"], "(none named)");
    assert!(
        kept[1]["why"]
            .as_str()
            .unwrap()
            .contains("its patient has 2 submissions"),
        "{listed}"
    );
    let (_, rest) = app.get(&format!(
        "/events/unmatched?before={}",
        listed["next"].as_str().unwrap()
    ));
    assert_eq!(rest["unmatched"][0]["resource"], "Task/orphan/_history/1");
    assert!(!rest.to_string().contains("Jane Roe"), "{rest}");
    assert_eq!(app.get("/events/unmatched?before=zz").0, 400);
    // Operators only.
    let (status, _, _) = app.post("/events/unmatched", b"", &[]);
    assert_eq!(status, 405);
    app.wait_for_metrics(&["chartbridge_events_unmatched 3"]);
    // Only the intake's own events reached the CRM.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        crm.kinds()
            .iter()
            .all(|k| k.starts_with("intake.") || k.starts_with("refill.")),
        "{:?}",
        crm.kinds()
    );
}

/// An id-only event whose resource the EHR cannot give: 502, nothing taken, so the EHR's retry
/// is taken in full later.
#[test]
fn an_id_only_event_the_ehr_cannot_answer_is_not_taken() {
    let ehr = FhirServer::start();
    let crm = WebhookReceiver::crm();
    let app = app_with_events(&ehr, &crm);
    let (status, outcome) = post(&app, "ehr", TOKEN, notification(1).to_string().as_bytes());
    assert_eq!(status, 502, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("Task/t0 could not be read"),
        "{outcome}"
    );
    assert_eq!(app.get("/events/unmatched").1["total"], 0);
}

/// An EHR that rejects the submission: the CRM learns it failed (an ops problem), the portal
/// nothing. A CRM that refuses its events (a 4xx) gets them dead-lettered — listed in the
/// submission's status — and, once it is fixed, a replay sends each once, in order.
#[test]
fn a_refused_event_is_dead_lettered_and_a_replay_sends_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refusing_ehr = front(&runtime, |_, _, _, _, _| async {
        let outcome = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"Task.owner is required here"}]}"#;
        (422, axum::http::HeaderMap::new(), outcome.to_string())
    });
    let crm = WebhookReceiver::crm();
    let portal = WebhookReceiver::portal();
    crm.set_refusing(true);
    let app = App::start_with_tables(
        Some(&refusing_ehr),
        &format!("{}{}", crm.table(), portal.table()),
    );
    let mut body = super::common::read_json(
        &root().join("fixtures/refill-request-portal/complete.input.json"),
    );
    body["request_id"] = json!("rf_refused");
    let (status, _, _) = app.post(
        "/submissions/refill-request-portal",
        body.to_string().as_bytes(),
        &[("x-api-key", "test-key".into())],
    );
    assert_eq!(status, 202);
    let key = "refill-request-portal/rf_refused";
    app.wait_for_state(key, "dead-lettered", 30);
    // Both CRM events dead-lettered, each at its first refusal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let view = loop {
        let (_, view) = app.get(&format!("/submissions/{key}"));
        let crm_events: Vec<&Value> = view["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["receiver"] == "crm")
            .collect();
        if crm_events.len() == 2 && crm_events.iter().all(|e| e["state"] == "dead-lettered") {
            break view;
        }
        assert!(std::time::Instant::now() < deadline, "{view}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let kinds: Vec<&str> = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["receiver"] == "crm")
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["refill.requested", "intake.failed"]);
    assert!(
        view.to_string()
            .contains("HTTP 422: the receiver refused the event"),
        "{view}"
    );
    assert_eq!(portal.wait_for(1)[0].kind, "refill.requested");
    app.wait_for_metrics(&["chartbridge_events_dead_lettered{receiver=\"crm\"} 2"]);

    crm.set_refusing(false);
    let (status, replayed, _) = app.post("/dead-letters/replay?receiver=crm", b"", &[]);
    assert_eq!(status, 202, "{replayed}");
    let events = crm.wait_for(2);
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["refill.requested", "intake.failed"]
    );
    assert!(
        events[1].data()["failure"]
            .as_str()
            .unwrap()
            .contains("HTTP 422"),
        "{:?}",
        events[1].body
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(crm.accepted(), 2, "each once");
    assert_eq!(
        portal.events().len(),
        1,
        "the failure is not the patient's business"
    );
    assert!(
        crm.invalid().is_empty() && portal.invalid().is_empty(),
        "{:?}",
        crm.invalid()
    );
    app.wait_for_metrics(&["chartbridge_events_dead_lettered{receiver=\"crm\"} 0"]);
}
