//! `Json`: the writing side of JSON. What the gateway produces per submission (the transaction
//! Bundle and its resources) is built as this tree and serialised once, straight to bytes.
//!
//! `serde_json::Value` stays the reading side (payloads, mapping files, EHR answers). As a tree
//! to *build* it is costly: each object is an `IndexMap` whose keys are owned `String`s hashed
//! with SipHash, and every coding copied from a mapping is a deep clone. Here object keys are
//! FHIR element names (`&'static str`, neither allocated nor hashed), an object is a `Vec` of
//! pairs in the order written, strings borrow where they can, and pieces of a mapping (codes,
//! categories) are written from where they are (`Json::Value`), not copied.

use std::borrow::Cow;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Number, Value};

/// A JSON tree to be written. Build objects with [`Json::obj`] and [`Json::set`].
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Bool(bool),
    Int(i64),
    /// A number as its text (FHIR decimals such as `72.50` keep their digits).
    Num(Cow<'a, Number>),
    Str(Cow<'a, str>),
    Arr(Vec<Json<'a>>),
    /// Members in the order they are written; keys are unique (see [`Json::set`]).
    Obj(Vec<(&'static str, Json<'a>)>),
    /// JSON from elsewhere (a mapping's codes and categories), written as it is.
    Value(&'a Value),
}

impl<'a> Json<'a> {
    /// An object of `pairs` (keys distinct, as in any literal).
    pub fn obj<const N: usize>(pairs: [(&'static str, Json<'a>); N]) -> Self {
        Json::Obj(pairs.into())
    }

    /// Sets `key` of an object: replaces its value, or appends the member. No-op on non-objects.
    pub fn set(&mut self, key: &'static str, value: Json<'a>) {
        if let Json::Obj(members) = self {
            match members.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => *v = value,
                None => members.push((key, value)),
            }
        }
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Obj(members) => members.iter().find(|(k, _)| *k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Writes the tree as compact JSON text into a buffer of `capacity` to start with.
    pub fn to_vec(&self, capacity: usize) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(capacity);
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }

    /// The tree as a `serde_json::Value` (for tests; not the hot path).
    pub fn to_value(&self) -> Value {
        match self {
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::from(*i),
            Json::Num(n) => Value::Number(n.clone().into_owned()),
            Json::Str(s) => Value::String(s.to_string()),
            Json::Arr(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Obj(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_value()))
                    .collect(),
            ),
            Json::Value(v) => (*v).clone(),
        }
    }
}

impl<'a> From<&'a str> for Json<'a> {
    fn from(s: &'a str) -> Self {
        Json::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Json<'_> {
    fn from(s: String) -> Self {
        Json::Str(Cow::Owned(s))
    }
}

impl<'a> From<Cow<'a, str>> for Json<'a> {
    fn from(s: Cow<'a, str>) -> Self {
        Json::Str(s)
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Int(i) => s.serialize_i64(*i),
            Json::Num(n) => n.serialize(s),
            Json::Str(t) => s.serialize_str(t),
            Json::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Obj(members) => {
                let mut map = s.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
            Json::Value(v) => v.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_what_value_would_write() {
        let code =
            json!({"system": "http://loinc.org", "code": "29463-7", "display": "Body \"weight\""});
        let n: Number = serde_json::from_str("72.50").unwrap();
        let mut obs = Json::obj([
            ("resourceType", "Observation".into()),
            ("code", Json::Arr(vec![Json::Value(&code)])),
            (
                "valueQuantity",
                Json::obj([("value", Json::Num(Cow::Borrowed(&n)))]),
            ),
        ]);
        obs.set("status", "final".into());
        obs.set("resourceType", "Observation".into());
        obs.set("count", Json::Int(-3));
        obs.set("ok", Json::Bool(false));
        let text = obs.to_vec(0).unwrap();
        assert_eq!(
            String::from_utf8(text.clone()).unwrap(),
            r#"{"resourceType":"Observation","code":[{"system":"http://loinc.org","code":"29463-7","display":"Body \"weight\""}],"valueQuantity":{"value":72.50},"status":"final","count":-3,"ok":false}"#
        );
        let parsed: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(parsed, obs.to_value());
        assert_eq!(obs.get("status"), Some(&Json::from("final")));
        assert_eq!(obs.get("nothing"), None);
    }
}
