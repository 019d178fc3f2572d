//! Bundles accepted moments ago, handed to their first delivery attempt from memory.

use std::sync::Mutex;

/// How many bytes of fresh Bundles are kept in memory at most; beyond that, deliveries read
/// them back from the Bundle log.
const FRESH_BUDGET: usize = 64 << 20;

/// Bundles accepted moments ago, by submission key, until their first delivery attempt takes
/// them: most deliveries follow their acceptance within milliseconds, and reading the Bundle
/// back from the log (a read and a decompression) is work the first attempt need not do. Only the
/// writer puts one in, once it is durable and before the outbox can see its entry; at most
/// `FRESH_BUDGET` bytes: past that the oldest go (a Bundle nobody took — no EHR configured, a
/// delivery that failed before taking it — must not keep the newer ones out).
pub(crate) struct Fresh {
    bundles: Mutex<FreshBundles>,
    budget: usize,
}

impl Default for Fresh {
    fn default() -> Self {
        Fresh::within(FRESH_BUDGET)
    }
}

#[derive(Default)]
struct FreshBundles {
    /// Each Bundle with its revision.
    by_key: std::collections::HashMap<String, (u32, Vec<u8>)>,
    /// Keys in the order they were put; a key taken since is skipped when its turn comes.
    order: std::collections::VecDeque<String>,
    bytes: usize,
}

impl Fresh {
    /// The map, whatever a panic elsewhere left it as (each entry is whole).
    fn lock(&self) -> std::sync::MutexGuard<'_, FreshBundles> {
        self.bundles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn within(budget: usize) -> Fresh {
        Fresh {
            bundles: Mutex::default(),
            budget,
        }
    }

    pub(crate) fn put(&self, key: &str, revision: u32, bundle: Vec<u8>) {
        let mut f = self.lock();
        if bundle.len() > self.budget {
            // Not kept; nor is an earlier revision's, which is no longer the one to send.
            if let Some((_, gone)) = f.by_key.remove(key) {
                f.bytes -= gone.len();
            }
            return;
        }
        while f.bytes + bundle.len() > self.budget {
            let Some(oldest) = f.order.pop_front() else {
                break;
            };
            if let Some((_, gone)) = f.by_key.remove(&oldest) {
                f.bytes -= gone.len();
            }
        }
        // Taken keys leave their place in `order` behind: drop those once they outnumber
        // the Bundles held, so the order stays within a constant of `by_key`.
        if f.order.len() > 2 * f.by_key.len() + 1024 {
            let FreshBundles { by_key, order, .. } = &mut *f;
            order.retain(|k| by_key.contains_key(k));
        }
        f.bytes += bundle.len();
        if let Some((_, old)) = f.by_key.insert(key.to_string(), (revision, bundle)) {
            f.bytes -= old.len();
        } else {
            f.order.push_back(key.to_string());
        }
    }

    pub(crate) fn take(&self, key: &str) -> Option<(u32, Vec<u8>)> {
        let mut f = self.lock();
        let (revision, bundle) = f.by_key.remove(key)?;
        f.bytes -= bundle.len();
        Some((revision, bundle))
    }

    /// A copy of `key`'s Bundle, left in place.
    pub(crate) fn peek(&self, key: &str) -> Option<Vec<u8>> {
        let f = self.lock();
        f.by_key.get(key).map(|(_, bundle)| bundle.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::Fresh;

    const AT: u32 = 1;

    fn take(fresh: &Fresh, key: &str) -> Option<Vec<u8>> {
        fresh.take(key).map(|(_, bundle)| bundle)
    }

    #[test]
    fn fresh_bundles_nobody_took_make_room_for_new_ones() {
        let fresh = Fresh::within(10);
        fresh.put("never-taken", AT, vec![0; 4]);
        fresh.put("taken", AT, vec![1; 4]);
        assert_eq!(take(&fresh, "taken"), Some(vec![1; 4]));
        fresh.put("a", AT, vec![2; 4]);
        // Full (8 of 10 bytes): the oldest goes, not the newest.
        fresh.put("b", AT, vec![3; 4]);
        assert_eq!(take(&fresh, "never-taken"), None);
        assert_eq!(take(&fresh, "b"), Some(vec![3; 4]));
        assert_eq!(take(&fresh, "a"), Some(vec![2; 4]));
        // Larger than the whole budget: not kept, and nothing else is dropped for it.
        fresh.put("c", AT, vec![4; 4]);
        fresh.put("huge", AT, vec![5; 11]);
        assert_eq!(take(&fresh, "huge"), None);
        assert_eq!(take(&fresh, "c"), Some(vec![4; 4]));
    }

    #[test]
    fn fresh_forgets_the_places_of_taken_bundles() {
        let fresh = Fresh::within(1 << 20);
        for i in 0..10_000 {
            let key = i.to_string();
            fresh.put(&key, AT, vec![0; 8]);
            assert!(take(&fresh, &key).is_some());
        }
        let f = fresh.bundles.lock().unwrap();
        assert!(f.order.len() <= 2 * f.by_key.len() + 1024 + 1);
        assert_eq!(f.bytes, 0);
    }
}
