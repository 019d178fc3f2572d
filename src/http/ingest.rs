//! Submissions in: `POST /submissions/{mapping_id}` (a vendor's payload, a form body, or a
//! notification whose submission is fetched) and `POST /QuestionnaireResponse` (a FHIR-native
//! form's response). Each is authenticated, bounded, parsed, checked against `accept_when` and
//! the outbox's room, and handed to `intake`; what came of it is counted and answered.

use std::sync::Arc;

use axum::body::{to_bytes, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::fhir::defining;
use super::{auth, form, now, ApiError, AppState};
use crate::intake::IntakeError;
use crate::metrics::Outcome;
use crate::store::{Receiver, Store};

pub(super) async fn submit(
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
pub(super) enum Taken {
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
pub(super) async fn submit_response(
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
