//! The second opinion: Debian's `wrk` (C, epoll, one thread), driving the same proxies at the
//! same keep-alive concurrency as our load generator. The two generators cost the machine
//! differently per request (wrk less), and on two shared cores that changes how much is left for
//! the proxy and the workers, so the report shows both.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::load::WindowProbe;
use crate::report::Measured;

/// Why the wrk rows are empty when wrk is not installed.
pub const WRK_MISSING: &str = "wrk not installed — apt-get install wrk";

/// The wrk binary, if installed.
pub fn wrk_bin() -> Option<&'static str> {
    ["/usr/bin/wrk", "/usr/local/bin/wrk"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// One wrk run's shape: `GET path` over `concurrency` keep-alive connections, one thread.
pub struct WrkSpec<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    pub cookie: Option<&'a str>,
    pub concurrency: usize,
    pub warmup: Duration,
    pub measure: Duration,
}

/// A warm-up run (not counted), then the measured run with `probe` read around it. The CPU
/// figure is `probe`'s reading over the requests wrk counted; the caller divides.
pub fn run(bin: &str, spec: &WrkSpec, probe: &mut dyn WindowProbe) -> Result<WrkRun, String> {
    if !spec.warmup.is_zero() {
        wrk(bin, spec, spec.warmup)?;
    }
    probe.at_start();
    let output = wrk(bin, spec, spec.measure);
    probe.at_end();
    parse(&output?)
}

/// What one measured wrk run said.
#[derive(Debug, PartialEq)]
pub struct WrkRun {
    pub requests: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout).
    pub errors: u64,
    pub non_2xx: u64,
}

impl WrkRun {
    pub fn measured(&self, cpu_us_per_request: Option<f64>) -> Measured {
        Measured {
            rps: self.requests as f64 / self.seconds.max(1e-9),
            p50_ms: self.p50_ms,
            p99_ms: self.p99_ms,
            cpu_us_per_request,
            requests: self.requests,
            errors: self.errors,
            non_2xx: self.non_2xx,
        }
    }
}

fn wrk(bin: &str, spec: &WrkSpec, duration: Duration) -> Result<String, String> {
    let mut command = Command::new(bin);
    command
        .arg("-t1")
        .arg(format!("-c{}", spec.concurrency))
        .arg(format!("-d{}s", duration.as_secs_f64().ceil().max(1.0)))
        .arg("--latency")
        .args(["--timeout", "10s"]);
    if let Some(cookie) = spec.cookie {
        command.arg("-H").arg(format!("Cookie: {cookie}"));
    }
    let output = command
        .arg(format!("http://{}{}", spec.addr, spec.path))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{bin} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Reads wrk 4's report (`--latency`).
fn parse(text: &str) -> Result<WrkRun, String> {
    let mut requests = None;
    let mut seconds = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = 0;
    let mut non_2xx = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "205123 requests in 5.00s, 45.03MB read"
            [n, "requests", "in", took, ..] => {
                requests = n.parse().ok();
                seconds = duration_ms(took.trim_end_matches(',')).map(|ms| ms / 1000.0);
            }
            ["50%", value] => p50 = duration_ms(value),
            ["99%", value] => p99 = duration_ms(value),
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", rest @ ..] => {
                errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            // "Non-2xx or 3xx responses: 12"
            ["Non-2xx", "or", "3xx", "responses:", n] => non_2xx = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    let missing = |what: &str| format!("wrk's report has no {what}:\n{text}");
    Ok(WrkRun {
        requests: requests.ok_or_else(|| missing("request count"))?,
        seconds: seconds.ok_or_else(|| missing("duration"))?,
        p50_ms: p50.ok_or_else(|| missing("50% latency"))?,
        p99_ms: p99.ok_or_else(|| missing("99% latency"))?,
        errors,
        non_2xx,
    })
}

/// "711.00us", "1.06ms", "5.00s", "1.02m" in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(number * factor)
}
