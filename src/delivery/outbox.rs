//! The outbox worker: takes the jobs waiting in the store, oldest first, and hands each to the
//! `Courier` of its receiver — the EHR's (`ehr`), or a webhook receiver's — with bounded
//! concurrency per receiver and a not-before time per job while it backs off. Jobs live in the
//! store, so they resume after a restart or a crash; a job stays waiting until its courier has
//! recorded its outcome, so none is lost and none is taken twice at once.
//!
//! What a receiver needs of its own — how to deliver, its retry policy, its dead letters, its
//! metrics — is its courier's; this loop is the same for all.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};

use crate::store::{Backend, JobId, Pending, Receiver, Store};

/// How one receiver's jobs are delivered.
pub trait Courier: Send + Sync + 'static {
    /// What an attempt came to, for `record`.
    type Attempted: Send;

    fn receiver(&self) -> &Receiver;

    /// How many of its jobs may be attempted at once.
    fn concurrency(&self) -> usize;

    /// One attempt at `job`: the request to the receiver. It holds one of the receiver's
    /// permits while it runs; recording what it came to does not.
    fn attempt(
        &self,
        store: &Backend,
        job: &Pending,
    ) -> impl Future<Output = Self::Attempted> + Send;

    /// Records what the attempt came to (durably); the delay before the next attempt when the
    /// job stays waiting (`None`: as soon as it is due).
    fn record(
        &self,
        store: &Backend,
        job: &Pending,
        attempted: Self::Attempted,
    ) -> impl Future<Output = Option<Duration>> + Send;
}

pub struct Outbox<C: Courier> {
    pub store: Arc<Backend>,
    pub courier: Arc<C>,
    /// Woken when a job may have come in (an accept, a replay, an event).
    pub wake: Arc<Notify>,
}

/// Which jobs are out, and which wait out a backoff.
#[derive(Default)]
struct Schedule {
    in_flight: std::collections::HashSet<JobId>,
    not_before: HashMap<JobId, Instant>,
}

/// The schedule, whatever a panicked delivery task left it as: a job marked in flight by a
/// task that died would wait for good, so the task's end is recorded (`Flying`) even then.
fn lock(s: &Mutex<Schedule>) -> MutexGuard<'_, Schedule> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes a job out of flight when its task ends, whether it returns or panics.
struct Flying {
    schedule: Arc<Mutex<Schedule>>,
    job: JobId,
    next: Option<Duration>,
}

impl Drop for Flying {
    fn drop(&mut self) {
        let mut s = lock(&self.schedule);
        s.in_flight.remove(&self.job);
        match self.next {
            Some(delay) => s
                .not_before
                .insert(self.job.clone(), Instant::now() + delay),
            None => s.not_before.remove(&self.job),
        };
    }
}

impl<C: Courier> Outbox<C> {
    /// Runs until `shutdown` turns true, then waits for the deliveries in flight.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let concurrency = this.courier.concurrency().max(1);
        let permits = Arc::new(Semaphore::new(concurrency));
        let schedule = Arc::new(Mutex::new(Schedule::default()));
        let receiver = this.courier.receiver().clone();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Only what can start now, oldest first: this receiver's, not in flight, not
            // waiting out a backoff; the scan stops once it has enough.
            let now = Instant::now();
            let due = {
                let mut s = lock(&schedule);
                let due = this.store.waiting(concurrency * 4, &mut |job| {
                    job.receiver == receiver
                        && !s.in_flight.contains(job)
                        && s.not_before.get(job).is_none_or(|t| *t <= now)
                });
                s.in_flight.extend(due.iter().map(|p| p.job.clone()));
                due
            };
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(receiver = %receiver, error = %e, "outbox: a delivery task failed");
                }
            }
            for pending in due {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break;
                };
                let this = Arc::clone(&this);
                let mut flying = Flying {
                    schedule: Arc::clone(&schedule),
                    job: pending.job.clone(),
                    next: None,
                };
                tasks.spawn(async move {
                    let attempted = this.courier.attempt(&this.store, &pending).await;
                    // The permit bounds requests to the receiver, not the bookkeeping after.
                    drop(permit);
                    flying.next = this.courier.record(&this.store, &pending, attempted).await;
                    // Out of flight only now: until its outcome is recorded the job is still
                    // waiting in the store and must not be taken again.
                    drop(flying);
                });
            }
            tokio::select! {
                _ = this.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => {}
            }
        }
        // Graceful: every delivery in flight finishes (and is recorded) before we return.
        while tasks.join_next().await.is_some() {}
    }
}

/// The current time as a FHIR instant.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A number in [0, 1) that differs per job, attempt and moment: enough to spread retries.
pub fn jitter(job: &JobId, attempt: u32) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    job.hash(&mut h);
    attempt.hash(&mut h);
    Instant::now().hash(&mut h);
    (h.finish() % 1_000_000) as f64 / 1_000_000.0
}

/// Runs `work` (the outbox loops) on a thread and a single-threaded runtime of its own, with
/// the clients' connections; the thread ends when `work` does. Deliveries are cheaper there
/// than as tasks on the HTTP threads, and do not compete with requests for them.
pub fn on_own_thread(
    work: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("outbox".into())
        .spawn(move || runtime.block_on(work))
}
