//! Retention of the Bundle log: segments whose Bundles are all older than `bundle_retention_days`
//! are deleted whole, oldest first. A Bundle still needed — its submission waits in the outbox
//! or was dead-lettered (a replay sends it) — is moved to the end of the log first, durably, so
//! only delivered submissions lose theirs. A replay and a sweep never cross: the sweep first
//! marks the expiring Bundles through the writer (`Write::Expire`), and from that round on a
//! replay of a delivered submission whose Bundle is expiring is refused; every replay before it
//! is in the records the sweep then reads.

use std::time::{Duration, SystemTime};

use super::keys::split_stored;
use super::writer::Write;
use super::{delivered, engine, SledStore};
use crate::store::model::{StoreError, Swept};

/// How many Bundles a sweep moves in one go (they are held in memory meanwhile).
const MOVES_AT_ONCE: usize = 256;

/// Deletes the Bundles kept longer than `retention`, moving the ones still needed first. Reads
/// every record whose Bundle is in an expiring segment: for now and then (the server sweeps
/// hourly), not for the hot path.
pub(super) fn sweep(
    store: &SledStore,
    retention: Duration,
    now: SystemTime,
) -> Result<Swept, StoreError> {
    let Some(below) = expire(store, retention, now)? else {
        return Ok(Swept::default());
    };
    let mut swept = Swept::default();
    let mut moves = Vec::new();
    for entry in store.trees.submissions.iter() {
        let (key, value) = entry.map_err(engine)?;
        let key = String::from_utf8_lossy(&key).into_owned();
        let Ok((at, _, _)) = split_stored(&key, &value) else {
            continue;
        };
        if at.offset >= below {
            continue;
        }
        // An unreadable record counts as needed: its Bundle is kept.
        if delivered(&key, &value) {
            swept.expired += 1;
            // Not kept in memory either, had no delivery taken it.
            store.trees.fresh.take(&key);
            continue;
        }
        match store.trees.bundles.read(&key, at) {
            Ok(Some(lz4)) => moves.push(Write::Move { key, lz4 }),
            Ok(None) => {}
            // A Bundle that fails its check cannot be delivered from anywhere: nothing to
            // keep (its delivery is dead-lettered, saying so).
            Err(e) => tracing::warn!(key, error = %e, "bundle sweep: an unreadable Bundle"),
        }
        if moves.len() == MOVES_AT_ONCE {
            swept.moved += write_all(store, std::mem::take(&mut moves))?;
        }
    }
    swept.moved += write_all(store, moves)?;
    // Every move is on disk before any segment goes.
    swept.segments = store.trees.bundles.drop_below(below)?;
    Ok(swept)
}

/// A sweep's first step: marks the Bundles of the segments past `retention` as expiring —
/// replays of their delivered submissions are refused from now on — and returns the offset
/// they end at (`None`: nothing has expired). Every replay that got in before is in the store
/// when this returns, so the sweep's scan sees it and keeps its Bundle.
fn expire(
    store: &SledStore,
    retention: Duration,
    now: SystemTime,
) -> Result<Option<u64>, StoreError> {
    let below = store
        .trees
        .bundles
        .closed()?
        .into_iter()
        .take_while(|s| s.modified.checked_add(retention).is_some_and(|t| t <= now))
        .last()
        .map(|s| s.end);
    if let Some(below) = below {
        store.writer.write(Write::Expire { below })?;
    }
    Ok(below)
}

/// Queues `writes` at once (the writer takes them in as few rounds as it can) and returns how
/// many there were once all are durable.
fn write_all(store: &SledStore, writes: Vec<Write>) -> Result<usize, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let n = writes.len();
    for write in writes {
        let tx = tx.clone();
        store.writer.submit(
            write,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
    }
    drop(tx);
    for written in rx {
        written?;
    }
    Ok(n)
}
