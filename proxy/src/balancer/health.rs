//! Active health checks: an HTTP GET of `upstream.health.path` on every backend each interval,
//! flipping a backend's state after `healthy_after` / `unhealthy_after` consecutive results.
//!
//! The probe itself is pingora-load-balancing's [`HttpHealthCheck`]; the schedule, thresholds and
//! state live here so they follow reloads of the pool.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;
use tokio::task::JoinSet;

use crate::config::HealthSettings;
use crate::runtime::SharedRuntime;

/// The background task; one per process.
pub struct HealthChecker {
    runtime: SharedRuntime,
}

impl HealthChecker {
    pub fn new(runtime: SharedRuntime) -> HealthChecker {
        HealthChecker { runtime }
    }

    /// One pass over the current pool; returns after every probe has answered or timed out.
    pub async fn check_all(&self) {
        let runtime = self.runtime.load_full();
        let settings = runtime.config.upstream.health.clone();
        // With logins on, each check also asks the worker to verify an assertion of ours: one
        // that cannot (no key, another key, a skewed clock) would serve signed-in users as
        // guests, and is taken out as unhealthy.
        let key_check = runtime.auth.as_ref().map(|auth| {
            custodia_identity::sign_key_check(
                auth.settings.assertion_key.0.as_bytes(),
                crate::auth::flow::now_unix(),
            )
        });
        let probe = Arc::new(probe_for(&settings, key_check.as_deref()));
        let mut probes = JoinSet::new();
        for member in runtime.pool.members() {
            let slot = member.slot.clone();
            let probe = probe.clone();
            let settings = settings.clone();
            probes.spawn(async move {
                let backend = Backend {
                    addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(slot.addr),
                    weight: 1,
                    ext: Default::default(),
                };
                let started = slot.begin_check();
                let result = tokio::time::timeout(settings.timeout, probe.check(&backend)).await;
                let key_refused = matches!(
                    &result,
                    Ok(Err(e)) if matches!(e.etype(), ErrorType::CustomCode(KEY_REFUSED, _))
                );
                slot.set_key_refused(key_refused);
                let error = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!(
                        "no answer within {}",
                        humantime::format_duration(settings.timeout)
                    )),
                };
                let flipped = slot.observe_check(
                    started,
                    error.is_none(),
                    settings.healthy_after,
                    settings.unhealthy_after,
                );
                match (flipped, error) {
                    (Some(true), _) => {
                        tracing::info!(backend = %slot.label, "backend is healthy again")
                    }
                    (Some(false), Some(error)) => {
                        tracing::warn!(backend = %slot.label, %error, "backend became unhealthy")
                    }
                    _ => {}
                }
            });
        }
        while probes.join_next().await.is_some() {}
    }
}

/// The error of a check the worker answered, refusing the key check (its reason in
/// `X-Custodia-Health`).
const KEY_REFUSED: &str = "key check refused";

fn probe_for(settings: &HealthSettings, key_check: Option<&str>) -> HttpHealthCheck {
    let mut probe = HttpHealthCheck::new("localhost", false);
    if let Some(token) = key_check {
        // Base64url and dots: always a valid header value.
        let _ = probe
            .req
            .insert_header(custodia_identity::KEY_CHECK_HEADER, token);
    }
    // Any 200 passes; a worker saying why it does not is quoted in the log.
    probe.validator = Some(Box::new(|answer: &ResponseHeader| {
        if answer.status == 200 {
            return Ok(());
        }
        let status = answer.status.as_u16();
        match answer
            .headers
            .get(custodia_identity::HEALTH_PROBLEM_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(why) => Error::e_explain(
                ErrorType::CustomCode(KEY_REFUSED, status),
                format!("status {status}: {why}"),
            ),
            None => Error::e_explain(
                ErrorType::CustomCode("non 200 code", status),
                format!("status {status}"),
            ),
        }
    }));
    probe.peer_template.options.connection_timeout = Some(settings.timeout);
    probe.peer_template.options.read_timeout = Some(settings.timeout);
    probe.peer_template.options.write_timeout = Some(settings.timeout);
    probe.req.set_uri(
        settings
            .path
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/")),
    );
    // Thresholds are applied by BackendSlot::observe_health, not by the probe.
    probe.consecutive_success = 1;
    probe.consecutive_failure = 1;
    probe
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let interval = self.runtime.load().config.upstream.health.interval;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.check_all() => {}
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(interval.max(Duration::from_millis(50))) => {}
            }
        }
    }
}
