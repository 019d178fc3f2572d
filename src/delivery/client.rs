//! The EHR's FHIR API as the outbox sees it: POST a transaction Bundle, get an `Attempt`.

use std::time::Duration;

use serde_json::Value;

use super::auth::{TokenError, TokenSource};
use super::{classify, Attempt};
use crate::config::{EhrAuth, EhrConfig};

pub struct EhrClient {
    http: reqwest::Client,
    base_url: String,
    auth: Auth,
}

enum Auth {
    None,
    Bearer(String),
    Smart(Box<TokenSource>),
}

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl EhrClient {
    pub fn new(config: &EhrConfig) -> Result<EhrClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let auth = match &config.auth {
            EhrAuth::None => Auth::None,
            EhrAuth::Bearer { token } => Auth::Bearer(token.clone()),
            EhrAuth::SmartBackend(smart) => {
                Auth::Smart(Box::new(TokenSource::new(smart, http.clone())?))
            }
        };
        Ok(EhrClient {
            http,
            base_url: config.base_url.trim_end_matches('/').to_string(),
            auth,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, TokenError> {
        Ok(match &self.auth {
            Auth::None => req,
            Auth::Bearer(token) => req.bearer_auth(token),
            Auth::Smart(tokens) => req.bearer_auth(tokens.token().await?),
        })
    }

    /// POSTs a `transaction` Bundle to the FHIR base and says what came of it. With SMART auth, a
    /// 401 drops the cached token and the request is made once more with a new one.
    pub async fn send_transaction(&self, bundle: &Value) -> Attempt {
        let body = bundle.to_string();
        let first = self.post_transaction(&body).await;
        match (&first, &self.auth) {
            (Attempt::Reject { reason }, Auth::Smart(tokens)) if reason.starts_with("HTTP 401") => {
                tokens.invalidate().await;
                self.post_transaction(&body).await
            }
            _ => first,
        }
    }

    async fn post_transaction(&self, body: &str) -> Attempt {
        let req = self
            .http
            .post(&self.base_url)
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .header(reqwest::header::ACCEPT, "application/fhir+json")
            .body(body.to_string());
        let req = match self.authorize(req).await {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    reason: format!("no access token: {e}"),
                    retry_after: None,
                }
            }
        };
        let resp = match req.send().await {
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
        let Ok(req) = self.authorize(req).await else {
            return false;
        };
        matches!(req.send().await, Ok(r) if r.status().is_success())
    }
}
