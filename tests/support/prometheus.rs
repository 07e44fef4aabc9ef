//! A real Prometheus server (Debian package `prometheus`) on loopback, scraping one target, and
//! `promtool check metrics`. The server is killed by its guard; every wait has a deadline.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{free_addr, wait_for_port, ChildGuard, TempDir};

/// `promtool check metrics` on an exposition; Ok(output) when it has nothing to say against it.
pub fn promtool_check(exposition: &str) -> Result<String, String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool (Debian package `prometheus`): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(exposition.as_bytes())
            .map_err(|e| format!("cannot feed promtool: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("promtool: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// One Prometheus server scraping `target` every second.
pub struct Prometheus {
    pub addr: SocketAddr,
    pub process: ChildGuard,
    pub log: std::path::PathBuf,
    _dir: TempDir,
}

impl Prometheus {
    pub fn start(target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let addr = free_addr();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: custodia\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("prometheus log");
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone().expect("log fd")))
            .stderr(Stdio::from(log_file));
        let child = command
            .spawn()
            .expect("cannot start prometheus (Debian package `prometheus`)");
        let mut process = ChildGuard {
            name: "prometheus".into(),
            child,
        };
        wait_for_port(addr, Duration::from_secs(30), &mut process);
        Prometheus {
            addr,
            process,
            log,
            _dir: dir,
        }
    }

    /// An instant query; every sample as (labels, value).
    pub async fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let Ok(response) = reqwest::Client::new()
            .get(url)
            .query(&[("query", expr)])
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            return Vec::new();
        };
        let Ok(body) = response.json::<serde_json::Value>().await else {
            return Vec::new();
        };
        body["data"]["result"]
            .as_array()
            .map(|results| {
                results
                    .iter()
                    .filter_map(|r| {
                        let value = r["value"][1].as_str()?.parse().ok()?;
                        Some((r["metric"].clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the server printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
