//! FHIR `transaction` Bundles: entries with `urn:uuid` fullUrls and conditional requests; and
//! the `searchset` Bundle a search answers with.

use std::borrow::Cow;

use serde_json::{json, Value};

use super::json::Json;

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
pub struct TransactionBuilder<'a> {
    entries: Vec<Json<'a>>,
}

impl<'a> TransactionBuilder<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `resource` at `full_url` (a `urn:uuid:`), written as `conditional` says.
    pub fn push(
        &mut self,
        full_url: impl Into<Cow<'a, str>>,
        resource: Json<'a>,
        conditional: Conditional,
    ) {
        let resource_type: Cow<'a, str> = match resource.get("resourceType") {
            Some(Json::Str(t)) => t.clone(),
            _ => Cow::Borrowed("Resource"),
        };
        self.entries.push(Json::obj([
            ("fullUrl", full_url.into().into()),
            ("resource", resource),
            ("request", request(resource_type, conditional)),
        ]));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn build(self) -> Json<'a> {
        let mut bundle = Json::obj([
            ("resourceType", "Bundle".into()),
            ("type", "transaction".into()),
        ]);
        if !self.entries.is_empty() {
            bundle.set("entry", Json::Arr(self.entries));
        }
        bundle
    }
}

/// An entry's `request`: a conditional create or update of `resource_type`.
fn request(resource_type: Cow<'_, str>, conditional: Conditional) -> Json<'_> {
    match conditional {
        Conditional::Create { if_none_exist } => Json::obj([
            ("method", "POST".into()),
            ("url", resource_type.into()),
            ("ifNoneExist", if_none_exist.into()),
        ]),
        Conditional::Update { query } => Json::obj([
            ("method", "PUT".into()),
            ("url", format!("{resource_type}?{query}").into()),
        ]),
    }
}

/// A transaction entry as a `Value` (for callers off the hot path that build resources as
/// `Value`s): `resource` at `full_url`, written as `conditional` says — or, without one, a
/// plain create (for a caller with nothing to match on).
pub fn entry(full_url: String, resource: Value, conditional: Option<Conditional>) -> Value {
    let resource_type = resource["resourceType"]
        .as_str()
        .unwrap_or("Resource")
        .to_string();
    let request = match conditional {
        Some(c) => request(Cow::Borrowed(&resource_type), c).to_value(),
        None => json!({"method": "POST", "url": resource_type}),
    };
    json!({"fullUrl": full_url, "resource": resource, "request": request})
}

/// A typed reference to another entry of the same Bundle (`type` lets validators check it
/// before the server has rewritten the `urn:uuid`).
pub fn reference<'a>(full_url: impl Into<Cow<'a, str>>, resource_type: &'a str) -> Json<'a> {
    Json::obj([
        ("reference", full_url.into().into()),
        ("type", resource_type.into()),
    ])
}

/// A search's answer: every match, in order (no paging).
pub fn searchset(matches: Vec<Value>) -> Value {
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": matches.len(),
    });
    // FHIR allows no empty arrays: no match, no `entry`.
    if !matches.is_empty() {
        bundle["entry"] = matches
            .into_iter()
            .map(|resource| json!({"resource": resource, "search": {"mode": "match"}}))
            .collect();
    }
    bundle
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
            Json::obj([("resourceType", "Observation".into())]),
            Conditional::Create {
                if_none_exist: "identifier=s|v".into(),
            },
        );
        let v = b.build().to_value();
        assert_eq!(v["entry"][0]["request"]["url"], "Observation");
        assert_eq!(v["entry"][0]["request"]["ifNoneExist"], "identifier=s|v");
    }
}
