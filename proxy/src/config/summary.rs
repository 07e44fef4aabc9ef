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
    let _ = writeln!(
        out,
        "  shutdown        grace period {}; pid file {}",
        d(s.grace_period),
        s.pid_file.display()
    );
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
    let _ = writeln!(
        out,
        "  auth            off: plain load balancer (no [auth] section)"
    );
    out
}
