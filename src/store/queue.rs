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
    /// Entries waiting by mapping (a key's part before its `/`), under a lock of their own:
    /// read on the request threads, never behind the outbox's walks of `order`.
    by_mapping: Mutex<HashMap<String, usize>>,
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
        // Taken after `order`, as everywhere (`len_of` takes it alone).
        let Ok(mut by_mapping) = self.by_mapping.lock() else {
            return;
        };
        let mut count = |key: &str, entered: bool| match by_mapping.get_mut(mapping_of(key)) {
            Some(n) if entered => *n += 1,
            Some(n) => *n = n.saturating_sub(1),
            None if entered => {
                by_mapping.insert(mapping_of(key).to_string(), 1);
            }
            None => {}
        };
        for change in changes {
            match change {
                Change::Enter(key) => {
                    if !order.entries.contains_key(&key) {
                        let at = order.next;
                        order.next += 1;
                        count(&key, true);
                        order.by_arrival.insert(at, key.clone());
                        order.entries.insert(key, (at, 0));
                    }
                }
                Change::Leave(key) => {
                    if let Some((at, _)) = order.entries.remove(&key) {
                        order.by_arrival.remove(&at);
                        count(&key, false);
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

    /// Entries of `mapping` waiting.
    pub(crate) fn len_of(&self, mapping: &str) -> usize {
        self.by_mapping
            .lock()
            .map_or(0, |m| m.get(mapping).copied().unwrap_or(0))
    }

    /// Up to `limit` entries that `want` accepts, oldest first.
    pub(crate) fn first(&self, limit: usize, want: impl FnMut(&str) -> bool) -> Vec<Pending> {
        self.after(None, limit, want)
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// `first`, of the entries that came after the one at `place` (a place this returned: an
    /// entry's place in the order, kept while the process runs), each with its place.
    pub(crate) fn after(
        &self,
        place: Option<u64>,
        limit: usize,
        mut want: impl FnMut(&str) -> bool,
    ) -> Vec<(u64, Pending)> {
        let Ok(order) = self.order.lock() else {
            return Vec::new();
        };
        let from = place.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        order
            .by_arrival
            .range((from, std::ops::Bound::Unbounded))
            .filter(|(_, key)| want(key))
            .take(limit)
            .map(|(at, key)| {
                let pending = Pending {
                    key: key.clone(),
                    failures: order.entries.get(key).map_or(0, |e| e.1),
                };
                (*at, pending)
            })
            .collect()
    }
}

/// The mapping of a submission key (`<mapping id>/<submission id>`).
fn mapping_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(m, _)| m)
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
        assert_eq!((q.len_of("a"), q.len_of("b"), q.len_of("gone")), (1, 1, 0));
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
        // Pages: each resumes after the last place of the one before, whatever left meanwhile.
        let page = q.after(None, 1, |_| true);
        assert_eq!(page[0].1.key, "a");
        q.apply(vec![Change::Leave("a".into()), Change::Enter("c".into())]);
        let rest: Vec<String> = q
            .after(Some(page[0].0), 10, |_| true)
            .into_iter()
            .map(|(_, p)| p.key)
            .collect();
        assert_eq!(rest, ["0", "b", "c"]);
    }

    #[test]
    fn entries_are_counted_by_mapping() {
        let q = Queue::load([("m/1".to_string(), 0), ("m/2".to_string(), 1)].into_iter());
        q.apply(vec![
            Change::Enter("n/1".into()),
            Change::Enter("m/1".into()), // already counted
            Change::Leave("m/2".into()),
            Change::Leave("m/2".into()), // already gone
            Change::Leave("n/9".into()), // never there
        ]);
        assert_eq!((q.len_of("m"), q.len_of("n"), q.len()), (1, 1, 2));
        q.apply(vec![
            Change::Leave("m/1".into()),
            Change::Leave("n/1".into()),
        ]);
        assert_eq!((q.len_of("m"), q.len_of("n"), q.len()), (0, 0, 0));
    }
}
