//! Operations end to end: hot reload (SIGHUP and `--reload`), request and upstream metrics, the
//! access log and what never appears in logs, graceful upgrade and shutdown, DNS discovery,
//! `promtool check metrics` and a real Prometheus scraping the admin listener.
//!
//! Every proxy here writes its stdout (the access log) and stderr (diagnostics) to files in its
//! scratch directory, so tests can read what it logged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::custodia::{
    clear_secret_env, client, custodia_bin, parse_samples, upstream_section, Worker, STARTUP,
};
use support::echo::EchoServer;
use support::process::{
    eventually_async, free_addr, unix_second, wait_for_port, ChildGuard, TempDir,
};
use support::prometheus::{promtool_check, Prometheus};

const PATIENCE: Duration = Duration::from_secs(20);

/// A proxy whose output goes to files, with a config file the test may rewrite.
struct Ops {
    addr: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    pid_file: PathBuf,
    upgrade_sock: PathBuf,
    env: Vec<(String, String)>,
    process: ChildGuard,
    dir: TempDir,
}

impl Ops {
    fn start(sections: &str) -> Ops {
        Ops::start_with_env(sections, &[])
    }

    fn start_with_env(sections: &str, env: &[(&str, &str)]) -> Ops {
        Ops::start_at(free_addr(), sections, env)
    }

    fn start_at(addr: SocketAddr, sections: &str, env: &[(&str, &str)]) -> Ops {
        Ops::start_with_grace(addr, sections, env, "1s")
    }

    /// [`Ops::start_at`] with `server.grace_period = grace`.
    fn start_with_grace(
        addr: SocketAddr,
        sections: &str,
        env: &[(&str, &str)],
        grace: &str,
    ) -> Ops {
        let dir = TempDir::new("ops");
        let admin = free_addr();
        let config = dir.path().join("proxy.toml");
        let pid_file = dir.path().join("proxy.pid");
        let upgrade_sock = dir.path().join("upgrade.sock");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        std::fs::write(
            &config,
            config_text(addr, admin, &pid_file, &upgrade_sock, 2, sections).replace(
                "grace_period = \"1s\"",
                &format!("grace_period = {grace:?}"),
            ),
        )
        .unwrap();
        let process = spawn_proxy(dir.path(), &config, "a", &[], &env);
        let mut ops = Ops {
            addr,
            admin,
            config,
            pid_file,
            upgrade_sock,
            env,
            process,
            dir,
        };
        wait_for_port(addr, STARTUP, &mut ops.process);
        wait_for_port(admin, STARTUP, &mut ops.process);
        ops
    }

    /// Rewrite the config file with the same `[server]` and `[admin]`.
    fn rewrite(&self, sections: &str) {
        self.rewrite_server(self.addr, 2, sections);
    }

    fn rewrite_server(&self, listen: SocketAddr, threads: usize, sections: &str) {
        let text = config_text(
            listen,
            self.admin,
            &self.pid_file,
            &self.upgrade_sock,
            threads,
            sections,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Another `custodia proxy --config FILE ARGS…` on the same config; its output goes to
    /// `TAG.out` / `TAG.err`.
    fn spawn(&self, tag: &str, args: &[&str]) -> ChildGuard {
        spawn_proxy(self.dir.path(), &self.config, tag, args, &self.env)
    }

    /// `custodia proxy --config FILE --reload`, run to completion.
    fn reload_command(&self) -> std::process::Output {
        let mut command = Command::new(custodia_bin());
        command
            .arg("proxy")
            .arg("--config")
            .arg(&self.config)
            .arg("--reload")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        clear_secret_env(&mut command);
        command.output().unwrap()
    }

    fn sighup(&self) {
        self.process.signal(libc::SIGHUP);
    }

    /// Everything every proxy process of this test printed (stdout and stderr).
    fn output(&self) -> String {
        let mut all = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|ext| ext == "out" || ext == "err")
            })
            .collect();
        entries.sort();
        for path in entries {
            all.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        all
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("a.err")).unwrap_or_default()
    }

    /// The access-log lines of the first process, parsed.
    fn access_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("a.out"))
            .unwrap_or_default()
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn scrape(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The sum of the samples of `name` whose labels contain every one of `labels`.
    async fn value(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let samples: Vec<f64> = parse_samples(&self.scrape().await, name)
            .into_iter()
            .filter(|(l, _)| labels.iter().all(|want| l.contains(want)))
            .map(|(_, v)| v)
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }

    async fn wait_value(&self, name: &str, labels: &[&str], expected: f64) {
        let what = format!("{name}{labels:?} == {expected}");
        eventually_async(&what, PATIENCE, || async {
            (self.value(name, labels).await == Some(expected)).then_some(())
        })
        .await;
    }
}

fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    pid_file: &std::path::Path,
    upgrade_sock: &std::path::Path,
    threads: usize,
    sections: &str,
) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\nthreads = {threads}\ngrace_period = \"1s\"\n\
         pid_file = \"{}\"\nupgrade_sock = \"{}\"\n\n[admin]\nlisten = \"{admin}\"\n\n{sections}\n",
        pid_file.display(),
        upgrade_sock.display()
    )
}

fn spawn_proxy(
    dir: &std::path::Path,
    config: &std::path::Path,
    tag: &str,
    args: &[&str],
    env: &[(String, String)],
) -> ChildGuard {
    let out = std::fs::File::create(dir.join(format!("{tag}.out"))).unwrap();
    let err = std::fs::File::create(dir.join(format!("{tag}.err"))).unwrap();
    let mut command = Command::new(custodia_bin());
    command
        .arg("proxy")
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    clear_secret_env(&mut command);
    for (k, v) in env {
        command.env(k, v);
    }
    ChildGuard {
        name: format!("custodia-proxy {tag}"),
        child: command.spawn().expect("start custodia proxy"),
    }
}

/// Steady load on `url` until stopped: counts answers per worker id and keeps every failure.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Load {
    fn start(url: String, concurrency: usize, client: reqwest::Client) -> Load {
        Load::start_with(url, concurrency, client, false)
    }

    /// `retry_closed`: like a browser, send a GET once more when the connection closed before
    /// any byte of the answer arrived (only then is a replay known to be safe and invisible).
    fn start_with(
        url: String,
        concurrency: usize,
        client: reqwest::Client,
        retry_closed: bool,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..concurrency)
            .map(|_| {
                let (stop, seen, failures) = (stop.clone(), seen.clone(), failures.clone());
                let (url, client) = (url.clone(), client.clone());
                tokio::spawn(async move {
                    // Bounded: at most this many requests per task, whatever happens.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let mut sent = client.get(&url).send().await;
                        if retry_closed {
                            if let Err(e) = &sent {
                                if e.is_request() && !e.is_timeout() {
                                    sent = client.get(&url).send().await;
                                }
                            }
                        }
                        match sent {
                            Ok(r) if r.status() == 200 => {
                                let body: serde_json::Value = r.json().await.unwrap_or_default();
                                let worker = body["worker"].as_str().unwrap_or("?").to_string();
                                *seen.lock().unwrap().entry(worker).or_insert(0) += 1;
                            }
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("status {}", r.status())),
                            Err(e) => failures.lock().unwrap().push(format!("error {e:?}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            seen,
            failures,
        }
    }

    fn ok(&self) -> usize {
        self.seen.lock().unwrap().values().sum()
    }

    /// Stop and return (answers per worker, failures).
    async fn finish(self) -> (HashMap<String, usize>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("load task ends")
                .expect("load task");
        }
        let seen = self.seen.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (seen, failures)
    }
}

async fn worker_of(client: &reqwest::Client, url: &str) -> String {
    let response = client.get(url).send().await.expect("request");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    body["worker"].as_str().expect("worker id").to_string()
}

// ---------------------------------------------------------------------------------------------
// Hot reload
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_load_add_and_remove_backends_without_a_failed_request() {
    let workers: Vec<Worker> = ["w0", "w1", "w2", "w3"]
        .iter()
        .map(|id| Worker::start_slow(id, 15))
        .collect();
    let section = |set: &[usize]| {
        let backends: Vec<(SocketAddr, u32)> = set.iter().map(|i| (workers[*i].addr, 1)).collect();
        upstream_section("least_conn", &backends)
    };
    let proxy = Ops::start(&section(&[0, 1]));
    let load = Load::start(proxy.url("/api/hello"), 6, client());

    let sets: [&[usize]; 10] = [
        &[0, 1, 2],
        &[1, 2],
        &[2, 3],
        &[0, 3],
        &[0, 1, 2, 3],
        &[1],
        &[1, 3],
        &[0, 2],
        &[3],
        &[0, 1],
    ];
    let probe = client();
    for (i, set) in sets.iter().enumerate() {
        proxy.rewrite(&section(set));
        if i % 2 == 0 {
            proxy.sighup();
        } else {
            let out = proxy.reload_command();
            assert!(
                out.status.success(),
                "--reload: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let generation = (i + 2) as f64;
        proxy
            .wait_value("custodia_config_generation", &[], generation)
            .await;
        // From the swap on, new requests only reach the new set.
        let allowed: Vec<String> = set.iter().map(|w| format!("w{w}")).collect();
        for _ in 0..6 {
            let worker = worker_of(&probe, &proxy.url("/api/hello")).await;
            assert!(
                allowed.contains(&worker),
                "after reload {} to {allowed:?}, {worker} answered",
                i + 1
            );
        }
    }
    assert!(load.ok() > 0);
    let (seen, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(
        seen.len() == 4,
        "every worker served at some point: {seen:?}"
    );
    assert_eq!(
        proxy
            .value("custodia_config_reloads_total", &["result=\"success\""])
            .await,
        Some(10.0)
    );
    // Removed backends drained, staying ones released every lease.
    proxy
        .wait_value("custodia_requests_in_flight", &[], 0.0)
        .await;
    proxy
        .wait_value("custodia_upstream_in_flight_requests", &[], 0.0)
        .await;
    let backends = parse_samples(&proxy.scrape().await, "custodia_upstream_healthy");
    assert_eq!(
        backends.len(),
        2,
        "only the last set is reported: {backends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_is_refused_and_the_old_config_keeps_serving() {
    let worker = Worker::start("only");
    let good = upstream_section("least_conn", &[(worker.addr, 1)]);
    let proxy = Ops::start(&good);
    let bad = good.replacen("retries = 2", "retries = \"two\"", 1);
    proxy.rewrite(&bad);
    let text = std::fs::read_to_string(&proxy.config).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("retries = \"two\""))
        .unwrap()
        + 1;

    proxy.sighup();
    proxy
        .wait_value(
            "custodia_config_reloads_total",
            &["result=\"failure\""],
            1.0,
        )
        .await;
    assert_eq!(
        proxy
            .value("custodia_config_reloads_total", &["result=\"success\""])
            .await,
        Some(0.0)
    );
    assert_eq!(
        proxy.value("custodia_config_generation", &[]).await,
        Some(1.0)
    );
    assert_eq!(worker_of(&client(), &proxy.url("/api/hello")).await, "only");
    let log = proxy.stderr();
    assert!(
        log.contains(&format!("proxy.toml:{line}: key `upstream.retries`")),
        "the log names the line and key:\n{log}"
    );
    assert!(log.contains("reload refused"), "{log}");

    // `--reload` checks the file first and does not signal a bad one.
    let out = proxy.reload_command();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("upstream.retries"), "{said}");
    assert_eq!(
        proxy
            .value("custodia_config_reloads_total", &["result=\"failure\""])
            .await,
        Some(1.0)
    );

    // Fixed: the next reload goes through.
    proxy.rewrite(&good);
    assert!(proxy.reload_command().status.success());
    proxy
        .wait_value("custodia_config_generation", &[], 2.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_need_an_upgrade_are_reported_and_keep_their_values() {
    let a = Worker::start("a");
    let b = Worker::start("b");
    // Diagnostics as JSON lines this time.
    let json_logs = "\n[log]\nformat = \"json\"\n";
    let proxy = Ops::start(&format!(
        "{}{json_logs}",
        upstream_section("least_conn", &[(a.addr, 1)])
    ));
    let elsewhere = free_addr();
    proxy.rewrite_server(
        elsewhere,
        3,
        &format!(
            "{}{json_logs}",
            upstream_section("least_conn", &[(b.addr, 1)])
        ),
    );
    proxy.sighup();
    proxy
        .wait_value("custodia_config_generation", &[], 2.0)
        .await;
    // The live part applied, the listener stayed.
    assert_eq!(worker_of(&client(), &proxy.url("/api/hello")).await, "b");
    assert!(support::process::port_closed(elsewhere));
    let log = proxy.stderr();
    for line in log.lines() {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "format = json: not JSON: {line}");
    }
    assert!(!log.contains("log.format"), "unchanged, not reported");
    for key in ["server.listen", "server.threads"] {
        assert!(
            log.contains(&format!(
                "`{key}` changed but cannot change in a running process"
            )),
            "{key} reported:\n{log}"
        );
    }
}

/// `--reload --config OTHER` with the running proxy's pid file is refused, naming the file the
/// proxy reads: SIGHUP makes it read its own file again, never OTHER, and the command said it
/// had asked for OTHER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_another_file_than_the_running_ones_is_refused() {
    let (old, new) = (Worker::start("old"), Worker::start("new"));
    let proxy = Ops::start(&upstream_section("least_conn", &[(old.addr, 1)]));
    let other = proxy.dir.path().join("other.toml");
    let text = std::fs::read_to_string(&proxy.config)
        .unwrap()
        .replace(&old.addr.to_string(), &new.addr.to_string());
    std::fs::write(&other, text).unwrap();
    let out = Command::new(custodia_bin())
        .args(["proxy", "--reload", "--config"])
        .arg(&other)
        .current_dir(proxy.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let running = std::fs::canonicalize(&proxy.config).unwrap();
    assert!(
        stderr.contains(&running.display().to_string()) && stderr.contains("other.toml"),
        "{stderr}"
    );
    assert_eq!(worker_of(&client(), &proxy.url("/api/hello")).await, "old");
    assert_eq!(
        proxy.value("custodia_config_generation", &[]).await,
        Some(1.0)
    );
}

/// The secrets are in the service's environment, not in the operator's shell: `--reload` checks
/// the file as the running proxy will read it, and goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_checks_the_file_with_the_running_proxys_environment() {
    let echo = EchoServer::start();
    let addr = free_addr();
    let idp = free_addr(); // nothing listens: the proxy runs on, the IdP is not needed here
    let section = |policy: &str| {
        format!(
            "{}\n[auth]\nissuer = \"http://{idp}/\"\nclient_id = \"custodia-test\"\n\
             public_url = \"http://{addr}\"\ndefault_policy = \"{policy}\"\n",
            upstream_section("least_conn", &[(echo.addr, 1)])
        )
    };
    let proxy = Ops::start_at(
        addr,
        &section("required"),
        &[
            ("APP_SECRET_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d"),
            ("AUTH0_CLIENT_SECRET", "service-only-secret"),
        ],
    );
    let client = reqwest::Client::new();
    let before = client.get(proxy.url("/page")).send().await.unwrap();
    assert_eq!(before.status(), 401);
    // The auth series alerts look for are there at 0 before anything happened to them.
    for (name, labels) in [
        ("custodia_auth_idp_errors_total", &["stage=\"token\""][..]),
        (
            "custodia_auth_logins_total",
            &["outcome=\"failed\"", "reason=\"state_mismatch\""][..],
        ),
        ("custodia_auth_logins_total", &["outcome=\"completed\""][..]),
    ] {
        assert_eq!(
            proxy.value(name, labels).await,
            Some(0.0),
            "{name}{labels:?}"
        );
    }

    proxy.rewrite(&section("public"));
    // `reload_command` runs with no secret in its environment.
    let out = proxy.reload_command();
    assert!(
        out.status.success(),
        "--reload: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eventually_async("the reload to apply", Duration::from_secs(10), || {
        let request = client.get(proxy.url("/page")).send();
        async move { (request.await.ok()?.status() == 200).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_running_proxy_is_a_clear_error() {
    let dir = TempDir::new("no-proxy");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\npid_file = \"{}\"\n[upstream]\nbackends = [\"127.0.0.1:9\"]\n",
            dir.path().join("absent.pid").display()
        ),
    )
    .unwrap();
    let out = Command::new(custodia_bin())
        .args(["proxy", "--config"])
        .arg(&config)
        .arg("--reload")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no running custodia-proxy"), "{said}");
    assert!(said.contains("absent.pid"), "{said}");
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_count_what_the_test_did() {
    let worker = Worker::start("m");
    // A level above info mutes the access log (its lines are info events).
    let proxy = Ops::start(&format!(
        "{}\n[log]\nlevel = \"warn\"\n",
        upstream_section("least_conn", &[(worker.addr, 1)])
    ));
    let c = client();
    for _ in 0..7 {
        assert_eq!(worker_of(&c, &proxy.url("/api/hello")).await, "m");
    }
    for _ in 0..2 {
        let r = c
            .post(proxy.url("/api/hello"))
            .body("hello")
            .send()
            .await
            .unwrap();
        let _ = r.bytes().await;
    }
    let get_ok = ["policy=\"none\"", "method=\"GET\"", "status=\"2xx\""];
    // A request is counted once its answer is sent, so the last one may still be on its way.
    proxy
        .wait_value("custodia_requests_total", &get_ok, 7.0)
        .await;
    proxy
        .wait_value("custodia_requests_total", &["method=\"POST\""], 2.0)
        .await;
    proxy
        .wait_value("custodia_requests_in_flight", &[], 0.0)
        .await;
    let m = |name: &'static str, labels: &'static [&'static str]| {
        let proxy = &proxy;
        async move { proxy.value(name, labels).await }
    };
    assert_eq!(
        m("custodia_requests_total", &["policy=\"required\""]).await,
        Some(0.0),
        "every label combination is there from the start"
    );
    assert_eq!(
        m("custodia_request_duration_seconds_count", &[]).await,
        Some(9.0)
    );
    let backend_label = format!("backend=\"{}\"", worker.addr);
    assert_eq!(
        proxy
            .value(
                "custodia_upstream_response_seconds_count",
                &[&backend_label]
            )
            .await,
        Some(9.0),
        "the upstream response histogram is per backend"
    );
    assert_eq!(m("custodia_request_bytes_total", &[]).await, Some(10.0));
    assert!(m("custodia_response_bytes_total", &[]).await.unwrap() > 0.0);
    assert_eq!(m("custodia_requests_in_flight", &[]).await, Some(0.0));
    let backend = format!("backend=\"{}\"", worker.addr);
    assert_eq!(
        proxy
            .value("custodia_upstream_selected_total", &[&backend])
            .await,
        Some(9.0)
    );
    eventually_async("a passed health check", PATIENCE, || async {
        let n = proxy
            .value(
                "custodia_upstream_health_checks_total",
                &[&backend, "result=\"success\""],
            )
            .await?;
        (n >= 1.0).then_some(())
    })
    .await;
    assert_eq!(m("custodia_upstream_retries_total", &[]).await, Some(0.0));
    assert_eq!(
        m(
            "custodia_build_info",
            &[concat!("version=\"", env!("CARGO_PKG_VERSION"), "\"")]
        )
        .await,
        Some(1.0)
    );
    let loaded = m("custodia_config_last_reload_timestamp_seconds", &[])
        .await
        .unwrap();
    assert!(loaded > 1.7e9, "a unix time: {loaded}");
    assert!(proxy.access_lines().is_empty(), "level warn: no access log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_counts_one_connect_failure_and_one_retry() {
    let worker = Worker::start("alive");
    let dead = free_addr();
    // Slow health checks: the dead backend is only found out by the request.
    let section = format!(
        "[upstream]\nbalance = \"round_robin\"\nbackends = [\"{dead}\", \"{}\"]\n\
         connect_timeout = \"1s\"\nretries = 2\n\n[upstream.health]\ninterval = \"30s\"\n\
         timeout = \"1s\"\nhealthy_after = 2\nunhealthy_after = 2\n\n[log]\naccess_log = false\n",
        worker.addr
    );
    let proxy = Ops::start(&section);
    let c = client();
    for _ in 0..4 {
        assert_eq!(worker_of(&c, &proxy.url("/api/hello")).await, "alive");
    }
    let dead_label = format!("backend=\"{dead}\"");
    assert_eq!(
        proxy
            .value("custodia_upstream_connect_failures_total", &[&dead_label])
            .await,
        Some(1.0)
    );
    assert_eq!(
        proxy.value("custodia_upstream_retries_total", &[]).await,
        Some(1.0)
    );
    assert_eq!(
        proxy
            .value("custodia_upstream_failovers_total", &[&dead_label])
            .await,
        Some(1.0),
        "the failover is counted against the backend that failed"
    );
    assert_eq!(
        proxy
            .value("custodia_upstream_healthy", &[&dead_label])
            .await,
        Some(0.0)
    );
    let alive_label = format!("backend=\"{}\"", worker.addr);
    assert_eq!(
        proxy
            .value("custodia_upstream_connect_failures_total", &[&alive_label])
            .await,
        Some(0.0)
    );
    assert!(proxy.access_lines().is_empty(), "access_log = false");
    assert!(
        proxy.stderr().contains("cannot connect"),
        "diagnostics stay on"
    );
}

/// Connections held open to the admin listener (idle, or trickling a header) cannot use up the
/// process's descriptors: above its cap a new one gets 503, the public listener serves on, and
/// once they close the admin listener answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_caps_its_connections_and_public_traffic_goes_on() {
    let worker = Worker::start("w");
    let proxy = Ops::start(&upstream_section("least_conn", &[(worker.addr, 1)]));
    let admin_get = |path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        support::raw_tcp::send(proxy.admin, request.as_bytes())
    };
    assert_eq!(admin_get("/healthz").status(), Some(200));
    let mut held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(proxy.admin).unwrap())
        .collect();
    // Each is accepted and counted; then the next is one too many. (One of them may have come
    // while the first check's connection was still counted, and been refused itself: then the
    // next one fills the cap.)
    let refused = (0..8).find(|_| {
        let refused = admin_get("/healthz").status() == Some(503);
        if !refused {
            held.push(std::net::TcpStream::connect(proxy.admin).unwrap());
        }
        refused
    });
    assert!(
        refused.is_some(),
        "no 503 with {} connections held",
        held.len()
    );
    assert_eq!(worker_of(&client(), &proxy.url("/api/hello")).await, "w");
    drop(held);
    eventually_async("the admin listener back", STARTUP, || async {
        (admin_get("/healthz").status() == Some(200)).then_some(())
    })
    .await;
}

/// A client that gives up on a slow answer (a browser's stop, a client timeout) releases the
/// worker at once, on both paths: its in-flight count drops, and the request counts as a client
/// that left (4xx, as nginx's 499), not as the 200 that came later to no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_releases_the_worker() {
    let slow = Worker::start_slow("slow", 3000);
    let proxy = Ops::start(&upstream_section("least_conn", &[(slow.addr, 1)]));
    let label = format!("backend=\"{}\"", slow.addr);
    for request in [
        &b"GET /api/hello HTTP/1.1\r\nHost: h\r\n\r\n"[..],
        b"POST /api/hello HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n\r\n",
    ] {
        let mut client = std::net::TcpStream::connect(proxy.addr).unwrap();
        std::io::Write::write_all(&mut client, request).unwrap();
        proxy
            .wait_value("custodia_upstream_in_flight_requests", &[&label], 1.0)
            .await;
        let left = std::time::Instant::now();
        drop(client);
        proxy
            .wait_value("custodia_upstream_in_flight_requests", &[&label], 0.0)
            .await;
        assert!(
            left.elapsed() < Duration::from_millis(2500),
            "released when the client left, not when the answer came: {:?}",
            left.elapsed()
        );
    }
    let requests = |status: &str| {
        let status = format!("status=\"{status}\"");
        let proxy = &proxy;
        async move {
            proxy
                .scrape()
                .await
                .lines()
                .filter(|l| l.starts_with("custodia_requests_total{") && l.contains(&status))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        }
    };
    assert_eq!(requests("2xx").await, 0.0, "no answer reached anyone");
    assert!(requests("4xx").await >= 2.0);
}

/// Config sections for a pool of one backend, `dead`, that nothing listens on; health checks
/// too far apart to matter, access log off.
fn lone_dead_backend(dead: SocketAddr, retries: u32) -> String {
    format!(
        "[upstream]\nbackends = [\"{dead}\"]\nconnect_timeout = \"1s\"\nretries = {retries}\n\n\
         [upstream.health]\ninterval = \"30s\"\ntimeout = \"1s\"\n\n[log]\naccess_log = false\n"
    )
}

/// A failure on Pingora's path (a POST) is logged as the fast path logs one: a line that
/// names the method and path, with the backend, the error and the request id as fields, not
/// Pingora's free text of nested contexts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_on_either_path_is_logged_with_the_same_fields() {
    let dead = free_addr();
    let proxy = Ops::start(&lone_dead_backend(dead, 0));
    let c = client();
    let post = c
        .post(proxy.url("/api/hello"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(post.status().is_server_error(), "{}", post.status());
    let id = post.headers()["x-request-id"].to_str().unwrap().to_owned();
    let logged = eventually_async("the POST's failure line", Duration::from_secs(5), || {
        let line = proxy
            .stderr()
            .lines()
            .find(|l| l.contains("POST /api/hello: fail to proxy"))
            .map(str::to_owned);
        async move { line }
    })
    .await;
    assert!(logged.contains(&format!("backend=\"{dead}\"")), "{logged}");
    assert!(logged.contains(&format!("request_id=\"{id}\"")), "{logged}");
    // Why in a phrase: every backend out once this one refused the connection.
    assert!(
        logged.contains("error=status 503: no healthy backend"),
        "{logged}"
    );
    assert!(
        !logged.contains("context:"),
        "no nested Pingora contexts: {logged}"
    );
}

/// With nowhere else to go, a failed attempt is no failover: the request fails (503) and
/// neither `failovers_total` nor `retries_total` says it moved, on either path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_dead_backend_counts_no_failover() {
    let dead = free_addr();
    let proxy = Ops::start(&lone_dead_backend(dead, 2));
    let c = client();
    let first_second = unix_second();
    for _ in 0..20 {
        // GET takes the fast path, POST Pingora's.
        let get = c.get(proxy.url("/api/hello")).send().await.unwrap();
        let post = c
            .post(proxy.url("/api/hello"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert!(get.status().is_server_error(), "{}", get.status());
        assert!(post.status().is_server_error(), "{}", post.status());
    }
    // The failed requests are logged once a second for the backend, not each: one request's
    // lines (on Pingora's path, its retry warning and its final error) per unix second spanned,
    // and a line a second for "no backend left" (the fast path's last word).
    let seconds = unix_second() - first_second + 1;
    let lines = proxy
        .stderr()
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("fail to proxy"))
        .count() as u64;
    assert!(
        (1..=3 * seconds).contains(&lines),
        "{lines} lines in {seconds} s"
    );
    let dead_label = format!("backend=\"{dead}\"");
    assert_eq!(
        proxy
            .value("custodia_upstream_failovers_total", &[&dead_label])
            .await,
        Some(0.0)
    );
    assert_eq!(
        proxy.value("custodia_upstream_retries_total", &[]).await,
        Some(0.0)
    );
    assert!(
        proxy
            .value("custodia_upstream_connect_failures_total", &[&dead_label])
            .await
            .is_some_and(|n| n >= 1.0),
        "the failures themselves are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics() {
    let worker = Worker::start("p");
    let proxy = Ops::start(&upstream_section("least_conn", &[(worker.addr, 1)]));
    let _ = worker_of(&client(), &proxy.url("/api/hello")).await;
    let exposition = proxy.scrape().await;
    for family in [
        "custodia_requests_total",
        "custodia_request_duration_seconds",
        "custodia_upstream_health_checks_total",
        "custodia_upstream_latency_estimate_seconds",
        "custodia_config_reloads_total",
        "custodia_build_info",
    ] {
        assert!(
            exposition.contains(&format!("# TYPE {family} ")),
            "{family} exposed"
        );
    }
    if let Err(problems) = promtool_check(&exposition) {
        panic!("promtool check metrics:\n{problems}\n--- exposition ---\n{exposition}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_admin_listener() {
    let worker = Worker::start("scraped");
    let proxy = Ops::start(&upstream_section("least_conn", &[(worker.addr, 1)]));
    let prometheus = Prometheus::start(proxy.admin);
    let up = eventually_async(
        "Prometheus sees up == 1",
        Duration::from_secs(45),
        || async {
            let samples = prometheus.query("up{job=\"custodia\"}").await;
            samples.iter().any(|(_, v)| *v == 1.0).then_some(samples)
        },
    )
    .await;
    assert_eq!(up[0].0["instance"], proxy.admin.to_string());
    let healthy = format!("custodia_upstream_healthy{{backend=\"{}\"}}", worker.addr);
    eventually_async(
        "Prometheus has custodia_upstream_healthy == 1",
        Duration::from_secs(30),
        || async {
            let samples = prometheus.query(&healthy).await;
            samples.iter().any(|(_, v)| *v == 1.0).then_some(())
        },
    )
    .await;
    let info = prometheus.query("custodia_build_info").await;
    assert_eq!(info.len(), 1, "{}", prometheus.output());
    assert_eq!(info[0].0["version"], env!("CARGO_PKG_VERSION"));
}

// ---------------------------------------------------------------------------------------------
// Access log and secrets
// ---------------------------------------------------------------------------------------------

const SECRETS: &[&str] = &[
    "SECRETCODE4711",
    "SECRETTOKEN0815",
    "SECRETSTATE1234",
    "SECRETBEARER9999",
    "SECRETCOOKIE2222",
];

fn assert_no_secrets(output: &str, extra: &[&str]) {
    for secret in SECRETS.iter().chain(extra) {
        assert!(
            !output.contains(secret),
            "`{secret}` appears in the proxy's output:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_json_line_per_request_and_no_secrets() {
    let echo = EchoServer::start();
    let dead = free_addr();
    // The dead backend first: the request fails over, so Pingora logs its retry too.
    let section = format!(
        "[upstream]\nbalance = \"round_robin\"\nbackends = [\"{dead}\", \"{}\"]\n\
         connect_timeout = \"1s\"\n\n[upstream.health]\ninterval = \"30s\"\ntimeout = \"1s\"\n",
        echo.addr
    );
    let proxy = Ops::start(&section);
    let response = client()
        .get(
            proxy.url("/some/path?code=SECRETCODE4711&token=SECRETTOKEN0815&state=SECRETSTATE1234"),
        )
        .header("authorization", "Bearer SECRETBEARER9999")
        .header("cookie", "custodia_session=SECRETCOOKIE2222; theme=dark")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = response.bytes().await;
    let second = client()
        .post(proxy.url("/upload"))
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    let _ = second.bytes().await;

    let lines = eventually_async("two access-log lines", PATIENCE, || async {
        let lines = proxy.access_lines();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 2, "one line per request: {lines:?}");
    let line = lines
        .iter()
        .find(|l| l["request_id"] == id.as_str())
        .expect("the request's line");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/some/path", "no query string");
    assert_eq!(line["status"], 200);
    assert_eq!(line["backend"], echo.addr.to_string());
    // Auth off: no trusted proxies, the client is the peer (X-Forwarded-For is not believed).
    assert_eq!(line["client"], "127.0.0.1");
    assert!(line["total_ms"].as_f64().unwrap() >= line["upstream_ms"].as_f64().unwrap());
    assert!(line["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(line["bytes_in"], 0);
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    assert!(line.get("sub").is_none());
    // Each line is written once its answer is out, so the two may come in either order.
    let post = lines
        .iter()
        .find(|l| l["method"] == "POST")
        .expect("the POST's line");
    assert_eq!(post["bytes_in"], 12);

    let output = proxy.output();
    assert!(
        output.contains("cannot connect"),
        "the failover was logged:\n{output}"
    );
    assert_no_secrets(&output, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_the_subject_is_logged_and_no_secret_is() {
    use custodia_proxy::auth::{
        seal_logout_hint, seal_session, CookieSettings, SecretKeys, Session,
    };

    let echo = EchoServer::start();
    let app_secret = "SECRETAPPKEY-0123456789abcdef0123456789abcdef";
    let client_secret = "SECRETCLIENT-5555";
    let idp = free_addr(); // nothing listens: discovery keeps failing, sessions still work
    let addr = free_addr();
    let section = format!(
        "{}\n[auth]\nissuer = \"http://{idp}/\"\nclient_id = \"custodia-test\"\n\
         public_url = \"http://{addr}\"\ndefault_policy = \"required\"\n\n\
         [[route]]\nprefix = \"/public/\"\npolicy = \"public\"\n",
        upstream_section("least_conn", &[(echo.addr, 1)])
    );
    let proxy = Ops::start_at(
        addr,
        &section,
        &[
            ("APP_SECRET_KEY", app_secret),
            ("AUTH0_CLIENT_SECRET", client_secret),
        ],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let session = Session {
        sub: "user-sub-42".into(),
        email: Some("alice@example.com".into()),
        name: Some("Alice".into()),
        picture: None,
        iat: now,
        exp: now + 3600,
    };
    let keys = SecretKeys::from_secrets(app_secret, &[]).unwrap();
    let sealed = seal_session(&keys, &session);
    let settings = CookieSettings { secure: false };
    // The ID token rides in the logout hint; /logout is not the route here, but the cookie is
    // on the request all the same (a client may send it anywhere).
    let hint = seal_logout_hint(&keys, &session, "SECRETIDTOKEN-7777");
    let cookie = format!(
        "{}={sealed}; {}={hint}",
        settings.session_cookie_name(),
        settings.logout_hint_cookie_name()
    );

    let c = client();
    let signed_in = c
        .get(proxy.url("/api/private?token=SECRETTOKEN0815"))
        .header("cookie", &cookie)
        .header("authorization", "Bearer SECRETBEARER9999")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 200);
    let _ = signed_in.bytes().await;
    // A callback the proxy answers itself (no login state): code and state must not be logged.
    let callback = c
        .get(proxy.url("/callback?code=SECRETCODE4711&state=SECRETSTATE1234"))
        .header("cookie", "custodia_session=SECRETCOOKIE2222")
        .send()
        .await
        .unwrap();
    assert!(callback.status().is_client_error() || callback.status().is_server_error());
    let _ = callback.bytes().await;
    let anonymous = c
        .get(proxy.url("/api/private"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let lines = eventually_async("three access-log lines", PATIENCE, || async {
        let lines = proxy.access_lines();
        (lines.len() >= 3).then_some(lines)
    })
    .await;
    let private = &lines[0];
    assert_eq!(private["path"], "/api/private");
    assert_eq!(
        private["sub"], "user-sub-42",
        "the subject, never the email"
    );
    assert_eq!(private["status"], 200);
    let cb = &lines[1];
    assert_eq!(cb["path"], "/callback");
    assert!(cb["backend"].is_null(), "answered by the proxy: {cb}");
    assert_eq!(cb["client"], "127.0.0.1");
    assert_eq!(lines[2]["status"], 401);
    assert!(lines[2].get("sub").is_none());
    assert_eq!(
        proxy
            .value(
                "custodia_requests_total",
                &["policy=\"required\"", "status=\"2xx\""]
            )
            .await,
        Some(1.0)
    );

    let output = proxy.output();
    assert_no_secrets(
        &output,
        &[
            &sealed,
            &hint,
            app_secret,
            client_secret,
            "alice@example.com",
            "SECRETIDTOKEN-7777",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful upgrade and shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_fails_no_request() {
    let a = Worker::start("a");
    let b = Worker::start("b");
    let old = Ops::start(&upstream_section("least_conn", &[(a.addr, 1), (b.addr, 1)]));
    let old_pid = old.process.pid();
    // A connection per request: an idle keep-alive connection the old process closes at its
    // exit can race with a client's next request on it (inherent to HTTP/1.1; clients retry
    // idempotent requests then). Likewise a connection the old process accepted in its last
    // instant may close with no answer under heavy load (seen once in CI): the load client
    // replays a GET once in exactly that case, as browsers do. Requests on busy connections are answered `Connection: close`
    // once the hand-over has begun, and new connections are accepted by whichever process
    // holds the shared listening socket: none of these may fail.
    let fresh_connections = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .unwrap();
    let load = Load::start_with(old.url("/api/hello"), 4, fresh_connections, true);
    let (old, mut new) = upgrade_under(old, load).await;

    // The new process serves, owns the pid file, and answers on the admin listener.
    assert!(new.is_running());
    assert_eq!(worker_of(&client(), &old.url("/api/hello")).await.len(), 1);
    let pid: i32 = std::fs::read_to_string(&old.pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, new.pid());
    assert_ne!(pid, old_pid);
    assert!(old.scrape().await.contains("custodia_build_info"));
}

/// `--upgrade` next to `old` while `load` runs: the new process listens on upgrade_sock and
/// asks the old one (SIGQUIT) to hand its listeners over, no signal to time by hand. Asserts
/// the old one exits, no request failed and requests went on; returns both processes.
async fn upgrade_under(old: Ops, load: Load) -> (Ops, ChildGuard) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = old.spawn("b", &["--upgrade"]);
    let served_before = load.ok();
    let mut old = old;
    let (old, code) = tokio::task::spawn_blocking(move || {
        let code = old.process.wait_exit(Duration::from_secs(30));
        (old, code)
    })
    .await
    .unwrap();
    assert!(code.is_some(), "the old process exits after the hand-over");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (seen, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        seen.values().sum::<usize>() > served_before,
        "requests went on during the upgrade"
    );
    (old, new)
}

/// Busy keep-alive connections through an upgrade: from the hand-over on, each next answer of
/// the old process says `Connection: close` and the connection ends after it, so no request is
/// sent on a connection the old process is closing. (They were reset when it closed them all
/// at its exit, 5 s later: 1 to 6 failed requests per upgrade in this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_keep_alive_load_fails_no_request() {
    let a = Worker::start("a");
    let b = Worker::start("b");
    let old = Ops::start(&upstream_section("least_conn", &[(a.addr, 1), (b.addr, 1)]));
    let keepalive = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap();
    let load = Load::start_with(old.url("/api/hello"), 16, keepalive, false);
    let (old, mut new) = upgrade_under(old, load).await;
    assert!(new.is_running(), "{}", old.output());
}

/// SIGQUIT with no new process waiting for the listeners (none started, or one that gave up)
/// no longer shuts the proxy down with nobody to take over: it says so and serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_with_no_new_process_waiting_keeps_the_proxy_serving() {
    let worker = Worker::start("w");
    let mut proxy = Ops::start(&upstream_section("least_conn", &[(worker.addr, 1)]));
    // A socket file left by an earlier upgrade does not count: nobody listens on it.
    let stale = std::os::unix::net::UnixListener::bind(&proxy.upgrade_sock).unwrap();
    drop(stale);
    proxy.process.signal(libc::SIGQUIT);
    eventually_async("the refusal logged", PATIENCE, || async {
        proxy
            .output()
            .contains("no new process is waiting")
            .then_some(())
    })
    .await;
    // Past Pingora's 5 s hand-over wait, it would have shut down by now.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(proxy.process.is_running(), "{}", proxy.output());
    assert_eq!(worker_of(&client(), &proxy.url("/api/hello")).await, "w");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish() {
    let slow = Worker::start_slow("slow", 600);
    let mut proxy = Ops::start(&upstream_section("least_conn", &[(slow.addr, 1)]));
    let url = proxy.url("/api/hello");
    // A GET takes the fast path, a POST Pingora's.
    let get = tokio::spawn({
        let url = url.clone();
        async move { client().get(url).send().await }
    });
    let post = tokio::spawn(async move { client().post(url).body("x").send().await });
    proxy
        .wait_value("custodia_requests_in_flight", &[], 2.0)
        .await;
    proxy.process.signal(libc::SIGTERM);
    for (request, status) in [(get, 200), (post, 405)] {
        let response = request
            .await
            .unwrap()
            .expect("the in-flight request completes");
        assert_eq!(response.status(), status, "the worker's answer");
        assert_eq!(
            response.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "an answer during shutdown tells the client not to reuse the connection ({status})"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        if status == 200 {
            assert_eq!(body["worker"], "slow");
        }
    }
    let exited = tokio::task::spawn_blocking(move || proxy.process.wait_exit(PATIENCE))
        .await
        .unwrap();
    assert!(exited.is_some(), "the proxy exits after draining");
}

/// A proxy with a 120 s grace period in front of `worker`, and a keep-alive client it has
/// answered that stays connected, idle.
fn with_an_idle_client(worker: &Worker) -> (Ops, std::net::TcpStream) {
    let proxy = Ops::start_with_grace(
        free_addr(),
        &upstream_section("least_conn", &[(worker.addr, 1)]),
        &[],
        "120s",
    );
    let mut idle = std::net::TcpStream::connect(proxy.addr).unwrap();
    std::io::Write::write_all(&mut idle, b"GET /api/hello HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut answer = [0u8; 512];
    idle.set_read_timeout(Some(PATIENCE)).unwrap();
    assert!(std::io::Read::read(&mut idle, &mut answer).unwrap() > 0);
    (proxy, idle)
}

/// With nothing left to drain, SIGTERM ends the process at once, not when a long grace period
/// runs out (every `docker stop` and rolling update waited it out): idle keep-alive clients
/// are closed, and the pid file is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nothing_in_flight_exits_without_waiting_out_the_grace_period() {
    let worker = Worker::start("w");
    let (mut proxy, mut idle) = with_an_idle_client(&worker);
    assert!(proxy.pid_file.exists());

    proxy.process.signal(libc::SIGTERM);
    let pid_file = proxy.pid_file.clone();
    // Far below the 120 s grace period; the bound only keeps a broken build from hanging.
    let exited =
        tokio::task::spawn_blocking(move || proxy.process.wait_exit(Duration::from_secs(30)))
            .await
            .unwrap();
    assert_eq!(
        exited,
        Some(Some(0)),
        "exits, status 0, with nothing to drain"
    );
    assert!(!pid_file.exists(), "the pid file is removed");
    let mut answer = [0u8; 512];
    assert_eq!(
        std::io::Read::read(&mut idle, &mut answer).unwrap_or(0),
        0,
        "the idle client's connection was closed"
    );
}

/// SIGINT stops the proxy at once, every time: Pingora's own quick stop could hang with a
/// listener spinning on "runtime is being shut down" (about one stop in five, with clients
/// connected), until the local stack killed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_at_once_every_time() {
    let worker = Worker::start("w");
    for round in 0..5 {
        let (mut proxy, _idle) = with_an_idle_client(&worker);
        proxy.process.signal(libc::SIGINT);
        let pid_file = proxy.pid_file.clone();
        let exited =
            tokio::task::spawn_blocking(move || proxy.process.wait_exit(Duration::from_secs(20)))
                .await
                .unwrap();
        assert_eq!(exited, Some(Some(0)), "round {round}: stops, status 0");
        assert!(!pid_file.exists(), "round {round}: the pid file is removed");
    }
}

// ---------------------------------------------------------------------------------------------
// DNS discovery
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_given_by_name_is_resolved_and_rediscovered_without_churn() {
    let worker = Worker::start("named");
    let section = format!(
        "[upstream]\nbackends = [\"localhost:{}\"]\nconnect_timeout = \"1s\"\n\
         discovery_interval = \"200ms\"\n\n[upstream.health]\ninterval = \"200ms\"\n\
         timeout = \"200ms\"\n",
        worker.addr.port()
    );
    let proxy = Ops::start(&section);
    let label = format!("backend=\"{}\"", worker.addr);
    assert!(
        proxy
            .value("custodia_upstream_healthy", &[&label])
            .await
            .is_some(),
        "localhost became {}",
        worker.addr
    );
    let c = client();
    for _ in 0..5 {
        assert_eq!(worker_of(&c, &proxy.url("/api/hello")).await, "named");
    }
    // Several discovery rounds later the same answer has not rebuilt anything.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        proxy.value("custodia_config_generation", &[]).await,
        Some(1.0)
    );
}

/// A backend name that does not resolve yet (the workers start after the proxy, as after a
/// compose restart or on a first Kubernetes deploy) does not stop the proxy: it starts, says
/// why it is not ready, answers 503, and serves the other backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_name_that_does_not_resolve_yet_does_not_stop_the_start() {
    let section = "[upstream]\nbackends = [\"custodia-app-not-up-yet.invalid:8000\"]\n\
                   discovery_interval = \"200ms\"\n";
    let proxy = Ops::start(section);
    let readyz = client()
        .get(format!("http://{}/readyz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let reason = readyz.text().await.unwrap();
    assert!(
        reason.contains("custodia-app-not-up-yet.invalid:8000") && reason.contains("resolve"),
        "{reason}"
    );
    let answer = client().get(proxy.url("/api/hello")).send().await.unwrap();
    assert_eq!(answer.status(), 503);

    // Next to a backend that is there, it serves.
    let worker = Worker::start("up");
    let section = format!(
        "[upstream]\nbackends = [\"custodia-app-not-up-yet.invalid:8000\", \"{}\"]\n",
        worker.addr
    );
    let proxy = Ops::start(&section);
    assert_eq!(worker_of(&client(), &proxy.url("/api/hello")).await, "up");
}

/// A reload that adds a backend name that does not resolve (a service scaled to zero) still
/// applies the rest of the file: the name waits, the other backends change as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_name_that_does_not_resolve_applies_the_rest() {
    let (old, new) = (Worker::start("old"), Worker::start("new"));
    let proxy = Ops::start(&upstream_section("least_conn", &[(old.addr, 1)]));
    assert_eq!(worker_of(&client(), &proxy.url("/api/hello")).await, "old");
    proxy.rewrite(&format!(
        "[upstream]\nbackends = [\"{}\", \"custodia-scaled-to-zero.invalid:8000\"]\n",
        new.addr
    ));
    proxy.sighup();
    eventually_async("the reload applied", STARTUP, || async {
        (proxy.value("custodia_config_generation", &[]).await == Some(2.0)).then_some(())
    })
    .await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(worker_of(&c, &proxy.url("/api/hello")).await, "new");
    }
}
