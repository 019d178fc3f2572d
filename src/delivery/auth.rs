//! Access tokens for the EHR: SMART Backend Services (client credentials with a
//! `private_key_jwt` assertion signed RS384 or ES384, `kid`, unique `jti`, `exp` 5 minutes ahead).
//! A token is cached until shortly before it expires, and dropped when the EHR answers 401.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::SmartBackend;

/// Why no token could be had. Never carries the key or a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("SMART key {path}: {message}")]
    Key { path: String, message: String },
    #[error("SMART algorithm `{0}`: use RS384 or ES384")]
    Algorithm(String),
    #[error("token endpoint: {0}")]
    Endpoint(String),
    /// The endpoint answered with an error status, and maybe how long to leave it alone.
    #[error("token endpoint: HTTP {status}")]
    Refused { status: u16, wait: Option<Duration> },
}

impl TokenError {
    /// How long the token endpoint asked to be left alone (`429` with `Retry-After`, …).
    pub fn wait(&self) -> Option<Duration> {
        match self {
            TokenError::Refused { wait, .. } => *wait,
            _ => None,
        }
    }
}

pub struct TokenSource {
    config: SmartBackend,
    algorithm: Algorithm,
    key: EncodingKey,
    http: reqwest::Client,
    cached: Mutex<Option<(String, Instant)>>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    jti: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

static JTI_SEQ: AtomicU64 = AtomicU64::new(0);

impl TokenSource {
    pub fn new(config: &SmartBackend, http: reqwest::Client) -> Result<TokenSource, TokenError> {
        let path = config.private_key_pem.display().to_string();
        let pem = std::fs::read(&config.private_key_pem).map_err(|e| TokenError::Key {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let (algorithm, key) = match config.algorithm.as_str() {
            "RS384" => (Algorithm::RS384, EncodingKey::from_rsa_pem(&pem)),
            "ES384" => (Algorithm::ES384, EncodingKey::from_ec_pem(&pem)),
            other => return Err(TokenError::Algorithm(other.to_string())),
        };
        let key = key.map_err(|e| TokenError::Key {
            path,
            message: e.to_string(),
        })?;
        Ok(TokenSource {
            config: config.clone(),
            algorithm,
            key,
            http,
            cached: Mutex::new(None),
        })
    }

    /// A signed client assertion (a fresh `jti` each time).
    pub fn assertion(&self) -> Result<String, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let jti = format!(
            "{:x}-{:x}-{:x}",
            now.as_nanos(),
            std::process::id(),
            JTI_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let claims = Claims {
            iss: &self.config.client_id,
            sub: &self.config.client_id,
            aud: &self.config.token_url,
            exp: now.as_secs() + 300,
            iat: now.as_secs(),
            jti,
        };
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.config.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| TokenError::Key {
            path: self.config.private_key_pem.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The cached token, or a new one from the token endpoint.
    pub async fn token(&self) -> Result<String, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("scope", self.config.scope.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &self.assertion()?),
        ];
        let resp = self
            .http
            .post(&self.config.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                TokenError::Endpoint(if e.is_connect() {
                    "unreachable".into()
                } else {
                    "request failed".into()
                })
            })?;
        let status = resp.status();
        if !status.is_success() {
            let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
            return Err(TokenError::Refused {
                status: status.as_u16(),
                wait: super::wait_asked(header, SystemTime::now()),
            });
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|_| TokenError::Endpoint("no access_token in the answer".into()))?;
        *cached = Some((
            body.access_token.clone(),
            Instant::now() + kept_for(body.expires_in),
        ));
        Ok(body.access_token)
    }

    /// Forgets the cached token (the EHR said 401).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

/// How long a token is used: until a little before the EHR would refuse it (`expires_in`
/// seconds; 300 if not said), and never past a day, whatever the answer says.
fn kept_for(expires_in: Option<u64>) -> Duration {
    Duration::from_secs(expires_in.unwrap_or(300).min(86_400))
        .saturating_sub(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_kept_until_shortly_before_it_expires_and_never_past_a_day() {
        assert_eq!(kept_for(Some(300)), Duration::from_secs(270));
        assert_eq!(kept_for(None), Duration::from_secs(270));
        assert_eq!(kept_for(Some(10)), Duration::ZERO);
        // An answer's number is not trusted to fit an `Instant`.
        assert_eq!(kept_for(Some(u64::MAX)), Duration::from_secs(86_370));
    }
}
