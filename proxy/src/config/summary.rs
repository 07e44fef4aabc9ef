//! The one-screen summary printed by `--check` (in the spirit of `nginx -t`).

use std::fmt::Write;

use super::model::ProxyConfig;

pub fn summary(config: &ProxyConfig) -> String {
    let mut out = String::new();
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let s = &config.server;
    let u = &config.upstream;
    let listen: Vec<String> = s.listen.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(
        out,
        "configuration file {} is valid",
        config.source.display()
    );
    let _ = writeln!(
        out,
        "  listen          {} ({} threads)",
        listen.join(", "),
        s.threads
    );
    let _ = writeln!(
        out,
        "  upstream        {} over {} backend(s), up to {} retries on another backend",
        u.balance.as_str(),
        u.backends.len(),
        u.retries
    );
    for b in &u.backends {
        let _ = writeln!(out, "    {:<28} weight {}", b.to_string(), b.weight);
    }
    let _ = writeln!(
        out,
        "  timeouts        connect {}, read {}, send {}, upstream idle {}, client keep-alive {}",
        d(u.connect_timeout),
        d(u.read_timeout),
        d(u.send_timeout),
        d(u.idle_timeout),
        d(s.keepalive_timeout)
    );
    let h = &u.health;
    let _ = writeln!(
        out,
        "  health checks   GET {} every {} (timeout {}; healthy after {}, unhealthy after {})",
        h.path,
        d(h.interval),
        d(h.timeout),
        h.healthy_after,
        h.unhealthy_after
    );
    if u.backends
        .iter()
        .any(|b| b.host.parse::<std::net::IpAddr>().is_err())
    {
        let _ = writeln!(
            out,
            "  discovery       DNS names re-resolved every {}",
            d(u.discovery_interval)
        );
    }
    let access = if !config.log.access_log {
        "off".to_string()
    } else if crate::logging::access_log_passes(&config.log.level) {
        "on stdout (JSON lines)".to_string()
    } else {
        // `access_log = true`, but the lines are `info` events of target custodia_access.
        format!(
            "muted by level `{}` (it needs info, or custodia_access=info)",
            config.log.level
        )
    };
    let _ = writeln!(
        out,
        "  logs            {} {} on stderr; access log {access}",
        config.log.format.as_str(),
        config.log.level,
    );
    let _ = writeln!(
        out,
        "  shutdown        grace period {}; pid file {}",
        d(s.grace_period),
        s.pid_file.display()
    );
    let l = &config.limits;
    let _ = writeln!(
        out,
        "  limits          {} connections, bodies up to {}, {} logins/min per client, client timeout {}, send timeout {}",
        l.max_connections,
        size(l.max_body_size),
        l.login_rate_per_minute,
        d(l.client_timeout),
        d(l.send_timeout)
    );
    for (prefix, bytes) in &l.route_body_sizes {
        let _ = writeln!(out, "    body limit    {prefix:<20} {}", size(*bytes));
    }
    match &config.admin {
        Some(admin) => {
            let _ = writeln!(
                out,
                "  admin           http://{} (/metrics /healthz /readyz)",
                admin.listen
            );
        }
        None => {
            let _ = writeln!(out, "  admin           off (no [admin] section)");
        }
    }
    match &config.auth {
        None => {
            let _ = writeln!(
                out,
                "  auth            off: plain load balancer (no [auth] section)"
            );
        }
        Some(a) => auth_summary(&mut out, a),
    }
    for warning in super::risky_settings(config) {
        let _ = writeln!(out, "  warning         {warning}");
    }
    out
}

/// Bytes the way operators write them (`1m`, `512k`, `1000`).
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}g", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}m", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}k", b >> 10),
        b => format!("{b} bytes"),
    }
}

fn auth_summary(out: &mut String, a: &super::model::AuthSettings) {
    use super::model::ClientAuth;
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(
        out,
        "  auth            on: OIDC login at the edge, issuer {}",
        a.issuer
    );
    let method = match a.client_auth {
        Some(ClientAuth::Basic) => "client_secret_basic",
        Some(ClientAuth::Post) => "client_secret_post",
        None => "client auth as discovery advertises",
    };
    let _ = writeln!(
        out,
        "    client        {} ({method}), redirect_uri {}",
        a.client_id,
        a.redirect_uri()
    );
    let _ = writeln!(
        out,
        "    sessions      sealed cookie for {} ({} previous key(s) accepted), {}",
        d(a.session_ttl),
        a.previous_session_secrets.len(),
        if a.secure_cookies {
            "Secure, __Host- prefix"
        } else {
            "not Secure (public_url is http)"
        }
    );
    let who = match (a.allowed_emails.len(), a.allowed_domains.len()) {
        (0, 0) => "anyone the identity provider accepts".to_string(),
        (e, d) => format!("{e} allowed email(s), {d} allowed domain(s)"),
    };
    let _ = writeln!(out, "    who           {who}");
    for (prefix, policy) in &a.routes {
        let _ = writeln!(out, "    route         {prefix:<20} {}", policy.as_str());
    }
    let _ = writeln!(out, "    other paths   {}", a.default_policy.as_str());
}
