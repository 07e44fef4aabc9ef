//! DNS discovery: backends written as `name:port` are re-resolved every
//! `upstream.discovery_interval`; every address becomes a backend, so scaling a compose service
//! or a headless Kubernetes Service needs no config change. A failed lookup keeps the last good
//! addresses (see [`crate::runtime::Resolution::resolve`]). Changes go through the same swap as
//! a reload ([`Reloader::rediscover`]), bumping the generation.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::reload::Reloader;
use crate::runtime;

/// The background task; one per process.
pub struct Discovery {
    reloader: Arc<Reloader>,
}

impl Discovery {
    pub fn new(reloader: Arc<Reloader>) -> Discovery {
        Discovery { reloader }
    }

    /// One round: re-resolve if the running configuration has names. Blocking (DNS).
    pub fn round(reloader: &Reloader) {
        let has_names = reloader
            .shared()
            .load()
            .config
            .upstream
            .backends
            .iter()
            .any(runtime::is_name);
        if !has_names {
            return;
        }
        match reloader.rediscover(runtime::resolve) {
            Ok(Some(generation)) => {
                let runtime = reloader.shared().load();
                let backends: Vec<&str> = runtime
                    .pool
                    .members()
                    .iter()
                    .map(|m| m.slot.label.as_str())
                    .collect();
                tracing::info!(
                    generation,
                    backends = %backends.join(", "),
                    "DNS discovery changed the backend set"
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "DNS discovery round failed; the pool is unchanged")
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let interval = self
                .reloader
                .shared()
                .load()
                .config
                .upstream
                .discovery_interval;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(interval.max(Duration::from_millis(100))) => {}
            }
            let reloader = self.reloader.clone();
            let round = tokio::task::spawn_blocking(move || Discovery::round(&reloader));
            tokio::select! {
                _ = shutdown.changed() => return,
                done = round => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "the DNS discovery task failed");
                    }
                }
            }
        }
    }
}
