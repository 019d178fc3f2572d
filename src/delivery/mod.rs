//! Delivery to the EHR. The policy here is pure: reading a `transaction-response` into the
//! resources the EHR stored, telling a retryable failure from a permanent rejection, and when to
//! try again. `client` speaks to the EHR's FHIR API, `ehr` makes and records one attempt, and
//! `outbox` runs every receiver's jobs.
//!
//! Knows FHIR responses, HTTP and the store; nothing of mapping files or of the gateway's own
//! HTTP API.

pub mod auth;
pub mod client;
pub mod ehr;
pub mod outbox;
pub mod webhook;

use std::ops::Range;
use std::time::Duration;

use serde_json::Value;

use crate::store::EhrResource;

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Every entry stored: the resources as the EHR has them.
    Delivered(Vec<EhrResource>),
    /// Try again later (network error, 408, 425, 429, 5xx), after at least `retry_after` if the
    /// EHR said so.
    Retry {
        failure: Failure,
        retry_after: Option<Duration>,
    },
    /// The EHR rejected the Bundle (other 4xx, or an answer that is not a transaction-response):
    /// retrying the same Bundle cannot succeed.
    Reject(Failure),
}

impl Attempt {
    /// The same attempt, saying which part of the delivery it is about.
    pub fn within(self, part: &str) -> Attempt {
        match self {
            Attempt::Retry {
                failure,
                retry_after,
            } => Attempt::Retry {
                failure: failure.within(part),
                retry_after,
            },
            Attempt::Reject(failure) => Attempt::Reject(failure.within(part)),
            delivered => delivered,
        }
    }
}

/// Why an attempt did not deliver, in fields: the token refresh after a 401 reads the status,
/// the log line leaves out the EHR's text — nothing is parsed back out of a sentence.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Failure {
    /// Which part of the delivery failed (`part 2 of 3 (entries 8–12)`, `entry 0 (Patient)`),
    /// outermost first.
    pub part: Option<String>,
    /// The EHR's HTTP status, when it answered with one.
    pub status: Option<u16>,
    /// What happened, in the gateway's own words (`EHR unreachable`, where a redirect points).
    pub what: Option<String>,
    /// The EHR's own text (its OperationOutcome's diagnostics). Some servers quote the values
    /// they refuse: kept in the submission's status for operators, never logged.
    pub ehr_text: Option<String>,
    /// What an operator can do about it.
    pub hint: Option<String>,
}

impl Failure {
    /// The EHR answered `status`, saying `text`.
    pub fn answered(status: u16, text: Option<String>) -> Failure {
        Failure {
            status: Some(status),
            ehr_text: text,
            ..Failure::default()
        }
    }

    /// The gateway's own account (no answer of the EHR's to quote).
    pub fn said(what: impl Into<String>) -> Failure {
        Failure {
            what: Some(what.into()),
            ..Failure::default()
        }
    }

    pub fn saying(mut self, what: impl Into<String>) -> Failure {
        self.what = Some(what.into());
        self
    }

    pub fn hinting(mut self, hint: impl Into<String>) -> Failure {
        self.hint = Some(hint.into());
        self
    }

    /// The same failure, as the failure of `part` of a larger delivery.
    pub fn within(mut self, part: &str) -> Failure {
        self.part = Some(match self.part.take() {
            Some(inner) => format!("{part}: {inner}"),
            None => part.to_string(),
        });
        self
    }

    /// The whole account, as the submission's status keeps it: part, status, the gateway's
    /// words, the EHR's text, the hint.
    pub fn reason(&self) -> String {
        let mut pieces: Vec<String> = Vec::with_capacity(4);
        pieces.extend(self.part.clone());
        pieces.extend(self.status.map(|s| format!("HTTP {s}")));
        pieces.extend(self.what.clone());
        pieces.extend(self.ehr_text.clone());
        let mut reason = pieces.join(": ");
        if let Some(hint) = &self.hint {
            reason.push_str(" — ");
            reason.push_str(hint);
        }
        reason
    }

    /// What may be logged: the part and the EHR's status (or, without one, the gateway's own
    /// words) — never the EHR's text, which may quote PHI.
    pub fn loggable(&self) -> String {
        let said = match self.status {
            Some(s) => Some(format!("HTTP {s}")),
            None => self.what.clone(),
        };
        [self.part.clone(), said]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ")
    }
}

/// A transaction Bundle's entries cut into consecutive parts of at most `max` entries, for an
/// EHR that refuses longer transactions: each part is posted once the ones before it are
/// stored, its references to their entries rewritten to the ids the EHR gave them. A part never
/// ends between an entry and a later one it references (that one has no id yet to rewrite
/// to): such a run stays in one part, even past `max`. `max` 0 is read as 1.
pub fn transaction_parts(entries: &[Value], max: usize) -> Vec<Range<usize>> {
    let max = max.max(1);
    let index: std::collections::HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((e.get("fullUrl")?.as_str()?, i)))
        .collect();
    let mut parts = Vec::new();
    let (mut start, mut reach) = (0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let mut referenced = Vec::new();
        if let Some(resource) = entry.get("resource") {
            references(resource, &mut referenced);
        }
        reach = referenced
            .iter()
            .filter_map(|r| index.get(r).copied())
            .fold(reach.max(i), usize::max);
        if i + 1 - start >= max && reach <= i {
            parts.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < entries.len() {
        parts.push(start..entries.len());
    }
    parts
}

/// What became of a request that got no answer, in a few words (never the URL or the body).
pub fn unanswered(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "unreachable"
    } else {
        "request failed"
    }
}

/// Every `reference` in `value`, however deep.
pub fn references<'v>(value: &'v Value, found: &mut Vec<&'v str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if key == "reference" => found.push(s),
                    other => references(other, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, found)),
        _ => {}
    }
}

/// Classifies the EHR's answer to a `transaction` POST; `retry_after` is how long the EHR
/// asked to be left alone (`wait_asked`).
pub fn classify(status: u16, retry_after: Option<Duration>, body: &Value) -> Attempt {
    match status {
        200..=299 => match read_transaction_response(body) {
            Ok(resources) => Attempt::Delivered(resources),
            Err(why) => Attempt::Reject(Failure::said(why)),
        },
        408 | 425 | 429 | 500..=599 => Attempt::Retry {
            failure: Failure::answered(status, outcome_text(body)),
            retry_after,
        },
        _ => Attempt::Reject(Failure::answered(
            status,
            Some(outcome_text(body).unwrap_or_else(|| "no OperationOutcome".to_string())),
        )),
    }
}

/// The resources a `transaction-response` reports, from each entry's `response.location`
/// (`Observation/123/_history/2`) and `etag` (`W/"2"`), or the version of the `resource` the
/// entry returns.
pub fn read_transaction_response(body: &Value) -> Result<Vec<EhrResource>, String> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || body.get("type").and_then(Value::as_str) != Some("transaction-response")
    {
        return Err("the EHR's answer is not a transaction-response Bundle".to_string());
    }
    let entries = body
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let response = &e["response"];
            let location = response["location"]
                .as_str()
                .or_else(|| e["fullUrl"].as_str())
                .ok_or_else(|| format!("entry {i} has no location"))?;
            let etag = response["etag"].as_str();
            let mut stored = located(location, etag)
                .ok_or_else(|| format!("entry {i}: location is not Type/id"))?;
            // Medplum names neither in the response, but returns the resource.
            if stored.version.is_none() {
                if let Some(version) = e["resource"]["meta"]["versionId"].as_str() {
                    stored.etag = Some(format!("W/\"{version}\""));
                    stored.version = Some(version.to_string());
                }
            }
            Ok(stored)
        })
        .collect()
}

/// The longest wait an EHR's answer is taken at its word for (a day): one that asks for more
/// is asked again after it.
pub const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// The resource a `Location` names (`…/Observation/123/_history/2`, `Observation/123`), its
/// version from there or from the `ETag` (`W/"2"`).
pub fn located(location: &str, etag: Option<&str>) -> Option<EhrResource> {
    let mut parts = location.rsplit("/_history/");
    let (path, version) = match (parts.next(), parts.next()) {
        (Some(v), Some(p)) => (p, Some(v.to_string())),
        _ => (location, None),
    };
    let mut segments = path.trim_end_matches('/').rsplit('/');
    let (Some(id), Some(resource_type)) = (segments.next(), segments.next()) else {
        return None;
    };
    let version = version.or_else(|| etag.map(version_of));
    Some(EhrResource {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        etag: etag
            .map(str::to_string)
            .or_else(|| version.as_ref().map(|v| format!("W/\"{v}\""))),
        version,
    })
}

/// The version an `ETag` holds: `W/"2"` → `2`.
fn version_of(etag: &str) -> String {
    etag.trim_start_matches("W/").trim_matches('"').to_string()
}

/// How long the EHR asked to be left alone, `now`, from its answer's headers (`header` reads
/// one by its lower-case name): `Retry-After` as seconds or as an HTTP-date (RFC 9110's
/// IMF-fixdate; a date past is no wait); without it, the `RateLimit` header (IETF httpapi
/// draft, as Medplum sends it: `"requests";r=0;t=30, "fhirInteractions";r=12;t=30`) — the
/// longest `t` (seconds until the window resets) of a policy with nothing `r`emaining —, or
/// `X-RateLimit-Remaining: 0` with `X-RateLimit-Reset` (as Medplum documented it before: the
/// reset in Unix seconds; a small number is read as seconds from now, as other APIs send it).
/// Never more than `MAX_WAIT`.
pub fn wait_asked<'h>(
    header: impl Fn(&str) -> Option<&'h str>,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let until = |unix: u64| {
        (std::time::UNIX_EPOCH + Duration::from_secs(unix))
            .duration_since(now)
            .unwrap_or_default()
    };
    let retry_after = header("retry-after")
        .map(str::trim)
        .and_then(|v| match v.parse::<u64>() {
            Ok(seconds) => Some(Duration::from_secs(seconds)),
            Err(_) => chrono::DateTime::parse_from_rfc2822(v)
                .ok()
                .map(|at| until(u64::try_from(at.timestamp()).unwrap_or(0))),
        });
    let x_rate_limit = || {
        let number = |name| header(name)?.trim().parse::<u64>().ok();
        // A time is no earlier than a day ago; anything smaller is a number of seconds.
        let a_day_ago = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().saturating_sub(86_400));
        match (
            number("x-ratelimit-remaining")?,
            number("x-ratelimit-reset")?,
        ) {
            (0, reset) if reset >= a_day_ago => Some(until(reset)),
            (0, seconds) => Some(Duration::from_secs(seconds)),
            _ => None,
        }
    };
    retry_after
        .or_else(|| header("ratelimit").and_then(exhausted_window))
        .or_else(x_rate_limit)
        .map(|wait| wait.min(MAX_WAIT))
}

/// The longest reset time of a `RateLimit` header's policies that have nothing remaining.
fn exhausted_window(rate_limit: &str) -> Option<Duration> {
    rate_limit
        .split(',')
        .filter_map(|policy| {
            let param = |name: &str| {
                policy.split(';').skip(1).find_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    (k.trim() == name).then(|| v.trim().parse::<u64>().ok())?
                })
            };
            (param("r")? == 0).then(|| param("t"))?
        })
        .max()
        .map(Duration::from_secs)
}

/// Exponential backoff with full jitter: a delay in `[0, min(cap, base·2^attempt)]`, never
/// shorter than the EHR's `Retry-After`. `jitter` is a number in `[0, 1)` from the caller.
pub fn backoff(
    attempt: u32,
    base: Duration,
    cap: Duration,
    jitter: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(cap);
    let delay = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
    retry_after.map_or(delay, |r| delay.max(r))
}

fn outcome_text(body: &Value) -> Option<String> {
    let issues = body.get("issue")?.as_array()?;
    let texts: Vec<String> = issues
        .iter()
        .filter_map(|i| {
            let text = i["diagnostics"]
                .as_str()
                .or_else(|| i["details"]["text"].as_str())?;
            let at = i["expression"][0]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            Some(format!("{text}{at}"))
        })
        .collect();
    (!texts.is_empty()).then(|| texts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_are_classified() {
        assert!(
            matches!(classify(503, Some(Duration::from_secs(7)), &Value::Null), Attempt::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(matches!(
            classify(429, None, &Value::Null),
            Attempt::Retry {
                retry_after: None,
                ..
            }
        ));
        let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
            "details": {"text": "Invalid value"}, "expression": ["Bundle.entry[3].resource.status"]}]});
        let Attempt::Reject(rejected) = classify(400, None, &oo) else {
            panic!("a 400 is a rejection");
        };
        assert_eq!(rejected.status, Some(400));
        assert_eq!(
            rejected.reason(),
            "HTTP 400: Invalid value (Bundle.entry[3].resource.status)"
        );
        assert!(matches!(
            classify(200, None, &json!({"resourceType": "OperationOutcome"})),
            Attempt::Reject(Failure { status: None, .. })
        ));
    }

    #[test]
    fn locations_and_etags_are_read() {
        let body = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201", "location": "Observation/o1/_history/3", "etag": "W/\"3\""}},
            {"response": {"status": "200", "location": "http://ehr/fhir/Patient/p1", "etag": "W/\"v9\""}}]});
        let r = read_transaction_response(&body).unwrap();
        assert_eq!(
            r[0],
            EhrResource {
                resource_type: "Observation".into(),
                id: "o1".into(),
                version: Some("3".into()),
                etag: Some("W/\"3\"".into())
            }
        );
        assert_eq!(
            (
                r[1].resource_type.as_str(),
                r[1].id.as_str(),
                r[1].version.as_deref()
            ),
            ("Patient", "p1", Some("v9"))
        );
        // As Medplum answers: a location without a version, the resource returned.
        let medplum = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "200", "location": "Patient/p1"},
             "resource": {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "5b1e"}}}]});
        let r = read_transaction_response(&medplum).unwrap();
        assert_eq!(
            (r[0].version.as_deref(), r[0].etag.as_deref()),
            (Some("5b1e"), Some("W/\"5b1e\""))
        );
    }

    fn entries(refs: &[&[usize]]) -> Vec<Value> {
        refs.iter()
            .enumerate()
            .map(|(i, to)| {
                let refs: Vec<Value> = to
                    .iter()
                    .map(|t| json!({"reference": format!("urn:uuid:{t}")}))
                    .collect();
                json!({"fullUrl": format!("urn:uuid:{i}"), "resource": {"focus": refs}})
            })
            .collect()
    }

    #[test]
    fn parts_hold_at_most_max_entries_in_order() {
        // A Patient, a response naming it, five Observations naming both, a Provenance naming all.
        let e = entries(&[
            &[],
            &[0],
            &[0, 1],
            &[0, 1],
            &[0, 1],
            &[0, 1],
            &[0, 1],
            &[1, 2, 3, 4, 5, 6],
        ]);
        assert_eq!(transaction_parts(&e, 8), vec![0..8]);
        assert_eq!(transaction_parts(&e, 3), vec![0..3, 3..6, 6..8]);
        assert_eq!(transaction_parts(&e, 1).len(), 8);
        assert_eq!(transaction_parts(&e, 0).len(), 8);
        assert_eq!(transaction_parts(&[], 8), Vec::<Range<usize>>::new());
    }

    #[test]
    fn a_part_never_ends_before_an_entry_its_entries_reference() {
        // Entry 1 (a panel) lists 2 and 3 (its members) ahead of them.
        let e = entries(&[&[], &[2, 3], &[0], &[0], &[0]]);
        assert_eq!(transaction_parts(&e, 2), vec![0..4, 4..5]);
        // A reference outside the Bundle (an earlier revision's) binds nothing.
        let mut e = entries(&[&[], &[0], &[0]]);
        e[0]["resource"]["focus"] = json!([{"reference": "Patient/elsewhere"}]);
        assert_eq!(transaction_parts(&e, 1), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn logs_get_the_status_not_what_the_ehr_said_about_the_values() {
        let refused = Failure::answered(400, Some(r#"Invalid value "Maya Smith""#.into()))
            .within("entry 0 (Patient)");
        assert_eq!(refused.loggable(), "entry 0 (Patient): HTTP 400");
        assert_eq!(
            refused.reason(),
            r#"entry 0 (Patient): HTTP 400: Invalid value "Maya Smith""#
        );
        assert_eq!(Failure::answered(503, None).loggable(), "HTTP 503");
        assert_eq!(
            Failure::said("EHR unreachable").loggable(),
            "EHR unreachable"
        );
        let token = Failure::said("no access token: the token endpoint answered HTTP 401");
        assert_eq!(
            token.status, None,
            "the token endpoint's status is not the EHR's"
        );
        let redirect = Failure::answered(301, None).saying("the EHR redirects to http://x");
        assert_eq!(redirect.loggable(), "HTTP 301");
        assert_eq!(redirect.reason(), "HTTP 301: the EHR redirects to http://x");
    }

    #[test]
    fn an_attempt_says_which_part_it_is_about() {
        let reject = Attempt::Reject(Failure::answered(400, Some("no".into())));
        let Attempt::Reject(within) = reject.within("part 2 of 3").within("outer") else {
            panic!("still a rejection");
        };
        assert_eq!(within.reason(), "outer: part 2 of 3: HTTP 400: no");
        assert_eq!(within.status, Some(400));
        assert_eq!(
            Attempt::Delivered(vec![]).within("x"),
            Attempt::Delivered(vec![])
        );
    }

    #[test]
    fn the_wait_asked_is_read_from_retry_after_or_rate_limits() {
        use std::time::{SystemTime, UNIX_EPOCH};
        // Sun, 06 Nov 1994 08:49:37 GMT
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let wait = |headers: &[(&str, &'static str)]| {
            let headers = headers.to_vec();
            wait_asked(
                |name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
                now,
            )
        };
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(wait(&[("retry-after", " 120 ")]), secs(120));
        assert_eq!(
            wait(&[("retry-after", "Sun, 06 Nov 1994 08:50:07 GMT")]),
            secs(30)
        );
        assert_eq!(
            wait(&[("retry-after", "Sun, 06 Nov 1994 08:49:00 GMT")]),
            Some(Duration::ZERO),
            "a date past: no wait"
        );
        let medplum = r#""requests";r=0;t=42, "fhirInteractions";r=0;t=7"#;
        assert_eq!(wait(&[("ratelimit", medplum)]), secs(42));
        let left = r#""requests";r=59999;t=60, "fhirInteractions";r=0;t=9"#;
        assert_eq!(wait(&[("ratelimit", left)]), secs(9));
        assert_eq!(wait(&[("ratelimit", r#""requests";r=5;t=60"#)]), None);
        assert_eq!(
            wait(&[("retry-after", "soon"), ("ratelimit", "garbage")]),
            None
        );
        assert_eq!(
            wait(&[("retry-after", "3"), ("ratelimit", medplum)]),
            secs(3),
            "Retry-After first"
        );
        let x = |remaining, reset| {
            wait(&[
                ("x-ratelimit-remaining", remaining),
                ("x-ratelimit-reset", reset),
            ])
        };
        assert_eq!(x("0", "784111837"), secs(60), "Unix seconds");
        assert_eq!(x("0", "15"), secs(15), "seconds from now");
        assert_eq!(x("599", "784111837"), None, "requests remain");
        assert_eq!(
            wait(&[("retry-after", "18446744073709551615")]),
            Some(MAX_WAIT),
            "an EHR's wait is capped (a Duration past it would overflow the schedule)"
        );
        assert!(SystemTime::now() > now);
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let (base, cap) = (Duration::from_millis(500), Duration::from_secs(60));
        assert_eq!(backoff(0, base, cap, 0.999_999, None).as_millis(), 499);
        assert_eq!(backoff(3, base, cap, 0.5, None), Duration::from_secs(2));
        assert_eq!(backoff(40, base, cap, 0.5, None), Duration::from_secs(30));
        assert_eq!(
            backoff(0, base, cap, 0.0, Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
    }
}
