//! `Provenance` for what the gateway writes: who (the gateway as device, the patient as author
//! and source), from what (the submission, its SHA-256, the mapping id, version and hash), when.

use super::bundle::reference;
use super::json::Json;

const PARTICIPANT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
/// RFC 6920 "named information" URIs carry a digest as an identifier anyone can recompute.
const URI_SYSTEM: &str = "urn:ietf:rfc:3986";

/// What a Provenance records.
#[derive(Debug, Clone)]
pub struct ProvenanceInput<'a> {
    /// fullUrls (or literal references) of every resource produced, with their types.
    pub targets: Vec<(String, &'static str)>,
    /// When the gateway produced them (FHIR instant).
    pub recorded: &'a str,
    /// The patient reference (fullUrl or literal reference).
    pub patient: &'a str,
    /// Business identifier of the submission.
    pub submission_system: &'a str,
    pub submission_id: &'a str,
    /// SHA-256 (hex) of the raw submitted bytes.
    pub payload_sha256: &'a str,
    pub mapping_id: &'a str,
    pub mapping_version: &'a str,
    /// SHA-256 (hex) of the mapping file's content.
    pub mapping_sha256: &'a str,
    /// The software, e.g. `chartbridge 0.1.0`.
    pub software: &'a str,
}

/// `ni:///sha-256;<base64url>` for a hex SHA-256.
pub fn named_information(sha256_hex: &str) -> String {
    let bytes: Vec<u8> = (0..sha256_hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&sha256_hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    format!("ni:///sha-256;{}", base64url(&bytes))
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A CodeableConcept of one Coding.
fn concept<'a>(system: &'a str, code: &'a str, display: &'a str) -> Json<'a> {
    Json::obj([(
        "coding",
        Json::Arr(vec![Json::obj([
            ("system", system.into()),
            ("code", code.into()),
            ("display", display.into()),
        ])]),
    )])
}

/// An entity: `role` and what it is, by identifier.
fn entity<'a>(
    role: &'a str,
    system: &'a str,
    value: impl Into<Json<'a>>,
    display: impl Into<Json<'a>>,
) -> Json<'a> {
    Json::obj([
        ("role", role.into()),
        (
            "what",
            Json::obj([
                (
                    "identifier",
                    Json::obj([("system", system.into()), ("value", value.into())]),
                ),
                ("display", display.into()),
            ]),
        ),
    ])
}

/// Builds the Provenance resource.
pub fn provenance(p: ProvenanceInput<'_>) -> Json<'_> {
    let targets: Vec<Json<'_>> = p
        .targets
        .into_iter()
        .map(|(t, kind)| reference(t, kind))
        .collect();
    let agent = |code, display, who| {
        Json::obj([
            ("type", concept(PARTICIPANT_TYPE, code, display)),
            ("who", who),
        ])
    };
    let version = format!("{}|{}", p.mapping_id, p.mapping_version);
    Json::obj([
        ("resourceType", "Provenance".into()),
        ("target", Json::Arr(targets)),
        ("recorded", p.recorded.into()),
        (
            "activity",
            concept(
                "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                "CREATE",
                "create",
            ),
        ),
        (
            "agent",
            Json::Arr(vec![
                agent(
                    "assembler",
                    "Assembler",
                    Json::obj([("type", "Device".into()), ("display", p.software.into())]),
                ),
                agent("author", "Author", reference(p.patient, "Patient")),
                agent("informant", "Informant", reference(p.patient, "Patient")),
            ]),
        ),
        (
            "entity",
            Json::Arr(vec![
                entity(
                    "source",
                    p.submission_system,
                    p.submission_id,
                    "intake submission",
                ),
                entity(
                    "source",
                    URI_SYSTEM,
                    named_information(p.payload_sha256),
                    "SHA-256 of the raw submitted payload",
                ),
                entity(
                    "derivation",
                    "urn:chartbridge:mapping",
                    version,
                    format!("mapping {} version {}", p.mapping_id, p.mapping_version),
                ),
                entity(
                    "derivation",
                    URI_SYSTEM,
                    named_information(p.mapping_sha256),
                    "SHA-256 of the mapping file",
                ),
            ]),
        ),
    ])
}

/// Provenance of Observations extracted from a QuestionnaireResponse (SDC `$extract`): the
/// software as assembler, the response (a Reference) as their source.
pub fn extracted(
    targets: &[String],
    recorded: &str,
    software: &str,
    source: &serde_json::Value,
) -> serde_json::Value {
    let coding = |system: &str, code: &str, display: &str| serde_json::json!({"coding": [{"system": system, "code": code, "display": display}]});
    serde_json::json!({
        "resourceType": "Provenance",
        "target": targets
            .iter()
            .map(|t| serde_json::json!({"reference": t, "type": "Observation"}))
            .collect::<Vec<_>>(),
        "recorded": recorded,
        "activity": coding("http://terminology.hl7.org/CodeSystem/v3-DataOperation", "CREATE", "create"),
        "agent": [{
            "type": coding(PARTICIPANT_TYPE, "assembler", "Assembler"),
            "who": {"type": "Device", "display": software},
        }],
        "entity": [{"role": "source", "what": source}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_information_matches_rfc6920_form() {
        // SHA-256 of "Hello World!" from RFC 6920 §8.
        let h = "7f83b1657ff1fc53b92dc18148a1d65dfc2d4b1fa3d677284addd200126d9069";
        assert_eq!(
            named_information(h),
            "ni:///sha-256;f4OxZX_x_FO5LcGBSKHWXfwtSx-j1ncoSt3SABJtkGk"
        );
    }
}
