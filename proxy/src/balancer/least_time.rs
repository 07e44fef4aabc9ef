//! Least time: the healthy backend where a new request should be answered soonest — its recent
//! response time times the requests it already holds plus this one, relative to weight
//! (nginx Plus's `least_time`; the cost linkerd and Finagle balance on).
//!
//! Least connections alone cannot see a slow worker while the proxy itself is the bottleneck:
//! every backend's in-flight count then includes the time requests wait inside the proxy, so the
//! slow one's count looks no worse than the others'. Its response time does.

use super::Member;

/// Scans from a random start. A backend not yet observed is costed at the lowest estimate
/// among the others, so it is tried at once; with no estimate at all this is least_conn.
/// Exact ties go to the fewest weight-normalised picks, as in least_conn.
pub(super) fn pick(
    members: &[Member],
    mut eligible: impl FnMut(&Member) -> bool,
    now: u64,
) -> Option<&Member> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = if n == 1 { 0 } else { fastrand::usize(..n) };
    // One pass, one estimate read per backend: the best timed backend, the quickest time
    // seen, and the best untimed backend by load alone (its cost needs that quickest time).
    let mut timed: Option<Candidate> = None;
    let mut untimed: Option<Candidate> = None;
    let mut quickest = f64::INFINITY;
    for i in 0..n {
        let member = &members[(start + i) % n];
        let slot = &member.slot;
        if !eligible(member) {
            continue;
        }
        let load = (slot.in_flight() as f64 + 1.0) / f64::from(member.weight.max(1));
        let picks = slot.virtual_picks();
        match slot.latency().at(now) {
            Some(latency) => {
                quickest = quickest.min(latency);
                Candidate::keep_better(&mut timed, member, cost(latency, load), picks);
            }
            None => Candidate::keep_better(&mut untimed, member, load, picks),
        }
    }
    // Nothing timed (or all decayed to zero): costs fall back to in-flight counts.
    let quickest = if quickest.is_finite() { quickest } else { 1.0 };
    if let Some(u) = untimed.as_mut() {
        u.cost = cost(quickest, u.cost);
    }
    let best = match (timed, untimed) {
        (Some(t), Some(u)) => {
            if u.beats(&t) {
                u
            } else {
                t
            }
        }
        (t, u) => t.or(u)?,
    };
    Some(best.member)
}

/// Expected wait: the response time (at least 1 ns, so that in-flight counts still matter
/// for estimates decayed to nothing) times the weighted requests in line.
fn cost(latency: f64, load: f64) -> f64 {
    latency.max(1.0) * load
}

struct Candidate<'a> {
    member: &'a Member,
    cost: f64,
    picks: u64,
}

impl<'a> Candidate<'a> {
    fn beats(&self, other: &Candidate) -> bool {
        self.cost < other.cost || (self.cost == other.cost && self.picks < other.picks)
    }

    fn keep_better(best: &mut Option<Candidate<'a>>, member: &'a Member, cost: f64, picks: u64) {
        let candidate = Candidate {
            member,
            cost,
            picks,
        };
        if best.as_ref().is_none_or(|b| candidate.beats(b)) {
            *best = Some(candidate);
        }
    }
}
