//! The access log: one JSON line per request on stdout, emitted through `tracing` (target
//! [`TARGET`]) and written by [`AccessLayer`], which the diagnostics on stderr never see.
//!
//! A line: `{"time":"2026-12-04T17:00:00.123Z","request_id":"…","client":"203.0.113.9",
//! "method":"GET","path":"/api/hello","status":200,"backend":"127.0.0.1:9001",
//! "upstream_ms":1.2,"total_ms":1.5,"bytes_in":0,"bytes_out":93,"sub":"auth0|42"}`.
//! The path never carries the query string (it may hold `code=` or tokens); no header, cookie
//! or email is ever logged.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The `tracing` target of access-log events.
pub const TARGET: &str = "custodia_access";

/// What one request left behind.
#[derive(Debug, Default)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    /// 0: no response was sent (the client left).
    pub status: u16,
    pub backend: Option<&'a str>,
    pub upstream_ms: Option<f64>,
    pub total_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The session's subject when signed in (never the email).
    pub sub: Option<&'a str>,
}

/// Emit the record as an access-log event.
pub fn emit(r: &AccessRecord<'_>) {
    tracing::info!(
        target: TARGET,
        request_id = r.request_id,
        client = r.client.map(tracing::field::display),
        method = r.method,
        path = r.path,
        status = r.status,
        backend = r.backend,
        upstream_ms = r.upstream_ms,
        total_ms = r.total_ms,
        bytes_in = r.bytes_in,
        bytes_out = r.bytes_out,
        sub = r.sub,
    );
}

/// Round to microseconds, so lines stay short.
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Writes access events as JSON lines on stdout, `time` first and the fields in the order
/// [`emit`] records them. Give it a filter that lets only [`TARGET`] through (see
/// [`crate::logging`]). The line is built in a per-thread buffer and written with one
/// `write(2)`, like nginx's unbuffered access log.
pub struct AccessLayer;

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

impl<S: Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        LINE.with(|cell| {
            // A (theoretical) re-entrant event on this thread is dropped, never a panic.
            let Ok(mut line) = cell.try_borrow_mut() else {
                return;
            };
            line.clear();
            write_line(&mut line, event);
            // A closed stdout must not disturb serving.
            let _ = std::io::stdout().lock().write_all(&line);
        });
    }
}

fn write_line(line: &mut Vec<u8>, event: &Event<'_>) {
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let _ = write!(line, "{{\"time\":\"{time}\"");
    event.record(&mut JsonVisitor(line));
    line.extend_from_slice(b"}\n");
}

/// Appends `,"name":value` per field; names are Rust identifiers (no escaping needed).
struct JsonVisitor<'a>(&'a mut Vec<u8>);

impl JsonVisitor<'_> {
    fn key(&mut self, field: &Field) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(field.name().as_bytes());
        self.0.extend_from_slice(b"\":");
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.0, "{value}");
        } else {
            self.0.extend_from_slice(b"null");
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.0, "{value}");
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.0, "{value}");
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        let _ = write!(self.0, "{value}");
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        let _ = serde_json::to_writer(&mut *self.0, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        let _ = serde_json::to_writer(&mut *self.0, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn a_line_is_json_with_time_first_and_absent_fields_left_out() {
        use tracing_subscriber::layer::SubscriberExt;
        // Build the line the layer writes, into a buffer instead of stdout.
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl<S: Subscriber> Layer<S> for Capture {
            fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
                write_line(&mut self.0.lock().unwrap(), event);
            }
        }
        let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(captured.clone()));
        tracing::subscriber::with_default(subscriber, || {
            emit(&AccessRecord {
                request_id: "abc",
                client: Some("203.0.113.9".parse().unwrap()),
                method: "GET",
                path: "/a \"quoted\" path\n",
                status: 200,
                backend: None,
                upstream_ms: None,
                total_ms: 1.5,
                bytes_in: 0,
                bytes_out: 10,
                sub: Some("auth0|42"),
            })
        });
        let line = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line}"
        );
        assert!(line.starts_with("{\"time\":"), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["client"], "203.0.113.9");
        assert_eq!(v["path"], "/a \"quoted\" path\n");
        assert_eq!(v["total_ms"], 1.5);
        assert_eq!(v["status"], 200);
        assert_eq!(v["sub"], "auth0|42");
        assert!(v.get("backend").is_none(), "absent values are left out");
    }

    #[test]
    fn millis_keep_three_decimals() {
        assert_eq!(millis(std::time::Duration::from_micros(1234)), 1.234);
        assert_eq!(millis(std::time::Duration::from_nanos(1_234_567)), 1.235);
    }
}
