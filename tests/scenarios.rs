//! The six scenarios of the field note, end to end, one test each: `chartbridge serve` as a
//! process, the real FHIR test server as the EHR (the test plays the provider, writing Tasks,
//! orders and notes there, and the EHR's subscription engine, notifying the gateway), and real
//! HTTP receivers for the CRM and the portal that verify every signature and check every body
//! against its schema. Each test asserts what every system ends up holding: the resources in
//! the EHR, the stages the CRM saw, the statuses the portal saw. Then: the gateway killed
//! between an EHR event and its webhook, the CRM down for a while, and an EHR that is polled.

#[path = "common/mod.rs"]
mod common;
#[path = "common/receiver.rs"]
mod receiver;

use common::{read_json, root, App, FhirServer};
use receiver::WebhookReceiver;
use serde_json::{json, Value};

const EHR_TOKEN: &str = "ehr-events-token";
/// Medplum's subscription secret (its `X-Signature` is a hex HMAC of the body with it).
const MEDPLUM_SECRET: &str = "medplum-subscription-secret";
const CONSULT: &str = "https://forms.example-clinic.com/Questionnaire/consult-intake/submission";
const REFILL: &str = "https://forms.example-clinic.com/Questionnaire/glp1-refill/submission";

/// The clinic's stack: the EHR, the gateway, the CRM and the portal.
struct Clinic {
    ehr: FhirServer,
    app: App,
    crm: WebhookReceiver,
    portal: WebhookReceiver,
    /// Event numbers of the EHR's subscription, as it counts them.
    events: std::cell::Cell<u64>,
}

impl Clinic {
    /// The EHR pushes Backport notifications with a bearer token.
    fn open() -> Clinic {
        Clinic::with_events(&format!(
            "[ehr.events]\nauth = {{ type = \"bearer\", token = \"{EHR_TOKEN}\" }}\n"
        ))
    }

    fn with_events(events: &str) -> Clinic {
        let ehr = FhirServer::start();
        let crm = WebhookReceiver::crm();
        let portal = WebhookReceiver::portal();
        let tables = format!("{}{}\n{events}", crm.table(), portal.table());
        let app = App::start_with_tables(Some(&ehr.url), &tables);
        Clinic {
            ehr,
            app,
            crm,
            portal,
            events: std::cell::Cell::new(0),
        }
    }

    /// The portal's consult intake `id` (the complex one), changed by `edit`, signed as the
    /// portal signs it; its key.
    fn consult(&self, id: &str, edit: impl FnOnce(&mut Value)) -> String {
        let mut body =
            read_json(&root().join("fixtures/consult-intake-portal/complex-intake.input.json"));
        body["submission"]["id"] = json!(id);
        body["patient"]["crm_id"] = json!(format!("pt_{id}"));
        edit(&mut body);
        let raw = body.to_string().into_bytes();
        let ts = unix_now();
        let msg = format!("msg_{id}_{}", self.events.get());
        let signature =
            chartbridge::http::auth::sign_standard_webhooks(common::PORTAL_SECRET, &msg, ts, &raw);
        let (status, receipt, _) = self.app.post(
            "/submissions/consult-intake-portal",
            &raw,
            &[
                ("webhook-id", msg),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", signature),
                ("content-type", "application/json".into()),
            ],
        );
        assert_eq!(status, 202, "{receipt}");
        format!("consult-intake-portal/{id}")
    }

    /// A consult intake charted, with its review Task as the EHR holds it: its key and the Task.
    fn charted_consult(&self, id: &str) -> (String, Value) {
        let key = self.consult(id, |_| {});
        self.app.wait_for_state(&key, "delivered", 30);
        (key, self.review_task(CONSULT, id))
    }

    /// A refill request from the portal; its key.
    fn refill(&self, body: &Value) -> String {
        let (status, receipt, _) = self.app.post(
            "/submissions/refill-request-portal",
            body.to_string().as_bytes(),
            &[
                ("x-api-key", "test-key".into()),
                ("content-type", "application/json".into()),
            ],
        );
        assert_eq!(status, 202, "{receipt}");
        format!(
            "refill-request-portal/{}",
            body["request_id"].as_str().unwrap()
        )
    }

    /// The review Task the gateway asked the EHR for, as the EHR holds it.
    fn review_task(&self, system: &str, id: &str) -> Value {
        let query = chartbridge::fhir::identifier_query(system, &format!("{id}/review"));
        let found = self.ehr.search(&format!("Task?{query}"));
        assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "{found}");
        found["entry"][0]["resource"].clone()
    }

    /// The one resource of `kind` whose identifier is `system|value`.
    fn one(&self, kind: &str, system: &str, value: &str) -> Value {
        let query = chartbridge::fhir::identifier_query(system, value);
        let found = self.ehr.search(&format!("{kind}?{query}"));
        assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "{found}");
        found["entry"][0]["resource"].clone()
    }

    /// The provider changes `resource` in the EHR; what the EHR stored.
    fn provider(&self, resource: &Value, change: impl FnOnce(&mut Value)) -> Value {
        let mut r = resource.clone();
        change(&mut r);
        self.ehr.put(&r)
    }

    /// The provider signs the visit's note in the EHR (its context: the intake's response);
    /// what the EHR stored.
    fn signed_note(&self, task: &Value, qr: &Value) -> Value {
        let (status, note) = self.ehr.post(
            "/DocumentReference",
            &json!({"resourceType": "DocumentReference", "status": "current", "docStatus": "final",
                "subject": task["for"], "context": {"related": [{"reference": reference(qr)}]},
                "content": [{"attachment": {"contentType": "text/plain", "data": "U2lnbmVkIG5vdGU="}}]}),
        );
        assert_eq!(status, 201, "{note}");
        note
    }

    /// The EHR's subscription notifies the gateway of `focus` (R4 Backport): `full` carries the
    /// resource, else only its reference (the gateway reads it). The gateway's answer.
    fn notify(&self, focus: &Value, full: bool) -> (u16, Value) {
        let n = self.events.get() + 1;
        self.events.set(n);
        let body = backport(focus, n, full);
        self.notify_raw(&body)
    }

    fn notify_raw(&self, body: &Value) -> (u16, Value) {
        let (status, answer, _) = self.app.post(
            "/events/ehr",
            body.to_string().as_bytes(),
            &[
                ("authorization", format!("Bearer {EHR_TOKEN}")),
                ("content-type", "application/fhir+json".into()),
            ],
        );
        (status, answer)
    }

    /// Every body both receivers got fits its schema and was signed.
    fn all_signed_and_valid(&self) {
        for r in [&self.crm, &self.portal] {
            assert_eq!(r.invalid(), Vec::<String>::new(), "{}", r.role);
            assert_eq!(r.forged(), 0, "{}", r.role);
        }
    }
}

/// An R4 Backport `event-notification` about `focus` (event number `n`).
fn backport(focus: &Value, n: u64, full: bool) -> Value {
    let reference = format!(
        "{}/{}",
        focus["resourceType"].as_str().unwrap(),
        focus["id"].as_str().unwrap()
    );
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:00000000-0000-4000-8000-{n:012}"),
        "resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/clinic-workflow"}},
            {"name": "topic", "valueCanonical": "http://example.org/SubscriptionTopic/workflow"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": n.to_string()},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": n.to_string()},
                {"name": "focus", "valueReference": {"reference": reference}}]}]}})];
    if full {
        entries.push(
            json!({"fullUrl": format!("https://ehr.example/fhir/{reference}"), "resource": focus}),
        );
    }
    json!({"resourceType": "Bundle", "type": "history", "timestamp": "2026-12-01T10:00:00Z", "entry": entries})
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `Type/id` of a resource.
fn reference(r: &Value) -> String {
    format!(
        "{}/{}",
        r["resourceType"].as_str().unwrap(),
        r["id"].as_str().unwrap()
    )
}

fn texts(items: &Value) -> Vec<(String, String)> {
    items
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            (
                q["link_id"].as_str().unwrap_or("").to_string(),
                q["text"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Scenario 1: a complex intake (repeating groups, units, coded answers, blood pressure
/// components) reaches the chart with a review Task; the CRM learns it is ready for review and
/// charted (with the EHR's references, never an answer), the portal that it was received.
#[test]
fn initial_consult_with_complex_intake() {
    let clinic = Clinic::open();
    let key = clinic.consult("ci_s1", |_| {});
    let charted = clinic.crm.wait_for_kind("intake.charted");
    clinic.portal.wait_for(1);

    // The EHR: the response, its Observations (blood pressure as one with two components) and
    // the provider's work item, focused on the response.
    let qr = clinic.one("QuestionnaireResponse", CONSULT, "ci_s1");
    let bp = clinic
        .ehr
        .search("Observation?code=http://loinc.org|85354-9");
    assert_eq!(
        bp["entry"][0]["resource"]["component"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    let task = clinic.review_task(CONSULT, "ci_s1");
    assert_eq!(task["focus"]["reference"], reference(&qr));
    assert_eq!(
        task["businessStatus"]["coding"][0]["code"],
        "ready-for-review"
    );
    assert_eq!(task["status"], "requested");

    // The CRM: its stage, then the references of what was charted.
    assert_eq!(clinic.crm.kinds(), ["intake.submitted", "intake.charted"]);
    assert_eq!(clinic.crm.states(), ["ready_for_review"]);
    let refs: Vec<&str> = charted.data()["ehr"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["reference"].as_str())
        .collect();
    assert!(refs.contains(&reference(&qr).as_str()), "{refs:?}");
    assert!(refs.contains(&reference(&task).as_str()), "{refs:?}");
    assert_eq!(charted.data()["submission"]["key"], key);
    // Never an answer's value: not the reason, a medication, the blood pressure.
    for e in clinic.crm.events() {
        let text = e.body.to_string();
        for value in ["Gewichtsmanagement", "Metformin", "142/91", "Zoë"] {
            assert!(!text.contains(value), "the CRM was sent `{value}`: {text}");
        }
    }
    // The portal: received, nothing else.
    assert_eq!(clinic.portal.kinds(), ["intake.submitted"]);
    assert_eq!(clinic.portal.states(), ["received"]);
    clinic.all_signed_and_valid();
}

/// Scenario 2: an intake arrives without a required answer (the weight): the CRM and the portal
/// are asked for it, with the question's text. The patient sends it: the revision amends the
/// response in the EHR (one response, a new version, one Task), and the stage goes back to
/// ready for review. The provider signs the note: the chart is complete.
#[test]
fn note_revision_after_more_information() {
    let clinic = Clinic::open();
    let key = clinic.consult("ci_s2", |b| {
        b["vitals"].as_object_mut().unwrap().remove("weight_lb");
    });
    let asked = clinic.portal.wait_for(1).remove(0);
    assert_eq!(asked.kind, "intake.needs_information");
    assert!(texts(&asked.data()["questions"]).contains(&("weight".into(), "Weight".into())));
    let crm_asked = clinic.crm.wait_for(1).remove(0);
    assert!(texts(&crm_asked.data()["missing"]).contains(&("weight".into(), "Weight".into())));
    clinic.app.wait_for_state(&key, "delivered", 30);
    clinic.crm.wait_for(2);

    let revised = clinic.consult("ci_s2", |_| {});
    assert_eq!(revised, key);
    clinic.portal.wait_for(2);
    clinic.app.wait_for_state(&key, "delivered", 30);
    clinic.crm.wait_for(4);

    let qr = clinic.one("QuestionnaireResponse", CONSULT, "ci_s2");
    assert_eq!(qr["status"], "amended");
    assert_eq!(
        qr["meta"]["versionId"].as_str().map(|v| v.is_empty()),
        Some(false)
    );
    let weight = clinic
        .ehr
        .search("Observation?code=http://loinc.org|29463-7");
    assert_eq!(
        weight["entry"].as_array().map(Vec::len),
        Some(1),
        "the weight, charted once"
    );
    let task = clinic.review_task(CONSULT, "ci_s2");

    let note = clinic.signed_note(&task, &qr);
    let (status, answer) = clinic.notify(&note, true);
    assert_eq!(
        (status, answer["events"][0]["outcome"].as_str()),
        (200, Some("queued")),
        "{answer}"
    );
    clinic.portal.wait_for(3);
    clinic.crm.wait_for(5);

    assert_eq!(
        clinic.crm.kinds(),
        [
            "intake.needs_information",
            "intake.charted",
            "intake.updated",
            "intake.charted",
            "note.signed"
        ]
    );
    assert_eq!(
        clinic.crm.states(),
        ["needs_information", "ready_for_review", "chart_complete"]
    );
    assert_eq!(
        clinic.portal.states(),
        ["action_needed", "received", "visit_complete"]
    );
    clinic.all_signed_and_valid();
}

/// Scenario 3: the provider finds the patient ineligible (the Task's business status, in the
/// EHR's own code system); the EHR notifies id-only, the gateway reads the Task with the
/// delivery's auth, and the CRM's stage and the portal's status follow. The same notification
/// again sends nothing twice.
#[test]
fn denied_or_ineligible_path() {
    let clinic = Clinic::open();
    let (_, task) = clinic.charted_consult("ci_s3");
    let decided = clinic.provider(&task, |t| {
        t["status"] = json!("completed");
        t["businessStatus"] = json!({"coding": [{"system": "https://ehr.example-clinic.com/review", "code": "ineligible"}]});
    });
    let (status, answer) = clinic.notify(&decided, false);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["events"][0]["outcome"], "queued");
    assert_eq!(answer["events"][0]["rule"], "decision-denied");
    let again = clinic.notify_raw(&backport(&decided, clinic.events.get(), false));
    assert_eq!(again.1["events"][0]["outcome"], "duplicate");

    clinic.portal.wait_for(2);
    clinic.crm.wait_for(3);
    assert_eq!(clinic.crm.states(), ["ready_for_review", "denied"]);
    assert_eq!(clinic.portal.states(), ["received", "not_eligible"]);
    let decision = clinic.crm.wait_for_kind("decision.made");
    assert_eq!(decision.data()["source"]["reference"], reference(&task));
    // The decision stays the EHR's: nothing of the gateway's wrote it back.
    let held = clinic.review_task(CONSULT, "ci_s3");
    assert_eq!(held["businessStatus"]["coding"][0]["code"], "ineligible");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(clinic.portal.events().len(), 2, "nothing sent twice");
    clinic.all_signed_and_valid();
}

/// Scenario 4: a refill request with inputs missing is charted as far as it goes, and the CRM
/// and the portal get what is missing, by question (the portal never gets the flags); once the
/// patient completes it, it is ready for review. A complete one is a refill request at once.
#[test]
fn refill_request_with_missing_inputs() {
    let clinic = Clinic::open();
    let mut body =
        read_json(&root().join("fixtures/refill-request-portal/missing-inputs.input.json"));
    let key = clinic.refill(&body);
    let portal = clinic.portal.wait_for(1).remove(0);
    let crm = clinic.crm.wait_for(1).remove(0);
    assert_eq!(crm.kind, "intake.needs_information");
    assert_eq!(crm.data()["stage"], "needs_information");
    let missing = texts(&crm.data()["missing"]);
    assert!(!missing.is_empty());
    assert!(
        missing.iter().all(|(_, text)| !text.is_empty()),
        "{missing:?}"
    );
    assert!(crm.data()["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "more_information_needed"));
    assert_eq!(portal.data()["status"], "action_needed");
    assert_eq!(texts(&portal.data()["questions"]), missing);
    assert!(portal.data().get("flags").is_none());
    clinic.app.wait_for_state(&key, "delivered", 30);
    clinic.review_task(REFILL, "rf_2025_11_28_0007");

    // The patient completes it (the same request).
    let complete = read_json(&root().join("fixtures/refill-request-portal/complete.input.json"));
    for field in [
        "medication",
        "weight",
        "wants_dose_change",
        "pharmacy",
        "side_effects",
    ] {
        body[field] = complete[field].clone();
    }
    clinic.refill(&body);
    clinic.portal.wait_for(2);
    assert_eq!(clinic.portal.states(), ["action_needed", "received"]);

    // Another patient's complete request.
    let other = clinic.refill(&complete);
    clinic.app.wait_for_state(&other, "delivered", 30);
    clinic.crm.wait_for(5);
    let refill = clinic.crm.wait_for_kind("refill.requested");
    assert_eq!(refill.data()["stage"], "refill_requested");
    assert_eq!(refill.data()["submission"]["key"], other);
    let stages: Vec<String> = clinic
        .crm
        .events()
        .iter()
        .filter(|e| e.data()["submission"]["key"] == key)
        .filter_map(|e| e.data()["stage"].as_str().map(str::to_string))
        .collect();
    assert_eq!(stages, ["needs_information", "ready_for_review"]);
    clinic.all_signed_and_valid();
}

/// Scenario 5: the provider's decision reaches the CRM with no note reading. The EHR is Medplum:
/// its rest-hook posts the bare Task, signed with a hex HMAC in `X-Signature`. The Task's note
/// says something else than its business status: only the business status counts.
#[test]
fn provider_decision_reflected_in_the_crm() {
    let clinic = Clinic::with_events(&format!(
        "[ehr.events]\nauth = {{ type = \"hmac\", header = \"x-signature\", encoding = \"hex\", secret = \"{MEDPLUM_SECRET}\" }}\n"
    ));
    let rest_hook = |resource: &Value, secret: &str| {
        let body = resource.to_string().into_bytes();
        let signature = chartbridge::http::auth::sign(
            secret,
            &body,
            chartbridge::config::SignatureEncoding::Hex,
        );
        clinic.app.post(
            "/events/ehr",
            &body,
            &[
                ("x-signature", signature),
                ("x-medplum-interaction", "update".into()),
                ("content-type", "application/fhir+json".into()),
            ],
        )
    };
    let (_, task) = clinic.charted_consult("ci_s5");

    let taken = clinic.provider(&task, |t| {
        t["status"] = json!("in-progress");
        t["owner"] = json!({"reference": "Practitioner/dr-okafor"});
    });
    let (status, answer, _) = rest_hook(&taken, MEDPLUM_SECRET);
    assert_eq!(
        (status, answer["events"][0]["outcome"].as_str()),
        (200, Some("queued")),
        "{answer}"
    );
    let (forged, _, _) = rest_hook(&taken, "not-the-secret");
    assert_eq!(forged, 401);

    let approved = clinic.provider(&taken, |t| {
        t["status"] = json!("completed");
        t["businessStatus"] = json!({"text": "Approved"});
        t["note"] = json!([{"text": "Denied at first; see the chart"}]);
    });
    let (status, answer, _) = rest_hook(&approved, MEDPLUM_SECRET);
    assert_eq!(
        (status, answer["events"][0]["rule"].as_str()),
        (200, Some("decision-approved")),
        "{answer}"
    );
    let (_, again, _) = rest_hook(&approved, MEDPLUM_SECRET);
    assert_eq!(again["events"][0]["outcome"], "duplicate");
    // Medplum posts every update: one that changes no stage sends nothing.
    let annotated = clinic.provider(&approved, |t| {
        t["note"] = json!([{"text": "Patient called back"}]);
    });
    let (_, unchanged, _) = rest_hook(&annotated, MEDPLUM_SECRET);
    assert_eq!(
        unchanged["events"][0]["outcome"], "unchanged",
        "{unchanged}"
    );

    clinic.crm.wait_for(4);
    assert_eq!(
        clinic.crm.states(),
        ["ready_for_review", "in_review", "approved"]
    );
    assert_eq!(
        clinic.crm.kinds(),
        [
            "intake.submitted",
            "intake.charted",
            "provider.assigned",
            "decision.made"
        ]
    );
    clinic.portal.wait_for(3);
    assert_eq!(
        clinic.portal.states(),
        ["received", "under_review", "approved"]
    );
    clinic.all_signed_and_valid();
}

/// Scenario 6: after the decision, the order and the signed note, the patient sees the visit
/// complete: the portal's statuses follow the EHR, each once, and nothing clinical reaches it.
#[test]
fn patient_visible_status_after_chart_completion() {
    let clinic = Clinic::open();
    let (_, task) = clinic.charted_consult("ci_s6");
    let qr = clinic.one("QuestionnaireResponse", CONSULT, "ci_s6");

    let approved = clinic.provider(&task, |t| {
        t["status"] = json!("completed");
        t["businessStatus"] = json!({"coding": [{"code": "approved"}]});
    });
    assert_eq!(clinic.notify(&approved, true).0, 200);
    let (status, order) = clinic.ehr.post(
        "/MedicationRequest",
        &json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"text": "semaglutide 0.25 mg weekly"},
            "subject": task["for"], "basedOn": [{"reference": reference(&task)}]}),
    );
    assert_eq!(status, 201, "{order}");
    assert_eq!(clinic.notify(&order, true).0, 200);
    let note = clinic.signed_note(&task, &qr);
    assert_eq!(clinic.notify(&note, false).0, 200);

    clinic.portal.wait_for(4);
    assert_eq!(
        clinic.portal.states(),
        [
            "received",
            "approved",
            "prescription_sent",
            "visit_complete"
        ]
    );
    clinic.crm.wait_for(5);
    assert_eq!(
        clinic.crm.states(),
        [
            "ready_for_review",
            "approved",
            "prescription_sent",
            "chart_complete"
        ]
    );
    for e in clinic.portal.events() {
        let text = e.body.to_string();
        assert!(
            !text.contains("semaglutide") && !text.contains("flags"),
            "{text}"
        );
    }
    // The EHR holds what its provider wrote; the gateway wrote none of it.
    let counts = clinic.ehr.counts();
    assert_eq!(counts["MedicationRequest"], 1, "{counts}");
    assert_eq!(counts["DocumentReference"], 1, "{counts}");
    clinic.all_signed_and_valid();
}

/// The gateway is SIGKILLed after it took an EHR event and before the CRM could be sent it (the
/// CRM is down): after a restart, the CRM gets it once, in its submission's order.
#[test]
fn gateway_killed_between_an_ehr_event_and_its_webhook() {
    let mut clinic = Clinic::open();
    clinic.crm.set_down(true);
    let (_, task) = clinic.charted_consult("ci_k1");
    let approved = clinic.provider(&task, |t| {
        t["status"] = json!("completed");
        t["businessStatus"] = json!({"text": "approved"});
    });
    let (status, answer) = clinic.notify(&approved, true);
    assert_eq!(
        (status, answer["events"][0]["outcome"].as_str()),
        (200, Some("queued"))
    );
    clinic.app.kill();
    assert!(clinic.crm.events().is_empty());
    clinic.crm.set_down(false);
    clinic.app.restart();

    let events = clinic.crm.wait_for(3);
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["intake.submitted", "intake.charted", "decision.made"]
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    for e in &events {
        assert_eq!(
            clinic.crm.deliveries_of(&e.id),
            1,
            "{} arrived more than once",
            e.kind
        );
    }
    assert_eq!(clinic.crm.states(), ["ready_for_review", "approved"]);
    clinic.all_signed_and_valid();
}

/// The CRM is down for a while: its events wait in the outbox (retried with backoff, nothing
/// lost) while the portal gets its own; once the CRM is back, each arrives once, in order.
#[test]
fn crm_down_for_a_while() {
    let clinic = Clinic::open();
    clinic.crm.set_down(true);
    let key = clinic.consult("ci_d1", |_| {});
    clinic.app.wait_for_state(&key, "delivered", 30);
    clinic.portal.wait_for(1);
    clinic.app.wait_for_metrics(&[]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(clinic.crm.events().is_empty());
    let metrics = clinic.app.get_text("/metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("chartbridge_events_sent_total{receiver=\"crm\",outcome=\"retried\"}")),
        "{metrics}"
    );
    clinic.crm.set_down(false);
    let events = clinic.crm.wait_for(2);
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["intake.submitted", "intake.charted"]
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(clinic.crm.accepted(), 2, "each once");
    clinic
        .app
        .wait_for_metrics(&["chartbridge_events_waiting{receiver=\"crm\"} 0"]);
    clinic.all_signed_and_valid();
}

/// An EHR that cannot push: the gateway searches it for what changed (`_lastUpdated` since its
/// cursor) and the decision reaches the CRM all the same; a restart goes on from the cursor
/// without sending anything twice.
#[test]
fn an_ehr_that_cannot_push_is_polled() {
    let mut clinic = Clinic::with_events(&format!(
        "[ehr.events]\nauth = {{ type = \"bearer\", token = \"{EHR_TOKEN}\" }}\npoll_interval_ms = 200\n"
    ));
    let (_, task) = clinic.charted_consult("ci_p1");
    clinic.provider(&task, |t| {
        t["status"] = json!("completed");
        t["businessStatus"] = json!({"text": "approved"});
    });
    clinic.crm.wait_for_kind("decision.made");
    clinic.app.terminate();
    clinic.app.restart();
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(clinic.crm.states(), ["ready_for_review", "approved"]);
    assert_eq!(clinic.portal.states(), ["received", "approved"]);
    clinic.all_signed_and_valid();
}
