//! FHIR `transaction` Bundles: entries with `urn:uuid` fullUrls and conditional requests.

use serde_json::{json, Value};

use super::object;

/// How an entry is written so that a retried or re-sent Bundle never duplicates anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// `POST Type` with `ifNoneExist: <query>`: created once, matched afterwards.
    Create { if_none_exist: String },
    /// `PUT Type?<query>`: creates, or updates the one match.
    Update { query: String },
}

/// Builds a `transaction` Bundle entry by entry.
#[derive(Debug, Default)]
pub struct TransactionBuilder {
    entries: Vec<Value>,
}

impl TransactionBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `resource` at `full_url` (a `urn:uuid:`), written as `conditional` says.
    pub fn push(&mut self, full_url: &str, resource: Value, conditional: Conditional) {
        let resource_type = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("Resource")
            .to_string();
        let request = match conditional {
            Conditional::Create { if_none_exist } => object([
                ("method", "POST".into()),
                ("url", resource_type.into()),
                ("ifNoneExist", if_none_exist.into()),
            ]),
            Conditional::Update { query } => object([
                ("method", "PUT".into()),
                ("url", format!("{resource_type}?{query}").into()),
            ]),
        };
        self.entries.push(object([
            ("fullUrl", full_url.into()),
            ("resource", resource),
            ("request", request),
        ]));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn build(self) -> Value {
        let mut bundle = json!({"resourceType": "Bundle", "type": "transaction"});
        if !self.entries.is_empty() {
            bundle["entry"] = Value::Array(self.entries);
        }
        bundle
    }
}

/// A typed reference to another entry of the same Bundle (`type` lets validators check it
/// before the server has rewritten the `urn:uuid`).
pub fn reference(full_url: &str, resource_type: &str) -> Value {
    object([
        ("reference", full_url.into()),
        ("type", resource_type.into()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_conditional_entries_and_omits_empty_entry_lists() {
        assert!(TransactionBuilder::new().build().get("entry").is_none());
        let mut b = TransactionBuilder::new();
        b.push(
            "urn:uuid:1",
            json!({"resourceType": "Observation"}),
            Conditional::Create {
                if_none_exist: "identifier=s|v".into(),
            },
        );
        let v = b.build();
        assert_eq!(v["entry"][0]["request"]["url"], "Observation");
        assert_eq!(v["entry"][0]["request"]["ifNoneExist"], "identifier=s|v");
    }
}
