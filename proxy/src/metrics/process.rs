//! `process_*`: the proxy process's CPU, memory, threads and file descriptors, from `/proc`.
//!
//! The `prometheus` crate's collector reports `process_cpu_seconds_total` in whole seconds, so a
//! `rate()` over a short window read 0 or 1 s; here it has the kernel's tick resolution. The
//! names, types and help are the Prometheus client libraries' usual ones.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{MetricFamily, MetricType};

use super::sharded::family;

/// The process figures, read at each scrape.
pub struct ProcessCollector {
    cpu: Desc,
    open_fds: Desc,
    max_fds: Desc,
    virtual_memory: Desc,
    resident_memory: Desc,
    start_time: Desc,
    threads: Desc,
}

impl ProcessCollector {
    pub fn new() -> ProcessCollector {
        ProcessCollector {
            cpu: family::desc(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                &[],
            ),
            open_fds: family::desc("process_open_fds", "Number of open file descriptors.", &[]),
            max_fds: family::desc(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                &[],
            ),
            virtual_memory: family::desc(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                &[],
            ),
            resident_memory: family::desc(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                &[],
            ),
            start_time: family::desc(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                &[],
            ),
            threads: family::desc(
                "process_threads",
                "Number of OS threads in the process.",
                &[],
            ),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector::new()
    }
}

/// The figures of `/proc/self/stat` a scrape reports.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    cpu_ticks: u64,
    threads: u64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// `/proc/PID/stat`: the fields after the command name, which is in parentheses and may hold
/// spaces or parentheses itself (proc(5): utime 14, stime 15, num_threads 20, starttime 22,
/// vsize 23, rss 24).
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time (`btime` of `/proc/stat`), unix seconds.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf(3) only reads a system setting.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the limit into `limit`, which outlives the call.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (read == 0).then_some(limit.rlim_cur)
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![
            &self.cpu,
            &self.open_fds,
            &self.max_fds,
            &self.virtual_memory,
            &self.resident_memory,
            &self.start_time,
            &self.threads,
        ]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = Vec::new();
        let gauge = |desc: &Desc, value: f64| {
            family::of(desc, MetricType::GAUGE, vec![family::gauge(&[], value)])
        };
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat(&text));
        if let (Some(stat), Some(ticks), Some(page)) = (
            stat,
            sysconf(libc::_SC_CLK_TCK),
            sysconf(libc::_SC_PAGESIZE),
        ) {
            let mut cpu = prometheus::proto::Counter::default();
            cpu.set_value(stat.cpu_ticks as f64 / ticks as f64);
            let mut metric = prometheus::proto::Metric::default();
            metric.set_counter(cpu);
            families.push(family::of(&self.cpu, MetricType::COUNTER, vec![metric]));
            families.push(gauge(&self.virtual_memory, stat.virtual_bytes as f64));
            families.push(gauge(
                &self.resident_memory,
                (stat.resident_pages * page) as f64,
            ));
            families.push(gauge(&self.threads, stat.threads as f64));
            let booted = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|text| boot_time(&text));
            if let Some(booted) = booted {
                let started = booted as f64 + stat.start_ticks as f64 / ticks as f64;
                families.push(gauge(&self.start_time, started));
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            families.push(gauge(&self.open_fds, entries.count() as f64));
        }
        if let Some(max) = max_fds() {
            families.push(gauge(&self.max_fds, max as f64));
        }
        families
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_line_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (custodia (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 75 0 0 20 0 7 0 123456 987654321 2048 18446744073709551615 1 1 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                cpu_ticks: 225,
                threads: 7,
                start_ticks: 123456,
                virtual_bytes: 987654321,
                resident_pages: 2048,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    /// CPU time is reported at the kernel's tick, not in whole seconds (the `prometheus`
    /// crate's collector read 0 or 1 s): sampled while this thread works, the figure moves and
    /// is not always a whole number.
    #[test]
    fn cpu_seconds_have_sub_second_resolution() {
        let cpu = || -> f64 {
            ProcessCollector::new()
                .collect()
                .iter()
                .find(|f| f.name() == "process_cpu_seconds_total")
                .map(|f| f.get_metric()[0].get_counter().get_value())
                .unwrap()
        };
        let thread_cpu = || {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime(2) writes into `now`, which outlives the call.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
            std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
        };
        let first = cpu();
        let mut samples = Vec::new();
        let wall = std::time::Instant::now();
        for round in 1..=10u32 {
            // 20 ms of this thread's own CPU per sample, however busy the machine (bounded).
            let until = thread_cpu() + std::time::Duration::from_millis(20);
            let mut x = u64::from(round);
            while thread_cpu() < until && wall.elapsed() < std::time::Duration::from_secs(30) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            samples.push(cpu());
        }
        assert!(
            samples.last().unwrap() - first >= 0.15,
            "200 ms of CPU show: {first} → {samples:?}"
        );
        assert!(
            samples.iter().any(|s| s.fract() != 0.0),
            "not whole seconds only: {samples:?}"
        );
        let names: Vec<String> = ProcessCollector::new()
            .collect()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        for name in [
            "process_open_fds",
            "process_max_fds",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_threads",
        ] {
            assert!(names.iter().any(|n| n == name), "{name}: {names:?}");
        }
    }
}
