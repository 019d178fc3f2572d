//! FHIR R4 building blocks shared by every layer above: transaction and searchset Bundles,
//! Provenance, OperationOutcome, the CapabilityStatement, deterministic `urn:uuid`s and
//! search-string encoding.
//!
//! This module knows JSON and FHIR, nothing else: not mapping files, not HTTP, not the store.
//! Resources are built as `Json` trees and written once as bytes (typed validation through
//! fhirbolt is done by `validate`, outside the hot path).

pub mod bundle;
pub mod capability;
pub mod json;
pub mod outcome;
pub mod provenance;
pub mod revision;
pub mod validate;

pub use bundle::{Conditional, TransactionBuilder};
pub use json::Json;
pub use outcome::{Issue, IssueSeverity, OperationOutcome};
pub use provenance::ProvenanceInput;

use sha2::{Digest, Sha256};

/// UCUM's code system URI.
pub const UCUM: &str = "http://unitsofmeasure.org";
/// LOINC's code system URI.
pub const LOINC: &str = "http://loinc.org";
/// The gateway's own codes for where a review stands (`Task.businessStatus`): the review Task
/// it asks for starts `ready-for-review`; the EHR's decisions use any system or the text.
pub const WORKFLOW_STATUS: &str = "https://chartbridge.dev/fhir/CodeSystem/workflow-status";
/// HL7 observation categories.
pub const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

/// The SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A name-based `urn:uuid` (RFC 9562 version 8 layout over SHA-256) derived from `parts`: the same
/// inputs always give the same fullUrl, so a Bundle is reproducible byte for byte.
pub fn urn_uuid(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8 (custom, name-based)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 9562 variant
    let x = hex(&b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Percent-encodes a value for use inside a FHIR search string (`identifier=system|value`).
pub fn search_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'/' => {
                out.push(b as char)
            }
            _ => {
                const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(DIGITS[(b >> 4) as usize] as char);
                out.push(DIGITS[(b & 15) as usize] as char);
            }
        }
    }
    out
}

/// The search string matching a token identifier: `identifier=<system>|<value>`, encoded.
pub fn identifier_query(system: &str, value: &str) -> String {
    format!(
        "identifier={}|{}",
        search_encode(system),
        search_encode(value)
    )
}

/// The search string matching a resource by one of its tags (`_tag=<system>|<code>`), encoded:
/// how a Provenance, which has no identifier in R4, is matched.
pub fn tag_query(system: &str, code: &str) -> String {
    format!("_tag={}|{}", search_encode(system), search_encode(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urn_uuid_is_stable_and_well_formed() {
        let a = urn_uuid(&["sub-1", "weight"]);
        assert_eq!(a, urn_uuid(&["sub-1", "weight"]));
        assert_ne!(a, urn_uuid(&["sub-1", "height"]));
        assert_ne!(urn_uuid(&["ab", "c"]), urn_uuid(&["a", "bc"]));
        let u = a.trim_start_matches("urn:uuid:");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8");
    }

    #[test]
    fn search_values_are_encoded() {
        assert_eq!(
            identifier_query("https://x.org/s", "a|b&c d"),
            "identifier=https://x.org/s|a%7Cb%26c%20d"
        );
    }
}
