//! Log output: diagnostics on stderr (`[log] level` and `format`; `RUST_LOG` overrides the
//! level) and the access log on stdout ([`crate::access_log`]). Access lines are `info` events
//! of target `custodia_access`: a level above `info` mutes them unless it names that target
//! (`warn,custodia_access=info`).

use std::io::IsTerminal;

use tracing_subscriber::filter::{filter_fn, EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
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
    let not_access = || {
        filter_fn(move |meta| {
            meta.target() != TARGET && *meta.level() <= hint && !dumps_requests(meta)
        })
        .with_max_level_hint(hint)
    };
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

/// Pingora's `trace` events print whole request heads (`Cookie`, `/callback?code=…`): secrets
/// never reach our logs, whatever `RUST_LOG` asks for.
fn dumps_requests(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == tracing::Level::TRACE && meta.target().starts_with("pingora")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogSettings;

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
