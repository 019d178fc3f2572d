//! The gateway as a FHIR server: the Questionnaire each mapping defines (what its responses
//! point at), the CapabilityStatement saying so, and SDC `$extract`.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{now, ApiError, AppState};

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
pub(super) async fn metadata(State(state): State<Arc<AppState>>) -> Response {
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
pub(super) struct QuestionnaireQuery {
    url: Option<String>,
}

/// `GET /Questionnaire[?url=<canonical>[|<version>]]`: the mappings' Questionnaires (those
/// with that canonical URL — and version, as a QuestionnaireResponse names it), as a searchset
/// Bundle, by id.
pub(super) async fn questionnaires(
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
pub(super) async fn questionnaire(
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
pub(super) async fn extract(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
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
pub(super) fn defining(
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
