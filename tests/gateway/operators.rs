//! The operators' endpoints behind their keys, and the audit trail of every use.

use serde_json::Value;

use super::*;
use crate::common::{self, App};

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
