//! What operators do to the gateway's data, below HTTP: replay one submission (or its
//! dead-lettered events to one receiver), replay every dead letter of a receiver once its cause
//! is fixed, list a patient's submissions. The operators' endpoints are thin fronts of these;
//! nothing here knows a request or a status code.

use std::sync::Arc;

use crate::store::{self, Backend, JobId, Receiver, Requeued, Store, StoreError, SubmissionRecord};

/// How many dead letters one bulk replay takes at most (the writer takes them in a few rounds).
pub const BULK_REPLAY_MAX: usize = 10_000;

/// Puts submission `key`'s job back in the outbox: its EHR delivery, or — for a webhook
/// receiver — each of its events to that receiver that was dead-lettered. What the last
/// requeue said (`Unknown`: nothing to replay).
pub async fn replay(
    store: &Backend,
    receiver: &Receiver,
    key: &str,
    at: &str,
) -> Result<Requeued, StoreError> {
    let jobs = match receiver {
        Receiver::Ehr => vec![JobId::ehr(key)],
        _ => {
            let mut jobs = store.dead_letter_jobs(receiver, Some(store::mapping_of(key)))?;
            jobs.retain(|j| j.key == key);
            jobs
        }
    };
    let mut requeued = Requeued::Unknown;
    for job in &jobs {
        requeued = store.requeue(job, at).await?;
    }
    Ok(requeued)
}

/// What a bulk replay did.
#[derive(Debug, Default, PartialEq)]
pub struct BulkReplay {
    /// The jobs back in the outbox, sorted.
    pub replayed: Vec<String>,
    /// Those whose Bundle is past its retention: nothing to send again.
    pub expired: Vec<String>,
    /// Dead letters left (beyond `limit`, or dead-lettered again meanwhile).
    pub left: usize,
}

/// Every dead letter of `receiver` (of one mapping's submissions, or all), earliest first, at
/// most `limit`, back in the outbox at once. What was requeued stays requeued if one fails; the
/// error says so and the operator asks again.
pub async fn replay_dead_letters(
    store: &Arc<Backend>,
    receiver: &Receiver,
    mapping: Option<&str>,
    limit: usize,
    at: &str,
) -> Result<BulkReplay, StoreError> {
    let mut jobs = store.dead_letter_jobs(receiver, mapping)?;
    jobs.truncate(limit.min(BULK_REPLAY_MAX));
    let mut requeues = tokio::task::JoinSet::new();
    for job in jobs {
        let (store, at) = (Arc::clone(store), at.to_string());
        requeues.spawn(async move {
            let requeued = store.requeue(&job, &at).await;
            (job.to_string(), requeued)
        });
    }
    let mut done = BulkReplay::default();
    let mut failed = None;
    while let Some(joined) = requeues.join_next().await {
        match joined {
            Ok((job, Ok(Requeued::Waiting(_)))) => done.replayed.push(job),
            Ok((job, Ok(Requeued::Expired))) => done.expired.push(job),
            // Gone since it was listed: nothing to do.
            Ok((_, Ok(Requeued::Unknown))) => {}
            Ok((_, Err(e))) => failed = Some(e),
            Err(e) => failed = Some(StoreError::Failed(e.to_string())),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    done.replayed.sort();
    done.expired.sort();
    done.left = store.dead_letter_jobs(receiver, mapping)?.len();
    Ok(done)
}

/// A patient's submissions (by the identifier their mapping recorded), of one mapping or all.
pub fn patient_submissions(
    store: &Backend,
    system: &str,
    value: &str,
    mapping: Option<&str>,
) -> Result<Vec<SubmissionRecord>, StoreError> {
    let mut records = Vec::new();
    for key in store.by_patient(system, value)? {
        records.extend(store.get(&key)?);
    }
    records.retain(|r| mapping.is_none_or(|m| r.mapping_id == m));
    Ok(records)
}
