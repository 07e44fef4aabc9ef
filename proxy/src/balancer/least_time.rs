//! Least time: the healthy backend where a new request should be answered soonest — its recent
//! response time times the requests it already holds plus this one, relative to weight
//! (nginx Plus's `least_time`; the cost linkerd and Finagle balance on).
//!
//! Least connections alone cannot see a slow worker while the proxy itself is the bottleneck:
//! every backend's in-flight count then includes the time requests wait inside the proxy, so the
//! slow one's count looks no worse than the others'. Its response time does.

use std::net::SocketAddr;

use super::Member;

/// Scans from a random start. A backend not yet observed is costed at the lowest estimate
/// among the others, so it is tried at once; with no estimate at all this is least_conn.
/// Exact ties go to the fewest weight-normalised picks, as in least_conn.
pub(super) fn pick<'a>(
    members: &'a [Member],
    exclude: &[SocketAddr],
    healthy_only: bool,
    now: u64,
) -> Option<&'a Member> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let eligible =
        |m: &Member| (!healthy_only || m.slot.is_healthy()) && !exclude.contains(&m.slot.addr);
    let unknown = members
        .iter()
        .filter(|m| eligible(m))
        .filter_map(|m| m.slot.latency().at(now))
        .fold(f64::INFINITY, f64::min);
    // Everything unknown (or decayed to zero): costs fall back to in-flight counts.
    let unknown = if unknown.is_finite() { unknown } else { 1.0 };
    let start = if n == 1 { 0 } else { fastrand::usize(..n) };
    let mut best: Option<(&Member, f64, u64)> = None;
    for i in 0..n {
        let member = &members[(start + i) % n];
        if !eligible(member) {
            continue;
        }
        let slot = &member.slot;
        // A floor of 1 ns keeps in-flight counts meaningful for estimates decayed to nothing.
        let latency = slot.latency().at(now).unwrap_or(unknown).max(1.0);
        let cost = latency * (slot.in_flight() as f64 + 1.0) / f64::from(member.weight.max(1));
        let picks = slot.virtual_picks();
        let better = match best {
            None => true,
            Some((_, best_cost, best_picks)) => {
                cost < best_cost || (cost == best_cost && picks < best_picks)
            }
        };
        if better {
            best = Some((member, cost, picks));
        }
    }
    best.map(|(m, _, _)| m)
}
