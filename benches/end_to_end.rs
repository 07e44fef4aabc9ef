//! `cargo bench --bench end_to_end`: Custodia side by side with nginx, end to end, in one run.
//!
//! Three `custodia app` workers; in front of them, with the same workers: Custodia with the
//! session check off, Custodia with it on (`/api/` requires a session, every request carries a
//! real sealed cookie), the same with `[server] fast_path = false` (every request through
//! Pingora's proxy), and nginx (`least_conn`, upstream keep-alive, 2 worker processes) sent the
//! requests of either (with and without the cookie, which it passes on to the workers); plus
//! straight to one worker as the floor; and bare Pingora (what Custodia is built on, with
//! nothing of ours), the floor of any Pingora proxy. Each is driven at fixed concurrency
//! (HTTP/1.1 keep-alive) for a warm-up and a measured window, targets interleaved so that noise
//! hits all alike. The rows the goals are read from run again under Debian's `wrk` (the second
//! opinion the performance issue allows), in the same run. Then:
//! a slow worker (least_conn, least_time, round_robin, nginx), and memory with many idle clients.
//!
//! Knobs (environment): CUSTODIA_BENCH_CONCURRENCY (default "1,32,256"), CUSTODIA_BENCH_SECS
//! (measured seconds, default 5), CUSTODIA_BENCH_WARMUP_SECS (default 1), CUSTODIA_BENCH_ROUNDS
//! (default 2; the best round by throughput is reported, preferring rounds without errors), CUSTODIA_BENCH_IDLE_CONNECTIONS
//! (default 10000), CUSTODIA_BENCH_PARTS (default "throughput,wrk,slow,memory").
//!
//! Output: a table on stdout, target/custodia-bench/report.md and throughput.svg. The machine
//! is shared and noisy: read the ratios, not the absolute figures.

// A bench harness: a broken setup should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
#[path = "../tests/support/process.rs"]
mod process;

// The crate root's modules resolve next to it, in benches/: point at benches/end_to_end/.
#[path = "end_to_end/load.rs"]
mod load;
#[path = "end_to_end/machine_cpu.rs"]
mod machine_cpu;
#[path = "end_to_end/measure.rs"]
mod measure;
#[path = "end_to_end/pingora_baseline.rs"]
mod pingora_baseline;
#[path = "end_to_end/procs.rs"]
mod procs;
#[path = "end_to_end/report.rs"]
mod report;
#[path = "end_to_end/wrk.rs"]
mod wrk;
// Its tests run from tests/bench_wrk_report.rs; this binary has no test harness.
#[cfg_attr(test, allow(unused_imports, dead_code))]
#[path = "end_to_end/wrk_report.rs"]
mod wrk_report;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custodia_proxy::auth::{seal_session, CookieSettings, SecretKeys, Session};
use custodia_proxy::config::Balance;

use load::{LoadResult, LoadSpec, WindowProbe};
use machine_cpu::{CpuTimes, MachineShare};
use procs::{Proxy, Worker};
use report::{Measured, MemoryRow, Report, Row, SlowRow};

const PATH: &str = "/api/hello";
const NGINX_MISSING: &str = "nginx not installed — apt-get install nginx";

struct Knobs {
    concurrency: Vec<usize>,
    measure: Duration,
    warmup: Duration,
    rounds: usize,
    idle_connections: usize,
    parts: Vec<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

impl Knobs {
    fn from_env() -> Knobs {
        let concurrency = std::env::var("CUSTODIA_BENCH_CONCURRENCY")
            .unwrap_or_else(|_| "1,32,256".into())
            .split(',')
            .map(|c| {
                c.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c > 0)
                    .unwrap_or_else(|| {
                        panic!("CUSTODIA_BENCH_CONCURRENCY: `{c}` is not a positive number")
                    })
            })
            .collect();
        Knobs {
            concurrency,
            measure: Duration::from_secs_f64(env_or("CUSTODIA_BENCH_SECS", 5.0)),
            warmup: Duration::from_secs_f64(env_or("CUSTODIA_BENCH_WARMUP_SECS", 1.0)),
            rounds: env_or("CUSTODIA_BENCH_ROUNDS", 2usize).max(1),
            idle_connections: env_or("CUSTODIA_BENCH_IDLE_CONNECTIONS", 10_000usize),
            parts: std::env::var("CUSTODIA_BENCH_PARTS")
                .unwrap_or_else(|_| "throughput,wrk,slow,memory".into())
                .split(',')
                .map(|p| p.trim().to_string())
                .collect(),
        }
    }

    fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

/// Reads, at the window's edges, a proxy's CPU time (its process group), the workers' and the
/// whole machine's.
struct CpuProbe {
    proxy: Vec<i32>,
    workers: Vec<i32>,
    start: CpuReading,
    end: CpuReading,
}

#[derive(Clone, Copy, Default)]
struct CpuReading {
    proxy: Duration,
    workers: Duration,
    machine: CpuTimes,
}

impl CpuProbe {
    /// A probe of this proxy's process group (listed now, so the window does not scan /proc),
    /// or of no proxy, and of these workers.
    fn of(proxy_pid: Option<i32>, workers: &[i32]) -> CpuProbe {
        CpuProbe {
            proxy: proxy_pid.map(measure::process_group).unwrap_or_default(),
            workers: workers.to_vec(),
            start: CpuReading::default(),
            end: CpuReading::default(),
        }
    }

    fn read(&self) -> CpuReading {
        CpuReading {
            proxy: measure::group_cpu(&self.proxy),
            workers: measure::group_cpu(&self.workers),
            machine: measure::machine_cpu(),
        }
    }

    /// The proxy's CPU time over the window per request answered in it, µs (None without a
    /// proxy), and where the machine's went.
    fn fill(&self, measured: &mut Measured) {
        let requests = measured.requests.max(1) as f64;
        let proxy = self.end.proxy.saturating_sub(self.start.proxy);
        measured.cpu_us_per_request =
            (!self.proxy.is_empty()).then(|| proxy.as_secs_f64() * 1e6 / requests);
        measured.machine = Some(MachineShare::new(
            self.end.machine.since(&self.start.machine),
            measure::ticks_per_second(),
            self.end.workers.saturating_sub(self.start.workers),
            measured.requests,
        ));
    }
}

impl WindowProbe for CpuProbe {
    fn at_start(&mut self) {
        self.start = self.read();
    }
    fn at_end(&mut self) {
        self.end = self.read();
    }
}

/// A real session cookie, sealed with the proxy's APP_SECRET_KEY, as a `Cookie:` header value
/// (an Auth0-style session: subject, email, name, picture; the ID token lives in the logout hint).
fn session_cookie() -> String {
    let keys = SecretKeys::from_secrets(procs::APP_SECRET_KEY, &[]).expect("session keys");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let session = Session {
        sub: "auth0|5f1c2e9a7b3d4c0012345678".into(),
        email: Some("demo@example.test".into()),
        name: Some("Demo User".into()),
        picture: Some("https://s.gravatar.com/avatar/0123456789abcdef.png".into()),
        iat: now,
        exp: now + 8 * 3600,
    };
    let sealed = seal_session(&keys, &session);
    let cookies = CookieSettings { secure: false };
    let set_cookies = cookies
        .set_session_cookies(&sealed, Duration::from_secs(8 * 3600))
        .expect("session cookie");
    // Keep the cookies that are set (not the expiring ones), as a browser would send them.
    set_cookies
        .iter()
        .filter(|c| !c.contains("Max-Age=0;"))
        .filter_map(|c| c.split(';').next())
        .collect::<Vec<_>>()
        .join("; ")
}

/// One target of the throughput table.
struct Target<'a> {
    name: &'static str,
    proxy: Option<&'a Proxy>,
    /// Direct: the worker's address.
    addr: Option<std::net::SocketAddr>,
    cookie: Option<String>,
    /// Why this target cannot run (nginx missing).
    missing: Option<&'static str>,
}

fn run_once(
    addr: std::net::SocketAddr,
    proxy_pid: Option<i32>,
    workers: &[i32],
    cookie: Option<String>,
    concurrency: usize,
    knobs: &Knobs,
    marker: Option<String>,
) -> (LoadResult, Measured) {
    let spec = LoadSpec {
        addr,
        path: PATH.into(),
        cookie,
        concurrency,
        warmup: knobs.warmup,
        measure: knobs.measure,
        count_marker: marker,
    };
    let mut probe = CpuProbe::of(proxy_pid, workers);
    let result = load::run(&spec, &mut probe).unwrap_or_else(|e| panic!("load run: {e}"));
    let mut measured = Measured::from_result(&result);
    probe.fill(&mut measured);
    (result, measured)
}

/// Checks a target answers the bench request with 200 (and, for the session check, 401 without
/// the cookie), so a misconfigured target fails loudly instead of measuring error pages.
fn preflight(addr: std::net::SocketAddr, cookie: Option<&str>, expect_401_without: bool) {
    let get = |cookie: Option<&str>| -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("preflight connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n{cookie}Connection: close\r\n\r\n"
        )
        .expect("preflight write");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    let status = get(cookie);
    assert_eq!(status, 200, "{addr}{PATH} answered {status}, not 200");
    if expect_401_without {
        let status = get(None);
        assert_eq!(
            status, 401,
            "{addr}{PATH} without a session answered {status}: the session check is not on"
        );
    }
}

fn throughput(knobs: &Knobs, nginx: Option<&str>, wrk_bin: Option<&str>, report: &mut Report) {
    let w1 = Worker::start("w1", 0);
    let w2 = Worker::start("w2", 0);
    let w3 = Worker::start("w3", 0);
    let workers = [&w1, &w2, &w3];
    let worker_pids: Vec<i32> = workers.iter().map(|w| w.pid()).collect();
    let cookie = session_cookie();
    let auth_off = procs::start_custodia("custodia auth off", &workers, Balance::LeastConn, false);
    let auth_on = procs::start_custodia("custodia auth on", &workers, Balance::LeastConn, true);
    let auth_on_pingora = procs::start_custodia_with(
        "custodia auth on, pingora path",
        &workers,
        Balance::LeastConn,
        true,
        false,
    );
    let nginx_proxy = nginx.map(|bin| procs::start_nginx("nginx", bin, &workers));
    let bare_pingora = procs::start_pingora_baseline(&workers);

    preflight(w1.addr, None, false);
    preflight(bare_pingora.addr, None, false);
    preflight(auth_off.addr, None, false);
    preflight(auth_on.addr, Some(&cookie), true);
    preflight(auth_on_pingora.addr, Some(&cookie), true);
    if let Some(n) = &nginx_proxy {
        preflight(n.addr, None, false);
        preflight(n.addr, Some(&cookie), false);
    }

    let targets = [
        Target {
            name: report::DIRECT,
            proxy: None,
            addr: Some(w1.addr),
            cookie: None,
            missing: None,
        },
        Target {
            name: report::AUTH_OFF,
            proxy: Some(&auth_off),
            addr: None,
            cookie: None,
            missing: None,
        },
        Target {
            name: report::AUTH_ON,
            proxy: Some(&auth_on),
            addr: None,
            cookie: Some(cookie.clone()),
            missing: None,
        },
        Target {
            name: report::AUTH_ON_PINGORA_PATH,
            proxy: Some(&auth_on_pingora),
            addr: None,
            cookie: Some(cookie.clone()),
            missing: None,
        },
        Target {
            name: report::NGINX,
            proxy: nginx_proxy.as_ref(),
            addr: None,
            cookie: None,
            missing: nginx.is_none().then_some(NGINX_MISSING),
        },
        // What a signed-in user's browser sends nginx in the seed's stack: the same requests
        // as the session-check-on rows, cookie included.
        Target {
            name: report::NGINX_COOKIE,
            proxy: nginx_proxy.as_ref(),
            addr: None,
            cookie: Some(cookie.clone()),
            missing: nginx.is_none().then_some(NGINX_MISSING),
        },
        Target {
            name: report::PINGORA,
            proxy: Some(&bare_pingora),
            addr: None,
            cookie: None,
            missing: None,
        },
    ];

    if knobs.wants("throughput") {
        for &c in &knobs.concurrency {
            let best = best_of_rounds(&targets, c, knobs.rounds, "", |t| {
                let addr = t.addr.or(t.proxy.map(|p| p.addr)).expect("target address");
                let (_, measured) = run_once(
                    addr,
                    t.proxy.map(Proxy::pid),
                    &worker_pids,
                    t.cookie.clone(),
                    c,
                    knobs,
                    None,
                );
                measured
            });
            push_rows(&mut report.rows, &targets, c, best);
        }
    }
    if knobs.wants("wrk") {
        // The second opinion: the rows the goals are read from, driven by wrk.
        let second: Vec<Target> = targets
            .into_iter()
            .filter(|t| {
                [
                    report::AUTH_OFF,
                    report::AUTH_ON,
                    report::NGINX,
                    report::NGINX_COOKIE,
                ]
                .contains(&t.name)
            })
            .map(|t| Target {
                missing: t.missing.or(wrk_bin.is_none().then_some(wrk::WRK_MISSING)),
                ..t
            })
            .collect();
        for &c in &knobs.concurrency {
            let best = best_of_rounds(&second, c, knobs.rounds, "wrk ", |t| {
                let proxy = t.proxy.expect("a proxy");
                let spec = wrk::WrkSpec {
                    addr: proxy.addr,
                    path: PATH,
                    cookie: t.cookie.as_deref(),
                    concurrency: c,
                    warmup: knobs.warmup,
                    measure: knobs.measure,
                };
                let mut probe = CpuProbe::of(Some(proxy.pid()), &worker_pids);
                let bin = wrk_bin.expect("wrk, checked above");
                let run = wrk::run(bin, &spec, &mut probe).unwrap_or_else(|e| panic!("wrk: {e}"));
                let mut measured = wrk::measured(&run);
                probe.fill(&mut measured);
                measured
            });
            push_rows(&mut report.wrk_rows, &second, c, best);
        }
    }
}

/// Runs every target that can run, `rounds` times in a rotated order (so no target always runs
/// first, or last), and keeps each one's best round: by throughput, but a clean round beats
/// one with errors.
fn best_of_rounds(
    targets: &[Target],
    c: usize,
    rounds: usize,
    generator: &str,
    mut run: impl FnMut(&Target) -> Measured,
) -> Vec<Option<Measured>> {
    let mut best: Vec<Option<Measured>> = vec![None; targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            if t.missing.is_some() {
                continue;
            }
            let measured = run(t);
            eprintln!(
                "  {generator}c={c:<4} round {} {:<18} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  cpu {}  errors {} non-2xx {}",
                round + 1,
                t.name,
                measured.rps,
                measured.p50_ms,
                measured.p99_ms,
                measured
                    .cpu_us_per_request
                    .map(|v| format!("{v:.1} µs/req"))
                    .unwrap_or_else(|| "-".into()),
                measured.errors,
                measured.non_2xx
            );
            let clean = |m: &Measured| m.errors == 0 && m.non_2xx == 0;
            if best[i]
                .as_ref()
                .is_none_or(|b| (clean(&measured), measured.rps) > (clean(b), b.rps))
            {
                best[i] = Some(measured);
            }
        }
    }
    best
}

fn push_rows(rows: &mut Vec<Row>, targets: &[Target], c: usize, best: Vec<Option<Measured>>) {
    for (t, m) in targets.iter().zip(best) {
        rows.push(Row {
            target: t.name,
            concurrency: c,
            measured: m,
            note: t.missing.map(str::to_string),
        });
    }
}

fn slow_worker(knobs: &Knobs, nginx: Option<&str>, report: &mut Report) {
    let w1 = Worker::start("w1", 0);
    let w2 = Worker::start("w2", 0);
    let slow = Worker::start("slow", 20);
    let workers = [&w1, &w2, &slow];
    let worker_pids: Vec<i32> = workers.iter().map(|w| w.pid()).collect();
    let least = procs::start_custodia("custodia least_conn", &workers, Balance::LeastConn, false);
    let least_time =
        procs::start_custodia("custodia least_time", &workers, Balance::LeastTime, false);
    let rr = procs::start_custodia("custodia round_robin", &workers, Balance::RoundRobin, false);
    let nginx_proxy = nginx.map(|bin| procs::start_nginx("nginx least_conn", bin, &workers));
    let marker = format!("\"worker\":\"{}\"", slow.id);
    let concurrency = 32;
    let mut runs: Vec<(&'static str, Option<&Proxy>)> = vec![
        (report::SLOW_LEAST, Some(&least)),
        (report::SLOW_LEAST_TIME, Some(&least_time)),
        (report::SLOW_RR, Some(&rr)),
    ];
    runs.push((report::SLOW_NGINX, nginx_proxy.as_ref()));
    for (name, proxy) in runs {
        let Some(proxy) = proxy else {
            report.slow.push(SlowRow {
                target: name,
                concurrency,
                measured: None,
                slow_share: None,
                note: Some(NGINX_MISSING.into()),
            });
            continue;
        };
        let (result, measured) = run_once(
            proxy.addr,
            Some(proxy.pid()),
            &worker_pids,
            None,
            concurrency,
            knobs,
            Some(marker.clone()),
        );
        let share = result.marked as f64 / result.requests.max(1) as f64;
        eprintln!(
            "  slow worker {name:<22} {:>8.0} req/s  p99 {:>7.3} ms  to slow {:.1}%  errors {}",
            measured.rps,
            measured.p99_ms,
            share * 100.0,
            measured.errors
        );
        report.slow.push(SlowRow {
            target: name,
            concurrency,
            measured: Some(measured),
            slow_share: Some(share),
            note: None,
        });
    }
}

fn memory(knobs: &Knobs, nginx: Option<&str>, report: &mut Report) {
    let w1 = Worker::start("w1", 0);
    let w2 = Worker::start("w2", 0);
    let w3 = Worker::start("w3", 0);
    let workers = [&w1, &w2, &w3];
    let mut proxies: Vec<(&'static str, Option<Proxy>)> = vec![(
        report::AUTH_OFF,
        Some(procs::start_custodia(
            "custodia",
            &workers,
            Balance::LeastConn,
            false,
        )),
    )];
    proxies.push((
        report::NGINX,
        nginx.map(|bin| procs::start_nginx("nginx", bin, &workers)),
    ));
    for (name, proxy) in proxies {
        let Some(proxy) = proxy else {
            report.memory.push(MemoryRow {
                target: name,
                wanted: knobs.idle_connections,
                held: 0,
                rss_before: 0,
                rss_held: 0,
                note: Some(NGINX_MISSING.into()),
            });
            continue;
        };
        // Warm the proxy (threads, upstream pool) before the baseline.
        let _ = load::hold_idle_connections(proxy.addr, PATH, 64, 64, &mut |_| {});
        std::thread::sleep(Duration::from_millis(300));
        let rss_before = measure::group_rss(proxy.pid());
        let mut rss_held = 0;
        let held =
            load::hold_idle_connections(proxy.addr, PATH, knobs.idle_connections, 250, &mut |_| {
                // Idle: Custodia parks a keep-alive client after 1 s idle
                // (proxy/src/limits/parking.rs); the last ones opened are idle for 2 s.
                std::thread::sleep(Duration::from_secs(2));
                rss_held = measure::group_rss(proxy.pid());
            })
            .unwrap_or_else(|e| panic!("idle connections: {e}"));
        eprintln!(
            "  memory {name:<18} {held} idle connections: RSS {:.1} MB -> {:.1} MB",
            rss_before as f64 / 1e6,
            rss_held as f64 / 1e6
        );
        report.memory.push(MemoryRow {
            target: name,
            wanted: knobs.idle_connections,
            held,
            rss_before,
            rss_held,
            note: None,
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == pingora_baseline::ROLE_ARG) {
        let addrs: Vec<std::net::SocketAddr> = args[at + 1..]
            .iter()
            .map(|a| a.parse().expect("pingora baseline: socket address"))
            .collect();
        pingora_baseline::run(addrs[0], &addrs[1..]);
    }
    // `cargo test --benches` runs this binary without `--bench`: the suite is run by hand.
    if !std::env::args().any(|a| a == "--bench") {
        println!("end_to_end: run it with `cargo bench --bench end_to_end` (see BENCHMARKS.md)");
        return;
    }
    let knobs = Knobs::from_env();
    let nofile = measure::raise_nofile_limit();
    let nginx = procs::nginx_bin();
    let mut report = Report::new(measure::machine_info(nginx), &knobs.concurrency);
    report.settings = format!(
        "{} s measured after {} s warm-up, best of {} interleaved round(s) by throughput; \
         load generator: 1 tokio thread, one hyper HTTP/1.1 keep-alive connection per concurrent \
         client, GET {PATH}; proxies: 2 threads / 2 worker processes, access logs off; \
         3 workers (`custodia app`, 2 threads each); open-file limit {nofile}",
        knobs.measure.as_secs_f64(),
        knobs.warmup.as_secs_f64(),
        knobs.rounds
    );
    if knobs.wants("throughput") || knobs.wants("wrk") {
        eprintln!("throughput (concurrency {:?})", knobs.concurrency);
        throughput(&knobs, nginx, wrk::wrk_bin(), &mut report);
    }
    if knobs.wants("slow") {
        eprintln!("slow worker (one of three answers 20 ms later), concurrency 32");
        slow_worker(&knobs, nginx, &mut report);
    }
    if knobs.wants("memory") {
        eprintln!(
            "memory ({} idle keep-alive clients)",
            knobs.idle_connections
        );
        memory(&knobs, nginx, &mut report);
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target_dir.join("custodia-bench");
    let markdown = report.markdown();
    println!("{markdown}");
    std::fs::create_dir_all(&dir).expect("report dir");
    std::fs::write(dir.join("report.md"), &markdown).expect("write report.md");
    if let Err(e) = report.plot(&dir.join("throughput.svg")) {
        eprintln!("plot: {e}");
    }
    println!("written: {}/report.md and throughput.svg", dir.display());
}
