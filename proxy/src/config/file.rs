//! The TOML file as operators write it: serde structs only, every default documented here.
//!
//! Values that can be checked on their own (durations, addresses, non-zero counts, paths) are
//! checked while deserializing, so their errors carry the key and the line. Checks that span
//! several keys live in [`super::validate`].

use std::num::NonZeroU32;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    pub upstream: UpstreamSection,
    /// Absent: no admin listener.
    pub admin: Option<AdminSection>,
    /// Absent: no login at the edge (a plain load balancer).
    pub auth: Option<AuthSection>,
    /// `[log]`: diagnostics on stderr, access log on stdout.
    #[serde(default)]
    pub log: LogSection,
    /// `[[route]]` entries: policies by path prefix (need `[auth]`).
    #[serde(default = "defaults::routes")]
    pub route: Spanned<Vec<RouteEntry>>,
    /// `[limits]`: abuse limits; every key has a default.
    #[serde(default)]
    pub limits: LimitsSection,
}

/// `[limits]`: what one client, or all of them together, may ask of the proxy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Open client connections at once; above it a new connection gets 503 and is closed.
    /// Default 4096.
    pub max_connections: Bounded<1, 1_000_000>,
    /// Largest request body (`[[route]] max_body_size` overrides it per prefix); larger ones
    /// get 413. Bytes or `"512k"`, `"1m"`, `"1g"` (binary units). Default `"1m"` (nginx's
    /// `client_max_body_size`).
    pub max_body_size: ByteSize,
    /// Requests to `/login` and `/callback` (together) per client address per minute; more get
    /// 429 with `Retry-After`. Default 30.
    pub login_rate_per_minute: Bounded<1, 100_000>,
    /// How long a client may take to send a whole request (head and body) once it started,
    /// and how long a new connection may stay silent; then it is closed. Default 30 s.
    pub client_timeout: HumanDuration,
    /// How long one write of an answer to a client may wait for the client to take it (nginx's
    /// `send_timeout`); then the connection is closed and the worker let go. Default 60 s.
    pub send_timeout: HumanDuration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_connections: Bounded(4096),
            max_body_size: ByteSize(1 << 20),
            login_rate_per_minute: Bounded(30),
            client_timeout: HumanDuration(Duration::from_secs(30)),
            send_timeout: HumanDuration(Duration::from_secs(60)),
        }
    }
}

/// A whole number in `MIN..=MAX`: 0 and absurd values are refused while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(deserializer)?;
        match u64::try_from(n) {
            Ok(n) if (MIN..=MAX).contains(&n) => Ok(Bounded(n)),
            _ => Err(de::Error::custom(format!(
                "{n} is out of range: expected a whole number from {MIN} to {MAX}"
            ))),
        }
    }
}

/// A size in bytes: a number, or a string with a binary unit (`"512k"`, `"1m"`, `"1g"`).
/// At least 1 byte and at most [`ByteSize::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// 1 GiB: a body larger than this is not something this proxy should buffer or pass.
    pub const MAX: u64 = 1 << 30;

    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let bad = || {
            format!("invalid size `{text}`: expected bytes or a number with k, m or g, e.g. \"1m\"")
        };
        let t = text.trim().to_ascii_lowercase();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = t.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let shift = match unit.trim() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            _ => return Err(bad()),
        };
        let bytes = number.checked_shl(shift).filter(|b| b >> shift == number);
        ByteSize::checked(bytes.unwrap_or(u64::MAX))
    }

    fn checked(bytes: u64) -> Result<ByteSize, String> {
        match bytes {
            0 => Err("a size of 0 would refuse every request body: at least 1 byte".into()),
            b if b > ByteSize::MAX => {
                Err(format!("{b} bytes is larger than the 1g this proxy allows"))
            }
            b => Ok(ByteSize(b)),
        }
    }
}

impl Default for ByteSize {
    fn default() -> Self {
        ByteSize(1 << 20)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"a size in bytes or a string such as "1m""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                let bytes = u64::try_from(v).map_err(|_| {
                    E::custom(format!("{v} is negative: a size is at least 1 byte"))
                })?;
                ByteSize::checked(bytes).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                ByteSize::checked(v).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// `[auth]`: the OIDC login at the edge. Secrets come from the environment only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// The IdP's issuer URL; else `CUSTODIA_AUTH_ISSUER`, else `https://$AUTH0_DOMAIN/`.
    pub issuer: Option<String>,
    /// Else `AUTH0_CLIENT_ID`.
    pub client_id: Option<String>,
    /// Where users reach the proxy; redirect_uri = public_url + `/callback`.
    pub public_url: Spanned<String>,
    #[serde(default = "defaults::scopes")]
    pub scopes: Vec<String>,
    /// Default 8 h.
    #[serde(default = "defaults::session_ttl")]
    pub session_ttl: HumanDuration,
    #[serde(default)]
    pub allowed_emails: Vec<String>,
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Peers whose X-Forwarded-Proto/Host/For are believed; default loopback only.
    #[serde(default = "defaults::trusted_proxies")]
    pub trusted_proxies: Spanned<Vec<String>>,
    /// Policy of paths no `[[route]]` matches; default `required`.
    #[serde(default = "defaults::default_policy")]
    pub default_policy: PolicyName,
    /// `client_secret_basic` or `client_secret_post`; default: what discovery advertises.
    pub client_auth: Option<ClientAuthName>,
}

/// One `[[route]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    pub prefix: String,
    pub policy: PolicyName,
    /// Overrides `[limits] max_body_size` for paths under this prefix.
    pub max_body_size: Option<ByteSize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    Public,
    Optional,
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthName {
    ClientSecretBasic,
    ClientSecretPost,
}

/// `[log]`: what the proxy writes. Diagnostics go to stderr, the access log to stdout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Diagnostics level or `RUST_LOG`-style directives; default `info`. `RUST_LOG` wins.
    pub level: String,
    /// Diagnostics on stderr as `text` (default) or `json` lines.
    pub format: LogFormatName,
    /// One JSON line per request on stdout; default true.
    pub access_log: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: LogFormatName::Text,
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormatName {
    #[default]
    Text,
    Json,
}

/// `[admin]`: metrics and probes for operators, never on the public listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Default `127.0.0.1:9090`.
    #[serde(default = "defaults::admin_listen")]
    pub listen: Address,
}

/// `[server]`: the public listener and the process.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// One address or a list; default `127.0.0.1:8080`.
    pub listen: Listen,
    /// Worker threads; 0 (default) = one per core.
    pub threads: usize,
    /// How long SIGTERM lets in-flight requests finish; default 5 s.
    pub grace_period: HumanDuration,
    /// Idle time after which a downstream keep-alive connection is closed; default 60 s.
    pub keepalive_timeout: HumanDuration,
    /// Plain `GET`/`HEAD` requests take Custodia's own HTTP/1 path to the workers; default on.
    pub fast_path: bool,
    /// Pid file, used by `--reload` and upgrades; default `/tmp/custodia-proxy.pid`.
    pub pid_file: String,
    /// Unix socket over which `--upgrade` takes the listeners over; default
    /// `/tmp/custodia-proxy-upgrade.sock`.
    pub upgrade_sock: String,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: Listen(vec![Address(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                8080,
            )))]),
            threads: 0,
            grace_period: HumanDuration(Duration::from_secs(5)),
            keepalive_timeout: HumanDuration(Duration::from_secs(60)),
            fast_path: true,
            pid_file: DEFAULT_PID_FILE.into(),
            upgrade_sock: "/tmp/custodia-proxy-upgrade.sock".into(),
        }
    }
}

/// `[server] pid_file` when the file names none.
pub const DEFAULT_PID_FILE: &str = "/tmp/custodia-proxy.pid";

/// `[upstream]`: the app workers and how requests reach them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// `least_conn` (default), `least_time` or `round_robin`.
    #[serde(default)]
    pub balance: BalanceName,
    /// `"host:port"` or `{ addr = "host:port", weight = N }`; at least one.
    pub backends: Spanned<Vec<BackendEntry>>,
    /// Default 10 s, like the seed's nginx `proxy_connect_timeout`.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Default 30 s (nginx `proxy_read_timeout`).
    #[serde(default = "defaults::read_timeout")]
    pub read_timeout: HumanDuration,
    /// Default 30 s (nginx `proxy_send_timeout`).
    #[serde(default = "defaults::send_timeout")]
    pub send_timeout: HumanDuration,
    /// Idle upstream keep-alive connections are closed after this; default 60 s.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// How many times a failed attempt may be retried on another backend; default 2.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    #[serde(default)]
    pub health: HealthSection,
    /// How often backends given by DNS name are re-resolved; default 10 s.
    #[serde(default = "defaults::discovery_interval")]
    pub discovery_interval: HumanDuration,
}

/// `[upstream.health]`: active HTTP health checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub path: UrlPath,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    pub healthy_after: NonZeroU32,
    pub unhealthy_after: NonZeroU32,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            path: UrlPath("/healthz".into()),
            interval: HumanDuration(Duration::from_secs(2)),
            timeout: HumanDuration(Duration::from_secs(1)),
            healthy_after: TWO,
            unhealthy_after: TWO,
        }
    }
}

const TWO: NonZeroU32 = NonZeroU32::MIN.saturating_add(1);

mod defaults {
    use super::HumanDuration;
    use std::time::Duration;

    pub fn connect_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    pub fn read_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn send_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn idle_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }
    pub fn discovery_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn routes() -> toml::Spanned<Vec<super::RouteEntry>> {
        toml::Spanned::new(0..0, Vec::new())
    }
    pub fn scopes() -> Vec<String> {
        ["openid", "profile", "email"].map(String::from).to_vec()
    }
    pub fn session_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(8 * 3600))
    }
    pub fn trusted_proxies() -> toml::Spanned<Vec<String>> {
        toml::Spanned::new(0..0, vec!["127.0.0.1/32".into(), "::1/128".into()])
    }
    pub fn default_policy() -> super::PolicyName {
        super::PolicyName::Required
    }
    pub fn admin_listen() -> super::Address {
        super::Address(std::net::SocketAddr::from(([127, 0, 0, 1], 9090)))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceName {
    #[default]
    LeastConn,
    LeastTime,
    RoundRobin,
}

/// A backend as written: a bare address or a table with a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: HostPort,
    pub weight: NonZeroU32,
}

impl<'de> Deserialize<'de> for BackendEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            addr: HostPort,
            #[serde(default = "one")]
            weight: NonZeroU32,
        }
        fn one() -> NonZeroU32 {
            NonZeroU32::MIN
        }

        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = BackendEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""host:port" or { addr = "host:port", weight = N }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BackendEntry, E> {
                Ok(BackendEntry {
                    addr: HostPort::parse(v).map_err(E::custom)?,
                    weight: NonZeroU32::MIN,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BackendEntry, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendEntry {
                    addr: t.addr,
                    weight: t.weight,
                })
            }
        }
        deserializer.deserialize_any(EntryVisitor)
    }
}

/// `host:port` where host is an IP address or a DNS name (resolved at startup).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(text: &str) -> Result<HostPort, String> {
        if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!(
                    "invalid address `{text}`: port 0 is no port to connect to (1 to 65535)"
                ));
            }
            // `[::ffff:127.0.0.1]` is `127.0.0.1`: one backend, not two to balance over.
            return Ok(HostPort {
                host: addr.ip().to_canonical().to_string(),
                port: addr.port(),
            });
        }
        let bad = || {
            format!("invalid address `{text}`: expected \"host:port\", e.g. \"127.0.0.1:9001\" or \"app:8000\"")
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid_name {
            return Err(bad());
        }
        if port == 0 {
            return Err(format!(
                "invalid address `{text}`: port 0 is no port to connect to (1 to 65535)"
            ));
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HostPort::parse(&text).map_err(de::Error::custom)
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A literal `IP:port` socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address(pub std::net::SocketAddr);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let addr: std::net::SocketAddr = text.parse().map_err(|_| {
            de::Error::custom(format!(
                "invalid listen address `{text}`: expected \"IP:port\", e.g. \"127.0.0.1:8080\" or \"0.0.0.0:8080\""
            ))
        })?;
        if addr.port() == 0 {
            // Port 0 asks the kernel for any free port: one per worker thread, none known.
            return Err(de::Error::custom(format!(
                "invalid listen address `{text}`: port 0 would listen on a random port; \
                 expected a port from 1 to 65535"
            )));
        }
        Ok(Address(addr))
    }
}

/// `listen = "addr"` or `listen = ["addr", ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen(pub Vec<Address>);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListenVisitor;
        impl<'de> Visitor<'de> for ListenVisitor {
            type Value = Listen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an address "IP:port" or a list of them"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                let addr = Address::deserialize(de::value::StrDeserializer::<E>::new(v))?;
                Ok(Listen(vec![addr]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
                let mut all = Vec::new();
                while let Some(addr) = seq.next_element::<Address>()? {
                    all.push(addr);
                }
                if all.is_empty() {
                    return Err(de::Error::custom("the listen list is empty"));
                }
                Ok(Listen(all))
            }
        }
        deserializer.deserialize_any(ListenVisitor)
    }
}

/// A duration written the human way: `"10s"`, `"500ms"`, `"2m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration `{text}` ({e}): expected e.g. \"10s\", \"500ms\", \"2m\""
                ))
            })
    }
}

/// An absolute URL path such as `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPath(pub String);

impl<'de> Deserialize<'de> for UrlPath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let ok = text.starts_with('/')
            && !text.starts_with("//")
            && text.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(UrlPath(text))
        } else {
            Err(de::Error::custom(format!(
                "invalid path `{text}`: expected an absolute path such as \"/healthz\""
            )))
        }
    }
}
