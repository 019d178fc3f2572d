//! Liveness, readiness (the store's real state, the mappings, the EHR's reachability) and the
//! Prometheus metrics; and the bare echo route the load bench measures the gateway against.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{ApiError, AppState};
use crate::store::{Health, Receiver, Store};

/// `GET /ready`: whether the gateway can take submissions now — its store writing (the writer
/// alive, its last round durable), mappings loaded, the EHR reachable if one is configured —
/// and what it holds (`503` when not).
pub(super) async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ehr = match &state.ehr {
        None => "not configured: submissions are accepted and held in the outbox".to_string(),
        Some(c) if c.reachable().await => "reachable".to_string(),
        Some(_) => "unreachable".to_string(),
    };
    let mappings = state.intake.mapping_count();
    let (writing, store) = match state.intake.store().health() {
        Health::Writing => (true, "writing".to_string()),
        Health::Failing(why) => (false, format!("failing: {why}")),
        Health::Stopped(why) => (false, format!("stopped: {why}")),
    };
    let ok = writing && mappings > 0 && ehr != "unreachable";
    let mut body = json!({
        "ready": ok,
        "store": store,
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
    let store = state.intake.store();
    for receiver in state.inbox.workflow.receivers() {
        body["receivers"][receiver.name()] = json!({
            "waiting": store.outbox_depth(receiver),
            "dead_lettered": store.dead_letter_count(receiver),
        });
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
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
        &crate::metrics::EventFigures {
            receivers: state
                .inbox
                .workflow
                .receivers()
                .iter()
                .map(|r| {
                    (
                        r.name().to_string(),
                        store.outbox_depth(r),
                        store.dead_letter_count(r),
                    )
                })
                .collect(),
            unmatched: store.unmatched_count(),
        },
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The bare baseline of the load benchmark: reads the body and answers, nothing else.
pub(super) async fn echo(body: Body) -> Response {
    match to_bytes(body, 1024 * 1024).await {
        Ok(b) => (StatusCode::ACCEPTED, Json(json!({"bytes": b.len()}))).into_response(),
        Err(_) => ApiError::TooLarge(1024 * 1024).into_response(),
    }
}
