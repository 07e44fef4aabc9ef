//! Assembles the Pingora server from a validated config and runs it until a signal stops it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use pingora_proxy::http_proxy;

use crate::admin::AdminApp;
use crate::auth::oidc::DiscoveryService;
use crate::balancer::health::HealthChecker;
use crate::balancer::SlotRegistry;
use crate::config::ProxyConfig;
use crate::discovery::Discovery;
use crate::edge::Edge;
use crate::error::ProxyError;
use crate::limits::ConnectionGate;
use crate::reload::{Reloader, SignalReload};
use crate::runtime::{Runtime, SharedRuntime};

/// How the process was asked to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Take the listening sockets over from a running instance (`--upgrade`).
    pub upgrade: bool,
}

/// Pingora's process settings from ours. Pingora's own YAML format is not exposed.
fn server_conf(config: &ProxyConfig) -> ServerConf {
    let s = &config.server;
    let mut conf = ServerConf {
        threads: s.threads,
        pid_file: s.pid_file.display().to_string(),
        upgrade_sock: s.upgrade_sock.display().to_string(),
        // Pingora sleeps this long after SIGTERM before stopping its runtimes.
        grace_period_seconds: Some(s.grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        // Pingora counts attempts, ours counts retries; the edge enforces `retries` per request,
        // so a reload may raise it up to this limit.
        max_retries: max_attempts(config),
        // One single-threaded runtime per thread, each connection living on one of them (as an
        // nginx worker does): no cross-thread wake-ups per request.
        work_stealing: false,
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(256);
    conf
}

/// Pingora's fixed attempt limit: at least [`MIN_ATTEMPTS`], so reloads can raise `retries`.
fn max_attempts(config: &ProxyConfig) -> usize {
    (config.upstream.retries as usize + 1).max(MIN_ATTEMPTS)
}

/// Client connections read straight into the HTTP parser's own buffer. Pingora's default
/// 64 KiB read buffer per connection costs 640 MB for 10,000 idle keep-alive clients and saves no
/// system call for requests that fit one read.
const DOWNSTREAM_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: None,
};

/// Attempts Pingora allows per request whatever the starting `retries` (8 = 7 retries).
const MIN_ATTEMPTS: usize = 8;

/// Build the services and serve until shut down. Returns when the server has stopped.
pub fn run(config: ProxyConfig, options: StartOptions) -> Result<(), ProxyError> {
    // Until the reload service watches SIGHUP, a SIGHUP must not kill the process (the default).
    ignore_sighup();
    let registry = Arc::new(SlotRegistry::new());
    let runtime = Runtime::build(config.clone(), &registry, 1, None)?;
    let shared: SharedRuntime = Arc::new(ArcSwap::from_pointee(runtime));
    crate::metrics::config().loaded_now();
    let reloader = Arc::new(Reloader::new(
        shared.clone(),
        registry.clone(),
        max_attempts(&config),
    ));

    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config));
    server.bootstrap();

    // The connection cap and client deadlines wrap the HTTP proxy (see `limits::connection`).
    let edge = http_proxy(&server.configuration, Edge::new(shared.clone()));
    let mut proxy = Service::new(
        "custodia-proxy".to_string(),
        ConnectionGate::new(edge, shared.clone()),
    );
    for addr in &config.server.listen {
        proxy.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(DOWNSTREAM_BUFFERS));
    }
    server.add_service(proxy);
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(shared.clone()),
    ));
    server.add_service(background_service(
        "reload on SIGHUP",
        SignalReload::new(reloader.clone()),
    ));
    server.add_service(background_service(
        "DNS discovery",
        Discovery::new(reloader),
    ));
    // Always running: a reload may turn [auth] on (it idles while auth is off).
    server.add_service(background_service(
        "identity provider discovery",
        DiscoveryService::new(shared.clone()),
    ));
    if let Some(admin) = &config.admin {
        let mut service = Service::new("admin".to_string(), AdminApp::new(shared.clone()));
        service.add_tcp(&admin.listen.to_string());
        server.add_service(service);
    }

    write_pid_file(&config)?;
    let listen: Vec<String> = config.server.listen.iter().map(|a| a.to_string()).collect();
    let auth = match &config.auth {
        Some(a) => format!("auth on: OIDC login at the edge, issuer {}", a.issuer),
        None => "auth off: plain load balancer (no [auth] section)".to_string(),
    };
    tracing::info!(
        listen = %listen.join(", "),
        backends = config.upstream.backends.len(),
        balance = config.upstream.balance.as_str(),
        threads = config.server.threads,
        "custodia-proxy starting; {auth}"
    );
    server.run(RunArgs::default());
    remove_pid_file(&config);
    Ok(())
}

/// Remove the pid file unless another process (the one an upgrade handed over to) wrote its
/// own pid there since.
fn remove_pid_file(config: &ProxyConfig) {
    let path = &config.server.pid_file;
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

fn ignore_sighup() {
    // SAFETY: setting the disposition of SIGHUP to SIG_IGN has no memory effects; tokio's
    // handler replaces it when the reload service starts.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

fn write_pid_file(config: &ProxyConfig) -> Result<(), ProxyError> {
    let path = &config.server.pid_file;
    std::fs::write(path, format!("{}\n", std::process::id())).map_err(|source| {
        ProxyError::PidFile {
            path: path.clone(),
            source,
        }
    })
}
