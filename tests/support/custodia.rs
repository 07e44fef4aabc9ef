//! Custodia processes for tests: app workers, proxies with generated configs, metrics scraping.
//! Everything runs from the root `custodia` binary (`custodia app …`, `custodia proxy …`), which
//! is the same code as the `custodia-app` / `custodia-proxy` binaries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::process::{free_addr, wait_for_port, CapturedOutput, ChildGuard, TempDir};

pub const STARTUP: Duration = Duration::from_secs(30);

/// `[server] threads` of every proxy the tests start: two workers, each with its own upstream
/// keep-alive pool.
pub const PROXY_THREADS: usize = 2;

pub fn custodia_bin() -> &'static str {
    env!("CARGO_BIN_EXE_custodia")
}

/// One app worker process.
pub struct Worker {
    pub addr: SocketAddr,
    pub id: String,
    pub process: ChildGuard,
    delay_ms: u64,
    env: Vec<(String, String)>,
    /// Where its stdout and stderr went, when started with [`Worker::start_capturing`].
    pub output: Option<CapturedOutput>,
}

impl Worker {
    pub fn start(id: &str) -> Worker {
        Worker::start_on(free_addr(), id, 0)
    }

    /// A worker that waits `delay_ms` before every answer.
    pub fn start_slow(id: &str, delay_ms: u64) -> Worker {
        Worker::start_on(free_addr(), id, delay_ms)
    }

    pub fn start_on(addr: SocketAddr, id: &str, delay_ms: u64) -> Worker {
        Worker::launch(addr, id, delay_ms, &[], false)
    }

    /// A worker with extra environment, e.g. `CUSTODIA_ASSERTION_KEY` so it verifies the
    /// proxy's identity assertions.
    pub fn start_with_env(id: &str, env: &[(&str, &str)]) -> Worker {
        Worker::launch(free_addr(), id, 0, env, false)
    }

    /// Kills the worker at once (SIGKILL, as a crash or the OOM killer would) and reaps it.
    pub fn kill(&mut self) {
        self.process.signal(libc::SIGKILL);
        if self.process.wait_exit(STARTUP).is_none() {
            panic!("worker {} did not exit after SIGKILL", self.id);
        }
    }

    /// Starts the worker again on the same address with the same id, delay and environment
    /// (after [`Worker::kill`], or killing it first).
    pub fn restart(&mut self) {
        if self.process.is_running() {
            self.kill();
        }
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let capture = self.output.is_some();
        *self = Worker::launch(self.addr, &self.id, self.delay_ms, &env, capture);
    }

    /// [`Worker::start_with_env`] with its output kept for [`Worker::output`].
    pub fn start_capturing(id: &str, env: &[(&str, &str)]) -> Worker {
        Worker::launch(free_addr(), id, 0, env, true)
    }

    /// What a worker started with [`Worker::start_capturing`] printed so far.
    pub fn output(&self) -> String {
        self.output
            .as_ref()
            .expect("the worker was started with start_capturing")
            .read()
    }

    fn launch(
        addr: SocketAddr,
        id: &str,
        delay_ms: u64,
        env: &[(&str, &str)],
        capture: bool,
    ) -> Worker {
        let mut command = Command::new(custodia_bin());
        command.args(["app", "--listen", &addr.to_string(), "--worker-id", id]);
        if delay_ms > 0 {
            command.args(["--delay", &delay_ms.to_string()]);
        }
        command.env("RUST_LOG", "warn");
        clear_secret_env(&mut command);
        for (k, v) in env {
            command.env(k, v);
        }
        let name = format!("worker {id}");
        let output = capture.then(|| CapturedOutput::new("worker"));
        let mut process = match &output {
            Some(output) => ChildGuard::spawn_captured(&name, &mut command, output),
            None => ChildGuard::spawn(&name, &mut command),
        };
        wait_for_port(addr, STARTUP, &mut process);
        Worker {
            addr,
            id: id.to_string(),
            process,
            delay_ms,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            output,
        }
    }
}

/// One proxy process with a generated config file.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub process: ChildGuard,
    /// The generated `[server]` and `[admin]` sections, kept by [`Proxy::rewrite`].
    server_sections: String,
    /// Where its stdout and stderr went, when started with [`Proxy::start_at_capturing`].
    pub output: Option<CapturedOutput>,
    _dir: TempDir,
}

impl Proxy {
    /// `sections` is TOML for everything but `[server]` and `[admin]` (at least `[upstream]`),
    /// which are filled in with free loopback ports.
    pub fn start(sections: &str) -> Proxy {
        Proxy::start_with_env(sections, &[])
    }

    pub fn start_with_env(sections: &str, env: &[(&str, &str)]) -> Proxy {
        Proxy::start_at(free_addr(), sections, env)
    }

    /// A proxy listening on `addr`, chosen by the caller (who may need it first, e.g. for
    /// `[auth] public_url`, or to restart a proxy on the same port). Runs in its own scratch
    /// directory (so no `.env` of the checkout is read) with the secret variables of
    /// [`SECRET_ENV`] removed from the inherited environment; `env` sets what the test wants.
    pub fn start_at(addr: SocketAddr, sections: &str, env: &[(&str, &str)]) -> Proxy {
        Proxy::launch(addr, sections, env, false)
    }

    /// [`Proxy::start_at`] with its output (access log, diagnostics) kept for
    /// [`Proxy::output`].
    pub fn start_at_capturing(addr: SocketAddr, sections: &str, env: &[(&str, &str)]) -> Proxy {
        Proxy::launch(addr, sections, env, true)
    }

    /// What a proxy started with [`Proxy::start_at_capturing`] printed so far.
    pub fn output(&self) -> String {
        self.output
            .as_ref()
            .expect("the proxy was started with start_at_capturing")
            .read()
    }

    /// Like [`Proxy::start`], with `server` lines added to the generated `[server]` section.
    pub fn start_with_server(server: &str, sections: &str) -> Proxy {
        Proxy::start_with_server_env(server, sections, &[])
    }

    /// [`Proxy::start_with_server`] with environment variables.
    pub fn start_with_server_env(server: &str, sections: &str, env: &[(&str, &str)]) -> Proxy {
        Proxy::launch_with(free_addr(), server, sections, env, false)
    }

    /// [`Proxy::start_with_server`] with its output kept for [`Proxy::output`].
    pub fn start_with_server_capturing(server: &str, sections: &str) -> Proxy {
        Proxy::launch_with(free_addr(), server, sections, &[], true)
    }

    fn launch(addr: SocketAddr, sections: &str, env: &[(&str, &str)], capture: bool) -> Proxy {
        Proxy::launch_with(addr, "", sections, env, capture)
    }

    fn launch_with(
        addr: SocketAddr,
        server: &str,
        sections: &str,
        env: &[(&str, &str)],
        capture: bool,
    ) -> Proxy {
        let dir = TempDir::new("proxy");
        let admin = free_addr();
        let server_sections = format!(
            "[server]\nlisten = \"{addr}\"\nthreads = {PROXY_THREADS}\ngrace_period = \"1s\"\n{server}\
             pid_file = \"{pid}\"\nupgrade_sock = \"{sock}\"\n\n[admin]\nlisten = \"{admin}\"\n",
            pid = dir.path().join("proxy.pid").display(),
            sock = dir.path().join("upgrade.sock").display(),
        );
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, format!("{server_sections}\n{sections}\n"))
            .expect("write proxy config");
        let mut command = Command::new(custodia_bin());
        command.arg("proxy").arg("--config").arg(&config_path);
        command.env("RUST_LOG", "warn").current_dir(dir.path());
        clear_secret_env(&mut command);
        for (k, v) in env {
            command.env(k, v);
        }
        let output = capture.then(|| CapturedOutput::new("proxy"));
        let mut process = match &output {
            Some(output) => ChildGuard::spawn_captured("custodia-proxy", &mut command, output),
            None => ChildGuard::spawn("custodia-proxy", &mut command),
        };
        wait_for_port(addr, STARTUP, &mut process);
        wait_for_port(admin, STARTUP, &mut process);
        Proxy {
            addr,
            admin,
            config_path,
            process,
            server_sections,
            output,
            _dir: dir,
        }
    }

    /// Rewrites the config file with new `sections` and the same `[server]` and `[admin]`; the
    /// running proxy reads it on its next reload ([`Proxy::sighup`], [`Proxy::reload_command`]).
    pub fn rewrite(&self, sections: &str) {
        std::fs::write(
            &self.config_path,
            format!("{}\n{sections}\n", self.server_sections),
        )
        .expect("rewrite proxy config");
    }

    /// Asks the running proxy to reload its config file.
    pub fn sighup(&self) {
        self.process.signal(libc::SIGHUP);
    }

    /// `custodia proxy --config FILE --reload` run to completion, with `env` (the secrets the
    /// file's validation needs) instead of the inherited secret variables.
    pub fn reload_command(&self, env: &[(&str, &str)]) -> std::process::Output {
        let mut command = Command::new(custodia_bin());
        command
            .arg("proxy")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--reload")
            .current_dir(self._dir.path())
            .stdin(std::process::Stdio::null());
        clear_secret_env(&mut command);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().expect("run custodia proxy --reload")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Wait (10 s at most) until the proxy holds no client connection: the probes that found
    /// its port open are closed on its side too, so they no longer count against
    /// `max_connections` (`custodia_connections_open`).
    pub fn wait_until_no_client_connections(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut last = None;
        while std::time::Instant::now() < deadline {
            last = self.sample_blocking("custodia_connections_open");
            if last == Some(0.0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("custodia_connections_open still {last:?} after 10 s");
    }

    /// The first sample of `name`, scraped without an async runtime.
    pub fn sample_blocking(&self, name: &str) -> Option<f64> {
        let body = self.scrape_blocking()?;
        parse_samples(&body, name).first().map(|(_, v)| *v)
    }

    /// `/metrics` read without an async runtime, or `None` if the admin listener failed.
    pub fn scrape_blocking(&self) -> Option<String> {
        use std::io::{Read, Write};
        let mut admin = std::net::TcpStream::connect(self.admin).ok()?;
        admin.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        admin
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        admin.read_to_string(&mut body).ok()?;
        Some(body)
    }

    /// Scrape `/metrics` and return every sample of `name` as (labels text, value).
    pub async fn metric(&self, name: &str) -> Vec<(String, f64)> {
        let body = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("metrics body");
        parse_samples(&body, name)
    }

    /// The value of `name{backend="ADDR"}`.
    pub async fn backend_metric(&self, name: &str, backend: SocketAddr) -> Option<f64> {
        let wanted = format!("backend=\"{backend}\"");
        self.metric(name)
            .await
            .into_iter()
            .find(|(labels, _)| labels.contains(&wanted))
            .map(|(_, v)| v)
    }
}

/// Environment variables the proxy and workers read secrets and IdP settings from. Tests start
/// children without the developer's values of these, so a test never depends on the shell.
pub const SECRET_ENV: &[&str] = &[
    "AUTH0_DOMAIN",
    "AUTH0_CLIENT_ID",
    "AUTH0_CLIENT_SECRET",
    "APP_SECRET_KEY",
    "APP_SECRET_KEY_PREVIOUS",
    "CUSTODIA_AUTH_ISSUER",
    "CUSTODIA_ASSERTION_KEY",
];

/// Removes [`SECRET_ENV`] from what `command` inherits.
pub fn clear_secret_env(command: &mut Command) {
    for name in SECRET_ENV {
        command.env_remove(name);
    }
}

/// Samples of one metric from Prometheus text format.
pub fn parse_samples(body: &str, name: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, value) = r.split_once('}')?;
                (labels.to_string(), value)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                return None;
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// `[upstream]` TOML for the given workers with fast health checks.
pub fn upstream_section(balance: &str, backends: &[(SocketAddr, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ addr = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[upstream]\nbalance = \"{balance}\"\nbackends = [{}]\nconnect_timeout = \"1s\"\n\
         read_timeout = \"5s\"\nretries = 2\n\n[upstream.health]\ninterval = \"200ms\"\n\
         timeout = \"200ms\"\nhealthy_after = 2\nunhealthy_after = 2\n",
        list.join(", ")
    )
}

/// A reqwest client with a hard timeout so no test can hang on the network.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .expect("reqwest client")
}
