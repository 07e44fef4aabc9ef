//! Log output: diagnostics on stderr (`[log] level` and `format`; `RUST_LOG` overrides the
//! level) and the access log on stdout ([`crate::access_log`]). Access lines are `info` events
//! of target `custodia_access`: a level above `info` mutes them unless it names that target
//! (`warn,custodia_access=info`).

use std::io::IsTerminal;

use std::fmt::Write;

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};
use tracing_subscriber::filter::{filter_fn, EnvFilter, LevelFilter};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::access_log::{AccessLayer, TARGET};
use crate::config::{LogFormat, LogSettings};

/// The level directives in force: `RUST_LOG` when set (and not blank), else `[log] level`. An
/// invalid `RUST_LOG` is an error, as an invalid `level` in the file is: falling back to some
/// level would hide the mistake (or, for a word such as `warning`, silence every line).
pub fn directives(settings: &LogSettings) -> Result<String, String> {
    directives_with(settings, std::env::var_os("RUST_LOG"))
}

fn directives_with(
    settings: &LogSettings,
    rust_log: Option<std::ffi::OsString>,
) -> Result<String, String> {
    let Some(value) = rust_log else {
        return Ok(settings.level.clone());
    };
    let Some(value) = value.to_str() else {
        return Err("invalid RUST_LOG: it is not valid UTF-8".into());
    };
    if value.trim().is_empty() {
        return Ok(settings.level.clone());
    }
    crate::config::validate::check_level(value)
        .map_err(|why| format!("invalid RUST_LOG `{value}`: {why}"))?;
    Ok(value.to_string())
}

/// Install the subscriber (once per process; later calls do nothing). Fails only when
/// `RUST_LOG` is invalid (see [`directives`]).
pub fn init(settings: &LogSettings) -> Result<(), String> {
    let directives = directives(settings)?;
    let level = || {
        EnvFilter::builder()
            .parse(&directives)
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    // Filters without a level hint would make the global maximum TRACE, and then every
    // `log::debug!` on Pingora's hot path would build a record only to be dropped: each
    // filter carries the level's hint.
    let hint = level().max_level_hint().unwrap_or(LevelFilter::TRACE);
    // (A hint must not be exceeded by what the filter lets through.)
    let not_access = || Diagnostics { hint };
    let access_hint = hint.min(LevelFilter::INFO);
    let (text, json) = match settings.format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(level())
                    .with_filter(not_access()),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(level())
                    .with_filter(not_access()),
            ),
        ),
    };
    let access = AccessLayer.with_filter(level()).with_filter(
        filter_fn(move |meta| meta.target() == TARGET && *meta.level() <= access_hint)
            .with_max_level_hint(access_hint),
    );
    let _ = tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(access)
        .try_init();
    Ok(())
}

/// Whether `directives` let the access log through: its lines are `info` events of target
/// `custodia_access`, muted by a level above `info` that does not name that target.
pub fn access_log_passes(directives: &str) -> bool {
    use tracing::callsite::{Callsite, Identifier};
    use tracing::metadata::Kind;
    use tracing::{field::FieldSet, Level, Metadata};

    /// A stand-in for the access log's callsite, to ask a filter about it.
    struct AccessProbe;
    impl Callsite for AccessProbe {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            &PROBE
        }
    }
    static ACCESS_PROBE: AccessProbe = AccessProbe;
    static PROBE: Metadata<'static> = Metadata::new(
        "access log probe",
        TARGET,
        Level::INFO,
        None,
        None,
        None,
        FieldSet::new(&[], Identifier(&ACCESS_PROBE)),
        Kind::EVENT,
    );
    let Ok(filter) = EnvFilter::builder().parse(directives) else {
        return false;
    };
    let hint = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    hint >= LevelFilter::INFO
        && <EnvFilter as Layer<tracing_subscriber::Registry>>::register_callsite(&filter, &PROBE)
            .is_always()
}

/// What goes to stderr: events up to the level's hint, but neither the access log (it has its
/// own layer) nor Pingora's dumps of requests and responses.
#[derive(Debug, Clone, Copy)]
struct Diagnostics {
    hint: LevelFilter,
}

impl<S> Filter<S> for Diagnostics {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        meta.target() != TARGET && *meta.level() <= self.hint && !dumps_requests(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // Pingora's `log` records share one callsite per level: their target is only known
        // per record, in `enabled`.
        if *meta.level() > self.hint {
            Interest::never()
        } else {
            Interest::sometimes()
        }
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        let message = message_of(event);
        if prints_a_head(&message) {
            return false;
        }
        // Pingora's first look for the listeners on `--upgrade` always finds none: the old
        // process sends them only after this one asked. That is no error; a hand-over that
        // really fails still says so ("Giving up reading socket from …", "Bootstrap failed").
        if message.starts_with(NO_TRANSFER_YET) {
            return self.hint >= LevelFilter::DEBUG;
        }
        true
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.hint)
    }
}

/// Pingora's message while it waits for the listeners of the process it upgrades from.
const NO_TRANSFER_YET: &str = "No incoming socket transfer";

/// Pingora modules whose `debug` and `trace` events print whole request or response heads
/// (`Sending header to upstream RequestHeader { … authorization … }`, `upstream event:
/// Header(ResponseHeader { … set-cookie … })`, `Response header: …`) or bodies: the
/// `Authorization` and `Cookie` headers, query strings and the identity assertion would reach
/// the logs, which must never hold a secret, whatever `RUST_LOG` asks for.
const DUMPING_MODULES: [&str; 8] = [
    "pingora_proxy::proxy_h1",
    "pingora_proxy::proxy_h2",
    "pingora_proxy::proxy_custom",
    "pingora_proxy::proxy_cache",
    "pingora_proxy::subrequest",
    "pingora_core::protocols::http::v1::client",
    "pingora_core::protocols::http::custom",
    "pingora_cache",
];

/// Pingora events that print requests or responses: every `trace` event of Pingora's, and the
/// `debug` events of [`DUMPING_MODULES`].
fn dumps_requests(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    if !target.starts_with("pingora") {
        return false;
    }
    match *meta.level() {
        Level::TRACE => true,
        Level::DEBUG => DUMPING_MODULES.iter().any(|m| {
            target
                .strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        }),
        _ => false,
    }
}

/// Whether a message holds the `Debug` form of a request or response head (an `http` crate
/// `Parts`, `Request` or `Response`, Pingora's `RequestHeader` / `ResponseHeader`), at any
/// level and from any module: a net under [`dumps_requests`] for dumps elsewhere.
fn prints_a_head(message: &str) -> bool {
    ["headers: {", "RequestHeader {", "ResponseHeader {"]
        .iter()
        .any(|shape| message.contains(shape))
}

/// The `message` field of an event (a `log` record's text).
fn message_of(event: &Event<'_>) -> String {
    struct Message(String);
    impl Visit for Message {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.0.push_str(value);
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.0, "{value:?}");
            }
        }
    }
    let mut message = Message(String::new());
    event.record(&mut message);
    message.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogSettings;

    /// What a text layer behind [`Diagnostics`] with `hint` prints of the events `emit` logs.
    fn printed(hint: LevelFilter, emit: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .with_filter(Diagnostics { hint }),
        );
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn pingora_dumps_of_requests_and_responses_never_print() {
        let out = printed(LevelFilter::TRACE, || {
            tracing::debug!(
                target: "pingora_proxy::proxy_h1",
                "Sending header to upstream RequestHeader {{ base: Parts {{ method: GET, \
                 uri: /api?token=QUERY-SECRET, headers: {{\"authorization\": \"Bearer \
                 BEARER-SECRET\", \"cookie\": \"c=COOKIE-SECRET\"}} }} }}"
            );
            tracing::debug!(
                target: "pingora_proxy::proxy_h1",
                "upstream event: Some(Body(Some(b\"BODY-SECRET\"), false))"
            );
            tracing::debug!(
                target: "pingora_core::protocols::http::v1::client",
                "Response header: ResponseHeader {{ base: Parts {{ status: 200 }} }}"
            );
            tracing::trace!(target: "pingora_core::apps::http_app", "TRACE-SECRET");
            // A dump from anywhere else, at any level, is caught by its shape.
            tracing::error!(
                target: "pingora_core::somewhere_new",
                "failed: Parts {{ method: GET, uri: /, headers: {{\"cookie\": \"SHAPE-SECRET\"}} }}"
            );
            // What is kept: Pingora's other debug events, and ours.
            tracing::debug!(target: "pingora_proxy", "Successfully get a new request");
            tracing::debug!(target: "pingora_proxy::proxy_common", "kept from proxy_common");
            tracing::debug!(target: "pingora_proxy::proxy_h1x", "kept from a lookalike");
            tracing::debug!(target: "custodia_proxy::edge", "kept from custodia");
        });
        for secret in ["QUERY", "BEARER", "COOKIE", "BODY", "TRACE", "SHAPE"] {
            assert!(
                !out.contains(&format!("{secret}-SECRET")),
                "{secret}: {out}"
            );
        }
        for kept in [
            "Successfully get a new request",
            "kept from proxy_common",
            "kept from a lookalike",
            "kept from custodia",
        ] {
            assert!(out.contains(kept), "{kept}: {out}");
        }
    }

    #[test]
    fn waiting_for_the_listeners_on_upgrade_is_no_error() {
        let emit = || {
            tracing::error!(
                target: "pingora_core::server::transfer_fd",
                "No incoming socket transfer, sleep 1s and try again"
            );
            tracing::error!(
                target: "pingora_core::server::transfer_fd",
                "Giving up reading socket from: /tmp/x.sock, error: EAGAIN"
            );
        };
        let info = printed(LevelFilter::INFO, emit);
        assert!(!info.contains("No incoming socket transfer"), "{info}");
        assert!(
            info.contains("ERROR") && info.contains("Giving up"),
            "{info}"
        );
        let debug = printed(LevelFilter::DEBUG, emit);
        assert!(debug.contains("No incoming socket transfer"), "{debug}");
    }

    #[test]
    fn an_invalid_rust_log_is_an_error_not_a_fallback() {
        let file = LogSettings {
            level: "warn".into(),
            format: LogFormat::Text,
            access_log: true,
        };
        let with = |value: Option<&str>| directives_with(&file, value.map(Into::into));
        assert_eq!(with(None).unwrap(), "warn");
        assert_eq!(with(Some(" ")).unwrap(), "warn", "blank is unset");
        assert_eq!(with(Some("debug")).unwrap(), "debug", "RUST_LOG wins");
        for bad in ["warning", "debug[", "info,verbose", "x=y=z"] {
            let message = with(Some(bad)).unwrap_err();
            assert!(
                message.starts_with(&format!("invalid RUST_LOG `{bad}`: ")),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn the_access_log_passes_info_or_a_level_naming_it() {
        for on in [
            "info",
            "debug",
            "trace",
            "warn,custodia_access=info",
            "error,custodia=info",
        ] {
            assert!(access_log_passes(on), "{on}");
        }
        for off in [
            "warn",
            "error",
            "off",
            "info,custodia_access=warn",
            "custodia_proxy=debug",
        ] {
            assert!(!access_log_passes(off), "{off}");
        }
    }

    #[test]
    fn the_global_maximum_follows_the_level_so_muted_logs_cost_nothing() {
        if std::env::var_os("RUST_LOG").is_some() {
            return; // the environment decides the level then
        }
        init(&LogSettings {
            level: "warn".into(),
            format: LogFormat::Text,
            access_log: true,
        })
        .unwrap();
        assert_eq!(LevelFilter::current(), LevelFilter::WARN);
        // Muted callsites of every level register without tripping the filters' hints.
        tracing::trace!("muted");
        tracing::debug!("muted");
        tracing::info!("muted");
        tracing::warn!("shown");
        crate::access_log::emit(&crate::access_log::AccessRecord::default());
    }
}
