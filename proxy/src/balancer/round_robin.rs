//! Weighted round robin (offered for comparisons; least_conn is the default).

use super::Member;

/// An interleaved sequence of member indexes in which each appears `weight` times
/// (weights reduced by their gcd), e.g. weights [1, 2] → [1, 0, 1].
pub(super) fn weighted_order(members: &[Member]) -> Box<[usize]> {
    let gcd = members.iter().map(|m| m.weight).fold(0, gcd);
    let weights: Vec<u64> = members
        .iter()
        .map(|m| u64::from(m.weight / gcd.max(1)))
        .collect();
    let total: u64 = weights.iter().sum();
    // Smooth weighted round robin (as nginx does it), computed once per pool.
    let mut current = vec![0i64; members.len()];
    let mut order = Vec::with_capacity(total.min(1 << 16) as usize);
    for _ in 0..total.min(1 << 16) {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        order.push(best);
    }
    order.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The next member in the sequence from `start` that `eligible` lets through.
pub(super) fn pick<'a>(
    members: &'a [Member],
    order: &[usize],
    start: usize,
    mut eligible: impl FnMut(&Member) -> bool,
) -> Option<&'a Member> {
    let n = order.len();
    (0..n)
        .map(|i| &members[order[(start + i) % n]])
        .find(|m| eligible(m))
}
