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

/// Install the subscriber (once per process; later calls do nothing).
pub fn init(settings: &LogSettings) {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| settings.level.clone());
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
    fn the_global_maximum_follows_the_level_so_muted_logs_cost_nothing() {
        if std::env::var_os("RUST_LOG").is_some() {
            return; // the environment decides the level then
        }
        init(&LogSettings {
            level: "warn".into(),
            format: LogFormat::Text,
            access_log: true,
        });
        assert_eq!(LevelFilter::current(), LevelFilter::WARN);
        // Muted callsites of every level register without tripping the filters' hints.
        tracing::trace!("muted");
        tracing::debug!("muted");
        tracing::info!("muted");
        tracing::warn!("shown");
        crate::access_log::emit(&crate::access_log::AccessRecord::default());
    }
}
