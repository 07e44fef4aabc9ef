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
                    Ok(Err(e)) => Some(check_failure(&e)),
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

/// What went wrong with a check, in words an operator acts on: Pingora's own text nests
/// every layer's context (" ConnectRefused context: Fail to connect to … cause:  context: …").
fn check_failure(e: &Error) -> String {
    let what = match e.etype() {
        ErrorType::ConnectRefused => "connection refused: is the worker running on this address?",
        ErrorType::ConnectTimedout => "no connection within the check's timeout",
        ErrorType::ConnectNoRoute => "no route to the backend's address",
        ErrorType::ConnectError | ErrorType::SocketError => "cannot connect",
        ErrorType::ConnectionClosed => "the backend closed the connection without answering",
        ErrorType::ReadTimedout => "no answer within the check's timeout",
        ErrorType::WriteTimedout | ErrorType::WriteError => "cannot send the check",
        ErrorType::ReadError => "the answer could not be read",
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error => "the answer is not valid HTTP/1",
        // Ours (the validator's): the status, and the worker's reason when it gave one.
        ErrorType::CustomCode(_, _) => {
            return e
                .context
                .as_ref()
                .map_or_else(|| e.reason_str().to_string(), |c| c.as_str().to_string())
        }
        _ => return format!("{}: {}", e.reason_str(), e.root_cause()),
    };
    what.to_string()
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A check's failure reads as what to look at, not as Pingora's nested contexts.
    #[tokio::test]
    async fn a_failed_check_says_what_went_wrong_in_words() {
        // Port 1 (tcpmux): nothing listens there. A port bound and released could be taken by
        // a test running beside this one.
        let closed: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let config = crate::config::parse(
            "[upstream]\nbackends = [\"127.0.0.1:1\"]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let settings = config.upstream.health;
        let probe = probe_for(&settings, None);
        let backend = Backend {
            addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(closed),
            weight: 1,
            ext: Default::default(),
        };
        let error = probe.check(&backend).await.unwrap_err();
        assert_eq!(
            check_failure(&error),
            "connection refused: is the worker running on this address?"
        );
        let refused = Error::explain(
            ErrorType::CustomCode(KEY_REFUSED, 503),
            "status 503: this worker has no identity assertion key",
        );
        assert_eq!(
            check_failure(&refused),
            "status 503: this worker has no identity assertion key"
        );
    }
}
