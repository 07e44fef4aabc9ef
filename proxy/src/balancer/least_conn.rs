//! Least connections: the healthy backend with the fewest in-flight requests per unit of weight.

use super::Member;

/// Scans from a random start; exact ties in load go to the backend with the fewest
/// weight-normalised picks, so equal loads are shared by weight and not by list position.
/// Only members `eligible` lets through are considered; it is asked once per member.
pub(super) fn pick(
    members: &[Member],
    mut eligible: impl FnMut(&Member) -> bool,
) -> Option<&Member> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = if n == 1 { 0 } else { fastrand::usize(..n) };
    let mut best: Option<(&Member, u64, u64)> = None;
    for i in 0..n {
        let member = &members[(start + i) % n];
        let slot = &member.slot;
        if !eligible(member) {
            continue;
        }
        let load = slot.in_flight() as u64;
        let picks = slot.virtual_picks();
        let better = match best {
            None => true,
            Some((b, b_load, b_picks)) => {
                let (w, bw) = (u64::from(member.weight), u64::from(b.weight));
                // load / w < b_load / bw, without division.
                let lhs = load * bw;
                let rhs = b_load * w;
                lhs < rhs || (lhs == rhs && picks < b_picks)
            }
        };
        if better {
            best = Some((member, load, picks));
        }
    }
    best.map(|(m, _, _)| m)
}
