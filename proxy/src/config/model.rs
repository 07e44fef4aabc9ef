//! The validated runtime model: what the request path reads. Built only by [`super::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where the configuration came from (for messages).
    pub source: PathBuf,
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub admin: Option<AdminSettings>,
    /// None: a plain load balancer.
    pub auth: Option<AuthSettings>,
    pub log: LogSettings,
    pub limits: LimitSettings,
}

/// `[limits]`, validated: abuse limits (all of them change on reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    /// Client connections open at once.
    pub max_connections: usize,
    /// Largest request body in bytes where no route overrides it.
    pub max_body_size: u64,
    /// (prefix, bytes) of the `[[route]]`s that set `max_body_size`, longest prefix first.
    pub route_body_sizes: Vec<(String, u64)>,
    /// `/login` + `/callback` requests per client address per minute.
    pub login_rate_per_minute: u32,
    /// Time to send a whole request once started; silence allowed on a new connection.
    pub client_timeout: Duration,
    /// Time one write of an answer may wait for the client to read.
    pub send_timeout: Duration,
}

impl LimitSettings {
    /// The body limit for a path (the normalised path, ASCII case-insensitive like routes).
    pub fn max_body_size_for(&self, path: &str) -> u64 {
        let path = path.as_bytes();
        self.route_body_sizes
            .iter()
            .find(|(prefix, _)| {
                path.len() >= prefix.len()
                    && path[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            })
            .map_or(self.max_body_size, |(_, size)| *size)
    }
}

/// `[log]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// An `EnvFilter` directive string (`info`, `warn,custodia_proxy=debug`, …).
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

pub use super::env::Secret;

/// Who may see what, and how users log in. Everything here is validated and complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// As configured, e.g. `https://tenant.auth0.com/` (Auth0's trailing slash kept).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// None: as the IdP's discovery document advertises.
    pub client_auth: Option<ClientAuth>,
    /// Origin users reach us at, without a trailing slash.
    pub public_url: String,
    /// public_url is https: cookies get `Secure` and the `__Host-` prefix.
    pub secure_cookies: bool,
    pub scopes: Vec<String>,
    pub session_ttl: Duration,
    /// Lower-cased; empty = anyone the IdP accepts (unless `allowed_domains` is set).
    pub allowed_emails: Vec<String>,
    pub allowed_domains: Vec<String>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub default_policy: RoutePolicy,
    /// (prefix, policy) as configured.
    pub routes: Vec<(String, RoutePolicy)>,
    /// APP_SECRET_KEY, then APP_SECRET_KEY_PREVIOUS (still accepted to open sessions).
    pub session_secret: Secret,
    pub previous_session_secrets: Vec<Secret>,
    /// Key of the identity assertion sent to workers.
    pub assertion_key: Secret,
}

impl AuthSettings {
    pub fn redirect_uri(&self) -> String {
        format!("{}/callback", self.public_url)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Basic,
    Post,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutePolicy {
    Public,
    Optional,
    Required,
}

impl RoutePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutePolicy::Public => "public",
            RoutePolicy::Optional => "optional",
            RoutePolicy::Required => "required",
        }
    }
}

/// The operators' listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    /// Resolved: never 0.
    pub threads: usize,
    pub grace_period: Duration,
    pub keepalive_timeout: Duration,
    /// Plain requests go through [`crate::express`] instead of Pingora's proxy.
    pub fast_path: bool,
    pub pid_file: PathBuf,
    pub upgrade_sock: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    LeastConn,
    LeastTime,
    RoundRobin,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastConn => "least_conn",
            Balance::LeastTime => "least_time",
            Balance::RoundRobin => "round_robin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub balance: Balance,
    pub backends: Vec<BackendTarget>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    pub health: HealthSettings,
    /// How often backends given by DNS name are re-resolved.
    pub discovery_interval: Duration,
}

/// One configured backend: an address as written (IP or DNS name) and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTarget {
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

impl std::fmt::Display for BackendTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}
