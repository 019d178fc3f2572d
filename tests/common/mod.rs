//! Shared helpers of the integration tests: the real FHIR R4 test server (Medplum's router in
//! `tests/fhir-server`, installed on first use), paths, and the `chartbridge` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How many resources of `resource_type` a Bundle's entries hold.
pub fn entries_of(bundle: &Value, resource_type: &str) -> usize {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["resource"]["resourceType"] == resource_type)
        .count()
}

pub fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `chartbridge` binary built for this test run.
pub fn chartbridge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chartbridge"));
    c.current_dir(root());
    c
}

/// Runs a command that must succeed; its output (stderr shown if it does not).
pub fn succeeds(command: &mut Command) -> std::process::Output {
    let out = command.output().expect("run the command");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running FHIR test server on a free loopback port. Stops when dropped, and by itself when
/// the test process dies (it exits when its standard input closes).
pub struct FhirServer {
    child: Child,
    pub url: String,
    http: reqwest::blocking::Client,
}

impl FhirServer {
    pub fn start() -> FhirServer {
        Self::start_with(&[("PORT", "0")])
    }

    /// Starts it with extra environment (`PORT`, `MAX_STRICT_TX_ENTRIES`, …).
    pub fn start_with(env: &[(&str, &str)]) -> FhirServer {
        let script = root().join("tests/fhir-server/start.sh");
        let mut command = Command::new("bash");
        command.arg(&script).env("PORT", "0");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .env("EXIT_WITH_STDIN", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tests/fhir-server/start.sh");
        let stdout = child.stdout.take().expect("server stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the server's ready line");
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("FHIR test server did not start (first line {line:?}): {e}")
        });
        let url = ready["url"]
            .as_str()
            .expect("url in the ready line")
            .to_string();
        FhirServer {
            child,
            url,
            http: reqwest::blocking::Client::new(),
        }
    }

    /// Drops all data.
    pub fn reset(&self) {
        let r = self
            .http
            .post(format!("{}/$reset", self.url))
            .send()
            .expect("reset");
        assert!(r.status().is_success(), "reset: {}", r.status());
    }

    /// Resource counts by type.
    pub fn counts(&self) -> Value {
        let v: Value = self
            .http
            .get(format!("{}/$health", self.url))
            .send()
            .expect("health")
            .json()
            .expect("health json");
        v["counts"].clone()
    }

    /// POSTs a transaction Bundle; returns the status and the response body.
    pub fn transaction(&self, bundle: &Value) -> (u16, Value) {
        self.post("", bundle)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .expect("POST to the FHIR test server");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// Writes `resource` as it is (an update by its id): what the server stored, new version
    /// and all.
    pub fn put(&self, resource: &Value) -> Value {
        let path = format!(
            "{}/{}/{}",
            self.url,
            resource["resourceType"].as_str().expect("resourceType"),
            resource["id"].as_str().expect("id")
        );
        let r = self
            .http
            .put(path)
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .expect("PUT to the FHIR test server");
        assert!(r.status().is_success(), "PUT: {}", r.status());
        r.json().expect("PUT json")
    }

    pub fn search(&self, query: &str) -> Value {
        self.http
            .get(format!("{}/{query}", self.url))
            .send()
            .expect("search")
            .json()
            .expect("search json")
    }
}

impl Drop for FhirServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound, released) for a server a test starts later: below Linux's
/// ephemeral range (32768–60999), which the kernel hands to the tests' client connections —
/// a port from there could be some connection's own by the time the server binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = seed.wrapping_add(NEXT.fetch_add(7919, Ordering::Relaxed));
        let port = 20_000 + (n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-31999")
}

/// The gateway itself: `chartbridge serve` as a child process on a random port, with its own
/// data directory (kept across restarts), stopped when dropped.
pub struct App {
    child: Option<Child>,
    pub url: String,
    pub config_path: PathBuf,
    dir: std::sync::Arc<tempfile::TempDir>,
    http: reqwest::blocking::Client,
    /// Where the process's stderr goes, at `RUST_LOG=info` (else: this test's stderr, at `warn`).
    log: Option<PathBuf>,
}

pub const TYPEFORM_SECRET: &str = "typeform-test-secret";
pub const ADMIN_KEY: &str = "test-admin-key";
const ADMIN_AUTHORIZATION: &str = "Bearer test-admin-key";
pub const PORTAL_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

impl App {
    /// Starts the gateway; `ehr` is the FHIR base URL (or none: deliveries wait in the outbox).
    pub fn start(ehr: Option<&str>) -> App {
        Self::start_with(ehr, "")
    }

    /// Same, with more lines for the `[ehr]` table (e.g. `auth = …`).
    pub fn start_with(ehr: Option<&str>, ehr_extra: &str) -> App {
        Self::start_configured(ehr, ehr_extra, "")
    }

    /// Same, with more lines for the `[limits]` table too.
    pub fn start_configured(ehr: Option<&str>, ehr_extra: &str, limits_extra: &str) -> App {
        let mut app = Self::configured(ehr, ehr_extra, limits_extra, "");
        app.restart();
        app
    }

    /// Same, with more tables at the end of the configuration (e.g. `[fetch.…]`).
    pub fn start_with_tables(ehr: Option<&str>, tables: &str) -> App {
        let mut app = Self::configured(ehr, "", "", tables);
        app.restart();
        app
    }

    /// The gateway's data directory and configuration, not started yet.
    fn configured(ehr: Option<&str>, ehr_extra: &str, limits_extra: &str, tables: &str) -> App {
        let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
        let config_path = dir.path().join("chartbridge.toml");
        let mut config = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nmappings_dir = {:?}\nadmin_key = \"{ADMIN_KEY}\"\n\n\
             [limits]\nmax_body_bytes = 65536\n{limits_extra}\n\n\
             [sources.glp1-intake-typeform]\ntype = \"hmac\"\nheader = \"typeform-signature\"\nprefix = \"sha256=\"\nsecret = \"{TYPEFORM_SECRET}\"\n\n\
             [sources.consult-intake-portal]\ntype = \"standard_webhooks\"\nsecret = \"{PORTAL_SECRET}\"\n\n\
             [sources.\"*\"]\ntype = \"api_key\"\nkey = \"test-key\"\n",
            dir.path().join("data"),
            root().join("mappings"),
        );
        if let Some(url) = ehr {
            config.push_str(&format!("\n[ehr]\nbase_url = \"{url}\"\nbackoff_base_ms = 50\nbackoff_cap_ms = 400\ntimeout_ms = 5000\n{ehr_extra}\n"));
        }
        config.push_str(tables);
        std::fs::write(&config_path, config).expect("write config");
        App {
            child: None,
            url: String::new(),
            config_path,
            dir,
            // As an operator: every request carries the admin key (sources authenticate
            // with their own headers besides).
            http: reqwest::blocking::Client::builder()
                .default_headers(
                    [(
                        reqwest::header::AUTHORIZATION,
                        reqwest::header::HeaderValue::from_static(ADMIN_AUTHORIZATION),
                    )]
                    .into_iter()
                    .collect(),
                )
                .build()
                .expect("HTTP client"),
            log: None,
        }
    }

    /// Starts the gateway logging at `info` into a file (read with `log_lines`), its
    /// configuration first changed by `edit` (e.g. a source's table taken out).
    pub fn start_logged_edited(ehr: Option<&str>, edit: impl FnOnce(String) -> String) -> App {
        let mut app = Self::configured(ehr, "", "", "");
        let config = std::fs::read_to_string(&app.config_path).expect("read config");
        std::fs::write(&app.config_path, edit(config)).expect("write config");
        app.log = Some(app.dir.path().join("serve.log"));
        app.restart();
        app
    }

    /// Starts the gateway logging at `info` into a file (read with `log_lines`).
    pub fn start_logged(ehr: Option<&str>) -> App {
        let mut app = Self::configured(ehr, "", "", "");
        app.log = Some(app.dir.path().join("serve.log"));
        app.restart();
        app
    }

    /// The log so far, one parsed JSON object per line (every line must be one), and its text.
    pub fn log_lines(&self) -> (Vec<Value>, String) {
        let path = self.log.as_ref().expect("started with start_logged");
        let text = std::fs::read_to_string(path).expect("read the log");
        let lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        (lines, text)
    }

    /// (Re)starts the process on the same data directory and configuration.
    pub fn restart(&mut self) {
        let (level, stderr) = match &self.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open the log file");
                ("info", Stdio::from(file))
            }
            None => ("warn", Stdio::inherit()),
        };
        let mut child = chartbridge()
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start chartbridge serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the ready line");
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("serve did not start ({line:?}): {e}"));
        self.url = ready["url"].as_str().expect("url").to_string();
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, no flush beyond what was already durable.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the graceful exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let status = c.wait();
            assert!(
                status.as_ref().is_ok_and(|s| s.success()),
                "the gateway did not exit cleanly on SIGTERM: {status:?}"
            );
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn post(
        &self,
        path: &str,
        body: &[u8],
        headers: &[(&str, String)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let r = req.send().expect("POST to the gateway");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.json().unwrap_or(Value::Null), headers)
    }

    /// POSTs a Typeform payload signed as Typeform signs it.
    pub fn post_typeform(&self, body: &[u8]) -> (u16, Value, reqwest::header::HeaderMap) {
        let sig = chartbridge::http::auth::sign(
            TYPEFORM_SECRET,
            body,
            chartbridge::config::SignatureEncoding::Base64,
        );
        self.post(
            "/submissions/glp1-intake-typeform",
            body,
            &[
                ("typeform-signature", format!("sha256={sig}")),
                ("content-type", "application/json".into()),
            ],
        )
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET from the gateway");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// `/metrics` once it holds every one of `lines` (30 s at most).
    pub fn wait_for_metrics(&self, lines: &[&str]) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let metrics = self.get_text("/metrics");
            if lines.iter().all(|l| metrics.lines().any(|m| m == *l)) {
                return metrics;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{lines:?} not in {metrics}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn get_text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .and_then(|r| r.text())
            .expect("GET text")
    }

    /// Polls a submission's status until `state`, or panics after `secs`.
    pub fn wait_for_state(&self, key: &str, state: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let (status, body) = self.get(&format!("/submissions/{key}"));
            if status == 200 && body["state"] == state {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{key} never reached {state}: {body}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A front of the real FHIR server on a port of its own, the way an EHR differs from it:
/// `answer` gets each request's number (from 0), method, path and query, headers and body, and
/// answers — usually with what `forward` got from the server. Returns the front's FHIR base.
pub fn front<F, Fut>(runtime: &tokio::runtime::Runtime, answer: F) -> String
where
    F: Fn(usize, axum::http::Method, String, axum::http::HeaderMap, String) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = (u16, axum::http::HeaderMap, String)> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/fhir", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: String| {
                let n = asked.fetch_add(1, Ordering::SeqCst);
                let path = uri
                    .path_and_query()
                    .map_or("", |p| p.as_str())
                    .trim_start_matches("/fhir")
                    .to_string();
                let answer = answer.clone();
                async move {
                    let (status, headers, body) = answer(n, method, path, headers, body).await;
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        headers,
                        body,
                    )
                }
            },
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    })
}

/// The FHIR server's answer to the request a front got (its `If-None-Exist` passed on): status,
/// `Location` and `ETag`, body.
pub async fn forward(
    to: &str,
    method: axum::http::Method,
    path: &str,
    headers: &axum::http::HeaderMap,
    body: String,
) -> (u16, axum::http::HeaderMap, String) {
    let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
    let mut request = reqwest::Client::new()
        .request(method, format!("{to}{path}"))
        .header("content-type", "application/fhir+json")
        .body(body);
    if let Some(condition) = headers.get("if-none-exist") {
        request = request.header("if-none-exist", condition.to_str().unwrap());
    }
    let answer = request.send().await.unwrap();
    let mut kept = axum::http::HeaderMap::new();
    for name in ["location", "etag"] {
        if let Some(v) = answer.headers().get(name) {
            kept.insert(name, v.to_str().unwrap().parse().unwrap());
        }
    }
    (answer.status().as_u16(), kept, answer.text().await.unwrap())
}
