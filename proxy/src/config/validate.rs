//! File model → runtime model, with every error naming the file, line and key.
//!
//! Rules checked here (single-value rules live in the serde types of [`super::file`]):
//! 1. TOML syntax, unknown keys and wrong types are reported by the parser with their key path.
//! 2. `upstream.backends` lists at least one backend, none twice.
//! 3. `server.listen` lists no address twice (`::ffff:127.0.0.1` is `127.0.0.1`).
//! 4. `upstream.health.timeout` is not longer than `upstream.health.interval`.
//! 5. `admin.listen` is not one of the public `server.listen` addresses, nor overlaps one.
//! 6. `log.level` is a valid level or `RUST_LOG`-style directive list.
//! 7. Every duration is within its range ([`DURATION_RANGES`]): timeouts at least 1 ms, nothing
//!    over a day (`auth.session_ttl`: see [`super::auth`]).
//! 8. `[auth]` and `[[route]]`: see [`super::auth`] (secrets come from the environment).
//! 9. `[limits]`: counts and sizes are in range while parsing (0 is refused); its durations
//!    as rule 7 says.
//! 10. `server.pid_file` and `server.upgrade_sock` are not empty; `upgrade_sock` fits a Unix
//!     socket address ([`MAX_SOCKET_PATH`] bytes, no NUL byte).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::env::{Env, ProcessEnv};
use super::file::{BalanceName, FileConfig, LogFormatName};
use super::locate::Locator;
use super::model::*;
use super::ConfigError;

/// The longest path a Unix socket can be bound at: Linux's `sockaddr_un.sun_path` holds 108
/// bytes, the last one the terminating NUL. Pingora panics binding a longer `upgrade_sock`.
pub const MAX_SOCKET_PATH: usize = 107;

/// Proxy worker threads at most (each holds its own listening sockets and upstream pool).
const MAX_THREADS: usize = 1024;

const MS: Duration = Duration::from_millis(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// The range of every duration key (`auth.session_ttl`'s is checked in [`super::auth`]).
/// Timeouts are at least 1 ms (0 would fail every request) and nothing is longer than a day:
/// each is added to the clock, and a duration past what an `Instant` holds would panic there.
pub const DURATION_RANGES: [(&str, Duration, Duration); 11] = [
    // 0: stop at once.
    ("server.grace_period", Duration::ZERO, HOUR),
    // Counted in whole seconds, at least 1 s.
    ("server.keepalive_timeout", Duration::ZERO, HOUR),
    ("upstream.connect_timeout", MS, Duration::from_secs(600)),
    ("upstream.read_timeout", MS, DAY),
    ("upstream.send_timeout", MS, DAY),
    ("upstream.idle_timeout", MS, DAY),
    (
        "upstream.discovery_interval",
        Duration::from_millis(100),
        DAY,
    ),
    ("upstream.health.interval", MS, DAY),
    ("upstream.health.timeout", MS, DAY),
    (
        "limits.client_timeout",
        Duration::from_secs(1),
        Duration::from_secs(600),
    ),
    ("limits.send_timeout", Duration::from_secs(1), HOUR),
];

/// A range bound the way the file writes it: `1ms`, `100ms`, `1s`, `10m`, `1h`, `1d`.
fn duration_bound(d: Duration) -> String {
    let ms = d.as_millis();
    let units: [(u128, &str); 4] = [
        (DAY.as_millis(), "d"),
        (HOUR.as_millis(), "h"),
        (MINUTE.as_millis(), "m"),
        (1000, "s"),
    ];
    for (size, unit) in units {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    if ms == 0 {
        return "0s".into();
    }
    format!("{ms}ms")
}

/// The levels `log.level` names (a directive without `=`).
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Read and validate a configuration file, with secrets from the environment and `.env`.
pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
    let env = ProcessEnv::load_dotenv().map_err(|e| ConfigError::Invalid {
        path: PathBuf::from(".env"),
        line: e.line,
        key: String::new(),
        message: e.message,
    })?;
    load_with_env(path, &env)
}

/// Larger than any config file: `--config /dev/zero` (or a log named by mistake) is refused
/// instead of read until memory runs out.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<ProxyConfig, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(read_error)?,
            MAX_CONFIG_BYTES + 1,
        ),
        &mut bytes,
    )
    .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("over {} MiB: not a config file", MAX_CONFIG_BYTES >> 20),
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 (from byte {})", e.utf8_error().valid_up_to()),
        ))
    })?;
    parse_with_env(&text, path, env)
}

/// Validate configuration text with an empty environment; `path` only labels the messages.
pub fn parse(text: &str, path: &Path) -> Result<ProxyConfig, ConfigError> {
    parse_with_env(text, path, &std::collections::HashMap::new())
}

pub fn parse_with_env(text: &str, path: &Path, env: &dyn Env) -> Result<ProxyConfig, ConfigError> {
    // `[[upstream]]` for `[upstream]` (or the other way round for `[[route]]`) would reach serde
    // as a list, which it reads field by field into the first key's type: a message about
    // anything but the brackets.
    if let Some((key, line, message)) = Locator::new(text).wrong_brackets() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            line: Some(line_of(text, line)),
            key: key.to_string(),
            message,
        });
    }
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
            message: one_line(inner.message()),
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
    let at = Locator::new(text);
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
            // Addresses that only overlap (`0.0.0.0:P` and `[::]:P`, nginx's way to listen on
            // both families where `::` is IPv6 only) bind side by side: the public sockets are
            // `SO_REUSEPORT`. The same address twice would take each connection twice over.
            let same = earlier.0.port() == addr.0.port()
                && earlier.0.ip().to_canonical() == addr.0.ip().to_canonical();
            if same {
                return Err(invalid(
                    at.key("server.listen"),
                    "server.listen",
                    format!("address {} is listed twice", addr.0),
                ));
            }
        }
    }
    for (key, value) in [
        ("pid_file", &server.pid_file),
        ("upgrade_sock", &server.upgrade_sock),
    ] {
        if value.trim().is_empty() {
            return Err(invalid(
                at.key(&format!("server.{key}")),
                &format!("server.{key}"),
                format!("an empty path: name a file, or leave `{key}` out for the default"),
            ));
        }
    }
    let sock_len = server.upgrade_sock.len();
    let sock_problem = if server.upgrade_sock.contains('\0') {
        Some("the path holds a NUL byte, which no Unix socket path can".to_string())
    } else if sock_len > MAX_SOCKET_PATH {
        Some(format!(
            "`{}` is {sock_len} bytes long, too long for a Unix socket: a socket path can be at \
             most {MAX_SOCKET_PATH} bytes; name a shorter one",
            server.upgrade_sock
        ))
    } else {
        None
    };
    if let Some(message) = sock_problem {
        return Err(invalid(
            at.key("server.upgrade_sock"),
            "server.upgrade_sock",
            message,
        ));
    }
    if server.threads > MAX_THREADS {
        return Err(invalid(
            at.key("server.threads"),
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
        if let Some(own) = own_listen_address(&server.listen.0, &entry.addr) {
            return Err(invalid(
                Some(backends_span.clone()),
                "upstream.backends",
                format!(
                    "backend {} is this proxy's own listen address {own}: every request would \
                     come back to the proxy, and go round until it runs out of connections",
                    entry.addr
                ),
            ));
        }
        backends.push(BackendTarget {
            host: entry.addr.host,
            port: entry.addr.port,
            weight: entry.weight.get(),
        });
    }

    // Every duration within its range (see [`DURATION_RANGES`]): a zero timeout fails every
    // request, and one past what an `Instant` can hold panics where it is added to the clock.
    let duration = |table: &str, key: &str, value: Duration| -> Result<Duration, ConfigError> {
        let path = format!("{table}.{key}");
        let Some((_, min, max)) = DURATION_RANGES.iter().find(|(k, _, _)| *k == path) else {
            return Ok(value);
        };
        if (*min..=*max).contains(&value) {
            return Ok(value);
        }
        Err(invalid(
            at.key(&path),
            &path,
            format!(
                "{} is out of range: must be between {} and {}",
                humantime::format_duration(value),
                duration_bound(*min),
                duration_bound(*max)
            ),
        ))
    };
    let grace_period = duration("server", "grace_period", server.grace_period.0)?;
    let keepalive_timeout = duration("server", "keepalive_timeout", server.keepalive_timeout.0)?;
    let connect_timeout = duration("upstream", "connect_timeout", upstream.connect_timeout.0)?;
    let read_timeout = duration("upstream", "read_timeout", upstream.read_timeout.0)?;
    let upstream_send_timeout = duration("upstream", "send_timeout", upstream.send_timeout.0)?;
    let idle_timeout = duration("upstream", "idle_timeout", upstream.idle_timeout.0)?;
    let discovery_interval = duration(
        "upstream",
        "discovery_interval",
        upstream.discovery_interval.0,
    )?;
    let health = upstream.health;
    duration("upstream.health", "interval", health.interval.0)?;
    duration("upstream.health", "timeout", health.timeout.0)?;
    if health.timeout.0 > health.interval.0 {
        return Err(invalid(
            at.key("upstream.health.timeout"),
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
            return Err(invalid(at.key("admin.listen"), "admin.listen", message));
        }
    }

    let log = file.log;
    if let Err(message) = check_level(&log.level) {
        return Err(invalid(at.key("log.level"), "log.level", message));
    }

    let routes_span = file.route.span();
    let routes = file.route.into_inner();
    let limits = file.limits;
    let client_timeout = duration("limits", "client_timeout", limits.client_timeout.0)?;
    let send_timeout = duration("limits", "send_timeout", limits.send_timeout.0)?;
    let mut route_body_sizes: Vec<(String, u64)> = routes
        .iter()
        .filter_map(|r| r.max_body_size.map(|size| (r.prefix.clone(), size.0)))
        .collect();
    route_body_sizes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    if file.auth.is_some() {
        if let Some((index, (key, message))) = super::auth::first_bad_route(&routes) {
            let span = at.route_prefix(index).or(Some(routes_span.clone()));
            return Err(invalid(span, key, message));
        }
    }
    let auth = match file.auth {
        Some(section) => {
            Some(
                super::auth::validate_auth(section, routes, env).map_err(|(key, message)| {
                    // A value from the environment is not in the file: the message names its
                    // variable, and the line is the `[auth]` table's.
                    let span = if key.starts_with("route") {
                        Some(routes_span.clone())
                    } else {
                        at.key(key).or_else(|| at.table("auth"))
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
            grace_period,
            keepalive_timeout,
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
            connect_timeout,
            read_timeout,
            send_timeout: upstream_send_timeout,
            idle_timeout,
            retries: upstream.retries,
            discovery_interval,
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

/// Why `directives` (`[log] level` or `RUST_LOG`) are no level, or would log nothing by
/// mistake.
pub fn check_level(directives: &str) -> Result<(), String> {
    if directives.split(',').all(|d| d.trim().is_empty()) {
        return Err(
            "an empty level would log nothing, not even errors or the access log: expected one \
             of trace, debug, info, warn, error, or off to mean nothing"
                .into(),
        );
    }
    // A bare word is a valid directive, for a module of that name: `level = "warning"` would
    // parse, enable a module nobody has and leave every log line (the access log too) off.
    if let Some(word) = directives.split(',').map(str::trim).find(|d| {
        !d.is_empty() && !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
    }) {
        return Err(format!(
            "`{word}` is not a level: expected one of trace, debug, info, warn, error, off, \
             or `module=level` (e.g. \"info,custodia_proxy=debug\")"
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(directives) {
        return Err(format!(
            "invalid level `{directives}` ({e}): expected e.g. \"info\", \"warn\" or \
             \"info,custodia_proxy=debug\""
        ));
    }
    Ok(())
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

/// The public listen address a backend would reach, if it names this proxy itself: the same
/// address, or a loopback one (`localhost` too) on the port of a wildcard listener.
fn own_listen_address(
    listen: &[super::file::Address],
    backend: &super::file::HostPort,
) -> Option<SocketAddr> {
    let ip = match backend.host.parse::<IpAddr>() {
        Ok(ip) => Some(ip.to_canonical()),
        Err(_) if backend.host.eq_ignore_ascii_case("localhost") => None,
        Err(_) => return None,
    };
    listen.iter().map(|l| l.0).find(|own| {
        own.port() == backend.port
            && match ip {
                Some(ip) => {
                    ip == own.ip().to_canonical()
                        || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
                }
                // localhost: the loopback addresses.
                None => own.ip().is_loopback() || own.ip().is_unspecified(),
            }
    })
}

/// A parser message on one line: the TOML parser puts what it expected on a line of its own,
/// which would split a log line (a refused reload's) in two.
fn one_line(message: &str) -> String {
    let line = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    in_operators_words(&line)
}

/// serde names Rust's types ("expected u32"); an operator reads "a whole number".
fn in_operators_words(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, words) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected i64", "expected a number"),
        ("expected f64", "expected a number"),
    ] {
        if let Some(at) = out.find(rust) {
            // Whole words only: `u8` is not the start of `u16`.
            let end = at + rust.len();
            if !out[end..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
                out.replace_range(at..end, words);
            }
        }
    }
    out
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}
