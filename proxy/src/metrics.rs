//! Prometheus metrics. Per-backend figures are read from the live pool at scrape time, so the
//! request path pays nothing for them beyond the atomics the balancer keeps anyway.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use crate::runtime::SharedRuntime;

/// Counters of the login machinery. Children for the fixed label values are resolved once, so
/// the per-request session check pays one relaxed atomic add.
pub struct AuthMetrics {
    session_checks: IntCounterVec,
    pub session_valid: IntCounter,
    pub session_absent: IntCounter,
    pub session_expired: IntCounter,
    pub session_invalid: IntCounter,
    /// `outcome` = started | completed | failed, `reason` = a fixed word.
    pub logins: IntCounterVec,
    pub jwks_refreshes: IntCounter,
    /// `stage` = discovery | token | jwks.
    pub idp_errors: IntCounterVec,
}

impl AuthMetrics {
    fn new() -> AuthMetrics {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"))
        };
        let session_checks = counter_vec(
            "custodia_auth_session_checks_total",
            "Session cookie checks by result (valid, absent, expired, invalid).",
            &["result"],
        );
        let child = |v: &str| session_checks.with_label_values(&[v]);
        AuthMetrics {
            session_valid: child("valid"),
            session_absent: child("absent"),
            session_expired: child("expired"),
            session_invalid: child("invalid"),
            session_checks,
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
                "Failed calls to the identity provider by stage (discovery, token, jwks).",
                &["stage"],
            ),
        }
    }

    fn register(&self, registry: &Registry) {
        let _ = registry.register(Box::new(self.session_checks.clone()));
        let _ = registry.register(Box::new(self.logins.clone()));
        let _ = registry.register(Box::new(self.jwks_refreshes.clone()));
        let _ = registry.register(Box::new(self.idp_errors.clone()));
    }
}

/// The process-wide auth counters.
pub fn auth() -> &'static AuthMetrics {
    static AUTH: std::sync::OnceLock<AuthMetrics> = std::sync::OnceLock::new();
    AUTH.get_or_init(AuthMetrics::new)
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

/// Request-path metrics. Every `requests_total` child exists from the start (4 × 8 × 5 = 160
/// series), resolved once, so counting a request is an index and one atomic add.
pub struct RequestMetrics {
    requests: IntCounterVec,
    by_labels: Vec<IntCounter>,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    pub upstream_retries: IntCounter,
}

const UPSTREAM_RESPONSE: &str = "custodia_upstream_response_seconds";
const UPSTREAM_RESPONSE_HELP: &str =
    "Time from choosing the backend to its response headers (last attempt), by backend.";

/// The response-time histogram of one backend (owned by its slot).
pub fn upstream_response_histogram(backend: &str) -> Histogram {
    let opts = HistogramOpts::new(UPSTREAM_RESPONSE, UPSTREAM_RESPONSE_HELP)
        .const_label("backend", backend)
        .buckets(LATENCY_BUCKETS.to_vec());
    // A constant name and a socket-address label value are always valid.
    Histogram::with_opts(opts).unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"))
}

/// Latency buckets (seconds): sub-millisecond loopback answers up to the 30 s read timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl RequestMetrics {
    fn new() -> RequestMetrics {
        let bad = |e: prometheus::Error| -> ! { unreachable!("constant metric descriptor: {e}") };
        let requests = IntCounterVec::new(
            Opts::new(
                "custodia_requests_total",
                "Requests answered, by route policy class, method and status class.",
            ),
            &["policy", "method", "status"],
        )
        .unwrap_or_else(|e| bad(e));
        let mut by_labels = Vec::with_capacity(160);
        for policy in PolicyClass::LABELS {
            for method in METHOD_LABELS {
                for status in STATUS_LABELS {
                    by_labels.push(requests.with_label_values(&[policy, method, status]));
                }
            }
        }
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                .unwrap_or_else(|e| bad(e))
        };
        let counter =
            |name: &str, help: &str| IntCounter::new(name, help).unwrap_or_else(|e| bad(e));
        RequestMetrics {
            requests,
            by_labels,
            duration: histogram(
                "custodia_request_duration_seconds",
                "Time from a request's headers to the end of its response, as the proxy saw it.",
            ),
            in_flight: IntGauge::new("custodia_requests_in_flight", "Requests being handled now.")
                .unwrap_or_else(|e| bad(e)),
            request_bytes: counter(
                "custodia_request_bytes_total",
                "Request body bytes received from clients.",
            ),
            response_bytes: counter(
                "custodia_response_bytes_total",
                "Response body bytes sent to clients.",
            ),
            upstream_retries: counter(
                "custodia_upstream_retries_total",
                "Attempts repeated on another backend after a failure (failovers).",
            ),
        }
    }

    /// The `requests_total` child of one request.
    pub fn requests(&self, policy: PolicyClass, method: usize, status: u16) -> &IntCounter {
        let index = (policy as usize * METHOD_LABELS.len() + method.min(7)) * STATUS_LABELS.len()
            + status_index(status);
        // The vector holds every combination: the index is always in range.
        &self.by_labels[index]
    }

    fn register(&self, registry: &Registry) {
        let _ = registry.register(Box::new(self.requests.clone()));
        let _ = registry.register(Box::new(self.duration.clone()));
        let _ = registry.register(Box::new(self.in_flight.clone()));
        let _ = registry.register(Box::new(self.request_bytes.clone()));
        let _ = registry.register(Box::new(self.response_bytes.clone()));
        let _ = registry.register(Box::new(self.upstream_retries.clone()));
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
    pub fn start() -> InFlight {
        requests().in_flight.inc();
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        requests().in_flight.dec();
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
    /// Ambiguous framing, bad Host or target, HTTP/0.9 (400).
    pub malformed: IntCounter,
}

impl RejectionMetrics {
    fn new() -> RejectionMetrics {
        let rejections = IntCounterVec::new(
            Opts::new(
                "custodia_rejections_total",
                "Requests and connections refused by the abuse limits and request checks, by reason \
                 (connection_limit, client_timeout, login_rate, body_too_large, head_too_large, malformed).",
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
    requests().register(&registry);
    let _ = registry.register(Box::new(rejections().rejections.clone()));
    let _ = registry.register(Box::new(parked_connections().clone()));
    let _ = registry.register(Box::new(open_connections().clone()));
    // Registration only fails on duplicate or inconsistent descriptors, which these are not.
    let _ = registry.register(Box::new(PoolCollector::new(runtime)));
    #[cfg(target_os = "linux")]
    let _ = registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
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
    latency_estimate: GaugeVec,
    /// Only for its descriptor: the samples come from the slots' own histograms.
    response_template: prometheus::HistogramVec,
    generation: IntGauge,
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
            "1 if the backend is in rotation, 0 if health checks took it out.",
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
            "Generation of the loaded configuration (1 at start, +1 per reload).",
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
        let response_template = prometheus::HistogramVec::new(
            HistogramOpts::new(UPSTREAM_RESPONSE, UPSTREAM_RESPONSE_HELP),
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
                latency_estimate,
                response_template,
                generation,
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
        descs.extend(self.latency_estimate.desc());
        descs.extend(self.response_template.desc());
        descs.extend(self.generation.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Backends removed by a reload must disappear from the output.
        self.in_flight.reset();
        self.healthy.reset();
        self.selected.reset();
        self.connect_failures.reset();
        self.health_checks.reset();
        self.failovers.reset();
        self.latency_estimate.reset();
        let now = crate::balancer::latency::now();
        let runtime = self.runtime.load();
        let mut responses: Option<MetricFamily> = None;
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
            if let Some(nanos) = slot.latency().at(now) {
                self.latency_estimate
                    .with_label_values(&label)
                    .set(nanos / 1e9);
            }
            // Merge every backend's histogram into one family.
            for family in slot.response_seconds().collect() {
                match responses.as_mut() {
                    None => responses = Some(family),
                    Some(all) => {
                        for metric in family.get_metric() {
                            all.mut_metric().push(metric.clone());
                        }
                    }
                }
            }
        }
        self.generation.set(runtime.generation as i64);
        let mut families = self.in_flight.collect();
        families.extend(self.healthy.collect());
        families.extend(self.selected.collect());
        families.extend(self.connect_failures.collect());
        families.extend(self.health_checks.collect());
        families.extend(self.failovers.collect());
        families.extend(self.latency_estimate.collect());
        families.extend(responses);
        families.extend(self.generation.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_lands_in_the_child_with_its_labels() {
        let m = requests();
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
            let child = m.requests.with_label_values(&[p, mth, s]);
            let before = child.get();
            m.requests(policy, method_index(&method), status).inc();
            assert_eq!(child.get(), before + 1, "{p} {mth} {s}");
        }
        assert_eq!(m.by_labels.len(), 160);
        assert_eq!(PolicyClass::Optional.as_str(), "optional");
    }
}
