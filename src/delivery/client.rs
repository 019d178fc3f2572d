//! The EHR's FHIR API as the outbox sees it: POST a transaction Bundle, get an `Attempt`.

use std::time::Duration;

use serde_json::Value;

use super::{classify, Attempt};
use crate::config::{EhrAuth, EhrConfig};

pub struct EhrClient {
    http: reqwest::Client,
    base_url: String,
    auth: EhrAuth,
}

impl EhrClient {
    pub fn new(config: &EhrConfig) -> Result<EhrClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(EhrClient {
            http,
            base_url: config.base_url.trim_end_matches('/').to_string(),
            auth: config.auth.clone(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            EhrAuth::None => req,
            EhrAuth::Bearer { token } => req.bearer_auth(token),
        }
    }

    /// POSTs a `transaction` Bundle to the FHIR base and says what came of it.
    pub async fn send_transaction(&self, bundle: &Value) -> Attempt {
        let req = self
            .http
            .post(&self.base_url)
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .header(reqwest::header::ACCEPT, "application/fhir+json")
            .body(bundle.to_string());
        let resp = match self.authorize(req).send().await {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "unreachable"
                } else {
                    "request failed"
                };
                return Attempt::Retry {
                    reason: format!("EHR {what}"),
                    retry_after: None,
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body: Value = match resp.bytes().await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
            Err(_) => {
                return Attempt::Retry {
                    reason: format!("HTTP {status}: body not received"),
                    retry_after: None,
                }
            }
        };
        classify(status, retry_after.as_deref(), &body)
    }

    /// Whether the EHR answers its capability statement.
    pub async fn reachable(&self) -> bool {
        let req = self
            .http
            .get(format!("{}/metadata", self.base_url))
            .timeout(Duration::from_secs(2));
        matches!(self.authorize(req).send().await, Ok(r) if r.status().is_success())
    }
}
