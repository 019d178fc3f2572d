//! Fetch: the submission of a source that only announces it. Healthie's webhooks name a
//! `FormAnswerGroup` and carry no answers (`{"resource_id": "4718203", "resource_id_type":
//! "FormAnswerGroup", "event_type": "form_answer_group.created"}`); the submission is Healthie's
//! GraphQL answer for that id, which is what the Healthie mapping reads. This module turns the
//! notification's bytes into that answer's bytes and nothing more: the caller authenticates the
//! notification and maps, stores and answers as for any other submission. It knows nothing of
//! the gateway's own HTTP API, the store or the mappings.
//!
//! Nothing is stored before the fetch has succeeded, so a failed fetch loses nothing as long as
//! the source sends its notification again: Healthie retries a webhook answered with an error
//! for up to three days (when its retries are turned on for the webhook).

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::FetchSource;

/// Healthie's `formAnswerGroup` query: the fields the Healthie mapping reads, and the ones a
/// reviewer needs to recognise the form.
pub const HEALTHIE_FORM_ANSWER_GROUP: &str = "query getFormAnswerGroup($id: ID) {
  formAnswerGroup(id: $id) {
    id
    name
    created_at
    finished
    user { id }
    custom_module_form { id name }
    form_answers {
      id
      label
      answer
      displayed_answer
      custom_module_id
      custom_module { id mod_type label options_array }
    }
  }
}";

/// Why a notification did not give a submission.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The notification itself is wrong: the source's mistake.
    #[error("not a Healthie FormAnswerGroup notification: {0}")]
    Notification(String),
    /// The API answered that there is no such form (deleted, or another account's).
    #[error("Healthie has no FormAnswerGroup {0} for this API key")]
    NotFound(String),
    /// The API could not be asked or did not answer usably: worth the source's retry.
    #[error("Healthie's API did not answer the FormAnswerGroup query: {0}")]
    Unavailable(String),
}

/// The sources whose submissions are fetched, by mapping id, and the HTTP client they share.
pub struct Fetch {
    sources: HashMap<String, FetchSource>,
    http: reqwest::Client,
}

/// Healthie's notification; other members (`event_type`, `changed_fields`, …) are not needed.
#[derive(Deserialize)]
struct Notification {
    resource_id: Value,
    resource_id_type: Option<String>,
}

impl Fetch {
    pub fn new(sources: HashMap<String, FetchSource>) -> Result<Fetch, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Fetch { sources, http })
    }

    /// The fetch configured for a mapping's source, if its submissions are fetched.
    pub fn source(&self, mapping_id: &str) -> Option<&FetchSource> {
        self.sources.get(mapping_id)
    }

    /// The submission a notification announces: the API's answer, at most `max_bytes` long.
    pub async fn submission(
        &self,
        source: &FetchSource,
        notification: &[u8],
        max_bytes: usize,
    ) -> Result<Vec<u8>, FetchError> {
        let FetchSource::HealthieGraphql {
            url,
            api_key,
            timeout_ms,
        } = source;
        let id = form_answer_group(notification)?;
        let query = json!({
            "operationName": "getFormAnswerGroup",
            "query": HEALTHIE_FORM_ANSWER_GROUP,
            "variables": { "id": id },
        });
        let unavailable = |e: reqwest::Error| FetchError::Unavailable(e.without_url().to_string());
        let mut response = self
            .http
            .post(url)
            .timeout(Duration::from_millis(*timeout_ms))
            // Healthie's API keys go as `Basic <key>`, with `AuthorizationSource: API`.
            .header(reqwest::header::AUTHORIZATION, format!("Basic {api_key}"))
            .header("AuthorizationSource", "API")
            .json(&query)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Unavailable(format!("HTTP {status}")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if body.len() + chunk.len() > max_bytes {
                return Err(FetchError::Unavailable(format!(
                    "its answer is larger than {max_bytes} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        answered(&body, &id)?;
        Ok(body)
    }
}

/// The FormAnswerGroup id a notification names (a string or a number in the JSON).
fn form_answer_group(notification: &[u8]) -> Result<String, FetchError> {
    let n: Notification = serde_json::from_slice(notification)
        .map_err(|e| FetchError::Notification(e.to_string()))?;
    match n.resource_id_type.as_deref() {
        Some("FormAnswerGroup") => {}
        Some(other) => {
            return Err(FetchError::Notification(format!(
            "resource_id_type is `{other}`; only FormAnswerGroup notifications carry a submission"
        )))
        }
        None => return Err(FetchError::Notification("no resource_id_type".into())),
    }
    let id = match n.resource_id {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(FetchError::Notification(
                "resource_id is not a string or a number".into(),
            ))
        }
    };
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(FetchError::Notification(
            "resource_id is not an id (1 to 64 letters and digits)".into(),
        ));
    }
    Ok(id)
}

/// Whether the API's answer holds the form: GraphQL reports errors inside a `200`.
fn answered(body: &[u8], id: &str) -> Result<(), FetchError> {
    let answer: Value = serde_json::from_slice(body)
        .map_err(|e| FetchError::Unavailable(format!("its answer is not JSON ({e})")))?;
    match answer.pointer("/data/formAnswerGroup") {
        // The form asked for, not another one: its id becomes the submission id.
        Some(Value::Object(form)) => match form.get("id") {
            Some(Value::String(s)) if s == id => Ok(()),
            Some(Value::Number(n)) if n.to_string() == id => Ok(()),
            _ => Err(FetchError::Unavailable(format!(
                "its answer is not FormAnswerGroup {id}"
            ))),
        },
        _ => match answer
            .get("errors")
            .and_then(|e| e.get(0)?.get("message")?.as_str())
        {
            // A message names what went wrong (an expired key, a malformed query), never answers.
            Some(message) => Err(FetchError::Unavailable(format!("GraphQL error: {message}"))),
            None => Err(FetchError::NotFound(id.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_names_its_form_answer_group() {
        let ok = |b: &str| form_answer_group(b.as_bytes()).ok();
        assert_eq!(
            ok(
                r#"{"resource_id":"4718203","resource_id_type":"FormAnswerGroup","event_type":"form_answer_group.created","changed_fields":[]}"#
            ),
            Some("4718203".into())
        );
        assert_eq!(
            ok(r#"{"resource_id":4718203,"resource_id_type":"FormAnswerGroup"}"#),
            Some("4718203".into())
        );
        for bad in [
            r#"{"resource_id":"1","resource_id_type":"Appointment"}"#,
            r#"{"resource_id":"1"}"#,
            r#"{"resource_id":"1\" }","resource_id_type":"FormAnswerGroup"}"#,
            r#"{"resource_id":null,"resource_id_type":"FormAnswerGroup"}"#,
            r#"{"resource_id_type":"FormAnswerGroup"}"#,
            "not json",
        ] {
            assert!(
                matches!(
                    form_answer_group(bad.as_bytes()),
                    Err(FetchError::Notification(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn graphql_errors_and_a_null_form_are_told_apart() {
        assert!(answered(br#"{"data":{"formAnswerGroup":{"id":"1"}}}"#, "1").is_ok());
        assert!(answered(br#"{"data":{"formAnswerGroup":{"id":1}}}"#, "1").is_ok());
        for other in [
            &br#"{"data":{"formAnswerGroup":{"id":"2"}}}"#[..],
            br#"{"data":{"formAnswerGroup":{}}}"#,
        ] {
            assert!(matches!(
                answered(other, "1"),
                Err(FetchError::Unavailable(m)) if m.contains("not FormAnswerGroup 1")
            ));
        }
        assert!(matches!(
            answered(br#"{"data":{"formAnswerGroup":null}}"#, "1"),
            Err(FetchError::NotFound(id)) if id == "1"
        ));
        assert!(matches!(
            answered(
                br#"{"data":null,"errors":[{"message":"API Key is Invalid"}]}"#,
                "1"
            ),
            Err(FetchError::Unavailable(m)) if m.contains("API Key is Invalid")
        ));
        assert!(matches!(
            answered(b"<html>", "1"),
            Err(FetchError::Unavailable(_))
        ));
    }
}
