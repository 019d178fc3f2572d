//! The shapes EHR events arrive in, read into what they are about. Pure: the body in, a
//! `Notification` (or why it cannot be one) out.
//!
//! - **R4 Subscriptions Backport** (what most R4 EHRs that push at all send): a `history` Bundle
//!   whose first entry is a `Parameters` holding the SubscriptionStatus — `type` says
//!   `handshake`, `heartbeat`, `event-notification`, `query-status`, `query-event` or `error`;
//!   each `notification-event` has an `event-number` and a `focus`. With `full-resource`
//!   content the focus is in the Bundle; with `id-only` only its reference is (the gateway
//!   reads it from the EHR).
//! - **R5** `subscription-notification` Bundles: the same, with a `SubscriptionStatus` resource.
//! - **A bare resource**, as Medplum's rest-hook posts it (the version that fired; `{}` for a
//!   delete).
//!
//! Each event is named for de-duplication: by its subscription and event number when the
//! EHR numbers them, else by the resource's version.

use serde_json::Value;

/// The most events one notification may carry: more is refused whole (a clear 413), never
/// taken in part.
pub const MAX_EVENTS: usize = 100;

/// What a notification is.
#[derive(Debug, Clone, PartialEq)]
pub enum Notification {
    /// A handshake, heartbeat, status query or error report: answered, recorded, nothing sent.
    Status {
        kind: String,
        subscription: Option<String>,
    },
    /// Events about resources.
    Events(Vec<Notice>),
    /// A resource deleted (Medplum posts `{}`): nothing to send.
    Deleted,
}

/// One event about one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// `None`: the EHR sent the event without saying what it is about (`empty` content).
    pub focus: Option<Focus>,
    /// The resource as sent; `None` when only its reference was (id-only: read it).
    pub resource: Option<Value>,
    /// What names this event among all (`<subscription>#<event number>`, or the resource's
    /// `Type/id/_history/version`): the same name twice is the same event.
    pub seen: String,
}

/// A resource an event is about: `Type/id`, and its version if the EHR said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Focus {
    pub resource_type: String,
    pub id: String,
    pub version: Option<String>,
}

impl Focus {
    /// `Type/id`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }

    /// Reads a reference (relative, absolute, with or without `/_history/<version>`).
    pub fn parse(reference: &str) -> Option<Focus> {
        let parts: Vec<&str> = reference.trim_end_matches('/').split('/').collect();
        let (t, id, version) = match parts.as_slice() {
            [.., t, id, "_history", v] => (*t, *id, Some(v.to_string())),
            [.., t, id] => (*t, *id, None),
            _ => return None,
        };
        (is_type(t) && is_id(id)).then(|| Focus {
            resource_type: t.to_string(),
            id: id.to_string(),
            version,
        })
    }

    /// The focus of a resource: its type, id and `meta.versionId`.
    pub fn of(resource: &Value) -> Option<Focus> {
        let t = resource["resourceType"].as_str().filter(|t| is_type(t))?;
        let id = resource["id"].as_str().filter(|id| is_id(id))?;
        Some(Focus {
            resource_type: t.to_string(),
            id: id.to_string(),
            version: resource["meta"]["versionId"].as_str().map(str::to_string),
        })
    }

    /// `Type/id/_history/version`, or `Type/id` without a version.
    pub fn versioned(&self) -> String {
        match &self.version {
            Some(v) => format!("{}/_history/{v}", self.reference()),
            None => self.reference(),
        }
    }
}

fn is_type(t: &str) -> bool {
    t.len() <= 64
        && t.starts_with(|c: char| c.is_ascii_uppercase())
        && t.bytes().all(|b| b.is_ascii_alphabetic())
}

/// A FHIR id: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Why a body is not a notification the gateway reads (said to the sender as a 4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    #[error("{0}")]
    Shape(String),
    #[error("a notification of {0} events: at most {MAX_EVENTS} in one (send them in several)")]
    TooMany(usize),
}

fn shape(why: impl Into<String>) -> NotificationError {
    NotificationError::Shape(why.into())
}

/// Reads a notification.
pub fn read(body: &Value) -> Result<Notification, NotificationError> {
    match body.get("resourceType").and_then(Value::as_str) {
        None if body.as_object().is_some_and(|o| o.is_empty()) => Ok(Notification::Deleted),
        None => Err(shape("the body is not a FHIR resource (no `resourceType`)")),
        Some("Bundle") => bundle(body),
        Some(_) => {
            let focus = Focus::of(body).ok_or_else(|| {
                shape("the resource has no `id` (or an invalid one): it cannot be an event")
            })?;
            let seen = match &focus.version {
                Some(_) => focus.versioned(),
                // Without a version, the content itself names it: the same body twice is one
                // event, a changed one another.
                None => format!(
                    "{}#{}",
                    focus.reference(),
                    &crate::fhir::sha256_hex(body.to_string().as_bytes())[..16]
                ),
            };
            Ok(Notification::Events(vec![Notice {
                focus: Some(focus),
                resource: Some(body.clone()),
                seen,
            }]))
        }
    }
}

fn bundle(body: &Value) -> Result<Notification, NotificationError> {
    let entries = body["entry"].as_array().map_or(&[][..], Vec::as_slice);
    // The status, its events, and the resources that may be their focus.
    if entries.len() > MAX_EVENTS * 2 + 1 {
        return Err(NotificationError::TooMany(entries.len().saturating_sub(1)));
    }
    let status = entries.first().map(|e| &e["resource"]);
    let (kind, subscription, events) = match (body["type"].as_str(), status) {
        (Some("history"), Some(s)) if s["resourceType"] == "Parameters" => backport_r4(s)?,
        (Some("subscription-notification"), Some(s)) if s["resourceType"] == "SubscriptionStatus" => {
            r5(s)?
        }
        (Some("history" | "subscription-notification"), _) => {
            return Err(shape(
                "a notification Bundle's first entry must be its SubscriptionStatus (a `Parameters` in R4, a `SubscriptionStatus` in R5)",
            ))
        }
        (t, _) => {
            return Err(shape(format!(
                "a Bundle of type `{}` is not a subscription notification (`history` with a SubscriptionStatus, or `subscription-notification`)",
                t.unwrap_or("(none)")
            )))
        }
    };
    match kind.as_str() {
        "event-notification" | "query-event" => {}
        "handshake" | "heartbeat" | "query-status" | "error" => {
            return Ok(Notification::Status { kind, subscription })
        }
        other => return Err(shape(format!("unknown notification type `{other}`"))),
    }
    if events.len() > MAX_EVENTS {
        return Err(NotificationError::TooMany(events.len()));
    }
    let included: Vec<&Value> = entries.iter().skip(1).collect();
    let mut notices = Vec::with_capacity(events.len());
    for (i, e) in events.into_iter().enumerate() {
        // `empty` content: the event is real, but says nothing of what it is about.
        let Some(reference) = e.focus else {
            let seen = match (&subscription, &e.number) {
                (Some(s), Some(n)) => format!("{s}#{n}"),
                _ => format!(
                    "empty#{}",
                    &crate::fhir::sha256_hex(body.to_string().as_bytes())[..16]
                ),
            };
            notices.push(Notice {
                focus: None,
                resource: None,
                seen,
            });
            continue;
        };
        let mut focus = Focus::parse(&reference).ok_or_else(|| {
            shape(format!(
                "notification event {}'s focus is not a resource reference",
                i + 1
            ))
        })?;
        // full-resource: the focus is in the Bundle (by its fullUrl, or its type and id).
        let resource = included
            .iter()
            .find(|entry| {
                entry["fullUrl"].as_str() == Some(reference.as_str())
                    || Focus::of(&entry["resource"])
                        .is_some_and(|f| f.resource_type == focus.resource_type && f.id == focus.id)
            })
            .map(|entry| entry["resource"].clone())
            .filter(|r| r.is_object());
        if let Some(v) = resource
            .as_ref()
            .and_then(|r| r["meta"]["versionId"].as_str())
        {
            focus.version = Some(v.to_string());
        }
        let seen = match (&subscription, e.number) {
            (Some(s), Some(n)) => format!("{s}#{n}"),
            _ => focus.versioned(),
        };
        notices.push(Notice {
            focus: Some(focus),
            resource,
            seen,
        });
    }
    Ok(Notification::Events(notices))
}

/// One `notification-event`, as either version words it.
struct RawEvent {
    number: Option<String>,
    focus: Option<String>,
}

type Status = (String, Option<String>, Vec<RawEvent>);

fn backport_r4(parameters: &Value) -> Result<Status, NotificationError> {
    let params = parameters["parameter"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let named = |name: &str| params.iter().find(|p| p["name"] == name);
    let kind = named("type")
        .and_then(|p| p["valueCode"].as_str())
        .ok_or_else(|| shape("the SubscriptionStatus has no `type` parameter"))?;
    let subscription = named("subscription")
        .and_then(|p| p["valueReference"]["reference"].as_str())
        .map(str::to_string);
    let events = params
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| {
            let parts = p["part"].as_array().map_or(&[][..], Vec::as_slice);
            let part = |name: &str| parts.iter().find(|q| q["name"] == name);
            RawEvent {
                number: part("event-number")
                    .and_then(|q| q["valueString"].as_str().map(str::to_string)),
                focus: part("focus")
                    .and_then(|q| q["valueReference"]["reference"].as_str())
                    .map(str::to_string),
            }
        })
        .collect();
    Ok((kind.to_string(), subscription, events))
}

fn r5(status: &Value) -> Result<Status, NotificationError> {
    let kind = status["type"]
        .as_str()
        .ok_or_else(|| shape("the SubscriptionStatus has no `type`"))?;
    let subscription = status["subscription"]["reference"]
        .as_str()
        .map(str::to_string);
    let events = status["notificationEvent"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|e| RawEvent {
            number: match &e["eventNumber"] {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            },
            focus: e["focus"]["reference"].as_str().map(str::to_string),
        })
        .collect();
    Ok((kind.to_string(), subscription, events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/notifications/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    #[test]
    fn backport_examples_are_read() {
        let n = read(&fixture("Bundle-r4-notification-full-resource.json")).unwrap();
        let Notification::Events(events) = n else {
            panic!("{n:?}")
        };
        assert_eq!(events.len(), 1);
        let focus = events[0].focus.as_ref().unwrap();
        assert_eq!(
            focus.reference(),
            "Encounter/86009987-eabe-42bf-8c02-b112b18cb616"
        );
        assert!(events[0].resource.is_some(), "full-resource carries it");
        assert_eq!(
            events[0].seen,
            "https://example.org/fhir/Subscription/admission#2"
        );

        let Notification::Events(events) =
            read(&fixture("Bundle-r4-notification-id-only.json")).unwrap()
        else {
            panic!()
        };
        assert_eq!(events[0].resource, None, "id-only: to be read");
        assert_eq!(events[0].focus.as_ref().unwrap().resource_type, "Encounter");

        for (file, kind) in [
            ("Bundle-r4-notification-handshake.json", "handshake"),
            ("Bundle-r4-notification-heartbeat.json", "heartbeat"),
            ("Bundle-r4-notification-error.json", "query-status"),
        ] {
            match read(&fixture(file)).unwrap() {
                Notification::Status {
                    kind: k,
                    subscription,
                } => {
                    assert_eq!(k, kind);
                    assert!(subscription.is_some());
                }
                other => panic!("{file}: {other:?}"),
            }
        }
        let Notification::Events(events) =
            read(&fixture("Bundle-r4-notification-empty.json")).unwrap()
        else {
            panic!()
        };
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].focus, None,
            "empty content: an event about nothing named"
        );
        let Notification::Events(events) =
            read(&fixture("Bundle-r4-notification-multi-resource.json")).unwrap()
        else {
            panic!()
        };
        assert_eq!(events.len(), 1, "additional context is not an event");
    }

    #[test]
    fn r5_and_bare_resources_are_read() {
        let r5 = json!({"resourceType": "Bundle", "type": "subscription-notification", "entry": [
            {"resource": {"resourceType": "SubscriptionStatus", "type": "event-notification",
                "subscription": {"reference": "Subscription/s"},
                "notificationEvent": [{"eventNumber": 7, "focus": {"reference": "Task/t1/_history/3"}}]}}]});
        let Notification::Events(events) = read(&r5).unwrap() else {
            panic!()
        };
        assert_eq!(events[0].seen, "Subscription/s#7");
        assert_eq!(
            events[0].focus.as_ref().unwrap().version.as_deref(),
            Some("3")
        );

        let task = json!({"resourceType": "Task", "id": "t1", "meta": {"versionId": "4"}, "status": "completed"});
        let Notification::Events(events) = read(&task).unwrap() else {
            panic!()
        };
        assert_eq!(events[0].seen, "Task/t1/_history/4");
        assert_eq!(read(&json!({})).unwrap(), Notification::Deleted);
    }

    #[test]
    fn what_is_not_a_notification_says_why() {
        let bad = [
            (json!([1]), "not a FHIR resource"),
            (json!({"resourceType": "Task"}), "no `id`"),
            (json!({"resourceType": "Task", "id": "../x"}), "no `id`"),
            (
                json!({"resourceType": "Bundle", "type": "transaction"}),
                "type `transaction`",
            ),
            (
                json!({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]}),
                "first entry",
            ),
            (
                json!({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters", "parameter": []}}]}),
                "no `type`",
            ),
            (
                json!({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters", "parameter": [
                {"name": "type", "valueCode": "event-notification"},
                {"name": "notification-event", "part": [{"name": "focus", "valueReference": {"reference": "x"}}]}]}}]}),
                "not a resource reference",
            ),
        ];
        for (body, says) in bad {
            let e = read(&body).unwrap_err();
            assert!(e.to_string().contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn a_notification_of_too_many_events_is_refused_whole() {
        let event = |n: usize| {
            json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": n.to_string()},
            {"name": "focus", "valueReference": {"reference": format!("Task/t{n}")}}]})
        };
        let mut params = vec![json!({"name": "type", "valueCode": "event-notification"})];
        params.extend((0..10_000).map(event));
        let body = json!({"resourceType": "Bundle", "type": "history",
            "entry": [{"resource": {"resourceType": "Parameters", "parameter": params}}]});
        assert_eq!(read(&body).unwrap_err(), NotificationError::TooMany(10_000));
    }

    #[test]
    fn references_are_read_in_every_form() {
        let f = Focus::parse("https://ehr.example/fhir/Task/abc/_history/2").unwrap();
        assert_eq!(
            (f.reference(), f.version.as_deref()),
            ("Task/abc".into(), Some("2"))
        );
        assert_eq!(Focus::parse("Task/abc").unwrap().version, None);
        assert_eq!(Focus::parse("abc"), None);
        assert_eq!(Focus::parse("Task/a b"), None);
        assert_eq!(Focus::parse("task/abc"), None);
    }
}
