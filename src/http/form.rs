//! Form bodies as JSON. Jotform posts its webhooks as `multipart/form-data`, one text part per
//! field (its answers are a JSON document inside the `rawRequest` part); a mapping reads such a
//! body as one JSON object, field name → text, in the order posted (a name posted more than
//! once → an array of its texts). The JSON text made here is what the gateway maps, hashes and
//! records, so a re-send with another boundary is the same submission.
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
            return serde_json::to_vec(&Value::Object(fields))
                .map_err(|_| FormError::Malformed("unencodable field"));
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
        let text = Value::String(text.to_owned());
        match fields.get_mut(&name) {
            None => {
                fields.insert(name, text);
            }
            Some(Value::Array(texts)) => texts.push(text),
            Some(first) => *first = Value::Array(vec![first.take(), text]),
        }
    }
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
}
