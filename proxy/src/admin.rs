//! The admin listener: `/metrics`, `/healthz`, `/readyz`, served apart from public traffic.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::runtime::SharedRuntime;

pub struct AdminApp {
    runtime: SharedRuntime,
    registry: Registry,
}

impl AdminApp {
    pub fn new(runtime: SharedRuntime) -> AdminApp {
        let registry = crate::metrics::registry(runtime.clone());
        AdminApp { runtime, registry }
    }

    /// Why the proxy cannot serve traffic right now, if it cannot: every reason at once, so
    /// whoever fixes the first does not learn of the next only then.
    pub fn not_ready_reason(&self) -> Option<String> {
        let runtime = self.runtime.load();
        let pool = &runtime.pool;
        let waiting = runtime.resolution.waiting();
        let mut reasons = Vec::new();
        if pool.members().is_empty() && !waiting.is_empty() {
            reasons.push(format!(
                "no backend address yet: {} does not resolve",
                waiting.join(", ")
            ));
        } else {
            // Every backend out of rotation: not ready, unless one answers its checks again
            // (on its way back, and served by the pool's fallback already) or refuses only the
            // key check (degraded, below). A fixed pool must not fail every proxy's readiness
            // probe for the `healthy_after` checks it takes to be back in rotation.
            let answering =
                |m: &crate::balancer::Member| m.slot.is_key_refused() || m.slot.passed_last_check();
            if pool.healthy_count() == 0 && !pool.members().iter().any(answering) {
                reasons.push(format!(
                    "no healthy backend (0 of {} pass health checks)",
                    pool.members().len()
                ));
            }
        }
        if let Some(auth) = &runtime.auth {
            if !auth.oidc.is_ready() {
                reasons.push(format!(
                    "identity provider metadata not loaded yet ({})",
                    auth.oidc.issuer()
                ));
            }
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Why the proxy serves worse than it should, while it serves: every worker runs but
    /// refuses the proxy's key check (a key change rolled out in the wrong order, a worker
    /// without the key). The pool then falls back to them all and signed-in users are served
    /// as guests, as before the key check existed; taking the site down instead (a readiness
    /// probe failing on every proxy) would serve no one.
    pub fn degraded_reason(&self) -> Option<String> {
        let runtime = self.runtime.load();
        let pool = &runtime.pool;
        let refusing: Vec<&str> = pool
            .members()
            .iter()
            .filter(|m| m.slot.is_key_refused())
            .map(|m| m.slot.label.as_str())
            .collect();
        (pool.healthy_count() == 0 && !refusing.is_empty()).then(|| {
            format!(
                "no backend verifies the proxy's identity assertions ({} refuse its key check, \
                 see the log): signed-in users are served as guests",
                refusing.join(", ")
            )
        })
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        let encoder = TextEncoder::new();
        let mut body = Vec::with_capacity(8 * 1024);
        match encoder.encode(&self.registry.gather(), &mut body) {
            Ok(()) => reply(StatusCode::OK, encoder.format_type(), body),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("cannot encode metrics: {e}\n").into_bytes(),
            ),
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    let len = response.body().len();
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    response
}

fn text(status: StatusCode, body: String) -> Response<Vec<u8>> {
    reply(status, "text/plain; charset=utf-8", body.into_bytes())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Idle admin connections close soon (Pingora keeps them 60 s): a scraper reconnects,
        // and a connection never runs into the gate's lifetime while a request is under way
        // unless it is kept busy that long.
        session.set_keepalive(Some(crate::limits::ADMIN_KEEPALIVE.as_secs()));
        let req = session.req_header();
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        }
        match req.uri.path() {
            "/metrics" => self.metrics(),
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => match self.not_ready_reason() {
                None => match self.degraded_reason() {
                    None => text(StatusCode::OK, "ready\n".into()),
                    Some(why) => text(StatusCode::OK, format!("ready, degraded: {why}\n")),
                },
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn admin_over(backends: &str) -> (AdminApp, SharedRuntime) {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nbackends = [{backends}]\n\
             [admin]\nlisten = \"127.0.0.1:9090\"\n"
        );
        let config = crate::config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let registry = Arc::new(crate::balancer::SlotRegistry::new());
        let runtime = crate::runtime::Runtime::build(config, &registry, 1, None).unwrap();
        let shared: SharedRuntime = Arc::new(arc_swap::ArcSwap::from_pointee(runtime));
        (AdminApp::new(shared.clone()), shared)
    }

    /// Every reason at once: the identity provider's too, while no backend is healthy.
    #[test]
    fn not_ready_says_every_reason() {
        let text =
            "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[admin]\nlisten = \"127.0.0.1:9090\"\n\
                    [auth]\nissuer = \"http://127.0.0.1:9/\"\nclient_id = \"c\"\n\
                    public_url = \"http://127.0.0.1:8080\"\n";
        let env: std::collections::HashMap<String, String> = [
            ("AUTH0_CLIENT_SECRET", "client-secret"),
            ("APP_SECRET_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config =
            crate::config::parse_with_env(text, std::path::Path::new("t.toml"), &env).unwrap();
        let registry = Arc::new(crate::balancer::SlotRegistry::new());
        let runtime = crate::runtime::Runtime::build(config, &registry, 1, None).unwrap();
        let shared: SharedRuntime = Arc::new(arc_swap::ArcSwap::from_pointee(runtime));
        let admin = AdminApp::new(shared.clone());
        let idp = admin.not_ready_reason().expect("the IdP is not loaded");
        assert_eq!(
            idp,
            "identity provider metadata not loaded yet (http://127.0.0.1:9/)"
        );
        shared.load().pool.members()[0].slot.mark_failed();
        let both = admin.not_ready_reason().expect("not ready");
        assert_eq!(
            both,
            "no healthy backend (0 of 1 pass health checks); identity provider metadata not \
             loaded yet (http://127.0.0.1:9/)"
        );
    }

    /// Found by a race audit: workers fixed after refusing the key check (or back after all
    /// were down) pass their checks but are out of rotation for `healthy_after` of them; the
    /// proxy serves them meanwhile, so it stays ready.
    #[test]
    fn a_pool_that_answers_its_checks_again_is_ready_before_it_is_back_in_rotation() {
        let (admin, shared) = admin_over("\"127.0.0.1:9301\", \"127.0.0.1:9302\"");
        let runtime = shared.load_full();
        let (a, b) = (
            &runtime.pool.members()[0].slot,
            &runtime.pool.members()[1].slot,
        );
        assert_eq!(admin.not_ready_reason(), None);
        a.mark_failed();
        b.mark_failed();
        let down = admin
            .not_ready_reason()
            .expect("every backend down: not ready");
        assert!(down.contains("no healthy backend"), "{down}");
        // One check passed, of the two that bring it back.
        assert_eq!(b.observe_health(true, 2, 2), None);
        assert!(!b.is_healthy());
        assert_eq!(admin.not_ready_reason(), None, "it answers again");
        // A request that cannot connect after that check says otherwise.
        b.mark_failed();
        assert!(admin.not_ready_reason().is_some());
    }
}
