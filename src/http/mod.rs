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
//! - `POST /events/{sender}` — what happened in the EHR (`ehr`: Subscription notifications,
//!   a bare resource) or at another sender → events for the CRM and the portal
//! - `GET  /events/unmatched` — events that resolved to no submission (operators)
//! - `GET  /health`, `GET /ready`, `GET /metrics`
//!
//! Rooms: `ingest` (submissions in), `events` (events in), `operators` (status, listings,
//! replays, audit), `fhir`
//! (Questionnaires, metadata, `$extract`), `health`, `middleware`; `auth` checks sources' and
//! operators' credentials, `form` reads form bodies, `error` answers every error.

pub mod auth;
pub mod error;
mod events;
mod fhir;
pub mod form;
mod health;
mod ingest;
mod middleware;
mod operators;

use std::sync::Arc;
use std::time::Instant;

use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Notify;

use crate::config::Config;
use crate::delivery::client::EhrClient;
use crate::fetch::Fetch;
use crate::intake::Intake;
use crate::metrics::Metrics;
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
    /// Where events from the EHR and other senders go in.
    pub inbox: Arc<crate::inbound::Inbox>,
}

/// Refused operators' attempts recorded one by one: 10 a second, bursts of 100.
pub fn refusal_budget() -> auth::RefusalBudget {
    auth::RefusalBudget::new(10.0, 100.0, Instant::now())
}

pub fn router(state: Arc<AppState>) -> Router {
    // What operators use: behind the admin key when one is configured.
    let operators = Router::new()
        .route("/submissions", get(operators::submissions))
        .route(
            "/submissions/{mapping_id}/{submission_id}",
            get(operators::status),
        )
        .route(
            "/submissions/{mapping_id}/{submission_id}/replay",
            post(operators::replay),
        )
        .route("/dead-letters/replay", post(operators::replay_dead_letters))
        .route("/provenance", get(operators::provenance))
        .route("/audit", get(operators::audit))
        .route("/events/unmatched", get(events::unmatched))
        .route_layer(from_fn_with_state(
            Arc::clone(&state),
            operators::operators_only,
        ));
    let routes = Router::new()
        .route("/submissions/{mapping_id}", post(ingest::submit))
        .route("/events/{sender}", post(events::receive))
        .merge(operators)
        .route("/metadata", get(fhir::metadata))
        .route("/Questionnaire", get(fhir::questionnaires))
        .route("/Questionnaire/{id}", get(fhir::questionnaire))
        .route("/QuestionnaireResponse", post(ingest::submit_response))
        .route("/QuestionnaireResponse/$extract", post(fhir::extract))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics));
    let routes = if state.config.echo_route {
        routes.route("/echo", post(health::echo))
    } else {
        routes
    };
    routes
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(from_fn_with_state(
            Arc::clone(&state),
            middleware::within_time,
        ))
        .layer(axum::middleware::from_fn(middleware::request_log))
        .with_state(state)
}

/// The address a connection came from, as the listener saw it (axum's `ConnectInfo`; the
/// server's listener hands it over with each connection).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// The request's id (`request_log` gives it), for whatever records the request.
#[derive(Clone)]
pub(crate) struct RequestId(String);

fn now() -> String {
    crate::delivery::outbox::now()
}
