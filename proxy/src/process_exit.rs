//! How the process ends: at once on SIGINT, and on SIGTERM (or for the old process of an
//! upgrade) as soon as no client connection is left, not when `server.grace_period` runs out.
//!
//! Pingora 0.9 does both badly. After SIGTERM it sleeps the whole grace period whatever is
//! left to drain, so every `docker stop` and rolling update waited it out with nothing to wait
//! for; nginx exits once its connections are done, and so does this: idle keep-alive and
//! parked connections close at once when shutdown begins (`limits::connection`, `parking`),
//! answers in flight end with `Connection: close`, and a tunnel (WebSocket) holds the process
//! until it closes or the grace period ends. After SIGINT it shuts its runtimes down under
//! running tasks, and a listener's accept loop can spin on "runtime is being shut down"
//! errors without yielding (millions of log lines), so the process never exits.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{ExecutionPhase, ShutdownWatch};
use pingora_core::services::background::BackgroundService;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::Mutex;

/// How often the count of open client connections is looked at while draining.
const POLL: Duration = Duration::from_millis(50);

/// Ends the process: at once on SIGINT, or once a graceful shutdown is in its grace period and
/// every client connection has closed.
pub struct ProcessExit {
    open: Arc<AtomicUsize>,
    pid_file: PathBuf,
    phases: Mutex<broadcast::Receiver<ExecutionPhase>>,
}

impl ProcessExit {
    /// `open` counts the client connections of every worker thread; `phases` is the server's
    /// (`Server::watch_execution_phase`).
    pub fn new(
        open: Arc<AtomicUsize>,
        pid_file: PathBuf,
        phases: broadcast::Receiver<ExecutionPhase>,
    ) -> ProcessExit {
        ProcessExit {
            open,
            pid_file,
            phases: Mutex::new(phases),
        }
    }

    fn exit_now(&self, why: &str) -> ! {
        tracing::info!("{why}; exiting");
        crate::server::remove_pid_file(&self.pid_file);
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: `_exit` ends the process without running exit handlers: Pingora's threads
        // are still running, and handlers (the allocator's among them) must not run beside
        // them. Everything worth keeping has been written above.
        unsafe { libc::_exit(0) }
    }
}

/// The next SIGINT; never, when it cannot be watched.
async fn interrupted(interrupt: &mut Option<Signal>) {
    match interrupt {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[async_trait]
impl BackgroundService for ProcessExit {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let mut interrupt = match signal(SignalKind::interrupt()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGINT: Pingora's own stop applies");
                None
            }
        };
        let mut phases = self.phases.lock().await;
        // Only the grace period of a graceful shutdown is cut short: an upgrade hands its
        // sockets over before it begins.
        loop {
            tokio::select! {
                _ = interrupted(&mut interrupt) => self.exit_now("SIGINT: stopping at once"),
                phase = phases.recv() => match phase {
                    Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                },
            }
        }
        while self.open.load(Ordering::Relaxed) > 0 {
            tokio::select! {
                _ = interrupted(&mut interrupt) => self.exit_now("SIGINT while draining: stopping at once"),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        self.exit_now("graceful shutdown: every client connection has closed");
    }
}
