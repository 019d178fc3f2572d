//! What must never reach the chart or wedge a source, end to end: hostile submission ids,
//! posts that are only a step of a form, sources that only notify, and ingest nobody signs.

use serde_json::{json, Value};

use crate::common::{root, App};

/// The portal's catch-all source: an API key.
fn api_key() -> Vec<(&'static str, String)> {
    vec![
        ("x-api-key", "test-key".to_string()),
        ("content-type", "application/json".to_string()),
    ]
}

fn refill_with_id(id: &str) -> Vec<u8> {
    let mut p: Value = serde_json::from_slice(&super::fixture(
        "fixtures/refill-request-portal/complete.input.json",
    ))
    .unwrap();
    p["request_id"] = json!(id);
    p.to_string().into_bytes()
}

/// An id with a control character, or too long to echo, is a 422 OperationOutcome and is
/// stored nowhere (a retry gets the same 422, never a 500); an id with `/` or `..` in it is
/// taken and its status URL keeps it in one path segment.
#[test]
fn hostile_submission_ids_are_refused_or_kept_in_their_segment() {
    let app = App::start(None);
    let path = "/submissions/refill-request-portal";
    for (id, why) in [
        ("rf\u{0}1", "control character"),
        ("rf\r\nX-Injected: 1", "control character"),
        (&"r".repeat(5_000), "5000 bytes long; at most 256"),
        ("..", "`.` or `..`"),
    ] {
        for _retry in 0..2 {
            let (status, oo, _) = app.post(path, &refill_with_id(id), &api_key());
            assert_eq!(status, 422, "{oo}");
            assert_eq!(oo["resourceType"], "OperationOutcome");
            let issue = &oo["issue"][0];
            assert!(issue["diagnostics"].as_str().unwrap().contains(why), "{oo}");
            assert_eq!(issue["expression"][0], "$.request_id");
        }
    }
    let metrics = app.get_text("/metrics");
    assert!(metrics.contains("chartbridge_outbox_depth 0"), "{metrics}");

    let (status, receipt, headers) = app.post(path, &refill_with_id("../../x?y#z"), &api_key());
    assert_eq!(status, 202, "{receipt}");
    let status_url = "/submissions/refill-request-portal/..%2F..%2Fx%3Fy%23z";
    assert_eq!(receipt["status_url"], status_url);
    assert_eq!(headers["location"], status_url);
    let (status, view) = app.get(status_url);
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["submission_id"], "../../x?y#z");
}

/// A multi-step form's steps are answered 200 `ignored` (the tool stops retrying), counted,
/// and stored nowhere; the final post is a submission.
#[test]
fn steps_of_a_multi_step_form_are_ignored_and_the_final_post_taken() {
    let app = App::start(None);
    let path = "/submissions/weight-checkin-portal";
    let step = super::fixture("fixtures/weight-checkin-portal/step-not-final.input.json");
    for _ in 0..2 {
        let (status, body, _) = app.post(path, &step, &api_key());
        assert_eq!(status, 200, "{body}");
        assert!(
            body["ignored"].as_str().unwrap().contains("accept_when"),
            "{body}"
        );
    }
    assert_eq!(
        app.get("/submissions/weight-checkin-portal/chk_20260302_77aa")
            .0,
        404
    );
    let last = super::fixture("fixtures/weight-checkin-portal/final-feet-and-pounds.input.json");
    let (status, receipt, _) = app.post(path, &last, &api_key());
    assert_eq!(status, 202, "{receipt}");
    app.wait_for_metrics(&[
        "chartbridge_submissions_total{mapping=\"weight-checkin-portal\",outcome=\"ignored\"} 2",
        "chartbridge_submissions_total{mapping=\"weight-checkin-portal\",outcome=\"accepted\"} 1",
        "chartbridge_outbox_depth 1",
    ]);
}

/// A vendor's forms API as the generic fetch meets it: an OAuth 2.0 token endpoint (client
/// credentials, HTTP Basic) and `GET /v1/responses/{id}` that takes only the newest token,
/// answering the recorded check-in for its id, 404 for any other, 503 while `down`.
struct FormsApi {
    url: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Tokens issued; revoking bumps it, so the gateway's cached token stops working.
    issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

const CLIENT: &str = "chartbridge-client";
const CLIENT_SECRET: &str = "s3cret";
const RESPONSE_ID: &str = "chk_20260302_8f2a";

impl FormsApi {
    fn start() -> FormsApi {
        use axum::extract::Path;
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use base64::Engine;
        use std::sync::atomic::Ordering;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let recorded =
            super::fixture("fixtures/weight-checkin-portal/final-feet-and-pounds.input.json");
        let (d, i1, i2, g) = (down.clone(), issued.clone(), issued.clone(), gets.clone());
        let url = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let token = move |headers: HeaderMap, body: String| async move {
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("{CLIENT}:{CLIENT_SECRET}"));
                let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some(&format!("Basic {basic}"));
                if !authorized || !body.contains("grant_type=client_credentials") {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                let n = i1.fetch_add(1, Ordering::SeqCst) + 1;
                axum::Json(json!({"access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": 3600}))
                    .into_response()
            };
            let response = move |Path(id): Path<String>, headers: HeaderMap| async move {
                g.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                let newest = format!("Bearer tok-{}", i2.load(Ordering::SeqCst));
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&newest) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                if id != RESPONSE_ID {
                    return StatusCode::NOT_FOUND.into_response();
                }
                ([("content-type", "application/json")], recorded.clone()).into_response()
            };
            let app = axum::Router::new()
                .route("/oauth/token", axum::routing::post(token))
                .route("/v1/responses/{id}", axum::routing::get(response));
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        });
        FormsApi {
            url,
            down,
            issued,
            gets,
            _runtime: runtime,
        }
    }

    fn table(&self) -> String {
        format!(
            "\n[fetch.weight-checkin-portal]\ntype = \"http\"\nurl = \"{0}/v1/responses/{{id}}\"\nid = \"$.data.response_id\"\ntimeout_ms = 5000\n\
             auth = {{ type = \"oauth2_client_credentials\", token_url = \"{0}/oauth/token\", client_id = \"{CLIENT}\", client_secret = \"{CLIENT_SECRET}\" }}\n",
            self.url
        )
    }
}

/// A source that only notifies: the gateway takes the id from the notification, fetches the
/// submission with an OAuth 2.0 token (cached; a new one after a 401), and maps it. The same
/// notification again is a duplicate; an API that is down is a 502 with Retry-After (nothing
/// stored); a notification without an id, or naming a submission the API does not have, a 422.
#[test]
fn a_notification_is_exchanged_for_its_submission_by_a_generic_fetch() {
    use std::sync::atomic::Ordering;
    let api = FormsApi::start();
    let app = App::start_with_tables(None, &api.table());
    let path = "/submissions/weight-checkin-portal";
    let notify =
        |id: &str| json!({"event": "response.completed", "data": {"response_id": id}}).to_string();

    let (status, receipt, _) = app.post(path, notify(RESPONSE_ID).as_bytes(), &api_key());
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["submission_id"], RESPONSE_ID);
    assert_eq!(receipt["event"], "intake.submitted");
    let (status, again, headers) = app.post(path, notify(RESPONSE_ID).as_bytes(), &api_key());
    assert_eq!(status, 202, "{again}");
    assert_eq!(headers["x-chartbridge-duplicate"], "true");
    assert_eq!(api.issued.load(Ordering::SeqCst), 1, "the token is cached");

    // The cached token is revoked: one 401, a new token, the fetch again.
    api.issued.fetch_add(1, Ordering::SeqCst);
    let gets = api.gets.load(Ordering::SeqCst);
    let (status, _, _) = app.post(path, notify(RESPONSE_ID).as_bytes(), &api_key());
    assert_eq!(status, 202);
    assert_eq!(api.gets.load(Ordering::SeqCst), gets + 2);

    let (status, oo, _) = app.post(path, notify("chk_unknown").as_bytes(), &api_key());
    assert_eq!(status, 422, "{oo}");
    assert!(oo["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("no submission chk_unknown"));
    let (status, oo, _) = app.post(path, br#"{"data": {}}"#, &api_key());
    assert_eq!(status, 422, "{oo}");
    assert!(oo["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("$.data.response_id"));

    api.down.store(true, Ordering::SeqCst);
    let (status, oo, headers) = app.post(path, notify("chk_other").as_bytes(), &api_key());
    assert_eq!(status, 502, "{oo}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        app.get("/submissions/weight-checkin-portal/chk_other").0,
        404
    );
    let metrics = app.get_text("/metrics");
    assert!(metrics.contains("chartbridge_outbox_depth 1"), "{metrics}");
}

/// Mappings nobody signs are named at start-up and in `/ready`.
#[test]
fn ingest_that_nobody_signs_is_named_at_start_and_in_ready() {
    let app = App::start_logged_edited(None, |config| {
        let start = config.find("[sources.\"*\"]").unwrap();
        config[..start].to_string()
    });
    let (_, ready) = app.get("/ready");
    let unsigned: Vec<&str> = ready["unsigned_ingest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(unsigned.contains(&"refill-request-portal"), "{ready}");
    assert!(
        !unsigned.contains(&"glp1-intake-typeform"),
        "signed: {ready}"
    );
    assert!(
        !unsigned.contains(&"consult-intake-portal"),
        "signed: {ready}"
    );
    let (lines, _) = app.log_lines();
    let warned: Vec<&str> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("accepted unsigned"))
        })
        .filter_map(|l| l["mapping"].as_str())
        .collect();
    assert_eq!(warned, unsigned, "one warning per unsigned mapping");
    assert!(root().join("mappings").is_dir());
}

/// Started where there are no mapping files, the gateway runs, says where it looked and which
/// setting changes that, and answers every ingest route 404 naming the mapping it lacks.
#[test]
fn without_a_mappings_directory_the_gateway_starts_with_none() {
    let app = App::start_logged_edited(None, |config| {
        config
            .lines()
            .map(|l| {
                if l.starts_with("mappings_dir") {
                    "mappings_dir = \"no/such/mappings\"".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (status, oo, _) = app.post(
        "/submissions/glp1-intake-typeform",
        &super::fixture(super::MAYA),
        &api_key(),
    );
    assert_eq!(status, 404, "{oo}");
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(oo.to_string().contains("glp1-intake-typeform"), "{oo}");
    let response = json!({"resourceType": "QuestionnaireResponse", "status": "completed",
        "questionnaire": "https://forms.example-clinic.com/Questionnaire/glp1-intake|3"});
    let (status, oo, _) = app.post(
        "/QuestionnaireResponse",
        response.to_string().as_bytes(),
        &api_key(),
    );
    assert_eq!(status, 404, "{oo}");
    assert!(oo.to_string().contains("glp1-intake|3"), "{oo}");
    let (_, text) = app.log_lines();
    assert!(
        text.contains("no mappings directory") && text.contains("no/such/mappings"),
        "{text}"
    );
    assert!(text.contains("CHARTBRIDGE_MAPPINGS_DIR"), "{text}");
}
