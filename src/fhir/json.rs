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

    /// Writes the tree as compact JSON text — byte for byte what serde_json writes — into a
    /// buffer of `capacity` to start with.
    pub fn to_vec(&self, capacity: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(capacity);
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Json::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Json::Num(n) => out.extend_from_slice(n.as_str().as_bytes()),
            Json::Str(t) => write_str(out, t),
            Json::Arr(items) => write_list(out, *b"[]", items, |out, item| item.write(out)),
            Json::Obj(members) => write_list(out, *b"{}", members, |out, (k, v)| {
                write_name(out, k);
                v.write(out);
            }),
            Json::Value(v) => write_value(out, v),
        }
    }

    /// The tree as a `serde_json::Value` (tests, the generated Questionnaire; not the hot path).
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

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(n.as_str().as_bytes()),
        Value::String(t) => write_str(out, t),
        Value::Array(items) => write_list(out, *b"[]", items, write_value),
        Value::Object(members) => write_list(out, *b"{}", members, |out, (k, v)| {
            write_key(out, k);
            write_value(out, v);
        }),
    }
}

/// `brackets[0]`, the items separated by commas, `brackets[1]`.
fn write_list<I: IntoIterator>(
    out: &mut Vec<u8>,
    [open, close]: [u8; 2],
    items: I,
    each: impl Fn(&mut Vec<u8>, I::Item),
) {
    out.push(open);
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item);
    }
    out.push(close);
}

/// An object member's key and colon.
fn write_key(out: &mut Vec<u8>, key: &str) {
    write_str(out, key);
    out.push(b':');
}

/// A FHIR element name and its colon: names are plain ASCII (written in this crate), so there
/// is nothing to escape and nothing to look for.
fn write_name(out: &mut Vec<u8>, name: &'static str) {
    debug_assert_eq!(plain_run(name.as_bytes(), 0), name.len(), "{name:?}");
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A JSON string, escaped as serde_json escapes: `"`, `\\` and the control characters (short
/// forms where JSON has them, else `\u00XX`); everything else as it is. Runs without anything
/// to escape are copied whole.
fn write_str(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut plain = 0;
    loop {
        let at = plain_run(bytes, plain);
        out.extend_from_slice(&bytes[plain..at]);
        let Some(&b) = bytes.get(at) else { break };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]),
        }
        plain = at + 1;
    }
    out.push(b'"');
}

/// Where the first `"`, `\\` or control character (below 0x20) at or after `from` is, or
/// `bytes.len()`: what ends a run of string text that needs no escaping, when reading JSON and
/// when writing it. Eight bytes at a time.
pub(crate) fn plain_run(bytes: &[u8], mut from: usize) -> usize {
    // High bit set in (at least) the lowest zero byte; bytes above it may be flagged too.
    let zero_bytes = |x: u64| x.wrapping_sub(splat(0x01)) & !x & splat(0x80);
    while let Some(word) = bytes.get(from..from + 8) {
        let Ok(word) = <[u8; 8]>::try_from(word) else {
            break;
        };
        let x = u64::from_le_bytes(word);
        // The lowest flagged byte of each test is exact, so the lowest of all three is the
        // first byte to stop at.
        let stop = zero_bytes(x ^ splat(b'"'))
            | zero_bytes(x ^ splat(b'\\'))
            | (x.wrapping_sub(splat(0x20)) & !x & splat(0x80));
        if stop != 0 {
            return from + (stop.trailing_zeros() / 8) as usize;
        }
        from += 8;
    }
    while let Some(&b) = bytes.get(from) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        from += 1;
    }
    from
}

/// `b` in each of a word's eight bytes (for the byte-parallel tests here and in the reader).
pub(crate) const fn splat(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every byte that can need escaping, and then some, written as serde_json writes it.
    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut text: String = (0u8..0x80).map(char::from).collect();
        text.push_str("caf\u{e9} \u{1f600} \u{2028}\\\"/end");
        for t in [text.as_str(), "", "plain", "\"", "a\nb"] {
            let ours = Json::from(t).to_vec(0);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(t).unwrap()
            );
        }
        let whole = json!({"a": [1, -0.5, 1e5, true, null, {"b": text, "": []}], "c": {}});
        assert_eq!(
            String::from_utf8(Json::Value(&whole).to_vec(0)).unwrap(),
            whole.to_string()
        );
    }

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
        let text = obs.to_vec(0);
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
