//! Per-backend state that outlives pool snapshots: in-flight count, health, pick counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::latency::{self, LatencyEstimate};

/// Live state of one backend address.
///
/// `repr(C)` keeps the fields every request touches first, within 48 bytes, right after the
/// `Arc`'s counts (which each lease moves too): when the allocation starts a cache line, a
/// request pulls one line per backend over from the proxy's other threads, not three.
#[derive(Debug)]
#[repr(C)]
pub struct BackendSlot {
    in_flight: AtomicUsize,
    /// Tie-breaker for least_conn: picks normalised by weight, so that equal loads are shared
    /// in proportion to weight rather than by position in the list.
    virtual_picks: AtomicU64,
    /// Total times chosen (a monotonic counter for metrics).
    selected: AtomicU64,
    /// Recent response time, which `least_time` balances on.
    latency: LatencyEstimate,
    healthy: AtomicBool,
    /// Consecutive health results that disagree with `healthy`.
    streak: AtomicU32,
    pub addr: SocketAddr,
    /// `addr` as text, computed once (logs, metrics, headers).
    pub label: String,
    /// Requests that could not connect (metrics).
    connect_failures: AtomicU64,
    /// Active health checks passed and failed (metrics).
    checks_passed: AtomicU64,
    checks_failed: AtomicU64,
    /// Attempts on this backend that failed and moved to another one (metrics).
    failovers: AtomicU64,
    /// Attempts that reached the backend but got no usable answer, by [`ResponseFailure`]
    /// (metrics): what a slow or broken worker shows as, where its response times cannot.
    response_failures: [AtomicU64; ResponseFailure::ALL.len()],
    /// Time to the backend's response headers; exported by the pool collector while the
    /// backend is in the pool, so removed backends vanish from the output.
    response_seconds: crate::metrics::LatencyHistogram,
    /// Failed requests logged at most once a second: a backend that is down would otherwise
    /// write a line per request (thousands a second under load).
    failure_log: FailureLog,
    /// Its last health check was answered, but refused the proxy's key check: it runs, and
    /// would serve signed-in users as guests.
    key_refused: AtomicBool,
    /// Its last health check passed (and no request failed to connect since). Out of
    /// rotation, it is on its way back, and the pool's fallback when every backend is out
    /// already sends it requests.
    passed_last_check: AtomicBool,
}

/// Why an attempt that reached a backend got no usable answer (the `reason` label of
/// `custodia_upstream_response_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFailure {
    /// No answer (or no more of it) within `read_timeout` / `send_timeout`.
    Timeout = 0,
    /// The connection ended (closed, reset) before the whole answer.
    Closed = 1,
    /// What came back is not HTTP/1 the proxy can forward.
    Invalid = 2,
}

impl ResponseFailure {
    pub const ALL: [ResponseFailure; 3] = [
        ResponseFailure::Timeout,
        ResponseFailure::Closed,
        ResponseFailure::Invalid,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ResponseFailure::Timeout => "timeout",
            ResponseFailure::Closed => "closed",
            ResponseFailure::Invalid => "invalid",
        }
    }

    /// From an I/O error of the fast path's upstream exchange.
    pub fn of_io(e: &std::io::Error) -> ResponseFailure {
        match e.kind() {
            std::io::ErrorKind::TimedOut => ResponseFailure::Timeout,
            std::io::ErrorKind::InvalidData => ResponseFailure::Invalid,
            _ => ResponseFailure::Closed,
        }
    }
}

/// A budget of one log line per second for a backend's failed requests.
#[derive(Debug, Default)]
pub struct FailureLog {
    /// The unix second of the last line written.
    second: AtomicU64,
    /// Failures not logged since.
    unlogged: AtomicU64,
}

impl FailureLog {
    pub const fn new() -> FailureLog {
        FailureLog {
            second: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Whether a failure at unix second `now` may be logged: `Some` with the failures left
    /// unlogged since the last line, `None` when one was written this second already.
    pub fn admit(&self, now: u64) -> Option<Unlogged> {
        let last = self.second.load(Ordering::Relaxed);
        if last != now
            && self
                .second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(Unlogged {
                count: self.unlogged.swap(0, Ordering::Relaxed),
                over_secs: if last == 0 {
                    0
                } else {
                    now.saturating_sub(last)
                },
            });
        }
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Failures a [`FailureLog`] left out since its last line, and over how long: logged as
/// `unlogged` and `unlogged_over_secs`, so that a count written long after them (at the next
/// failure, which may belong to another incident) says when they happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unlogged {
    pub count: u64,
    /// Seconds since the last line (0 before the first).
    pub over_secs: u64,
}

impl BackendSlot {
    fn new(addr: SocketAddr, virtual_picks: u64) -> BackendSlot {
        BackendSlot {
            addr,
            label: addr.to_string(),
            in_flight: AtomicUsize::new(0),
            selected: AtomicU64::new(0),
            virtual_picks: AtomicU64::new(virtual_picks),
            // Like nginx and Pingora: usable until a check says otherwise.
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            connect_failures: AtomicU64::new(0),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            response_failures: [const { AtomicU64::new(0) }; ResponseFailure::ALL.len()],
            response_seconds: crate::metrics::LatencyHistogram::new(),
            latency: LatencyEstimate::default(),
            failure_log: FailureLog::default(),
            key_refused: AtomicBool::new(false),
            passed_last_check: AtomicBool::new(false),
        }
    }

    /// See [`FailureLog`].
    pub fn failure_log(&self) -> &FailureLog {
        &self.failure_log
    }

    /// An attempt on this backend failed and the request is retried elsewhere.
    pub fn record_failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// An attempt reached the backend and got no usable answer.
    pub fn record_response_failure(&self, why: ResponseFailure) {
        self.response_failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn response_failures(&self, why: ResponseFailure) -> u64 {
        self.response_failures[why as usize].load(Ordering::Relaxed)
    }

    pub fn observe_response(&self, elapsed: Duration) {
        self.response_seconds.observe(elapsed);
    }

    /// The backend's response headers arrived `elapsed` after it was chosen, at `arrived`.
    pub fn observe_latency(&self, elapsed: Duration, arrived: Instant) {
        self.latency.observe(elapsed, latency::nanos_at(arrived));
    }

    /// An attempt on the backend failed `elapsed` after it was chosen.
    pub fn penalize_latency(&self, elapsed: Duration) {
        self.latency.penalize(elapsed, latency::now());
    }

    pub fn latency(&self) -> &LatencyEstimate {
        &self.latency
    }

    /// `custodia_upstream_response_seconds` of this backend, as of now.
    pub fn response_seconds(&self) -> prometheus::proto::Histogram {
        self.response_seconds.snapshot()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn selected_total(&self) -> u64 {
        self.selected.load(Ordering::Relaxed)
    }

    pub(crate) fn virtual_picks(&self) -> u64 {
        self.virtual_picks.load(Ordering::Relaxed)
    }

    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    /// (passed, failed) active health checks so far.
    pub fn health_checks(&self) -> (u64, u64) {
        (
            self.checks_passed.load(Ordering::Relaxed),
            self.checks_failed.load(Ordering::Relaxed),
        )
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Notes when an active health check begins, for [`BackendSlot::observe_check`].
    pub fn begin_check(&self) -> CheckStarted {
        CheckStarted {
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
        }
    }

    /// [`BackendSlot::observe_check`] for a check that began just now.
    #[cfg(test)]
    pub fn observe_health(&self, success: bool, rise: u32, fall: u32) -> Option<bool> {
        self.observe_check(self.begin_check(), success, rise, fall)
    }

    /// Record an active health-check result; returns `Some(new_state)` when the state flips
    /// after `rise` consecutive successes or `fall` consecutive failures.
    ///
    /// A success is counted (in the metrics) but not believed when a request failed to connect
    /// while the check was under way: the check's own connection may predate the failure, and
    /// would otherwise undo `mark_failed` (with `healthy_after = 1`, put the backend straight
    /// back) on the strength of an answer older than the failure.
    pub fn observe_check(
        &self,
        started: CheckStarted,
        success: bool,
        rise: u32,
        fall: u32,
    ) -> Option<bool> {
        let tally = if success {
            &self.checks_passed
        } else {
            &self.checks_failed
        };
        tally.fetch_add(1, Ordering::Relaxed);
        if success && self.connect_failures.load(Ordering::Relaxed) != started.connect_failures {
            return None;
        }
        self.passed_last_check.store(success, Ordering::Relaxed);
        let healthy = self.is_healthy();
        if success == healthy {
            self.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = if success { rise } else { fall };
        if streak >= threshold {
            self.healthy.store(success, Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
            Some(success)
        } else {
            None
        }
    }

    /// Whether the last health check found it running but refusing the proxy's key check.
    pub fn set_key_refused(&self, refused: bool) {
        self.key_refused.store(refused, Ordering::Relaxed);
    }

    pub fn is_key_refused(&self) -> bool {
        self.key_refused.load(Ordering::Relaxed)
    }

    /// Its last health check passed and no request has failed to connect since.
    pub fn passed_last_check(&self) -> bool {
        self.passed_last_check.load(Ordering::Relaxed)
    }

    /// A request could not connect: take the backend out at once (passive check, like nginx's
    /// `max_fails=1`); the active checks bring it back after `healthy_after` successes.
    /// Returns true when this call flipped it.
    pub fn mark_failed(&self) -> bool {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.passed_last_check.store(false, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        self.healthy.swap(false, Ordering::Relaxed)
    }
}

/// When a health check began, as far as the backend's connect failures go.
#[derive(Debug, Clone, Copy)]
pub struct CheckStarted {
    connect_failures: u64,
}

/// An in-flight request on a backend. Dropping it releases the count exactly once.
#[derive(Debug)]
pub struct Lease {
    slot: Arc<BackendSlot>,
    /// Still counted in the slot's in-flight requests.
    held: bool,
}

impl Lease {
    pub(crate) fn take(slot: &Arc<BackendSlot>, weight: u32) -> Lease {
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        slot.selected.fetch_add(1, Ordering::Relaxed);
        // Weighted: a weight-2 backend advances half as fast, so it wins twice as many ties.
        slot.virtual_picks
            .fetch_add(u64::from(WEIGHT_SCALE / weight.max(1)), Ordering::Relaxed);
        Lease {
            slot: slot.clone(),
            held: true,
        }
    }

    pub fn slot(&self) -> &Arc<BackendSlot> {
        &self.slot
    }

    /// The backend is done with the request (its whole response has arrived): it stops counting
    /// as in flight, while the lease still names the backend for metrics and the access log.
    /// Dropping the lease does this otherwise; either way it happens once.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Fixed-point scale for weight-normalised pick counts (weights up to this value stay exact).
const WEIGHT_SCALE: u32 = 720_720; // divisible by 1..=16

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

/// Hands out one [`BackendSlot`] per address, the same one for as long as any pool or lease
/// still uses it.
#[derive(Debug, Default)]
pub struct SlotRegistry {
    slots: Mutex<HashMap<SocketAddr, Weak<BackendSlot>>>,
}

impl SlotRegistry {
    pub fn new() -> SlotRegistry {
        SlotRegistry::default()
    }

    /// The slot for `addr`, created if needed. A new slot starts with the smallest pick count
    /// among live slots so it does not receive a burst of tie-broken traffic to "catch up".
    pub fn slot(&self, addr: SocketAddr) -> Arc<BackendSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = slots.get(&addr).and_then(Weak::upgrade) {
            return existing;
        }
        slots.retain(|_, weak| weak.strong_count() > 0);
        let floor = slots
            .values()
            .filter_map(Weak::upgrade)
            .map(|s| s.virtual_picks())
            .min()
            .unwrap_or(0);
        let slot = Arc::new(BackendSlot::new(addr, floor));
        slots.insert(addr, Arc::downgrade(&slot));
        slot
    }
}
