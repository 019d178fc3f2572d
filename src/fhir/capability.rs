//! The `CapabilityStatement` a FHIR server answers at `GET /metadata`: what it serves, in what
//! format. Built from a description the caller gives; this module does not know what that is.

use serde_json::{json, Value};

/// One resource type served: these interactions (`read`, `create`, …; `search-type` is added
/// for search parameters), searched by these parameters (name, FHIR search parameter type), and
/// these operations (name without `$`, its OperationDefinition).
pub struct Served<'a> {
    pub resource_type: &'a str,
    pub interactions: &'a [&'a str],
    pub search: &'a [(&'a str, &'a str)],
    pub operations: &'a [(&'a str, &'a str)],
}

/// A server's CapabilityStatement (FHIR R4, JSON only, no security declared in it).
pub fn capability_statement(software: &str, version: &str, date: &str, served: &[Served]) -> Value {
    let resources: Vec<Value> = served
        .iter()
        .map(|s| {
            let mut interactions: Vec<Value> =
                s.interactions.iter().map(|i| json!({"code": i})).collect();
            let mut r = json!({ "type": s.resource_type });
            if !s.search.is_empty() {
                interactions.push(json!({"code": "search-type"}));
                r["searchParam"] = s
                    .search
                    .iter()
                    .map(|(name, kind)| json!({"name": name, "type": kind}))
                    .collect();
            }
            if !interactions.is_empty() {
                r["interaction"] = Value::Array(interactions);
            }
            if !s.operations.is_empty() {
                r["operation"] = s
                    .operations
                    .iter()
                    .map(|(name, definition)| json!({"name": name, "definition": definition}))
                    .collect();
            }
            r
        })
        .collect();
    let mut rest = json!({ "mode": "server" });
    // FHIR allows no empty arrays.
    if !resources.is_empty() {
        rest["resource"] = Value::Array(resources);
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": { "name": software, "version": version },
        "implementation": { "description": format!("{software} {version}") },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [rest],
    })
}
