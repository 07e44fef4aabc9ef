//! Prometheus metrics. What every request counts is counted per thread (`sharded.rs`) and
//! summed at scrape time; per-backend figures are read from the live pool at scrape time, so
//! the request path pays nothing for them beyond the atomics the balancer keeps anyway.

mod process;
mod sharded;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::runtime::SharedRuntime;
use sharded::LatencyCounts;
pub use sharded::LatencyHistogram;
use sharded::{add, family, Sharded};

/// Counters of the login machinery.
pub struct AuthMetrics {
    session_checks: SessionChecks,
    /// `outcome` = started | completed | failed, `reason` = a fixed word.
    pub logins: IntCounterVec,
    pub jwks_refreshes: IntCounter,
    /// `stage` = discovery | token | jwks.
    pub idp_errors: IntCounterVec,
}

/// What a session cookie check found: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    Valid,
    Absent,
    Expired,
    Invalid,
    NotAllowed,
}

impl SessionCheck {
    const LABELS: [&'static str; 5] = ["valid", "absent", "expired", "invalid", "not_allowed"];
}

/// `custodia_auth_session_checks_total`, counted on every request with auth on: per thread.
struct SessionChecks {
    by_result: Sharded<[AtomicU64; 5]>,
    desc: Desc,
}

impl Collector for SessionChecks {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let metrics = SessionCheck::LABELS
            .iter()
            .enumerate()
            .map(|(i, result)| {
                let count = self.by_result.total(|t| &t[i]);
                family::counter(&[("result", result)], count)
            })
            .collect();
        vec![family::of(&self.desc, MetricType::COUNTER, metrics)]
    }
}

/// `custodia_auth_idp_errors_total{stage}`.
pub const IDP_STAGES: [&str; 2] = ["discovery", "token"];

/// `custodia_auth_logins_total{outcome="failed",reason}`: why sign-ins fail.
pub const LOGIN_FAILURES: [&str; 11] = [
    "idp_unavailable",
    "access_denied",
    "idp_error",
    "bad_request",
    "state_mismatch",
    "idp_unreachable",
    "idp_bad_answer",
    "invalid_id_token",
    "code_rejected",
    "not_allowed",
    "session_too_large",
];

impl AuthMetrics {
    fn new() -> AuthMetrics {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"))
        };
        AuthMetrics {
            session_checks: SessionChecks {
                by_result: Sharded::new(sharded::zeroed),
                desc: family::desc(
                    "custodia_auth_session_checks_total",
                    "Session cookie checks by result (valid, absent, expired, invalid, not_allowed).",
                    &["result"],
                ),
            },
            logins: counter_vec(
                "custodia_auth_logins_total",
                "Logins by outcome (started, completed, failed) and reason.",
                &["outcome", "reason"],
            ),
            jwks_refreshes: IntCounter::new(
                "custodia_auth_jwks_refreshes_total",
                "Re-fetches of the identity provider's signing keys after an unknown key id.",
            )
            .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}")),
            idp_errors: counter_vec(
                "custodia_auth_idp_errors_total",
                "Failed calls to the identity provider by stage (discovery, token).",
                &["stage"],
            ),
        }
    }

    /// The series an alert or a dashboard looks for exist at 0 from the start (`absent()`
    /// would otherwise fire, and rates show nothing, until the first of each).
    fn with_every_series(self) -> AuthMetrics {
        for stage in IDP_STAGES {
            self.idp_errors.with_label_values(&[stage]);
        }
        for outcome in ["started", "completed"] {
            self.logins.with_label_values(&[outcome, "none"]);
        }
        for reason in LOGIN_FAILURES {
            self.logins.with_label_values(&["failed", reason]);
        }
        self
    }

    /// Count one session cookie check.
    #[inline]
    pub fn session_checked(&self, result: SessionCheck) {
        if let Some(count) = self.session_checks.by_result.local().get(result as usize) {
            add(count, 1);
        }
    }

    fn register(&'static self, registry: &Registry) {
        let _ = registry.register(Box::new(Static(&self.session_checks)));
        let _ = registry.register(Box::new(self.logins.clone()));
        let _ = registry.register(Box::new(self.jwks_refreshes.clone()));
        let _ = registry.register(Box::new(self.idp_errors.clone()));
    }
}

/// A process-wide collector, registered by reference: every registry reads the same figures.
struct Static(&'static (dyn Collector + Sync));

impl Collector for Static {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

/// The process-wide auth counters.
pub fn auth() -> &'static AuthMetrics {
    static AUTH: std::sync::OnceLock<AuthMetrics> = std::sync::OnceLock::new();
    AUTH.get_or_init(|| AuthMetrics::new().with_every_series())
}

/// Reloads of the configuration file and what is loaded now.
pub struct ConfigMetrics {
    reloads: IntCounterVec,
    pub reload_success: IntCounter,
    pub reload_failure: IntCounter,
    /// Unix time the running configuration was loaded (start or last successful reload).
    pub last_reload: Gauge,
    build_info: IntGaugeVec,
}

impl ConfigMetrics {
    fn new() -> ConfigMetrics {
        let reloads = IntCounterVec::new(
            Opts::new(
                "custodia_config_reloads_total",
                "Reloads of the configuration file by result (success, failure).",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"));
        let build_info = IntGaugeVec::new(
            Opts::new(
                "custodia_build_info",
                "Always 1; the version of the running custodia-proxy is in the labels.",
            ),
            &["version"],
        )
        .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        ConfigMetrics {
            reload_success: reloads.with_label_values(&["success"]),
            reload_failure: reloads.with_label_values(&["failure"]),
            reloads,
            last_reload: Gauge::new(
                "custodia_config_last_reload_timestamp_seconds",
                "Unix time the running configuration was loaded (start or last successful reload).",
            )
            .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}")),
            build_info,
        }
    }

    /// Record that a configuration was loaded now.
    pub fn loaded_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload.set(now);
    }

    fn register(&self, registry: &Registry) {
        let _ = registry.register(Box::new(self.reloads.clone()));
        let _ = registry.register(Box::new(self.last_reload.clone()));
        let _ = registry.register(Box::new(self.build_info.clone()));
    }
}

/// The process-wide configuration counters.
pub fn config() -> &'static ConfigMetrics {
    static CONFIG: std::sync::OnceLock<ConfigMetrics> = std::sync::OnceLock::new();
    CONFIG.get_or_init(ConfigMetrics::new)
}

/// Route policy class of a request: the `policy` label. `None` = auth off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyClass {
    Public,
    Optional,
    Required,
    #[default]
    None,
}

impl PolicyClass {
    pub const LABELS: [&'static str; 4] = ["public", "optional", "required", "none"];

    pub fn as_str(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

impl From<crate::auth::policy::Policy> for PolicyClass {
    fn from(p: crate::auth::policy::Policy) -> PolicyClass {
        use crate::auth::policy::Policy;
        match p {
            Policy::Public => PolicyClass::Public,
            Policy::Optional => PolicyClass::Optional,
            Policy::Required => PolicyClass::Required,
        }
    }
}

/// The `method` label: the common methods by name, anything else as `OTHER`.
pub const METHOD_LABELS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];

pub fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The `status` label.
pub const STATUS_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Class index of a status; 0 (the client left before any response) counts as 4xx, as nginx
/// logs such requests with its 499.
pub fn status_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        0 | 400..=499 => 3,
        _ => 4,
    }
}

/// `custodia_requests_total` series: every (policy, method, status class), 4 × 8 × 5.
const REQUEST_SERIES: usize = PolicyClass::LABELS.len() * METHOD_LABELS.len() * STATUS_LABELS.len();

/// One thread's request figures.
struct RequestFigures {
    /// `custodia_requests_total` by [`request_series`].
    requests: [AtomicU64; REQUEST_SERIES],
    duration: LatencyCounts,
    /// Up on one thread and down on another at times: read as the wrapping sum.
    in_flight: AtomicU64,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    upstream_retries: AtomicU64,
}

impl RequestFigures {
    fn new() -> RequestFigures {
        RequestFigures {
            requests: sharded::zeroed(),
            duration: LatencyCounts::default(),
            in_flight: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            upstream_retries: AtomicU64::new(0),
        }
    }
}

fn request_series(policy: PolicyClass, method: usize, status: u16) -> usize {
    (policy as usize * METHOD_LABELS.len() + method.min(METHOD_LABELS.len() - 1))
        * STATUS_LABELS.len()
        + status_index(status)
}

/// Request-path metrics, counted per thread. Every `requests_total` series is exported from
/// the start (160 series).
pub struct RequestMetrics {
    figures: Sharded<RequestFigures>,
    requests: Desc,
    duration: Desc,
    in_flight: Desc,
    request_bytes: Desc,
    response_bytes: Desc,
    upstream_retries: Desc,
}

/// One finished request, as the metrics count it.
pub struct RequestCount {
    pub policy: PolicyClass,
    /// [`method_index`] of its method.
    pub method: usize,
    /// 0: no response was sent.
    pub status: u16,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Attempts after the first.
    pub retries: u32,
}

const UPSTREAM_RESPONSE: &str = "custodia_upstream_response_seconds";
const UPSTREAM_RESPONSE_HELP: &str =
    "Time from choosing the backend to its response headers (last attempt), by backend.";

impl RequestMetrics {
    fn new() -> RequestMetrics {
        RequestMetrics {
            figures: Sharded::new(RequestFigures::new),
            requests: family::desc(
                "custodia_requests_total",
                "Requests answered, by route policy class, method and status class.",
                &["policy", "method", "status"],
            ),
            duration: family::desc(
                "custodia_request_duration_seconds",
                "Time from a request's headers to the end of its response, as the proxy saw it.",
                &[],
            ),
            in_flight: family::desc(
                "custodia_requests_in_flight",
                "Requests being handled now.",
                &[],
            ),
            request_bytes: family::desc(
                "custodia_request_bytes_total",
                "Request body bytes received from clients.",
                &[],
            ),
            response_bytes: family::desc(
                "custodia_response_bytes_total",
                "Response body bytes sent to clients.",
                &[],
            ),
            upstream_retries: family::desc(
                "custodia_upstream_retries_total",
                "Attempts repeated on another backend after a failure (failovers).",
                &[],
            ),
        }
    }

    /// Count a finished request.
    #[inline]
    pub fn finished(&self, request: &RequestCount) {
        let mine = self.figures.local();
        let series = request_series(request.policy, request.method, request.status);
        if let Some(count) = mine.requests.get(series) {
            add(count, 1);
        }
        mine.duration.observe(request.duration);
        if request.bytes_in > 0 {
            add(&mine.request_bytes, request.bytes_in);
        }
        if request.bytes_out > 0 {
            add(&mine.response_bytes, request.bytes_out);
        }
        if request.retries > 0 {
            add(&mine.upstream_retries, u64::from(request.retries));
        }
    }

    fn requests_family(&self) -> MetricFamily {
        let mut totals = [0u64; REQUEST_SERIES];
        for figures in self.figures.lines() {
            for (total, count) in totals.iter_mut().zip(&figures.requests) {
                *total = total.wrapping_add(count.load(std::sync::atomic::Ordering::Relaxed));
            }
        }
        // In the order of `request_series`: policy, then method, then status.
        let labels = PolicyClass::LABELS.iter().flat_map(|policy| {
            METHOD_LABELS.iter().flat_map(move |method| {
                STATUS_LABELS.iter().map(move |status| {
                    [
                        ("policy", *policy),
                        ("method", *method),
                        ("status", *status),
                    ]
                })
            })
        });
        let metrics = labels
            .zip(totals)
            .map(|(labels, total)| family::counter(&labels, total))
            .collect();
        family::of(&self.requests, MetricType::COUNTER, metrics)
    }
}

impl Collector for RequestMetrics {
    fn desc(&self) -> Vec<&Desc> {
        vec![
            &self.requests,
            &self.duration,
            &self.in_flight,
            &self.request_bytes,
            &self.response_bytes,
            &self.upstream_retries,
        ]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let figures = &self.figures;
        let counter = |desc: &Desc, total: u64| {
            family::of(desc, MetricType::COUNTER, vec![family::counter(&[], total)])
        };
        let duration = sharded::latency_histogram(figures.lines().map(|t| &t.duration));
        // Wrapping: the sum of ups and downs is the signed count.
        let in_flight = figures.total(|t| &t.in_flight) as i64;
        vec![
            self.requests_family(),
            family::of(
                &self.duration,
                MetricType::HISTOGRAM,
                vec![family::histogram(&[], duration)],
            ),
            family::of(
                &self.in_flight,
                MetricType::GAUGE,
                vec![family::gauge(&[], in_flight as f64)],
            ),
            counter(&self.request_bytes, figures.total(|t| &t.request_bytes)),
            counter(&self.response_bytes, figures.total(|t| &t.response_bytes)),
            counter(
                &self.upstream_retries,
                figures.total(|t| &t.upstream_retries),
            ),
        ]
    }
}

/// The process-wide request metrics.
pub fn requests() -> &'static RequestMetrics {
    static REQUESTS: std::sync::OnceLock<RequestMetrics> = std::sync::OnceLock::new();
    REQUESTS.get_or_init(RequestMetrics::new)
}

/// Counts a request in flight for as long as it lives.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    #[inline]
    pub fn start() -> InFlight {
        add(&requests().figures.local().in_flight, 1);
        InFlight(())
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        add(&requests().figures.local().in_flight, u64::MAX); // −1, wrapping
    }
}

/// Requests and connections refused by the abuse limits and the request guard, by reason.
pub struct RejectionMetrics {
    rejections: IntCounterVec,
    /// Above `[limits] max_connections` (503, closed).
    pub connection_limit: IntCounter,
    /// Did not send a whole request within `[limits] client_timeout` (closed).
    pub client_timeout: IntCounter,
    /// Over `[limits] login_rate_per_minute` (429).
    pub login_rate: IntCounter,
    /// Body over `max_body_size` (413).
    pub body_too_large: IntCounter,
    /// Target, header line or header section too large (414, 431).
    pub head_too_large: IntCounter,
    /// Ambiguous framing, bad Host or target, HTTP/0.9, an unparseable head (400).
    pub malformed: IntCounter,
    /// A method the proxy does not take at all: CONNECT (405).
    pub method_not_allowed: IntCounter,
}

impl RejectionMetrics {
    fn new() -> RejectionMetrics {
        let rejections = IntCounterVec::new(
            Opts::new(
                "custodia_rejections_total",
                "Requests and connections refused by the abuse limits and request checks, by reason \
                 (connection_limit, client_timeout, login_rate, body_too_large, head_too_large, malformed, \
                 method_not_allowed).",
            ),
            &["reason"],
        )
        .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"));
        let child = |v: &str| rejections.with_label_values(&[v]);
        RejectionMetrics {
            connection_limit: child("connection_limit"),
            client_timeout: child("client_timeout"),
            login_rate: child("login_rate"),
            body_too_large: child("body_too_large"),
            head_too_large: child("head_too_large"),
            malformed: child("malformed"),
            method_not_allowed: child("method_not_allowed"),
            rejections,
        }
    }
}

/// The process-wide rejection counters.
pub fn rejections() -> &'static RejectionMetrics {
    static REJECTIONS: std::sync::OnceLock<RejectionMetrics> = std::sync::OnceLock::new();
    REJECTIONS.get_or_init(RejectionMetrics::new)
}

/// Keep-alive client connections idle long enough to be parked down to their socket.
pub fn parked_connections() -> &'static IntGauge {
    static PARKED: std::sync::OnceLock<IntGauge> = std::sync::OnceLock::new();
    PARKED.get_or_init(|| {
        gauge(
            "custodia_connections_parked",
            "Idle keep-alive client connections parked down to their socket (idle over 1 s).",
        )
    })
}

/// Client connections open, parked ones included: what `[limits] max_connections` caps.
pub fn open_connections() -> &'static IntGauge {
    static OPEN: std::sync::OnceLock<IntGauge> = std::sync::OnceLock::new();
    OPEN.get_or_init(|| {
        gauge(
            "custodia_connections_open",
            "Client connections open, parked ones included (capped by [limits] max_connections).",
        )
    })
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"))
}

/// Builds the registry served on `/metrics`.
pub fn registry(runtime: SharedRuntime) -> Registry {
    let registry = Registry::new();
    auth().register(&registry);
    config().register(&registry);
    let _ = registry.register(Box::new(Static(requests())));
    let _ = registry.register(Box::new(rejections().rejections.clone()));
    let _ = registry.register(Box::new(parked_connections().clone()));
    let _ = registry.register(Box::new(open_connections().clone()));
    // Registration only fails on duplicate or inconsistent descriptors, which these are not.
    let _ = registry.register(Box::new(PoolCollector::new(runtime)));
    let _ = registry.register(Box::new(process::ProcessCollector::new()));
    registry
}

/// Reads backend state from the current pool snapshot.
struct PoolCollector {
    runtime: SharedRuntime,
    in_flight: IntGaugeVec,
    healthy: IntGaugeVec,
    selected: IntCounterVec,
    connect_failures: IntCounterVec,
    health_checks: IntCounterVec,
    failovers: IntCounterVec,
    response_failures: IntCounterVec,
    latency_estimate: GaugeVec,
    /// The backends' response times, counted per thread in their slots.
    responses: Desc,
    generation: IntGauge,
    /// One scrape at a time: each refills the vectors above (reset, then the slots' totals),
    /// and two at once would read each other's halves — counters doubled, series missing.
    scraping: std::sync::Mutex<()>,
}

impl PoolCollector {
    fn new(runtime: SharedRuntime) -> PoolCollector {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        // Metric names and labels are constants: construction cannot fail.
        let in_flight = gauge(
            "custodia_upstream_in_flight_requests",
            "Requests currently leased to the backend (the least-connections counter).",
            &["backend"],
        );
        let healthy = gauge(
            "custodia_upstream_healthy",
            "1 if the backend is in rotation, 0 if health checks or a failed connect took it out.",
            &["backend"],
        );
        let selected = IntCounterVec::new(
            Opts::new(
                "custodia_upstream_selected_total",
                "Times the balancer chose the backend (retries included).",
            ),
            &["backend"],
        );
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "custodia_upstream_connect_failures_total",
                "Requests that could not connect to the backend.",
            ),
            &["backend"],
        );
        let health_checks = IntCounterVec::new(
            Opts::new(
                "custodia_upstream_health_checks_total",
                "Active health checks of the backend by result (success, failure).",
            ),
            &["backend", "result"],
        );
        let generation = IntGauge::new(
            "custodia_config_generation",
            "Generation of the loaded configuration (1 at start, +1 per reload or DNS change of the pool).",
        );
        let bad = |e: prometheus::Error| -> ! { unreachable!("constant metric descriptor: {e}") };
        let failovers = IntCounterVec::new(
            Opts::new(
                "custodia_upstream_failovers_total",
                "Attempts on the backend that failed and were retried on another backend.",
            ),
            &["backend"],
        )
        .unwrap_or_else(|e| bad(e));
        let response_failures = IntCounterVec::new(
            Opts::new(
                "custodia_upstream_response_failures_total",
                "Attempts that reached the backend but got no usable answer, by reason: timeout \
                 (no answer within read_timeout), closed (the connection ended first), invalid \
                 (not HTTP/1).",
            ),
            &["backend", "reason"],
        )
        .unwrap_or_else(|e| bad(e));
        let latency_estimate = GaugeVec::new(
            Opts::new(
                "custodia_upstream_latency_estimate_seconds",
                "Recent response time of the backend (peak-weighted moving average, decaying \
                 while unobserved), which balance = \"least_time\" weighs; absent until its \
                 first response.",
            ),
            &["backend"],
        )
        .unwrap_or_else(|e| bad(e));
        match (
            in_flight,
            healthy,
            selected,
            connect_failures,
            health_checks,
            generation,
        ) {
            (
                Ok(in_flight),
                Ok(healthy),
                Ok(selected),
                Ok(connect_failures),
                Ok(health_checks),
                Ok(generation),
            ) => PoolCollector {
                runtime,
                in_flight,
                healthy,
                selected,
                connect_failures,
                health_checks,
                failovers,
                response_failures,
                latency_estimate,
                responses: family::desc(UPSTREAM_RESPONSE, UPSTREAM_RESPONSE_HELP, &["backend"]),
                generation,
                scraping: std::sync::Mutex::new(()),
            },
            _ => unreachable!("constant metric descriptors are valid"),
        }
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.in_flight.desc();
        descs.extend(self.healthy.desc());
        descs.extend(self.selected.desc());
        descs.extend(self.connect_failures.desc());
        descs.extend(self.health_checks.desc());
        descs.extend(self.failovers.desc());
        descs.extend(self.response_failures.desc());
        descs.extend(self.latency_estimate.desc());
        descs.push(&self.responses);
        descs.extend(self.generation.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self
            .scraping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Backends removed by a reload must disappear from the output.
        self.in_flight.reset();
        self.healthy.reset();
        self.selected.reset();
        self.connect_failures.reset();
        self.health_checks.reset();
        self.failovers.reset();
        self.response_failures.reset();
        self.latency_estimate.reset();
        let now = crate::balancer::latency::now();
        let runtime = self.runtime.load();
        let mut responses = Vec::new();
        for member in runtime.pool.members() {
            let slot = &member.slot;
            let label = [slot.label.as_str()];
            self.in_flight
                .with_label_values(&label)
                .set(slot.in_flight() as i64);
            self.healthy
                .with_label_values(&label)
                .set(i64::from(slot.is_healthy()));
            self.selected
                .with_label_values(&label)
                .inc_by(slot.selected_total());
            self.connect_failures
                .with_label_values(&label)
                .inc_by(slot.connect_failures());
            let (passed, failed) = slot.health_checks();
            let backend = slot.label.as_str();
            self.health_checks
                .with_label_values(&[backend, "success"])
                .inc_by(passed);
            self.health_checks
                .with_label_values(&[backend, "failure"])
                .inc_by(failed);
            self.failovers
                .with_label_values(&label)
                .inc_by(slot.failovers());
            for why in crate::balancer::ResponseFailure::ALL {
                self.response_failures
                    .with_label_values(&[backend, why.label()])
                    .inc_by(slot.response_failures(why));
            }
            if let Some(nanos) = slot.latency().at(now) {
                self.latency_estimate
                    .with_label_values(&label)
                    .set(nanos / 1e9);
            }
            responses.push(family::histogram(
                &[("backend", backend)],
                slot.response_seconds(),
            ));
        }
        self.generation.set(runtime.generation as i64);
        let mut families = self.in_flight.collect();
        families.extend(self.healthy.collect());
        families.extend(self.selected.collect());
        families.extend(self.connect_failures.collect());
        families.extend(self.health_checks.collect());
        families.extend(self.failovers.collect());
        families.extend(self.response_failures.collect());
        families.extend(self.latency_estimate.collect());
        families.push(family::of(
            &self.responses,
            MetricType::HISTOGRAM,
            responses,
        ));
        families.extend(self.generation.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `custodia_requests_total` series with these labels, as a scrape reads it.
    fn requests_total(policy: &str, method: &str, status: &str) -> f64 {
        let family = requests().requests_family();
        let series = family.get_metric().iter().find(|m| {
            let labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            labels == [("method", method), ("policy", policy), ("status", status)]
        });
        series
            .expect("every series is exported")
            .get_counter()
            .get_value()
    }

    fn request(policy: PolicyClass, method: &http::Method, status: u16) -> RequestCount {
        RequestCount {
            policy,
            method: method_index(method),
            status,
            duration: Duration::from_micros(300),
            bytes_in: 0,
            bytes_out: 0,
            retries: 0,
        }
    }

    /// Two scrapes at once (two Prometheus replicas, or one and an operator's curl) read the
    /// same totals and every series: counters neither doubled nor missing.
    #[test]
    fn concurrent_scrapes_read_the_same_backend_series() {
        let config = crate::config::parse_with_env(
            "[upstream]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n",
            std::path::Path::new("a.toml"),
            &std::collections::HashMap::new(),
        )
        .unwrap();
        let registry = crate::balancer::SlotRegistry::new();
        let runtime = crate::runtime::Runtime::build(config, &registry, 1, None).unwrap();
        for _ in 0..7 {
            drop(runtime.pool.pick(&[]));
        }
        let collector = PoolCollector::new(std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(
            runtime,
        )));
        let scrape = |collector: &PoolCollector| -> (u64, usize) {
            let families = collector.collect();
            let family = |name: &str| families.iter().find(|f| f.name() == name);
            let selected = family("custodia_upstream_selected_total").map_or(0.0, |f| {
                f.get_metric()
                    .iter()
                    .map(|m| m.get_counter().get_value())
                    .sum()
            });
            let healthy = family("custodia_upstream_healthy").map_or(0, |f| f.get_metric().len());
            (selected as u64, healthy)
        };
        std::thread::scope(|scope| {
            let scrapers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..500)
                            .map(|_| scrape(&collector))
                            .filter(|&seen| seen != (7, 2))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for scraper in scrapers {
                let wrong = scraper.join().unwrap();
                assert!(wrong.is_empty(), "(selected, healthy series): {wrong:?}");
            }
        });
    }

    #[test]
    fn each_request_lands_in_the_series_with_its_labels() {
        let cases = [
            (
                PolicyClass::Required,
                http::Method::PATCH,
                503,
                "required",
                "PATCH",
                "5xx",
            ),
            (
                PolicyClass::None,
                http::Method::GET,
                200,
                "none",
                "GET",
                "2xx",
            ),
            (
                PolicyClass::Public,
                http::Method::TRACE,
                0,
                "public",
                "OTHER",
                "4xx",
            ),
            (
                PolicyClass::Optional,
                http::Method::OPTIONS,
                101,
                "optional",
                "OPTIONS",
                "1xx",
            ),
        ];
        for (policy, method, status, p, mth, s) in cases {
            let before = requests_total(p, mth, s);
            requests().finished(&request(policy, &method, status));
            assert_eq!(requests_total(p, mth, s), before + 1.0, "{p} {mth} {s}");
        }
        assert_eq!(requests().requests_family().get_metric().len(), 160);
        assert_eq!(PolicyClass::Optional.as_str(), "optional");
    }

    #[test]
    fn requests_counted_on_other_threads_reach_the_scrape() {
        let before = requests_total("public", "DELETE", "3xx");
        let threads: Vec<_> = (0..6)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1000 {
                        let _in_flight = InFlight::start();
                        requests().finished(&request(
                            PolicyClass::Public,
                            &http::Method::DELETE,
                            302,
                        ));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("counting thread");
        }
        assert_eq!(requests_total("public", "DELETE", "3xx"), before + 6000.0);
    }

    #[test]
    fn the_text_output_keeps_its_names_labels_and_types() {
        let registry = Registry::new();
        let _ = registry.register(Box::new(Static(requests())));
        auth().register(&registry);
        requests().finished(&RequestCount {
            bytes_in: 10,
            bytes_out: 20,
            retries: 1,
            ..request(PolicyClass::Required, &http::Method::GET, 200)
        });
        auth().session_checked(SessionCheck::Expired);
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .expect("encode");
        let text = String::from_utf8(text).expect("utf-8");
        for line in [
            "# TYPE custodia_requests_total counter",
            "# TYPE custodia_request_duration_seconds histogram",
            "# TYPE custodia_requests_in_flight gauge",
            "# TYPE custodia_request_bytes_total counter",
            "# TYPE custodia_response_bytes_total counter",
            "# TYPE custodia_upstream_retries_total counter",
            "# TYPE custodia_auth_session_checks_total counter",
            "custodia_request_duration_seconds_bucket{le=\"0.0005\"}",
            "custodia_request_duration_seconds_bucket{le=\"+Inf\"}",
            "custodia_requests_total{method=\"GET\",policy=\"required\",status=\"2xx\"}",
            "custodia_auth_session_checks_total{result=\"expired\"}",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
