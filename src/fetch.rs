//! Fetch: the submission of a source that only announces it. Healthie's webhooks name a
//! `FormAnswerGroup` and carry no answers (`{"resource_id": "4718203", "resource_id_type":
//! "FormAnswerGroup", "event_type": "form_answer_group.created"}`); the submission is Healthie's
//! GraphQL answer for that id, which is what the Healthie mapping reads. Other sources are
//! configured generically (`type = "http"`): a JSONPath finds the id in the notification, and
//! the submission is the answer to a GET of a URL template with that id in it, authenticated
//! by a bearer token, HTTP Basic or OAuth 2.0 client credentials (the token cached).
//!
//! This module turns the notification's bytes into that answer's bytes and nothing more: the
//! caller authenticates the notification and maps, stores and answers as for any other
//! submission. It knows nothing of the gateway's own HTTP API or the store.
//!
//! Nothing is stored before the fetch has succeeded, so a failed fetch loses nothing as long as
//! the source sends its notification again: Healthie retries a webhook answered with an error
//! for up to three days (when its retries are turned on for the webhook); the gateway answers
//! `502` with `Retry-After` so that any source knows to.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::config::{FetchAuth, FetchSource};
use crate::mapping::select::Selector;

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
    #[error("the notification does not name a submission to fetch: {0}")]
    Notification(String),
    /// The API answered that there is no such submission (deleted, or another account's).
    #[error("the source's API has no submission {0} for these credentials")]
    NotFound(String),
    /// The API could not be asked or did not answer usably: worth the source's retry.
    #[error("the source's API did not answer the fetch: {0}")]
    Unavailable(String),
}

/// The sources whose submissions are fetched, by mapping id, and the HTTP client they share.
pub struct Fetch {
    sources: HashMap<String, Source>,
    http: reqwest::Client,
    /// OAuth 2.0 tokens by mapping id, with when to stop using them.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// One mapping's fetch, checked at start.
pub struct Source {
    mapping_id: String,
    kind: Kind,
    timeout: Duration,
}

enum Kind {
    Healthie {
        url: String,
        api_key: String,
    },
    Http {
        url: String,
        id: Selector,
        auth: FetchAuth,
    },
}

/// A fetch configuration that cannot work: which mapping's, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("[fetch.{0}]: {1}")]
    Invalid(String, String),
    #[error("the fetch client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Healthie's notification; other members (`event_type`, `changed_fields`, …) are not needed.
#[derive(Deserialize)]
struct Notification {
    resource_id: Value,
    resource_id_type: Option<String>,
}

/// An OAuth 2.0 token endpoint's answer.
#[derive(Deserialize)]
struct Token {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Fetch {
    pub fn new(sources: HashMap<String, FetchSource>) -> Result<Fetch, ConfigError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A submission goes only where it was configured to come from.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let sources = sources
            .into_iter()
            .map(|(mapping_id, s)| {
                let source = Source::checked(&mapping_id, s)?;
                Ok((mapping_id, source))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Fetch {
            sources,
            http,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The fetch configured for a mapping's source, if its submissions are fetched.
    pub fn source(&self, mapping_id: &str) -> Option<&Source> {
        self.sources.get(mapping_id)
    }

    /// The submission a notification announces: the API's answer, at most `max_bytes` long.
    pub async fn submission(
        &self,
        source: &Source,
        notification: &[u8],
        max_bytes: usize,
    ) -> Result<Vec<u8>, FetchError> {
        match &source.kind {
            Kind::Healthie { url, api_key } => {
                self.healthie(source, url, api_key, notification, max_bytes)
                    .await
            }
            Kind::Http { url, id, auth } => {
                let id = id_at(id, notification)?;
                let url = url.replace("{id}", &crate::ids::path_segment(&id));
                let mut refreshed = false;
                loop {
                    let mut request = self.http.get(&url).timeout(source.timeout);
                    request = match auth {
                        FetchAuth::None => request,
                        FetchAuth::Bearer { token } => request.bearer_auth(token),
                        FetchAuth::Basic { username, password } => {
                            request.basic_auth(username, Some(password))
                        }
                        FetchAuth::Oauth2ClientCredentials { .. } => {
                            request.bearer_auth(self.token(source, auth).await?)
                        }
                    };
                    let response = request.send().await.map_err(unavailable)?;
                    let status = response.status();
                    // An expired or revoked token: one new one, then the answer stands.
                    if status == reqwest::StatusCode::UNAUTHORIZED
                        && matches!(auth, FetchAuth::Oauth2ClientCredentials { .. })
                        && !refreshed
                    {
                        self.tokens.lock().await.remove(&source.mapping_id);
                        refreshed = true;
                        continue;
                    }
                    if status == reqwest::StatusCode::NOT_FOUND
                        || status == reqwest::StatusCode::GONE
                    {
                        return Err(FetchError::NotFound(id));
                    }
                    if !status.is_success() {
                        return Err(FetchError::Unavailable(format!("HTTP {}", status.as_u16())));
                    }
                    let body = limited(response, max_bytes).await?;
                    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(|e| {
                        FetchError::Unavailable(format!("its answer is not JSON ({e})"))
                    })?;
                    return Ok(body);
                }
            }
        }
    }

    /// Healthie: the FormAnswerGroup the notification names, from the GraphQL API.
    async fn healthie(
        &self,
        source: &Source,
        url: &str,
        api_key: &str,
        notification: &[u8],
        max_bytes: usize,
    ) -> Result<Vec<u8>, FetchError> {
        let id = form_answer_group(notification)?;
        let query = json!({
            "operationName": "getFormAnswerGroup",
            "query": HEALTHIE_FORM_ANSWER_GROUP,
            "variables": { "id": id },
        });
        let response = self
            .http
            .post(url)
            .timeout(source.timeout)
            // Healthie's API keys go as `Basic <key>`, with `AuthorizationSource: API`.
            .header(reqwest::header::AUTHORIZATION, format!("Basic {api_key}"))
            .header("AuthorizationSource", "API")
            .json(&query)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Unavailable(format!("HTTP {}", status.as_u16())));
        }
        let body = limited(response, max_bytes).await?;
        answered(&body, &id)?;
        Ok(body)
    }

    /// An OAuth 2.0 access token for `source`: the cached one, or a new one from the token
    /// endpoint (client credentials, the client authenticated with HTTP Basic).
    async fn token(&self, source: &Source, auth: &FetchAuth) -> Result<String, FetchError> {
        let FetchAuth::Oauth2ClientCredentials {
            token_url,
            client_id,
            client_secret,
            scope,
        } = auth
        else {
            return Err(FetchError::Unavailable("no OAuth 2.0 configuration".into()));
        };
        let mut tokens = self.tokens.lock().await;
        if let Some((token, until)) = tokens.get(&source.mapping_id) {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = scope {
            form.push(("scope", scope.as_str()));
        }
        let response = self
            .http
            .post(token_url)
            .timeout(source.timeout)
            .basic_auth(client_id, Some(client_secret))
            .form(&form)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Unavailable(format!(
                "its token endpoint answered HTTP {}",
                status.as_u16()
            )));
        }
        let token: Token = response.json().await.map_err(|_| {
            FetchError::Unavailable("its token endpoint's answer has no access_token".into())
        })?;
        // Used until 30 s before it expires (an hour when the endpoint does not say; a day at
        // most, whatever it says).
        let life = token.expires_in.unwrap_or(3_600).clamp(0, 86_400);
        let until = Instant::now() + Duration::from_secs(life.saturating_sub(30));
        tokens.insert(
            source.mapping_id.clone(),
            (token.access_token.clone(), until),
        );
        Ok(token.access_token)
    }
}

impl Source {
    fn checked(mapping_id: &str, s: FetchSource) -> Result<Source, ConfigError> {
        let invalid = |why: String| ConfigError::Invalid(mapping_id.to_string(), why);
        let web = |url: &str| url.starts_with("https://") || url.starts_with("http://");
        let (kind, timeout_ms) = match s {
            FetchSource::HealthieGraphql {
                url,
                api_key,
                timeout_ms,
            } => (Kind::Healthie { url, api_key }, timeout_ms),
            FetchSource::Http {
                url,
                id,
                auth,
                timeout_ms,
            } => {
                if !web(&url) || !url.contains("{id}") {
                    return Err(invalid(format!(
                        "`url` must be an http(s) URL with `{{id}}` where the notification's id goes (got `{url}`)"
                    )));
                }
                if let FetchAuth::Oauth2ClientCredentials { token_url, .. } = &auth {
                    if !web(token_url) {
                        return Err(invalid("`auth.token_url` must be an http(s) URL".into()));
                    }
                }
                let id = Selector::compile(&id)
                    .map_err(|e| invalid(format!("`id` is not a JSONPath: {e}")))?;
                (Kind::Http { url, id, auth }, timeout_ms)
            }
        };
        Ok(Source {
            mapping_id: mapping_id.to_string(),
            kind,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

fn unavailable(e: reqwest::Error) -> FetchError {
    FetchError::Unavailable(e.without_url().to_string())
}

/// An answer's body, refused past `max_bytes`.
async fn limited(mut response: reqwest::Response, max_bytes: usize) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
        if body.len() + chunk.len() > max_bytes {
            return Err(FetchError::Unavailable(format!(
                "its answer is larger than {max_bytes} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The id a notification names at `path`: a string or a number, usable as an id.
fn id_at(path: &Selector, notification: &[u8]) -> Result<String, FetchError> {
    let n: Value = serde_json::from_slice(notification)
        .map_err(|e| FetchError::Notification(format!("it is not JSON ({e})")))?;
    let id = match path.first(&n) {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(FetchError::Notification(format!(
                "`{}` is not a string or a number",
                path.source()
            )))
        }
        None => {
            return Err(FetchError::Notification(format!(
                "nothing at `{}`",
                path.source()
            )))
        }
    };
    crate::ids::check(&id)
        .map_err(|p| FetchError::Notification(format!("the id at `{}` {p}", path.source())))?;
    Ok(id)
}

/// The FormAnswerGroup id a notification names (a string or a number in the JSON).
fn form_answer_group(notification: &[u8]) -> Result<String, FetchError> {
    let n: Notification = serde_json::from_slice(notification)
        .map_err(|e| FetchError::Notification(e.to_string()))?;
    match n.resource_id_type.as_deref() {
        Some("FormAnswerGroup") => {}
        Some(other) => {
            return Err(FetchError::Notification(format!(
            "resource_id_type is `{other}`; only Healthie's FormAnswerGroup notifications carry a submission"
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
                "its answer is not Healthie's FormAnswerGroup {id}"
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
                Err(FetchError::Unavailable(m)) if m.contains("not Healthie's FormAnswerGroup 1")
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
