//! The store's decisions, as pure functions every engine applies the same way inside its own
//! transaction: whether a submission is new, a duplicate, a revision or a conflict; what an
//! attempt's outcome does to a record and to its outbox job; what a replay does. The engine
//! reads what they need, calls them, and writes what they say — the rules themselves never
//! touch storage, so they are tested here without one.

use super::model::{
    EhrResource, Event, EventOutcome, EventState, SentEvent, State, SubmissionRecord, Transition,
};

/// What an accepted submission (or a revision of one) is, given what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptDecision {
    /// Not stored yet: store it, with its outbox job and events.
    New,
    /// A payload one of its revisions already had: nothing to write.
    Duplicate,
    /// A payload none of its revisions had, while it is not a revision of the current one:
    /// the caller amends the current one (`revise`).
    Conflict,
    /// The next revision of the current one: it takes the submission's place (record, Bundle,
    /// outbox job — out of the dead letters —, patient index).
    Revision,
}

/// Decides an accept: `existing` is the stored record of the same key, `revises` the payload
/// hash a revision amends (`None` for a new submission).
pub fn accept(
    existing: Option<&SubmissionRecord>,
    payload_sha256: &str,
    revises: Option<&str>,
) -> AcceptDecision {
    match existing {
        None => AcceptDecision::New,
        Some(e) if e.has_payload(payload_sha256) => AcceptDecision::Duplicate,
        Some(e) if revises == Some(e.payload_sha256.as_str()) => AcceptDecision::Revision,
        Some(_) => AcceptDecision::Conflict,
    }
}

/// What becomes of an outbox job after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Out of the outbox (delivered, dead-lettered).
    Leave,
    /// Into the outbox (again), failures counted from zero.
    Enter,
    /// Stays as it is.
    Stay,
    /// Stays, with one more failure counted.
    Failed,
}

/// Applies a delivery attempt's outcome to its submission's record: the transition, and the
/// resources the EHR stored. `sent` is the revision the attempt sent: if a revision came in
/// meanwhile, the outcome is recorded but does not stand — the record notes that the revision
/// waits, and the job stays. Returns the job's fate and whether the outcome stands (only then
/// are the events it causes queued).
pub fn delivery_outcome(
    record: &mut SubmissionRecord,
    transition: Transition,
    ehr: &[EhrResource],
    sent: Option<u32>,
) -> (Fate, bool) {
    let state = transition.state;
    let at = transition.at.clone();
    record.transitions.push(transition);
    record.stored_in_ehr(ehr);
    let done = matches!(
        state,
        State::Delivered | State::DeadLettered | State::Acknowledged
    );
    if done && sent.is_some_and(|sent| sent != record.revision()) {
        record
            .transitions
            .push(Transition::new(State::Mapped, at).because(format!(
                "revision {} waits: that attempt sent an earlier revision",
                record.revision()
            )));
        return (Fate::Stay, false);
    }
    let fate = match state {
        _ if done => Fate::Leave,
        State::Failed => Fate::Failed,
        _ => Fate::Stay,
    };
    (fate, true)
}

/// A replay: the submission back in the outbox, failures counted again from zero.
pub fn requeue(record: &mut SubmissionRecord, at: &str) -> Fate {
    record
        .transitions
        .push(Transition::new(State::Mapped, at).because("replay requested"));
    Fate::Enter
}

/// Notes events queued for a submission (each `Waiting`) in its record.
pub fn queued(record: &mut SubmissionRecord, events: &[Event], at: &str) {
    record.events.extend(events.iter().map(|e| SentEvent {
        receiver: e.receiver.name().to_string(),
        id: e.id.clone(),
        kind: e.kind.clone(),
        sets: e.sets.clone(),
        state: EventState::Waiting,
        at: at.to_string(),
        detail: None,
    }));
}

/// Applies an event delivery's outcome to its submission's record (the event `event_id`;
/// `failures` before this attempt); the job's fate.
pub fn event_outcome(
    record: &mut SubmissionRecord,
    event_id: &str,
    failures: u32,
    outcome: &EventOutcome,
) -> Fate {
    let (state, at, detail, fate) = match outcome {
        EventOutcome::Delivered { at } => (EventState::Delivered, at, None, Fate::Leave),
        EventOutcome::Failed { at, why } => (
            EventState::Failed,
            at,
            Some(format!(
                "{} failed attempt(s); the last: {why}",
                failures.saturating_add(1)
            )),
            Fate::Failed,
        ),
        EventOutcome::DeadLettered { at, why } => {
            (EventState::DeadLettered, at, Some(why.clone()), Fate::Leave)
        }
    };
    if let Some(e) = record.events.iter_mut().rev().find(|e| e.id == event_id) {
        e.state = state;
        e.at = at.clone();
        e.detail = detail;
    }
    fate
}

/// A replay of an event: waiting again.
pub fn event_requeue(record: &mut SubmissionRecord, event_id: &str, at: &str) -> Fate {
    if let Some(e) = record.events.iter_mut().rev().find(|e| e.id == event_id) {
        e.state = EventState::Waiting;
        e.at = at.to_string();
        e.detail = Some("replay requested".into());
    }
    Fate::Enter
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::model::Receiver;

    fn record(payload: &str) -> SubmissionRecord {
        SubmissionRecord {
            mapping_id: "m".into(),
            mapping_version: "1".into(),
            mapping_sha256: "ab".into(),
            submission_id: "s".into(),
            payload_sha256: payload.into(),
            patient_system: "sys".into(),
            patient_value: "p".into(),
            flags: vec![],
            missing: vec![],
            transitions: vec![Transition::new(State::Mapped, "t0")],
            ehr: vec![],
            earlier_payloads: vec![],
            events: vec![],
        }
    }

    #[test]
    fn accept_tells_new_duplicate_revision_and_conflict_apart() {
        use AcceptDecision::*;
        let mut r = record("p2");
        r.earlier_payloads.push("p1".into());
        assert_eq!(accept(None, "p1", None), New);
        assert_eq!(accept(Some(&r), "p2", None), Duplicate);
        assert_eq!(
            accept(Some(&r), "p1", Some("p2")),
            Duplicate,
            "any revision's payload"
        );
        assert_eq!(accept(Some(&r), "p3", None), Conflict);
        assert_eq!(accept(Some(&r), "p3", Some("p2")), Revision);
        assert_eq!(
            accept(Some(&r), "p3", Some("p1")),
            Conflict,
            "another came first"
        );
    }

    #[test]
    fn an_outcome_of_an_earlier_revision_does_not_take_the_job_out() {
        let delivered = || Transition::new(State::Delivered, "t1");
        let mut r = record("p1");
        assert_eq!(
            delivery_outcome(&mut r, delivered(), &[], Some(1)),
            (Fate::Leave, true)
        );
        let mut r = record("p2");
        r.earlier_payloads.push("p1".into());
        let (fate, stands) = delivery_outcome(&mut r, delivered(), &[], Some(1));
        assert_eq!((fate, stands), (Fate::Stay, false));
        assert_eq!(r.state(), Some(State::Mapped));
        let failed = Transition::new(State::Failed, "t2").because("HTTP 503");
        assert_eq!(
            delivery_outcome(&mut r, failed, &[], Some(2)),
            (Fate::Failed, true)
        );
        let dead = Transition::new(State::DeadLettered, "t3");
        assert_eq!(
            delivery_outcome(&mut r, dead, &[], None),
            (Fate::Leave, true)
        );
        assert_eq!(requeue(&mut r, "t4"), Fate::Enter);
        assert_eq!(r.state(), Some(State::Mapped));
    }

    #[test]
    fn event_outcomes_are_noted_in_the_record() {
        let mut r = record("p1");
        let event = Event {
            receiver: Receiver::Webhook("crm".into()),
            id: "evt_1".into(),
            kind: "intake.submitted".into(),
            sets: None,
            body: b"{}".to_vec(),
        };
        queued(&mut r, &[event], "t0");
        assert_eq!(r.events[0].state, EventState::Waiting);
        let failed = EventOutcome::Failed {
            at: "t1".into(),
            why: "HTTP 503".into(),
        };
        assert_eq!(event_outcome(&mut r, "evt_1", 0, &failed), Fate::Failed);
        assert_eq!(
            r.events[0].detail.as_deref(),
            Some("1 failed attempt(s); the last: HTTP 503")
        );
        let ok = EventOutcome::Delivered { at: "t2".into() };
        assert_eq!(event_outcome(&mut r, "evt_1", 1, &ok), Fate::Leave);
        assert_eq!(r.events[0].state, EventState::Delivered);
        assert_eq!(event_requeue(&mut r, "evt_1", "t3"), Fate::Enter);
        assert_eq!(r.events[0].state, EventState::Waiting);
    }
}
