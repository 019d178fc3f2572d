//! The outbox's order: the deliveries waiting, oldest first, in memory. The outbox tree in sled
//! is keyed by submission (so that leaving it is one removal), which is not the order they came
//! in; picking in key order let a submission whose key sorts late wait behind every later
//! arrival that sorts early, for as long as a backlog lasted. The writer applies each round's
//! changes here once its transaction has applied them in sled; at open the store rebuilds it
//! from the outbox tree and the time each entry keeps of when it entered (its record's, for
//! entries of earlier versions).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::Pending;

/// What a write did to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Enter(String),
    Leave(String),
    /// Failed attempts, now.
    Failed(String, u32),
}

#[derive(Default)]
pub(crate) struct Queue {
    order: Mutex<Order>,
    /// Entries waiting, readable without the lock.
    len: AtomicUsize,
}

#[derive(Default)]
struct Order {
    next: u64,
    by_arrival: BTreeMap<u64, String>,
    /// Each entry's place in `by_arrival` and its failed attempts.
    entries: HashMap<String, (u64, u32)>,
}

impl Queue {
    /// A queue of `waiting` (key, failures), oldest first.
    pub(crate) fn load(waiting: impl Iterator<Item = (String, u32)>) -> Queue {
        let queue = Queue::default();
        let mut changes = Vec::new();
        for (key, failures) in waiting {
            changes.push(Change::Enter(key.clone()));
            if failures > 0 {
                changes.push(Change::Failed(key, failures));
            }
        }
        queue.apply(changes);
        queue
    }

    pub(crate) fn apply(&self, changes: Vec<Change>) {
        let Ok(mut order) = self.order.lock() else {
            return;
        };
        let order = &mut *order;
        for change in changes {
            match change {
                Change::Enter(key) => {
                    if !order.entries.contains_key(&key) {
                        let at = order.next;
                        order.next += 1;
                        order.by_arrival.insert(at, key.clone());
                        order.entries.insert(key, (at, 0));
                    }
                }
                Change::Leave(key) => {
                    if let Some((at, _)) = order.entries.remove(&key) {
                        order.by_arrival.remove(&at);
                    }
                }
                Change::Failed(key, failures) => {
                    if let Some(entry) = order.entries.get_mut(&key) {
                        entry.1 = failures;
                    }
                }
            }
        }
        self.len.store(order.entries.len(), Ordering::Relaxed);
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Up to `limit` entries that `want` accepts, oldest first.
    pub(crate) fn first(&self, limit: usize, mut want: impl FnMut(&str) -> bool) -> Vec<Pending> {
        let Ok(order) = self.order.lock() else {
            return Vec::new();
        };
        order
            .by_arrival
            .values()
            .filter(|key| want(key))
            .take(limit)
            .map(|key| Pending {
                key: key.clone(),
                failures: order.entries.get(key).map_or(0, |e| e.1),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(q: &Queue) -> Vec<String> {
        q.first(usize::MAX, |_| true)
            .into_iter()
            .map(|p| p.key)
            .collect()
    }

    #[test]
    fn entries_come_out_in_arrival_order_with_their_failures() {
        let q = Queue::load([("a".to_string(), 0), ("b".to_string(), 2)].into_iter());
        q.apply(vec![
            Change::Enter("0".into()),
            Change::Enter("a".into()), // already waiting: keeps its place
            Change::Leave("b".into()),
            Change::Enter("b".into()), // back at the end, failures from zero
            Change::Failed("0".into(), 1),
            Change::Failed("gone".into(), 1),
        ]);
        assert_eq!(keys(&q), ["a", "0", "b"]);
        assert_eq!(q.len(), 3);
        let first = q.first(2, |k| k != "a");
        assert_eq!(
            first,
            [
                Pending {
                    key: "0".into(),
                    failures: 1
                },
                Pending {
                    key: "b".into(),
                    failures: 0
                }
            ]
        );
    }
}
