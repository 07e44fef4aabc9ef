//! The end-to-end bench's machine-wide CPU breakdown (`benches/end_to_end/machine_cpu.rs`),
//! tested here because the bench binary has no test harness.

#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "../benches/end_to_end/machine_cpu.rs"]
mod machine_cpu;

use std::time::Duration;

use machine_cpu::{CpuTimes, MachineShare};

const PROC_STAT: &str = "cpu  1919967 656 268592 1029381 22100 0 88834 4813 0 0\n\
    cpu0 902136 357 130358 581617 5927 0 44178 2407 0 0\n\
    cpu1 1017830 298 138234 447764 16173 0 44656 2406 0 0\n\
    intr 123 0 0\nctxt 456\n";

#[test]
fn reads_the_all_cores_line_not_a_single_core() {
    let times = CpuTimes::parse(PROC_STAT).unwrap();
    assert_eq!(
        times,
        CpuTimes {
            busy: 1919967 + 656 + 268592 + 88834,
            idle: 1029381 + 22100,
            steal: 4813,
        }
    );
}

#[test]
fn an_old_kernel_line_with_four_fields_has_no_iowait_or_steal() {
    let times = CpuTimes::parse("cpu 10 20 30 40\n").unwrap();
    assert_eq!(
        times,
        CpuTimes {
            busy: 60,
            idle: 40,
            steal: 0
        }
    );
}

#[test]
fn a_malformed_or_missing_line_is_an_error_not_zero() {
    assert!(CpuTimes::parse("cpu0 1 2 3 4\n").is_err());
    assert!(CpuTimes::parse("").is_err());
    assert!(CpuTimes::parse("cpu 1 2 3\n").is_err());
    let bad = CpuTimes::parse("cpu 1 2 x 4\n").unwrap_err();
    assert!(bad.contains("`x`"), "{bad}");
}

#[test]
fn a_window_is_the_difference_of_two_readings() {
    let start = CpuTimes::parse("cpu 100 0 50 1000 0 0 10 5\n").unwrap();
    let end = CpuTimes::parse("cpu 250 0 80 1040 0 0 20 15\n").unwrap();
    assert_eq!(
        end.since(&start),
        CpuTimes {
            busy: 150 + 30 + 10,
            idle: 40,
            steal: 10
        }
    );
    // A counter that went backwards (a reading from another boot) gives nothing, not a wrap.
    assert_eq!(start.since(&end).busy, 0);
}

/// A window of one second on two cores at 100 ticks a second: 180 busy, 20 idle, nothing
/// stolen, 60,000 requests, the workers 0.6 s of CPU.
fn window() -> MachineShare {
    let delta = CpuTimes {
        busy: 180,
        idle: 20,
        steal: 0,
    };
    MachineShare::new(delta, 100.0, Duration::from_millis(600), 60_000)
}

#[test]
fn per_request_figures_divide_the_window_by_the_requests() {
    let share = window();
    assert!((share.busy_us - 30.0).abs() < 1e-9, "{share:?}");
    assert!((share.workers_us - 10.0).abs() < 1e-9, "{share:?}");
    assert!((share.idle_share - 0.1).abs() < 1e-9, "{share:?}");
    assert_eq!(share.steal_share, 0.0);
    // The proxy took 12 µs: the load generator and the rest took the other 8.
    assert!((share.rest_us(12.0) - 8.0).abs() < 1e-9);
    assert!((share.others_us(12.0) - 18.0).abs() < 1e-9);
    // Never negative, even when the proxy's reading and the machine's disagree.
    assert_eq!(share.rest_us(40.0), 0.0);
}

#[test]
fn the_proxy_budget_is_what_the_cores_leave_at_the_target_rate() {
    let share = window();
    let served = 60_000.0;
    // The rate served: the proxy may keep its 12 µs.
    assert!((share.proxy_budget_us(served, 12.0, 60_000.0) - 12.0).abs() < 1e-9);
    // 72,000 req/s: 2 cores × 90% busy = 25 µs a request, of which the workers and the rest
    // take 18: 7 µs left for the proxy.
    assert!((share.proxy_budget_us(served, 12.0, 72_000.0) - 7.0).abs() < 1e-9);
    // 120,000 req/s: 15 µs a request, less than the workers and the rest alone.
    assert!(share.proxy_budget_us(served, 12.0, 120_000.0) < 0.0);
}

#[test]
fn only_a_window_with_busy_cores_is_cpu_bound() {
    // 10% idle, as at concurrency 32: the rate is what the cores could do.
    assert!(window().cpu_bound());
    // 55% idle, as at concurrency 1: the rate is the round trip's, whatever the CPU costs.
    let half_idle = CpuTimes {
        busy: 90,
        idle: 110,
        steal: 0,
    };
    let share = MachineShare::new(half_idle, 100.0, Duration::from_millis(300), 10_000);
    assert!(!share.cpu_bound(), "{share:?}");
}
