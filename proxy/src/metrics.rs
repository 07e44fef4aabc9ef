//! Prometheus metrics. Per-backend figures are read from the live pool at scrape time, so the
//! request path pays nothing for them beyond the atomics the balancer keeps anyway.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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

/// Builds the registry served on `/metrics`.
pub fn registry(runtime: SharedRuntime) -> Registry {
    let registry = Registry::new();
    auth().register(&registry);
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
        let generation = IntGauge::new(
            "custodia_config_generation",
            "Generation of the loaded configuration (1 at start, +1 per reload).",
        );
        match (in_flight, healthy, selected, generation) {
            (Ok(in_flight), Ok(healthy), Ok(selected), Ok(generation)) => PoolCollector {
                runtime,
                in_flight,
                healthy,
                selected,
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
        descs.extend(self.generation.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Backends removed by a reload must disappear from the output.
        self.in_flight.reset();
        self.healthy.reset();
        self.selected.reset();
        let runtime = self.runtime.load();
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
        }
        self.generation.set(runtime.generation as i64);
        let mut families = self.in_flight.collect();
        families.extend(self.healthy.collect());
        families.extend(self.selected.collect());
        families.extend(self.generation.collect());
        families
    }
}
