//! Ids that arrive from outside and go back out: a submission's id (the source's idempotency
//! key) and a patient's identifier value.
//!
//! They are echoed in headers (`Location`), URLs (`status_url`, the EHR's search strings) and
//! the store's keys, so each is checked once where it enters: at most 256 bytes, no control
//! characters (a NUL cannot go into a header, and a stored id that cannot be answered would
//! make every retry of the source fail alike), and not `.` or `..` (a path segment a client
//! would resolve to another URL). Anything else is the source's mistake: a 422 naming the
//! problem, nothing stored. Where an id goes into a URL path it is percent-encoded.

use std::fmt;

/// The longest id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Why a value cannot be an id (never the value itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdProblem {
    Empty,
    TooLong(usize),
    ControlCharacter,
    DotSegment,
}

impl fmt::Display for IdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdProblem::Empty => write!(f, "is empty"),
            IdProblem::TooLong(n) => {
                write!(f, "is {n} bytes long; at most {MAX_ID_BYTES} are accepted")
            }
            IdProblem::ControlCharacter => write!(f, "contains a control character"),
            IdProblem::DotSegment => write!(f, "is `.` or `..`, which a URL cannot carry"),
        }
    }
}

/// Checks a value that will be used as an id.
pub fn check(id: &str) -> Result<(), IdProblem> {
    if id.is_empty() {
        return Err(IdProblem::Empty);
    }
    if id.len() > MAX_ID_BYTES {
        return Err(IdProblem::TooLong(id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(IdProblem::ControlCharacter);
    }
    if id == "." || id == ".." {
        return Err(IdProblem::DotSegment);
    }
    Ok(())
}

/// A submission's id: the source's idempotency key, checked (`check`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubmissionId(String);

impl SubmissionId {
    pub fn parse(id: impl Into<String>) -> Result<SubmissionId, IdProblem> {
        let id = id.into();
        check(&id)?;
        Ok(SubmissionId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for SubmissionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `id` as one URL path segment: every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`)
/// percent-encoded, so `/` and `?` stay inside the segment.
pub fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_are_refused_and_the_rest_encoded() {
        assert_eq!(check("tf-7QX2"), Ok(()));
        assert_eq!(check("a\0b"), Err(IdProblem::ControlCharacter));
        assert_eq!(check("a\u{85}b"), Err(IdProblem::ControlCharacter));
        assert_eq!(check(&"x".repeat(257)), Err(IdProblem::TooLong(257)));
        assert_eq!(check(&"x".repeat(256)), Ok(()));
        assert_eq!(check(".."), Err(IdProblem::DotSegment));
        assert_eq!(check(""), Err(IdProblem::Empty));
        assert_eq!(path_segment("../../x"), "..%2F..%2Fx");
        assert_eq!(path_segment("a b?c#é"), "a%20b%3Fc%23%C3%A9");
        assert_eq!(path_segment("ok-1.2_~"), "ok-1.2_~");
    }
}
