//! The store contract's suite: what every store engine must do, on a real disk — accept with its
//! outbox job and events in one write, idempotency and revisions, outcomes and their jobs'
//! fates, a second kind of receiver on the same outbox, indexes both ways, the audit trail,
//! retention, and all of it across a reopen. Each case is a function given an `Engine` (a way
//! to open that engine's store on a data directory); `suite!` runs every case for an engine.
//! The sled store runs it below; a second engine adds one line.
//!
//! Cases that look inside an engine (sled's trees, its Bundle log's files) are at the end, on
//! their own.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chartbridge::store::{
    no_consequences, Accepted, Access, AuditCursor, AuditWindow, Consequences, Cursor, Decide,
    EhrResource, Event, EventOutcome, EventState, Inbound, JobId, Receiver, RecordPage, Requeued,
    SledStore, State, Store, StoreOptions, SubmissionRecord, Swept, Taken, Transition, Unmatched,
};

const BUNDLE: &[u8] = br#"{"resourceType":"Bundle","type":"transaction"}"#;
const DAY: Duration = Duration::from_secs(86_400);

/// How a case opens the store under test.
trait Engine {
    type S: Store;
    fn open(&self, dir: &Path) -> Self::S;
}

/// The embedded store, its Bundle log in segments of a byte (every write round's Bundles in a
/// segment of their own, so that retention has something to drop).
struct Sled;

impl Engine for Sled {
    type S = SledStore;
    fn open(&self, dir: &Path) -> SledStore {
        SledStore::open_with(
            dir,
            StoreOptions {
                bundle_segment_bytes: 1,
            },
        )
        .unwrap()
    }
}

macro_rules! suite {
    ($module:ident, $engine:ident: $($case:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(&super::$engine).await;
                }
            )*
        }
    };
}

suite!(sled_store, Sled:
    accept_is_idempotent_and_conflicts_are_told_apart,
    the_same_submission_from_many_tasks_is_new_exactly_once,
    concurrent_accepts_all_complete,
    accepted_submissions_survive_reopening,
    an_outcome_moves_the_job_and_indexes_ehr_resources,
    waiting_jobs_come_out_oldest_first_across_reopen,
    waiting_jobs_are_listed_page_by_page,
    dead_letters_are_listed_until_replayed,
    a_revision_replaces_the_bundle_to_deliver_and_outlives_an_earlier_attempt,
    a_second_receiver_shares_the_outbox_and_its_dead_letters,
    events_are_queued_with_the_change_that_causes_them,
    operator_accesses_are_kept_newest_first_across_reopen,
    an_audit_trail_longer_than_a_round_is_forgotten_whole,
    the_retention_sweep_drops_delivered_bundles_and_keeps_the_ones_still_needed,
    a_replay_of_a_submission_past_its_retention_is_refused,
    health_says_the_store_is_writing,
    an_inbound_event_is_taken_once_and_what_matches_nothing_is_kept,
    cursors_are_kept_across_reopen,
);

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
            Transition::new(State::Received, "2026-01-01T00:00:00Z"),
            Transition::new(State::Mapped, "2026-01-01T00:00:00Z"),
        ],
        ehr: vec![],
        earlier_payloads: vec![],
        events: vec![],
    }
}

/// The key of a Typeform submission `id`.
fn key(id: &str) -> String {
    format!("glp1-intake-typeform/{id}")
}

/// A transition to `state`, a day after the test records' acceptance.
fn to(state: State) -> Transition {
    Transition::new(state, "2026-01-02T00:00:00Z")
}

/// The keys of the EHR jobs waiting, oldest first.
fn waiting(store: &impl Store) -> Vec<String> {
    store
        .waiting(usize::MAX, &mut |j| j.receiver == Receiver::Ehr)
        .into_iter()
        .map(|p| p.job.key)
        .collect()
}

fn keys(page: &RecordPage) -> Vec<String> {
    page.records.iter().map(SubmissionRecord::key).collect()
}

async fn accept(store: &impl Store, r: &SubmissionRecord, bundle: &[u8]) -> Accepted {
    store.accept(r, bundle.to_vec(), Vec::new()).await.unwrap()
}

async fn outcome(store: &impl Store, id: &str, state: State) -> Option<SubmissionRecord> {
    store
        .record_delivery(&key(id), to(state), Vec::new(), None, no_consequences())
        .await
        .unwrap()
}

async fn replay(store: &impl Store, job: &JobId) -> Requeued {
    store.requeue(job, "2026-01-03T00:00:00Z").await.unwrap()
}

async fn accept_is_idempotent_and_conflicts_are_told_apart(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = engine.open(dir.path());
    let r = record("tok-1", "aaaa");
    assert_eq!(accept(&store, &r, BUNDLE).await, Accepted::New);
    assert!(matches!(
        accept(&store, &r, BUNDLE).await,
        Accepted::Duplicate(_)
    ));
    match accept(&store, &record("tok-1", "bbbb"), b"other").await {
        Accepted::Conflict(existing, given) => {
            assert_eq!(existing.payload_sha256, "aaaa");
            assert_eq!(
                given, b"other",
                "the Bundle is handed back for the revision"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(waiting(&store), vec![r.key()], "one job, not three");
    assert_eq!(store.get(&r.key()).unwrap().unwrap(), r);
    // The Bundle to deliver, every time it is asked for (from memory, then from storage).
    for _ in 0..2 {
        let (bundle, revision) = store.bundle_to_deliver(&r.key()).unwrap().unwrap();
        assert_eq!((bundle.as_slice(), revision), (BUNDLE, 1));
    }
    assert_eq!(
        store.current_bundle(&r.key()).unwrap().as_deref(),
        Some(BUNDLE)
    );
    assert!(store.bundle_to_deliver("no/such").unwrap().is_none());
    assert!(store.get("no/such").unwrap().is_none());
}

async fn the_same_submission_from_many_tasks_is_new_exactly_once(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(engine.open(dir.path()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let store = Arc::clone(&store);
        tasks.spawn(async move { accept(&*store, &record("same", "aaaa"), BUNDLE).await });
    }
    let outcomes: Vec<Accepted> = tasks.join_all().await;
    let new = outcomes.iter().filter(|a| **a == Accepted::New).count();
    assert_eq!(new, 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|a| matches!(a, Accepted::New | Accepted::Duplicate(_))));
    assert_eq!(waiting(&*store), vec![key("same")]);
    let stats = store.stats();
    assert_eq!(stats.commits, 16);
    assert!(stats.rounds >= 1 && stats.rounds <= 16);
}

async fn concurrent_accepts_all_complete(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(engine.open(dir.path()));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            for i in 0..25 {
                let r = record(&format!("t{t}-{i}"), "aaaa");
                assert_eq!(accept(&*store, &r, BUNDLE).await, Accepted::New);
            }
        });
    }
    tasks.join_all().await;
    assert_eq!(waiting(&*store).len(), 16 * 25);
    assert_eq!(store.outbox_depth(&Receiver::Ehr), 16 * 25);
}

async fn accepted_submissions_survive_reopening(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = engine.open(dir.path());
        accept(&store, &record("tok-3", "aaaa"), BUNDLE).await;
    }
    let store = engine.open(dir.path());
    assert_eq!(waiting(&store), vec![key("tok-3")]);
    let bundle = |id: &str| store.current_bundle(&key(id)).unwrap();
    assert_eq!(bundle("tok-3").as_deref(), Some(BUNDLE));
    accept(&store, &record("tok-4", "aaaa"), b"{}").await;
    assert_eq!(bundle("tok-4").as_deref(), Some(&b"{}"[..]));
    assert_eq!(bundle("tok-3").as_deref(), Some(BUNDLE));
    assert_eq!(
        store
            .by_patient("https://crm.example-clinic.com/patient", "pt_8f3c2a91")
            .unwrap(),
        vec![key("tok-3"), key("tok-4")]
    );
}

/// A failure keeps the job waiting, counted; a replay counts from zero again; delivery takes
/// it out and indexes what the EHR stored; a dead letter takes it out into the dead letters.
async fn an_outcome_moves_the_job_and_indexes_ehr_resources(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = engine.open(dir.path());
    let r = record("tok-2", "aaaa");
    accept(&store, &r, BUNDLE).await;
    let failures = || {
        let pending = store.waiting(10, &mut |_| true);
        assert_eq!(
            pending.len(),
            1,
            "a failure stays in the outbox for a retry"
        );
        pending[0].failures
    };
    assert_eq!(failures(), 0);
    let failed = Transition::new(State::Failed, "2026-01-01T00:00:01Z").because("HTTP 503");
    for n in 1..=2 {
        store
            .record_delivery(&r.key(), failed.clone(), vec![], Some(1), no_consequences())
            .await
            .unwrap();
        assert_eq!(
            failures(),
            n,
            "the backoff grows from what the outbox counts"
        );
    }
    assert!(matches!(
        replay(&store, &JobId::ehr(r.key())).await,
        Requeued::Waiting(_)
    ));
    assert_eq!(failures(), 0, "a replay starts the count again");
    assert_eq!(
        store.outbox_depth(&Receiver::Ehr),
        1,
        "a replay of a waiting job adds none"
    );
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
    let delivered = Transition::new(State::Delivered, "2026-01-01T00:00:02Z");
    let updated = store
        .record_delivery(&r.key(), delivered.clone(), ehr, Some(1), no_consequences())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.state(), Some(State::Delivered));
    assert_eq!(updated.transitions.len(), 6);
    assert_eq!(store.get(&r.key()).unwrap().unwrap(), updated);
    assert!(waiting(&store).is_empty());
    assert_eq!(store.outbox_depth(&Receiver::Ehr), 0);
    assert_eq!(store.outbox_depth_of("glp1-intake-typeform"), 0);
    // Recorded again (a second attempt's late outcome): the job stays out.
    store
        .record_delivery(&r.key(), delivered, vec![], Some(1), no_consequences())
        .await
        .unwrap();
    assert_eq!(store.outbox_depth(&Receiver::Ehr), 0);
    let found = store.by_resource("Observation/o1").unwrap().unwrap();
    assert_eq!(found.submission_id, "tok-2");
    assert!(store.by_resource("Observation/none").unwrap().is_none());
    assert!(outcome(&store, "no-such", State::Delivered).await.is_none());
}

async fn waiting_jobs_come_out_oldest_first_across_reopen(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = engine.open(dir.path());
        for id in ["c", "a", "b"] {
            accept(&store, &record(id, "aaaa"), BUNDLE).await;
        }
        assert_eq!(waiting(&store), [key("c"), key("a"), key("b")]);
        outcome(&store, "c", State::Failed).await;
        outcome(&store, "a", State::Delivered).await;
        replay(&store, &JobId::ehr(key("a"))).await;
        assert_eq!(
            waiting(&store),
            [key("c"), key("b"), key("a")],
            "a replay goes to the back"
        );
        assert_eq!(store.outbox_depth_of("glp1-intake-typeform"), 3);
    }
    let store = engine.open(dir.path());
    assert_eq!(
        waiting(&store),
        [key("c"), key("b"), key("a")],
        "the same order after reopening: by when each entered"
    );
    let c = store.waiting(1, &mut |j| j.key == key("c"));
    assert_eq!(c[0].failures, 1, "failures survive too");
    assert_eq!(store.outbox_depth(&Receiver::Ehr), 3);
}

/// The outbox's listing comes in pages, oldest first, of one mapping or all, each saying how
/// many wait in all and where the next begins.
async fn waiting_jobs_are_listed_page_by_page(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = engine.open(dir.path());
    for id in ["w1", "w2", "w3"] {
        accept(&store, &record(id, "aaaa"), BUNDLE).await;
    }
    let mut other = record("p1", "aaaa");
    other.mapping_id = "phq9-typeform".into();
    accept(&store, &other, BUNDLE).await;
    let ehr = Receiver::Ehr;
    let first = store.waiting_page(&ehr, None, None, 2).unwrap();
    assert_eq!((keys(&first), first.total), (vec![key("w1"), key("w2")], 4));
    assert_eq!(
        first.jobs,
        vec![JobId::ehr(key("w1")), JobId::ehr(key("w2"))]
    );
    let after = Cursor::parse(first.next.as_deref().unwrap()).unwrap();
    // What left meanwhile does not move the next page.
    outcome(&store, "w1", State::Delivered).await;
    let rest = store.waiting_page(&ehr, None, Some(&after), 2).unwrap();
    assert_eq!(
        (keys(&rest), rest.total, rest.next),
        (vec![key("w3"), other.key()], 3, None)
    );
    let typeform = store
        .waiting_page(&ehr, Some("glp1-intake-typeform"), None, 10)
        .unwrap();
    assert_eq!(
        (keys(&typeform), typeform.total, typeform.next),
        (vec![key("w2"), key("w3")], 2, None)
    );
    for not_a_cursor in ["", "zz", "00000000000000000", "0000000000000001zz"] {
        assert_eq!(Cursor::parse(not_a_cursor), None, "{not_a_cursor:?}");
    }
}

/// Dead letters are listed latest first until they are replayed, across a reopen.
async fn dead_letters_are_listed_until_replayed(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let ehr = Receiver::Ehr;
    let dead = |page: &dyn Fn() -> RecordPage| keys(&page());
    {
        let store = engine.open(dir.path());
        for id in ["a", "b", "c"] {
            accept(&store, &record(id, "aaaa"), BUNDLE).await;
        }
        outcome(&store, "a", State::DeadLettered).await;
        outcome(&store, "b", State::Delivered).await;
        outcome(&store, "c", State::DeadLettered).await;
        let page = || store.dead_letter_page(&ehr, None, None, 10).unwrap();
        assert_eq!(dead(&page), [key("c"), key("a")], "latest first");
        assert_eq!(store.dead_letter_count(&ehr), 2);
        assert!(waiting(&store).is_empty());
        let first = store.dead_letter_page(&ehr, None, None, 1).unwrap();
        assert_eq!((first.records.len(), first.total), (1, 2));
        let after = Cursor::parse(first.next.as_deref().unwrap()).unwrap();
        let rest = store.dead_letter_page(&ehr, None, Some(&after), 1).unwrap();
        assert_eq!(rest.records[0].key(), key("a"));
        assert_eq!((rest.total, rest.next), (2, None));
        let other = store
            .dead_letter_page(&ehr, Some("phq9-typeform"), None, 10)
            .unwrap();
        assert_eq!((other.records.len(), other.total), (0, 0));
        // What a bulk replay takes: earliest first, of one mapping or all.
        let jobs = |mapping| store.dead_letter_jobs(&ehr, mapping).unwrap();
        assert_eq!(jobs(None), [JobId::ehr(key("a")), JobId::ehr(key("c"))]);
        assert_eq!(jobs(Some("glp1-intake-typeform")).len(), 2);
        for other in ["glp1-intake", "glp1-intake-typeform-v2"] {
            assert!(jobs(Some(other)).is_empty(), "{other}");
        }
        assert!(matches!(
            replay(&store, &JobId::ehr(key("c"))).await,
            Requeued::Waiting(_)
        ));
        assert_eq!(dead(&page), [key("a")]);
        assert_eq!(waiting(&store), [key("c")]);
    }
    let store = engine.open(dir.path());
    let page = || store.dead_letter_page(&ehr, None, None, 10).unwrap();
    assert_eq!(dead(&page), [key("a")], "kept across a reopen");
    assert_eq!(store.dead_letter_count(&ehr), 1);
    assert_eq!(
        replay(&store, &JobId::ehr(key("never"))).await,
        Requeued::Unknown
    );
}

/// A revision takes its submission's place in the outbox, dead-lettered or not; the outcome of
/// an attempt that sent the earlier revision does not take the revision out; a re-send of any
/// revision's payload is a duplicate, and a revision of a payload no longer current is refused
/// (another revision came first). A revision naming another patient moves the patient index.
async fn a_revision_replaces_the_bundle_to_deliver_and_outlives_an_earlier_attempt(
    engine: &impl Engine,
) {
    const REVISED: &[u8] = br#"{"resourceType":"Bundle","type":"transaction","entry":[]}"#;
    let dir = tempfile::tempdir().unwrap();
    let store = engine.open(dir.path());
    let first = record("tok-r", "aaaa");
    let k = first.key();
    accept(&store, &first, BUNDLE).await;
    // An attempt takes the first Bundle; a revision comes in meanwhile.
    let (sent, sent_revision) = store.bundle_to_deliver(&k).unwrap().unwrap();
    assert_eq!((sent.as_slice(), sent_revision), (BUNDLE, 1));
    let mut second = record("tok-r", "bbbb");
    second.earlier_payloads = vec!["aaaa".into()];
    let revise = |r: SubmissionRecord, revises: &'static str| {
        let store = &store;
        async move {
            store
                .revise(&r, REVISED.to_vec(), revises, Vec::new())
                .await
                .unwrap()
        }
    };
    assert_eq!(revise(second.clone(), "aaaa").await, Accepted::New);
    assert_eq!(second.revision(), 2);
    assert!(matches!(
        revise(record("tok-r", "cccc"), "aaaa").await,
        Accepted::Conflict(..)
    ));
    for payload in ["aaaa", "bbbb"] {
        match accept(&store, &record("tok-r", payload), BUNDLE).await {
            Accepted::Duplicate(current) => assert_eq!(current.revision(), 2),
            other => panic!("{payload}: {other:?}"),
        }
    }
    assert_eq!(store.current_bundle(&k).unwrap().as_deref(), Some(REVISED));
    // The earlier attempt's outcome is recorded; the revision still waits.
    let delivered = |sent: u32| {
        let store = &store;
        let k = k.clone();
        async move {
            store
                .record_delivery(
                    &k,
                    to(State::Delivered),
                    vec![],
                    Some(sent),
                    no_consequences(),
                )
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(delivered(sent_revision).await.state(), Some(State::Mapped));
    assert_eq!(waiting(&store), vec![k.clone()]);
    let (again, again_revision) = store.bundle_to_deliver(&k).unwrap().unwrap();
    assert_eq!((again.as_slice(), again_revision), (REVISED, 2));
    assert_eq!(
        delivered(again_revision).await.state(),
        Some(State::Delivered)
    );
    assert!(waiting(&store).is_empty());

    // A dead-lettered submission revised: out of the dead letters, back in the outbox; the
    // revision names another patient (a typo corrected): the index follows.
    accept(&store, &record("tok-d", "aaaa"), BUNDLE).await;
    outcome(&store, "tok-d", State::DeadLettered).await;
    assert_eq!(store.dead_letter_count(&Receiver::Ehr), 1);
    let mut revised = record("tok-d", "bbbb");
    revised.earlier_payloads = vec!["aaaa".into()];
    revised.patient_value = "pt_corrected".into();
    assert_eq!(revise(revised, "aaaa").await, Accepted::New);
    let patient = |value: &str| {
        store
            .by_patient("https://crm.example-clinic.com/patient", value)
            .unwrap()
    };
    assert!(!patient("pt_8f3c2a91").contains(&key("tok-d")));
    assert_eq!(patient("pt_corrected"), vec![key("tok-d")]);
    assert_eq!(store.dead_letter_count(&Receiver::Ehr), 0);
    assert_eq!(waiting(&store), vec![key("tok-d")]);
    drop(store);
    let store = engine.open(dir.path());
    let kept = store.get(&key("tok-d")).unwrap().unwrap();
    assert_eq!((kept.revision(), kept.payload_sha256.as_str()), (2, "bbbb"));
    assert_eq!(
        store.current_bundle(&key("tok-d")).unwrap().as_deref(),
        Some(REVISED)
    );
}

/// A test receiver beside the EHR: its jobs wait in the same outbox, a submission's come one
/// at a time in order, its failures are counted, its dead letters listed and replayed — with
/// nothing in the store written for it.
async fn a_second_receiver_shares_the_outbox_and_its_dead_letters(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let hook = Receiver::webhook("test-hook").unwrap();
    let event = |n: u32| Event {
        receiver: hook.clone(),
        id: format!("evt_{n}"),
        kind: format!("test.event{n}"),
        sets: None,
        body: format!(r#"{{"n":{n}}}"#).into_bytes(),
    };
    let first_job;
    {
        let store = engine.open(dir.path());
        let r = record("tok-e", "aaaa");
        let accepted = store
            .accept(&r, BUNDLE.to_vec(), vec![event(1), event(2)])
            .await
            .unwrap();
        assert_eq!(accepted, Accepted::New);
        let other = record("tok-f", "aaaa");
        store
            .accept(&other, BUNDLE.to_vec(), vec![event(3)])
            .await
            .unwrap();
        assert_eq!(store.outbox_depth(&hook), 3);
        assert_eq!(
            store.outbox_depth(&Receiver::Ehr),
            2,
            "the EHR's count is its own"
        );
        let heads_now = store.waiting(10, &mut |j| j.receiver == hook);
        let events: Vec<Event> = heads_now
            .iter()
            .map(|p| store.event(&p.job).unwrap().unwrap())
            .collect();
        assert_eq!(
            events,
            vec![event(1), event(3)],
            "one per submission, the oldest"
        );
        first_job = heads_now[0].job.clone();
        // The record says what was queued (never the body).
        let kept = store.get(&r.key()).unwrap().unwrap();
        let states: Vec<(&str, EventState)> = kept
            .events
            .iter()
            .map(|e| (e.id.as_str(), e.state))
            .collect();
        assert_eq!(
            states,
            [
                ("evt_1", EventState::Waiting),
                ("evt_2", EventState::Waiting)
            ]
        );
        // A failure: counted, still the head.
        store
            .settle(
                &first_job,
                0,
                EventOutcome::Failed {
                    at: "2026-01-01T00:00:01Z".into(),
                    why: "HTTP 503".into(),
                },
            )
            .await
            .unwrap();
        let head = store.waiting(1, &mut |j| j.receiver == hook);
        assert_eq!(
            (head[0].job.clone(), head[0].failures),
            (first_job.clone(), 1)
        );
        // Dead-lettered: out of the outbox, the next event of that submission comes up.
        store
            .settle(
                &first_job,
                1,
                EventOutcome::DeadLettered {
                    at: "2026-01-01T00:00:02Z".into(),
                    why: "HTTP 410".into(),
                },
            )
            .await
            .unwrap();
        let next: Vec<String> = store
            .waiting(10, &mut |j| j.receiver == hook)
            .iter()
            .map(|p| store.event(&p.job).unwrap().unwrap().id)
            .collect();
        assert_eq!(next, ["evt_2", "evt_3"]);
        assert_eq!(store.dead_letter_count(&hook), 1);
        assert_eq!(store.dead_letter_count(&Receiver::Ehr), 0);
        let page = store.dead_letter_page(&hook, None, None, 10).unwrap();
        assert_eq!(
            (keys(&page), page.jobs.clone()),
            (vec![r.key()], vec![first_job.clone()])
        );
        let kept = store.get(&r.key()).unwrap().unwrap();
        assert_eq!(kept.events[0].state, EventState::DeadLettered);
        assert_eq!(kept.events[0].detail.as_deref(), Some("HTTP 410"));
        assert_eq!(
            kept.state(),
            Some(State::Mapped),
            "the EHR's part is untouched"
        );
    }
    // Across a reopen: the dead letter, and its event, for a replay.
    let store = engine.open(dir.path());
    assert_eq!(
        store.dead_letter_jobs(&hook, None).unwrap(),
        vec![first_job.clone()]
    );
    assert_eq!(store.event(&first_job).unwrap().unwrap(), event(1));
    assert!(matches!(
        replay(&store, &first_job).await,
        Requeued::Waiting(_)
    ));
    assert_eq!(store.dead_letter_count(&hook), 0);
    assert_eq!(store.outbox_depth(&hook), 3);
    // Delivered: gone, event and all; the record says so.
    store
        .settle(
            &first_job,
            0,
            EventOutcome::Delivered {
                at: "2026-01-03T00:00:01Z".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(store.event(&first_job).unwrap(), None);
    assert_eq!(store.outbox_depth(&hook), 2);
    let kept = store.get(&key("tok-e")).unwrap().unwrap();
    assert_eq!(kept.events[0].state, EventState::Delivered);
    assert_eq!(
        replay(&store, &first_job).await,
        Requeued::Unknown,
        "nothing to replay once delivered"
    );
}

/// An inbound event is taken once: the same `seen` twice queues nothing twice. Its events are
/// decided from the record as it stands (here: nothing if the receiver was last sent the same
/// stage); what resolves to nothing, or to a submission no longer kept, is kept as unmatched,
/// newest first, page by page, across a reopen.
async fn an_inbound_event_is_taken_once_and_what_matches_nothing_is_kept(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let crm = Receiver::webhook("crm").unwrap();
    let r = record("tok-in", "aaaa");
    // Sets `stage` unless the CRM's last event set it already.
    let setting = |stage: &'static str, id: &'static str| -> Decide {
        let crm = crm.clone();
        Arc::new(move |record: &SubmissionRecord| {
            let last = record.events.iter().rev().find_map(|e| e.sets.as_deref());
            if last == Some(stage) {
                return vec![];
            }
            vec![Event {
                receiver: crm.clone(),
                id: id.into(),
                kind: "decision.made".into(),
                sets: Some(stage.into()),
                body: b"{}".to_vec(),
            }]
        })
    };
    let events = |key: &str, decide: Decide| Inbound::Events {
        key: key.into(),
        decide,
        sender: "ehr".into(),
        resource: "Task/1".into(),
    };
    let unmatched = |n: usize| {
        Inbound::Unmatched(Unmatched {
            at: format!("2026-01-01T00:00:0{n}Z"),
            sender: "ehr".into(),
            resource: format!("Task/u{n}"),
            why: "no submission".into(),
        })
    };
    {
        let store = engine.open(dir.path());
        store.accept(&r, BUNDLE.to_vec(), vec![]).await.unwrap();
        let taken = store
            .take_inbound(
                "Task/1/_history/2",
                events(&r.key(), setting("approved", "evt_1")),
            )
            .await
            .unwrap();
        assert_eq!(taken, Taken::Queued(1));
        let again = store
            .take_inbound(
                "Task/1/_history/2",
                events(&r.key(), setting("approved", "evt_1")),
            )
            .await
            .unwrap();
        assert_eq!(again, Taken::Duplicate);
        let unchanged = store
            .take_inbound(
                "Task/1/_history/3",
                events(&r.key(), setting("approved", "evt_2")),
            )
            .await
            .unwrap();
        assert_eq!(
            unchanged,
            Taken::Queued(0),
            "the CRM has that stage already"
        );
        assert_eq!(store.outbox_depth(&crm), 1);
        let sent = store.get(&r.key()).unwrap().unwrap().events;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].sets.as_deref(), Some("approved"));
        assert_eq!(
            store.take_inbound("sub#7", Inbound::Nothing).await.unwrap(),
            Taken::Seen
        );
        assert_eq!(
            store.take_inbound("sub#7", Inbound::Nothing).await.unwrap(),
            Taken::Duplicate
        );
        for n in 1..=3 {
            let taken = store.take_inbound(&format!("u{n}"), unmatched(n)).await;
            assert_eq!(taken.unwrap(), Taken::Unmatched);
        }
        let gone = store
            .take_inbound(
                "Task/9/_history/1",
                events("m/gone", setting("denied", "evt_3")),
            )
            .await
            .unwrap();
        assert_eq!(gone, Taken::Gone);
        assert_eq!(store.outbox_depth(&crm), 1, "nothing sent for what is gone");
    }
    let store = engine.open(dir.path());
    assert_eq!(store.unmatched_count(), 4);
    let (first, next) = store.unmatched(None, 3).unwrap();
    let names: Vec<_> = first.iter().map(|u| u.resource.as_str()).collect();
    assert_eq!(names, ["Task/1", "Task/u3", "Task/u2"], "newest first");
    let (rest, end) = store.unmatched(next.as_deref(), 3).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].resource, "Task/u1");
    assert_eq!(end, None);
    assert!(store.unmatched(Some("not a cursor"), 3).is_err());
    assert_eq!(
        store
            .take_inbound("Task/1/_history/2", Inbound::Nothing)
            .await
            .unwrap(),
        Taken::Duplicate,
        "what was seen stays seen"
    );
}

/// A cursor (how far a poll has read) is durable once set, and reads back after a reopen.
async fn cursors_are_kept_across_reopen(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = engine.open(dir.path());
        assert_eq!(store.cursor("poll:Task").unwrap(), None);
        store
            .set_cursor("poll:Task", "2026-01-01T00:00:00Z")
            .await
            .unwrap();
        store
            .set_cursor("poll:Task", "2026-01-02T00:00:00Z")
            .await
            .unwrap();
    }
    let store = engine.open(dir.path());
    assert_eq!(
        store.cursor("poll:Task").unwrap().as_deref(),
        Some("2026-01-02T00:00:00Z")
    );
}

/// Consequences that queue `event` whatever the record says.
fn announcing(event: Event) -> Consequences {
    Arc::new(move |_: &SubmissionRecord, _: &Transition| vec![event.clone()])
}

/// Events go in with the change that causes them, or not at all: not with a duplicate, not
/// with an outcome an earlier revision's attempt had (the revision waits).
async fn events_are_queued_with_the_change_that_causes_them(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = engine.open(dir.path());
    let crm = Receiver::webhook("crm").unwrap();
    let event = |id: &str| Event {
        receiver: crm.clone(),
        id: id.into(),
        kind: "intake.charted".into(),
        sets: None,
        body: b"{}".to_vec(),
    };
    let r = record("tok-x", "aaaa");
    store
        .accept(&r, BUNDLE.to_vec(), vec![event("evt_a")])
        .await
        .unwrap();
    let dup = store
        .accept(&r, BUNDLE.to_vec(), vec![event("evt_b")])
        .await
        .unwrap();
    assert!(matches!(dup, Accepted::Duplicate(_)));
    assert_eq!(
        store.outbox_depth(&crm),
        1,
        "nothing queued with a duplicate"
    );
    // A revision comes in while the first revision's attempt is out: its outcome does not
    // stand, and neither do its events.
    let mut second = record("tok-x", "bbbb");
    second.earlier_payloads = vec!["aaaa".into()];
    // The caller gives the revision the submission's history (intake does).
    second.events = store.get(&r.key()).unwrap().unwrap().events;
    store
        .revise(&second, BUNDLE.to_vec(), "aaaa", vec![])
        .await
        .unwrap();
    let stale = store
        .record_delivery(
            &r.key(),
            to(State::Delivered),
            vec![],
            Some(1),
            announcing(event("evt_c")),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale.state(), Some(State::Mapped));
    assert_eq!(store.outbox_depth(&crm), 1);
    let stands = store
        .record_delivery(
            &r.key(),
            to(State::Delivered),
            vec![],
            Some(2),
            announcing(event("evt_d")),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stands.state(), Some(State::Delivered));
    assert_eq!(store.outbox_depth(&crm), 2);
    let ids: Vec<&str> = stands.events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        ["evt_a", "evt_d"],
        "the revision kept the submission's events"
    );
}

/// Now (Unix µs), a moment after what came before and before what comes after: audit keys
/// are the clock's microseconds.
fn a_moment_between() -> u64 {
    std::thread::sleep(Duration::from_millis(2));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    std::thread::sleep(Duration::from_millis(2));
    now
}

fn access(n: usize) -> Access {
    Access {
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
    }
}

/// The audit trail: every access recorded is on disk when `record_access` returns, read back
/// newest first, and still there after a reopen.
async fn operator_accesses_are_kept_newest_first_across_reopen(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let mut between = Vec::new();
    {
        let store = engine.open(dir.path());
        for n in 0..3 {
            store.record_access(&access(n)).await.unwrap();
            between.push(a_moment_between());
        }
        let page = store.accesses(AuditWindow::default(), 2).unwrap();
        assert_eq!(page.accesses, vec![access(2), access(1)]);
        // The next page goes on from there, and is the last.
        let before = AuditCursor::parse(page.next.as_deref().unwrap());
        assert!(before.is_some());
        let rest = AuditWindow {
            before,
            ..AuditWindow::default()
        };
        let page = store.accesses(rest, 2).unwrap();
        assert_eq!((page.accesses, page.next), (vec![access(0)], None));
    }
    let store = engine.open(dir.path());
    let read = |w| store.accesses(w, 10).unwrap().accesses;
    assert_eq!(
        read(AuditWindow::default()),
        vec![access(2), access(1), access(0)]
    );
    let window = AuditWindow {
        since: Some(between[0]),
        before: Some(AuditWindow::until(between[1])),
    };
    assert_eq!(read(window), vec![access(1)]);
    let backwards = AuditWindow {
        since: Some(between[1]),
        before: Some(AuditWindow::until(between[0])),
    };
    assert_eq!(read(backwards), vec![]);
    assert_eq!(AuditCursor::parse("not a cursor"), None);
    assert_eq!(AuditCursor::parse(&"zz".repeat(16)), None);
    // Past the retention: the entries before the cutoff go, durably.
    let at = |micros: u64| std::time::UNIX_EPOCH + Duration::from_micros(micros);
    assert_eq!(
        store
            .forget_accesses(Duration::ZERO, at(between[1]))
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .forget_accesses(Duration::ZERO, at(between[1]))
            .unwrap(),
        0
    );
    drop(store);
    let store = engine.open(dir.path());
    assert_eq!(
        store.accesses(AuditWindow::default(), 10).unwrap().accesses,
        vec![access(2)]
    );
}

/// A retention sweep removes any number of entries, and what came after the cutoff stays.
async fn an_audit_trail_longer_than_a_round_is_forgotten_whole(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(engine.open(dir.path()));
    let mut recording = tokio::task::JoinSet::new();
    for n in 0..5000 {
        let store = Arc::clone(&store);
        recording.spawn(async move { store.record_access(&access(n % 3)).await });
    }
    while let Some(done) = recording.join_next().await {
        done.unwrap().unwrap();
    }
    let cutoff = a_moment_between();
    store.record_access(&access(9)).await.unwrap();
    let cutoff = std::time::UNIX_EPOCH + Duration::from_micros(cutoff);
    let a_second = Duration::from_secs(1);
    assert_eq!(
        store.forget_accesses(a_second, cutoff + a_second).unwrap(),
        5000
    );
    let left = store.accesses(AuditWindow::default(), 10).unwrap();
    assert_eq!((left.accesses, left.next), (vec![access(9)], None));
}

/// Past the retention, the Bundles of delivered (and acknowledged) submissions go; those of
/// waiting and dead-lettered ones stay, readable and deliverable, across a reopen.
async fn the_retention_sweep_drops_delivered_bundles_and_keeps_the_ones_still_needed(
    engine: &impl Engine,
) {
    let dir = tempfile::tempdir().unwrap();
    let bundle_of = |id: &str| format!("the bundle of {id}").into_bytes();
    {
        let store = engine.open(dir.path());
        for id in ["delivered", "dead", "waiting", "acknowledged", "latest"] {
            accept(&store, &record(id, "aaaa"), &bundle_of(id)).await;
            // The first read takes it from memory; the ones below read storage.
            assert_eq!(
                store.bundle_to_deliver(&key(id)).unwrap().unwrap().0,
                bundle_of(id)
            );
        }
        for (id, state) in [
            ("delivered", State::Delivered),
            ("dead", State::DeadLettered),
            ("acknowledged", State::Delivered),
            ("acknowledged", State::Acknowledged),
        ] {
            outcome(&store, id, state).await;
        }
        let now = std::time::SystemTime::now();
        assert_eq!(
            store.sweep_bundles(30 * DAY, now).unwrap(),
            Swept::default(),
            "nothing is 30 days old yet"
        );
        let swept = store.sweep_bundles(30 * DAY, now + 31 * DAY).unwrap();
        assert_eq!((swept.expired, swept.moved), (2, 2), "{swept:?}");
        for id in ["delivered", "acknowledged"] {
            assert_eq!(store.current_bundle(&key(id)).unwrap(), None, "{id}");
            assert!(store.get(&key(id)).unwrap().is_some(), "the record stays");
        }
    }
    let store = engine.open(dir.path());
    for id in ["dead", "waiting", "latest"] {
        assert_eq!(
            store.current_bundle(&key(id)).unwrap(),
            Some(bundle_of(id)),
            "{id}"
        );
    }
    assert_eq!(
        waiting(&store),
        vec![key("waiting"), key("latest")],
        "in the order they arrived"
    );
}

/// A replay of a delivered submission whose Bundle went is refused (`Expired`); a
/// dead-lettered one is kept and replayed.
async fn a_replay_of_a_submission_past_its_retention_is_refused(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = engine.open(dir.path());
    for id in ["delivered", "replayed", "dead", "latest"] {
        accept(&store, &record(id, "aaaa"), id.as_bytes()).await;
    }
    for (id, state) in [
        ("delivered", State::Delivered),
        ("replayed", State::Delivered),
        ("dead", State::DeadLettered),
    ] {
        outcome(&store, id, state).await;
    }
    // Replayed before the sweep: the sweep sees it waiting and keeps its Bundle.
    assert!(matches!(
        replay(&store, &JobId::ehr(key("replayed"))).await,
        Requeued::Waiting(_)
    ));
    let later = std::time::SystemTime::now() + 31 * DAY;
    let swept = store.sweep_bundles(30 * DAY, later).unwrap();
    assert_eq!((swept.expired, swept.moved), (1, 2), "{swept:?}");
    assert_eq!(store.current_bundle(&key("delivered")).unwrap(), None);
    for id in ["replayed", "dead", "latest"] {
        assert_eq!(
            store.current_bundle(&key(id)).unwrap(),
            Some(id.as_bytes().to_vec()),
            "{id}"
        );
    }
    assert_eq!(
        replay(&store, &JobId::ehr(key("delivered"))).await,
        Requeued::Expired
    );
    assert!(matches!(
        replay(&store, &JobId::ehr(key("dead"))).await,
        Requeued::Waiting(_)
    ));
}

async fn health_says_the_store_is_writing(engine: &impl Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = engine.open(dir.path());
    accept(&store, &record("h", "aaaa"), BUNDLE).await;
    assert_eq!(store.health(), chartbridge::store::Health::Writing);
    store.commit().unwrap();
}

// What only the embedded engine has: its Bundle log's files, sled's lock.

/// The Bundle log's segment files, in order.
fn segments(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir.join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names
}

/// A re-send keeps no second Bundle; a Bundle handed over from memory is read from the log
/// after, and damage there is noticed, not delivered.
#[tokio::test]
async fn sled_keeps_each_bundle_once_and_checks_what_it_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let log = dir.path().join("bundles/00000000000000000000.log");
    let len = || std::fs::metadata(&log).unwrap().len();
    let r = record("tok-5", "aaaa");
    accept(&store, &r, BUNDLE).await;
    let one = len();
    accept(&store, &r, BUNDLE).await;
    accept(&store, &record("tok-5", "bbbb"), BUNDLE).await;
    assert_eq!(len(), one, "re-sends keep no Bundle");
    std::fs::write(&log, vec![0u8; one as usize]).unwrap();
    assert_eq!(
        store.bundle_to_deliver(&r.key()).unwrap().unwrap().0,
        BUNDLE,
        "from memory"
    );
    assert!(matches!(
        store.bundle_to_deliver(&r.key()),
        Err(chartbridge::store::StoreError::Corrupt { .. })
    ));
}

/// The sweep drops whole segments, never the one appended to.
#[tokio::test]
async fn sled_sweeps_whole_segments_of_the_bundle_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Sled.open(dir.path());
    for id in ["a", "b", "latest"] {
        accept(&store, &record(id, "aaaa"), BUNDLE).await;
        outcome(&store, id, State::Delivered).await;
    }
    let before = segments(dir.path());
    assert_eq!(before.len(), 3, "one segment per write round");
    let swept = store
        .sweep_bundles(30 * DAY, std::time::SystemTime::now() + 31 * DAY)
        .unwrap();
    assert_eq!(
        swept,
        Swept {
            segments: 2,
            expired: 2,
            moved: 0
        }
    );
    assert_eq!(segments(dir.path()), before[2..]);
}

#[test]
fn sled_reopen_waits_for_the_lock_a_moment_and_then_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let first = SledStore::open(dir.path()).unwrap();
    let held = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(first);
    });
    // Released while it waits: it opens.
    let second = SledStore::open(dir.path()).unwrap();
    held.join().unwrap();
    // Held throughout: an error, after the wait.
    let started = std::time::Instant::now();
    assert!(SledStore::open(dir.path()).is_err());
    assert!(started.elapsed() >= Duration::from_secs(2));
    drop(second);
}
