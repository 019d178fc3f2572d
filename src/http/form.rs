//! Form bodies as JSON. Jotform posts its webhooks as `multipart/form-data`, one text part per
//! field (its answers are a JSON document inside the `rawRequest` part); other form tools and
//! the relays between them (Wufoo, Gravity Forms, Zapier's and Make's form posts) send
//! `application/x-www-form-urlencoded`. A mapping reads either body as one JSON object, field
//! name → text, in the order posted (a name posted more than once → an array of its texts).
//! The JSON text made here is what the gateway maps, hashes and records, so a re-send with
//! another boundary — or the same fields in the other encoding — is the same submission.
//!
//! Lines may end in CRLF (the wire) or LF (captured fixtures). A file part is refused: nothing
//! of it could be kept.

use serde_json::{Map, Value};

/// Why a form body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("multipart/form-data without a boundary parameter")]
    NoBoundary,
    #[error("malformed multipart body: {0}")]
    Malformed(&'static str),
    #[error("part `{0}` is a file: only text fields are accepted")]
    File(String),
    #[error("part `{0}` is not UTF-8 text")]
    NotText(String),
    #[error("field {0} is not UTF-8 text once percent-decoded")]
    NotTextField(usize),
}

/// The boundary of a `multipart/form-data` content type, `None` for any other type.
pub fn multipart_boundary(content_type: &str) -> Option<Result<&str, FormError>> {
    let mut params = content_type.split(';');
    let essence = params.next()?.trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let boundary = params
        .filter_map(|p| p.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|b| !b.is_empty());
    Some(boundary.ok_or(FormError::NoBoundary))
}

/// The text fields of a multipart body as the text of one JSON object.
pub fn multipart_to_json(body: &[u8], boundary: &str) -> Result<Vec<u8>, FormError> {
    let delimiter = [b"--", boundary.as_bytes()].concat();
    let mut fields = Map::new();
    // The preamble (usually nothing) ends at the first delimiter.
    let mut rest = after(body, &delimiter).ok_or(FormError::Malformed("no boundary line"))?;
    loop {
        if rest.starts_with(b"--") {
            return encoded(fields);
        }
        rest = line_end(rest).ok_or(FormError::Malformed("text after a boundary"))?;
        let (name, file) = headers(&mut rest)?;
        // The part runs to the line break before the next delimiter.
        let end = find(rest, &delimiter).ok_or(FormError::Malformed("no closing boundary"))?;
        let value = strip_line_break(&rest[..end]);
        rest = &rest[end + delimiter.len()..];
        if file {
            return Err(FormError::File(name));
        }
        let Ok(text) = std::str::from_utf8(value) else {
            return Err(FormError::NotText(name));
        };
        add(&mut fields, name, text.to_owned());
    }
}

/// Whether a content type is `application/x-www-form-urlencoded`.
pub fn is_urlencoded(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|essence| {
        essence
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

/// The fields of an `application/x-www-form-urlencoded` body as the text of one JSON object,
/// read as the WHATWG URL standard reads them: `&`-separated `name=value` pairs (no `=`: an
/// empty value; empty pairs skipped), `+` a space, `%XX` a byte (a `%` without two hex digits
/// after it stays as it is). Decoded names and values must be UTF-8: nothing is replaced.
pub fn urlencoded_to_json(body: &[u8]) -> Result<Vec<u8>, FormError> {
    let mut fields = Map::new();
    for (i, pair) in body
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &b""[..]),
        };
        let text = |part: &[u8]| {
            String::from_utf8(percent_decode(part)).map_err(|_| FormError::NotTextField(i + 1))
        };
        add(&mut fields, text(name)?, text(value)?);
    }
    encoded(fields)
}

fn percent_decode(part: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(part.len());
    let mut i = 0;
    while let Some(&b) = part.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => match (
                part.get(i + 1).and_then(|&h| hex(h)),
                part.get(i + 2).and_then(|&l| hex(l)),
            ) {
                (Some(h), Some(l)) => {
                    // Two hex digits: at most 0xff.
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// One more field; a name posted again makes an array of its texts, in order.
fn add(fields: &mut Map<String, Value>, name: String, text: String) {
    let text = Value::String(text);
    match fields.get_mut(&name) {
        None => {
            fields.insert(name, text);
        }
        Some(Value::Array(texts)) => texts.push(text),
        Some(first) => *first = Value::Array(vec![first.take(), text]),
    }
}

fn encoded(fields: Map<String, Value>) -> Result<Vec<u8>, FormError> {
    serde_json::to_vec(&Value::Object(fields))
        .map_err(|_| FormError::Malformed("unencodable field"))
}

/// A part's headers, up to and past the empty line: its field name, and whether it is a file.
fn headers(rest: &mut &[u8]) -> Result<(String, bool), FormError> {
    let mut name = None;
    let mut file = false;
    loop {
        let end = find(rest, b"\n").ok_or(FormError::Malformed("a part without a body"))?;
        let line = strip_cr(&rest[..end]);
        *rest = &rest[end + 1..];
        if line.is_empty() {
            break;
        }
        let line = std::str::from_utf8(line).map_err(|_| FormError::Malformed("a header"))?;
        let Some((header, value)) = line.split_once(':') else {
            return Err(FormError::Malformed("a header without `:`"));
        };
        if header.trim().eq_ignore_ascii_case("content-disposition") {
            for param in value.split(';').skip(1) {
                match param.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                    Some((k, v)) if k.eq_ignore_ascii_case("name") => {
                        name = Some(unquote(v).to_owned())
                    }
                    Some((k, _)) if k.eq_ignore_ascii_case("filename") => file = true,
                    _ => {}
                }
            }
        }
    }
    let name = name.ok_or(FormError::Malformed("a part without a field name"))?;
    Ok((name, file))
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn after<'a>(haystack: &'a [u8], needle: &[u8]) -> Option<&'a [u8]> {
    find(haystack, needle).map(|i| &haystack[i + needle.len()..])
}

/// Past the end of the current line (only spaces or tabs may come before it).
fn line_end(rest: &[u8]) -> Option<&[u8]> {
    let end = find(rest, b"\n")?;
    strip_cr(&rest[..end])
        .iter()
        .all(|b| matches!(b, b' ' | b'\t'))
        .then(|| &rest[end + 1..])
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Without the line break that belongs to the delimiter after it.
fn strip_line_break(value: &[u8]) -> &[u8] {
    value
        .strip_suffix(b"\r\n")
        .or_else(|| value.strip_suffix(b"\n"))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::read(root.join("fixtures/vendors").join(name)).unwrap()
    }

    fn boundary_of(body: &[u8]) -> String {
        let first = body.split(|b| *b == b'\n').next().unwrap();
        String::from_utf8(strip_cr(first)[2..].to_vec()).unwrap()
    }

    fn crlf(body: &[u8]) -> Vec<u8> {
        String::from_utf8(body.to_vec())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes()
    }

    #[test]
    fn a_jotform_webhook_reads_as_its_field_map_with_lf_or_crlf() {
        let body = fixture("jotform.webhook.glp1-intake.multipart");
        let expected: Value =
            serde_json::from_slice(&fixture("jotform.webhook.glp1-intake.form-fields.json"))
                .unwrap();
        let boundary = boundary_of(&body);
        for body in [body.clone(), crlf(&body)] {
            let json = multipart_to_json(&body, &boundary).unwrap();
            let read: Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(read, expected);
            // In the order posted.
            let keys: Vec<&String> = read.as_object().unwrap().keys().collect();
            let expected_keys: Vec<&String> = expected.as_object().unwrap().keys().collect();
            assert_eq!(keys, expected_keys);
        }
    }

    #[test]
    fn a_captured_jotform_webhook_keeps_its_colons_and_commas() {
        let body = fixture("zulip.jotform.response_with_colon_comma_characters.multipart");
        let json = multipart_to_json(&crlf(&body), &boundary_of(&body)).unwrap();
        let read: Value = serde_json::from_slice(&json).unwrap();
        let raw: Value =
            serde_json::from_str(read["rawRequest"].as_str().expect("rawRequest")).unwrap();
        assert!(raw.is_object());
        assert!(read["pretty"].as_str().unwrap().contains(':'));
    }

    #[test]
    fn boundaries_repeated_names_and_refusals() {
        assert_eq!(
            multipart_boundary("multipart/form-data; boundary=\"abc\""),
            Some(Ok("abc"))
        );
        assert_eq!(
            multipart_boundary("Multipart/Form-Data;charset=utf-8; BOUNDARY=x-1"),
            Some(Ok("x-1"))
        );
        assert_eq!(
            multipart_boundary("multipart/form-data"),
            Some(Err(FormError::NoBoundary))
        );
        assert_eq!(multipart_boundary("application/json"), None);

        let body = b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\none\r\n--b\r\n\
            Content-Disposition: form-data; name=\"a\"\r\n\r\ntwo\r\nlines\r\n--b\r\n\
            content-disposition: form-data; name=\"empty\"\r\n\r\n\r\n--b--\r\n";
        let read: Value = serde_json::from_slice(&multipart_to_json(body, "b").unwrap()).unwrap();
        assert_eq!(
            read,
            serde_json::json!({"a": ["one", "two\r\nlines"], "empty": ""})
        );

        let file = b"--b\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"x.pdf\"\r\n\
            Content-Type: application/pdf\r\n\r\n%PDF\r\n--b--\r\n";
        assert_eq!(
            multipart_to_json(file, "b"),
            Err(FormError::File("doc".into()))
        );
        let binary = b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n\xff\r\n--b--";
        assert_eq!(
            multipart_to_json(binary, "b"),
            Err(FormError::NotText("x".into()))
        );
        for broken in [
            &b"no delimiter at all"[..],
            b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nunclosed",
            b"--b\r\nno colon here\r\n\r\nx\r\n--b--",
            b"--b\r\nContent-Disposition: form-data\r\n\r\nnameless\r\n--b--",
            b"--b\r\nContent-Disposition: form-data; name=\"x\"",
        ] {
            assert!(
                matches!(multipart_to_json(broken, "b"), Err(FormError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(broken)
            );
        }
    }

    /// The same fields as the multipart fixture, urlencoded as a browser would.
    fn urlencode(fields: &Map<String, Value>) -> Vec<u8> {
        let escape = |s: &str| {
            s.bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                        char::from(b).to_string()
                    }
                    b' ' => "+".into(),
                    b => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        fields
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v.as_str().unwrap())))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes()
    }

    #[test]
    fn an_urlencoded_body_reads_as_the_same_object_as_its_multipart_twin() {
        let multipart = fixture("jotform.webhook.glp1-intake.multipart");
        let from_multipart = multipart_to_json(&multipart, &boundary_of(&multipart)).unwrap();
        let fields: Value = serde_json::from_slice(&from_multipart).unwrap();
        let body = urlencode(fields.as_object().unwrap());
        // Byte for byte: the same submission, whichever way it was posted.
        assert_eq!(urlencoded_to_json(&body).unwrap(), from_multipart);
    }

    #[test]
    fn urlencoded_pairs_escapes_repeats_and_refusals() {
        let read = |body: &[u8]| -> Value {
            serde_json::from_slice(&urlencoded_to_json(body).unwrap()).unwrap()
        };
        assert_eq!(
            read(b"a=1+2&b=%E2%9C%93&a=x%3Dy%26z&&flag&empty=&pct=100%&odd=%zz%4"),
            serde_json::json!({
                "a": ["1 2", "x=y&z"], "b": "\u{2713}", "flag": "", "empty": "",
                "pct": "100%", "odd": "%zz%4"
            })
        );
        assert_eq!(read(b""), serde_json::json!({}));
        assert_eq!(read(b"na%6De=v"), serde_json::json!({"name": "v"}));
        assert_eq!(
            urlencoded_to_json(b"ok=1&bad=%FF"),
            Err(FormError::NotTextField(2))
        );
        assert_eq!(
            urlencoded_to_json(b"%C3=1"),
            Err(FormError::NotTextField(1))
        );
        assert!(is_urlencoded("application/x-www-form-urlencoded"));
        assert!(is_urlencoded(
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8"
        ));
        assert!(!is_urlencoded("application/json"));
    }
}
