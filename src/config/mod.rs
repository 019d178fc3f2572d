//! Configuration of `chartbridge serve`: a TOML file, then environment overrides, then defaults
//! that run with no configuration at all (127.0.0.1:8080, `./data`, `./mappings`, no EHR: the
//! deliveries wait in the outbox).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub mappings_dir: PathBuf,
    pub limits: Limits,
    pub ehr: Option<EhrConfig>,
    /// How each intake source authenticates, by mapping id; `"*"` applies to the others.
    pub sources: HashMap<String, SourceAuth>,
    /// Sources whose webhooks only announce a submission, by mapping id: the gateway fetches
    /// the submission from the source's API before mapping it.
    pub fetch: HashMap<String, FetchSource>,
    /// Days a delivered submission's Bundle (PHI) is kept for a replay; `0` keeps it for good.
    /// Bundles still waiting or dead-lettered are kept whatever their age.
    pub bundle_retention_days: u64,
    /// Days the audit trail keeps an operator's access; `0` (the default) keeps them for good.
    /// HIPAA asks for six years (2190 days) of such records.
    pub audit_retention_days: u64,
    /// The key operators present (`Authorization: Bearer <key>`) to read a submission's status,
    /// look up provenance or a patient's submissions, and replay. Unset, those endpoints are
    /// open (said at start-up). `CHARTBRIDGE_ADMIN_KEY`.
    pub admin_key: Option<String>,
    /// Operators by name, each with a key of their own (`Authorization: Bearer <key>`), beside
    /// or instead of `admin_key`: the audit trail then says which person it was, and one of
    /// them leaving means removing one key, not rotating everyone's.
    pub operators: std::collections::BTreeMap<String, String>,
    /// Serves `POST /echo`, the bare baseline the load benchmark measures beside submissions;
    /// off unless asked for (`CHARTBRIDGE_ECHO_ROUTE=1`).
    pub echo_route: bool,
    /// The CRM's webhook: ops stages, flags, missing answers, EHR references.
    pub crm: Option<WebhookConfig>,
    /// The patient portal's webhook: patient-visible status and the questions to answer.
    pub portal: Option<WebhookConfig>,
    /// Where the workflow rules are (`*.yaml`); absent or empty: the shipped defaults.
    pub workflows_dir: PathBuf,
    /// Who owns which data and events (`ownership.yaml`); absent: the shipped defaults.
    pub ownership: Option<PathBuf>,
    /// Senders other than the EHR that may post events (`POST /events/<name>`), by name, each
    /// with its credentials: what they post is refused unless they own it.
    pub events: HashMap<String, EventsAuth>,
}

/// A webhook receiver (the CRM, the portal): where its events go, signed as Standard Webhooks
/// sign them, and how they are retried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// `whsec_<base64 key>`.
    pub secret: String,
    /// Attempts in flight at once.
    #[serde(default = "default_webhook_concurrency")]
    pub concurrency: usize,
    /// First retry delay (ms); doubles per attempt, with full jitter; `Retry-After` honoured.
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_cap_ms")]
    pub backoff_cap_ms: u64,
    /// Failed attempts after which an event is dead-lettered (a replay sends it again).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Per-request timeout (ms).
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
}

impl WebhookConfig {
    /// The signing key: the base64 after `whsec_`.
    pub fn key(&self) -> Result<Vec<u8>, String> {
        whsec_key(&self.secret)
    }
}

/// The key of a Standard Webhooks secret (`whsec_<base64>`; the prefix may be left out).
pub fn whsec_key(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| "the secret is not whsec_<base64>".to_string())?;
    if key.is_empty() {
        return Err("the secret's key is empty".into());
    }
    Ok(key)
}

fn default_webhook_concurrency() -> usize {
    4
}
fn default_max_attempts() -> u32 {
    50
}
fn default_webhook_timeout_ms() -> u64 {
    10_000
}

/// How a sender of events proves itself: a bearer token, or an HMAC of the body in a header
/// (Medplum's rest-hook: `X-Signature`, hex HMAC-SHA256).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum EventsAuth {
    Bearer {
        token: String,
    },
    Hmac {
        #[serde(default = "default_signature_header")]
        header: String,
        #[serde(default = "default_hex")]
        encoding: SignatureEncoding,
        secret: String,
    },
}

fn default_signature_header() -> String {
    "x-signature".into()
}
fn default_hex() -> SignatureEncoding {
    SignatureEncoding::Hex
}

/// How the EHR tells the gateway what happened: its credentials on `POST /events/ehr`, and —
/// for an EHR that cannot push — how often the gateway searches it for what changed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EhrEventsConfig {
    pub auth: EventsAuth,
    /// Search the EHR every this many ms (`_lastUpdated` since the last search) for the
    /// resource types the workflow rules name; unset: only pushed events.
    #[serde(default)]
    pub poll_interval_ms: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            mappings_dir: PathBuf::from("mappings"),
            limits: Limits::default(),
            ehr: None,
            sources: HashMap::new(),
            fetch: HashMap::new(),
            bundle_retention_days: 30,
            audit_retention_days: 0,
            admin_key: None,
            operators: std::collections::BTreeMap::new(),
            echo_route: false,
            crm: None,
            portal: None,
            workflows_dir: PathBuf::from("workflows"),
            ownership: None,
            events: HashMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted body, bytes.
    pub max_body_bytes: usize,
    /// Deepest accepted JSON nesting.
    pub max_json_depth: usize,
    /// Deliveries the outbox may hold: beyond it new submissions get `503` with `Retry-After`
    /// (sources retry; nothing is stored, so nothing is lost) until the EHR catches up.
    pub max_outbox: usize,
    /// Deliveries of one mapping the outbox may hold (unset: only `max_outbox` applies): beyond
    /// it that mapping's new submissions get `503` while the others' are still taken.
    pub max_outbox_per_mapping: Option<usize>,
    /// How long a client may take to send a request's headers (the connection is closed
    /// after), and its body and have it answered (`408` after), milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_json_depth: 32,
            max_outbox: 100_000,
            max_outbox_per_mapping: None,
            request_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EhrConfig {
    /// FHIR base URL, e.g. `https://ehr.example.com/fhir/R4`.
    pub base_url: String,
    #[serde(default)]
    pub auth: EhrAuth,
    /// `transaction` (one Bundle) or `per_resource` (conditional creates one by one, for EHRs
    /// without transaction support).
    #[serde(default)]
    pub mode: DeliveryMode,
    /// Transaction mode: the most entries one transaction may hold. Medplum (hosted and
    /// self-hosted) refuses a transaction of more than 8 entries when any is conditional, as
    /// every intake's are. A longer Bundle goes as consecutive transactions of at most this
    /// many, later ones referring to what earlier ones stored. Unset: one transaction.
    #[serde(default)]
    pub max_transaction_entries: Option<std::num::NonZeroUsize>,
    /// Deliveries in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// First retry delay (ms); doubles per attempt, with full jitter.
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_cap_ms")]
    pub backoff_cap_ms: u64,
    /// Per-request timeout (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// What the EHR sends back (events), if it does.
    #[serde(default)]
    pub events: Option<EhrEventsConfig>,
}

fn default_concurrency() -> usize {
    4
}
fn default_backoff_base_ms() -> u64 {
    500
}
fn default_backoff_cap_ms() -> u64 {
    60_000
}
fn default_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    #[default]
    Transaction,
    PerResource,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum EhrAuth {
    #[default]
    None,
    Bearer {
        token: String,
    },
    /// SMART Backend Services: client credentials with a signed JWT assertion.
    SmartBackend(SmartBackend),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartBackend {
    pub token_url: String,
    pub client_id: String,
    /// PEM file of the private key (PKCS#8) registered with the EHR.
    pub private_key_pem: PathBuf,
    /// `RS384` or `ES384`.
    pub algorithm: String,
    /// Key id in the EHR's JWKS.
    pub kid: String,
    #[serde(default = "default_scope")]
    pub scope: String,
}

fn default_scope() -> String {
    "system/Patient.cru system/QuestionnaireResponse.cru system/Observation.cru system/Provenance.cr"
        .to_string()
}

/// How a source proves a submission is its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum SourceAuth {
    /// No check (development only; said at start-up).
    None,
    /// A shared key in a header (`X-Api-Key` by default).
    ApiKey {
        #[serde(default = "default_api_key_header")]
        header: String,
        key: String,
    },
    /// HMAC-SHA256 of the raw body in a header, as Typeform (`Typeform-Signature: sha256=<base64>`)
    /// and Tally (`Tally-Signature: <base64>`) send it.
    Hmac {
        header: String,
        secret: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        encoding: SignatureEncoding,
    },
    /// Healthie's signed webhooks: `Content-Digest` (SHA-256 of the body) and `Signature:
    /// sig1=<hex>`, an HMAC-SHA256 of the request line, that digest, the content type and length.
    Healthie {
        secret: String,
        /// The path Healthie signs when a proxy in front serves the gateway under another one
        /// (e.g. `/chartbridge/submissions/glp1-intake-healthie`); by default, the path the
        /// gateway is asked.
        #[serde(default)]
        signed_path: Option<String>,
    },
    /// The Standard Webhooks scheme (a custom portal): `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature: v1,<base64>` over `{id}.{timestamp}.{body}`; a timestamp outside
    /// `tolerance_seconds` is refused, so a captured request cannot be replayed later.
    StandardWebhooks {
        /// `whsec_<base64 key>`
        secret: String,
        #[serde(default = "default_tolerance")]
        tolerance_seconds: u64,
    },
}

/// Where the submission a source announces is fetched from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum FetchSource {
    /// Healthie: the webhook names a FormAnswerGroup; its answers come from the GraphQL API.
    HealthieGraphql {
        /// e.g. `https://api.gethealthie.com/graphql` (`https://staging-api.gethealthie.com/graphql`)
        url: String,
        api_key: String,
        /// The whole query, answer included (ms).
        #[serde(default = "default_fetch_timeout_ms")]
        timeout_ms: u64,
    },
    /// Any API: the notification names an id (at the JSONPath `id`); the submission is the
    /// answer to a GET of `url` with `{id}` replaced by it.
    Http {
        /// e.g. `https://api.forms.example.com/v1/responses/{id}`
        url: String,
        /// JSONPath to the id in the notification, e.g. `$.data.response_id`.
        id: String,
        #[serde(default)]
        auth: FetchAuth,
        #[serde(default = "default_fetch_timeout_ms")]
        timeout_ms: u64,
    },
}

/// How the gateway proves itself to a source's API when it fetches a submission.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum FetchAuth {
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer { token: String },
    /// `Authorization: Basic <base64 of username:password>`.
    Basic { username: String, password: String },
    /// OAuth 2.0 client credentials (RFC 6749 §4.4): a token from `token_url`, the client
    /// authenticated with HTTP Basic; cached until shortly before it expires.
    Oauth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        #[serde(default)]
        scope: Option<String>,
    },
}

fn default_fetch_timeout_ms() -> u64 {
    10_000
}

fn default_tolerance() -> u64 {
    300
}

fn default_api_key_header() -> String {
    "x-api-key".to_string()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignatureEncoding {
    #[default]
    Base64,
    Hex,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("[operators] {0}")]
    Operators(String),
    #[error("[ehr] {0}")]
    Ehr(String),
    #[error("{0}")]
    Events(String),
}

impl Config {
    /// Reads `path` (if given), then applies `CHARTBRIDGE_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.operator_keys()?;
        config.check_ehr()?;
        config.check_events()?;
        Ok(config)
    }

    /// The webhook receivers' secrets are keys, the events senders' names are names, and no
    /// credential is empty (an empty token would let anyone in).
    fn check_events(&self) -> Result<(), ConfigError> {
        for (table, hook) in [("crm", &self.crm), ("portal", &self.portal)] {
            if let Some(hook) = hook {
                hook.key()
                    .map_err(|why| ConfigError::Events(format!("[{table}] secret: {why}")))?;
            }
        }
        let ehr = self
            .ehr
            .as_ref()
            .and_then(|e| e.events.as_ref())
            .map(|e| ("ehr.events", &e.auth));
        let others = self.events.iter().map(|(name, auth)| (name.as_str(), auth));
        for (name, auth) in ehr.into_iter().chain(others) {
            if name != "ehr.events" && crate::store::Receiver::webhook(name).is_err() {
                return Err(ConfigError::Events(format!(
                    "[events.{name}]: a sender's name is 1 to 32 of a-z, 0-9, - and _, not `ehr` (the EHR's is [ehr.events])"
                )));
            }
            let empty = match auth {
                EventsAuth::Bearer { token } => token.is_empty(),
                EventsAuth::Hmac { secret, .. } => secret.is_empty(),
            };
            if empty {
                return Err(ConfigError::Events(format!(
                    "[{}]: the credential is empty",
                    if name == "ehr.events" {
                        name.to_string()
                    } else {
                        format!("events.{name}")
                    }
                )));
            }
        }
        Ok(())
    }

    /// What `[ehr]` asks for is something a delivery can do.
    fn check_ehr(&self) -> Result<(), ConfigError> {
        match &self.ehr {
            Some(ehr)
                if ehr.mode == DeliveryMode::PerResource
                    && ehr.max_transaction_entries.is_some() =>
            {
                Err(ConfigError::Ehr(
                    "max_transaction_entries is for mode = \"transaction\": per_resource \
                     sends no transactions"
                        .into(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Who may use the operators' endpoints, as (who the audit trail names, the SHA-256 of
    /// their key): the admin key (by its fingerprint) and each named operator. A key is given
    /// as itself or as `sha256:<its SHA-256 in hex>` (a configuration file that leaks then
    /// leaks no key). Every key must be set and be one person's: an empty key, a digest that
    /// is not one, or a key two entries share, is an error (the trail could not tell who it
    /// was).
    pub fn operator_keys(&self) -> Result<Vec<(String, [u8; 32])>, ConfigError> {
        let mut keys: Vec<(String, [u8; 32])> = Vec::new();
        if let Some(key) = &self.admin_key {
            let digest = key_digest("admin_key", key)?;
            keys.push((format!("admin key {}", fingerprint(&digest)), digest));
        }
        for (name, key) in &self.operators {
            let digest = key_digest(name, key)?;
            if let Some((other, _)) = keys.iter().find(|(_, d)| *d == digest) {
                return Err(ConfigError::Operators(format!(
                    "{name}: the same key as {other}: give each operator a key of their own"
                )));
            }
            keys.push((format!("operator {name}"), digest));
        }
        Ok(keys)
    }

    /// Overrides from the environment: `CHARTBRIDGE_LISTEN`, `CHARTBRIDGE_DATA_DIR`,
    /// `CHARTBRIDGE_MAPPINGS_DIR`, `CHARTBRIDGE_EHR_URL`, `CHARTBRIDGE_EHR_BEARER_TOKEN`,
    /// `CHARTBRIDGE_BUNDLE_RETENTION_DAYS`, `CHARTBRIDGE_ADMIN_KEY`, `CHARTBRIDGE_ECHO_ROUTE`
    /// (`1` or `true`).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = var("CHARTBRIDGE_LISTEN") {
            self.listen = v.parse().map_err(|e| ConfigError::Env {
                name: "CHARTBRIDGE_LISTEN",
                message: format!("not an address:port ({e})"),
            })?;
        }
        if let Some(v) = var("CHARTBRIDGE_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = var("CHARTBRIDGE_MAPPINGS_DIR") {
            self.mappings_dir = PathBuf::from(v);
        }
        if let Some(v) = var("CHARTBRIDGE_ADMIN_KEY") {
            self.admin_key = Some(v).filter(|k| !k.is_empty());
        }
        if let Some(v) = var("CHARTBRIDGE_ECHO_ROUTE") {
            self.echo_route = matches!(v.as_str(), "1" | "true");
        }
        if let Some(v) = var("CHARTBRIDGE_BUNDLE_RETENTION_DAYS") {
            self.bundle_retention_days = v.parse().map_err(|e| ConfigError::Env {
                name: "CHARTBRIDGE_BUNDLE_RETENTION_DAYS",
                message: format!("not a number of days ({e})"),
            })?;
        }
        if let Some(v) = var("CHARTBRIDGE_AUDIT_RETENTION_DAYS") {
            self.audit_retention_days = v.parse().map_err(|e| ConfigError::Env {
                name: "CHARTBRIDGE_AUDIT_RETENTION_DAYS",
                message: format!("not a number of days ({e})"),
            })?;
        }
        if let Some(url) = var("CHARTBRIDGE_EHR_URL") {
            match &mut self.ehr {
                Some(ehr) => ehr.base_url = url,
                None => {
                    self.ehr = Some(EhrConfig {
                        base_url: url,
                        auth: EhrAuth::None,
                        mode: DeliveryMode::Transaction,
                        max_transaction_entries: None,
                        concurrency: default_concurrency(),
                        backoff_base_ms: default_backoff_base_ms(),
                        backoff_cap_ms: default_backoff_cap_ms(),
                        timeout_ms: default_timeout_ms(),
                        events: None,
                    })
                }
            }
        }
        if let Some(token) = var("CHARTBRIDGE_EHR_BEARER_TOKEN") {
            match &mut self.ehr {
                Some(ehr) => ehr.auth = EhrAuth::Bearer { token },
                None => {
                    return Err(ConfigError::Env {
                        name: "CHARTBRIDGE_EHR_BEARER_TOKEN",
                        message: "set CHARTBRIDGE_EHR_URL (or [ehr] in the file) too".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// How long a delivered submission's Bundle is kept; `None`: for good.
    pub fn bundle_retention(&self) -> Option<std::time::Duration> {
        days(self.bundle_retention_days)
    }

    /// How long the audit trail keeps an access; `None`: for good.
    pub fn audit_retention(&self) -> Option<std::time::Duration> {
        days(self.audit_retention_days)
    }

    /// The authentication of a mapping's source: its own entry, else `"*"`, else none.
    /// The mapping ids among `mappings` whose submissions are accepted without any
    /// authentication, sorted.
    pub fn unsigned<'a>(&self, mappings: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        let mut open: Vec<&str> = mappings
            .filter(|m| matches!(self.source_auth(m), SourceAuth::None))
            .collect();
        open.sort_unstable();
        open
    }

    pub fn source_auth(&self, mapping_id: &str) -> &SourceAuth {
        const NONE: &SourceAuth = &SourceAuth::None;
        self.sources
            .get(mapping_id)
            .or_else(|| self.sources.get("*"))
            .unwrap_or(NONE)
    }
}

/// The SHA-256 of `name`'s operator key, given as itself or as `sha256:<64 hex digits>`.
fn key_digest(name: &str, key: &str) -> Result<[u8; 32], ConfigError> {
    use sha2::Digest;
    if key.trim().is_empty() {
        return Err(ConfigError::Operators(format!("{name}: the key is empty")));
    }
    let Some(hex) = key.strip_prefix("sha256:") else {
        return Ok(sha2::Sha256::digest(key.as_bytes()).into());
    };
    let not_a_digest = || {
        ConfigError::Operators(format!(
            "{name}: `sha256:` must be followed by the key's SHA-256, 64 hex digits \
             (`printf %s \"$KEY\" | sha256sum`)"
        ))
    };
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(not_a_digest());
    }
    let mut digest = [0u8; 32];
    for (i, b) in digest.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| not_a_digest())?;
    }
    Ok(digest)
}

/// What the audit trail says of a key: the first 8 bytes of its SHA-256, in hex — it tells
/// keys apart (a rotation) without keeping the key.
pub fn fingerprint(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` days; `None` for 0 (kept for good).
fn days(n: u64) -> Option<std::time::Duration> {
    (n > 0).then(|| std::time::Duration::from_secs(n.saturating_mul(86_400)))
}

#[cfg(test)]
mod tests;
