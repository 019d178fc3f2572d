//! The gateway's HTTP API (axum). Thin: it authenticates, enforces size and depth limits, parses,
//! and hands over to `intake`, the store and the outbox; errors become OperationOutcomes once,
//! in `error`.
//!
//! - `POST /submissions/{mapping_id}` — a submission in → `202` once it is durable
//! - `GET  /submissions/{mapping_id}/{submission_id}` — status, transitions, EHR references
//! - `POST /submissions/{mapping_id}/{submission_id}/replay` — deliver again
//! - `POST /dead-letters/replay[?mapping=…]` — deliver every dead letter again (after a fix)
//! - `GET  /submissions?patient=<system>|<value>` — a patient's submissions
//! - `GET  /provenance?target=Observation/123` — which submission and mapping produced it
//! - `GET  /audit` — who used the operators' endpoints (each of them records every attempt),
//!   by time window and page
//! - `GET  /Questionnaire/{id}`, `GET /Questionnaire?url=…` — the Questionnaire each mapping
//!   defines (what its QuestionnaireResponses point at), and `GET /metadata`
//! - `POST /QuestionnaireResponse` — a FHIR-native form's response, as a submission of the
//!   mapping whose Questionnaire it answers
//! - `POST /QuestionnaireResponse/$extract` — SDC observation-based extraction of a
//!   QuestionnaireResponse (stores and delivers nothing)
//! - `GET  /health`, `GET /ready`, `GET /metrics`

pub mod auth;
pub mod error;
pub mod form;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::config::Config;
use crate::delivery::client::EhrClient;
use crate::fetch::Fetch;
use crate::intake::{Intake, IntakeError};
use crate::metrics::{Metrics, Outcome};
use crate::store::{self, JobId, Receiver, Requeued, Store, SubmissionRecord};
pub use error::ApiError;

/// What every handler shares.
pub struct AppState {
    pub intake: Intake,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// Wakes the outbox when a submission is accepted or replayed.
    pub outbox: Arc<Notify>,
    pub ehr: Option<Arc<EhrClient>>,
    /// Sources whose webhooks only announce a submission (Healthie).
    pub fetch: Fetch,
    /// When the gateway started (RFC 3339): the CapabilityStatement's date.
    pub started: String,
    /// How many refused operators' attempts the audit trail records one by one.
    pub refusals: auth::RefusalBudget,
    /// Who may use the operators' endpoints, and the SHA-256 of their key
    /// (`Config::operator_keys`); none: they are open.
    pub operators: Vec<(String, [u8; 32])>,
}

/// Refused operators' attempts recorded one by one: 10 a second, bursts of 100.
pub fn refusal_budget() -> auth::RefusalBudget {
    auth::RefusalBudget::new(10.0, 100.0, Instant::now())
}

pub fn router(state: Arc<AppState>) -> Router {
    // What operators use: behind the admin key when one is configured.
    let operators = Router::new()
        .route("/submissions", get(submissions))
        .route("/submissions/{mapping_id}/{submission_id}", get(status))
        .route(
            "/submissions/{mapping_id}/{submission_id}/replay",
            post(replay),
        )
        .route("/dead-letters/replay", post(replay_dead_letters))
        .route("/provenance", get(provenance))
        .route("/audit", get(audit))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            operators_only,
        ));
    let routes = Router::new()
        .route("/submissions/{mapping_id}", post(submit))
        .merge(operators)
        .route("/metadata", get(metadata))
        .route("/Questionnaire", get(questionnaires))
        .route("/Questionnaire/{id}", get(questionnaire))
        .route("/QuestionnaireResponse", post(submit_response))
        .route("/QuestionnaireResponse/$extract", post(extract))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    let routes = if state.config.echo_route {
        routes.route("/echo", post(echo))
    } else {
        routes
    };
    routes
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            within_time,
        ))
        .layer(middleware::from_fn(request_log))
        .with_state(state)
}

/// Answers `408` to a request whose body (and answer) take longer than `request_timeout_ms`
/// (the connection then closes): a client trickling its body holds no task for good. Safe
/// mid-write: a write the store was given completes, and the client's retry finds it.
async fn within_time(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = std::time::Duration::from_millis(state.config.limits.request_timeout_ms);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = ApiError::TimedOut(limit.as_millis()).into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// Refuses an operator endpoint without the admin key (when one is configured), and records
/// every attempt, let through or not, in the store's audit trail first: an access that cannot
/// be recorded is not served (503).
async fn operators_only(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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

/// The address a connection came from, as the listener saw it (axum's `ConnectInfo`; the
/// server's listener hands it over with each connection).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// The request's id (`request_log` gives it), for whatever records the request.
#[derive(Clone)]
struct RequestId(String);

/// How many entries a listing (`/audit`, `/submissions?state=`) gives: `limit`, 100 by
/// default, 1,000 at most.
fn listed(limit: Option<usize>) -> usize {
    limit.unwrap_or(100).min(1000)
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
}

/// `GET /audit[?since=T][&until=T][&before=C][&limit=N]`: who used the operators' endpoints,
/// newest first (100 by default, 1,000 at most), recorded at or after `since` and before
/// `until` (RFC 3339); `next`, when there may be more, is the `before` of the page after.
async fn audit(
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

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// Gives each request an id (echoed as `x-request-id`) and logs method, route, status and time —
/// never bodies or query values.
async fn request_log(mut req: Request, next: Next) -> Response {
    let id = format!("req-{}", REQUEST_SEQ.fetch_add(1, Ordering::Relaxed));
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    let mut response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "handled"
        )
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

fn now() -> String {
    crate::delivery::outbox::now()
}

async fn submit(
    State(state): State<Arc<AppState>>,
    Path(mapping_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let Some(mapping) = state.intake.mapping(&mapping_id).cloned() else {
        return counted(
            &state,
            None,
            Err(IntakeError::UnknownMapping(mapping_id).into()),
        );
    };
    let result = take_submission(&state, &mapping, req).await;
    counted(&state, Some(&mapping.id), result)
}

/// What became of a post to a submission route.
enum Taken {
    /// On disk (new, a revision, or a re-send).
    Receipt(crate::intake::Receipt),
    /// Not a submission by its mapping's `accept_when` (a step of a multi-step form): why.
    Ignored(String),
}

impl From<crate::intake::Receipt> for Taken {
    fn from(r: crate::intake::Receipt) -> Taken {
        Taken::Receipt(r)
    }
}

/// Counts a submission by its mapping (`None`: none loaded is named) and outcome, and answers.
fn counted(
    state: &AppState,
    mapping: Option<&str>,
    result: Result<Taken, ApiError>,
) -> Result<Response, ApiError> {
    let outcome = match &result {
        Ok(Taken::Receipt(r)) if r.new && r.revision > 1 => Outcome::Revised,
        Ok(Taken::Receipt(r)) if r.new => Outcome::Accepted,
        Ok(Taken::Receipt(_)) => Outcome::Duplicate,
        Ok(Taken::Ignored(_)) => Outcome::Ignored,
        Err(e) => e.submission_outcome(),
    };
    state.metrics.submission(mapping, outcome);
    result.map(|taken| match taken {
        Taken::Receipt(receipt) => accepted(state, &receipt),
        Taken::Ignored(why) => ignored(&why),
    })
}

/// `200` for a post that is not a submission (`accept_when`): the source stops retrying it,
/// and nothing of it is kept.
fn ignored(why: &str) -> Response {
    tracing::info!("post ignored: its mapping's accept_when does not hold");
    (StatusCode::OK, Json(json!({ "ignored": why }))).into_response()
}

/// `POST /submissions/{mapping_id}` once its mapping is known: authenticated, read, (fetched,)
/// mapped and on disk.
async fn take_submission(
    state: &AppState,
    mapping: &Arc<crate::mapping::Mapping>,
    req: Request,
) -> Result<Taken, ApiError> {
    let mapping_id = &mapping.id;
    let (parts, body) = req.into_parts();
    let limit = state.config.limits.max_body_bytes;
    let raw = to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(limit))?;
    authenticate(state, mapping_id, &parts, &raw)?;
    // A form body (Jotform's webhooks, urlencoded posts) is read as the JSON object of its
    // fields.
    let raw = match body_kind(&parts.headers)? {
        BodyKind::Json => raw,
        BodyKind::Multipart(boundary) => Bytes::from(form::multipart_to_json(&raw, &boundary)?),
        BodyKind::UrlEncoded => Bytes::from(form::urlencoded_to_json(&raw)?),
    };
    let room = room_in_outbox(state, mapping_id);
    // A notification (Healthie's) is exchanged for the submission it announces — not while
    // there is no room for it.
    let (raw, room) = match state.fetch.source(mapping_id) {
        Some(source) => {
            room?;
            let fetched = state.fetch.submission(source, &raw, limit).await?;
            (Bytes::from(fetched), Ok(()))
        }
        None => (raw, room),
    };
    // One pass: parse (what the mapping reads) and the depth limit (everything).
    let depth = state.config.limits.max_json_depth;
    let payload = mapping.parse_payload_within(&raw, depth)?;
    if let Err(why) = mapping.accepts(&payload) {
        return Ok(Taken::Ignored(why));
    }
    if let Err(full) = room {
        return resent_or(
            state,
            mapping,
            mapping
                .submission_id(&payload)
                .and_then(Result::ok)
                .as_ref()
                .map(crate::ids::SubmissionId::as_str),
            &raw,
            full,
        )
        .map(Taken::from);
    }
    let received_at = now();
    // Everything the request brought is dropped before the wait for the disk, on the thread
    // that allocated it (freeing across threads measurably slowed the allocator).
    drop(parts);
    Ok(state
        .intake
        .accept(mapping, raw, payload, &received_at)
        .await?
        .into())
}

/// Refuses a submission (nothing stored: the source retries) while the outbox holds
/// `max_outbox` deliveries, or `max_outbox_per_mapping` of its mapping's — one form's flood (a
/// retry storm, a test form pointed at production) must not take every other form's room.
fn room_in_outbox(state: &AppState, mapping_id: &str) -> Result<(), ApiError> {
    let limits = &state.config.limits;
    let store = state.intake.store();
    let waiting = store.outbox_depth(&Receiver::Ehr);
    if waiting >= limits.max_outbox {
        return Err(ApiError::Overloaded(waiting));
    }
    if let Some(most) = limits.max_outbox_per_mapping {
        let waiting = store.outbox_depth_of(mapping_id);
        if waiting >= most {
            return Err(ApiError::MappingOverloaded {
                mapping: mapping_id.to_string(),
                waiting,
            });
        }
    }
    Ok(())
}

/// While there is no room for a new submission (`full`): the receipt of a re-send of one
/// accepted before (`submission_id`, the same bytes), answered as ever; else `full`.
fn resent_or(
    state: &AppState,
    mapping: &crate::mapping::Mapping,
    submission_id: Option<&str>,
    raw: &[u8],
    full: ApiError,
) -> Result<crate::intake::Receipt, ApiError> {
    state
        .intake
        .accepted_before(mapping, submission_id, raw)?
        .ok_or(full)
}

/// Checks a submission's request as its source's configuration says (signature, key).
fn authenticate(
    state: &AppState,
    mapping_id: &str,
    parts: &axum::http::request::Parts,
    raw: &[u8],
) -> Result<(), ApiError> {
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let target = auth::Target {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
    };
    auth::verify(
        state.config.source_auth(mapping_id),
        &target,
        &parts.headers,
        raw,
        unix_now,
    )
    .map_err(ApiError::Unauthorized)
}

/// `202 Accepted` for a submission on disk (the outbox woken if it is new, or a new
/// revision): its key, status URL, event, revision, flags and missing answers.
fn accepted(state: &AppState, receipt: &crate::intake::Receipt) -> Response {
    if receipt.new {
        state.outbox.notify_one();
    }
    tracing::info!(key = %receipt.key, new = receipt.new, flags = receipt.flags.len(), "submission accepted");
    // The id as one path segment: `../x` or `a?b` must not lead a client elsewhere.
    let status_url = format!(
        "/submissions/{}/{}",
        receipt.mapping_id,
        crate::ids::path_segment(&receipt.submission_id)
    );
    let body = json!({
        "key": receipt.key,
        "mapping_id": receipt.mapping_id,
        "submission_id": receipt.submission_id,
        "status_url": status_url,
        "event": receipt.event,
        "revision": receipt.revision,
        "flags": receipt.flags,
        "missing": receipt.missing,
    });
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url)],
        Json(body),
    )
        .into_response();
    if !receipt.new {
        response
            .headers_mut()
            .insert("x-chartbridge-duplicate", HeaderValue::from_static("true"));
    }
    response
}

/// `POST /QuestionnaireResponse`: a FHIR-native form's response to one of the mappings'
/// Questionnaires (its `questionnaire` canonical names which), taken as a submission of that
/// mapping — authenticated as that mapping's source, stored, and delivered with its extracted
/// Observations and Provenance like any other. `202` as `POST /submissions/{mapping_id}`.
async fn submit_response(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let mut mapping = None;
    let result = take_response(&state, req, &mut mapping).await;
    counted(
        &state,
        mapping.as_ref().map(|m| m.id.as_str()),
        result.map(Taken::from),
    )
}

/// `POST /QuestionnaireResponse`: `mapping` is the one it answers, once known.
async fn take_response(
    state: &AppState,
    req: Request,
    mapping: &mut Option<Arc<crate::mapping::Mapping>>,
) -> Result<crate::intake::Receipt, ApiError> {
    let (parts, body) = req.into_parts();
    let limits = &state.config.limits;
    let raw = to_bytes(body, limits.max_body_bytes)
        .await
        .map_err(|_| ApiError::TooLarge(limits.max_body_bytes))?;
    let response = crate::mapping::select::Projection::all().parse(&raw, limits.max_json_depth)?;
    if response.get("resourceType").and_then(Value::as_str) != Some("QuestionnaireResponse") {
        return Err(ApiError::Unprocessable(
            "expected a QuestionnaireResponse (its resourceType)".into(),
        ));
    }
    // A response to a form no mapping defines: the map it needs is missing (404).
    let answered = mapping.insert(defining(
        state,
        &response,
        "see GET /Questionnaire",
        ApiError::NotFound,
    )?);
    authenticate(state, &answered.id, &parts, &raw)?;
    if let Err(full) = room_in_outbox(state, &answered.id) {
        let id = crate::mapping::extract::submission_id(&response);
        return resent_or(state, answered, id, &raw, full);
    }
    Ok(state
        .intake
        .accept_response(answered, &raw, &response, &now())
        .await?)
}

/// How a submission's body is written.
enum BodyKind {
    Json,
    Multipart(String),
    UrlEncoded,
}

/// JSON (`application/json`, `…+json`, or no content type) or a form (multipart or
/// urlencoded); anything else is refused.
fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyKind::Json);
    };
    let ct = ct.to_str().unwrap_or("");
    if let Some(boundary) = form::multipart_boundary(ct) {
        return Ok(BodyKind::Multipart(boundary?.to_owned()));
    }
    if form::is_urlencoded(ct) {
        return Ok(BodyKind::UrlEncoded);
    }
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(BodyKind::Json)
    } else {
        Err(ApiError::UnsupportedMediaType(essence))
    }
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
    })
}

async fn status(
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
struct ReplayQuery {
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
async fn replay(
    State(state): State<Arc<AppState>>,
    Path((mapping_id, submission_id)): Path<(String, String)>,
    Query(q): Query<ReplayQuery>,
) -> Result<Response, ApiError> {
    let key = store::key(&mapping_id, &submission_id);
    let store = state.intake.store();
    let receiver = receiver_named(q.receiver.as_deref())?;
    let jobs = match receiver {
        Receiver::Ehr => vec![JobId::ehr(key.clone())],
        _ => {
            let mut jobs = store
                .dead_letter_jobs(&receiver, Some(&mapping_id))
                .map_err(IntakeError::Store)?;
            jobs.retain(|j| j.key == key);
            jobs
        }
    };
    let mut requeued = Requeued::Unknown;
    for job in &jobs {
        requeued = store
            .requeue(job, &now())
            .await
            .map_err(IntakeError::Store)?;
    }
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
struct BulkReplayQuery {
    mapping: Option<String>,
    limit: Option<usize>,
    receiver: Option<String>,
}

/// How many dead letters one bulk replay takes at most (10,000 by default too).
const BULK_REPLAY_MAX: usize = 10_000;

/// `POST /dead-letters/replay[?mapping=ID][&limit=N]`: every dead letter (of one mapping),
/// earliest first, back in the outbox — what an operator does once the cause the EHR named is
/// fixed. `202` with the keys replayed, those whose Bundle is past its retention (nothing to
/// send) and how many dead letters are left (beyond `limit`, or dead-lettered meanwhile).
async fn replay_dead_letters(
    State(state): State<Arc<AppState>>,
    Query(q): Query<BulkReplayQuery>,
) -> Result<Response, ApiError> {
    let store = state.intake.store();
    known_mapping(&state, q.mapping.as_deref())?;
    let receiver = receiver_named(q.receiver.as_deref())?;
    let limit = q.limit.unwrap_or(BULK_REPLAY_MAX).min(BULK_REPLAY_MAX);
    let mut jobs = store
        .dead_letter_jobs(&receiver, q.mapping.as_deref())
        .map_err(IntakeError::Store)?;
    jobs.truncate(limit);
    // All at once: the writer takes them in a few rounds.
    let at = now();
    let mut requeues = tokio::task::JoinSet::new();
    for job in jobs {
        let (store, at) = (Arc::clone(store), at.clone());
        requeues.spawn(async move {
            let requeued = store.requeue(&job, &at).await;
            (job.to_string(), requeued)
        });
    }
    let (mut replayed, mut expired) = (Vec::new(), Vec::new());
    let mut failed = None;
    while let Some(done) = requeues.join_next().await {
        match done {
            Ok((key, Ok(Requeued::Waiting(_)))) => replayed.push(key),
            Ok((key, Ok(Requeued::Expired))) => expired.push(key),
            // Gone since it was listed: nothing to do.
            Ok((_, Ok(Requeued::Unknown))) => {}
            Ok((_, Err(e))) => failed = Some(e.to_string()),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    if !replayed.is_empty() {
        state.outbox.notify_one();
    }
    // What was requeued stays requeued; the caller learns the rest did not go and can ask again.
    if let Some(e) = failed {
        return Err(ApiError::Internal(e));
    }
    replayed.sort();
    expired.sort();
    tracing::info!(
        replayed = replayed.len(),
        expired = expired.len(),
        "dead letters replayed"
    );
    let left = store
        .dead_letter_jobs(&receiver, q.mapping.as_deref())
        .map_err(IntakeError::Store)?
        .len();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"replayed": replayed, "expired": expired, "left": left})),
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

/// A FHIR resource as the answer, with FHIR's media type.
fn fhir_json(resource: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        resource.to_string(),
    )
        .into_response()
}

/// `GET /metadata`: what the gateway serves as a FHIR server (its Questionnaires; responses to
/// them, and `$extract`).
async fn metadata(State(state): State<Arc<AppState>>) -> Response {
    fhir_json(&crate::fhir::capability::capability_statement(
        "chartbridge",
        env!("CARGO_PKG_VERSION"),
        &state.started,
        &[
            crate::fhir::capability::Served {
                resource_type: "Questionnaire",
                interactions: &["read"],
                search: &[("url", "uri")],
                operations: &[],
            },
            crate::fhir::capability::Served {
                resource_type: "QuestionnaireResponse",
                interactions: &["create"],
                search: &[],
                operations: &[(
                    "extract",
                    "http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract",
                )],
            },
        ],
    ))
}

#[derive(Deserialize)]
struct QuestionnaireQuery {
    url: Option<String>,
}

/// `GET /Questionnaire[?url=<canonical>[|<version>]]`: the mappings' Questionnaires (those
/// with that canonical URL — and version, as a QuestionnaireResponse names it), as a searchset
/// Bundle, by id.
async fn questionnaires(
    State(state): State<Arc<AppState>>,
    Query(q): Query<QuestionnaireQuery>,
) -> Response {
    let mut found: Vec<Value> = match q.url.as_deref() {
        Some(canonical) => state
            .intake
            .defining(canonical)
            .map(|m| m.questionnaire())
            .collect(),
        None => state.intake.mappings().map(|m| m.questionnaire()).collect(),
    };
    found.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    fhir_json(&crate::fhir::bundle::searchset(found))
}

/// `GET /Questionnaire/{id}`: the Questionnaire a mapping defines.
async fn questionnaire(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state
        .intake
        .mappings()
        .map(|m| m.questionnaire())
        .find(|q| q["id"].as_str() == Some(id.as_str()))
        .map(|q| fhir_json(&q))
        .ok_or_else(|| ApiError::NotFound(format!("no Questionnaire {id}")))
}

/// `POST /QuestionnaireResponse/$extract`: the Observations a QuestionnaireResponse's
/// Questionnaire marks for SDC observation-based extraction, as a transaction Bundle (the
/// caller posts it; nothing is stored or delivered here). The body is the QuestionnaireResponse,
/// or `Parameters` with `questionnaire-response` and, for a Questionnaire this gateway does not
/// define, `questionnaire`. The answer is the Bundle, or — with warnings — `Parameters` with
/// `return` and `issues`.
async fn extract(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let limits = &state.config.limits;
    let raw = to_bytes(body, limits.max_body_bytes)
        .await
        .map_err(|_| ApiError::TooLarge(limits.max_body_bytes))?;
    let input = crate::mapping::select::Projection::all().parse(&raw, limits.max_json_depth)?;
    let (response, inline) = match input.get("resourceType").and_then(Value::as_str) {
        Some("Parameters") => (
            parameter(&input, "questionnaire-response"),
            parameter(&input, "questionnaire"),
        ),
        _ => (Some(&input), None),
    };
    let Some(response) = response else {
        return Err(ApiError::Unprocessable(
            "the Parameters have no `questionnaire-response` resource".into(),
        ));
    };
    let defined;
    let questionnaire = match inline {
        Some(q) => q,
        None => {
            defined = defining(
                &state,
                response,
                "send it as the `questionnaire` parameter",
                ApiError::Unprocessable,
            )?
            .questionnaire();
            &defined
        }
    };
    let extraction = crate::mapping::extract::extract(questionnaire, response, &now())?;
    if extraction.issues.is_empty() {
        return Ok(fhir_json(&extraction.bundle));
    }
    let issues = crate::fhir::OperationOutcome::new(extraction.issues).to_json();
    Ok(fhir_json(&json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "return", "resource": extraction.bundle},
            {"name": "issues", "resource": issues},
        ],
    })))
}

/// The one mapping whose Questionnaire `response` answers (its `questionnaire` canonical);
/// `hint` says what to do when there is none.
fn defining(
    state: &AppState,
    response: &Value,
    hint: &str,
    unknown: fn(String) -> ApiError,
) -> Result<Arc<crate::mapping::Mapping>, ApiError> {
    let canonical = response.get("questionnaire").and_then(Value::as_str);
    let mut found: Vec<_> = canonical
        .map(|c| state.intake.defining(c).cloned().collect())
        .unwrap_or_default();
    match (found.pop(), found.is_empty()) {
        (Some(mapping), true) => Ok(mapping),
        (Some(_), false) => Err(ApiError::Unprocessable(format!(
            "several versions of the Questionnaire `{}` are defined here: name one \
             (`url|version`)",
            canonical.unwrap_or_default()
        ))),
        (None, _) if canonical.is_some() => Err(unknown(format!(
            "the Questionnaire `{}` is not one this gateway defines (no mapping loaded defines it): {hint}",
            canonical.unwrap_or_default()
        ))),
        (None, _) => Err(ApiError::Unprocessable(format!(
            "the QuestionnaireResponse names no Questionnaire (`questionnaire`): {hint}"
        ))),
    }
}

/// The resource of a `Parameters` parameter.
fn parameter<'v>(parameters: &'v Value, name: &str) -> Option<&'v Value> {
    parameters
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("resource")
}

#[derive(Deserialize)]
struct SubmissionsQuery {
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
async fn submissions(
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
            let mut records = Vec::new();
            for key in store
                .by_patient(system, value)
                .map_err(IntakeError::Store)?
            {
                records.extend(store.get(&key).map_err(IntakeError::Store)?);
            }
            records.retain(|r| mapping.is_none_or(|m| r.mapping_id == m));
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
struct ProvenanceQuery {
    target: String,
}

async fn provenance(
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

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ehr = match &state.ehr {
        None => "not configured: submissions are accepted and held in the outbox".to_string(),
        Some(c) if c.reachable().await => "reachable".to_string(),
        Some(_) => "unreachable".to_string(),
    };
    let mappings = state.intake.mapping_count();
    let ok = mappings > 0 && ehr != "unreachable";
    let mut body = json!({
        "ready": ok,
        "store": "open",
        "mappings": mappings,
        "outbox_depth": state.intake.store().outbox_depth(&Receiver::Ehr),
        "ehr": ehr,
    });
    let unsigned = state
        .config
        .unsigned(state.intake.mappings().map(|m| m.id.as_str()));
    if !unsigned.is_empty() {
        body["unsigned_ingest"] = json!(unsigned);
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let store = state.intake.store();
    let c = store.stats();
    let figures = crate::metrics::StoreFigures {
        commits: c.commits,
        rounds: c.rounds,
        flush_seconds: c.flush_micros as f64 / 1e6,
        sync_seconds: c.sync_micros as f64 / 1e6,
    };
    let text = state.metrics.render(
        store.outbox_depth(&Receiver::Ehr),
        store.dead_letter_count(&Receiver::Ehr),
        &figures,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The bare baseline of the load benchmark: reads the body and answers, nothing else.
async fn echo(body: Body) -> Response {
    match to_bytes(body, 1024 * 1024).await {
        Ok(b) => (StatusCode::ACCEPTED, Json(json!({"bytes": b.len()}))).into_response(),
        Err(_) => ApiError::TooLarge(1024 * 1024).into_response(),
    }
}
