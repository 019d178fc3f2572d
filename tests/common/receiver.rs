//! A webhook receiver as the CRM or the patient portal runs one: a real HTTP server that checks
//! every request's Standard Webhooks signature itself (HMAC-SHA256 over `id.timestamp.body`
//! with the base64 key after `whsec_`, a timestamp within five minutes), refuses a forged one
//! with 401, de-duplicates on `webhook-id` as the specification asks receivers to, and checks
//! each body against its event type's JSON Schema in `docs/events/` — the whole schema, and
//! the part for this receiver (`$defs/crm`, `$defs/portal`). It can be taken down (503) and up.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

pub const CRM_SECRET: &str = "whsec_Y3JtLXNpZ25pbmcta2V5LWZvci10ZXN0cw==";
pub const PORTAL_HOOK_SECRET: &str = "whsec_cG9ydGFsLXNpZ25pbmcta2V5LWZvci10ZXN0cw==";

/// One event as the receiver took it.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub kind: String,
    pub body: Value,
}

impl Received {
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }
}

#[derive(Default)]
struct Seen {
    /// Each distinct event, in the order it first came.
    events: Vec<Received>,
    ids: HashSet<String>,
    /// Requests answered 2xx (a re-delivery of an event counts again), and by event id.
    accepted: usize,
    accepted_by_id: std::collections::HashMap<String, usize>,
    /// Requests whose signature did not check out.
    forged: usize,
    /// Bodies that broke their schema, and why.
    invalid: Vec<String>,
}

pub struct WebhookReceiver {
    pub url: String,
    /// `crm` or `portal`: which part of the schemas its bodies must fit.
    pub role: &'static str,
    seen: Arc<Mutex<Seen>>,
    /// The status it answers everything with instead of taking it (0: it takes events).
    down: Arc<AtomicU16>,
    _runtime: tokio::runtime::Runtime,
}

impl WebhookReceiver {
    pub fn crm() -> WebhookReceiver {
        WebhookReceiver::start("crm", CRM_SECRET)
    }

    pub fn portal() -> WebhookReceiver {
        WebhookReceiver::start("portal", PORTAL_HOOK_SECRET)
    }

    fn start(role: &'static str, secret: &'static str) -> WebhookReceiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let down = Arc::new(AtomicU16::new(0));
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.trim_start_matches("whsec_"))
            .expect("key");
        let (s, d) = (Arc::clone(&seen), Arc::clone(&down));
        let url = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/hooks", listener.local_addr().unwrap());
            let app = axum::Router::new().route(
                "/hooks",
                axum::routing::post(
                    move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                        let (seen, down, key) = (Arc::clone(&s), Arc::clone(&d), key.clone());
                        async move { take(role, &key, &seen, &down, &headers, &body) }
                    },
                ),
            );
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        });
        WebhookReceiver {
            url,
            role,
            seen,
            down,
            _runtime: runtime,
        }
    }

    /// The configuration table that sends this receiver its events.
    pub fn table(&self) -> String {
        let secret = if self.role == "crm" {
            CRM_SECRET
        } else {
            PORTAL_HOOK_SECRET
        };
        format!(
            "\n[{}]\nurl = \"{}\"\nsecret = \"{secret}\"\nbackoff_base_ms = 50\nbackoff_cap_ms = 300\ntimeout_ms = 3000\n",
            self.role, self.url
        )
    }

    /// Answers 503 to everything while down.
    pub fn set_down(&self, down: bool) {
        self.down
            .store(if down { 503 } else { 0 }, Ordering::SeqCst);
    }

    /// Refuses every event (422, as a receiver that cannot take it) while set.
    pub fn set_refusing(&self, refusing: bool) {
        self.down
            .store(if refusing { 422 } else { 0 }, Ordering::SeqCst);
    }

    pub fn events(&self) -> Vec<Received> {
        self.lock().events.clone()
    }

    pub fn kinds(&self) -> Vec<String> {
        self.events().into_iter().map(|e| e.kind).collect()
    }

    /// What the events set, in order: the CRM's stages, or the portal's statuses (events that
    /// set none are left out).
    pub fn states(&self) -> Vec<String> {
        let field = if self.role == "crm" {
            "stage"
        } else {
            "status"
        };
        self.events()
            .iter()
            .filter_map(|e| e.data()[field].as_str().map(str::to_string))
            .collect()
    }

    pub fn accepted(&self) -> usize {
        self.lock().accepted
    }

    /// How many times the event `id` was delivered (taken with a 2xx).
    pub fn deliveries_of(&self, id: &str) -> usize {
        self.lock().accepted_by_id.get(id).copied().unwrap_or(0)
    }

    pub fn forged(&self) -> usize {
        self.lock().forged
    }

    /// Bodies that did not fit their schema (none, in every test).
    pub fn invalid(&self) -> Vec<String> {
        self.lock().invalid.clone()
    }

    /// Waits (20 s at most) until `n` distinct events came; they are returned.
    pub fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "{} got {} events, not {n}: {:?}",
                self.role,
                events.len(),
                events.iter().map(|e| &e.kind).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until an event of `kind` came; it is returned.
    pub fn wait_for_kind(&self, kind: &str) -> Received {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = self.events().into_iter().find(|e| e.kind == kind) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "{} never got {kind}: {:?}",
                self.role,
                self.kinds()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn take(
    role: &str,
    key: &[u8],
    seen: &Mutex<Seen>,
    down: &AtomicU16,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match down.load(Ordering::SeqCst) {
        0 => {}
        code => return StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
    }
    let mut seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(signatures)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        seen.forged += 1;
        return StatusCode::UNAUTHORIZED;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = ts.parse::<u64>().is_ok_and(|t| t.abs_diff(now) <= 300);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    if !fresh || !signatures.split(' ').any(|s| s == expected) {
        seen.forged += 1;
        return StatusCode::UNAUTHORIZED;
    }
    seen.accepted += 1;
    *seen.accepted_by_id.entry(id.to_string()).or_default() += 1;
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        seen.invalid.push("not JSON".into());
        return StatusCode::BAD_REQUEST;
    };
    let kind = body["type"].as_str().unwrap_or("").to_string();
    if let Err(why) = fits(role, &kind, &body) {
        seen.invalid.push(format!("{kind}: {why}"));
    }
    if seen.ids.insert(id.to_string()) {
        seen.events.push(Received {
            id: id.to_string(),
            kind,
            body,
        });
    }
    StatusCode::NO_CONTENT
}

/// Whether `body` fits `docs/events/<kind>.schema.json`, and its `data` the receiver's part.
fn fits(role: &str, kind: &str, body: &Value) -> Result<(), String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/events")
        .join(format!("{kind}.schema.json"));
    let text =
        std::fs::read_to_string(&path).map_err(|_| format!("no schema {}", path.display()))?;
    let schema: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let check = |schema: &Value, value: &Value| -> Result<(), String> {
        let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| e.to_string())
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    };
    check(&schema, body)?;
    let mut part = serde_json::json!({"$ref": format!("#/$defs/{role}")});
    part["$defs"] = schema["$defs"].clone();
    if schema["$defs"].get(role).is_none() {
        return Err(format!("{kind} is not an event for the {role}"));
    }
    check(&part, &body["data"])
}
