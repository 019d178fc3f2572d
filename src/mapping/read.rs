//! Reading a payload's bytes: one pass that checks the whole text is JSON, counts how deep it
//! nests (skipped parts included) and builds as a `Value` only what the mapping's `Projection`
//! names. Skipped parts are checked as strictly as serde_json checks what it builds — UTF-8,
//! escapes, paired surrogates, no control characters in strings, the number grammar — but
//! nothing of them is allocated: most of a Typeform webhook (its form definition) is read by
//! no mapping. What is built is what serde_json would build (numbers keep their text, later
//! duplicate keys win in the first one's place).

use std::borrow::Cow;
use std::str::FromStr;

use serde_json::{Map, Number, Value};

use super::select::Projection;
use crate::fhir::json::{plain_run, splat};

/// Nesting is never followed deeper than this, whatever the limit asked for (serde_json's own
/// limit; deeper would risk the stack).
pub const RECURSION_LIMIT: usize = 128;

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("not JSON: {what} at line {line}, column {column}")]
    NotJson {
        what: &'static str,
        line: usize,
        column: usize,
    },
    #[error("the JSON nests deeper than {0} levels")]
    TooDeep(usize),
}

/// Reads `raw` through `projection`, refusing JSON nested deeper than `max_depth` arrays and
/// objects (at most `RECURSION_LIMIT`).
pub(super) fn read(
    projection: &Projection,
    raw: &[u8],
    max_depth: usize,
) -> Result<Value, PayloadError> {
    let max = max_depth.min(RECURSION_LIMIT);
    // Checked whole first (fast for ASCII); then every string is a slice of it. Outside
    // strings anything but ASCII is a syntax error anyway.
    let read = match std::str::from_utf8(raw) {
        Ok(text) => Reader { text, at: 0, max }.document(What::of(projection)),
        Err(e) => Err(Fail::Syntax {
            what: "invalid unicode code point",
            at: e.valid_up_to(),
        }),
    };
    read.map_err(|fail| match fail {
        Fail::TooDeep => PayloadError::TooDeep(max),
        Fail::Syntax { what, at } => {
            let (line, column) = position(raw, at);
            PayloadError::NotJson { what, line, column }
        }
    })
}

/// What to make of a value: build it whole, build the parts a projection names, or skip it.
#[derive(Clone, Copy)]
enum What<'p> {
    Whole,
    Project(&'p Projection),
    Skip,
}

impl<'p> What<'p> {
    fn of(p: &'p Projection) -> What<'p> {
        if p.all {
            What::Whole
        } else {
            What::Project(p)
        }
    }

    /// What to make of the member `key` of this object.
    fn member(self, key: &str) -> What<'p> {
        match self {
            What::Whole => What::Whole,
            What::Project(p) => p
                .keys
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, n)| n)
                .or(p.any.as_deref())
                .map_or(What::Skip, What::of),
            What::Skip => What::Skip,
        }
    }

    /// What to make of each element of this array.
    fn element(self) -> What<'p> {
        match self {
            What::Whole => What::Whole,
            What::Project(p) => p.any.as_deref().map_or(What::Skip, What::of),
            What::Skip => What::Skip,
        }
    }

    fn builds(self) -> bool {
        !matches!(self, What::Skip)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Object,
    Array,
}

enum Fail {
    Syntax { what: &'static str, at: usize },
    TooDeep,
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
    max: usize,
}

type Step<T> = Result<T, Fail>;

impl<'a> Reader<'a> {
    fn document(&mut self, what: What) -> Step<Value> {
        self.whitespace();
        let v = self.value(what, 0)?;
        self.whitespace();
        if self.at < self.raw().len() {
            return Err(self.fail("trailing characters"));
        }
        Ok(v)
    }

    fn raw(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn fail(&self, what: &'static str) -> Fail {
        Fail::Syntax { what, at: self.at }
    }

    fn peek(&self) -> Option<u8> {
        self.raw().get(self.at).copied()
    }

    /// Skips whitespace: usually none or one byte; the indentation of pretty-printed JSON
    /// eight bytes at a time.
    fn whitespace(&mut self) {
        if !matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            return;
        }
        while let Some(x) = self.word() {
            // High bit of each byte that is not whitespace (exact per byte).
            let other = nonzero_bytes(x ^ splat(b' '))
                & nonzero_bytes(x ^ splat(b'\n'))
                & nonzero_bytes(x ^ splat(b'\r'))
                & nonzero_bytes(x ^ splat(b'\t'));
            if other != 0 {
                self.at += (other.trailing_zeros() / 8) as usize;
                return;
            }
            self.at += 8;
        }
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// One value, whitespace before it already skipped; `depth` containers are open around it.
    /// A scalar where a projection expected an object or array is `null`: no selector can step
    /// into it, so it selects the same nothing.
    fn value(&mut self, what: What, depth: usize) -> Step<Value> {
        let whole = matches!(what, What::Whole);
        match self.peek() {
            Some(b'{') if what.builds() => self.object(what, depth),
            Some(b'[') if what.builds() => self.array(what, depth),
            Some(b'"') if whole => {
                self.at += 1;
                Ok(Value::String(self.string(true)?.into_owned()))
            }
            Some(b't') if whole => self.literal(b"true").map(|()| Value::Bool(true)),
            Some(b'f') if whole => self.literal(b"false").map(|()| Value::Bool(false)),
            Some(b'-' | b'0'..=b'9') if whole => {
                let start = self.at;
                let text = self.number()?;
                Number::from_str(text)
                    .map(Value::Number)
                    .map_err(|_| Fail::Syntax {
                        what: "invalid number",
                        at: start,
                    })
            }
            // `null`, what is not built, and what is not JSON.
            _ => self.skip(depth).map(|()| Value::Null),
        }
    }

    /// `value` for what is not built: checked, nesting counted, nothing allocated.
    fn skip(&mut self, depth: usize) -> Step<()> {
        match self.peek() {
            Some(b'{') => self.members(depth, Kind::Object, false, |r, _| r.skip(depth + 1)),
            Some(b'[') => self.members(depth, Kind::Array, false, |r, _| r.skip(depth + 1)),
            Some(b'"') => {
                self.at += 1;
                self.string(false).map(drop)
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number().map(drop),
            Some(_) => Err(self.fail("expected value")),
            None => Err(self.fail("EOF while parsing a value")),
        }
    }

    fn object(&mut self, what: What, depth: usize) -> Step<Value> {
        let mut out = Map::new();
        self.members(depth, Kind::Object, true, |r, key| {
            let member = what.member(&key);
            let v = r.value(member, depth + 1)?;
            if member.builds() {
                out.insert(key.into_owned(), v);
            }
            Ok(())
        })?;
        Ok(Value::Object(out))
    }

    fn array(&mut self, what: What, depth: usize) -> Step<Value> {
        let each = what.element();
        let mut out = Vec::new();
        self.members(depth, Kind::Array, false, |r, _| {
            let v = r.value(each, depth + 1)?;
            if each.builds() {
                out.push(v);
            }
            Ok(())
        })?;
        Ok(Value::Array(out))
    }

    /// An object or array from its opening bracket past its closing one, `depth` containers
    /// around it: `each` reads one member's value (with its key when `keys`; `""` otherwise)
    /// or one element.
    fn members(
        &mut self,
        depth: usize,
        kind: Kind,
        keys: bool,
        mut each: impl FnMut(&mut Self, Cow<'a, str>) -> Step<()>,
    ) -> Step<()> {
        if depth >= self.max {
            return Err(Fail::TooDeep);
        }
        let (close, eof, expected) = match kind {
            Kind::Object => (b'}', "EOF while parsing an object", "expected `,` or `}`"),
            Kind::Array => (b']', "EOF while parsing a list", "expected `,` or `]`"),
        };
        self.at += 1;
        self.whitespace();
        if self.peek() == Some(close) {
            self.at += 1;
            return Ok(());
        }
        loop {
            let key = match kind {
                Kind::Array => Cow::Borrowed(""),
                Kind::Object => {
                    match self.peek() {
                        Some(b'"') => self.at += 1,
                        Some(_) => return Err(self.fail("key must be a string")),
                        None => return Err(self.fail(eof)),
                    }
                    let key = self.string(keys)?;
                    self.whitespace();
                    if self.peek() != Some(b':') {
                        return Err(self.fail("expected `:`"));
                    }
                    self.at += 1;
                    self.whitespace();
                    key
                }
            };
            each(self, key)?;
            self.whitespace();
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    self.whitespace();
                }
                Some(b) if b == close => {
                    self.at += 1;
                    return Ok(());
                }
                Some(_) => return Err(self.fail(expected)),
                None => return Err(self.fail(eof)),
            }
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Step<()> {
        for &expected in word {
            match self.peek() {
                Some(b) if b == expected => self.at += 1,
                Some(_) => return Err(self.fail("expected true, false or null")),
                None => return Err(self.fail("EOF while parsing a value")),
            }
        }
        Ok(())
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, as its text.
    fn number(&mut self) -> Step<&'a str> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.at += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.fail("invalid number"));
                }
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.fail("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
        }
        self.utf8(start)
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Step<()> {
        match self.peek() {
            Some(b'0'..=b'9') => {
                self.digits();
                Ok(())
            }
            Some(_) => Err(self.fail("invalid number")),
            None => Err(self.fail("EOF while parsing a value")),
        }
    }

    /// A string after its opening quote, up to and past its closing one. Its text (borrowed
    /// unless it had escapes) when `build`; otherwise checked only, and `""` returned.
    fn string(&mut self, build: bool) -> Step<Cow<'a, str>> {
        let mut owned: Option<String> = None;
        let mut segment = self.at;
        loop {
            self.at = plain_run(self.raw(), self.at);
            let text = self.utf8(segment)?;
            match self.peek() {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(match (build, owned) {
                        (false, _) => Cow::Borrowed(""),
                        (true, None) => Cow::Borrowed(text),
                        (true, Some(mut s)) => {
                            s.push_str(text);
                            Cow::Owned(s)
                        }
                    });
                }
                Some(b'\\') => {
                    self.at += 1;
                    let c = self.escape()?;
                    if build {
                        let s = owned.get_or_insert_with(String::new);
                        s.push_str(text);
                        s.push(c);
                    }
                    segment = self.at;
                }
                Some(_) => {
                    return Err(self
                        .fail("control character (\\u0000-\\u001F) found while parsing a string"))
                }
                None => return Err(self.fail("EOF while parsing a string")),
            }
        }
    }

    /// The next eight bytes, the first one lowest.
    fn word(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.raw().get(self.at..self.at + 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }

    /// The text from `start` to here. Both ends are at ASCII bytes (a quote, a backslash or
    /// right after an escape), so never inside a character.
    fn utf8(&self, start: usize) -> Step<&'a str> {
        self.text.get(start..self.at).ok_or(Fail::Syntax {
            what: "invalid unicode code point",
            at: start,
        })
    }

    /// An escape after its backslash. A `\u` leading surrogate must be followed by a `\u`
    /// trailing one; a trailing one alone is an error.
    fn escape(&mut self) -> Step<char> {
        let Some(b) = self.peek() else {
            return Err(self.fail("EOF while parsing a string"));
        };
        self.at += 1;
        Ok(match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let n = self.hex4()?;
                let code = match n {
                    0xDC00..=0xDFFF => {
                        return Err(self.fail("lone trailing surrogate in hex escape"))
                    }
                    0xD800..=0xDBFF => {
                        if self.raw().get(self.at..self.at + 2) != Some(b"\\u") {
                            return Err(self.fail("unexpected end of hex escape"));
                        }
                        self.at += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(self.fail("lone leading surrogate in hex escape"));
                        }
                        0x1_0000 + (((n - 0xD800) << 10) | (low - 0xDC00))
                    }
                    n => n,
                };
                char::from_u32(code).ok_or_else(|| self.fail("invalid unicode code point"))?
            }
            _ => {
                self.at -= 1;
                return Err(self.fail("invalid escape"));
            }
        })
    }

    fn hex4(&mut self) -> Step<u32> {
        let mut n = 0;
        for _ in 0..4 {
            let digit = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                Some(_) => return Err(self.fail("invalid escape")),
                None => return Err(self.fail("EOF while parsing a string")),
            };
            n = n * 16 + u32::from(digit);
            self.at += 1;
        }
        Ok(n)
    }
}

/// High bit set in exactly the bytes of `x` that are not zero.
fn nonzero_bytes(x: u64) -> u64 {
    (((x & splat(0x7f)) + splat(0x7f)) | x) & splat(0x80)
}

/// 1-based line and column (in bytes) of an offset.
fn position(raw: &[u8], at: usize) -> (usize, usize) {
    let before = &raw[..at.min(raw.len())];
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let column = 1 + before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(raw: &[u8]) -> Result<Value, PayloadError> {
        read(&Projection::all(), raw, usize::MAX)
    }

    /// The documents mutated below: every fixture payload, and text full of what a JSON reader
    /// gets wrong (escapes, surrogates, numbers, whitespace, non-ASCII).
    fn corpus() -> Vec<Vec<u8>> {
        let mut docs: Vec<Vec<u8>> = vec![
            br#"{"a":[1,-0.50,1e5,2E-3,0,-0,true,false,null,"x\"y\u00e9\ud83d\ude00[{\/\b\f\n\r\t"]}"#.to_vec(),
            "{\n\t\"caf\u{e9}\" : [ {} , [ ] , \"\u{1f600} \u{7f}\" ] ,\r\n \"k\":{\"k\":1,\"k\":2} }\n".as_bytes().to_vec(),
            br#"[[[[["deep"]]]],{"":""},12345678901234567890123,1.7976931348623157e309]"#.to_vec(),
        ];
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for dir in std::fs::read_dir(fixtures).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.path().to_string_lossy().ends_with(".input.json") {
                    docs.push(std::fs::read(f.path()).unwrap());
                }
            }
        }
        assert!(docs.len() > 16);
        docs
    }

    /// Accepts exactly what serde_json accepts and reads it to the same `Value`, number text and
    /// key order included: the corpus as it is, and 12,000 mutations of it (bytes deleted,
    /// inserted, replaced, documents cut short).
    #[test]
    fn reads_what_serde_json_reads_and_refuses_what_it_refuses() {
        const BYTES: &[u8] =
            b"{}[]\",:\\/0123-+.eEtrufalsn u\n\t\r\x01\x1f\x7f\xc3\xa9\xff\xed\xa0Dd8b";
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut accepted, mut refused) = (0, 0);
        for doc in corpus() {
            let mut cases = vec![doc.clone()];
            for _ in 0..12_000 / 19 {
                let mut m = doc.clone();
                for _ in 0..1 + next(2) {
                    let at = next(m.len() + 1);
                    match next(4) {
                        0 if at < m.len() => {
                            m.remove(at);
                        }
                        1 => m.insert(at, BYTES[next(BYTES.len())]),
                        2 if at < m.len() => m[at] = BYTES[next(BYTES.len())],
                        _ => m.truncate(at),
                    }
                }
                cases.push(m);
            }
            for case in cases {
                let theirs = serde_json::from_slice::<Value>(&case);
                match (whole(&case), theirs) {
                    (Ok(ours), Ok(theirs)) => {
                        assert_eq!(ours.to_string(), theirs.to_string());
                        accepted += 1;
                    }
                    (Err(PayloadError::NotJson { .. }), Err(_)) => refused += 1,
                    (ours, theirs) => panic!(
                        "{:?}: ours {ours:?}, serde_json's {theirs:?}",
                        String::from_utf8_lossy(&case)
                    ),
                }
            }
        }
        // Both outcomes were exercised plenty.
        assert!(accepted > 2_000 && refused > 6_000, "{accepted} {refused}");
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(
            whole(b"{\n  \"a\": tru }").unwrap_err(),
            PayloadError::NotJson {
                what: "expected true, false or null",
                line: 2,
                column: 11
            }
        );
        assert_eq!(
            whole(b"[1,\n\"\\ud800x\"]").unwrap_err(),
            PayloadError::NotJson {
                what: "unexpected end of hex escape",
                line: 2,
                column: 8
            }
        );
        assert!(matches!(
            whole(b"\"caf\xc3\""),
            Err(PayloadError::NotJson {
                what: "invalid unicode code point",
                line: 1,
                column: 5
            })
        ));
        assert_eq!(whole(b"[[[]]]").map(|v| v.to_string()), Ok("[[[]]]".into()));
        assert_eq!(
            read(&Projection::all(), b"[[[]]]", 2),
            Err(PayloadError::TooDeep(2))
        );
        // Never deeper than the recursion limit, whatever was asked.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(
            whole(deep.as_bytes()),
            Err(PayloadError::TooDeep(RECURSION_LIMIT))
        );
    }
}
