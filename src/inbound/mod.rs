//! Events in: what the EHR (or another sender) says happened, turned into events for the CRM
//! and the portal. The `Inbox` takes a read notification (`workflow::notification`) through
//! four steps, every one of them before anything is written for any of its events:
//!
//! 1. **The resource.** A full-resource notification carries it; an id-only one is read from the
//!    EHR with the delivery's auth (`EhrClient::read`).
//! 2. **The rule.** The first workflow rule that matches it (none: the event is only marked
//!    seen). Its sender must own what the rule is about, or the whole notification is refused
//!    (403) — a decision sent with the portal's credentials changes nothing.
//! 3. **The submission.** Resolved through the store's indexes, never guessed (`resolve`).
//! 4. **The write.** `Store::take_inbound`: marked seen and its events queued in one write, or
//!    kept as unmatched; an event seen before writes nothing.
//!
//! `poll` is the same for EHRs that cannot push: it searches what changed since its cursor.

pub mod poll;

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;

use crate::delivery::client::EhrClient;
use crate::metrics::Metrics;
use crate::store::{Backend, Inbound, Store, StoreError, Taken, Unmatched};
use crate::workflow::events::Source;
use crate::workflow::notification::{Focus, Notice, Notification, NotificationError};
use crate::workflow::{Rule, Workflow};

/// Why a notification was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error(transparent)]
    Notification(#[from] NotificationError),
    /// The sender does not own what it sent (403).
    #[error("{0}")]
    NotOwner(String),
    /// An id-only event's resource could not be read from the EHR: send it again later.
    #[error("{focus} could not be read from the EHR: {why}; nothing of this notification was taken, send it again")]
    Unreadable { focus: String, why: String },
    /// An id-only event, and no EHR to read it from.
    #[error("an id-only notification names {0}, and no [ehr] is configured to read it from; nothing was taken")]
    NoEhr(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What came of one event, as the sender is told (references only, never values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `Task/123`, or none for an event that named nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub focus: Option<String>,
    /// `queued`, `unchanged`, `duplicate`, `unmatched`, `no_rule`.
    pub outcome: &'static str,
    /// The rule that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Events queued for receivers.
    #[serde(skip_serializing_if = "is_zero")]
    pub queued: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub struct Inbox {
    pub store: Arc<Backend>,
    pub workflow: Arc<Workflow>,
    /// Where id-only events' resources are read; none without an EHR.
    pub ehr: Option<Arc<EhrClient>>,
    pub metrics: Arc<Metrics>,
    /// Wakes the outbox once events are queued.
    pub wake: Arc<Notify>,
}

/// One event ready to be written: its resource read and its rule found.
struct Ready {
    notice: Notice,
    focus: Option<Focus>,
    resource: Option<Value>,
    rule: Option<Rule>,
}

impl Inbox {
    /// Takes `notification` from `sender`; what came of each of its events. A status
    /// notification (handshake, heartbeat) is recorded as the subscription's last word.
    pub async fn take(
        &self,
        sender: &str,
        notification: Notification,
    ) -> Result<Vec<Report>, InboxError> {
        let notices = match notification {
            Notification::Status { kind, subscription } => {
                let name = format!(
                    "subscription:{sender}:{}",
                    subscription.as_deref().unwrap_or("(unnamed)")
                );
                let at = crate::delivery::outbox::now();
                self.store
                    .set_cursor(&name, &format!("{kind} {at}"))
                    .await?;
                tracing::info!(sender, kind, "subscription status");
                self.metrics.count_inbound(sender, "status");
                return Ok(Vec::new());
            }
            Notification::Deleted => {
                self.metrics.count_inbound(sender, "deleted");
                return Ok(Vec::new());
            }
            Notification::Events(notices) => notices,
        };
        // Everything that can refuse the notification, before anything is written.
        let mut ready = Vec::with_capacity(notices.len());
        for notice in notices {
            let focus = notice.focus.clone();
            let resource = match (&notice.resource, &focus) {
                (Some(r), _) => Some(r.clone()),
                (None, Some(f)) => Some(self.read(f).await?),
                (None, None) => None,
            };
            let rule = resource
                .as_ref()
                .and_then(|r| self.workflow.rule_for(r))
                .cloned();
            if let Some(rule) = &rule {
                if let Err(why) = self.workflow.may_send(sender, rule) {
                    self.metrics.count_inbound(sender, "refused");
                    tracing::warn!(sender, rule = %rule.name, "event refused: its sender does not own it");
                    return Err(InboxError::NotOwner(why));
                }
            }
            ready.push(Ready {
                notice,
                focus,
                resource,
                rule,
            });
        }
        let mut reports = Vec::with_capacity(ready.len());
        for r in ready {
            reports.push(self.write(sender, r).await?);
        }
        if reports.iter().any(|r| r.queued > 0) {
            self.wake.notify_one();
        }
        Ok(reports)
    }

    async fn read(&self, focus: &Focus) -> Result<Value, InboxError> {
        let Some(ehr) = &self.ehr else {
            return Err(InboxError::NoEhr(focus.reference()));
        };
        let resource =
            ehr.read(&focus.reference())
                .await
                .map_err(|why| InboxError::Unreadable {
                    focus: focus.reference(),
                    why,
                })?;
        match Focus::of(&resource) {
            Some(f) if f.resource_type == focus.resource_type && f.id == focus.id => Ok(resource),
            _ => Err(InboxError::Unreadable {
                focus: focus.reference(),
                why: "the EHR answered with another resource".into(),
            }),
        }
    }

    async fn write(&self, sender: &str, r: Ready) -> Result<Report, InboxError> {
        let seen = format!("{sender}:{}", r.notice.seen);
        let at = crate::delivery::outbox::now();
        let reference = r.focus.as_ref().map(Focus::reference);
        let unmatched = |why: String| {
            Inbound::Unmatched(Unmatched {
                at: at.clone(),
                sender: sender.to_string(),
                resource: r
                    .focus
                    .as_ref()
                    .map_or_else(|| "(none named)".to_string(), Focus::versioned),
                why,
            })
        };
        let (inbound, rule) = match (&r.resource, &r.rule) {
            (None, _) => (
                unmatched(
                    "the notification names no resource (`empty` content): set the subscription's content to id-only or full-resource, or poll".into(),
                ),
                None,
            ),
            (Some(_), None) => (Inbound::Nothing, None),
            (Some(resource), Some(rule)) => match resolve(&*self.store, resource) {
                Ok(key) => {
                    let focus = r.focus.clone().or_else(|| Focus::of(resource));
                    let source = Source {
                        reference: focus.as_ref().map(Focus::reference).unwrap_or_default(),
                        version: focus.and_then(|f| f.version),
                    };
                    let decide =
                        self.workflow
                            .decide(rule, source, r.notice.seen.clone(), at.clone());
                    (
                        Inbound::Events {
                            key,
                            decide,
                            sender: sender.to_string(),
                            resource: reference.clone().unwrap_or_default(),
                        },
                        Some(rule.name.clone()),
                    )
                }
                Err(why) => (unmatched(why), Some(rule.name.clone())),
            },
        };
        let taken = self.store.take_inbound(&seen, inbound).await?;
        let (outcome, queued) = match taken {
            Taken::Duplicate => ("duplicate", 0),
            Taken::Queued(0) => ("unchanged", 0),
            Taken::Queued(n) => ("queued", n),
            Taken::Unmatched | Taken::Gone => ("unmatched", 0),
            Taken::Seen => ("no_rule", 0),
        };
        self.metrics.count_inbound(sender, outcome);
        tracing::info!(
            sender,
            focus = reference.as_deref().unwrap_or(""),
            outcome,
            queued,
            "event taken"
        );
        Ok(Report {
            focus: reference,
            outcome,
            rule,
            queued,
        })
    }
}

/// The submission an EHR resource is about, through the store's indexes — never a guess:
///
/// 1. the resource itself, if the gateway delivered it (a review Task it created);
/// 2. else the resources it refers to (a Task's `focus` or `basedOn`, a note's `context`, an
///    order's `basedOn` …) that the gateway delivered, if they are all one submission's;
/// 3. else its patient (`subject`, `for`, `patient`), if that patient has exactly one
///    submission.
///
/// Anything else — nothing delivered named, several submissions named, a patient with several
/// — is `Err(why)`: kept as unmatched for an operator.
pub fn resolve<S: Store>(store: &S, resource: &Value) -> Result<String, String> {
    let store_error = |e: StoreError| format!("the store could not be read: {e}");
    if let Some(focus) = Focus::of(resource) {
        if let Some(record) = store.by_resource(&focus.reference()).map_err(store_error)? {
            return Ok(record.key());
        }
    }
    let mut references = Vec::new();
    crate::delivery::references(resource, &mut references);
    let mut keys = Vec::new();
    let mut patients = Vec::new();
    for reference in references {
        let Some(f) = Focus::parse(reference) else {
            continue;
        };
        if f.resource_type == "Patient" {
            patients.push(f.reference());
            continue;
        }
        if let Some(record) = store.by_resource(&f.reference()).map_err(store_error)? {
            keys.push(record.key());
        }
    }
    keys.sort();
    keys.dedup();
    match keys.len() {
        1 => return Ok(keys.remove(0)),
        0 => {}
        n => {
            return Err(format!(
                "it refers to resources of {n} submissions: which one it is about is not certain"
            ))
        }
    }
    patients.sort();
    patients.dedup();
    let mut submissions = Vec::new();
    for patient in &patients {
        if let Some(record) = store.by_resource(patient).map_err(store_error)? {
            submissions.extend(
                store
                    .by_patient(&record.patient_system, &record.patient_value)
                    .map_err(store_error)?,
            );
        }
    }
    submissions.sort();
    submissions.dedup();
    match submissions.len() {
        1 => Ok(submissions.remove(0)),
        0 if patients.is_empty() => {
            Err("it names no resource the gateway delivered, and no patient".into())
        }
        0 => Err("it names no resource the gateway delivered, and its patient has no submission".into()),
        n => Err(format!(
            "its patient has {n} submissions and it names none of them (refer to the review Task or the QuestionnaireResponse)"
        )),
    }
}
