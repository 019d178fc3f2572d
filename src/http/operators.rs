//! The operators' endpoints: a submission's status, a patient's submissions, the dead letters
//! and the waiting jobs (of any receiver), replays, provenance and the audit trail — behind the
//! admin key or an operator's own, every attempt recorded in the audit trail before it is
//! served (`operators_only`). Thin: what a replay or a listing does is `crate::operations`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{auth, now, ApiError, AppState, Peer, RequestId};
use crate::intake::IntakeError;
use crate::metrics::Metrics;
use crate::operations;
use crate::store::{self, Receiver, Requeued, Store, SubmissionRecord};

/// Refuses an operator endpoint without the admin key (when one is configured), and records
/// every attempt, let through or not, in the store's audit trail first: an access that cannot
/// be recorded is not served (503).
pub(super) async fn operators_only(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let (who, refused) = if state.operators.is_empty() {
        ("anyone: no admin key is configured".to_string(), None)
    } else {
        match auth::operator(&state.operators, req.headers()) {
            Ok(who) => (who.to_string(), None),
            Err(why) => (format!("refused: {why}"), Some(why)),
        }
    };
    if let Some(why) = &refused {
        if !state.refusals.record(Instant::now()) {
            Metrics::inc(&state.metrics.operator_refusals_unrecorded);
            return ApiError::Unauthorized(why.clone()).into_response();
        }
    }
    let unrecorded = state.refusals.take_unrecorded();
    let headers = req.headers();
    let access = store::Access {
        at: now(),
        who,
        client: req
            .extensions()
            .get::<ConnectInfo<Peer>>()
            .map(|ConnectInfo(Peer(addr))| addr.to_string()),
        // What a proxy in front says of the client (as it says it: not checked; a chain of
        // proxies fits, a refused request cannot make the trail keep kilobytes).
        forwarded_for: headers
            .get("x-forwarded-for")
            .or_else(|| headers.get(header::FORWARDED))
            .map(|v| String::from_utf8_lossy(&v.as_bytes()[..v.len().min(256)]).into_owned()),
        request_id: req
            .extensions()
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_default(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        allowed: refused.is_none(),
        unrecorded_refusals: (unrecorded > 0).then_some(unrecorded),
    };
    if let Err(e) = state.intake.store().record_access(&access).await {
        state.refusals.put_back(unrecorded);
        return ApiError::Unaudited(e.to_string()).into_response();
    }
    if let Some(why) = refused {
        return ApiError::Unauthorized(why).into_response();
    }
    next.run(req).await
}

/// How many entries a listing (`/audit`, `/submissions?state=`) gives: `limit`, 100 by
/// default, 1,000 at most.
fn listed(limit: Option<usize>) -> usize {
    limit.unwrap_or(100).min(1000)
}

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    limit: Option<usize>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
}

/// `GET /audit[?since=T][&until=T][&before=C][&limit=N]`: who used the operators' endpoints,
/// newest first (100 by default, 1,000 at most), recorded at or after `since` and before
/// `until` (RFC 3339); `next`, when there may be more, is the `before` of the page after.
pub(super) async fn audit(
    State(state): State<Arc<AppState>>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let instant = |name: &str, v: &Option<String>| -> Result<Option<u64>, ApiError> {
        v.as_deref()
            .map(|t| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .ok()
                    .and_then(|t| u64::try_from(t.timestamp_micros()).ok())
                    .ok_or_else(|| {
                        ApiError::BadQuery(format!(
                            "`{name}` is not an RFC 3339 instant after 1970 (e.g. 2026-11-27T09:00:00Z)"
                        ))
                    })
            })
            .transpose()
    };
    let cursor = q
        .before
        .as_deref()
        .map(|c| {
            store::AuditCursor::parse(c).ok_or_else(|| {
                ApiError::BadQuery("`before` is not a page's `next` (32 hex digits)".into())
            })
        })
        .transpose()?;
    let until = instant("until", &q.until)?.map(store::AuditWindow::until);
    let window = store::AuditWindow {
        since: instant("since", &q.since)?,
        before: cursor.into_iter().chain(until).min(),
    };
    let page = state
        .intake
        .store()
        .accesses(window, listed(q.limit))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut body = json!({ "accesses": page.accesses });
    if let Some(next) = page.next {
        body["next"] = json!(next);
    }
    Ok(Json(body))
}

/// Which mapping produced a submission: id, version, and the SHA-256 of its file.
fn mapping_view(r: &SubmissionRecord) -> Value {
    json!({"id": r.mapping_id, "version": r.mapping_version, "sha256": r.mapping_sha256})
}

/// A submission's record without the Bundle or anything from the payload (no PHI).
fn public_view(r: &SubmissionRecord) -> Value {
    json!({
        "key": r.key(),
        "mapping": mapping_view(r),
        "submission_id": r.submission_id,
        "payload_sha256": r.payload_sha256,
        "revision": r.revision(),
        "earlier_payloads": r.earlier_payloads,
        "state": r.state(),
        "transitions": r.transitions,
        "ehr": r.ehr.iter().map(|e| json!({
            "reference": format!("{}/{}", e.resource_type, e.id),
            "version": e.version,
            "etag": e.etag,
        })).collect::<Vec<_>>(),
        "flags": r.flags,
        "missing": r.missing,
        // What the CRM and the portal were sent, and where each delivery stands (never a body).
        "events": r.events,
    })
}

pub(super) async fn status(
    State(state): State<Arc<AppState>>,
    Path((mapping_id, submission_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let key = store::key(&mapping_id, &submission_id);
    match state.intake.store().get(&key).map_err(IntakeError::Store)? {
        Some(r) => Ok(Json(public_view(&r))),
        None => Err(ApiError::NotFound(format!("no submission {key}"))),
    }
}

#[derive(Deserialize)]
pub(super) struct ReplayQuery {
    receiver: Option<String>,
}

/// The receiver an operators' request names (`?receiver=`; the EHR by default): `400` for a
/// name that is not one.
fn receiver_named(name: Option<&str>) -> Result<Receiver, ApiError> {
    match name {
        None => Ok(Receiver::Ehr),
        Some(name) => Receiver::parse(name).ok_or_else(|| {
            ApiError::BadQuery(format!(
                "`receiver` is `ehr` or a webhook receiver's name (`crm`, `portal`), not `{name}`"
            ))
        }),
    }
}

/// `POST /submissions/{mapping_id}/{submission_id}/replay[?receiver=…]`: the submission's EHR
/// delivery made again; with a webhook receiver, its events to that receiver that were
/// dead-lettered.
pub(super) async fn replay(
    State(state): State<Arc<AppState>>,
    Path((mapping_id, submission_id)): Path<(String, String)>,
    Query(q): Query<ReplayQuery>,
) -> Result<Response, ApiError> {
    let key = store::key(&mapping_id, &submission_id);
    let receiver = receiver_named(q.receiver.as_deref())?;
    let requeued = operations::replay(state.intake.store(), &receiver, &key, &now())
        .await
        .map_err(IntakeError::Store)?;
    match requeued {
        Requeued::Waiting(r) => {
            state.outbox.notify_one();
            Ok((StatusCode::ACCEPTED, Json(public_view(&r))).into_response())
        }
        // Past the retention a delivered submission's Bundle is gone: nothing to send again.
        Requeued::Expired => Err(ApiError::Gone(format!(
            "the Bundle of {key} is no longer kept (past bundle_retention_days): nothing to deliver again"
        ))),
        Requeued::Unknown if receiver == Receiver::Ehr => {
            Err(ApiError::NotFound(format!("no submission {key}")))
        }
        Requeued::Unknown => Err(ApiError::NotFound(format!(
            "no dead-lettered event of {key} for {receiver}"
        ))),
    }
}

#[derive(Deserialize)]
pub(super) struct BulkReplayQuery {
    mapping: Option<String>,
    limit: Option<usize>,
    receiver: Option<String>,
}

/// `POST /dead-letters/replay[?mapping=ID][&limit=N][&receiver=…]`: every dead letter of a
/// receiver (the EHR by default; of one mapping), earliest first, back in the outbox — what an
/// operator does once the cause the receiver named is fixed. `202` with the jobs replayed,
/// those whose Bundle is past its retention (nothing to send) and how many dead letters are left
/// (beyond `limit`, or dead-lettered meanwhile).
pub(super) async fn replay_dead_letters(
    State(state): State<Arc<AppState>>,
    Query(q): Query<BulkReplayQuery>,
) -> Result<Response, ApiError> {
    known_mapping(&state, q.mapping.as_deref())?;
    let receiver = receiver_named(q.receiver.as_deref())?;
    let limit = q.limit.unwrap_or(operations::BULK_REPLAY_MAX);
    let done = operations::replay_dead_letters(
        state.intake.store(),
        &receiver,
        q.mapping.as_deref(),
        limit,
        &now(),
    )
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    if !done.replayed.is_empty() {
        state.outbox.notify_one();
    }
    tracing::info!(
        receiver = %receiver,
        replayed = done.replayed.len(),
        expired = done.expired.len(),
        "dead letters replayed"
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"replayed": done.replayed, "expired": done.expired, "left": done.left})),
    )
        .into_response())
}

/// A `mapping` filter of the operators' endpoints names a loaded mapping (`404` otherwise).
fn known_mapping(state: &AppState, mapping: Option<&str>) -> Result<(), ApiError> {
    match mapping {
        Some(m) if state.intake.mapping(m).is_none() => {
            Err(IntakeError::UnknownMapping(m.to_string()).into())
        }
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
pub(super) struct SubmissionsQuery {
    patient: Option<String>,
    state: Option<String>,
    mapping: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    receiver: Option<String>,
}

/// `GET /submissions?patient=<system>|<value>`: a patient's submissions, by the identifier the
/// mapping recorded; `?state=dead-lettered` the dead letters (latest first), `?state=waiting`
/// what the outbox holds (oldest first) — of one `mapping` or all, `limit` a page (100 by
/// default, 1,000 at most), with how many there are in all (`total`) and where the next page
/// begins (`next`, given back as `after`). Each as its status view (no PHI values).
pub(super) async fn submissions(
    State(state): State<Arc<AppState>>,
    Query(q): Query<SubmissionsQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.intake.store();
    let limit = listed(q.limit);
    let mapping = q.mapping.as_deref();
    known_mapping(&state, mapping)?;
    let receiver = receiver_named(q.receiver.as_deref())?;
    let after = match q.after.as_deref() {
        None => None,
        Some(after) => Some(store::Cursor::parse(after).ok_or_else(|| {
            ApiError::BadQuery("`after` is not a page's `next`: give it back as it came".into())
        })?),
    };
    let page = match (q.patient.as_deref(), q.state.as_deref()) {
        (Some(patient), None) => {
            let Some((system, value)) = patient.split_once('|') else {
                return Err(ApiError::BadQuery(
                    "give `patient=<system>|<value>`, the identifier the mapping recorded".into(),
                ));
            };
            let records = operations::patient_submissions(store, system, value, mapping)
                .map_err(IntakeError::Store)?;
            Ok(store::RecordPage {
                total: records.len(),
                records,
                ..store::RecordPage::default()
            })
        }
        (None, Some("dead-lettered")) => {
            store.dead_letter_page(&receiver, mapping, after.as_ref(), limit)
        }
        (None, Some("waiting")) => store.waiting_page(&receiver, mapping, after.as_ref(), limit),
        _ => {
            return Err(ApiError::BadQuery(
                "give `patient=<system>|<value>` (a patient's submissions), or \
                 `state=dead-lettered` or `state=waiting` (with `mapping`, `limit` — 100 by \
                 default — and `after`)"
                    .into(),
            ))
        }
    }
    .map_err(IntakeError::Store)?;
    let submissions: Vec<Value> = page.records.iter().map(public_view).collect();
    let mut listing = json!({ "submissions": submissions, "total": page.total });
    if let Some(next) = page.next {
        listing["next"] = json!(next);
    }
    Ok(Json(listing))
}

#[derive(Deserialize)]
pub(super) struct ProvenanceQuery {
    target: String,
}

pub(super) async fn provenance(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ProvenanceQuery>,
) -> Result<Json<Value>, ApiError> {
    match state
        .intake
        .store()
        .by_resource(&q.target)
        .map_err(IntakeError::Store)?
    {
        Some(r) => Ok(Json(json!({
            "target": q.target,
            "submission": r.key(),
            "payload_sha256": r.payload_sha256,
            "mapping": mapping_view(&r),
            "recorded": r.transitions.first().map(|t| t.at.clone()),
        }))),
        None => Err(ApiError::NotFound(format!(
            "no submission produced {}",
            q.target
        ))),
    }
}
