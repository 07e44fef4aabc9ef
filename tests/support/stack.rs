//! The local stack as a newcomer runs it (`custodia --config config/custodia.toml`), on free
//! ports: a temporary copy of the shipped config in which every `127.0.0.1:PORT` is moved to a
//! free port (the same old port always to the same new one, so `public_url` follows `listen`),
//! and the pid file and upgrade socket go to a scratch directory.
//!
//! ```ignore
//! let stack = LocalStack::start_shipped();
//! let home = reqwest::get(stack.url("/")).await?;
//! ```

// Test support: a failed step panics with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::custodia::{clear_secret_env, custodia_bin, STARTUP};
use super::process::{eventually_async, free_addr, wait_for_port, ChildGuard, TempDir};

/// The shipped config file.
pub fn shipped_config() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/custodia.toml"))
        .expect("config/custodia.toml")
}

/// `config` with every `127.0.0.1:PORT` replaced by a free loopback port; returns the new text
/// and the mapping old → new.
pub fn move_ports(config: &str) -> (String, BTreeMap<u16, SocketAddr>) {
    const HOST: &str = "127.0.0.1:";
    let mut mapping: BTreeMap<u16, SocketAddr> = BTreeMap::new();
    let mut out = String::with_capacity(config.len());
    let mut rest = config;
    while let Some(at) = rest.find(HOST) {
        let (before, from_host) = rest.split_at(at);
        out.push_str(before);
        let digits: String = from_host[HOST.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        match digits.parse::<u16>() {
            Ok(port) if port != 0 => {
                let new = *mapping.entry(port).or_insert_with(free_addr);
                out.push_str(&new.to_string());
            }
            _ => {
                out.push_str(HOST);
                out.push_str(&digits);
            }
        }
        rest = &from_host[HOST.len() + digits.len()..];
    }
    out.push_str(rest);
    (out, mapping)
}

/// A running local stack; stopped with Ctrl-C (SIGINT) when dropped, killed if it lingers.
pub struct LocalStack {
    process: ChildGuard,
    /// The proxy's public listener (the shipped `127.0.0.1:8080`, moved).
    pub listen: SocketAddr,
    /// Shipped port → the port used in this run.
    pub ports: BTreeMap<u16, SocketAddr>,
    pub config_path: PathBuf,
    /// The config as written for this run.
    pub config: String,
    dir: TempDir,
}

impl LocalStack {
    /// The shipped config with moved ports, started with no secrets from the environment and
    /// in a scratch working directory (no `.env`). Waits until the proxy accepts connections.
    pub fn start_shipped() -> LocalStack {
        LocalStack::start_with(&shipped_config(), &[])
    }

    /// `config` (ports moved) started with `env` added to a clean environment.
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> LocalStack {
        let dir = TempDir::new("stack");
        let (config, ports) = move_ports(config);
        let config = config
            .replace(
                "/tmp/custodia-proxy.pid",
                &dir.path().join("proxy.pid").display().to_string(),
            )
            .replace(
                "/tmp/custodia-proxy-upgrade.sock",
                &dir.path().join("upgrade.sock").display().to_string(),
            );
        let listen = *ports
            .get(&8080)
            .expect("the shipped config listens on 127.0.0.1:8080");
        let config_path = dir.path().join("custodia.toml");
        std::fs::write(&config_path, &config).expect("write config");
        let mut command = Command::new(custodia_bin());
        command
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path());
        clear_secret_env(&mut command);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut process = ChildGuard::spawn("custodia (local stack)", &mut command);
        wait_for_port(listen, STARTUP, &mut process);
        LocalStack {
            process,
            listen,
            ports,
            config_path,
            config,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// Where the shipped `127.0.0.1:port` went in this run.
    pub fn moved(&self, port: u16) -> Option<SocketAddr> {
        self.ports.get(&port).copied()
    }

    /// Waits until the admin listener (the shipped `127.0.0.1:9090`, moved) answers `/readyz`
    /// with 200: workers healthy and, with `[auth]`, the IdP metadata loaded.
    pub async fn wait_ready(&self, patience: Duration) {
        let admin = self
            .moved(9090)
            .expect("the shipped config has an admin listener on 127.0.0.1:9090");
        let url = format!("http://{admin}/readyz");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("reqwest client");
        eventually_async("the local stack's /readyz to answer 200", patience, || {
            let request = http.get(&url).send();
            async move {
                let response = request.await.ok()?;
                (response.status() == reqwest::StatusCode::OK).then_some(())
            }
        })
        .await;
    }

    pub fn scratch_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        self.process.signal(libc::SIGINT);
        let _ = self.process.wait_exit(Duration::from_secs(15));
        // ChildGuard kills it if it is still running.
    }
}
