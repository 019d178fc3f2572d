//! A webhook receiver's courier (the CRM's, the portal's): one attempt at one event — its body
//! POSTed, signed as Standard Webhooks sign — and its outcome recorded in the store.
//!
//! Signing: `webhook-id` (the event's id, the same on every attempt, so the receiver
//! de-duplicates), `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature:
//! v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the base64 after `whsec_`.
//!
//! Outcomes: any 2xx delivers. 408, 425, 429 and 5xx, a timeout or no connection are retried
//! after an exponential backoff with full jitter (longer if the receiver asks, with
//! `Retry-After`); any other answer is the receiver refusing the event as it is: it is
//! dead-lettered at once (a replay sends it again once the cause is fixed), as is an event
//! that has failed `max_attempts` times. A redirect is not followed: it is a configuration to fix.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::outbox::{jitter, now, Courier};
use super::{backoff, wait_asked};
use crate::config::WebhookConfig;
use crate::metrics::Metrics;
use crate::store::{Backend, EventOutcome, Pending, Receiver, Store, StoreError};

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with `key`.
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

pub struct WebhookCourier {
    receiver: Receiver,
    http: reqwest::Client,
    url: reqwest::Url,
    key: Vec<u8>,
    metrics: Arc<Metrics>,
    concurrency: usize,
    backoff_base: Duration,
    backoff_cap: Duration,
    max_attempts: u32,
}

/// Why a webhook receiver cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("[{receiver}] url {url:?} is not a URL: {why}")]
    Url {
        receiver: String,
        url: String,
        why: String,
    },
    #[error("[{receiver}] secret: {why}")]
    Secret { receiver: String, why: String },
    #[error("[{receiver}] HTTP client: {why}")]
    Client { receiver: String, why: String },
}

impl WebhookCourier {
    pub fn new(
        receiver: Receiver,
        config: &WebhookConfig,
        metrics: Arc<Metrics>,
    ) -> Result<WebhookCourier, WebhookError> {
        let name = receiver.name().to_string();
        let url = reqwest::Url::parse(&config.url).map_err(|e| WebhookError::Url {
            receiver: name.clone(),
            url: config.url.clone(),
            why: e.to_string(),
        })?;
        let key = config.key().map_err(|why| WebhookError::Secret {
            receiver: name.clone(),
            why,
        })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WebhookError::Client {
                receiver: name,
                why: e.to_string(),
            })?;
        Ok(WebhookCourier {
            receiver,
            http,
            url,
            key,
            metrics,
            concurrency: config.concurrency,
            backoff_base: Duration::from_millis(config.backoff_base_ms),
            backoff_cap: Duration::from_millis(config.backoff_cap_ms),
            max_attempts: config.max_attempts.max(1),
        })
    }
}

/// What one attempt came to.
pub enum Sent {
    Delivered,
    /// To be tried again (why; the wait the receiver asked for).
    Retry(String, Option<Duration>),
    /// Refused as it is.
    Refused(String),
    /// Nothing to send (the event is gone from the store: settled before).
    Gone,
    /// The store could not be read: try again after this.
    Unreadable(Duration),
}

impl Courier for WebhookCourier {
    type Attempted = Sent;

    fn receiver(&self) -> &Receiver {
        &self.receiver
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    async fn attempt(&self, store: &Backend, job: &Pending) -> Sent {
        let event = match store.event(&job.job) {
            Ok(Some(e)) => e,
            Ok(None) => return Sent::Gone,
            Err(e) => {
                tracing::error!(receiver = %self.receiver, error = %e, "outbox: cannot read an event");
                return Sent::Unreadable(self.backoff_cap);
            }
        };
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let sent = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.key, &event.id, timestamp, &event.body),
            )
            .body(event.body)
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
                let wait = wait_asked(header, std::time::SystemTime::now());
                match status {
                    200..=299 => Sent::Delivered,
                    408 | 425 | 429 | 500..=599 => Sent::Retry(format!("HTTP {status}"), wait),
                    300..=399 => Sent::Refused(format!(
                        "HTTP {status}: the receiver redirects, and events do not follow redirects; point its url where it redirects"
                    )),
                    _ => Sent::Refused(format!("HTTP {status}: the receiver refused the event")),
                }
            }
            Err(e) => Sent::Retry(format!("{} {}", self.receiver, super::unanswered(&e)), None),
        }
    }

    async fn record(&self, store: &Backend, job: &Pending, sent: Sent) -> Option<Duration> {
        let at = now();
        let (outcome, next) = match sent {
            Sent::Gone => return None,
            Sent::Unreadable(delay) => return Some(delay),
            Sent::Delivered => (EventOutcome::Delivered { at }, None),
            Sent::Retry(why, _) if job.failures.saturating_add(1) >= self.max_attempts => (
                EventOutcome::DeadLettered {
                    at,
                    why: format!("{} failed attempts; the last: {why}", self.max_attempts),
                },
                None,
            ),
            Sent::Retry(why, wait) => {
                let delay = backoff(
                    job.failures,
                    self.backoff_base,
                    self.backoff_cap,
                    jitter(&job.job, job.failures),
                    wait,
                );
                tracing::warn!(receiver = %self.receiver, job = %job.job, why, retry_in_ms = delay.as_millis() as u64, "event not delivered; will retry");
                (EventOutcome::Failed { at, why }, Some(delay))
            }
            Sent::Refused(why) => (EventOutcome::DeadLettered { at, why }, None),
        };
        let counted = match &outcome {
            EventOutcome::Delivered { .. } => "delivered",
            EventOutcome::Failed { .. } => "retried",
            EventOutcome::DeadLettered { why, .. } => {
                tracing::warn!(receiver = %self.receiver, job = %job.job, why, "event dead-lettered");
                "dead_lettered"
            }
        };
        match store.settle(&job.job, job.failures, outcome).await {
            Ok(_) => {
                self.metrics.count_webhook(self.receiver.name(), counted);
                next
            }
            Err(StoreError::Closed) => None,
            Err(e) => {
                tracing::error!(receiver = %self.receiver, error = %e, "outbox: cannot record an event's outcome");
                Some(self.backoff_base)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's own example (standard-webhooks/standard-webhooks,
    /// the reference libraries' tests): this id, timestamp, body and secret sign to this.
    #[test]
    fn signs_as_the_reference_libraries_do() {
        let config = |secret: &str| WebhookConfig {
            url: "http://x".into(),
            secret: secret.into(),
            concurrency: 1,
            backoff_base_ms: 1,
            backoff_cap_ms: 1,
            max_attempts: 1,
            timeout_ms: 1,
        };
        let key = config("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .key()
            .unwrap();
        assert_eq!(
            signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(config("whsec_***").key().is_err());
        assert!(config("whsec_").key().is_err());
    }
}
