//! The second opinion: Debian's `wrk` (C, epoll, one thread), driving the same proxies at the
//! same keep-alive concurrency as our load generator. The two generators cost the machine
//! differently per request (wrk less), and on two shared cores that changes how much is left for
//! the proxy and the workers, so the report shows both.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::load::WindowProbe;
use crate::report::Measured;
use crate::wrk_report::{parse, WrkRun};

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

/// A warm-up run (not counted), then the measured run with `probe` read around it.
pub fn run(bin: &str, spec: &WrkSpec, probe: &mut dyn WindowProbe) -> Result<WrkRun, String> {
    if !spec.warmup.is_zero() {
        wrk(bin, spec, spec.warmup)?;
    }
    probe.at_start();
    let output = wrk(bin, spec, spec.measure);
    probe.at_end();
    parse(&output?)
}

/// One measured wrk run as a row of the report; the CPU figures are the probe's to fill in.
pub fn measured(run: &WrkRun) -> Measured {
    Measured {
        rps: run.requests as f64 / run.seconds.max(1e-9),
        p50_ms: run.p50_ms,
        p99_ms: run.p99_ms,
        cpu_us_per_request: None,
        requests: run.requests,
        errors: run.errors,
        non_2xx: run.non_2xx,
        machine: None,
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
