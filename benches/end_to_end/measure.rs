//! What the kernel says about the proxies: CPU time (utime + stime, all threads) and resident
//! memory, from /proc. A "process group" here is a proxy's main process plus its direct children
//! (nginx's master + workers; Custodia is one process).

use std::time::Duration;

use crate::machine_cpu::CpuTimes;

/// Clock ticks per second for /proc/PID/stat and /proc/stat times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime of one process (all its threads), or None once it is gone.
fn process_cpu(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may itself contain spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_second(),
    ))
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and its direct children.
pub fn process_group(pid: i32) -> Vec<i32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                if parent_of(child) == Some(pid) {
                    pids.push(child);
                }
            }
        }
    }
    pids
}

/// Total CPU time of these processes (a [`process_group`], listed once before a run so that
/// reading it does not scan /proc inside the measured window).
pub fn group_cpu(pids: &[i32]) -> Duration {
    pids.iter().copied().filter_map(process_cpu).sum()
}

/// The whole machine's CPU time so far (all cores). A machine without a readable /proc/stat
/// cannot be measured here: the run stops and says why.
pub fn machine_cpu() -> CpuTimes {
    let stat = std::fs::read_to_string("/proc/stat")
        .unwrap_or_else(|e| panic!("cannot read /proc/stat: {e}"));
    CpuTimes::parse(&stat).unwrap_or_else(|e| panic!("{e}"))
}

/// VmRSS of one process, bytes.
fn process_rss(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Summed VmRSS of `pid` and its direct children, bytes.
pub fn group_rss(pid: i32) -> u64 {
    process_group(pid).into_iter().filter_map(process_rss).sum()
}

/// Raise this process's open-file limit to the hard limit (children inherit it); the new soft
/// limit.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// The machine, for the report: cores, CPU model, kernel, nginx version.
pub fn machine_info(nginx: Option<&str>) -> Vec<(String, String)> {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let nginx_version = match nginx {
        Some(bin) => std::process::Command::new(bin)
            .arg("-v")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_else(|| "unknown".into()),
        None => "not installed".into(),
    };
    vec![
        ("cores (nproc)".into(), cores),
        ("CPU".into(), cpu_model),
        ("kernel".into(), kernel),
        ("nginx".into(), nginx_version),
    ]
}
