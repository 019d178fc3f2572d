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

/// A running FHIR test server on a free loopback port. Stops when dropped, and by itself when
/// the test process dies (it exits when its standard input closes).
pub struct FhirServer {
    child: Child,
    pub url: String,
    http: reqwest::blocking::Client,
}

impl FhirServer {
    pub fn start() -> FhirServer {
        let script = root().join("tests/fhir-server/start.sh");
        let mut child = Command::new("bash")
            .arg(&script)
            .env("PORT", "0")
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
