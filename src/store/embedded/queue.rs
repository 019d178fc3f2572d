//! The outbox's order: the jobs waiting, oldest first, in memory. The outbox tree in sled is
//! keyed by job (so that leaving it is one removal), which is not the order they came in;
//! picking in key order let a job whose key sorts late wait behind every later arrival that
//! sorts early, for as long as a backlog lasted. The writer applies each round's changes here
//! once its transaction has applied them in sled; at open the store rebuilds it from the outbox
//! tree and the time each entry keeps of when it entered.
//!
//! A receiver gets a submission's jobs in order: `first` offers only the oldest waiting job of
//! each lane (one receiver, one submission). The EHR has one job per submission, so its lanes
//! cost nothing to track.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::store::model::{mapping_of, JobId, Pending, Receiver};

/// What a write did to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Enter(JobId),
    Leave(JobId),
    /// Failed attempts, now.
    Failed(JobId, u32),
}

#[derive(Default)]
pub(crate) struct Queue {
    order: Mutex<Order>,
    /// EHR jobs waiting, readable without the lock (what `max_outbox` limits).
    ehr: AtomicUsize,
    /// Counts by EHR mapping and by receiver, under a lock of their own: read on the request
    /// threads, never behind the outbox's walks of `order`.
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// EHR jobs waiting by mapping (a submission key's part before its `/`).
    by_mapping: HashMap<String, usize>,
    /// Jobs waiting by receiver.
    by_receiver: HashMap<Receiver, usize>,
}

#[derive(Default)]
struct Order {
    next: u64,
    by_arrival: BTreeMap<u64, JobId>,
    /// Each job's place in `by_arrival` and its failed attempts.
    entries: HashMap<JobId, (u64, u32)>,
}

/// A lock that a panic elsewhere must not turn into a silent stop: the order is rebuilt from
/// sled at the next open, and meanwhile what is held is the best there is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Queue {
    /// A queue of `waiting` (job, failures), oldest first.
    pub(crate) fn load(waiting: impl Iterator<Item = (JobId, u32)>) -> Queue {
        let queue = Queue::default();
        let mut changes = Vec::new();
        for (job, failures) in waiting {
            changes.push(Change::Enter(job.clone()));
            if failures > 0 {
                changes.push(Change::Failed(job, failures));
            }
        }
        queue.apply(changes);
        queue
    }

    pub(crate) fn apply(&self, changes: Vec<Change>) {
        let mut order = lock(&self.order);
        let order = &mut *order;
        // Taken after `order`, as everywhere (the counts are read alone).
        let mut counts = lock(&self.counts);
        let mut count = |job: &JobId, entered: bool| {
            let step = |n: &mut usize| {
                *n = if entered { *n + 1 } else { n.saturating_sub(1) };
            };
            step(counts.by_receiver.entry(job.receiver.clone()).or_default());
            if job.receiver == Receiver::Ehr {
                step(
                    counts
                        .by_mapping
                        .entry(mapping_of(&job.key).to_string())
                        .or_default(),
                );
            }
        };
        for change in changes {
            match change {
                Change::Enter(job) => {
                    if !order.entries.contains_key(&job) {
                        let at = order.next;
                        order.next += 1;
                        count(&job, true);
                        order.by_arrival.insert(at, job.clone());
                        order.entries.insert(job, (at, 0));
                    }
                }
                Change::Leave(job) => {
                    if let Some((at, _)) = order.entries.remove(&job) {
                        order.by_arrival.remove(&at);
                        count(&job, false);
                    }
                }
                Change::Failed(job, failures) => {
                    if let Some(entry) = order.entries.get_mut(&job) {
                        entry.1 = failures;
                    }
                }
            }
        }
        let ehr = counts.by_receiver.get(&Receiver::Ehr).copied().unwrap_or(0);
        self.ehr.store(ehr, Ordering::Relaxed);
    }

    /// EHR jobs waiting.
    pub(crate) fn ehr_len(&self) -> usize {
        self.ehr.load(Ordering::Relaxed)
    }

    /// Jobs of `receiver` waiting.
    pub(crate) fn len_for(&self, receiver: &Receiver) -> usize {
        lock(&self.counts)
            .by_receiver
            .get(receiver)
            .copied()
            .unwrap_or(0)
    }

    /// EHR jobs of `mapping`'s submissions waiting.
    pub(crate) fn len_of(&self, mapping: &str) -> usize {
        lock(&self.counts)
            .by_mapping
            .get(mapping)
            .copied()
            .unwrap_or(0)
    }

    /// Up to `limit` jobs that `want` accepts, oldest first, each the oldest of its lane
    /// (a later job of a submission waits for the earlier one to leave).
    pub(crate) fn first(&self, limit: usize, want: &mut dyn FnMut(&JobId) -> bool) -> Vec<Pending> {
        let order = lock(&self.order);
        let mut lanes: HashSet<(&Receiver, &str)> = HashSet::new();
        let mut out = Vec::new();
        for job in order.by_arrival.values() {
            if out.len() == limit {
                break;
            }
            // The EHR has one job per submission: every one heads its lane.
            if job.receiver != Receiver::Ehr && !lanes.insert(job.lane()) {
                continue;
            }
            if want(job) {
                out.push(Pending {
                    job: job.clone(),
                    failures: order.entries.get(job).map_or(0, |e| e.1),
                });
            }
        }
        out
    }

    /// Every job waiting that `want` accepts and that came after the one at `place` (a place
    /// this returned, kept while the process runs), oldest first, up to `limit`, each with its
    /// place: what the operators' listing pages through.
    pub(crate) fn after(
        &self,
        place: Option<u64>,
        limit: usize,
        want: &mut dyn FnMut(&JobId) -> bool,
    ) -> Vec<(u64, Pending)> {
        let order = lock(&self.order);
        let from = place.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        order
            .by_arrival
            .range((from, std::ops::Bound::Unbounded))
            .filter(|(_, job)| want(job))
            .take(limit)
            .map(|(at, job)| {
                let pending = Pending {
                    job: job.clone(),
                    failures: order.entries.get(job).map_or(0, |e| e.1),
                };
                (*at, pending)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ehr(key: &str) -> JobId {
        JobId::ehr(key)
    }

    fn crm(key: &str, seq: u64) -> JobId {
        JobId {
            receiver: Receiver::Webhook("crm".into()),
            key: key.into(),
            seq,
        }
    }

    fn keys(q: &Queue) -> Vec<String> {
        q.first(usize::MAX, &mut |_| true)
            .into_iter()
            .map(|p| p.job.to_string())
            .collect()
    }

    #[test]
    fn entries_come_out_in_arrival_order_with_their_failures() {
        let q = Queue::load([(ehr("a"), 0), (ehr("b"), 2)].into_iter());
        q.apply(vec![
            Change::Enter(ehr("0")),
            Change::Enter(ehr("a")), // already waiting: keeps its place
            Change::Leave(ehr("b")),
            Change::Enter(ehr("b")), // back at the end, failures from zero
            Change::Failed(ehr("0"), 1),
            Change::Failed(ehr("gone"), 1),
        ]);
        assert_eq!(keys(&q), ["a", "0", "b"]);
        assert_eq!(q.ehr_len(), 3);
        let first = q.first(2, &mut |j| j.key != "a");
        assert_eq!(
            first,
            [
                Pending {
                    job: ehr("0"),
                    failures: 1
                },
                Pending {
                    job: ehr("b"),
                    failures: 0
                }
            ]
        );
        // Pages: each resumes after the last place of the one before, whatever left meanwhile.
        let page = q.after(None, 1, &mut |_| true);
        assert_eq!(page[0].1.job, ehr("a"));
        q.apply(vec![Change::Leave(ehr("a")), Change::Enter(ehr("c"))]);
        let rest: Vec<String> = q
            .after(Some(page[0].0), 10, &mut |_| true)
            .into_iter()
            .map(|(_, p)| p.job.key)
            .collect();
        assert_eq!(rest, ["0", "b", "c"]);
    }

    /// A webhook receiver gets one submission's jobs one at a time, in order; other lanes are
    /// not held up; an unwanted head (in flight) still holds its lane.
    #[test]
    fn a_lane_offers_its_oldest_job_only() {
        let q = Queue::load(
            [
                (crm("m/1", 1), 0),
                (crm("m/1", 2), 0),
                (crm("m/2", 3), 0),
                (ehr("m/1"), 0),
            ]
            .into_iter(),
        );
        assert_eq!(keys(&q), ["crm:m/1#1", "crm:m/2#3", "m/1"]);
        let busy = q.first(10, &mut |j| j.seq != 1);
        let busy: Vec<String> = busy.iter().map(|p| p.job.to_string()).collect();
        assert_eq!(busy, ["crm:m/2#3", "m/1"]);
        q.apply(vec![Change::Leave(crm("m/1", 1))]);
        assert_eq!(keys(&q), ["crm:m/1#2", "crm:m/2#3", "m/1"]);
        let crm_receiver = Receiver::Webhook("crm".into());
        assert_eq!((q.len_for(&crm_receiver), q.ehr_len()), (2, 1));
    }

    #[test]
    fn ehr_jobs_are_counted_by_mapping() {
        let q = Queue::load([(ehr("m/1"), 0), (ehr("m/2"), 1)].into_iter());
        q.apply(vec![
            Change::Enter(ehr("n/1")),
            Change::Enter(ehr("m/1")), // already counted
            Change::Leave(ehr("m/2")),
            Change::Leave(ehr("m/2")),    // already gone
            Change::Leave(ehr("n/9")),    // never there
            Change::Enter(crm("m/5", 1)), // not the EHR's
        ]);
        assert_eq!((q.len_of("m"), q.len_of("n"), q.ehr_len()), (1, 1, 2));
        q.apply(vec![Change::Leave(ehr("m/1")), Change::Leave(ehr("n/1"))]);
        assert_eq!((q.len_of("m"), q.len_of("n"), q.ehr_len()), (0, 0, 0));
    }
}
