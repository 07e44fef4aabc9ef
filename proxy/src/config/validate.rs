//! File model → runtime model, with every error naming the file, line and key.
//!
//! Rules checked here (single-value rules live in the serde types of [`super::file`]):
//! 1. TOML syntax, unknown keys and wrong types are reported by the parser with their key path.
//! 2. `upstream.backends` lists at least one backend, none twice.
//! 3. `server.listen` lists no address twice, nor two that overlap (the same port, one IP
//!    unspecified: `0.0.0.0` takes every IPv4 address, `::` every address).
//! 4. `upstream.health.timeout` is not longer than `upstream.health.interval`.
//! 5. `admin.listen` is not one of the public `server.listen` addresses, nor overlaps one.
//! 6. `log.level` is a valid level or `RUST_LOG`-style directive list.
//! 7. `upstream.discovery_interval` is at least 100 ms.
//! 8. `[auth]` and `[[route]]`: see [`super::auth`] (secrets come from the environment).
//! 9. `[limits]`: counts and sizes are in range while parsing (0 is refused);
//!    `client_timeout` is between 1 s and 10 min, `send_timeout` between 1 s and 1 h.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::env::{Env, ProcessEnv};
use super::file::{BalanceName, FileConfig, LogFormatName};
use super::model::*;
use super::ConfigError;

/// Proxy worker threads at most (each holds its own listening sockets and upstream pool).
const MAX_THREADS: usize = 1024;

/// The levels `log.level` names (a directive without `=`).
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Read and validate a configuration file, with secrets from the environment and `.env`.
pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
    load_with_env(path, &ProcessEnv::with_dotenv())
}

pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<ProxyConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with_env(&text, path, env)
}

/// Validate configuration text with an empty environment; `path` only labels the messages.
pub fn parse(text: &str, path: &Path) -> Result<ProxyConfig, ConfigError> {
    parse_with_env(text, path, &std::collections::HashMap::new())
}

pub fn parse_with_env(text: &str, path: &Path, env: &dyn Env) -> Result<ProxyConfig, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    let file: FileConfig = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        // A `Spanned` value shows in the path as its private field: not a key operators wrote.
        let key = err
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "");
        let inner = err.into_inner();
        let line = inner.span().map(|span| line_of(text, span.start));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            key: if key == "." { String::new() } else { key },
            message: inner.message().trim().to_string(),
        }
    })?;
    into_model(file, text, path, env)
}

fn into_model(
    file: FileConfig,
    text: &str,
    path: &Path,
    env: &dyn Env,
) -> Result<ProxyConfig, ConfigError> {
    let invalid =
        |span: Option<std::ops::Range<usize>>, key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: span.map(|s| line_of(text, s.start)),
            key: key.to_string(),
            message,
        };

    let server = file.server;
    for (i, addr) in server.listen.0.iter().enumerate() {
        for earlier in &server.listen.0[..i] {
            let message = if earlier.0 == addr.0 {
                format!("address {} is listed twice", addr.0)
            } else if let Some(why) = listen_conflict(earlier.0, addr.0) {
                format!(
                    "addresses {} and {} overlap ({why}): list only one of them",
                    earlier.0, addr.0
                )
            } else {
                continue;
            };
            return Err(invalid(find_key(text, "listen"), "server.listen", message));
        }
    }
    if server.threads > MAX_THREADS {
        return Err(invalid(
            find_key(text, "threads"),
            "server.threads",
            format!(
                "{} threads is more than the {MAX_THREADS} allowed (0 = one per CPU core)",
                server.threads
            ),
        ));
    }
    let threads = if server.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        server.threads
    };

    let upstream = file.upstream;
    let backends_span = upstream.backends.span();
    let entries = upstream.backends.into_inner();
    if entries.is_empty() {
        return Err(invalid(
            Some(backends_span),
            "upstream.backends",
            "no backends: list at least one, e.g. backends = [\"127.0.0.1:9001\"]".into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut backends = Vec::with_capacity(entries.len());
    for entry in entries {
        if !seen.insert(entry.addr.clone()) {
            return Err(invalid(
                Some(backends_span.clone()),
                "upstream.backends",
                format!("backend {} is listed twice", entry.addr),
            ));
        }
        backends.push(BackendTarget {
            host: entry.addr.host,
            port: entry.addr.port,
            weight: entry.weight.get(),
        });
    }

    let health = upstream.health;
    if health.interval.0.is_zero() || health.timeout.0.is_zero() {
        let key = if health.interval.0.is_zero() {
            "interval"
        } else {
            "timeout"
        };
        return Err(invalid(
            find_key(text, key),
            if key == "interval" {
                "upstream.health.interval"
            } else {
                "upstream.health.timeout"
            },
            format!("the health check {key} must be longer than 0s"),
        ));
    }
    if health.timeout.0 > health.interval.0 {
        return Err(invalid(
            find_key(text, "timeout"),
            "upstream.health.timeout",
            format!(
                "the health check timeout ({}) is longer than its interval ({})",
                humantime::format_duration(health.timeout.0),
                humantime::format_duration(health.interval.0)
            ),
        ));
    }

    let admin = file.admin.map(|a| AdminSettings { listen: a.listen.0 });
    if let Some(admin) = &admin {
        for public in &server.listen.0 {
            let message = if public.0 == admin.listen {
                format!(
                    "{} is also a public listen address: the admin listener must be separate",
                    admin.listen
                )
            } else if let Some(why) = listen_conflict(public.0, admin.listen) {
                format!(
                    "{} overlaps the public listen address {} ({why}): the admin listener must \
                     be separate, on another port",
                    admin.listen, public.0
                )
            } else {
                continue;
            };
            return Err(invalid(
                find_key_in_section(text, "admin", "listen"),
                "admin.listen",
                message,
            ));
        }
    }

    let log = file.log;
    // A bare word is a valid directive, for a module of that name: `level = "warning"` would
    // parse, enable a module nobody has and leave every log line (the access log too) off.
    if let Some(word) = log.level.split(',').map(str::trim).find(|d| {
        !d.is_empty() && !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
    }) {
        return Err(invalid(
            find_key_in_section(text, "log", "level"),
            "log.level",
            format!(
                "`{word}` is not a level: expected one of trace, debug, info, warn, error, off, \
                 or `module=level` (e.g. \"info,custodia_proxy=debug\")"
            ),
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log.level) {
        return Err(invalid(
            find_key_in_section(text, "log", "level"),
            "log.level",
            format!(
                "invalid level `{}` ({e}): expected e.g. \"info\", \"warn\" or \"info,custodia_proxy=debug\"",
                log.level
            ),
        ));
    }
    if upstream.discovery_interval.0 < std::time::Duration::from_millis(100) {
        return Err(invalid(
            find_key(text, "discovery_interval"),
            "upstream.discovery_interval",
            "the discovery interval must be at least 100ms".into(),
        ));
    }

    let routes_span = file.route.span();
    let routes = file.route.into_inner();
    let limits = file.limits;
    let limit_between = |key: &'static str, value: Duration, max: Duration, range: &str| {
        if value < Duration::from_secs(1) || value > max {
            return Err(invalid(
                find_key_in_section(text, "limits", key),
                &format!("limits.{key}"),
                format!("must be between {range}"),
            ));
        }
        Ok(value)
    };
    let client_timeout = limit_between(
        "client_timeout",
        limits.client_timeout.0,
        Duration::from_secs(600),
        "1s and 10m",
    )?;
    let send_timeout = limit_between(
        "send_timeout",
        limits.send_timeout.0,
        Duration::from_secs(3600),
        "1s and 1h",
    )?;
    let mut route_body_sizes: Vec<(String, u64)> = routes
        .iter()
        .filter_map(|r| r.max_body_size.map(|size| (r.prefix.clone(), size.0)))
        .collect();
    route_body_sizes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    if file.auth.is_some() {
        if let Some((index, (key, message))) = super::auth::first_bad_route(&routes) {
            let span = nth_route_prefix(text, index).or(Some(routes_span.clone()));
            return Err(invalid(span, key, message));
        }
    }
    let auth = match file.auth {
        Some(section) => {
            let auth_span = section.public_url.span();
            Some(
                super::auth::validate_auth(section, routes, env).map_err(|(key, message)| {
                    let span = if key.starts_with("route") {
                        Some(routes_span.clone())
                    } else {
                        key.rsplit('.')
                            .next()
                            .filter(|k| *k != "auth")
                            .and_then(|k| find_key_in_section(text, "auth", k))
                            .or(Some(auth_span.clone()))
                    };
                    invalid(span, key, message)
                })?,
            )
        }
        None if !routes.is_empty() => {
            return Err(invalid(
                Some(routes_span),
                "route",
                "[[route]] policies need an [auth] section (without it nothing is checked)".into(),
            ))
        }
        None => None,
    };

    Ok(ProxyConfig {
        source: path.to_path_buf(),
        admin,
        auth,
        log: LogSettings {
            level: log.level,
            format: match log.format {
                LogFormatName::Text => LogFormat::Text,
                LogFormatName::Json => LogFormat::Json,
            },
            access_log: log.access_log,
        },
        limits: LimitSettings {
            max_connections: limits.max_connections.0 as usize,
            max_body_size: limits.max_body_size.0,
            route_body_sizes,
            login_rate_per_minute: limits.login_rate_per_minute.0 as u32,
            client_timeout,
            send_timeout,
        },
        server: ServerSettings {
            listen: server.listen.0.into_iter().map(|a| a.0).collect(),
            threads,
            grace_period: server.grace_period.0,
            keepalive_timeout: server.keepalive_timeout.0,
            fast_path: server.fast_path,
            pid_file: PathBuf::from(server.pid_file),
            upgrade_sock: PathBuf::from(server.upgrade_sock),
        },
        upstream: UpstreamSettings {
            balance: match upstream.balance {
                BalanceName::LeastConn => Balance::LeastConn,
                BalanceName::LeastTime => Balance::LeastTime,
                BalanceName::RoundRobin => Balance::RoundRobin,
            },
            backends,
            connect_timeout: upstream.connect_timeout.0,
            read_timeout: upstream.read_timeout.0,
            send_timeout: upstream.send_timeout.0,
            idle_timeout: upstream.idle_timeout.0,
            retries: upstream.retries,
            discovery_interval: upstream.discovery_interval.0,
            health: HealthSettings {
                path: health.path.0,
                interval: health.interval.0,
                timeout: health.timeout.0,
                healthy_after: health.healthy_after.get(),
                unhealthy_after: health.unhealthy_after.get(),
            },
        },
    })
}

/// Why two different listen addresses cannot both be bound, or `None` when they can: the same
/// port with the same IP (`::ffff:127.0.0.1` is `127.0.0.1`), or with an unspecified IP that
/// takes the other one in: `0.0.0.0` takes every IPv4 address, `::` every IPv6 and (Linux's
/// default, dual stack) every IPv4 address too.
pub(crate) fn listen_conflict(a: SocketAddr, b: SocketAddr) -> Option<String> {
    if a.port() != b.port() {
        return None;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    if x == y {
        return Some(format!("{a} and {b} are the same address"));
    }
    let takes =
        |wild: IpAddr, other: IpAddr| wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4());
    let wild = if takes(x, y) {
        x
    } else if takes(y, x) {
        y
    } else {
        return None;
    };
    let port = a.port();
    Some(if wild.is_ipv6() {
        format!("the same port {port}, and `::` takes every IPv6 and IPv4 address on it")
    } else {
        format!("the same port {port}, and `0.0.0.0` takes every IPv4 address on it")
    })
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}

/// Like [`find_key`], but only after the `[section]` header.
fn find_key_in_section(text: &str, section: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let header = format!("[{section}]");
    let start = text.find(&header)?;
    find_key(&text[start..], key).map(|r| r.start + start..r.end + start)
}

/// The `prefix =` line of the `index`-th `[[route]]` table (they are read in the order written).
fn nth_route_prefix(text: &str, index: usize) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    let mut seen = 0;
    for line in text.split_inclusive('\n') {
        offset += line.len();
        if line.trim_start().starts_with("[[route]]") {
            seen += 1;
            if seen == index + 1 {
                let rest = text.get(offset..)?;
                // Within this table: up to the next header.
                let end = rest
                    .split_inclusive('\n')
                    .scan(0, |at, l| {
                        let start = *at;
                        *at += l.len();
                        Some((start, l))
                    })
                    .find(|(_, l)| l.trim_start().starts_with('['))
                    .map_or(rest.len(), |(start, _)| start);
                return find_key(rest.get(..end)?, "prefix")
                    .map(|r| r.start + offset..r.end + offset);
            }
        }
    }
    None
}

/// Best-effort location of `key =` for errors that concern a key rather than a value.
fn find_key(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return Some(offset..offset + line.len());
            }
        }
        offset += line.len();
    }
    None
}
