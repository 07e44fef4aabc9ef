//! A backend's recent response time for `least_time`: a peak-sensitive moving average
//! ("peak EWMA", as Finagle and linkerd balance), kept in two atomics so the request path never
//! takes a lock.
//!
//! - A response slower than the estimate replaces it at once: a worker that turns slow is
//!   avoided from its first slow answer.
//! - A faster one pulls the estimate down with a weight that grows with the time since the last
//!   observation (time constant [`DECAY`]), so one quick answer does not erase a slow minute.
//! - Read between observations, the estimate decays toward zero: a backend avoided for being
//!   slow is tried again after a while, and a worker that recovered gets its traffic back.
//!
//! Two threads observing at once may lose one of the two observations; the next one corrects it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Time constant of the moving average and of the decay toward zero (linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);

/// `nanos` before the first observation.
const UNKNOWN: u64 = u64::MAX;

#[derive(Debug)]
pub struct LatencyEstimate {
    /// Estimated response time in nanoseconds, or [`UNKNOWN`].
    nanos: AtomicU64,
    /// When `nanos` was last set, in [`now`]'s nanoseconds.
    at: AtomicU64,
}

/// Nanoseconds since the first call in this process: a clock that fits in an atomic.
pub fn now() -> u64 {
    nanos_at(Instant::now())
}

/// `instant` on [`now`]'s clock, for a caller that read the clock already.
pub fn nanos_at(instant: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| instant);
    u64::try_from(instant.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX - 1)
}

impl Default for LatencyEstimate {
    fn default() -> Self {
        LatencyEstimate {
            nanos: AtomicU64::new(UNKNOWN),
            at: AtomicU64::new(0),
        }
    }
}

impl LatencyEstimate {
    /// A response arrived `elapsed` after the backend was chosen.
    pub fn observe(&self, elapsed: Duration, now: u64) {
        let sample = nanos_of(elapsed);
        let next = match self.nanos.load(Ordering::Relaxed) {
            UNKNOWN => sample,
            previous if sample >= previous => sample,
            previous => {
                let kept = self.weight_kept(now);
                (previous as f64 * kept + sample as f64 * (1.0 - kept)) as u64
            }
        };
        self.set(next, now);
    }

    /// An attempt failed after `elapsed`: the estimate may rise, never fall. A worker that fails
    /// fast must not look like the fastest one and draw all the traffic.
    pub fn penalize(&self, elapsed: Duration, now: u64) {
        let sample = nanos_of(elapsed);
        let current = self.nanos.load(Ordering::Relaxed);
        if current == UNKNOWN || sample > current {
            self.set(sample, now);
        }
    }

    /// The estimate in nanoseconds at `now`, decayed since its last observation; `None` before
    /// the first one.
    pub fn at(&self, now: u64) -> Option<f64> {
        match self.nanos.load(Ordering::Relaxed) {
            UNKNOWN => None,
            nanos => Some(nanos as f64 * self.weight_kept(now)),
        }
    }

    fn set(&self, nanos: u64, now: u64) {
        self.nanos.store(nanos, Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }

    /// e^(−Δt/τ): how much of the old estimate survives the time since it was set.
    fn weight_kept(&self, now: u64) -> f64 {
        let since = now.saturating_sub(self.at.load(Ordering::Relaxed)) as f64;
        let x = since / DECAY.as_nanos() as f64;
        // A backend in use was observed within the last 100 ms (x < 0.01): there the series
        // to x² is within 2e-7 of e^-x, and spares the pick an `exp` per backend.
        if x < 0.01 {
            1.0 - x + x * x / 2.0
        } else {
            (-x).exp()
        }
    }
}

fn nanos_of(elapsed: Duration) -> u64 {
    // Below UNKNOWN, so a sample is never mistaken for "no estimate".
    u64::try_from(elapsed.as_nanos()).map_or(UNKNOWN - 1, |n| n.min(UNKNOWN - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn unknown_until_the_first_response() {
        let estimate = LatencyEstimate::default();
        assert_eq!(estimate.at(5 * SECOND), None);
        estimate.observe(Duration::from_millis(3), 5 * SECOND);
        assert_eq!(estimate.at(5 * SECOND), Some((3 * MS) as f64));
    }

    #[test]
    fn a_slower_response_replaces_the_estimate_at_once() {
        let estimate = LatencyEstimate::default();
        estimate.observe(Duration::from_millis(1), SECOND);
        estimate.observe(Duration::from_millis(20), SECOND + 1);
        assert_eq!(estimate.at(SECOND + 1), Some((20 * MS) as f64));
    }

    #[test]
    fn faster_responses_pull_it_down_by_the_time_they_cover() {
        let estimate = LatencyEstimate::default();
        estimate.observe(Duration::from_millis(20), 0);
        // One fast answer a millisecond later barely moves it...
        estimate.observe(Duration::from_millis(1), MS);
        let after_one = estimate.at(MS).unwrap();
        assert!(after_one > (19 * MS) as f64, "{after_one}");
        // ...a minute of fast answers brings it to them.
        for i in 1..=60 {
            estimate.observe(Duration::from_millis(1), MS + i * SECOND);
        }
        let after_a_minute = estimate.at(MS + 60 * SECOND).unwrap();
        assert!(
            after_a_minute < (1.2 * MS as f64),
            "{after_a_minute} ns after a minute of 1 ms answers"
        );
    }

    #[test]
    fn an_unobserved_estimate_decays_toward_zero() {
        let estimate = LatencyEstimate::default();
        estimate.observe(Duration::from_millis(20), 0);
        let later = estimate.at(DECAY.as_nanos() as u64).unwrap();
        let expected = 20.0 * MS as f64 / std::f64::consts::E;
        assert!((later - expected).abs() < 1.0, "{later} vs {expected}");
        assert!(estimate.at(20 * DECAY.as_nanos() as u64).unwrap() < 1000.0);
    }

    #[test]
    fn a_failure_never_lowers_the_estimate() {
        let estimate = LatencyEstimate::default();
        estimate.penalize(Duration::from_millis(2), 0);
        assert_eq!(estimate.at(0), Some((2 * MS) as f64), "first sight counts");
        estimate.observe(Duration::from_millis(30), 0);
        estimate.penalize(Duration::from_micros(50), 1);
        assert_eq!(estimate.at(1).map(|n| n.round()), Some((30 * MS) as f64));
        estimate.penalize(Duration::from_secs(30), 2);
        assert_eq!(
            estimate.at(2).map(|n| n.round()),
            Some((30 * SECOND) as f64)
        );
    }
}
