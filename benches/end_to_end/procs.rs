//! The processes under test: app workers, Custodia proxies and nginx, each with a config written
//! here and a kill-on-drop guard (tests/support/process.rs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use custodia_proxy::config::Balance;

use crate::process::{free_addr, wait_for_port, ChildGuard, TempDir};

const STARTUP: Duration = Duration::from_secs(30);

/// The session secret shared by the proxy (sealing) and the workers (assertion key derivation).
pub const APP_SECRET_KEY: &str = "bench-only-0123456789abcdef0123456789abcdef0123456789abcdef";

fn custodia_bin() -> &'static str {
    env!("CARGO_BIN_EXE_custodia")
}

/// A child with quiet output and the bench's environment.
fn quiet(mut command: Command) -> Command {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "error")
        .env("APP_SECRET_KEY", APP_SECRET_KEY)
        .env_remove("CUSTODIA_ASSERTION_KEY");
    command
}

/// One `custodia app` worker.
pub struct Worker {
    pub addr: SocketAddr,
    pub id: String,
    process: ChildGuard,
}

impl Worker {
    pub fn start(id: &str, delay_ms: u64) -> Worker {
        let addr = free_addr();
        let mut command = Command::new(custodia_bin());
        command.args(["app", "--listen", &addr.to_string(), "--worker-id", id]);
        if delay_ms > 0 {
            command.args(["--delay", &delay_ms.to_string()]);
        }
        let mut process = ChildGuard::spawn(&format!("worker {id}"), &mut quiet(command));
        wait_for_port(addr, STARTUP, &mut process);
        Worker {
            addr,
            id: id.to_string(),
            process,
        }
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }
}

/// A running proxy (Custodia or nginx): its listener and the pid whose process group
/// (itself + direct children) is measured.
pub struct Proxy {
    pub addr: SocketAddr,
    process: ChildGuard,
    _dir: TempDir,
}

impl Proxy {
    /// Spawn `command` (a proxy serving on `listen`, its files in `dir`) and wait for its port.
    fn launch(name: &str, listen: SocketAddr, command: &mut Command, dir: TempDir) -> Proxy {
        let mut process = ChildGuard::spawn(name, command);
        wait_for_port(listen, STARTUP, &mut process);
        Proxy {
            addr: listen,
            process,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }
}

impl Drop for Proxy {
    /// nginx workers outlive a SIGKILLed master: kill the proxy's own children first (the guard
    /// then kills and reaps the main process).
    fn drop(&mut self) {
        for pid in crate::measure::process_group(self.pid())
            .into_iter()
            .skip(1)
        {
            // SAFETY: kill(2) on a child of a process this bench started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The keep-alive idle timeout of every proxy: long enough to hold the memory test's idle
/// connections for its whole duration.
const CLIENT_KEEPALIVE: &str = "300s";

/// Client connections each proxy may hold: nginx's 2 workers × `worker_connections` 20000, and
/// Custodia's `[limits] max_connections` (default 4096) raised to match for the memory test.
const MAX_CONNECTIONS: usize = 40_000;

/// Custodia with 2 threads, access log off, the given workers; with `auth`, `/api/` requires a
/// session (the issuer is an unreachable loopback URL: sealed sessions need no IdP).
pub fn start_custodia(name: &str, workers: &[&Worker], balance: Balance, auth: bool) -> Proxy {
    start_custodia_with(name, workers, balance, auth, true)
}

/// [`start_custodia`] with the fast path on or off (`[server] fast_path`).
pub fn start_custodia_with(
    name: &str,
    workers: &[&Worker],
    balance: Balance,
    auth: bool,
    fast_path: bool,
) -> Proxy {
    let dir = TempDir::new("bench-custodia");
    let listen = free_addr();
    let admin = free_addr();
    let backends: Vec<String> = workers.iter().map(|w| format!("\"{}\"", w.addr)).collect();
    let balance = balance.as_str();
    let mut toml = format!(
        "[server]\nlisten = \"{listen}\"\nthreads = 2\ngrace_period = \"1s\"\nfast_path = {fast_path}\n\
         keepalive_timeout = \"{CLIENT_KEEPALIVE}\"\npid_file = \"{pid}\"\nupgrade_sock = \"{sock}\"\n\n\
         [upstream]\nbalance = \"{balance}\"\nbackends = [{backends}]\n\n\
         [log]\nlevel = \"error\"\naccess_log = false\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [limits]\nmax_connections = {MAX_CONNECTIONS}\n",
        pid = dir.path().join("proxy.pid").display(),
        sock = dir.path().join("upgrade.sock").display(),
        backends = backends.join(", "),
    );
    if auth {
        toml.push_str(&format!(
            "\n[auth]\nissuer = \"http://127.0.0.1:9/\"\nclient_id = \"bench\"\n\
             public_url = \"http://{listen}\"\n\n[[route]]\nprefix = \"/api/\"\npolicy = \"required\"\n"
        ));
    }
    let config = dir.path().join("custodia.toml");
    write(&config, &toml);
    let mut command = Command::new(custodia_bin());
    command.args(["proxy", "--config", &path_str(&config)]);
    let mut command = quiet(command);
    command.env("AUTH0_CLIENT_SECRET", "bench-client-secret");
    Proxy::launch(name, listen, &mut command, dir)
}

/// Bare Pingora (`pingora_baseline.rs`): this bench binary re-executed in that role.
pub fn start_pingora_baseline(workers: &[&Worker]) -> Proxy {
    let dir = TempDir::new("bench-pingora");
    let listen = free_addr();
    let exe = std::env::current_exe().expect("the bench binary's path");
    let mut command = Command::new(exe);
    command
        .arg(crate::pingora_baseline::ROLE_ARG)
        .arg(listen.to_string())
        .args(workers.iter().map(|w| w.addr.to_string()));
    Proxy::launch("bare pingora", listen, &mut quiet(command), dir)
}

/// The nginx binary, if installed.
pub fn nginx_bin() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// nginx with 2 worker processes, `least_conn` over the same workers with upstream keep-alive,
/// access log off: the seed's deployment, tuned only as far as any nginx deployment would be.
pub fn start_nginx(name: &str, bin: &str, workers: &[&Worker]) -> Proxy {
    let dir = TempDir::new("bench-nginx");
    let listen = free_addr();
    let servers: String = workers
        .iter()
        .map(|w| format!("        server {};\n", w.addr))
        .collect();
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 2;\nmaster_process on;\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log error;\nworker_rlimit_nofile 20000;\n\
         events {{\n    worker_connections 20000;\n}}\n\
         http {{\n    access_log off;\n    keepalive_timeout {CLIENT_KEEPALIVE};\n    keepalive_requests 1000000;\n\
         \x20   client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         \x20   upstream app {{\n        least_conn;\n{servers}        keepalive 64;\n        keepalive_requests 1000000;\n    }}\n\
         \x20   server {{\n        listen {listen};\n        location / {{\n            proxy_pass http://app;\n\
         \x20           proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n\
         \x20           proxy_set_header Host $host;\n            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         \x20           proxy_set_header X-Forwarded-Proto $scheme;\n        }}\n    }}\n}}\n"
    );
    let config = dir.path().join("nginx.conf");
    write(&config, &conf);
    let mut command = Command::new(bin);
    command
        .args(["-p", &path_str(dir.path()), "-c", &path_str(&config)])
        .args(["-e", &format!("{d}/error.log")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proxy::launch(name, listen, &mut command, dir)
}

fn write(path: &PathBuf, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn path_str(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 temp path {}", path.display()))
        .to_string()
}
