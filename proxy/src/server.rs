//! Assembles the Pingora server from a validated config and runs it until a signal stops it.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};

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
use crate::limits::{AdminGate, ConnectionGate, LoginRate, ShutdownSignal};
use crate::process_exit::ProcessExit;
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
        // Single-threaded runtimes: each proxy worker is a service of one thread (see `run`).
        work_stealing: false,
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(256);
    conf
}

/// Pingora's fixed attempt limit: at least [`MIN_ATTEMPTS`], so reloads can raise `retries`.
fn max_attempts(config: &ProxyConfig) -> usize {
    attempts_for(config.upstream.retries).max(MIN_ATTEMPTS)
}

/// Pingora's attempts a request may need with `retries`: the first, the retries, and the one
/// extra try for a pooled connection found closed (`edge`), which no retry pays for.
pub(crate) fn attempts_for(retries: u32) -> usize {
    retries as usize + 2
}

/// Client connections read straight into the HTTP parser's own buffer. Pingora's default
/// 64 KiB read buffer per connection costs 640 MB for 10,000 idle keep-alive clients and saves no
/// system call for requests that fit one read.
const DOWNSTREAM_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: None,
};

/// Worker `worker`'s own listening socket on `addr`.
///
/// Why a worker per thread: Pingora keeps one upstream keep-alive pool per service, and with
/// several threads in a service it parks each idle upstream connection on a randomly chosen
/// thread. A request on the other thread then hands the connection across threads (two
/// cross-thread wake-ups per request, and a race that drops the connection and logs "failed to
/// acquire reusable stream"). A service of one thread keeps a connection, its watcher and its
/// requests on one event loop, as an nginx worker keeps its own `keepalive` connections.
///
/// Every worker binds its own `SO_REUSEPORT` socket and the kernel spreads new connections
/// over them. Pingora hands listening sockets to a new process on `--upgrade` keyed by their
/// address string, so each worker's string must differ: worker N writes the port with N
/// leading zeros (`127.0.0.1:8080`, `127.0.0.1:08080`, …), which parses to the same address.
/// Worker 0 keeps the plain form, so an upgrade from a single-socket version keeps its socket.
fn worker_listener(addr: SocketAddr, worker: usize) -> ListenerConfig {
    let mut options = TcpSocketOptions::default();
    options.so_reuseport = Some(true);
    ListenerConfig::tcp(worker_listen_key(addr, worker))
        .tcp_socket_options(options)
        .l4_buffer(DOWNSTREAM_BUFFERS)
}

/// `addr` with the port written with `worker` leading zeros.
fn worker_listen_key(addr: SocketAddr, worker: usize) -> String {
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    format!("{host}:{}{}", "0".repeat(worker), addr.port())
}

/// Attempts Pingora allows per request whatever the starting `retries` (9 = 7 retries).
const MIN_ATTEMPTS: usize = 9;

/// Build the services and serve until shut down. Returns when the server has stopped.
pub fn run(config: ProxyConfig, options: StartOptions) -> Result<(), ProxyError> {
    // Until the reload service watches SIGHUP, a SIGHUP must not kill the process (the
    // default), nor be lost: it is remembered and that service reloads for it.
    if let Err(e) = crate::reload::remember_early_hangups() {
        tracing::warn!(error = %e, "cannot watch SIGHUP during start: one sent before the reload service starts is ignored");
        ignore_sighup();
    }
    let registry = Arc::new(SlotRegistry::new());
    let runtime = Runtime::build(config.clone(), &registry, 1, None)?;
    let shared: SharedRuntime = Arc::new(ArcSwap::from_pointee(runtime));
    crate::metrics::config().loaded_now();
    let reloader = Arc::new(Reloader::new(
        shared.clone(),
        registry.clone(),
        max_attempts(&config),
    ));

    let upgrade_sock = &config.server.upgrade_sock;
    crate::upgrade::check_upgrade_sock(upgrade_sock).map_err(|problem| {
        ProxyError::UpgradeSock {
            path: upgrade_sock.clone(),
            problem,
        }
    })?;
    if options.upgrade {
        // Without an old process, Pingora waits for listening sockets that never come.
        let old =
            crate::running::running_pid(&config.server.pid_file).map_err(ProxyError::Upgrade)?;
        crate::upgrade::ask_for_the_listeners(old, config.server.upgrade_sock.clone());
    } else {
        check_addresses_are_free(&config)?;
        // An upgrade takes the old process's pid file over by design; a normal start may
        // only replace a stale one.
        check_pid_file(&config.server.pid_file)?;
    }
    crate::open_files::ensure(&config);
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config));
    server.bootstrap();

    // One proxy service per thread, each with its own listening sockets and upstream pool.
    // The connection cap, client deadlines (see `limits::connection`) and login rate are
    // shared by all of them.
    let open_connections = Arc::new(AtomicUsize::new(0));
    let login_rate = Arc::new(LoginRate::new());
    let mut thread_signals = Vec::new();
    for worker in 0..config.server.threads.max(1) {
        let shutdown = ShutdownSignal::new();
        thread_signals.push(shutdown.clone());
        let edge = Edge::new(shared.clone(), login_rate.clone(), shutdown.clone());
        let gate = ConnectionGate::new(
            http_proxy(&server.configuration, edge),
            shared.clone(),
            open_connections.clone(),
            shutdown,
        );
        let mut proxy = Service::new(format!("custodia-proxy-{worker}"), gate);
        proxy.threads = Some(1);
        for addr in &config.server.listen {
            proxy.add_listener(worker_listener(*addr, worker));
        }
        server.add_service(proxy);
    }
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
    server.add_service(background_service(
        "process exit",
        ProcessExit::new(
            open_connections.clone(),
            config.server.pid_file.clone(),
            server.watch_execution_phase(),
        ),
    ));
    if let Some(admin) = &config.admin {
        let app = AdminGate::new(AdminApp::new(shared.clone()));
        let mut service = Service::new("admin".to_string(), app);
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
    for warning in crate::config::risky_settings(&config) {
        tracing::warn!("{warning}");
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(crate::upgrade::Signals::new(
            config.server.upgrade_sock.clone(),
            thread_signals,
        )),
    });
    remove_pid_file(&config.server.pid_file);
    Ok(())
}

/// Fail at once when a listening address is taken. Pingora binds in its service threads,
/// retries for half a minute, then panics in that thread only: the process would stay up,
/// write its pid file and report ready while serving nothing. And the public sockets are
/// `SO_REUSEPORT` (one per thread), so a second instance would bind next to the first and
/// take a share of its clients. A plain bind (no `SO_REUSEPORT`) is refused by any listener
/// on the address, ours included; `--upgrade` skips this, as it takes the sockets over.
/// Every socket stays bound until all are: the admin address overlapping a public one
/// (`0.0.0.0:P` and `127.0.0.1:P`) is refused here too, not only by another process. Public
/// addresses that overlap each other bind side by side in Pingora (`SO_REUSEPORT`): the later
/// one is not held against the earlier.
fn check_addresses_are_free(config: &ProxyConfig) -> Result<(), ProxyError> {
    let public = config.server.listen.iter().map(|a| (*a, "server.listen"));
    let admin = config.admin.iter().map(|a| (a.listen, "admin.listen"));
    let mut held: Vec<(SocketAddr, std::net::TcpListener)> = Vec::new();
    for (addr, key) in public.chain(admin) {
        let sibling = key == "server.listen"
            && held
                .iter()
                .any(|(ours, _)| crate::config::validate::listen_conflict(*ours, addr).is_some());
        if sibling {
            continue;
        }
        let socket = std::net::TcpListener::bind(addr).map_err(|source| ProxyError::Listen {
            addr,
            key,
            source,
        })?;
        held.push((addr, socket));
    }
    Ok(())
}

/// Whether the pid file at `path` is this process's to write at a normal start: it is when
/// absent, empty, or stale (its process gone, or no serving proxy: the number was reused).
/// Refused: a file that is no pid file (`pid_file` naming the config file, say: writing would
/// destroy it), and one naming a proxy that serves now (taking it would hide that proxy from
/// `--reload` and `--upgrade`, and this process's exit would delete the file).
fn check_pid_file(path: &std::path::Path) -> Result<(), ProxyError> {
    let refuse = |problem: String| ProxyError::PidFileTaken {
        path: path.to_path_buf(),
        problem,
    };
    let not_a_pid_file = |what: &str| {
        refuse(format!(
            "it exists and {what}, so it is no pid file and is not overwritten: name a pid \
             file of its own"
        ))
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(refuse(format!("cannot look at it ({e})"))),
    };
    // Not read otherwise: a FIFO would block the start, a device never end.
    if !meta.is_file() {
        return Err(not_a_pid_file("is not a regular file"));
    }
    let mut head = Vec::new();
    let read = std::fs::File::open(path)
        .and_then(|file| std::io::Read::read_to_end(&mut std::io::Read::take(file, 32), &mut head));
    if let Err(e) = read {
        return Err(refuse(format!("cannot read it ({e})")));
    }
    let Some(pid) = pid_in(&head) else {
        return Err(not_a_pid_file("holds something other than a pid"));
    };
    let Some(pid) = pid else {
        return Ok(());
    };
    // Our own pid, or a parent's (a wrapper started with our arguments), is left from an
    // earlier run whose pid was reused, as happens in containers.
    let ours = pid == std::process::id() as i32 || crate::running::is_an_ancestor(pid);
    if !ours && crate::running::serves(pid) {
        return Err(refuse(format!(
            "process {pid} already serves with this pid file; use --upgrade to take over, or \
             give this one its own server.pid_file"
        )));
    }
    Ok(())
}

/// The pid a pid file's first bytes hold: `Some(None)` when empty, `None` when they are not
/// a positive number with at most a line end after it.
fn pid_in(head: &[u8]) -> Option<Option<i32>> {
    if head.is_empty() {
        return Some(None);
    }
    let digits = head.strip_suffix(b"\n").unwrap_or(head);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let pid = std::str::from_utf8(digits).ok()?.parse::<i32>().ok()?;
    (pid > 0).then_some(Some(pid))
}

/// Remove the pid file unless another process (the one an upgrade handed over to) wrote its
/// own pid there since.
pub(crate) fn remove_pid_file(path: &std::path::Path) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::ToSocketAddrs;

    #[test]
    fn addresses_are_checked_together_not_one_at_a_time() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n"
        );
        let mut config = crate::config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        assert!(check_addresses_are_free(&config).is_ok());
        // Validation refuses this; were it to let one through, the check must not.
        config.admin = Some(crate::config::AdminSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
        });
        let message = check_addresses_are_free(&config).unwrap_err().to_string();
        assert!(
            message.contains(&format!("cannot listen on 127.0.0.1:{port} (admin.listen)")),
            "{message}"
        );
        // Public addresses that overlap bind side by side in Pingora: not refused here.
        config.admin = None;
        config.server.listen = vec![
            SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ];
        assert!(check_addresses_are_free(&config).is_ok());
    }

    #[test]
    fn a_pid_file_is_replaced_only_when_stale() {
        let dir = std::env::temp_dir().join(format!("custodia-pid-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("proxy.pid");
        let verdict = |text: &str| {
            std::fs::write(&file, text).unwrap();
            check_pid_file(&file).map_err(|e| e.to_string())
        };
        assert!(check_pid_file(&dir.join("absent.pid")).is_ok());
        // Stale: empty, a process that is gone (no pid is this high), this process's own
        // (left by an earlier run), a live process that is no proxy.
        assert!(verdict("").is_ok());
        assert!(verdict("2147483646\n").is_ok());
        assert!(verdict(&format!("{}\n", std::process::id())).is_ok());
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(verdict(&sleeper.id().to_string()).is_ok());
        let _ = sleeper.kill();
        let _ = sleeper.wait();

        // A serving proxy's: its command line is a proxy's (see `running`'s tests).
        let mut proxy = std::process::Command::new("bash")
            .args(["-c", "read -r _", "proxy", "--config", "x.toml"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = proxy.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut serving = verdict(&format!("{pid}\n"));
        while serving.is_ok() && std::time::Instant::now() < deadline {
            // Until its exec, the child bears this test's command line.
            std::thread::sleep(std::time::Duration::from_millis(10));
            serving = verdict(&format!("{pid}\n"));
        }
        let _ = proxy.kill();
        let _ = proxy.wait();
        assert_eq!(
            serving.unwrap_err(),
            format!(
                "cannot use server.pid_file {}: process {pid} already serves with this pid \
                 file; use --upgrade to take over, or give this one its own server.pid_file",
                file.display()
            )
        );

        // No pid file: refused, and left as it was.
        for text in [
            "[server]\npid_file = \"x\"\n",
            "12 34\n",
            "-5",
            "0\n",
            "12\n\n",
            "99999999999999",
        ] {
            let message = verdict(text).unwrap_err();
            assert!(
                message.contains("holds something other than a pid, so it is no pid file"),
                "{text:?}: {message}"
            );
            assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        }
        let message = check_pid_file(&dir).unwrap_err().to_string();
        assert!(message.contains("is not a regular file"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_worker_gets_a_distinct_key_for_the_same_address() {
        for addr in ["127.0.0.1:8080", "[::1]:443", "0.0.0.0:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let keys: Vec<String> = (0..4).map(|w| worker_listen_key(addr, w)).collect();
            assert_eq!(keys[0], addr.to_string(), "worker 0 keeps the plain form");
            for key in &keys {
                // Pingora binds the key as a string (`to_socket_addrs`): the same address.
                let parsed: Vec<SocketAddr> = key.to_socket_addrs().unwrap().collect();
                assert_eq!(parsed, vec![addr], "{key}");
            }
            let mut unique = keys.clone();
            unique.dedup();
            assert_eq!(unique.len(), keys.len(), "{keys:?}");
        }
    }
}
