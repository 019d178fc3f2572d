//! Checks that a submission comes from its source: an API key, or an HMAC-SHA256 signature as
//! the vendors send them — of the raw body (Typeform, Tally), of an id, a timestamp and the body
//! (Standard Webhooks), or of the request line and a digest of the body (Healthie).
//! Comparisons are constant-time.

use axum::http::HeaderMap;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{SignatureEncoding, SourceAuth};

/// The request line a signature may cover.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Without its `?`; empty when there is none.
    pub query: &'a str,
}

/// `Ok` or why not (no secret in the message). `now` is the Unix time in seconds.
pub fn verify(
    auth: &SourceAuth,
    target: &Target,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<(), String> {
    match auth {
        SourceAuth::Healthie {
            secret,
            signed_path,
        } => {
            // What the sender signed: the path before a proxy rewrote it, when configured.
            let target = Target {
                path: signed_path.as_deref().unwrap_or(target.path),
                ..*target
            };
            healthie(secret, &target, headers, body)
        }
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

/// Checks an events sender's credentials (`[ehr.events] auth`, `[events.<name>]`): its bearer
/// token, or its HMAC-SHA256 of the raw body (Medplum's `X-Signature`: hex, no prefix). `Ok` or
/// why not (never the secret).
pub fn verify_events(
    auth: &crate::config::EventsAuth,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    match auth {
        crate::config::EventsAuth::Bearer { token } => {
            let given = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or("missing `Authorization: Bearer <token>`")?;
            // Digests compared, so that the time taken says nothing of the token's length.
            let digest = |t: &str| <Sha256 as sha2::Digest>::digest(t.as_bytes());
            if bool::from(digest(given.trim()).ct_eq(&digest(token))) {
                Ok(())
            } else {
                Err("wrong bearer token".into())
            }
        }
        crate::config::EventsAuth::Hmac {
            header,
            encoding,
            secret,
        } => verify(
            &SourceAuth::Hmac {
                header: header.clone(),
                secret: secret.clone(),
                prefix: String::new(),
                encoding: *encoding,
            },
            &Target {
                method: "POST",
                path: "",
                query: "",
            },
            headers,
            body,
            0,
        ),
    }
}

/// Who an operator's request (`Authorization: Bearer <key>`) is from: the one of `keys`
/// (who, the SHA-256 of their key; `Config::operator_keys`) whose key it presents — its
/// digest compared with every one in constant time, so the time taken says nothing of which
/// came close, nor of a key's length. A refusal says which kind of key is wanted: the admin
/// key, an operator's own, or either, as configured.
pub fn operator<'k>(
    keys: &'k [(String, [u8; 32])],
    headers: &HeaderMap,
) -> Result<&'k str, String> {
    let admin = keys.iter().any(|(who, _)| who.starts_with("admin key"));
    let named = keys.iter().any(|(who, _)| who.starts_with("operator "));
    let wanted = match (admin, named) {
        (true, true) => "your operator key or the admin key",
        (false, true) => "your operator key",
        _ => "the admin key",
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            format!("this endpoint is for operators: send `Authorization: Bearer <{wanted}>`")
        })?;
    let given: [u8; 32] = <Sha256 as sha2::Digest>::digest(given.trim().as_bytes()).into();
    let mut found = None;
    for (who, digest) in keys {
        if bool::from(given.ct_eq(digest)) {
            found = Some(who.as_str());
        }
    }
    found.ok_or_else(|| format!("the key given is not {wanted}"))
}

/// How many refused operator attempts the audit trail records one by one: `per_second` on
/// average, in bursts of up to `burst`. Beyond that (a script hammering the endpoints without
/// the key) refusals are still refused, but only counted — the count goes into the next entry
/// the trail records — so that they cannot fill the disk one entry each.
pub struct RefusalBudget {
    per_second: f64,
    burst: f64,
    /// Tokens left, and when they were counted.
    tokens: std::sync::Mutex<(f64, std::time::Instant)>,
    unrecorded: std::sync::atomic::AtomicU64,
}

impl RefusalBudget {
    pub fn new(per_second: f64, burst: f64, now: std::time::Instant) -> RefusalBudget {
        RefusalBudget {
            per_second,
            burst,
            tokens: std::sync::Mutex::new((burst, now)),
            unrecorded: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether a refusal at `now` is recorded; if not, it is counted.
    pub fn record(&self, now: std::time::Instant) -> bool {
        let recorded = match self.tokens.lock() {
            Ok(mut t) => {
                let (tokens, then) = *t;
                let refilled = (tokens
                    + now.saturating_duration_since(then).as_secs_f64() * self.per_second)
                    .min(self.burst);
                let recorded = refilled >= 1.0;
                *t = (if recorded { refilled - 1.0 } else { refilled }, now);
                recorded
            }
            // A poisoned lock (a panic elsewhere): record, as without a budget.
            Err(_) => true,
        };
        if !recorded {
            self.unrecorded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        recorded
    }

    /// The refusals counted since the last call (the count starts again).
    pub fn take_unrecorded(&self) -> u64 {
        self.unrecorded
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Puts back a count that could not be recorded after all.
    pub fn put_back(&self, n: u64) {
        self.unrecorded
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Healthie's signed webhooks: `Content-Digest: SHA-256=<digest of the body>`, and
/// `Signature: sig1=<hex HMAC-SHA256>` of `"<method> <path> <query> <digest> application/json
/// <body length>"` (method in lower case), as Healthie's webhook guide builds it. The HMAC
/// covers the digest, not the body: the digest is checked against the body here.
fn healthie(secret: &str, target: &Target, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("missing `{name}` header"))
    };
    let digest_header = header("content-digest")?;
    let signature = header("signature")?;
    // As Healthie's own verifiers read them: what follows the first `=`, up to any next one.
    let digest = digest_header.split('=').nth(1).unwrap_or("").trim();
    let algorithm = digest_header.split('=').next().unwrap_or("").trim();
    if !algorithm.eq_ignore_ascii_case("sha-256") {
        return Err("`content-digest` is not a SHA-256 digest".into());
    }
    if !digest_of(body, digest_header) {
        return Err("`content-digest` does not match the body".into());
    }
    let given = signature
        .split('=')
        .nth(1)
        .and_then(|s| hex_decode(s.trim()))
        .ok_or_else(|| "`signature` is not sig1=<hex>".to_string())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| "unusable secret".to_string())?;
    mac.update(healthie_signed(target, digest, body.len()).as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| "`signature` does not match the request".into())
}

fn healthie_signed(target: &Target, digest: &str, len: usize) -> String {
    format!(
        "{} {} {} {digest} application/json {len}",
        target.method.to_ascii_lowercase(),
        target.path,
        target.query
    )
}

/// Whether `content-digest` (`SHA-256=` then hex, base64, or RFC 9530's `:base64:`) is the
/// body's SHA-256.
fn digest_of(body: &[u8], content_digest: &str) -> bool {
    let Some((_, value)) = content_digest.split_once('=') else {
        return false;
    };
    let value = value.trim();
    let value = value
        .strip_prefix(':')
        .and_then(|v| v.strip_suffix(':'))
        .unwrap_or(value);
    let given = hex_decode(value)
        .filter(|d| d.len() == 32)
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(value).ok())
        .or_else(|| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(value)
                .ok()
        });
    let actual = <Sha256 as sha2::Digest>::digest(body);
    given.is_some_and(|g| bool::from(g.as_slice().ct_eq(actual.as_slice())))
}

/// The `Content-Digest` and `Signature` headers Healthie would send for `body` to `target`.
pub fn sign_healthie(secret: &str, target: &Target, body: &[u8]) -> (String, String) {
    let digest: String = <Sha256 as sha2::Digest>::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return (String::new(), String::new());
    };
    mac.update(healthie_signed(target, &digest, body.len()).as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (format!("SHA-256={digest}"), format!("sig1={sig}"))
}

fn standard_webhooks_key(secret: &str) -> Result<Vec<u8>, String> {
    crate::config::whsec_key(secret).map_err(|why| format!("the configured secret: {why}"))
}

/// The `webhook-signature` a Standard Webhooks sender would send.
pub fn sign_standard_webhooks(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> String {
    standard_webhooks_key(secret)
        .map(|key| crate::delivery::webhook::signature(&key, id, timestamp, body))
        .unwrap_or_default()
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

    const T: Target = Target {
        method: "POST",
        path: "/submissions/x",
        query: "",
    };

    fn typeform() -> SourceAuth {
        SourceAuth::Hmac {
            header: "typeform-signature".into(),
            secret: "s3cret".into(),
            prefix: "sha256=".into(),
            encoding: SignatureEncoding::Base64,
        }
    }

    #[test]
    fn an_operators_refusal_names_the_key_wanted() {
        let digest =
            |key: &str| -> [u8; 32] { <Sha256 as sha2::Digest>::digest(key.as_bytes()).into() };
        let admin = || ("admin key 0123".to_string(), digest("admin-secret"));
        let alice = || ("operator alice".to_string(), digest("alice-secret"));
        let bearer = |key: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::header::AUTHORIZATION,
                format!("Bearer {key}").parse().unwrap(),
            );
            h
        };
        let both = [admin(), alice()];
        assert_eq!(
            operator(&both, &bearer("alice-secret")),
            Ok("operator alice")
        );
        assert_eq!(
            operator(&both, &bearer("admin-secret")),
            Ok("admin key 0123")
        );
        assert_eq!(
            operator(&both, &bearer("guess")),
            Err("the key given is not your operator key or the admin key".into())
        );
        assert_eq!(
            operator(&[alice()], &HeaderMap::new()),
            Err(
                "this endpoint is for operators: send `Authorization: Bearer <your operator key>`"
                    .into()
            )
        );
        assert_eq!(
            operator(&[admin()], &bearer("alice-secret")),
            Err("the key given is not the admin key".into())
        );
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
        assert_eq!(verify(&typeform(), &T, &h, body, 0), Ok(()));
        assert!(verify(&typeform(), &T, &h, br#"{"event_id":"2"}"#, 0).is_err());
        assert!(verify(&typeform(), &T, &HeaderMap::new(), body, 0).is_err());
        h.insert("typeform-signature", "sha256=!!!".parse().unwrap());
        assert!(verify(&typeform(), &T, &h, body, 0).is_err());
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
        assert_eq!(verify(&auth, &T, &good, body, now + 10), Ok(()));
        // Replayed an hour later: refused though the signature is right.
        assert!(verify(&auth, &T, &good, body, now + 3600)
            .unwrap_err()
            .contains("window"));
        assert!(verify(&auth, &T, &good, br#"{"a":2}"#, now).is_err());
        let several = headers(
            now,
            format!(
                "v1,AAAA {}",
                sign_standard_webhooks(secret, "msg_1", now, body)
            ),
        );
        assert_eq!(verify(&auth, &T, &several, body, now), Ok(()));
    }

    #[test]
    fn api_keys() {
        let auth = SourceAuth::ApiKey {
            header: "x-api-key".into(),
            key: "k1".into(),
        };
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k1".parse().unwrap());
        assert_eq!(verify(&auth, &T, &h, b"", 0), Ok(()));
        h.insert("x-api-key", "k2".parse().unwrap());
        assert!(verify(&auth, &T, &h, b"", 0).is_err());
    }

    #[test]
    fn healthie_signatures_cover_the_request_line_and_the_body_digest() {
        let auth = SourceAuth::Healthie {
            secret: "hs3cret".into(),
            signed_path: None,
        };
        let body = br#"{"resource_id":"1","resource_id_type":"FormAnswerGroup"}"#;
        let (digest, signature) = sign_healthie("hs3cret", &T, body);
        let headers = |digest: &str, signature: &str| {
            let mut h = HeaderMap::new();
            h.insert("content-digest", digest.parse().unwrap());
            h.insert("signature", signature.parse().unwrap());
            h.insert(
                "signature-input",
                "sig1=(\"@method\" \"@path\")".parse().unwrap(),
            );
            h
        };
        let good = headers(&digest, &signature);
        assert_eq!(verify(&auth, &T, &good, body, 0), Ok(()));
        // Another body under the same headers: its digest does not match.
        let other = br#"{"resource_id":"2","resource_id_type":"FormAnswerGroup"}"#;
        assert!(verify(&auth, &T, &good, other, 0)
            .unwrap_err()
            .contains("content-digest"));
        // The digest of another body, with the signature made for the first: refused.
        let (other_digest, _) = sign_healthie("hs3cret", &T, other);
        assert!(verify(&auth, &T, &headers(&other_digest, &signature), other, 0).is_err());
        // Another path, or another secret.
        let elsewhere = Target {
            path: "/submissions/y",
            ..T
        };
        assert!(verify(&auth, &elsewhere, &good, body, 0).is_err());
        let (_, forged) = sign_healthie("other", &T, body);
        assert!(verify(&auth, &T, &headers(&digest, &forged), body, 0).is_err());
        assert!(verify(&auth, &T, &HeaderMap::new(), body, 0).is_err());
        // The digest in base64 (RFC 9530 style) is the same digest.
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(<Sha256 as sha2::Digest>::digest(body));
        assert!(digest_of(body, &format!("sha-256=:{b64}:")));
        assert!(!digest_of(other, &format!("sha-256=:{b64}:")));

        // Behind a proxy that strips a prefix: Healthie signed the public path.
        let public = Target {
            path: "/chartbridge/submissions/x",
            ..T
        };
        let (digest, signature) = sign_healthie("hs3cret", &public, body);
        let proxied = headers(&digest, &signature);
        assert!(verify(&auth, &T, &proxied, body, 0).is_err());
        let behind_proxy = SourceAuth::Healthie {
            secret: "hs3cret".into(),
            signed_path: Some("/chartbridge/submissions/x".into()),
        };
        assert_eq!(verify(&behind_proxy, &T, &proxied, body, 0), Ok(()));
        assert!(verify(&behind_proxy, &T, &good, body, 0).is_err());
    }

    #[test]
    fn refusals_beyond_the_budget_are_counted_not_recorded() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let budget = RefusalBudget::new(2.0, 3.0, t0);
        let recorded: Vec<bool> = (0..5).map(|_| budget.record(t0)).collect();
        assert_eq!(recorded, [true, true, true, false, false]);
        assert_eq!(budget.take_unrecorded(), 2);
        assert_eq!(budget.take_unrecorded(), 0);
        // Half a second refills one; never more than the burst.
        assert!(budget.record(t0 + Duration::from_millis(500)));
        assert!(!budget.record(t0 + Duration::from_millis(500)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..4).filter(|_| budget.record(later)).count(), 3);
        assert_eq!(budget.take_unrecorded(), 2);
        budget.put_back(5);
        assert_eq!(budget.take_unrecorded(), 5);
    }
}
