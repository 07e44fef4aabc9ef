//! The end of a graceful shutdown (SIGTERM, or the old process after `--upgrade` + SIGQUIT):
//! as soon as no client connection is left, not when `server.grace_period` runs out.
//!
//! Pingora 0.9 sleeps the whole grace period whatever is left to drain, so every `docker
//! stop` and rolling update waited it out with nothing to wait for. nginx exits once its
//! connections are done; so does this, as the last thing it does: idle keep-alive and parked
//! connections are closed at once when shutdown begins (`connection`, `parking`), answers in
//! flight end with `Connection: close`, and a tunnel (WebSocket) holds the process until it
//! closes or the grace period ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

/// How often the count of open client connections is looked at while draining.
const POLL: Duration = Duration::from_millis(50);

/// Exits the process once a shutdown has begun and every client connection has closed.
pub struct ExitWhenDrained {
    open: Arc<AtomicUsize>,
    pid_file: PathBuf,
}

impl ExitWhenDrained {
    /// `open` counts the client connections of every worker thread.
    pub fn new(open: Arc<AtomicUsize>, pid_file: PathBuf) -> ExitWhenDrained {
        ExitWhenDrained { open, pid_file }
    }
}

#[async_trait]
impl BackgroundService for ExitWhenDrained {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if !*shutdown.borrow() && shutdown.changed().await.is_err() {
            return;
        }
        while self.open.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(POLL).await;
        }
        tracing::info!("graceful shutdown: every client connection has closed; exiting");
        crate::server::remove_pid_file(&self.pid_file);
        std::process::exit(0);
    }
}
