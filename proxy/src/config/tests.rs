//! Tests of parsing and validation: whole-model comparison and error messages.

use std::path::Path;
use std::time::Duration;

use super::*;

fn parse_str(text: &str) -> Result<ProxyConfig, ConfigError> {
    parse(text, Path::new("test.toml"))
}

fn error_of(text: &str) -> String {
    parse_str(text).unwrap_err().to_string()
}

#[test]
fn a_full_file_becomes_the_expected_model() {
    let text = r#"
[server]
listen = ["127.0.0.1:8080", "127.0.0.1:8081"]
threads = 3
grace_period = "2s"
keepalive_timeout = "15s"
fast_path = false
pid_file = "/tmp/x.pid"
upgrade_sock = "/tmp/x.sock"

[upstream]
balance = "round_robin"
backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 2 }]
connect_timeout = "1s"
read_timeout = "2s"
send_timeout = "3s"
idle_timeout = "4s"
retries = 5
discovery_interval = "3s"

[upstream.health]
path = "/up"
interval = "500ms"
timeout = "250ms"
healthy_after = 1
unhealthy_after = 3

[admin]
listen = "127.0.0.1:9191"

[log]
level = "warn,custodia_proxy=debug"
format = "json"
access_log = false

[limits]
max_connections = 100
max_body_size = "64k"
login_rate_per_minute = 5
client_timeout = "10s"
send_timeout = "20s"
"#;
    let expected = ProxyConfig {
        source: "test.toml".into(),
        admin: Some(AdminSettings {
            listen: "127.0.0.1:9191".parse().unwrap(),
        }),
        auth: None,
        log: LogSettings {
            level: "warn,custodia_proxy=debug".into(),
            format: LogFormat::Json,
            access_log: false,
        },
        limits: LimitSettings {
            max_connections: 100,
            max_body_size: 64 * 1024,
            route_body_sizes: Vec::new(),
            login_rate_per_minute: 5,
            client_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(20),
        },
        server: ServerSettings {
            listen: vec![
                "127.0.0.1:8080".parse().unwrap(),
                "127.0.0.1:8081".parse().unwrap(),
            ],
            threads: 3,
            grace_period: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(15),
            fast_path: false,
            pid_file: "/tmp/x.pid".into(),
            upgrade_sock: "/tmp/x.sock".into(),
        },
        upstream: UpstreamSettings {
            balance: Balance::RoundRobin,
            backends: vec![
                BackendTarget {
                    host: "127.0.0.1".into(),
                    port: 9001,
                    weight: 1,
                },
                BackendTarget {
                    host: "127.0.0.1".into(),
                    port: 9002,
                    weight: 2,
                },
            ],
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(2),
            send_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(4),
            retries: 5,
            discovery_interval: Duration::from_secs(3),
            health: HealthSettings {
                path: "/up".into(),
                interval: Duration::from_millis(500),
                timeout: Duration::from_millis(250),
                healthy_after: 1,
                unhealthy_after: 3,
            },
        },
    };
    assert_eq!(parse_str(text).unwrap(), expected);
}

#[test]
fn defaults_follow_the_seed_nginx() {
    let c = parse_str("[upstream]\nbackends = [\"app:8000\"]\n").unwrap();
    assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert!(c.server.threads >= 1, "0 resolves to the core count");
    assert_eq!(c.upstream.balance, Balance::LeastConn);
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.upstream.read_timeout, Duration::from_secs(30));
    assert_eq!(c.upstream.send_timeout, Duration::from_secs(30));
    assert_eq!(c.upstream.retries, 2);
    assert_eq!(c.upstream.health.path, "/healthz");
    assert_eq!(c.upstream.backends[0].host, "app");
    assert_eq!(c.upstream.discovery_interval, Duration::from_secs(10));
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    assert!(c.log.access_log);
    assert_eq!(c.limits.max_connections, 4096);
    assert_eq!(
        c.limits.max_body_size,
        1 << 20,
        "nginx's client_max_body_size 1m"
    );
    assert_eq!(c.limits.login_rate_per_minute, 30);
    assert_eq!(c.limits.client_timeout, Duration::from_secs(30));
    assert_eq!(c.limits.send_timeout, Duration::from_secs(60));
}

#[test]
fn limits_refuse_zero_and_absurd_values() {
    let base = "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[limits]\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            "max_connections = 0",
            "limits.max_connections",
            "out of range",
        ),
        (
            "max_connections = 2000000",
            "limits.max_connections",
            "out of range",
        ),
        (
            "max_connections = -1",
            "limits.max_connections",
            "out of range",
        ),
        (
            "login_rate_per_minute = 0",
            "limits.login_rate_per_minute",
            "out of range",
        ),
        (
            "max_body_size = 0",
            "limits.max_body_size",
            "at least 1 byte",
        ),
        (
            "max_body_size = \"0k\"",
            "limits.max_body_size",
            "at least 1 byte",
        ),
        (
            "max_body_size = \"2g\"",
            "limits.max_body_size",
            "larger than the 1g",
        ),
        (
            "max_body_size = \"99999999999999999999g\"",
            "limits.max_body_size",
            "invalid size",
        ),
        (
            "max_body_size = \"1 potato\"",
            "limits.max_body_size",
            "invalid size",
        ),
        (
            "client_timeout = \"0s\"",
            "limits.client_timeout",
            "between 1s and 10m",
        ),
        (
            "client_timeout = \"1h\"",
            "limits.client_timeout",
            "between 1s and 10m",
        ),
        (
            "send_timeout = \"0s\"",
            "limits.send_timeout",
            "between 1s and 1h",
        ),
        (
            "max_body = 1",
            "limits.max_body",
            "unknown field `max_body`",
        ),
    ];
    for (line, key, words) in cases {
        let err = error_of(&format!("{base}{line}\n"));
        assert!(err.contains(&format!("key `{key}`")), "{line}: {err}");
        assert!(err.contains(words), "{line}: {err}");
        assert!(
            err.contains("test.toml:"),
            "{line}: the line is named: {err}"
        );
    }
}

#[test]
fn body_sizes_take_units_and_routes_override_them() {
    let env: std::collections::HashMap<String, String> = [
        ("AUTH0_CLIENT_SECRET", "secret"),
        ("APP_SECRET_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let text = r#"
[upstream]
backends = ["127.0.0.1:1"]
[limits]
max_body_size = "512k"
[auth]
issuer = "http://127.0.0.1:1/"
client_id = "c"
public_url = "http://127.0.0.1:8080"
[[route]]
prefix = "/upload/"
policy = "required"
max_body_size = "10m"
[[route]]
prefix = "/upload/small/"
policy = "required"
max_body_size = 100
[[route]]
prefix = "/"
policy = "public"
"#;
    let c = parse_with_env(text, Path::new("test.toml"), &env).unwrap();
    assert_eq!(c.limits.max_body_size, 512 * 1024);
    assert_eq!(c.limits.max_body_size_for("/upload/a"), 10 << 20);
    assert_eq!(c.limits.max_body_size_for("/UPLOAD/small/x"), 100);
    assert_eq!(c.limits.max_body_size_for("/other"), 512 * 1024);
    let summary = summary(&c);
    assert!(summary.contains("bodies up to 512k"), "{summary}");
    assert!(summary.contains("/upload/small/"), "{summary}");
}

#[test]
fn every_balance_mode_is_spelled_as_in_the_file() {
    for balance in [Balance::LeastConn, Balance::LeastTime, Balance::RoundRobin] {
        let text = format!(
            "[upstream]\nbackends = [\"app:8000\"]\nbalance = \"{}\"\n",
            balance.as_str()
        );
        assert_eq!(parse_str(&text).unwrap().upstream.balance, balance);
    }
    // A typo lists the modes there are.
    let message = error_of("[upstream]\nbackends = [\"app:8000\"]\nbalance = \"least_tim\"\n");
    assert!(
        message.contains("`least_conn`, `least_time`, `round_robin`")
            || message.contains("`least_conn`, `least_time` or `round_robin`"),
        "{message}"
    );
}

#[test]
fn errors_name_the_key_and_the_line() {
    let cases: &[(&str, &str, &str)] = &[
        // (file, expected key, expected words)
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\nconnect_timeout = \"ten\"\n",
         "upstream.connect_timeout", "invalid duration"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\nretries = \"two\"\n",
         "upstream.retries", "invalid type: string \"two\", expected a whole number"),
        ("[server]\nlisten = \"localhost\"\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n",
         "server.listen", "invalid listen address"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\nbalance = \"fastest\"\n",
         "upstream.balance", "unknown variant"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\nbogus = 1\n",
         "upstream", "unknown field `bogus`"),
        ("[upstream]\nbackends = []\n", "upstream.backends", "no backends"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[admin]\nlisten = \"127.0.0.1:8080\"\n",
         "admin.listen", "must be separate"),
        ("[upstream]\nbackends = [\"no port\"]\n", "upstream.backends", "invalid address"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\", { addr = \"127.0.0.1:2\", weight = \"heavy\" }]\n",
         "upstream.backends[1].weight", "invalid type"),
        ("[upstream]\nbackends = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n",
         "upstream.backends", "nonzero"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
         "upstream.backends", "listed twice"),
        ("[[upstream]]\nbackends = [\"127.0.0.1:1\"]\n",
         "upstream", "[[upstream]] is a list of tables: write [upstream]"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[route]\nprefix = \"/\"\n",
         "route", "write each route as [[route]]"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[limits]\nmax_body_size = -1\n",
         "limits.max_body_size", "-1 is negative"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\", \"[::ffff:127.0.0.1]:1\"]\n",
         "upstream.backends", "backend 127.0.0.1:1 is listed twice"),
        // The proxy itself as its backend: requests would loop.
        ("[upstream]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:8080\"]\n",
         "upstream.backends", "own listen address 127.0.0.1:8080"),
        ("[server]\nlisten = \"0.0.0.0:8081\"\n[upstream]\nbackends = [\"127.0.0.1:8081\"]\n",
         "upstream.backends", "own listen address 0.0.0.0:8081"),
        ("[server]\nlisten = [\"[::]:8081\"]\n[upstream]\nbackends = [\"localhost:8081\"]\n",
         "upstream.backends", "own listen address [::]:8081"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[upstream.health]\npath = \"healthz\"\n",
         "upstream.health.path", "absolute path"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[upstream.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n",
         "upstream.health.timeout", "longer than its interval"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[log]\nlevel = \"loud=verbose=x\"\n",
         "log.level", "invalid level"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[log]\nlevel = \"warning\"\n",
         "log.level", "`warning` is not a level"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[log]\nlevel = \"\"\n",
         "log.level", "an empty level would log nothing"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[log]\nlevel = \" , \"\n",
         "log.level", "an empty level would log nothing"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[log]\nlevel = \"custodia_proxy=debug, verbose\"\n",
         "log.level", "`verbose` is not a level"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[upstream.health]\ntimeout = \"0s\"\n",
         "upstream.health.timeout", "0s is out of range: must be between 1ms and 1d"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[upstream.health]\ninterval = \"0s\"\ntimeout = \"0s\"\n",
         "upstream.health.interval", "0s is out of range: must be between 1ms and 1d"),
        ("[server]\nthreads = 100000\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n",
         "server.threads", "more than the 1024"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[log]\nformat = \"xml\"\n",
         "log.format", "unknown variant"),
        ("[upstream]\nbackends = [\"127.0.0.1:1\"]\ndiscovery_interval = \"1ms\"\n",
         "upstream.discovery_interval", "must be between 100ms and 1d"),
    ];
    for (text, key, words) in cases {
        let message = error_of(text);
        assert!(
            message.contains(&format!("key `{key}")),
            "{text:?} → {message}"
        );
        assert!(message.contains(words), "{text:?} → {message}");
        assert!(message.starts_with("test.toml:"), "{text:?} → {message}");
    }
}

#[test]
fn a_bad_route_is_reported_at_its_own_line() {
    let text = "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\npublic_url = \"http://127.0.0.1:8080\"\n\
                \n[[route]]\nprefix = \"/\"\npolicy = \"optional\"\n\
                \n[[route]]\npolicy = \"public\"\nprefix = \"/healthz\"\n\
                \n[[route]]\nprefix = \"/api/\"\npolicy = \"required\"\n\
                \n[[route]]\nprefix = \"/API/\"\npolicy = \"public\"\n";
    let message = parse_with_env(text, Path::new("t.toml"), &stack_env())
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("t.toml:19:") && message.contains("`/API/` is listed twice"),
        "{message}"
    );
    let bad = text.replace("prefix = \"/healthz\"", "prefix = \"/a/../b\"");
    let message = parse_with_env(&bad, Path::new("t.toml"), &stack_env())
        .unwrap_err()
        .to_string();
    assert!(message.starts_with("t.toml:12:"), "{message}");
}

#[test]
fn the_line_number_points_at_the_bad_value() {
    let message = error_of("[upstream]\nbackends = [\"127.0.0.1:1\"]\n\nread_timeout = \"soon\"\n");
    assert!(message.starts_with("test.toml:4:"), "{message}");
}

#[test]
fn a_missing_upstream_section_is_an_error() {
    let message = error_of("[server]\nthreads = 1\n");
    assert!(message.contains("upstream"), "{message}");
}

#[test]
fn syntax_errors_are_reported_not_panicked() {
    for junk in [
        "[upstream",
        "backends = [",
        "\u{0}",
        "[[upstream]]\nbackends=1",
    ] {
        assert!(parse_str(junk).is_err(), "{junk:?}");
    }
}

#[test]
fn a_file_too_large_or_not_text_is_refused_not_read_whole() {
    let endless = load_with_env(Path::new("/dev/zero"), &stack_env())
        .unwrap_err()
        .to_string();
    assert!(
        endless.contains("/dev/zero") && endless.contains("over 4 MiB"),
        "{endless}"
    );
    let dir = std::env::temp_dir().join(format!("custodia-binary-config-{}", std::process::id()));
    std::fs::write(&dir, b"[server]\n\xff\xfe").unwrap();
    let binary = load_with_env(&dir, &stack_env()).unwrap_err().to_string();
    let _ = std::fs::remove_file(&dir);
    assert!(binary.contains("not UTF-8"), "{binary}");
}

#[test]
fn errors_in_the_shipped_config_have_their_line_whatever_its_comments_say() {
    // Its comments name `[server]` and `[admin]` before those tables.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/custodia.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let line_of = |key: &str| {
        1 + text
            .lines()
            .position(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no `{key}` line"))
    };
    let bad_grace = text.replace("grace_period = \"5s\"", "grace_period = \"2h\"");
    let message = parse_with_env(&bad_grace, Path::new("c.toml"), &stack_env())
        .unwrap_err()
        .to_string();
    let expected = format!(
        "c.toml:{}: key `server.grace_period`",
        line_of("grace_period")
    );
    assert!(message.starts_with(&expected), "{message}");
    let bad_admin = text.replace("listen = \"127.0.0.1:9090\"", "listen = \"0.0.0.0:8080\"");
    let message = parse_with_env(&bad_admin, Path::new("c.toml"), &stack_env())
        .unwrap_err()
        .to_string();
    let admin_line = 1 + text
        .lines()
        .position(|l| l == "listen = \"127.0.0.1:9090\"")
        .unwrap();
    assert!(
        message.starts_with(&format!("c.toml:{admin_line}: key `admin.listen`")),
        "{message}"
    );
}

#[test]
fn the_shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/custodia.toml");
    let env = stack_env();
    let config = load_with_env(&path, &env).unwrap();
    assert_eq!(config.upstream.backends.len(), 3);
    let auth = config.auth.expect("the shipped config logs users in");
    assert_eq!(auth.issuer, "http://127.0.0.1:9400");
    assert_eq!(auth.redirect_uri(), "http://127.0.0.1:8080/callback");
    assert!(!auth.secure_cookies);
    assert_eq!(auth.default_policy, RoutePolicy::Required);
    assert!(auth
        .routes
        .contains(&("/api/".into(), RoutePolicy::Required)));
}

pub(super) fn stack_env() -> std::collections::HashMap<String, String> {
    [
        ("CUSTODIA_AUTH_ISSUER", "http://127.0.0.1:9400"),
        ("AUTH0_CLIENT_ID", "custodia-local"),
        ("AUTH0_CLIENT_SECRET", "client-secret"),
        ("APP_SECRET_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

const AUTH_BASE: &str =
    "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\npublic_url = \"https://x.ngrok-free.app\"\n";

fn auth_error(extra: &str, env: &[(&str, &str)]) -> String {
    let mut map = stack_env();
    for (k, v) in env {
        if v.is_empty() {
            map.remove(*k);
        } else {
            map.insert(k.to_string(), v.to_string());
        }
    }
    parse_with_env(&format!("{AUTH_BASE}{extra}"), Path::new("a.toml"), &map)
        .unwrap_err()
        .to_string()
}

#[test]
fn auth0_settings_come_from_the_seed_env() {
    let mut env = stack_env();
    env.remove("CUSTODIA_AUTH_ISSUER");
    env.insert("AUTH0_DOMAIN".into(), "tenant.eu.auth0.com".into());
    let c = parse_with_env(AUTH_BASE, Path::new("a.toml"), &env).unwrap();
    let auth = c.auth.unwrap();
    assert_eq!(auth.issuer, "https://tenant.eu.auth0.com/");
    assert!(auth.secure_cookies, "https public_url gives Secure cookies");
    assert_eq!(auth.redirect_uri(), "https://x.ngrok-free.app/callback");
    assert_eq!(
        auth.assertion_key.0,
        custodia_identity::derive_assertion_key("5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d")
    );
}

#[test]
fn auth_problems_are_errors_never_auth_off() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("", &[("CUSTODIA_AUTH_ISSUER", "")], "no identity provider"),
        ("", &[("AUTH0_CLIENT_ID", "")], "client_id"),
        ("", &[("AUTH0_CLIENT_SECRET", "")], "AUTH0_CLIENT_SECRET"),
        ("", &[("APP_SECRET_KEY", "")], "openssl rand -hex 32"),
        ("", &[("APP_SECRET_KEY", "too-short")], "too weak"),
        ("", &[("APP_SECRET_KEY", "change-me-run-openssl-rand-hex-32-and-paste-it-here")], "placeholder"),
        ("", &[("APP_SECRET_KEY", "YOUR-SECRET-KEY-GOES-HERE-PLEASE-1234")], "placeholder"),
        ("", &[("APP_SECRET_KEY", &"a".repeat(64))], "only 1 different characters"),
        ("", &[("APP_SECRET_KEY", "abababababababababababababababab")], "too weak"),
        ("", &[("APP_SECRET_KEY_PREVIOUS", "changeme-changeme-changeme-changeme")], "APP_SECRET_KEY_PREVIOUS is still"),
        ("", &[("APP_SECRET_KEY_PREVIOUS", "x")], "APP_SECRET_KEY_PREVIOUS"),
        ("", &[("CUSTODIA_ASSERTION_KEY", "short")], "CUSTODIA_ASSERTION_KEY"),
        ("", &[("CUSTODIA_AUTH_ISSUER", "http://idp.example.com/")], "plain http"),
        ("issuer = \"ftp://x\"\n", &[], "not a URL"),
        ("scopes = [\"email\"]\n", &[], "openid"),
        ("trusted_proxies = [\"10.0.0.0/33\"]\n", &[], "10.0.0.0/33"),
        ("allowed_emails = [\"nobody\"]\n", &[], "not an email"),
        ("default_policy = \"maybe\"\n", &[], "unknown variant"),
        ("[[route]]\nprefix = \"/a/../b\"\npolicy = \"public\"\n", &[], "normalised"),
        ("[[route]]\nprefix = \"/a\"\npolicy = \"public\"\n[[route]]\nprefix = \"/a\"\npolicy = \"required\"\n", &[], "twice"),
        // Credentials blank, padded or still .env.example's.
        ("client_id = \"\"\n", &[], "client_id is blank"),
        ("", &[("AUTH0_CLIENT_ID", " ")], "AUTH0_CLIENT_ID is blank"),
        ("", &[("AUTH0_CLIENT_SECRET", " ")], "AUTH0_CLIENT_SECRET is blank"),
        ("", &[("AUTH0_CLIENT_SECRET", "s3cret ")], "AUTH0_CLIENT_SECRET starts or ends with spaces"),
        ("", &[("AUTH0_CLIENT_ID", "your-auth0-client-id")], "AUTH0_CLIENT_ID is still .env.example's placeholder"),
        ("", &[("AUTH0_CLIENT_SECRET", "your-auth0-client-secret")], "AUTH0_CLIENT_SECRET is still .env.example's placeholder"),
        ("", &[("CUSTODIA_AUTH_ISSUER", ""), ("AUTH0_DOMAIN", "your-tenant.eu.auth0.com")], "placeholder"),
        // Issuers no provider can have.
        ("", &[("CUSTODIA_AUTH_ISSUER", ""), ("AUTH0_DOMAIN", "idp.example.com/evil?x=")], "AUTH0_DOMAIN (environment or .env): `idp.example.com/evil?x=` is not a domain name"),
        ("issuer = \"https://idp.example.com/?a=b#frag\"\n", &[], "query or fragment"),
        // The workers' key may not seal sessions.
        ("", &[("CUSTODIA_ASSERTION_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d")], "also a session key"),
        // Allow-lists no email can match.
        ("allowed_emails = [\"a@b@c.com\"]\n", &[], "not an email"),
        ("allowed_emails = [\"a@localhost\"]\n", &[], "not an email"),
        ("allowed_domains = [\"*.example.com\"]\n", &[], "wildcards are not supported"),
        ("allowed_domains = [\".com\"]\n", &[], "not a domain name"),
        ("allowed_domains = [\".\"]\n", &[], "not a domain name"),
    ];
    for (extra, env, words) in cases {
        let message = auth_error(extra, env);
        assert!(message.contains(words), "{extra:?} {env:?} → {message}");
        assert!(
            !message.contains("5f0c7a1d9e2b4c6f8a0d"),
            "no secret in: {message}"
        );
    }
    // An issuer from the environment is named as such, at the [auth] table's line (3), not at
    // a line of the file that has nothing to do with it.
    let from_env = auth_error("", &[("CUSTODIA_AUTH_ISSUER", "http://idp.example.com/")]);
    assert!(
        from_env.starts_with("a.toml:3: key `auth.issuer`: CUSTODIA_AUTH_ISSUER (environment or .env): `http://idp.example.com/` uses plain http"),
        "{from_env}"
    );
    for bad_port in [
        "https://a:b:443",
        "https://[zz]:8443",
        "https://...",
        "https://-",
        "https://x.app:abc",
        "https://x.app:99999",
        "https://x.app:0",
        "https://x.app:",
        "http://[::1]x",
    ] {
        let message = parse_with_env(
            &format!(
                "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\npublic_url = \"{bad_port}\"\n"
            ),
            Path::new("a.toml"),
            &stack_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("auth.public_url"), "{bad_port}: {message}");
    }
    for good in [
        "https://x.app:8443",
        "http://[::1]:8080",
        "http://127.0.0.1:8080",
    ] {
        parse_with_env(
            &format!("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\npublic_url = \"{good}\"\n"),
            Path::new("a.toml"),
            &stack_env(),
        )
        .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let public_url = parse_with_env(
        "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\npublic_url = \"https://x.app/path\"\n",
        Path::new("a.toml"),
        &stack_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        public_url.contains("auth.public_url") && public_url.contains("origin"),
        "{public_url}"
    );
    // config/compose.toml's placeholder, left in: refused, not a stack whose logins all fail.
    let placeholder = parse_with_env(
        "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\n\
         public_url = \"https://YOUR-DOMAIN.ngrok-free.app\"\n",
        Path::new("a.toml"),
        &stack_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        placeholder.contains("auth.public_url")
            && placeholder.contains("placeholder")
            && placeholder.contains("NGROK_DOMAIN"),
        "{placeholder}"
    );
}

#[test]
fn routes_without_auth_are_refused() {
    let message = error_of("[upstream]\nbackends = [\"127.0.0.1:1\"]\n[[route]]\nprefix = \"/\"\npolicy = \"public\"\n");
    assert!(message.contains("need an [auth] section"), "{message}");
}

#[test]
fn overlapping_listen_addresses_are_refused() {
    let upstream = "[upstream]\nbackends = [\"127.0.0.1:1\"]\n";
    // (public listen, admin listen): each pair would fight over one port.
    for (public, admin) in [
        ("\"127.0.0.1:8080\"", "0.0.0.0:8080"),
        ("\"0.0.0.0:8080\"", "127.0.0.1:8080"),
        ("\"127.0.0.1:8080\"", "[::]:8080"),
        ("\"[::]:8080\"", "127.0.0.1:8080"),
        ("\"[::1]:8080\"", "[::]:8080"),
        ("\"0.0.0.0:8080\"", "[::]:8080"),
        ("\"127.0.0.1:8080\"", "[::ffff:127.0.0.1]:8080"),
        ("[\"127.0.0.1:8081\", \"10.0.0.1:8080\"]", "0.0.0.0:8080"),
    ] {
        let text =
            format!("[server]\nlisten = {public}\n{upstream}[admin]\nlisten = \"{admin}\"\n");
        let message = error_of(&text);
        assert!(
            message.contains("key `admin.listen`")
                && message.contains("must be separate")
                && message.starts_with("test.toml:6:"),
            "{public} / {admin} → {message}"
        );
    }
    // Within server.listen, only the same address twice: overlapping public addresses bind
    // side by side (SO_REUSEPORT), as `0.0.0.0:P` with `[::]:P` must where `::` is IPv6 only.
    let message = error_of(&format!(
        "[server]\nlisten = [\"127.0.0.1:8080\", \"[::ffff:127.0.0.1]:8080\"]\n{upstream}"
    ));
    assert!(
        message.contains("key `server.listen`") && message.contains("listed twice"),
        "{message}"
    );
    for list in [
        "[\"0.0.0.0:8080\", \"[::]:8080\"]",
        "[\"0.0.0.0:8080\", \"127.0.0.1:8080\"]",
    ] {
        let text = format!("[server]\nlisten = {list}\n{upstream}");
        assert!(
            crate::config::parse(&text, std::path::Path::new("test.toml")).is_ok(),
            "{list}"
        );
    }
    // Different ports, or addresses the kernel keeps apart, are fine.
    for (public, admin) in [
        ("\"0.0.0.0:8080\"", "0.0.0.0:9090"),
        ("\"127.0.0.1:8080\"", "127.0.0.2:8080"),
        ("\"0.0.0.0:8080\"", "[::1]:8080"),
        ("\"[::1]:8080\"", "127.0.0.1:8080"),
    ] {
        let text =
            format!("[server]\nlisten = {public}\n{upstream}[admin]\nlisten = \"{admin}\"\n");
        assert!(parse_str(&text).is_ok(), "{public} / {admin}");
    }
}

#[test]
fn port_0_is_refused_everywhere() {
    let upstream = "[upstream]\nbackends = [\"127.0.0.1:1\"]\n";
    let cases = [
        (
            format!("[server]\nlisten = \"127.0.0.1:0\"\n{upstream}"),
            "server.listen",
        ),
        (
            format!("[server]\nlisten = [\"127.0.0.1:8080\", \"[::1]:0\"]\n{upstream}"),
            "server.listen",
        ),
        (
            format!("{upstream}[admin]\nlisten = \"127.0.0.1:0\"\n"),
            "admin.listen",
        ),
        (
            "[upstream]\nbackends = [\"127.0.0.1:0\"]\n".to_string(),
            "upstream.backends",
        ),
        (
            "[upstream]\nbackends = [{ addr = \"[::1]:0\" }]\n".to_string(),
            "upstream.backends",
        ),
        (
            "[upstream]\nbackends = [\"app:0\"]\n".to_string(),
            "upstream.backends",
        ),
    ];
    for (text, key) in cases {
        let message = error_of(&text);
        assert!(
            message.contains(&format!("key `{key}")) && message.contains(":0`"),
            "{text:?} → {message}"
        );
    }
}

#[test]
fn every_duration_key_has_a_range() {
    let backends = "backends = [\"127.0.0.1:1\"]\n";
    // (table, key, too small, too large, the range named)
    let cases = [
        ("server", "grace_period", None, "2h", "0s and 1h"),
        ("server", "keepalive_timeout", None, "1d", "0s and 1h"),
        (
            "upstream",
            "connect_timeout",
            Some("0s"),
            "11m",
            "1ms and 10m",
        ),
        ("upstream", "read_timeout", Some("0s"), "2d", "1ms and 1d"),
        ("upstream", "send_timeout", Some("0ms"), "25h", "1ms and 1d"),
        (
            "upstream",
            "idle_timeout",
            Some("0s"),
            "1year",
            "1ms and 1d",
        ),
        (
            "upstream",
            "discovery_interval",
            Some("99ms"),
            "2d",
            "100ms and 1d",
        ),
        (
            "upstream.health",
            "interval",
            Some("0s"),
            "2d",
            "1ms and 1d",
        ),
        (
            "limits",
            "client_timeout",
            Some("999ms"),
            "11m",
            "1s and 10m",
        ),
        ("limits", "send_timeout", Some("0s"), "61m", "1s and 1h"),
    ];
    for (table, key, small, large, range) in cases {
        // A duration past what the clock can add (it panicked per connection) is refused too.
        for value in small.into_iter().chain([large, "300000000000years"]) {
            let header = if table == "upstream" {
                String::new()
            } else {
                format!("[{table}]\n")
            };
            let text = format!("[upstream]\n{backends}{header}{key} = \"{value}\"\n");
            let message = error_of(&text);
            let line = text.lines().position(|l| l.starts_with(key)).unwrap() + 1;
            assert!(
                message.starts_with(&format!("test.toml:{line}: key `{table}.{key}`: "))
                    && message.contains("is out of range")
                    && message.ends_with(&format!("must be between {range}")),
                "{value} → {message}"
            );
        }
    }
    // The bounds themselves are in range, and 0 is "stop at once" for the grace period.
    let text = format!(
        "[server]\ngrace_period = \"0s\"\nkeepalive_timeout = \"1h\"\n\
         [upstream]\n{backends}connect_timeout = \"1ms\"\nread_timeout = \"1d\"\n\
         [limits]\nsend_timeout = \"1s\"\n"
    );
    let config = parse_str(&text).unwrap();
    assert_eq!(config.server.grace_period, Duration::ZERO);
    assert_eq!(config.upstream.connect_timeout, Duration::from_millis(1));
    assert_eq!(config.upstream.read_timeout, Duration::from_secs(86_400));
}

#[test]
fn the_summary_says_whether_the_level_lets_the_access_log_through() {
    let with_log = |log: &str| {
        let c = parse_str(&format!(
            "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[log]\n{log}\n"
        ))
        .unwrap();
        summary(&c)
    };
    let on = with_log("level = \"info\"");
    assert!(on.contains("access log on stdout (JSON lines)"), "{on}");
    let named = with_log("level = \"warn,custodia_access=info\"");
    assert!(named.contains("access log on stdout"), "{named}");
    let muted = with_log("level = \"warn\"");
    assert!(
        muted.contains("access log muted by level `warn`") && !muted.contains("on stdout"),
        "{muted}"
    );
    let off = with_log("level = \"info\"\naccess_log = false");
    assert!(off.contains("access log off"), "{off}");
}

#[test]
fn syntax_errors_are_one_line() {
    // The TOML parser writes its expectation on a second line: a log line (a refused reload)
    // would be split in two.
    for (text, expected) in [
        (
            "[upstream",
            "test.toml:1: invalid table header: expected `.`, `]`",
        ),
        (
            "[upstream]\nbackends = [\"a:1\"\n",
            "test.toml:3: invalid array: expected `]`",
        ),
        (
            "[upstream]\nbackends = [\"a:1\"]\n[upstream]\n",
            "test.toml:3: invalid table header: duplicate key `upstream` in document root",
        ),
    ] {
        assert_eq!(error_of(text), expected);
    }
}

#[test]
fn empty_pid_file_and_upgrade_sock_are_refused() {
    for key in ["pid_file", "upgrade_sock"] {
        let message = error_of(&format!(
            "[server]\nthreads = 1\n{key} = \"\"\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n"
        ));
        assert_eq!(
            message,
            format!(
                "test.toml:3: key `server.{key}`: an empty path: name a file, or leave `{key}` \
                 out for the default"
            )
        );
    }
}

#[test]
fn an_upgrade_sock_too_long_for_a_unix_socket_is_refused() {
    let config = |path: &str| {
        format!("[server]\nupgrade_sock = \"{path}\"\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n")
    };
    let longest = format!("/tmp/{}", "s".repeat(validate::MAX_SOCKET_PATH - 5));
    assert_eq!(longest.len(), validate::MAX_SOCKET_PATH);
    // The limit is the kernel's: the longest path accepted binds, one byte more does not.
    assert!(std::os::unix::net::SocketAddr::from_pathname(&longest).is_ok());
    assert!(std::os::unix::net::SocketAddr::from_pathname(format!("{longest}s")).is_err());
    assert!(parse_str(&config(&longest)).is_ok());
    let message = error_of(&config(&format!("{longest}s")));
    assert_eq!(
        message,
        format!(
            "test.toml:2: key `server.upgrade_sock`: `{longest}s` is 108 bytes long, too long \
             for a Unix socket: a socket path can be at most 107 bytes; name a shorter one"
        )
    );
    let message = error_of(&config("/tmp/a\\u0000b.sock"));
    assert!(
        message.contains("key `server.upgrade_sock`: the path holds a NUL byte"),
        "{message}"
    );
}
