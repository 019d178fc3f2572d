//! Sources as they post: Jotform's form bodies, Standard Webhooks replays, Healthie's
//! notifications exchanged for their forms.

use serde_json::Value;

use super::*;
use crate::common::{App, FhirServer};

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
