//! The EHR's courier: one attempt at a submission's EHR job — its current Bundle to the EHR's
//! FHIR API (`client`) — and its outcome recorded: delivered (with what the EHR stored), to be
//! retried (exponential backoff with full jitter, the wait the EHR asks for honoured), or
//! dead-lettered (a rejection: a replay sends it again once the cause is fixed). The events the
//! outcome causes for the CRM and the portal are queued with it, in the same store write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::EhrClient;
use super::outbox::{jitter, now, Courier};
use super::{backoff, Attempt};
use crate::metrics::Metrics;
use crate::store::{
    Backend, Consequences, EhrResource, JobId, Pending, Receiver, State, Store, StoreError,
    Transition,
};

pub struct EhrCourier {
    pub client: Arc<EhrClient>,
    pub metrics: Arc<Metrics>,
    pub concurrency: usize,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// The events an outcome causes (the workflow layer's), queued in the same write.
    pub consequences: Consequences,
}

/// What one attempt leads to: the transition to record, the EHR's resources, and the delay
/// before the next attempt (if it is to be retried).
pub type Outcome = (Transition, Vec<EhrResource>, Option<Duration>);

impl Courier for EhrCourier {
    /// What to record and which revision was sent; or, when the store could not be read,
    /// the delay before trying again.
    type Attempted = Result<(Outcome, Option<u32>), Duration>;

    fn receiver(&self) -> &Receiver {
        &Receiver::Ehr
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    async fn attempt(&self, store: &Backend, job: &Pending) -> Self::Attempted {
        self.attempt_at(store, &job.job, job.failures).await
    }

    async fn record(
        &self,
        store: &Backend,
        job: &Pending,
        attempted: Self::Attempted,
    ) -> Option<Duration> {
        match attempted {
            Ok((outcome, sent)) => self.record_at(store, &job.job.key, outcome, sent).await,
            Err(delay) => Some(delay),
        }
    }
}

impl EhrCourier {
    /// One attempt, after `failures` failed ones: what to record, with which revision it sent
    /// (if it had one). `Err(delay)` when the store could not be read (an I/O error: nothing to
    /// record; try again after `delay`).
    async fn attempt_at(
        &self,
        store: &Backend,
        job: &JobId,
        failures: u32,
    ) -> Result<(Outcome, Option<u32>), Duration> {
        let key = job.key.as_str();
        let (bundle, sent) = match store.bundle_to_deliver(key) {
            Ok(Some(to_deliver)) => to_deliver,
            // Nothing to deliver, ever (a damaged store): a dead letter that says so, rather
            // than a job picked again and again. Without a record the store drops the job.
            Ok(None) => {
                let why = "the submission's Bundle is not in the store";
                return Ok((dead_letter(key, why.into(), why), None));
            }
            Err(e @ StoreError::Corrupt { .. }) => {
                let why = format!("the submission's Bundle: {e}");
                return Ok((dead_letter(key, why, "its Bundle is unreadable"), None));
            }
            Err(e) => {
                tracing::error!(key, error = %e, "outbox: cannot read the submission");
                return Err(self.backoff_cap);
            }
        };
        let started = Instant::now();
        let attempt = self.client.deliver(bundle).await;
        self.metrics.observe_delivery(started.elapsed());
        let at = now();
        let outcome = match attempt {
            Attempt::Delivered(resources) => {
                Metrics::inc(&self.metrics.deliveries_ok);
                tracing::info!(key, resources = resources.len(), "delivered");
                (Transition::new(State::Delivered, at), resources, None)
            }
            Attempt::Retry {
                failure,
                retry_after,
            } => {
                Metrics::inc(&self.metrics.delivery_retries);
                let delay = backoff(
                    failures,
                    self.backoff_base,
                    self.backoff_cap,
                    jitter(job, failures),
                    retry_after,
                );
                tracing::warn!(key, reason = %failure.loggable(), retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry");
                (
                    Transition::new(State::Failed, at).because(failure.reason()),
                    Vec::new(),
                    Some(delay),
                )
            }
            Attempt::Reject(failure) => {
                let loggable = failure.loggable();
                return Ok((dead_letter(key, failure.reason(), &loggable), Some(sent)));
            }
        };
        Ok((outcome, Some(sent)))
    }

    /// Records an attempt's outcome (durably), with the events it causes; returns when to try
    /// again, if ever. A dead letter is counted once it is recorded: a job without its
    /// submission (a damaged store) is dropped by the store, and no submission became a dead
    /// letter; nor did one whose revision came in while the attempt sent the earlier Bundle
    /// (the revision is tried next, at once).
    async fn record_at(
        &self,
        store: &Backend,
        key: &str,
        (transition, resources, next): Outcome,
        sent: Option<u32>,
    ) -> Option<Duration> {
        let dead = transition.state == State::DeadLettered;
        let consequences = Arc::clone(&self.consequences);
        match store
            .record_delivery(key, transition, resources, sent, consequences)
            .await
        {
            Ok(Some(record)) if record.state() == Some(State::Mapped) => None,
            Ok(Some(_)) => {
                if dead {
                    Metrics::inc(&self.metrics.dead_letters);
                }
                next
            }
            Ok(None) => {
                tracing::warn!(key, "outbox: a job without its submission was dropped");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "outbox: cannot record the delivery outcome");
                Some(self.backoff_base)
            }
        }
    }
}

/// What to record when the submission cannot be delivered as it is: why (kept for operators)
/// and what of it may be logged.
fn dead_letter(key: &str, reason: String, loggable: &str) -> Outcome {
    tracing::warn!(key, reason = %loggable, "dead letter");
    (
        Transition::new(State::DeadLettered, now()).because(reason),
        Vec::new(),
        None,
    )
}
