//! Events in: `POST /events/{sender}` — the EHR's subscription notifications (`ehr`, with the
//! credentials of `[ehr.events]`), or another sender's (`[events.<name>]`) — and, for operators,
//! `GET /events/unmatched`, the events that resolved to no submission.
//!
//! A notification is authenticated, bounded, read (`workflow::notification`) and handed to the
//! `Inbox`; the answer lists what came of each event (references only). A sender posting what
//! it does not own is answered 403, and nothing of its notification is taken.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{auth, ApiError, AppState};
use crate::config::EventsAuth;
use crate::inbound::InboxError;
use crate::store::Store;

pub(super) async fn receive(
    State(state): State<Arc<AppState>>,
    Path(sender): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(credentials) = credentials(&state, &sender) else {
        return Err(ApiError::NotFound(format!(
            "no events sender `{sender}`: the EHR posts to /events/ehr once [ehr.events] is configured; other senders need an [events.{sender}] entry"
        )));
    };
    let limits = &state.config.limits;
    let raw = to_bytes(body, limits.max_body_bytes)
        .await
        .map_err(|_| ApiError::TooLarge(limits.max_body_bytes))?;
    if let Err(why) = auth::verify_events(credentials, &headers, &raw) {
        state.metrics.count_inbound(&sender, "unauthorized");
        return Err(ApiError::Unauthorized(format!(
            "events from `{sender}`: {why}"
        )));
    }
    let body = crate::mapping::select::Projection::all().parse(&raw, limits.max_json_depth)?;
    let notification = crate::workflow::notification::read(&body).map_err(InboxError::from)?;
    let reports = state.inbox.take(&sender, notification).await?;
    Ok((StatusCode::OK, Json(json!({ "events": reports }))).into_response())
}

/// The credentials `sender` posts with, if it may post at all.
fn credentials<'s>(state: &'s AppState, sender: &str) -> Option<&'s EventsAuth> {
    if sender == "ehr" {
        state
            .config
            .ehr
            .as_ref()
            .and_then(|e| e.events.as_ref())
            .map(|e| &e.auth)
    } else {
        state.config.events.get(sender)
    }
}

#[derive(Deserialize)]
pub(super) struct UnmatchedQuery {
    limit: Option<usize>,
    before: Option<String>,
}

/// `GET /events/unmatched[?limit=N][&before=C]`: the events that resolved to no submission,
/// newest first (100 by default, 1,000 at most), what each was about and why; `next` names
/// the following page.
pub(super) async fn unmatched(
    State(state): State<Arc<AppState>>,
    Query(q): Query<UnmatchedQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.intake.store();
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let (kept, next) = store
        .unmatched(q.before.as_deref(), limit)
        .map_err(|e| match e {
            crate::store::StoreError::Failed(why) => ApiError::BadQuery(why),
            e => ApiError::Internal(e.to_string()),
        })?;
    let mut body = json!({ "total": store.unmatched_count(), "unmatched": kept });
    if let Some(next) = next {
        body["next"] = json!(next);
    }
    Ok(Json(body))
}
