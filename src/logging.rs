//! The gateway's log lines: one flat JSON object per event on stderr — time, level, target,
//! message, the event's fields, then the fields of the spans it is in (the request's id, method
//! and route), outermost first:
//!
//! ```text
//! {"timestamp":"2026-11-27T02:30:00.123456Z","level":"INFO","target":"chartbridge::http","message":"handled","status":202,"micros":1840,"request_id":"req-7","method":"POST","path":"/submissions/glp1-intake-typeform"}
//! ```
//!
//! Written here rather than with tracing-subscriber's JSON format, which re-parses every span's
//! fields for every event and writes through an `io::Write` adaptor: at `info` (three lines per
//! submission) that was a visible share of the server's CPU.
//! What goes into a line is decided where the event is logged; this module never sees a
//! payload. Knows no other module.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the JSON log lines on stderr, at the level `RUST_LOG` says (`info` without it).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .fmt_fields(Members)
        .event_format(JsonLine)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// An event as one JSON object.
pub struct JsonLine;

/// Fields as JSON members, each preceded by a comma (`,"name":value`), so that a span's fields,
/// formatted once when the span is made, are copied into each of its events as they are.
pub struct Members;

impl<S> FormatEvent<S, Members> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, Members>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        write!(
            writer,
            "{{\"timestamp\":\"{now}\",\"level\":\"{}\",\"target\":",
            meta.level()
        )?;
        string(&mut writer, meta.target())?;
        Members.format_fields(writer.by_ref(), event)?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<Members>>() {
                    writer.write_str(fields)?;
                }
            }
        }
        writer.write_str("}\n")
    }
}

impl<'writer> FormatFields<'writer> for Members {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut members = MemberWriter {
            out: &mut writer,
            result: Ok(()),
        };
        fields.record(&mut members);
        members.result
    }
}

/// Writes each field it visits as `,"name":value`.
struct MemberWriter<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl MemberWriter<'_, '_> {
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self
                .out
                .write_char(',')
                .and_then(|()| string(self.out, field.name()))
                .and_then(|()| self.out.write_char(':'))
                .and_then(|()| value(self.out));
        }
    }
}

impl Visit for MemberWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| string(w, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinities: those become strings.
        if value.is_finite() {
            self.member(field, |w| write!(w, "{value}"));
        } else {
            self.member(field, |w| string(w, &value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `message`, and fields logged with `%` or `?`.
        self.member(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn string(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what is written through it as the inside of a JSON string.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::Instrument as _;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_are_json_lines_with_their_spans_fields() {
        let lines = Lines::default();
        let out = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(Members)
            .event_format(JsonLine)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            {
                let span = tracing::info_span!("request", request_id = %"req-1", path = "/a\"b");
                let _enter = span.enter();
                tracing::info!(
                    status = 202u16,
                    n = -3i64,
                    ok = true,
                    ratio = 0.5,
                    "handled"
                );
                tracing::warn!(reason = %"line\nbreak\u{1}", inf = f64::INFINITY, "retry \"soon\"");
                let inner = tracing::info_span!("attempt", attempt = 2u32);
                poll_once(async { tracing::info!("inside") }.instrument(inner));
            }
            tracing::error!("outside");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        assert_eq!(parsed.len(), 4);
        let first = &parsed[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["target"], module_path!());
        assert_eq!(first["message"], "handled");
        assert_eq!(first["status"], 202);
        assert_eq!(first["n"], -3);
        assert_eq!(first["ok"], true);
        assert_eq!(first["ratio"], 0.5);
        assert_eq!(first["request_id"], "req-1");
        assert_eq!(first["path"], "/a\"b");
        assert!(chrono::DateTime::parse_from_rfc3339(first["timestamp"].as_str().unwrap()).is_ok());
        assert_eq!(parsed[1]["level"], "WARN");
        assert_eq!(parsed[1]["message"], "retry \"soon\"");
        assert_eq!(parsed[1]["reason"], "line\nbreak\u{1}");
        assert_eq!(parsed[1]["inf"], "inf");
        assert_eq!(parsed[2]["request_id"], "req-1");
        assert_eq!(parsed[2]["attempt"], 2);
        assert_eq!(parsed[3]["message"], "outside");
        assert!(parsed[3].get("request_id").is_none());
    }

    /// Runs a future that never waits, without a runtime.
    fn poll_once(f: impl std::future::Future<Output = ()>) {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(f.as_mut().poll(&mut cx).is_ready());
    }
}
