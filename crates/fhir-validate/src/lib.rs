//! Typed FHIR R4 validation through fhirbolt, isolated in its own crate.
//!
//! fhirbolt's generated R4 model costs minutes to compile and panics on any empty JSON array.
//! This crate keeps both facts away from the rest of chartbridge: it exposes only plain,
//! non-generic functions over `serde_json::Value`, so a change in the main crate never
//! recompiles fhirbolt's generics, and it rejects empty arrays (which FHIR forbids anyway) before
//! fhirbolt sees them, with `catch_unwind` as a last guard.

use fhirbolt::model::r4::Resource;
use fhirbolt::serde::{DeserializationConfig, DeserializationMode};
use serde_json::Value;

/// Why a resource is not valid FHIR R4 JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirError {
    /// Dotted path to the offending element where known (e.g. `Observation.category`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FhirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FhirError {}

/// Validates one resource (any type, including a Bundle) against fhirbolt's strict R4 model:
/// unknown elements, wrong JSON types, missing 1..1 elements and two `value[x]` at once are
/// rejected. A Bundle is validated entry by entry (fhirbolt cannot re-read a transaction Bundle
/// whose entries carry `resource` before `request`), plus the Bundle shell itself.
pub fn validate_resource(resource: &Value) -> Result<(), FhirError> {
    let root = resource_type(resource);
    find_empty_array(resource, &root)?;
    if root == "Bundle" {
        if let Some(entries) = resource.get("entry").and_then(Value::as_array) {
            for (i, entry) in entries.iter().enumerate() {
                if let Some(inner) = entry.get("resource") {
                    validate_resource(inner).map_err(|e| FhirError {
                        path: format!("Bundle.entry[{i}].resource/{}", e.path),
                        message: e.message,
                    })?;
                }
            }
            let mut shell = resource.clone();
            if let Some(Value::Array(entries)) = shell.get_mut("entry") {
                for entry in entries.iter_mut() {
                    if let Some(obj) = entry.as_object_mut() {
                        obj.remove("resource");
                    }
                }
            }
            return strict_parse(&shell, &root);
        }
    }
    strict_parse(resource, &root)
}

/// Reads a single (non-Bundle) resource into fhirbolt's typed R4 model and writes it back:
/// what a typed FHIR client would see of it.
pub fn round_trip(resource: &Value) -> Result<Value, FhirError> {
    let root = resource_type(resource);
    find_empty_array(resource, &root)?;
    typed(resource, &root, true).map(|v| v.unwrap_or(Value::Null))
}

fn resource_type(resource: &Value) -> String {
    resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Resource")
        .to_string()
}

fn strict_parse(resource: &Value, root: &str) -> Result<(), FhirError> {
    typed(resource, root, false).map(|_| ())
}

fn typed(resource: &Value, root: &str, write_back: bool) -> Result<Option<Value>, FhirError> {
    let value = resource.clone();
    let outcome = std::panic::catch_unwind(move || {
        let typed = fhirbolt::json::from_json_value::<Resource>(
            value,
            Some(DeserializationConfig {
                mode: DeserializationMode::Strict,
            }),
        )
        .map_err(|e| e.to_string())?;
        if write_back {
            fhirbolt::json::to_json_value(typed, None)
                .map(Some)
                .map_err(|e| e.to_string())
        } else {
            Ok(None)
        }
    });
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(message)) => Err(FhirError {
            path: root.to_string(),
            message,
        }),
        Err(_) => Err(FhirError {
            path: root.to_string(),
            message: "the typed R4 model could not read this resource".to_string(),
        }),
    }
}

fn find_empty_array(value: &Value, path: &str) -> Result<(), FhirError> {
    match value {
        Value::Array(items) if items.is_empty() => Err(FhirError {
            path: path.to_string(),
            message: "empty array: FHIR JSON forbids empty arrays (omit the element)".to_string(),
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| find_empty_array(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map
            .iter()
            .try_for_each(|(k, v)| find_empty_array(v, &format!("{path}.{k}"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_valid_observation() {
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "weight"}, "valueQuantity": {"value": 72.5, "unit": "kg"}});
        assert_eq!(validate_resource(&obs), Ok(()));
    }

    #[test]
    fn round_trips_a_resource() {
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "weight"}, "valueQuantity": {"value": 72.5, "unit": "kg"}});
        assert_eq!(round_trip(&obs), Ok(obs));
    }

    #[test]
    fn rejects_an_unknown_element_and_a_missing_status() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "bogus": 1});
        assert!(validate_resource(&obs).is_err());
        let obs = json!({"resourceType": "Observation", "code": {"text": "x"}});
        assert!(validate_resource(&obs).is_err());
    }

    #[test]
    fn rejects_empty_arrays_without_panicking() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "category": []});
        let err = validate_resource(&obs).unwrap_err();
        assert_eq!(err.path, "Observation.category");
    }

    #[test]
    fn validates_bundle_entries_one_by_one() {
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueBoolean": "yes"},
             "request": {"method": "POST", "url": "Observation"}}]});
        let err = validate_resource(&bundle).unwrap_err();
        assert!(err.path.starts_with("Bundle.entry[0].resource"), "{err}");
    }
}
