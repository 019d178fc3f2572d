//! The embedded store: the store contract (`store::Store`) on sled, with the Bundles in an
//! append-only log beside it. Zero configuration: a data directory is all it needs.
//!
//! Layout: sled's trees hold the records (`submissions`, each with its current Bundle's place
//! in the log), the outbox (`outbox`: job → failures and when it entered; `events`: webhook
//! jobs' events), the indexes (`by_resource`, `by_patient`, `dead_letters`), the audit trail
//! (`audit`), the inbound events taken and those that matched nothing (`inbound`) and the
//! pollers' cursors (`cursors`). Every write goes through one writer thread (`writer`) and returns once it is on
//! disk; reads go straight to sled. The order of the waiting jobs is kept in memory (`queue`),
//! rebuilt from the outbox tree at open.
//!
//! Stores of earlier development versions are refused at open (`FORMAT`): nothing was deployed
//! before this layout.

mod bundles;
mod fresh;
mod keys;
mod queue;
mod retention;
mod transaction;
mod writer;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keys::{audit_key, decode, decode_event, job_key, job_of, jobs_prefix, split_stored};
use writer::{Trees, Write, Writer, Written};

use super::model::{
    Accepted, Access, AuditPage, AuditWindow, CommitStats, Consequences, Cursor, EhrResource,
    Event, EventOutcome, Health, Inbound, JobId, Pending, Receiver, RecordPage, Requeued, State,
    StoreError, SubmissionRecord, Swept, Taken, Transition, Unmatched,
};
use super::rules;

/// The layout this version writes and reads, kept in sled's default tree under `FORMAT_KEY`.
const FORMAT: &[u8] = b"chartbridge-store-2";
const FORMAT_KEY: &[u8] = b"format";

/// How a store is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The Bundle log begins a new segment once its last one holds this many bytes; retention
    /// deletes whole segments.
    pub bundle_segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            bundle_segment_bytes: 64 << 20,
        }
    }
}

/// The store on sled.
pub struct SledStore {
    trees: Arc<Trees>,
    writer: Writer,
}

/// sled's errors, in the store's terms.
fn engine(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(source) => StoreError::Io {
            path: "sled".into(),
            source,
        },
        other => StoreError::Engine(other.to_string()),
    }
}

static AUDIT_SEQ: AtomicU64 = AtomicU64::new(0);

/// `t` in Unix µs (0 before 1970).
fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// How many audit entries one write round removes at most (a sweep takes several rounds, and
/// submissions get theirs in between).
const FORGET_AT_ONCE: usize = 2048;

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with(dir, StoreOptions::default())
    }

    /// `open`, laid out as `options` say.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<SledStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if dir.join("bundles.log").exists() {
            return Err(earlier_format(dir));
        }
        let db = open_sled(dir)?;
        check_format(&db, dir)?;
        let (bundles, appender) =
            bundles::BundleLog::open(&dir.join("bundles"), options.bundle_segment_bytes)?;
        let tree = |name: &str| db.open_tree(name).map_err(engine);
        let outbox = tree("outbox")?;
        let events = tree("events")?;
        let dead_letters = tree("dead_letters")?;
        let next_seq = [&outbox, &events, &dead_letters]
            .into_iter()
            .flat_map(|t| t.iter().keys())
            .filter_map(|k| job_of(&k.ok()?))
            .map(|job| job.seq)
            .max()
            .map_or(1, |seq| seq + 1);
        let trees = Arc::new(Trees {
            queue: waiting(&outbox)?,
            submissions: tree("submissions")?,
            bundles,
            outbox,
            events,
            next_seq: std::sync::atomic::AtomicU64::new(next_seq),
            by_resource: tree("by_resource")?,
            by_patient: tree("by_patient")?,
            audit: tree("audit")?,
            dead_letters,
            inbound: tree("inbound")?,
            cursors: tree("cursors")?,
            fresh: fresh::Fresh::default(),
            db,
        });
        let writer = Writer::start(Arc::clone(&trees), appender, dir)?;
        Ok(SledStore { trees, writer })
    }

    fn write_async(&self, write: Write) -> impl Future<Output = Result<Written, StoreError>> + '_ {
        self.writer.write_async(write)
    }

    /// The Bundle kept for `key` in the log, as JSON, and its revision.
    fn kept_json(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        // A sweep may move a waiting Bundle and drop its old segment between the read of the
        // record and the read of the log: read again, the record has the new place.
        for _ in 0..2 {
            let Some(value) = self.trees.submissions.get(key.as_bytes()).map_err(engine)? else {
                return Ok(None);
            };
            let (at, revision, _) = split_stored(key, &value)?;
            if let Some(lz4) = self.trees.bundles.read(key, at)? {
                let json = lz4_flex::decompress_size_prepended(&lz4)
                    .map_err(|e| StoreError::corrupt(key, format!("bundle is not LZ4: {e}")))?;
                return Ok(Some((json, revision)));
            }
        }
        Ok(None)
    }

    /// A page of `limit` records of the listing `entries` (place, job) goes on with, in its
    /// order, `total` in all: `next` names the last one if more follow.
    fn page(
        &self,
        entries: impl Iterator<Item = (u64, JobId)>,
        total: usize,
        limit: usize,
    ) -> Result<RecordPage, StoreError> {
        let mut page = RecordPage {
            total,
            ..RecordPage::default()
        };
        let mut last = None;
        for (at, job) in entries {
            if page.records.len() == limit {
                page.next = last.as_ref().map(Cursor::render);
                break;
            }
            if let Some(record) = self.get_record(&job.key)? {
                page.records.push(record);
                last = Some(Cursor {
                    at,
                    job: String::from_utf8_lossy(&job_key(&job)).into_owned(),
                });
                page.jobs.push(job);
            }
        }
        Ok(page)
    }

    fn get_record(&self, key: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        self.trees
            .submissions
            .get(key.as_bytes())
            .map_err(engine)?
            .map(|b| decode(key, &b))
            .transpose()
    }

    /// The dead-lettered jobs (when, Unix µs; job) of `receiver`, of one mapping or all,
    /// earliest first.
    fn dead_letter_entries(
        &self,
        receiver: &Receiver,
        mapping_id: Option<&str>,
    ) -> Result<Vec<(u64, JobId)>, StoreError> {
        let mut entries = Vec::new();
        for entry in self
            .trees
            .dead_letters
            .scan_prefix(jobs_prefix(receiver, mapping_id))
        {
            let (key, when) = entry.map_err(engine)?;
            let when = <[u8; 8]>::try_from(when.as_ref()).map_or(0, i64::from_le_bytes);
            if let Some(job) = job_of(&key) {
                entries.push((u64::try_from(when).unwrap_or(0), job));
            }
        }
        entries.sort();
        Ok(entries)
    }
}

fn earlier_format(dir: &Path) -> StoreError {
    StoreError::Format(format!(
        "{} holds a store written by an earlier development version of chartbridge, which this \
         version does not read (nothing was deployed before it). Move the directory aside (or \
         point data_dir elsewhere) to start a new store",
        dir.display()
    ))
}

/// Marks a new store with this version's layout; refuses a store without the mark (or with
/// another one).
fn check_format(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    match db.get(FORMAT_KEY).map_err(engine)? {
        Some(format) if format.as_ref() == FORMAT => Ok(()),
        Some(_) => Err(earlier_format(dir)),
        None => {
            let used = db
                .tree_names()
                .iter()
                .filter(|name| name.as_ref() != b"__sled__default")
                .any(|name| db.open_tree(name).is_ok_and(|t| !t.is_empty()));
            if used {
                return Err(earlier_format(dir));
            }
            db.insert(FORMAT_KEY, FORMAT).map_err(engine)?;
            db.flush().map_err(engine)?;
            Ok(())
        }
    }
}

/// Opens sled in `dir`. sled lets go of its file lock only when the last reference to the
/// database goes, which can be a moment after a store of this process was dropped (its IO
/// threads and deferred frees hold references): a reopen waits up to two seconds for the lock
/// before it gives up.
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // Every write goes through the writer, which flushes after each round: sled's own
            // background flusher has nothing left to do.
            .flush_every_ms(None)
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            opened => return opened.map_err(engine),
        }
    }
}

/// The outbox's jobs in the order they entered it (accepted, or put back by a replay), then
/// by job key (a receiver's jobs about one submission in their order).
fn waiting(outbox: &sled::Tree) -> Result<queue::Queue, StoreError> {
    let mut entries = Vec::new();
    for entry in outbox.iter() {
        let (key, value) = entry.map_err(engine)?;
        if let Some(job) = job_of(&key) {
            entries.push((keys::entered(&value), key, job, keys::failures(&value)));
        }
    }
    entries.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(queue::Queue::load(
        entries
            .into_iter()
            .map(|(_, _, job, failures)| (job, failures)),
    ))
}

/// Whether a stored record says its submission was delivered (or acknowledged): its Bundle is
/// no longer needed once past the retention. An unreadable record counts as not delivered.
fn delivered(key: &str, stored: &[u8]) -> bool {
    decode(key, stored)
        .is_ok_and(|r| matches!(r.state(), Some(State::Delivered | State::Acknowledged)))
}

/// Whether a submission (its stored record) can no longer be replayed: it was delivered and
/// its Bundle in the log is gone or expiring. A sweep moves the Bundles of the others before
/// it drops their segment.
fn replay_expired(trees: &Trees, key: &str, stored: &[u8]) -> bool {
    split_stored(key, stored).is_ok_and(|(at, _, _)| !trees.bundles.keeps(at))
        && delivered(key, stored)
}

fn accepted(w: Written) -> Result<Accepted, StoreError> {
    match w {
        Written::Accepted(a) => Ok(a),
        _ => Err(StoreError::Failed(
            "the writer answered another write".into(),
        )),
    }
}

fn record(w: Written) -> Result<Option<SubmissionRecord>, StoreError> {
    match w {
        Written::Record(r) => Ok(r.map(|r| *r)),
        _ => Err(StoreError::Failed(
            "the writer answered another write".into(),
        )),
    }
}

fn requeued(w: Written) -> Result<Requeued, StoreError> {
    match w {
        Written::Expired => Ok(Requeued::Expired),
        w => Ok(match record(w)? {
            Some(r) => Requeued::Waiting(Box::new(r)),
            None => Requeued::Unknown,
        }),
    }
}

/// A new submission (`revises: None`), or a revision of the one whose payload is `revises`;
/// its events noted in the record before it is encoded.
fn accept_write(
    record: &SubmissionRecord,
    bundle: Vec<u8>,
    revises: Option<&str>,
    events: Vec<Event>,
) -> Result<Write, StoreError> {
    let encoded = if events.is_empty() {
        keys::encode(record)?
    } else {
        let mut noted = record.clone();
        let at = record.transitions.last().map_or("", |t| t.at.as_str());
        rules::queued(&mut noted, &events, at);
        keys::encode(&noted)?
    };
    Ok(Write::Accept {
        key: record.key(),
        record: encoded,
        payload_sha256: record.payload_sha256.clone(),
        revision: record.revision(),
        lz4: lz4_flex::compress_prepend_size(&bundle),
        bundle,
        patient: record.patient(),
        revises: revises.map(str::to_string),
        events,
    })
}

impl super::Store for SledStore {
    fn accept<'s>(
        &'s self,
        record: &SubmissionRecord,
        bundle: Vec<u8>,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Accepted, StoreError>> + Send + use<'s> {
        // Encoded now, not when first polled: the caller may drop what it built them from.
        let write = accept_write(record, bundle, None, events);
        async move { accepted(self.write_async(write?).await?) }
    }

    fn revise<'s>(
        &'s self,
        record: &SubmissionRecord,
        bundle: Vec<u8>,
        revises: &str,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Accepted, StoreError>> + Send + use<'s> {
        let write = accept_write(record, bundle, Some(revises), events);
        async move { accepted(self.write_async(write?).await?) }
    }

    fn get(&self, key: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        self.get_record(key)
    }

    fn current_bundle(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(bundle) = self.trees.fresh.peek(key) {
            return Ok(Some(bundle));
        }
        Ok(self.kept_json(key)?.map(|(bundle, _)| bundle))
    }

    fn by_resource(&self, reference: &str) -> Result<Option<SubmissionRecord>, StoreError> {
        match self
            .trees
            .by_resource
            .get(reference.as_bytes())
            .map_err(engine)?
        {
            Some(key) => self.get_record(&String::from_utf8_lossy(&key)),
            None => Ok(None),
        }
    }

    fn by_patient(&self, system: &str, value: &str) -> Result<Vec<String>, StoreError> {
        let prefix = transaction::patient_entry(&format!("{system}|{value}"), "");
        self.trees
            .by_patient
            .scan_prefix(&prefix)
            .keys()
            .map(|k| {
                k.map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
                    .map_err(engine)
            })
            .collect()
    }

    fn waiting(&self, limit: usize, want: &mut dyn FnMut(&JobId) -> bool) -> Vec<Pending> {
        self.trees.queue.first(limit, want)
    }

    fn bundle_to_deliver(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        if let Some((revision, bundle)) = self.trees.fresh.take(key) {
            return Ok(Some((bundle, revision)));
        }
        self.kept_json(key)
    }

    fn event(&self, job: &JobId) -> Result<Option<Event>, StoreError> {
        Ok(self
            .trees
            .events
            .get(job_key(job))
            .map_err(engine)?
            .and_then(|e| decode_event(&job.receiver, &e)))
    }

    fn record_delivery<'s>(
        &'s self,
        key: &str,
        transition: Transition,
        ehr: Vec<EhrResource>,
        sent: Option<u32>,
        consequences: Consequences,
    ) -> impl Future<Output = Result<Option<SubmissionRecord>, StoreError>> + Send + use<'s> {
        let write = Write::Delivery {
            key: key.to_string(),
            transition,
            ehr,
            sent,
            consequences,
        };
        async move { record(self.write_async(write).await?) }
    }

    fn settle<'s>(
        &'s self,
        job: &JobId,
        failures: u32,
        outcome: EventOutcome,
    ) -> impl Future<Output = Result<Option<SubmissionRecord>, StoreError>> + Send + use<'s> {
        let write = Write::Settle {
            job: job.clone(),
            failures,
            outcome,
        };
        async move { record(self.write_async(write).await?) }
    }

    fn requeue<'s>(
        &'s self,
        job: &JobId,
        at: &str,
    ) -> impl Future<Output = Result<Requeued, StoreError>> + Send + use<'s> {
        let write = Write::Requeue {
            job: job.clone(),
            at: at.to_string(),
        };
        async move { requeued(self.write_async(write).await?) }
    }

    fn outbox_depth(&self, receiver: &Receiver) -> usize {
        match receiver {
            Receiver::Ehr => self.trees.queue.ehr_len(),
            other => self.trees.queue.len_for(other),
        }
    }

    fn outbox_depth_of(&self, mapping_id: &str) -> usize {
        self.trees.queue.len_of(mapping_id)
    }

    fn dead_letter_count(&self, receiver: &Receiver) -> usize {
        self.trees
            .dead_letters
            .scan_prefix(jobs_prefix(receiver, None))
            .count()
    }

    fn dead_letter_jobs(
        &self,
        receiver: &Receiver,
        mapping_id: Option<&str>,
    ) -> Result<Vec<JobId>, StoreError> {
        Ok(self
            .dead_letter_entries(receiver, mapping_id)?
            .into_iter()
            .map(|(_, job)| job)
            .collect())
    }

    fn dead_letter_page(
        &self,
        receiver: &Receiver,
        mapping_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<RecordPage, StoreError> {
        let entries = self.dead_letter_entries(receiver, mapping_id)?;
        let total = entries.len();
        let later = entries.into_iter().rev().filter(|(when, job)| {
            after.is_none_or(|c| {
                (*when, String::from_utf8_lossy(&job_key(job)).as_ref()) < (c.at, c.job.as_str())
            })
        });
        self.page(later, total, limit)
    }

    fn waiting_page(
        &self,
        receiver: &Receiver,
        mapping_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<RecordPage, StoreError> {
        let queue = &self.trees.queue;
        let prefix = mapping_id.map(|m| super::key(m, ""));
        let mut want = |job: &JobId| {
            job.receiver == *receiver
                && prefix
                    .as_ref()
                    .is_none_or(|p| job.key.starts_with(p.as_str()))
        };
        let waiting = queue.after(after.map(|c| c.at), limit.saturating_add(1), &mut want);
        let total = match (receiver, mapping_id) {
            (Receiver::Ehr, Some(m)) => queue.len_of(m),
            (r, _) => self.outbox_depth(r),
        };
        self.page(waiting.into_iter().map(|(at, p)| (at, p.job)), total, limit)
    }

    fn take_inbound<'s>(
        &'s self,
        seen: &str,
        inbound: Inbound,
    ) -> impl Future<Output = Result<Taken, StoreError>> + Send + use<'s> {
        let write = Write::Inbound {
            seen: seen.to_string(),
            inbound,
            key: audit_key(
                unix_micros(SystemTime::now()),
                AUDIT_SEQ.fetch_add(1, Ordering::Relaxed),
            ),
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        async move {
            match self.write_async(write).await? {
                Written::Taken(taken) => Ok(taken),
                _ => Err(StoreError::Failed("an inbound event was not taken".into())),
            }
        }
    }

    fn unmatched(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Unmatched>, Option<String>), StoreError> {
        let end = match before {
            Some(cursor) => super::model::from_hex(cursor)
                .filter(|k| k.len() == 17 && k[0] == b'u')
                .ok_or_else(|| StoreError::Failed(format!("`{cursor}` is not a page's cursor")))?,
            None => vec![b'v'],
        };
        let mut kept = Vec::new();
        let mut last = None;
        for entry in self
            .trees
            .inbound
            .range(b"u".to_vec()..end)
            .rev()
            .take(limit)
        {
            let (key, value) = entry.map_err(engine)?;
            kept.push(
                serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                    key: format!("unmatched {}", super::model::hex(&key)),
                    source,
                })?,
            );
            last = Some(key);
        }
        let next = last
            .filter(|_| kept.len() == limit)
            .map(|key| super::model::hex(&key));
        Ok((kept, next))
    }

    fn unmatched_count(&self) -> usize {
        self.trees.inbound.scan_prefix(b"u").count()
    }

    fn cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        let value = self.trees.cursors.get(name.as_bytes()).map_err(engine)?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_cursor<'s>(
        &'s self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + use<'s> {
        let write = Write::Cursor {
            name: name.to_string(),
            value: value.to_string(),
        };
        async move { self.write_async(write).await.map(|_| ()) }
    }

    fn record_access<'s>(
        &'s self,
        access: &Access,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + use<'s> {
        let encoded = serde_json::to_vec(access).map_err(|source| StoreError::Corrupt {
            key: "audit".into(),
            source,
        });
        async move {
            let write = Write::Audit {
                key: audit_key(
                    unix_micros(SystemTime::now()),
                    AUDIT_SEQ.fetch_add(1, Ordering::Relaxed),
                ),
                access: encoded?,
            };
            self.write_async(write).await.map(|_| ())
        }
    }

    fn accesses(&self, window: AuditWindow, limit: usize) -> Result<AuditPage, StoreError> {
        let since = window.since.map_or([0; 16], |t| audit_key(t, 0));
        let before = window
            .before
            .map_or([0xff; 16], |c| audit_key(c.micros, c.seq));
        let mut accesses = Vec::new();
        if since >= before {
            return Ok(AuditPage {
                accesses,
                next: None,
            });
        }
        let mut last = None;
        for entry in self.trees.audit.range(since..before).rev().take(limit) {
            let (key, value) = entry.map_err(engine)?;
            accesses.push(serde_json::from_slice(&value).map_err(|source| {
                StoreError::Corrupt {
                    key: format!("audit {}", super::model::hex(&key)),
                    source,
                }
            })?);
            last = Some(key);
        }
        let next = last
            .filter(|_| accesses.len() == limit)
            .map(|key| super::model::hex(&key));
        Ok(AuditPage { accesses, next })
    }

    fn forget_accesses(&self, retention: Duration, now: SystemTime) -> Result<usize, StoreError> {
        let Some(cutoff) = now.checked_sub(retention) else {
            return Ok(0);
        };
        let below = audit_key(unix_micros(cutoff), 0);
        let mut forgotten = 0;
        loop {
            let keys = self
                .trees
                .audit
                .range(..below)
                .keys()
                .take(FORGET_AT_ONCE)
                .collect::<Result<Vec<_>, _>>()
                .map_err(engine)?;
            let n = keys.len();
            if n == 0 {
                return Ok(forgotten);
            }
            self.writer.write(Write::Forget { keys })?;
            forgotten += n;
            if n < FORGET_AT_ONCE {
                return Ok(forgotten);
            }
        }
    }

    fn sweep_bundles(&self, retention: Duration, now: SystemTime) -> Result<Swept, StoreError> {
        retention::sweep(self, retention, now)
    }

    fn health(&self) -> Health {
        self.writer.status.health()
    }

    fn stats(&self) -> CommitStats {
        self.writer.status.stats()
    }

    fn commit(&self) -> Result<(), StoreError> {
        self.writer.write(Write::Barrier).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_resource_the_ehr_stored_is_listed_once_at_its_latest_version() {
        let at = |kind: &str, id: &str, version: &str| EhrResource {
            resource_type: kind.into(),
            id: id.into(),
            version: Some(version.into()),
            etag: Some(format!("W/\"{version}\"")),
        };
        let mut r = SubmissionRecord {
            mapping_id: "m".into(),
            mapping_version: "1".into(),
            mapping_sha256: "ab".repeat(32),
            submission_id: "s1".into(),
            payload_sha256: "cd".repeat(32),
            patient_system: "s".into(),
            patient_value: "v".into(),
            flags: vec![],
            missing: vec![],
            transitions: vec![],
            ehr: vec![],
            earlier_payloads: vec![],
            events: vec![],
        };
        r.stored_in_ehr(&[at("Patient", "p", "1"), at("Observation", "o", "1")]);
        // A revision: the Observation amended, the same id in another type, a new Provenance.
        r.stored_in_ehr(&[
            at("Patient", "p", "1"),
            at("Observation", "o", "2"),
            at("Provenance", "o", "1"),
        ]);
        assert_eq!(
            r.ehr,
            [
                at("Patient", "p", "1"),
                at("Observation", "o", "2"),
                at("Provenance", "o", "1")
            ]
        );
    }

    /// A data directory of an earlier development version is refused with a clear error, not
    /// misread.
    #[test]
    fn a_store_of_an_earlier_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("submissions")
                .unwrap()
                .insert("m/s", &b"old"[..])
                .unwrap();
            db.flush().unwrap();
        }
        let e = SledStore::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("earlier development version"), "{e}");
        let fresh = tempfile::tempdir().unwrap();
        drop(SledStore::open(fresh.path()).unwrap());
        SledStore::open(fresh.path()).unwrap();
    }
}
