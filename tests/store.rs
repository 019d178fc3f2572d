//! The sled store on a real disk: accept with outbox in one transaction, idempotency, state
//! transitions, indexes both ways, persistence across reopen, writes grouped into durable rounds.

use std::sync::Arc;

use chartbridge::store::{
    Accepted, AuditWindow, Cursor, EhrResource, Requeued, State, Store, StoreOptions,
    SubmissionRecord, Swept, Transition,
};

const BUNDLE: &[u8] = br#"{"resourceType":"Bundle","type":"transaction"}"#;

fn record(submission_id: &str, payload_sha256: &str) -> SubmissionRecord {
    SubmissionRecord {
        mapping_id: "glp1-intake-typeform".into(),
        mapping_version: "3".into(),
        mapping_sha256: "ab".repeat(32),
        submission_id: submission_id.into(),
        payload_sha256: payload_sha256.into(),
        patient_system: "https://crm.example-clinic.com/patient".into(),
        patient_value: "pt_8f3c2a91".into(),
        flags: vec!["contraindication_reported".into()],
        missing: vec![],
        transitions: vec![
            Transition {
                state: State::Received,
                at: "2026-01-01T00:00:00Z".into(),
                detail: None,
            },
            Transition {
                state: State::Mapped,
                at: "2026-01-01T00:00:00Z".into(),
                detail: None,
            },
        ],
        ehr: vec![],
        earlier_payloads: vec![],
    }
}

#[test]
fn accept_is_idempotent_and_conflicts_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let r = record("tok-1", "aaaa");
    assert_eq!(store.accept(&r, BUNDLE).unwrap(), Accepted::New);
    store.commit().unwrap();
    assert!(matches!(
        store.accept(&r, BUNDLE).unwrap(),
        Accepted::Duplicate(_)
    ));
    assert!(matches!(
        store.accept(&record("tok-1", "bbbb"), BUNDLE).unwrap(),
        Accepted::Conflict(..)
    ));
    assert_eq!(
        store.pending(),
        vec![r.key()],
        "one outbox entry, not three"
    );
    assert_eq!(store.get(&r.key()).unwrap().unwrap(), r);
    assert_eq!(store.bundle(&r.key()).unwrap().as_deref(), Some(BUNDLE));
    assert!(store.bundle("no/such").unwrap().is_none());
}

/// The Bundle log's first segment.
fn first_segment(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("bundles/00000000000000000000.log")
}

/// The Bundle log's length in bytes (one segment).
fn log_len(dir: &std::path::Path) -> u64 {
    std::fs::metadata(first_segment(dir)).unwrap().len()
}

/// What one `BUNDLE` takes in the log: its frame header and its LZ4 text.
fn one_frame() -> u64 {
    8 + lz4_flex::compress_prepend_size(BUNDLE).len() as u64
}

#[test]
fn a_resent_submission_adds_nothing_to_the_bundle_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let r = record("tok-5", "aaaa");
    assert_eq!(store.accept(&r, BUNDLE).unwrap(), Accepted::New);
    assert_eq!(log_len(dir.path()), one_frame());
    assert!(matches!(
        store.accept(&r, BUNDLE).unwrap(),
        Accepted::Duplicate(_)
    ));
    assert!(matches!(
        store.accept(&record("tok-5", "bbbb"), BUNDLE).unwrap(),
        Accepted::Conflict(..)
    ));
    assert_eq!(log_len(dir.path()), one_frame(), "re-sends keep no Bundle");
    store.accept(&record("tok-6", "aaaa"), BUNDLE).unwrap();
    assert_eq!(log_len(dir.path()), 2 * one_frame());
    assert_eq!(store.bundle(&r.key()).unwrap().as_deref(), Some(BUNDLE));
}

#[test]
fn a_fresh_bundle_is_handed_over_from_memory_once_then_read_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let r = record("tok-7", "aaaa");
    store.accept(&r, BUNDLE).unwrap();
    // Damage the log: the first read does not touch it, the next one does and notices.
    let log = first_segment(dir.path());
    let len = std::fs::read(&log).unwrap().len();
    std::fs::write(&log, vec![0u8; len]).unwrap();
    assert_eq!(store.bundle(&r.key()).unwrap().as_deref(), Some(BUNDLE));
    assert!(matches!(
        store.bundle(&r.key()),
        Err(chartbridge::store::StoreError::Corrupt { .. })
    ));
}

/// The outbox's listing comes in pages, oldest first, of one mapping or all, each saying how
/// many wait in all and where the next begins.
#[test]
fn waiting_deliveries_are_listed_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for id in ["w1", "w2", "w3"] {
        store.accept(&record(id, "aaaa"), BUNDLE).unwrap();
    }
    let mut other = record("p1", "aaaa");
    other.mapping_id = "phq9-typeform".into();
    store.accept(&other, BUNDLE).unwrap();
    let keys = |page: &chartbridge::store::RecordPage| -> Vec<String> {
        page.records.iter().map(SubmissionRecord::key).collect()
    };

    let first = store.waiting_page(None, None, 2).unwrap();
    assert_eq!((keys(&first), first.total), (vec![key("w1"), key("w2")], 4));
    let after = Cursor::parse(first.next.as_deref().unwrap()).unwrap();
    // What left meanwhile does not move the next page.
    store
        .transition(&key("w1"), to(State::Delivered), vec![])
        .unwrap();
    let rest = store.waiting_page(None, Some(&after), 2).unwrap();
    assert_eq!(
        (keys(&rest), rest.total, rest.next),
        (vec![key("w3"), other.key()], 3, None)
    );
    let typeform = store
        .waiting_page(Some("glp1-intake-typeform"), None, 10)
        .unwrap();
    assert_eq!(
        (keys(&typeform), typeform.total, typeform.next),
        (vec![key("w2"), key("w3")], 2, None)
    );
    for not_a_cursor in ["", "zz", "00000000000000000", "0000000000000001zz"] {
        assert_eq!(Cursor::parse(not_a_cursor), None, "{not_a_cursor:?}");
    }
}

#[test]
fn delivery_leaves_the_outbox_and_indexes_ehr_resources() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let r = record("tok-2", "aaaa");
    store.accept(&r, BUNDLE).unwrap();
    let failed = Transition {
        state: State::Failed,
        at: "2026-01-01T00:00:01Z".into(),
        detail: Some("503".into()),
    };
    let failures = || {
        let pending = store.pending_where(10, |_| true);
        assert_eq!(
            pending.len(),
            1,
            "a failure stays in the outbox for a retry"
        );
        pending[0].failures
    };
    assert_eq!(failures(), 0);
    store.transition(&r.key(), failed.clone(), vec![]).unwrap();
    assert_eq!(failures(), 1);
    store.transition(&r.key(), failed, vec![]).unwrap();
    assert_eq!(
        failures(),
        2,
        "the backoff grows from what the outbox counts"
    );
    store.requeue(&r.key(), "2026-01-01T00:00:01Z").unwrap();
    assert_eq!(failures(), 0, "a replay starts the count again");
    let ehr = vec![
        EhrResource {
            resource_type: "QuestionnaireResponse".into(),
            id: "qr1".into(),
            version: Some("1".into()),
            etag: Some("W/\"1\"".into()),
        },
        EhrResource {
            resource_type: "Observation".into(),
            id: "o1".into(),
            version: None,
            etag: None,
        },
    ];
    let delivered = Transition {
        state: State::Delivered,
        at: "2026-01-01T00:00:02Z".into(),
        detail: None,
    };
    let updated = store.transition(&r.key(), delivered, ehr).unwrap().unwrap();
    assert_eq!(updated.state(), Some(State::Delivered));
    assert_eq!(updated.transitions.len(), 6);
    assert!(store.pending().is_empty());
    assert_eq!(
        store
            .by_resource("Observation/o1")
            .unwrap()
            .unwrap()
            .submission_id,
        "tok-2"
    );
    assert!(store.by_resource("Observation/none").unwrap().is_none());
    assert_eq!(
        store
            .by_patient("https://crm.example-clinic.com/patient", "pt_8f3c2a91")
            .unwrap(),
        vec![r.key()]
    );
    assert!(store
        .transition(
            "no/such",
            Transition {
                state: State::Delivered,
                at: "x".into(),
                detail: None
            },
            vec![]
        )
        .unwrap()
        .is_none());
}

#[test]
fn committed_submissions_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.accept(&record("tok-3", "aaaa"), BUNDLE).unwrap();
        store.commit().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.pending(),
        vec!["glp1-intake-typeform/tok-3".to_string()]
    );
    // The Bundle lives in the Bundle log, found again through sled after reopening; later
    // appends go after it.
    let bundle = |id: &str| store.bundle(&format!("glp1-intake-typeform/{id}")).unwrap();
    assert_eq!(bundle("tok-3").as_deref(), Some(BUNDLE));
    store.accept(&record("tok-4", "aaaa"), b"{}").unwrap();
    assert_eq!(bundle("tok-4").as_deref(), Some(&b"{}"[..]));
    assert_eq!(bundle("tok-3").as_deref(), Some(BUNDLE));
}

/// Runs `f(store, thread number)` on 16 threads at once; their results in thread order.
fn on_16_threads<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl Fn(&Store, usize) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let store = Arc::clone(store);
            std::thread::spawn(move || f(&store, t))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn concurrent_commits_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    on_16_threads(&store, |store, t| {
        for i in 0..25 {
            store
                .accept(&record(&format!("t{t}-{i}"), "aaaa"), BUNDLE)
                .unwrap();
            store.commit().unwrap();
        }
    });
    assert_eq!(store.pending().len(), 16 * 25);
}

#[test]
fn the_same_submission_from_many_threads_is_new_exactly_once() {
    // Copies arriving together land in one write round: the round sees its own writes.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let outcomes = on_16_threads(&store, |store, _| {
        store.accept(&record("same", "aaaa"), BUNDLE).unwrap()
    });
    let new = outcomes.iter().filter(|a| **a == Accepted::New).count();
    assert_eq!(new, 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|a| matches!(a, Accepted::New | Accepted::Duplicate(_))));
    assert_eq!(store.pending().len(), 1);
    assert_eq!(
        log_len(dir.path()),
        one_frame(),
        "one Bundle in the log, not 16"
    );
    let stats = store.commit_stats();
    assert_eq!(stats.commits, 16);
    assert!(stats.rounds >= 1 && stats.rounds <= 16);
}

#[test]
fn bundles_kept_in_sled_by_an_earlier_version_are_still_found() {
    // Before the Bundle log, a Bundle was an LZ4 value in sled's `bundles` tree: deliveries
    // still waiting in such a store must not be lost after an upgrade.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("bundles")
            .unwrap()
            .insert(
                "glp1-intake-typeform/old",
                lz4_flex::compress_prepend_size(BUNDLE),
            )
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.bundle("glp1-intake-typeform/old").unwrap().as_deref(),
        Some(BUNDLE)
    );
}

#[test]
fn bundles_kept_in_sled_by_an_earlier_version_move_into_the_log_and_expire_like_the_others() {
    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
    let dir = tempfile::tempdir().unwrap();
    {
        // The earliest form: the record is LZ4 JSON with no Bundle place, the Bundle an LZ4
        // value in sled's `bundles` tree.
        let db = sled::open(dir.path()).unwrap();
        let mut old = record("old", "aaaa");
        old.transitions.push(to(State::Delivered));
        db.open_tree("submissions")
            .unwrap()
            .insert(
                key("old"),
                lz4_flex::compress_prepend_size(&serde_json::to_vec(&old).unwrap()),
            )
            .unwrap();
        db.open_tree("bundles")
            .unwrap()
            .insert(key("old"), lz4_flex::compress_prepend_size(BUNDLE))
            .unwrap();
        db.flush().unwrap();
    }
    let options = || StoreOptions {
        bundle_segment_bytes: 1,
    };
    {
        let store = Store::open_with(dir.path(), options()).unwrap();
        let now = std::time::SystemTime::now();
        let swept = store.sweep_bundles(30 * DAY, now).unwrap();
        assert_eq!(swept.migrated, 1, "{swept:?}");
        assert_eq!(store.bundle(&key("old")).unwrap().as_deref(), Some(BUNDLE));
        assert_eq!(
            store.sweep_bundles(30 * DAY, now).unwrap().migrated,
            0,
            "once"
        );
        // A later write closes the segment the Bundle moved to; past the retention it goes.
        store.accept(&record("new", "bbbb"), BUNDLE).unwrap();
        let swept = store.sweep_bundles(30 * DAY, now + 31 * DAY).unwrap();
        assert_eq!((swept.expired, swept.migrated), (1, 0), "{swept:?}");
        assert_eq!(store.bundle(&key("old")).unwrap(), None);
        assert_eq!(
            store.requeue(&key("old"), "2026-03-01T00:00:00Z").unwrap(),
            Requeued::Expired
        );
        assert!(
            store.get(&key("old")).unwrap().is_some(),
            "the record stays"
        );
    }
    let db = raw_sled(dir.path());
    assert!(db.open_tree("bundles").unwrap().is_empty());
}

#[test]
fn outbox_depth_follows_every_write_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let delivered = Transition {
        state: State::Delivered,
        at: "2026-01-01T00:00:01Z".into(),
        detail: None,
    };
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.outbox_depth(), 0);
        let (a, b) = (record("d-1", "aaaa"), record("d-2", "aaaa"));
        store.accept(&a, BUNDLE).unwrap();
        store.accept(&b, BUNDLE).unwrap();
        store.accept(&a, BUNDLE).unwrap(); // a duplicate adds nothing
        assert_eq!(store.outbox_depth(), 2);
        store
            .transition(&a.key(), delivered.clone(), vec![])
            .unwrap();
        store.transition(&a.key(), delivered, vec![]).unwrap(); // already out
        assert_eq!(store.outbox_depth(), 1);
        store.requeue(&a.key(), "2026-01-01T00:00:02Z").unwrap();
        store.requeue(&a.key(), "2026-01-01T00:00:03Z").unwrap(); // already in
        assert_eq!(store.outbox_depth(), 2);
        assert_eq!(store.outbox_depth(), store.pending().len());
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.outbox_depth(), 2);
}

#[test]
fn a_reopen_waits_for_the_lock_a_moment_and_then_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let held = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(first);
    });
    // Released while it waits: it opens.
    let second = Store::open(dir.path()).unwrap();
    held.join().unwrap();
    // Held throughout: an error, after the wait.
    let started = std::time::Instant::now();
    let third = Store::open(dir.path());
    assert!(third.is_err());
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    drop(second);
}

/// The store's sled database opened directly, as another version would (sled lets go of its
/// lock a moment after a store is dropped: retried for up to 5 s).
fn raw_sled(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// The key of a Typeform submission `id`.
fn key(id: &str) -> String {
    format!("glp1-intake-typeform/{id}")
}

/// A transition to `state`, a day after the test records' acceptance.
fn to(state: State) -> Transition {
    Transition {
        state,
        at: "2026-01-02T00:00:00Z".into(),
        detail: None,
    }
}

#[test]
fn the_retention_sweep_drops_delivered_bundles_and_keeps_the_ones_still_needed() {
    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
    let dir = tempfile::tempdir().unwrap();
    let bundle_of = |id: &str| format!("the bundle of {id}").into_bytes();
    {
        // Segments of a byte: every write round's Bundles begin a segment of their own.
        let options = StoreOptions {
            bundle_segment_bytes: 1,
        };
        let store = Store::open_with(dir.path(), options).unwrap();
        for id in ["delivered", "dead", "waiting", "acknowledged", "latest"] {
            store.accept(&record(id, "aaaa"), bundle_of(id)).unwrap();
            // The first read takes it from memory; the ones below read the log.
            assert_eq!(store.bundle(&key(id)).unwrap(), Some(bundle_of(id)));
        }
        for (id, state) in [
            ("delivered", State::Delivered),
            ("dead", State::DeadLettered),
            ("acknowledged", State::Delivered),
            ("acknowledged", State::Acknowledged),
        ] {
            store.transition(&key(id), to(state), vec![]).unwrap();
        }

        let before = segments(dir.path());
        assert_eq!(before.len(), 5, "one segment per write round");
        let now = std::time::SystemTime::now();
        assert_eq!(
            store.sweep_bundles(30 * DAY, now).unwrap(),
            Swept::default(),
            "nothing is 30 days old yet"
        );
        let swept = store.sweep_bundles(30 * DAY, now + 31 * DAY).unwrap();
        assert_eq!(
            swept,
            Swept {
                segments: 4,
                expired: 2,
                moved: 2,
                migrated: 0
            },
            "the segment appended to (latest's) stays"
        );
        for id in ["delivered", "acknowledged"] {
            assert_eq!(store.bundle(&key(id)).unwrap(), None, "{id}");
            assert!(store.bundle_expired(&key(id)).unwrap(), "{id}");
            assert!(store.get(&key(id)).unwrap().is_some(), "the record stays");
        }
        for id in ["dead", "waiting", "latest", "never accepted"] {
            assert!(!store.bundle_expired(&key(id)).unwrap(), "{id}");
        }
        let after = segments(dir.path());
        assert!(before[..4].iter().all(|s| !after.contains(s)), "{after:?}");
        assert_eq!(after[0], before[4], "latest's segment stays");
    }
    let store = Store::open(dir.path()).unwrap();
    for id in ["dead", "waiting", "latest"] {
        assert_eq!(store.bundle(&key(id)).unwrap(), Some(bundle_of(id)), "{id}");
    }
    assert_eq!(store.bundle(&key("delivered")).unwrap(), None);
    assert_eq!(
        store.pending(),
        vec![key("waiting"), key("latest")],
        "in the order they arrived"
    );
}

#[test]
fn a_replay_during_a_retention_sweep_is_refused_or_kept_never_lost() {
    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        dir.path(),
        StoreOptions {
            bundle_segment_bytes: 1,
        },
    )
    .unwrap();
    for id in ["delivered", "replayed", "dead", "latest"] {
        store.accept(&record(id, "aaaa"), id.as_bytes()).unwrap();
    }
    for (id, state) in [
        ("delivered", State::Delivered),
        ("replayed", State::Delivered),
        ("dead", State::DeadLettered),
    ] {
        store.transition(&key(id), to(state), vec![]).unwrap();
    }
    let waiting = |r: Requeued| matches!(r, Requeued::Waiting(_));
    // Replayed before the sweep begins: the sweep sees it waiting and keeps its Bundle.
    assert!(waiting(
        store
            .requeue(&key("replayed"), "2026-01-03T00:00:00Z")
            .unwrap()
    ));

    let later = std::time::SystemTime::now() + 31 * DAY;
    assert!(store.expire_bundles(30 * DAY, later).unwrap().is_some());
    // The sweep under way (its segments still there): a delivered submission's replay is
    // refused, though its Bundle can still be read — it would be dropped before the delivery.
    assert_eq!(
        store.bundle(&key("delivered")).unwrap(),
        Some(b"delivered".to_vec())
    );
    assert_eq!(
        store
            .requeue(&key("delivered"), "2026-01-03T00:00:00Z")
            .unwrap(),
        Requeued::Expired
    );
    // A dead-lettered one is replayed: the sweep moves its Bundle.
    assert!(waiting(
        store.requeue(&key("dead"), "2026-01-03T00:00:00Z").unwrap()
    ));

    let swept = store.sweep_bundles(30 * DAY, later).unwrap();
    assert_eq!((swept.expired, swept.moved), (1, 2), "{swept:?}");
    assert_eq!(store.bundle(&key("delivered")).unwrap(), None);
    for id in ["replayed", "dead", "latest"] {
        assert_eq!(
            store.bundle(&key(id)).unwrap(),
            Some(id.as_bytes().to_vec()),
            "{id}"
        );
    }
    assert_eq!(
        store
            .requeue(&key("delivered"), "2026-01-04T00:00:00Z")
            .unwrap(),
        Requeued::Expired
    );
    assert_eq!(
        store
            .requeue(&key("never accepted"), "2026-01-04T00:00:00Z")
            .unwrap(),
        Requeued::Unknown
    );
}

/// The Bundle log's segment files, in order.
fn segments(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir.join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names
}

#[test]
fn waiting_deliveries_come_out_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        // Accepted in this order, a second apart.
        for (second, id) in ["c", "a", "b"].into_iter().enumerate() {
            let mut r = record(id, "aaaa");
            for t in &mut r.transitions {
                t.at = format!("2026-01-01T00:00:0{second}.000Z");
            }
            store.accept(&r, BUNDLE).unwrap();
        }
        assert_eq!(store.pending(), [key("c"), key("a"), key("b")]);
        store
            .transition(&key("c"), to(State::Failed), vec![])
            .unwrap();
        store
            .transition(&key("a"), to(State::Delivered), vec![])
            .unwrap();
        store.requeue(&key("a"), "2026-01-03T00:00:00Z").unwrap();
        assert_eq!(
            store.pending(),
            [key("c"), key("b"), key("a")],
            "a replay goes to the back"
        );
        assert_eq!(store.pending_where(1, |_| true)[0].failures, 1);
        assert_eq!(store.outbox_depth(), 3);
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.pending(),
        [key("c"), key("b"), key("a")],
        "the same order after reopening: by when each entered (the replay's time for a)"
    );
    assert_eq!(store.pending_where(1, |k| k == key("c"))[0].failures, 1);
    drop(store);

    // The order comes from the entries themselves (failures, then Unix µs), not the records:
    // times written the other way round give the other order, failures kept.
    let rewrite = |values: &[(&str, Vec<u8>)]| {
        let db = raw_sled(dir.path());
        let outbox = db.open_tree("outbox").unwrap();
        for (id, value) in values {
            outbox.insert(key(id), value.as_slice()).unwrap();
        }
        db.flush().unwrap();
    };
    let entry = |failures: u32, micros: i64| {
        [failures.to_le_bytes().as_slice(), &micros.to_le_bytes()].concat()
    };
    rewrite(&[("a", entry(0, 1)), ("b", entry(0, 2)), ("c", entry(1, 3))]);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.pending(), [key("a"), key("b"), key("c")]);
    assert_eq!(store.pending_where(1, |k| k == key("c"))[0].failures, 1);
    drop(store);
    // Entries of earlier versions (failures alone, or nothing): their records' times.
    rewrite(&[
        ("a", vec![]),
        ("b", vec![]),
        ("c", 1u32.to_le_bytes().to_vec()),
    ]);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.pending(), [key("c"), key("b"), key("a")]);
    assert_eq!(store.pending_where(1, |k| k == key("c"))[0].failures, 1);
}

/// Now (Unix µs), a moment after what came before and before what comes after: audit keys
/// are the clock's microseconds.
fn a_moment_between() -> u64 {
    std::thread::sleep(std::time::Duration::from_millis(2));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    std::thread::sleep(std::time::Duration::from_millis(2));
    now
}

/// The audit trail: every access recorded is on disk when `record_access` returns, read back
/// newest first, and still there after a reopen.
#[test]
fn operator_accesses_are_kept_newest_first_across_reopen() {
    use chartbridge::store::Access;
    let dir = tempfile::tempdir().unwrap();
    let access = |n: usize| Access {
        at: format!("2026-11-27T10:00:0{n}Z"),
        who: "admin key 0123456789abcdef".into(),
        client: Some(format!("127.0.0.1:4{n}000")),
        forwarded_for: (n == 1).then(|| "203.0.113.7".into()),
        request_id: format!("req-{n}"),
        method: "GET".into(),
        path: "/submissions".into(),
        query: Some(format!("patient=https://crm.example/p|{n}")),
        allowed: n != 2,
        unrecorded_refusals: (n == 1).then_some(40),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut between = Vec::new();
    {
        let store = Store::open(dir.path()).unwrap();
        for n in 0..3 {
            runtime.block_on(store.record_access(&access(n))).unwrap();
            between.push(a_moment_between());
        }
        let page = store.accesses(AuditWindow::default(), 2).unwrap();
        assert_eq!(page.accesses, vec![access(2), access(1)]);
        // The next page goes on from there, and is the last.
        let before = AuditWindow::cursor(page.next.as_deref().unwrap());
        assert!(before.is_some());
        let rest = AuditWindow {
            before,
            ..AuditWindow::default()
        };
        let page = store.accesses(rest, 2).unwrap();
        assert_eq!((page.accesses, page.next), (vec![access(0)], None));
    }
    let store = Store::open(dir.path()).unwrap();
    let all = |store: &Store| store.accesses(AuditWindow::default(), 10).unwrap();
    assert_eq!(all(&store).accesses, vec![access(2), access(1), access(0)]);
    // A time window: since the first, until the last.
    let window = AuditWindow {
        since: Some(between[0]),
        before: Some(AuditWindow::until(between[1])),
    };
    assert_eq!(
        store.accesses(window, 10).unwrap().accesses,
        vec![access(1)]
    );
    let backwards = AuditWindow {
        since: Some(between[1]),
        before: Some(AuditWindow::until(between[0])),
    };
    assert_eq!(store.accesses(backwards, 10).unwrap().accesses, vec![]);
    assert_eq!(AuditWindow::cursor("not a cursor"), None);
    assert_eq!(AuditWindow::cursor(&"zz".repeat(16)), None);
    // Past the retention: the entries before the cutoff go, durably.
    let at = |micros: u64| std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros);
    let none = std::time::Duration::ZERO;
    assert_eq!(store.forget_accesses(none, at(between[1])).unwrap(), 2);
    assert_eq!(store.forget_accesses(none, at(between[1])).unwrap(), 0);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(all(&store).accesses, vec![access(2)]);
}

/// A retention sweep removes any number of entries (in rounds of some thousands), and what
/// came after the cutoff stays.
#[test]
fn an_audit_trail_longer_than_a_round_is_forgotten_whole() {
    use chartbridge::store::Access;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let access = |n: usize| Access {
        at: "2026-11-27T10:00:00Z".into(),
        who: "anyone: no admin key is configured".into(),
        client: None,
        forwarded_for: None,
        request_id: format!("req-{n}"),
        method: "GET".into(),
        path: "/audit".into(),
        query: None,
        allowed: true,
        unrecorded_refusals: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut recording = tokio::task::JoinSet::new();
        for n in 0..5000 {
            let (store, access) = (Arc::clone(&store), access(n));
            recording.spawn(async move { store.record_access(&access).await });
        }
        while let Some(done) = recording.join_next().await {
            done.unwrap().unwrap();
        }
    });
    let cutoff = a_moment_between();
    runtime
        .block_on(store.record_access(&access(5000)))
        .unwrap();
    let cutoff = std::time::UNIX_EPOCH + std::time::Duration::from_micros(cutoff);
    let a_second = std::time::Duration::from_secs(1);
    assert_eq!(
        store.forget_accesses(a_second, cutoff + a_second).unwrap(),
        5000
    );
    let left = store.accesses(AuditWindow::default(), 10).unwrap();
    assert_eq!((left.accesses, left.next), (vec![access(5000)], None));
}

/// Dead letters are listed latest first until they are replayed, across a reopen; a store of
/// an earlier version (no index) gets its dead letters indexed once, from the records.
#[test]
fn dead_letters_are_listed_until_replayed_and_indexed_for_earlier_stores() {
    let dir = tempfile::tempdir().unwrap();
    let dead = |store: &Store| -> Vec<String> {
        store
            .dead_letter_page(None, None, 10)
            .unwrap()
            .records
            .iter()
            .map(SubmissionRecord::key)
            .collect()
    };
    {
        let store = Store::open(dir.path()).unwrap();
        for id in ["a", "b", "c"] {
            store.accept(&record(id, "aaaa"), BUNDLE).unwrap();
        }
        store
            .transition(&key("a"), to(State::DeadLettered), vec![])
            .unwrap();
        store
            .transition(&key("b"), to(State::Delivered), vec![])
            .unwrap();
        store
            .transition(&key("c"), to(State::DeadLettered), vec![])
            .unwrap();
        assert_eq!(dead(&store), [key("c"), key("a")], "latest first");
        assert_eq!(store.dead_letter_count(), 2);
        // Page by page: the first, then the rest after its `next`.
        let first = store.dead_letter_page(None, None, 1).unwrap();
        assert_eq!((first.records.len(), first.total), (1, 2));
        let after = Cursor::parse(first.next.as_deref().unwrap()).unwrap();
        let rest = store.dead_letter_page(None, Some(&after), 1).unwrap();
        assert_eq!(rest.records[0].key(), key("a"));
        assert_eq!((rest.total, rest.next), (2, None));
        let other = store
            .dead_letter_page(Some("phq9-typeform"), None, 10)
            .unwrap();
        assert_eq!((other.records.len(), other.total), (0, 0));
        // What a bulk replay takes: earliest first, of one mapping or all.
        assert_eq!(store.dead_letter_keys(None).unwrap(), [key("a"), key("c")]);
        assert_eq!(
            store
                .dead_letter_keys(Some("glp1-intake-typeform"))
                .unwrap(),
            [key("a"), key("c")]
        );
        for other in ["glp1-intake", "glp1-intake-typeform-v2"] {
            assert!(store.dead_letter_keys(Some(other)).unwrap().is_empty());
        }
        assert!(matches!(
            store.requeue(&key("c"), "2026-01-03T00:00:00Z").unwrap(),
            Requeued::Waiting(_)
        ));
        assert_eq!(dead(&store), [key("a")]);
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(dead(&store), [key("a")], "kept across a reopen");
    drop(store);

    // As an earlier version left it: no index, no mark.
    {
        let db = raw_sled(dir.path());
        db.drop_tree("dead_letters").unwrap();
        db.remove("dead_letters_indexed").unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(dead(&store), [key("a")], "indexed from the records");
    assert_eq!(store.dead_letter_count(), 1);
}

/// A revision takes its submission's place in the outbox, dead-lettered or not; the outcome of
/// an attempt that sent the earlier Bundle does not take the revision out; a re-send of any
/// revision's payload is a duplicate, and a revision of a payload no longer current is refused
/// (another revision came first).
#[test]
fn a_revision_replaces_the_bundle_to_deliver_and_outlives_an_earlier_attempt() {
    const REVISED: &[u8] = br#"{"resourceType":"Bundle","type":"transaction","entry":[]}"#;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let first = record("tok-r", "aaaa");
    let key = first.key();
    store.accept(&first, BUNDLE).unwrap();
    // An attempt takes the first Bundle; a revision comes in meanwhile.
    let (sent, sent_ref) = store.bundle_to_deliver(&key).unwrap().unwrap();
    assert_eq!(sent, BUNDLE);
    let mut second = record("tok-r", "bbbb");
    match store.accept(&second, REVISED).unwrap() {
        Accepted::Conflict(existing, given) => {
            assert_eq!(
                (existing.payload_sha256.as_str(), given.as_slice()),
                ("aaaa", REVISED)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.current_bundle(&key).unwrap().as_deref(), Some(BUNDLE));
    second.earlier_payloads = vec!["aaaa".into()];
    let revise = |r: &SubmissionRecord, revises: &str| {
        runtime
            .block_on(store.revise(r, REVISED.to_vec(), revises))
            .unwrap()
    };
    assert_eq!(revise(&second, "aaaa"), Accepted::New);
    assert_eq!(second.revision(), 2);
    // Stale: the current payload is no longer "aaaa".
    assert!(matches!(
        revise(&record("tok-r", "cccc"), "aaaa"),
        Accepted::Conflict(..)
    ));
    // Any revision's payload again: a duplicate, answered with the current record.
    for payload in ["aaaa", "bbbb"] {
        match store.accept(&record("tok-r", payload), BUNDLE).unwrap() {
            Accepted::Duplicate(current) => assert_eq!(current.revision(), 2),
            other => panic!("{payload}: {other:?}"),
        }
    }
    assert_eq!(
        store.current_bundle(&key).unwrap().as_deref(),
        Some(REVISED)
    );

    // The earlier attempt's outcome is recorded; the revision still waits.
    let delivered = |sent| {
        runtime
            .block_on(store.transition_of(&key, to(State::Delivered), vec![], Some(sent)))
            .unwrap()
            .unwrap()
    };
    let after_first = delivered(sent_ref);
    assert_eq!(after_first.state(), Some(State::Mapped));
    assert_eq!(store.pending(), vec![key.clone()]);
    let (again, again_ref) = store.bundle_to_deliver(&key).unwrap().unwrap();
    assert_eq!(again, REVISED);
    assert_eq!(delivered(again_ref).state(), Some(State::Delivered));
    assert!(store.pending().is_empty());

    // A dead-lettered submission revised: out of the dead letters, back in the outbox.
    store.accept(&record("tok-d", "aaaa"), BUNDLE).unwrap();
    let dead_key = record("tok-d", "aaaa").key();
    store
        .transition(&dead_key, to(State::DeadLettered), vec![])
        .unwrap();
    assert_eq!(store.dead_letter_count(), 1);
    // The revision names another patient (a typo corrected): the index follows.
    let mut revised = record("tok-d", "bbbb");
    revised.earlier_payloads = vec!["aaaa".into()];
    revised.patient_value = "pt_corrected".into();
    assert_eq!(revise(&revised, "aaaa"), Accepted::New);
    let patient = |value: &str| {
        store
            .by_patient("https://crm.example-clinic.com/patient", value)
            .unwrap()
    };
    assert!(!patient("pt_8f3c2a91").contains(&dead_key));
    assert_eq!(patient("pt_corrected"), vec![dead_key.clone()]);
    assert_eq!(store.dead_letter_count(), 0);
    assert_eq!(store.pending(), vec![dead_key.clone()]);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let kept = store.get(&dead_key).unwrap().unwrap();
    assert_eq!((kept.revision(), kept.payload_sha256.as_str()), (2, "bbbb"));
    assert_eq!(store.bundle(&dead_key).unwrap().as_deref(), Some(REVISED));
}
