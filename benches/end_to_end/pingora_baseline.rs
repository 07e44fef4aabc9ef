//! The floor Custodia is built on: Pingora 0.9 proxying with nothing of ours, as the issue's
//! "naive Pingora proxy" was measured — pingora-proxy's load-balancer example, round robin over
//! the same workers, one service with 2 threads, every other setting Pingora's default.
//!
//! It runs in a child process (this bench binary, re-executed with [`ROLE_ARG`]) so its CPU time
//! is measured like any other proxy's. The gap between it and nginx is Pingora's own; the gap
//! between it and Custodia is what Custodia's edge (limits, session check, headers, metrics) costs.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::LoadBalancer;
use pingora_proxy::{ProxyHttp, Session};

/// `end_to_end --pingora-baseline <listen> <backend>...` runs the baseline proxy.
pub const ROLE_ARG: &str = "--pingora-baseline";

struct RoundRobinProxy(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for RoundRobinProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let backend = self
            .0
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no backend"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

/// Serve on `listen` until killed (the bench's drop guard does).
pub fn run(listen: SocketAddr, backends: &[SocketAddr]) -> ! {
    let mut server = Server::new(None).expect("pingora server");
    server.bootstrap();
    let pool = LoadBalancer::try_from_iter(backends).expect("backends");
    let mut service =
        pingora_proxy::http_proxy_service(&server.configuration, RoundRobinProxy(Arc::new(pool)));
    service.threads = Some(2);
    service.add_tcp(&listen.to_string());
    server.add_service(service);
    server.run_forever()
}
