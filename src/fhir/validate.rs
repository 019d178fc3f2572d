//! Typed validation of what chartbridge produces, through fhirbolt's strict R4 model (isolated
//! in the `fhir-validate` workspace crate). Used by `check`, `test` and the test suite, and as
//! an opt-in runtime guard; never on the per-request hot path by default.

use serde_json::Value;

use super::{Issue, OperationOutcome};

/// Validates a resource (a Bundle entry by entry). `Ok` or an outcome naming the element.
pub fn validate(resource: &Value) -> Result<(), OperationOutcome> {
    fhir_validate::validate_resource(resource)
        .map_err(|e| OperationOutcome::new(vec![Issue::error("structure", e.message).at(e.path)]))
}
