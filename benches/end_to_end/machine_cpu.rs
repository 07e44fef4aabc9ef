//! Where the machine's CPU went during a measured window. The proxy, the workers and the load
//! generator share the same few cores, so a proxy's throughput is bounded by what the others
//! leave it: the report breaks each request's cost down (the whole machine from /proc/stat's
//! `cpu` line, the proxy and the workers from /proc/PID/stat, the rest being the load generator
//! and anything else running) and says what proxy CPU per request a throughput goal needs.
//! Pure arithmetic over what the caller read; tested from tests/bench_machine_cpu.rs.

use std::time::Duration;

/// Cumulative CPU time of all cores, in clock ticks, as /proc/stat's `cpu` line counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq (guest time is counted inside user).
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Ticks the hypervisor gave this machine's cores to someone else.
    pub steal: u64,
}

impl CpuTimes {
    /// The `cpu` line of /proc/stat (all cores): `cpu user nice system idle [iowait irq softirq
    /// steal guest guest_nice]`. The first four fields are required; older kernels omit the rest.
    pub fn parse(proc_stat: &str) -> Result<CpuTimes, String> {
        let line = proc_stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))
            .ok_or("no `cpu` line in /proc/stat")?;
        let fields = line
            .split_whitespace()
            .skip(1)
            .map(|f| {
                f.parse::<u64>()
                    .map_err(|_| format!("/proc/stat: `{f}` is not a tick count in `{line}`"))
            })
            .collect::<Result<Vec<u64>, String>>()?;
        if fields.len() < 4 {
            return Err(format!("/proc/stat: too few fields in `{line}`"));
        }
        let sum = |indices: &[usize]| {
            indices.iter().fold(0u64, |total, &i| {
                total.saturating_add(fields.get(i).copied().unwrap_or(0))
            })
        };
        Ok(CpuTimes {
            busy: sum(&[0, 1, 2, 5, 6]),
            idle: sum(&[3, 4]),
            steal: sum(&[7]),
        })
    }

    /// The ticks between `earlier` and this reading.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            busy: self.busy.saturating_sub(earlier.busy),
            idle: self.idle.saturating_sub(earlier.idle),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    fn total(&self) -> u64 {
        self.busy
            .saturating_add(self.idle)
            .saturating_add(self.steal)
    }

    fn share(&self, part: u64) -> f64 {
        part as f64 / self.total().max(1) as f64
    }
}

/// Above this share of idle core time, a window's rate was set by each request's round trip
/// (concurrency 1 leaves the two cores about half idle), not by what the cores could do; CPU-bound
/// windows here are 0–11% idle.
pub const MAX_IDLE_WHEN_CPU_BOUND: f64 = 0.25;

/// One window's machine-wide figures, per request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MachineShare {
    /// Busy CPU time of all cores per request, µs.
    pub busy_us: f64,
    /// The workers' CPU time per request, µs.
    pub workers_us: f64,
    /// Shares of the window's core time that were idle, and stolen by the hypervisor.
    pub idle_share: f64,
    pub steal_share: f64,
}

impl MachineShare {
    /// From the ticks counted over a window (`delta`), the workers' CPU time over it, and the
    /// requests answered in it.
    pub fn new(
        delta: CpuTimes,
        ticks_per_second: f64,
        workers: Duration,
        requests: u64,
    ) -> MachineShare {
        let per_request = |seconds: f64| seconds * 1e6 / requests.max(1) as f64;
        MachineShare {
            busy_us: per_request(delta.busy as f64 / ticks_per_second),
            workers_us: per_request(workers.as_secs_f64()),
            idle_share: delta.share(delta.idle),
            steal_share: delta.share(delta.steal),
        }
    }

    /// Whether the cores were kept busy: only then does CPU per request bound the rate, and a
    /// CPU budget for a higher rate mean anything.
    pub fn cpu_bound(&self) -> bool {
        self.idle_share <= MAX_IDLE_WHEN_CPU_BOUND
    }

    /// Everything busy that was neither the proxy nor the workers: the load generator, and
    /// anything else the machine ran.
    pub fn rest_us(&self, proxy_us: f64) -> f64 {
        (self.busy_us - proxy_us - self.workers_us).max(0.0)
    }

    /// Everything busy but the proxy: the workers and the rest.
    pub fn others_us(&self, proxy_us: f64) -> f64 {
        self.workers_us + self.rest_us(proxy_us)
    }

    /// The proxy CPU per request at which the machine, serving `rps` in this window, would serve
    /// `target_rps` instead: the cores as busy as they were, and the workers and the rest
    /// costing per request what they cost. Negative when they alone would take more than that.
    pub fn proxy_budget_us(&self, rps: f64, proxy_us: f64, target_rps: f64) -> f64 {
        self.busy_us * rps / target_rps.max(1e-9) - self.others_us(proxy_us)
    }
}
