//! What every request goes through: a request id and a log line without bodies or query
//! values (`request_log`), and the time limit on a request's body and answer (`within_time`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::{ApiError, AppState, RequestId};

/// Answers `408` to a request whose body (and answer) take longer than `request_timeout_ms`
/// (the connection then closes): a client trickling its body holds no task for good. Safe
/// mid-write: a write the store was given completes, and the client's retry finds it.
pub(super) async fn within_time(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
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

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// Gives each request an id (echoed as `x-request-id`) and logs method, route, status and time —
/// never bodies or query values.
pub(super) async fn request_log(mut req: Request, next: Next) -> Response {
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
