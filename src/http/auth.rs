//! Checks that a submission comes from its source: an API key, or an HMAC-SHA256 signature of
//! the raw body as the vendors send them. Comparisons are constant-time.

use axum::http::HeaderMap;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{SignatureEncoding, SourceAuth};

/// `Ok` or why not (no secret in the message). `now` is the Unix time in seconds.
pub fn verify(auth: &SourceAuth, headers: &HeaderMap, body: &[u8], now: u64) -> Result<(), String> {
    match auth {
        SourceAuth::StandardWebhooks {
            secret,
            tolerance_seconds,
        } => {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| format!("missing `{name}` header"))
            };
            let (id, timestamp, signatures) = (
                header("webhook-id")?,
                header("webhook-timestamp")?,
                header("webhook-signature")?,
            );
            let ts: u64 = timestamp
                .trim()
                .parse()
                .map_err(|_| "`webhook-timestamp` is not a Unix time".to_string())?;
            if ts.abs_diff(now) > *tolerance_seconds {
                return Err(
                    "`webhook-timestamp` is outside the accepted window (replayed or clock skew)"
                        .into(),
                );
            }
            let key = standard_webhooks_key(secret)?;
            let mut mac =
                Hmac::<Sha256>::new_from_slice(&key).map_err(|_| "unusable secret".to_string())?;
            mac.update(format!("{id}.{ts}.").as_bytes());
            mac.update(body);
            let expected = mac.finalize().into_bytes();
            let matched = signatures
                .split_whitespace()
                .filter_map(|s| s.strip_prefix("v1,"))
                .filter_map(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .any(|sig| bool::from(sig.as_slice().ct_eq(expected.as_slice())));
            if matched {
                Ok(())
            } else {
                Err("`webhook-signature` does not match".into())
            }
        }
        SourceAuth::None => Ok(()),
        SourceAuth::ApiKey { header, key } => {
            let given = headers
                .get(header.as_str())
                .map(|v| v.as_bytes())
                .ok_or_else(|| format!("missing `{header}` header"))?;
            if bool::from(given.ct_eq(key.as_bytes())) {
                Ok(())
            } else {
                Err(format!("wrong `{header}`"))
            }
        }
        SourceAuth::Hmac {
            header,
            secret,
            prefix,
            encoding,
        } => {
            let given = headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("missing `{header}` signature header"))?;
            let given = given
                .trim()
                .strip_prefix(prefix.as_str())
                .ok_or_else(|| format!("`{header}` does not start with `{prefix}`"))?;
            let given = match encoding {
                SignatureEncoding::Base64 => {
                    base64::engine::general_purpose::STANDARD.decode(given).ok()
                }
                SignatureEncoding::Hex => hex_decode(given),
            }
            .ok_or_else(|| format!("`{header}` is not {encoding:?}-encoded"))?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .map_err(|_| "unusable secret".to_string())?;
            mac.update(body);
            mac.verify_slice(&given)
                .map_err(|_| format!("`{header}` does not match the body"))
        }
    }
}

fn standard_webhooks_key(secret: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| "the configured secret is not whsec_<base64>".to_string())
}

/// The `webhook-signature` a Standard Webhooks sender would send.
pub fn sign_standard_webhooks(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> String {
    let Ok(key) = standard_webhooks_key(secret) else {
        return String::new();
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
        return String::new();
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The signature a source would send for `body` (for tests and for documenting the scheme).
pub fn sign(secret: &str, body: &[u8], encoding: SignatureEncoding) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    match encoding {
        SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
        SignatureEncoding::Hex => bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typeform() -> SourceAuth {
        SourceAuth::Hmac {
            header: "typeform-signature".into(),
            secret: "s3cret".into(),
            prefix: "sha256=".into(),
            encoding: SignatureEncoding::Base64,
        }
    }

    #[test]
    fn typeform_signatures() {
        let body = br#"{"event_id":"1"}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "typeform-signature",
            format!("sha256={}", sign("s3cret", body, SignatureEncoding::Base64))
                .parse()
                .unwrap(),
        );
        assert_eq!(verify(&typeform(), &h, body, 0), Ok(()));
        assert!(verify(&typeform(), &h, br#"{"event_id":"2"}"#, 0).is_err());
        assert!(verify(&typeform(), &HeaderMap::new(), body, 0).is_err());
        h.insert("typeform-signature", "sha256=!!!".parse().unwrap());
        assert!(verify(&typeform(), &h, body, 0).is_err());
    }

    #[test]
    fn standard_webhooks_with_a_timestamp_window() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let auth = SourceAuth::StandardWebhooks {
            secret: secret.into(),
            tolerance_seconds: 300,
        };
        let body = br#"{"a":1}"#;
        let headers = |ts: u64, sig: String| {
            let mut h = HeaderMap::new();
            h.insert("webhook-id", "msg_1".parse().unwrap());
            h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
            h.insert("webhook-signature", sig.parse().unwrap());
            h
        };
        let now = 1_764_000_000;
        let good = headers(now, sign_standard_webhooks(secret, "msg_1", now, body));
        assert_eq!(verify(&auth, &good, body, now + 10), Ok(()));
        // Replayed an hour later: refused though the signature is right.
        assert!(verify(&auth, &good, body, now + 3600)
            .unwrap_err()
            .contains("window"));
        assert!(verify(&auth, &good, br#"{"a":2}"#, now).is_err());
        let several = headers(
            now,
            format!(
                "v1,AAAA {}",
                sign_standard_webhooks(secret, "msg_1", now, body)
            ),
        );
        assert_eq!(verify(&auth, &several, body, now), Ok(()));
    }

    #[test]
    fn api_keys() {
        let auth = SourceAuth::ApiKey {
            header: "x-api-key".into(),
            key: "k1".into(),
        };
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k1".parse().unwrap());
        assert_eq!(verify(&auth, &h, b"", 0), Ok(()));
        h.insert("x-api-key", "k2".parse().unwrap());
        assert!(verify(&auth, &h, b"", 0).is_err());
    }
}
