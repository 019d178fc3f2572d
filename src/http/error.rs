//! Every error of the HTTP API, mapped once to a status and a FHIR `OperationOutcome`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::fetch::FetchError;
use crate::fhir::{Issue, OperationOutcome};
use crate::inbound::InboxError;
use crate::intake::IntakeError;
use crate::mapping::extract::ExtractError;
use crate::mapping::PayloadError;
use crate::workflow::notification::NotificationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    /// There was something, and it is no longer kept.
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body is nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("{0}")]
    BadQuery(String),
    #[error("unsupported content type `{0}`: send application/json, multipart/form-data or application/x-www-form-urlencoded")]
    UnsupportedMediaType(String),
    #[error("the form body: {0}")]
    Form(#[from] super::form::FormError),
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// `$extract` input without a QuestionnaireResponse or a Questionnaire it can resolve.
    #[error("{0}")]
    Unprocessable(String),
    #[error(transparent)]
    Extract(#[from] crate::mapping::extract::ExtractError),
    /// An events notification not taken.
    #[error(transparent)]
    Inbox(#[from] crate::inbound::InboxError),
    #[error("the gateway holds {0} deliveries for the EHR, its limit: retry later")]
    Overloaded(usize),
    #[error("the gateway holds {waiting} deliveries of `{mapping}` for the EHR, one mapping's limit (max_outbox_per_mapping): retry later")]
    MappingOverloaded { mapping: String, waiting: usize },
    #[error("the request was not received and answered within {0} ms")]
    TimedOut(u128),
    #[error("internal error")]
    Internal(String),
    /// An operator's access that the audit trail could not record (the store failed).
    #[error("the access could not be recorded in the audit trail")]
    Unaudited(String),
}

impl From<PayloadError> for ApiError {
    fn from(e: PayloadError) -> Self {
        match e {
            PayloadError::TooDeep(depth) => ApiError::TooDeep(depth),
            PayloadError::NotJson { what, line, column } => {
                ApiError::NotJson(format!("line {line}, column {column}: {what}"))
            }
        }
    }
}

/// What `Retry-After` says to a source refused because the outbox is full (seconds).
pub const OVERLOADED_RETRY_AFTER: &str = "30";

impl ApiError {
    /// What the error makes of a submission, for the metrics.
    pub fn submission_outcome(&self) -> crate::metrics::Outcome {
        use crate::metrics::Outcome;
        match self {
            ApiError::Unauthorized(_) => Outcome::Unauthorized,
            ApiError::Fetch(_) => Outcome::Unfetched,
            ApiError::Overloaded(_) | ApiError::MappingOverloaded { .. } => Outcome::Rejected,
            e if e.status().is_server_error() => Outcome::Failed,
            _ => Outcome::Rejected,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooDeep(_)
            | ApiError::NotJson(_)
            | ApiError::Form(_)
            | ApiError::BadQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Intake(IntakeError::UnknownMapping(_)) => StatusCode::NOT_FOUND,
            ApiError::Intake(IntakeError::Invalid(_) | IntakeError::Response(_))
            | ApiError::Unprocessable(_)
            | ApiError::Extract(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Intake(IntakeError::Revision { .. }) => StatusCode::CONFLICT,
            ApiError::Overloaded(_)
            | ApiError::MappingOverloaded { .. }
            | ApiError::Unaudited(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Fetch(FetchError::Notification(_) | FetchError::NotFound(_)) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            // The source's retry is what fetches it again later: nothing was stored.
            ApiError::Fetch(FetchError::Unavailable(_)) => StatusCode::BAD_GATEWAY,
            ApiError::Intake(IntakeError::Store(_) | IntakeError::Amend(_))
            | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Inbox(e) => match e {
                InboxError::Notification(NotificationError::TooMany(_)) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                InboxError::Notification(_) => StatusCode::UNPROCESSABLE_ENTITY,
                InboxError::NotOwner(_) => StatusCode::FORBIDDEN,
                // The sender's retry is what reads it again later: nothing was taken.
                InboxError::Unreadable { .. } => StatusCode::BAD_GATEWAY,
                InboxError::NoEhr(_) => StatusCode::SERVICE_UNAVAILABLE,
                InboxError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    pub fn outcome(&self) -> OperationOutcome {
        let issue = |code, text: String| OperationOutcome::new(vec![Issue::error(code, text)]);
        match self {
            ApiError::Intake(IntakeError::Invalid(f)) => f.outcome(),
            // Every way the response does not fit its form, each at its FHIRPath.
            ApiError::Extract(ExtractError::Unfit(issues))
            | ApiError::Intake(IntakeError::Response(ExtractError::Unfit(issues))) => {
                OperationOutcome::new(issues.clone())
            }
            ApiError::NotFound(_) | ApiError::Intake(IntakeError::UnknownMapping(_)) => {
                issue("not-found", self.to_string())
            }
            ApiError::Gone(_) => issue("deleted", self.to_string()),
            ApiError::BadQuery(_)
            | ApiError::Unprocessable(_)
            | ApiError::Extract(_)
            | ApiError::Intake(IntakeError::Response(_)) => issue("invalid", self.to_string()),
            ApiError::Unauthorized(_) => issue("security", self.to_string()),
            ApiError::Overloaded(_) | ApiError::MappingOverloaded { .. } => {
                issue("throttled", self.to_string())
            }
            ApiError::Unaudited(_) => issue("transient", self.to_string()),
            ApiError::TimedOut(_) => issue("timeout", self.to_string()),
            ApiError::Fetch(FetchError::Notification(_)) => issue("structure", self.to_string()),
            ApiError::Fetch(FetchError::NotFound(_)) => issue("not-found", self.to_string()),
            ApiError::Fetch(FetchError::Unavailable(_)) => issue("transient", self.to_string()),
            ApiError::TooLarge(_) => issue("too-costly", self.to_string()),
            ApiError::TooDeep(_)
            | ApiError::NotJson(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::Form(_) => issue("structure", self.to_string()),
            ApiError::Intake(IntakeError::Revision { .. }) => issue("conflict", self.to_string()),
            ApiError::Inbox(e) => match e {
                InboxError::Notification(NotificationError::TooMany(_)) => {
                    issue("too-costly", self.to_string())
                }
                InboxError::Notification(_) => issue("structure", self.to_string()),
                InboxError::NotOwner(_) => issue("forbidden", self.to_string()),
                InboxError::Unreadable { .. } => issue("transient", self.to_string()),
                InboxError::NoEhr(_) => issue("not-supported", self.to_string()),
                InboxError::Store(_) => issue(
                    "exception",
                    "the gateway could not store the event; send it again".into(),
                ),
            },
            ApiError::Intake(IntakeError::Store(_) | IntakeError::Amend(_))
            | ApiError::Internal(_) => issue(
                "exception",
                "the gateway could not store the submission; retry later".into(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Intake(IntakeError::Store(e)) | ApiError::Inbox(InboxError::Store(e)) => {
                tracing::error!(error = %e, "store failure")
            }
            ApiError::Internal(e) => tracing::error!(error = %e, "internal error"),
            ApiError::Unaudited(e) => tracing::error!(error = %e, "audit trail: not recorded"),
            _ => tracing::info!(
                status = status.as_u16(),
                "request refused: {}",
                self.outcome().issues.first().map(|i| i.code).unwrap_or("")
            ),
        }
        let body = self.outcome().to_json().to_string();
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            body,
        )
            .into_response();
        if matches!(
            self,
            ApiError::Overloaded(_)
                | ApiError::MappingOverloaded { .. }
                | ApiError::Fetch(FetchError::Unavailable(_))
                | ApiError::Inbox(InboxError::Unreadable { .. } | InboxError::NoEhr(_))
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(OVERLOADED_RETRY_AFTER),
            );
        }
        response
    }
}
