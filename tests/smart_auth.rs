//! SMART Backend Services against a token endpoint and an EHR that demands its tokens, both run
//! by this test (the EHR is a guard in front of the real FHIR test server).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{any, post};
use axum::{Json, Router};
use common::{forward, root, App, FhirServer};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

const CLIENT: &str = "chartbridge-test";

#[derive(Default)]
struct Auth {
    token_url: String,
    fhir_url: String,
    current: Option<String>,
    issued: u64,
    jtis: HashSet<String>,
    refused: u64,
    problems: Vec<String>,
    /// Token requests still to answer `429` with `Retry-After: 2`.
    throttled: u32,
}

type Shared = Arc<Mutex<Auth>>;

async fn token(
    State(auth): State<Shared>,
    Form(form): Form<Vec<(String, String)>>,
) -> axum::response::Response {
    let get = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut a = auth.lock().unwrap();
    if a.throttled > 0 {
        a.throttled -= 1;
        let busy = json!({"error": "temporarily_unavailable"});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "2")],
            Json(busy),
        )
            .into_response();
    }
    let public = std::fs::read(root().join("tests/keys/smart-es384.pub.pem")).unwrap();
    let mut v = Validation::new(Algorithm::ES384);
    v.set_audience(&[a.token_url.clone()]);
    v.set_issuer(&[CLIENT]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let checks = (|| {
        if get("grant_type") != "client_credentials" {
            return Err("grant_type".to_string());
        }
        if get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        {
            return Err("client_assertion_type".to_string());
        }
        let assertion = get("client_assertion");
        let header = jsonwebtoken::decode_header(&assertion).map_err(|e| e.to_string())?;
        if header.kid.as_deref() != Some("key-1") {
            return Err("kid".to_string());
        }
        let data = jsonwebtoken::decode::<Value>(
            &assertion,
            &DecodingKey::from_ec_pem(&public).unwrap(),
            &v,
        )
        .map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if data.claims["exp"].as_u64().unwrap_or(0) > now + 300 {
            return Err("exp more than 5 minutes ahead".to_string());
        }
        if data.claims["sub"] != CLIENT {
            return Err("sub".to_string());
        }
        Ok(data.claims["jti"].as_str().unwrap_or_default().to_string())
    })();
    match checks {
        Ok(jti) if a.jtis.insert(jti.clone()) => {
            a.issued += 1;
            let t = format!("token-{}", a.issued);
            a.current = Some(t.clone());
            (
                StatusCode::OK,
                Json(
                    json!({"access_token": t, "token_type": "bearer", "expires_in": 300, "scope": get("scope")}),
                ),
            )
                .into_response()
        }
        Ok(_) => {
            a.problems.push("jti reused".into());
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_client"})),
            )
                .into_response()
        }
        Err(why) => {
            a.problems.push(why);
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_client"})),
            )
                .into_response()
        }
    }
}

/// The EHR: requires the current token, then forwards the request (any method and path) to the
/// FHIR test server.
async fn fhir(
    State(auth): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, HeaderMap, String) {
    let (ok, url) = {
        let mut a = auth.lock().unwrap();
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let ok = a
            .current
            .as_ref()
            .is_some_and(|t| given == format!("Bearer {t}"));
        if !ok {
            a.refused += 1;
        }
        (ok, a.fhir_url.clone())
    };
    if !ok {
        let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login", "diagnostics": "invalid token"}]});
        return (StatusCode::UNAUTHORIZED, HeaderMap::new(), oo.to_string());
    }
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    let path = path.trim_start_matches("/fhir").to_string();
    let (status, kept, body) = forward(&url, method, &path, &headers, body).await;
    (StatusCode::from_u16(status).unwrap(), kept, body)
}

#[test]
fn tokens_are_fetched_once_cached_and_refreshed_after_a_401() {
    tokens_in_mode("");
}

/// Resource by resource, the 401 is the first entry's: the token is fetched again all the same.
#[test]
fn tokens_are_refreshed_after_a_401_resource_by_resource() {
    tokens_in_mode("mode = \"per_resource\"");
}

/// In transactions of at most 3, the 401 is the first part's.
#[test]
fn tokens_are_refreshed_after_a_401_in_transactions_of_three() {
    tokens_in_mode("max_transaction_entries = 3");
}

/// The gateway delivering in `mode` (lines for `[ehr]`) with SMART Backend Services to an EHR
/// that demands the tokens its endpoint issued (both run here), the real FHIR server behind it.
struct Smart {
    server: FhirServer,
    _runtime: tokio::runtime::Runtime,
    auth: Shared,
    app: App,
}

impl Smart {
    fn start(mode: &str) -> Smart {
        let server = FhirServer::start();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let auth: Shared = Arc::default();
        let base = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let app = Router::new()
                .route("/token", post(token))
                .route("/fhir", any(fhir))
                .route("/fhir/{*rest}", any(fhir))
                .with_state(auth.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
            base
        });
        {
            let mut a = auth.lock().unwrap();
            a.token_url = format!("{base}/token");
            a.fhir_url = server.url.clone();
        }
        let smart = format!(
            "auth = {{ type = \"smart_backend\", token_url = \"{base}/token\", client_id = \"{CLIENT}\", private_key_pem = {:?}, algorithm = \"ES384\", kid = \"key-1\" }}",
            root().join("tests/keys/smart-es384.key.pem")
        );
        let app = App::start_with(Some(&format!("{base}/fhir")), &format!("{smart}\n{mode}"));
        Smart {
            server,
            _runtime: runtime,
            auth,
            app,
        }
    }

    /// Posts a Typeform fixture and waits until it is delivered; its status view.
    fn deliver(&self, fixture: &str) -> Value {
        let body = std::fs::read(root().join(fixture)).unwrap();
        let (status, receipt, _) = self.app.post_typeform(&body);
        assert_eq!(status, 202, "{receipt}");
        self.app
            .wait_for_state(receipt["key"].as_str().unwrap(), "delivered", 30)
    }
}

/// Three intakes delivered in `mode` (lines for `[ehr]`) with SMART Backend Services: one token
/// for the first two, a new one after the EHR revokes it.
fn tokens_in_mode(mode: &str) {
    let smart = Smart::start(mode);
    smart.deliver("fixtures/glp1-intake-typeform/maya-happy-path.input.json");
    smart.deliver("fixtures/glp1-intake-typeform/contraindications.input.json");
    assert_eq!(smart.auth.lock().unwrap().issued, 1, "the token is cached");

    // The EHR revokes the token: the next delivery gets a 401, fetches a new token, succeeds.
    smart.auth.lock().unwrap().current = Some("revoked".into());
    smart.deliver("fixtures/glp1-intake-typeform/missing-required.input.json");
    let a = smart.auth.lock().unwrap();
    assert_eq!((a.issued, a.refused), (2, 1));
    assert!(a.problems.is_empty(), "{:?}", a.problems);
    assert_eq!(smart.server.counts()["QuestionnaireResponse"], 3);
}

/// A token endpoint that answers `429` with `Retry-After: 2` (Medplum allows 60 token requests
/// a minute) is asked again only after that — not after the gateway's own 400 ms backoff.
#[test]
fn a_throttled_token_endpoint_is_left_alone_as_long_as_it_asks() {
    let smart = Smart::start("");
    smart.auth.lock().unwrap().throttled = 1;
    let view = smart.deliver("fixtures/glp1-intake-typeform/maya-happy-path.input.json");
    let transitions = view["transitions"].as_array().unwrap();
    let states: Vec<&str> = transitions
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["received", "mapped", "failed", "delivered"]);
    assert_eq!(
        transitions[2]["detail"],
        "no access token: token endpoint: HTTP 429"
    );
    let at = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(transitions[i]["at"].as_str().unwrap()).unwrap()
    };
    let waited = (at(3) - at(2)).num_milliseconds();
    assert!(waited >= 1_900, "Retry-After not waited for: {waited} ms");
    assert_eq!(smart.auth.lock().unwrap().issued, 1);
}

#[test]
fn rs384_assertions_verify_with_the_public_key() {
    use chartbridge::config::SmartBackend;
    use chartbridge::delivery::auth::TokenSource;
    let config = SmartBackend {
        token_url: "https://ehr.example.org/token".into(),
        client_id: CLIENT.into(),
        private_key_pem: root().join("tests/keys/smart-rs384.key.pem"),
        algorithm: "RS384".into(),
        kid: "rsa-1".into(),
        scope: "system/Observation.cru".into(),
    };
    let source = TokenSource::new(&config, reqwest::Client::new()).unwrap();
    let (a, b) = (source.assertion().unwrap(), source.assertion().unwrap());
    let public = std::fs::read(root().join("tests/keys/smart-rs384.pub.pem")).unwrap();
    let mut v = Validation::new(Algorithm::RS384);
    v.set_audience(&["https://ehr.example.org/token"]);
    let claims = |t: &str| {
        jsonwebtoken::decode::<Value>(t, &DecodingKey::from_rsa_pem(&public).unwrap(), &v)
            .unwrap()
            .claims
    };
    let (ca, cb) = (claims(&a), claims(&b));
    assert_ne!(ca["jti"], cb["jti"], "unique jti");
    assert_eq!(ca["iss"], CLIENT);
    assert!(ca["exp"].as_u64().unwrap() - ca["iat"].as_u64().unwrap() <= 300);
    assert_eq!(
        jsonwebtoken::decode_header(&a).unwrap().kid.as_deref(),
        Some("rsa-1")
    );

    let bad = SmartBackend {
        algorithm: "HS256".into(),
        ..config.clone()
    };
    assert!(TokenSource::new(&bad, reqwest::Client::new()).is_err());
    let missing = SmartBackend {
        private_key_pem: root().join("tests/keys/none.pem"),
        ..config
    };
    assert!(TokenSource::new(&missing, reqwest::Client::new()).is_err());
}
