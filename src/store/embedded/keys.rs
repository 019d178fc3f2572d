//! How the sled store lays its values out in bytes: outbox job keys, outbox entries, stored
//! records (with their Bundle's place), events, audit keys. Only this engine reads these.

use super::bundles::BundleAt;
use crate::store::model::{Event, JobId, Receiver, StoreError, SubmissionRecord};

/// A job's key in the `outbox`, `events` and `dead_letters` trees: the receiver's name, a NUL,
/// the submission key, a NUL, the job's number (eight big-endian bytes). A receiver's jobs
/// about one submission sort together, in the order they were queued. Submission keys hold no
/// control characters (`ids::check`), so the NULs are where they seem.
pub(crate) fn job_key(job: &JobId) -> Vec<u8> {
    let receiver = job.receiver.name().as_bytes();
    let mut k = Vec::with_capacity(receiver.len() + job.key.len() + 10);
    k.extend_from_slice(receiver);
    k.push(0);
    k.extend_from_slice(job.key.as_bytes());
    k.push(0);
    k.extend_from_slice(&job.seq.to_be_bytes());
    k
}

/// What `job_key` wrote.
pub(crate) fn job_of(bytes: &[u8]) -> Option<JobId> {
    let nul = bytes.iter().position(|b| *b == 0)?;
    let receiver = Receiver::parse(std::str::from_utf8(&bytes[..nul]).ok()?)?;
    let rest = &bytes[nul + 1..];
    let (key, seq) = rest.split_at_checked(rest.len().checked_sub(9)?)?;
    let (sep, seq) = seq.split_first()?;
    if *sep != 0 {
        return None;
    }
    Some(JobId {
        receiver,
        key: String::from_utf8(key.to_vec()).ok()?,
        seq: u64::from_be_bytes(seq.try_into().ok()?),
    })
}

/// The prefix of the job keys of `receiver`'s jobs (about `mapping`'s submissions, if given).
pub(crate) fn jobs_prefix(receiver: &Receiver, mapping: Option<&str>) -> Vec<u8> {
    let mut k = receiver.name().as_bytes().to_vec();
    k.push(0);
    if let Some(m) = mapping {
        k.extend_from_slice(crate::store::key(m, "").as_bytes());
    }
    k
}

/// An outbox entry's value: its failures (four little-endian bytes), then when it entered the
/// outbox (Unix microseconds, eight little-endian bytes), so that opening the store orders the
/// waiting jobs without reading anything else.
pub(crate) fn outbox_entry(failures: u32, entered: i64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&failures.to_le_bytes());
    v[4..].copy_from_slice(&entered.to_le_bytes());
    v
}

pub(crate) fn failures(value: &[u8]) -> u32 {
    value
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes)
}

pub(crate) fn entered(value: &[u8]) -> i64 {
    value
        .get(4..12)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, i64::from_le_bytes)
}

/// How many bytes precede the encoded record in its stored value.
const PREFIX: usize = BundleAt::LEN + 4;

/// A record as sled keeps it: where its current Bundle is in the Bundle log, which revision
/// that Bundle is (four little-endian bytes), then the encoded record — one value, so that a
/// delivery finds its Bundle and names what it sent without decoding the record.
pub(crate) fn stored(at: BundleAt, revision: u32, record: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(PREFIX + record.len());
    v.extend_from_slice(&at.to_bytes());
    v.extend_from_slice(&revision.to_le_bytes());
    v.extend_from_slice(record);
    v
}

/// What `stored` put together: the Bundle's place, its revision, the encoded record.
pub(crate) fn split_stored<'v>(
    key: &str,
    value: &'v [u8],
) -> Result<(BundleAt, u32, &'v [u8]), StoreError> {
    let unreadable = || StoreError::corrupt(key, "its stored form is too short");
    let (head, record) = value.split_at_checked(PREFIX).ok_or_else(unreadable)?;
    let at = BundleAt::from_bytes(&head[..BundleAt::LEN]).ok_or_else(unreadable)?;
    let revision = u32::from_le_bytes(head[BundleAt::LEN..].try_into().map_err(|_| unreadable())?);
    Ok((at, revision, record))
}

/// Records are stored as LZ4-compressed JSON: it shrinks about fourfold, and sled's cost (and
/// write amplification) grows with value size.
pub(crate) fn encode(record: &SubmissionRecord) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(record).map_err(|source| StoreError::Corrupt {
        key: record.key(),
        source,
    })?;
    Ok(lz4_flex::compress_prepend_size(&json))
}

/// A stored value (`stored`) back as its record.
pub(crate) fn decode(key: &str, value: &[u8]) -> Result<SubmissionRecord, StoreError> {
    let (_, _, encoded) = split_stored(key, value)?;
    let json = lz4_flex::decompress_size_prepended(encoded)
        .map_err(|e| StoreError::corrupt(key, format!("not LZ4: {e}")))?;
    serde_json::from_slice(&json).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// An event as the `events` tree keeps it: its id, type and what it sets (each after its
/// length, four little-endian bytes; empty: it sets nothing), then its body.
pub(crate) fn encode_event(e: &Event) -> Vec<u8> {
    let sets = e.sets.as_deref().unwrap_or("");
    let mut v = Vec::with_capacity(12 + e.id.len() + e.kind.len() + sets.len() + e.body.len());
    for part in [e.id.as_bytes(), e.kind.as_bytes(), sets.as_bytes()] {
        v.extend_from_slice(&(part.len() as u32).to_le_bytes());
        v.extend_from_slice(part);
    }
    v.extend_from_slice(&e.body);
    v
}

pub(crate) fn decode_event(receiver: &Receiver, value: &[u8]) -> Option<Event> {
    let mut rest = value;
    let mut take = || -> Option<String> {
        let (len, tail) = rest.split_at_checked(4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let (part, tail) = tail.split_at_checked(len)?;
        rest = tail;
        String::from_utf8(part.to_vec()).ok()
    };
    let id = take()?;
    let kind = take()?;
    let sets = Some(take()?).filter(|s| !s.is_empty());
    Some(Event {
        receiver: receiver.clone(),
        id,
        kind,
        sets,
        body: rest.to_vec(),
    })
}

/// An audit key: Unix µs, then a sequence number (big-endian), so that the tree is in the
/// order of the accesses even within one microsecond.
pub(crate) fn audit_key(micros: u64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&micros.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The mark that an inbound event named `seen` was taken: `s`, then the name.
pub(crate) fn seen_key(seen: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + seen.len());
    k.push(b's');
    k.extend_from_slice(seen.as_bytes());
    k
}

/// Where an unmatched event is kept: `u`, then an `audit_key` (so in the order they came).
pub(crate) fn unmatched_key(at: &[u8; 16]) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'u';
    k[1..].copy_from_slice(at);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_keys_read_back_and_sort_by_lane_then_number() {
        let job = |r: Receiver, seq| JobId {
            receiver: r,
            key: "m/a b".into(),
            seq,
        };
        for j in [JobId::ehr("m/s"), job(Receiver::Webhook("crm".into()), 7)] {
            assert_eq!(job_of(&job_key(&j)), Some(j));
        }
        let crm = |seq| job_key(&job(Receiver::Webhook("crm".into()), seq));
        assert!(crm(2) < crm(10));
        assert!(job_key(&JobId::ehr("m/s")).starts_with(&jobs_prefix(&Receiver::Ehr, Some("m"))));
        assert_eq!(job_of(b"crm"), None);
        let e = Event {
            receiver: Receiver::Webhook("crm".into()),
            id: "evt_1".into(),
            kind: "intake.submitted".into(),
            sets: Some("received".into()),
            body: br#"{"a":1}"#.to_vec(),
        };
        assert_eq!(decode_event(&e.receiver, &encode_event(&e)), Some(e));
    }
}
