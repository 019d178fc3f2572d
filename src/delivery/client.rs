//! The EHR's FHIR API as the outbox sees it: POST a transaction Bundle, get an `Attempt`.

use std::time::Duration;

use serde_json::Value;

use super::auth::{TokenError, TokenSource};
use super::{classify, located, wait_asked, Attempt, Failure};
use crate::config::{DeliveryMode, EhrAuth, EhrConfig};
use crate::store::EhrResource;

pub struct EhrClient {
    http: reqwest::Client,
    base_url: String,
    /// `base_url` parsed once: where every transaction is posted.
    transaction_url: reqwest::Url,
    auth: Auth,
    mode: DeliveryMode,
    /// Transaction mode: the most entries one transaction may hold (`None`: any number).
    max_entries: Option<usize>,
}

enum Auth {
    None,
    Bearer(String),
    Smart(Box<TokenSource>),
}

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the EHR's base URL {url:?} is not a URL: {source}")]
    BaseUrl {
        url: String,
        source: url::ParseError,
    },
}

impl EhrClient {
    pub fn new(config: &EhrConfig) -> Result<EhrClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            // A Bundle (PHI) or a client assertion goes where it is configured to, never where
            // an answer points (`post` says what a redirect named).
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let auth = match &config.auth {
            EhrAuth::None => Auth::None,
            EhrAuth::Bearer { token } => Auth::Bearer(token.clone()),
            EhrAuth::SmartBackend(smart) => {
                Auth::Smart(Box::new(TokenSource::new(smart, http.clone())?))
            }
        };
        let base_url = config.base_url.trim_end_matches('/').to_string();
        let transaction_url =
            reqwest::Url::parse(&base_url).map_err(|source| ClientError::BaseUrl {
                url: base_url.clone(),
                source,
            })?;
        Ok(EhrClient {
            http,
            base_url,
            transaction_url,
            auth,
            mode: config.mode,
            max_entries: config
                .max_transaction_entries
                .map(std::num::NonZeroUsize::get),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, TokenError> {
        Ok(match &self.auth {
            Auth::None => req,
            Auth::Bearer(token) => req.bearer_auth(token),
            Auth::Smart(tokens) => req.bearer_auth(tokens.token().await?),
        })
    }

    /// Delivers a `transaction` Bundle as configured (one transaction, or resource by resource)
    /// and says what came of it. With SMART auth, a 401 drops the cached token and the delivery
    /// is made once more with a new one.
    pub async fn deliver(&self, bundle: Vec<u8>) -> Attempt {
        // Shared, not copied, by the attempt made again after a 401.
        let bundle = bytes::Bytes::from(bundle);
        let first = self.deliver_once(&bundle).await;
        match (&first, &self.auth) {
            // Whichever request of the delivery it was (an entry's, a part's).
            (
                Attempt::Reject(Failure {
                    status: Some(401), ..
                }),
                Auth::Smart(tokens),
            ) => {
                tokens.invalidate().await;
                self.deliver_once(&bundle).await
            }
            _ => first,
        }
    }

    async fn deliver_once(&self, bundle: &bytes::Bytes) -> Attempt {
        match (self.mode, self.max_entries) {
            (DeliveryMode::Transaction, None) => {
                let attempt = self.transaction(bundle.clone()).await;
                match attempt {
                    // Medplum's words for its limit (8 entries when any is conditional).
                    Attempt::Reject(failure)
                        if failure
                            .ehr_text
                            .as_deref()
                            .is_some_and(|t| t.contains("too many entries")) =>
                    {
                        Attempt::Reject(failure.hinting(
                            "if the EHR limits how many entries a transaction holds, set \
                             `[ehr] max_transaction_entries` (hosted Medplum: 8) and replay",
                        ))
                    }
                    other => other,
                }
            }
            (DeliveryMode::Transaction, Some(max)) => match serde_json::from_slice(bundle) {
                Ok(parsed) => self.in_parts(bundle, &parsed, max).await,
                Err(_) => not_json(),
            },
            (DeliveryMode::PerResource, _) => match serde_json::from_slice(bundle) {
                Ok(parsed) => self.per_resource(&parsed).await,
                Err(_) => not_json(),
            },
        }
    }

    /// POSTs one transaction Bundle; what came of it.
    async fn transaction(&self, bundle: bytes::Bytes) -> Attempt {
        let url = self.transaction_url.clone();
        match self.send(reqwest::Method::POST, url, bundle, None).await {
            Ok(answer) => classify(answer.status, answer.wait, &answer.body),
            Err(attempt) => attempt,
        }
    }

    /// The Bundle as consecutive transactions of at most `max` entries (`transaction_parts`),
    /// in its order — dependency order —, each part's references to entries of the parts
    /// before rewritten to the ids the EHR gave them. Each part is atomic; a failure stops the
    /// walk, and the delivery made again matches what the parts before stored (their entries
    /// are conditional), duplicating nothing.
    /// `bundle` is the Bundle as stored, `parsed` the same read: one part goes as it is.
    async fn in_parts(&self, bundle: &bytes::Bytes, parsed: &Value, max: usize) -> Attempt {
        let entries = parsed["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let parts = super::transaction_parts(entries, max);
        if parts.len() <= 1 {
            return self.transaction(bundle.clone()).await;
        }
        let mut assigned: Vec<(String, String)> = Vec::new();
        let mut stored = Vec::with_capacity(entries.len());
        let count = parts.len();
        for (n, range) in parts.into_iter().enumerate() {
            let which = format!(
                "part {} of {count} (entries {}–{})",
                n + 1,
                range.start,
                range.end - 1
            );
            let mut sent: Vec<Value> = entries[range.clone()].to_vec();
            for entry in &mut sent {
                rewrite_references(&mut entry["resource"], &assigned);
            }
            let part =
                serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": sent});
            let resources = match self.transaction(part.to_string().into()).await {
                Attempt::Delivered(resources) if resources.len() == range.len() => resources,
                Attempt::Delivered(resources) => {
                    return Attempt::Reject(
                        Failure::said(format!(
                            "the EHR's transaction-response has {} entries for {}",
                            resources.len(),
                            range.len()
                        ))
                        .within(&which),
                    )
                }
                other => return other.within(&which),
            };
            for (entry, resource) in entries[range].iter().zip(&resources) {
                if let Some(full_url) = entry["fullUrl"].as_str() {
                    assigned.push((
                        full_url.to_string(),
                        format!("{}/{}", resource.resource_type, resource.id),
                    ));
                }
            }
            stored.extend(resources);
        }
        Attempt::Delivered(stored)
    }

    /// Conditional create (`If-None-Exist`) of each entry in Bundle order — which is dependency
    /// order: Patient, QuestionnaireResponse, Observations, Provenance — or conditional update
    /// (`PUT Type?identifier=…`, a revision's), with `urn:uuid` references rewritten to the
    /// ids the EHR assigned. Which id that is, the answer's `Location` says (Epic and Oracle
    /// Health answer a create with it and no body), or else its body; an answer with neither
    /// (a create matched, or an update, answered without a body) is followed by a search on the
    /// entry's condition. A failure stops the walk; what was written already is matched, not
    /// duplicated, when the delivery is retried.
    async fn per_resource(&self, bundle: &Value) -> Attempt {
        let mut assigned: Vec<(String, String)> = Vec::new();
        let mut stored = Vec::new();
        let entries = bundle["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for (i, entry) in entries.iter().enumerate() {
            let mut resource = entry["resource"].clone();
            rewrite_references(&mut resource, &assigned);
            let kind = resource["resourceType"]
                .as_str()
                .unwrap_or("Resource")
                .to_string();
            let which = format!("entry {i} ({kind})");
            let request = &entry["request"];
            // The request, and the search that finds what it wrote.
            let (method, url, condition, search) = match request["method"].as_str() {
                Some("PUT") => {
                    let target = request["url"].as_str().unwrap_or(&kind);
                    let url = format!("{}/{target}", self.base_url);
                    (reqwest::Method::PUT, url, None, Some(target.to_string()))
                }
                _ => {
                    let condition = request["ifNoneExist"].as_str();
                    let search = condition.map(|c| format!("{kind}?{c}"));
                    let url = format!("{}/{kind}", self.base_url);
                    (reqwest::Method::POST, url, condition, search)
                }
            };
            let answer = match self
                .send(method, url.as_str(), resource.to_string().into(), condition)
                .await
            {
                Ok(answer) => answer,
                Err(attempt) => return attempt,
            };
            if !(200..300).contains(&answer.status) {
                return classify(answer.status, answer.wait, &answer.body).within(&which);
            }
            let written = match answer.resource(&kind) {
                Some(written) => written,
                None => match search {
                    Some(search) => match self.find(&search).await {
                        Ok(found) => found,
                        Err(attempt) => return attempt.within(&which),
                    },
                    None => {
                        return Attempt::Reject(
                            Failure::said("the EHR's answer names no id").within(&which),
                        )
                    }
                },
            };
            if let Some(full_url) = entry["fullUrl"].as_str() {
                assigned.push((full_url.to_string(), format!("{kind}/{}", written.id)));
            }
            stored.push(written);
        }
        Attempt::Delivered(stored)
    }

    /// The one resource `search` (`Observation?identifier=…`) finds: what a write answered
    /// without naming it wrote.
    async fn find(&self, search: &str) -> Result<EhrResource, Attempt> {
        let url = format!("{}/{search}", self.base_url);
        let answer = self
            .send(
                reqwest::Method::GET,
                url.as_str(),
                bytes::Bytes::new(),
                None,
            )
            .await?;
        if !(200..300).contains(&answer.status) {
            return Err(classify(answer.status, answer.wait, &answer.body));
        }
        let matches = answer.body["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        match matches {
            [only] => body_resource(&only["resource"]).ok_or_else(|| {
                Attempt::Reject(Failure::said(
                    "a search by its condition found a resource without an id",
                ))
            }),
            // Not the search itself: a Patient's names the patient's identifier (PHI).
            _ => Err(Attempt::Reject(Failure::said(format!(
                "the EHR's answer names no id, and a search by its condition found {} resources",
                matches.len()
            )))),
        }
    }

    /// One authorized request: the EHR's answer, or the attempt it came to.
    async fn send(
        &self,
        method: reqwest::Method,
        url: impl reqwest::IntoUrl,
        body: bytes::Bytes,
        if_none_exist: Option<&str>,
    ) -> Result<Answer, Attempt> {
        let mut req = self
            .http
            .request(method, url)
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .header(reqwest::header::ACCEPT, "application/fhir+json")
            .body(body);
        if let Some(condition) = if_none_exist {
            req = req.header("If-None-Exist", condition);
        }
        let req = match self.authorize(req).await {
            Ok(r) => r,
            Err(e) => {
                return Err(Attempt::Retry {
                    failure: Failure::said(format!("no access token: {e}")),
                    retry_after: e.wait(),
                })
            }
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Err(Attempt::Retry {
                    failure: Failure::said(format!("EHR {}", super::unanswered(&e))),
                    retry_after: None,
                });
            }
        };
        let status = resp.status().as_u16();
        if resp.status().is_redirection() {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(no Location)");
            let failure = Failure::answered(status, None).saying(format!(
                "the EHR redirects to {to}; deliveries do not follow redirects (the Bundle \
                 holds PHI): point `[ehr] base_url` there if it is the EHR"
            ));
            // A permanent redirect is a configuration to fix (then replay); a temporary one
            // may pass.
            return Err(if matches!(status, 301 | 308) {
                Attempt::Reject(failure)
            } else {
                Attempt::Retry {
                    failure,
                    retry_after: None,
                }
            });
        }
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let wait = wait_asked(header, std::time::SystemTime::now());
        let location = header(reqwest::header::LOCATION.as_str())
            .or_else(|| header(reqwest::header::CONTENT_LOCATION.as_str()))
            .map(str::to_string);
        let etag = header(reqwest::header::ETAG.as_str()).map(str::to_string);
        match resp.bytes().await {
            Ok(b) => Ok(Answer {
                status,
                wait,
                body: serde_json::from_slice(&b).unwrap_or(Value::Null),
                location,
                etag,
            }),
            Err(_) => Err(Attempt::Retry {
                failure: Failure::answered(status, None).saying("body not received"),
                retry_after: None,
            }),
        }
    }

    /// Reads `path` (`Task/123`, `Task?_lastUpdated=gt…`) relative to the base URL, with the
    /// delivery's auth (a 401 under SMART fetches a new token and reads once more): the JSON
    /// body of a 2xx, else why not — said without the body (it may hold PHI).
    pub async fn read(&self, path: &str) -> Result<Value, String> {
        let url = format!("{}/{}", self.base_url, path.trim_start_matches('/'));
        let mut answer = self.get(&url).await;
        if let (Err(Some(401)), Auth::Smart(tokens)) = (&answer, &self.auth) {
            tokens.invalidate().await;
            answer = self.get(&url).await;
        }
        answer.map_err(|status| match status {
            Some(200..=299) => "the EHR's answer is not JSON".to_string(),
            Some(status) => format!("the EHR answered HTTP {status}"),
            None => "the EHR could not be reached (or gave no token)".to_string(),
        })
    }

    /// One authorized GET: the JSON body of a 2xx, else the status (`None`: no answer).
    async fn get(&self, url: &str) -> Result<Value, Option<u16>> {
        let req = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/fhir+json");
        let req = self.authorize(req).await.map_err(|_| None)?;
        let resp = req.send().await.map_err(|_| None)?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(Some(status));
        }
        let bytes = resp.bytes().await.map_err(|_| None)?;
        serde_json::from_slice(&bytes).map_err(|_| Some(status))
    }

    /// Whether the EHR answers its capability statement.
    pub async fn reachable(&self) -> bool {
        let req = self
            .http
            .get(format!("{}/metadata", self.base_url))
            .timeout(Duration::from_secs(2));
        let Ok(req) = self.authorize(req).await else {
            return false;
        };
        matches!(req.send().await, Ok(r) if r.status().is_success())
    }
}

/// What the EHR answered a request.
struct Answer {
    status: u16,
    /// How long it asked to be left alone (`wait_asked`).
    wait: Option<Duration>,
    /// The JSON body (`Null` if there was none, or not JSON).
    body: Value,
    /// `Location` (or `Content-Location`).
    location: Option<String>,
    etag: Option<String>,
}

impl Answer {
    /// The `kind` resource a write answered with: named by its `Location`, or its body.
    fn resource(&self, kind: &str) -> Option<EhrResource> {
        self.location
            .as_deref()
            .and_then(|l| located(l, self.etag.as_deref()))
            .filter(|r| r.resource_type == kind)
            .or_else(|| body_resource(&self.body).filter(|r| r.resource_type == kind))
    }
}

/// A resource as a body holds it: its type, id and `meta.versionId`.
fn body_resource(body: &Value) -> Option<EhrResource> {
    let version = body["meta"]["versionId"].as_str().map(str::to_string);
    Some(EhrResource {
        resource_type: body["resourceType"].as_str()?.to_string(),
        id: body["id"].as_str()?.to_string(),
        etag: version.as_ref().map(|v| format!("W/\"{v}\"")),
        version,
    })
}

fn not_json() -> Attempt {
    Attempt::Reject(Failure::said("the stored Bundle is not JSON"))
}

/// Replaces every `reference` that names an entry's fullUrl with the id the EHR gave it.
fn rewrite_references(value: &mut Value, assigned: &[(String, String)]) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(s) if key == "reference" => {
                        if let Some((_, id)) = assigned.iter().find(|(url, _)| url == s) {
                            *s = id.clone();
                        }
                    }
                    other => rewrite_references(other, assigned),
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| rewrite_references(v, assigned)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_rewritten_everywhere_but_nothing_else() {
        let mut v = json!({"subject": {"reference": "urn:uuid:p", "type": "Patient"},
            "derivedFrom": [{"reference": "urn:uuid:q"}], "note": [{"text": "urn:uuid:p"}]});
        rewrite_references(
            &mut v,
            &[
                ("urn:uuid:p".into(), "Patient/1".into()),
                ("urn:uuid:q".into(), "QuestionnaireResponse/2".into()),
            ],
        );
        assert_eq!(v["subject"]["reference"], "Patient/1");
        assert_eq!(v["derivedFrom"][0]["reference"], "QuestionnaireResponse/2");
        assert_eq!(v["note"][0]["text"], "urn:uuid:p");
    }
}
