//! Hot reload: SIGHUP (or `custodia-proxy --config FILE --reload`) re-reads the TOML, validates
//! it and swaps a new [`Runtime`] in; DNS re-resolution ([`crate::discovery`]) swaps through
//! the same path. Requests keep the snapshot they started with; backends that stay keep their
//! slots (in-flight counters, health) through the [`SlotRegistry`].
//!
//! ```text
//!  SIGHUP ──▶ read + validate FILE ──▶ keep startup-only settings ──▶ Runtime::build(gen + 1)
//!               │ invalid: log key + line,                              │
//!               ▼ failure metric, old config serves                     ▼ ArcSwap::store
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::balancer::SlotRegistry;
use crate::config::{self, ConfigError, ProxyConfig};
use crate::metrics;
use crate::runtime::{Resolution, Runtime, RuntimeError, SharedRuntime};

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Swaps runtimes, one change at a time.
pub struct Reloader {
    shared: SharedRuntime,
    registry: Arc<SlotRegistry>,
    /// Serialises reloads and rediscovery, so generations never race.
    lock: Mutex<()>,
    /// Pingora's attempt limit, fixed at start (`max_retries` of its `ServerConf`).
    max_attempts: usize,
}

/// A successful swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    /// Changed settings that only an upgrade (or restart) applies; their old values stay.
    pub need_upgrade: Vec<&'static str>,
}

impl Reloader {
    pub fn new(
        shared: SharedRuntime,
        registry: Arc<SlotRegistry>,
        max_attempts: usize,
    ) -> Reloader {
        Reloader {
            shared,
            registry,
            lock: Mutex::new(()),
            max_attempts,
        }
    }

    pub fn shared(&self) -> &SharedRuntime {
        &self.shared
    }

    /// Re-read the file the running configuration came from and swap it in. Blocking (file and
    /// DNS); call it from a blocking thread.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.load_full();
        let fresh = config::load(&current.config.source)?;
        self.swap_config(&current, fresh)
    }

    /// Swap in an already validated configuration (the body of [`Reloader::reload`]).
    pub fn apply(&self, fresh: ProxyConfig) -> Result<Reloaded, ReloadError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.load_full();
        self.swap_config(&current, fresh)
    }

    fn swap_config(&self, current: &Runtime, fresh: ProxyConfig) -> Result<Reloaded, ReloadError> {
        let (config, need_upgrade) =
            keep_startup_settings(&current.config, fresh, self.max_attempts);
        let generation = current.generation + 1;
        let runtime = Runtime::build(config, &self.registry, generation, Some(current))?;
        self.shared.store(Arc::new(runtime));
        Ok(Reloaded {
            generation,
            need_upgrade,
        })
    }

    /// Reload and report: the log line, the metrics. Returns whether it succeeded.
    pub fn reload_and_report(&self) -> bool {
        let before = self.shared.load();
        let (source, cap_before) = (
            before.config.source.clone(),
            before.config.limits.max_connections,
        );
        drop(before);
        match self.reload() {
            Ok(done) => {
                metrics::config().reload_success.inc();
                metrics::config().loaded_now();
                let runtime = self.shared.load();
                // A raised cap may need more open files than the start asked for.
                if runtime.config.limits.max_connections > cap_before {
                    crate::open_files::ensure(&runtime.config);
                }
                tracing::info!(
                    file = %source.display(),
                    generation = done.generation,
                    backends = runtime.pool.members().len(),
                    balance = runtime.config.upstream.balance.as_str(),
                    "configuration reloaded"
                );
                for key in &done.need_upgrade {
                    if *key == "upstream.retries" {
                        // Raised past what Pingora was started with: the new value, as far as
                        // it can go.
                        tracing::warn!(
                            key = *key,
                            retries = runtime.config.upstream.retries,
                            "`{key}` is higher than a running process can go: {} retries until \
                             an upgrade (custodia-proxy --upgrade) or restart",
                            runtime.config.upstream.retries
                        );
                        continue;
                    }
                    tracing::warn!(
                        key = *key,
                        "`{key}` changed but cannot change in a running process: the old value stays until an upgrade (custodia-proxy --upgrade) or restart"
                    );
                }
                true
            }
            Err(e) => {
                metrics::config().reload_failure.inc();
                let (line, key) = match &e {
                    ReloadError::Config(ConfigError::Invalid { line, key, .. }) => {
                        (*line, key.as_str())
                    }
                    _ => (None, ""),
                };
                tracing::error!(
                    file = %source.display(),
                    line = line.unwrap_or(0),
                    key,
                    error = %e,
                    "reload refused; the running configuration keeps serving"
                );
                false
            }
        }
    }

    /// Re-resolve the backends of the running configuration; swap a new runtime in when the
    /// addresses changed. Returns the new generation, if any. Blocking (DNS).
    pub fn rediscover(
        &self,
        lookup: impl Fn(
            &config::BackendTarget,
        ) -> Result<Vec<std::net::SocketAddr>, crate::runtime::ResolveError>,
    ) -> Result<Option<u64>, RuntimeError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.load_full();
        let resolution = Resolution::resolve(
            &current.config.upstream.backends,
            Some(&current.resolution),
            lookup,
        );
        if resolution.same_addresses(&current.resolution) {
            return Ok(None);
        }
        let generation = current.generation + 1;
        let runtime = Runtime::assemble(
            current.config.clone(),
            resolution,
            &self.registry,
            generation,
            Some(&current),
        )?;
        self.shared.store(Arc::new(runtime));
        Ok(Some(generation))
    }
}

/// The settings Pingora or the process fixed at start are taken from `running`; returns the
/// keys of those that differ in `fresh`.
pub fn keep_startup_settings(
    running: &ProxyConfig,
    mut fresh: ProxyConfig,
    max_attempts: usize,
) -> (ProxyConfig, Vec<&'static str>) {
    let mut changed = Vec::new();
    let (old, new) = (&running.server, &fresh.server);
    let checks: [(&'static str, bool); 5] = [
        ("server.listen", old.listen != new.listen),
        ("server.threads", old.threads != new.threads),
        ("server.grace_period", old.grace_period != new.grace_period),
        ("server.pid_file", old.pid_file != new.pid_file),
        ("server.upgrade_sock", old.upgrade_sock != new.upgrade_sock),
    ];
    changed.extend(checks.iter().filter(|(_, c)| *c).map(|(k, _)| *k));
    // Only the keep-alive timeout and the fast path switch of [server] are read per request.
    fresh.server = config::ServerSettings {
        keepalive_timeout: fresh.server.keepalive_timeout,
        fast_path: fresh.server.fast_path,
        ..running.server.clone()
    };
    if running.admin != fresh.admin {
        changed.push("admin.listen");
        fresh.admin = running.admin.clone();
    }
    if running.log.level != fresh.log.level {
        changed.push("log.level");
        fresh.log.level = running.log.level.clone();
    }
    if running.log.format != fresh.log.format {
        changed.push("log.format");
        fresh.log.format = running.log.format;
    }
    if crate::server::attempts_for(fresh.upstream.retries) > max_attempts {
        changed.push("upstream.retries");
        let most = max_attempts.saturating_sub(crate::server::attempts_for(0));
        fresh.upstream.retries = u32::try_from(most).unwrap_or(u32::MAX);
    }
    (fresh, changed)
}

/// A SIGHUP that came before [`SignalReload`] watched for them. The pid file is written, so
/// `--reload` and config watchers can signal, before Pingora starts the services; such a
/// signal must neither kill the process (SIGHUP's default) nor be lost.
static EARLY_HANGUP: AtomicBool = AtomicBool::new(false);
static EARLY_WATCH: Mutex<Option<signal_hook_registry::SigId>> = Mutex::new(None);

/// Remember SIGHUPs from now until the reload service starts watching them (first thing at
/// start); that service then reloads once for them.
pub fn remember_early_hangups() -> std::io::Result<()> {
    // SAFETY: the action is one atomic store, which is async-signal-safe.
    let id = unsafe {
        signal_hook_registry::register(libc::SIGHUP, || EARLY_HANGUP.store(true, Ordering::SeqCst))
    }?;
    *EARLY_WATCH.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    Ok(())
}

/// Stop remembering (the reload service watches now) and say whether a SIGHUP came before.
fn take_early_hangup() -> bool {
    if let Some(id) = EARLY_WATCH.lock().unwrap_or_else(|p| p.into_inner()).take() {
        signal_hook_registry::unregister(id);
    }
    EARLY_HANGUP.swap(false, Ordering::SeqCst)
}

/// The SIGHUP watcher: one reload per signal (signals that arrive during a reload coalesce).
pub struct SignalReload {
    reloader: Arc<Reloader>,
}

impl SignalReload {
    pub fn new(reloader: Arc<Reloader>) -> SignalReload {
        SignalReload { reloader }
    }
}

#[async_trait]
impl BackgroundService for SignalReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGHUP: reload by signal is off");
                return;
            }
        };
        if take_early_hangup() {
            tracing::info!("SIGHUP during start: reloading the configuration");
            self.reload().await;
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                received = hangups.recv() => {
                    if received.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: reloading the configuration");
                    self.reload().await;
                }
            }
        }
    }
}

impl SignalReload {
    async fn reload(&self) {
        let reloader = self.reloader.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || reloader.reload_and_report()).await {
            tracing::error!(error = %e, "the reload task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = "[server]\nlisten = \"127.0.0.1:8080\"\nthreads = 2\n\
        [upstream]\nbackends = [\"127.0.0.1:9001\"]\n[admin]\nlisten = \"127.0.0.1:9090\"\n";

    fn parse(text: &str) -> ProxyConfig {
        config::parse(text, Path::new("t.toml")).unwrap()
    }

    fn shared(text: &str) -> (Reloader, SharedRuntime) {
        let registry = Arc::new(SlotRegistry::new());
        let runtime = Runtime::build(parse(text), &registry, 1, None).unwrap();
        let shared: SharedRuntime = Arc::new(arc_swap::ArcSwap::from_pointee(runtime));
        (Reloader::new(shared.clone(), registry, 8), shared)
    }

    #[test]
    fn startup_settings_keep_their_running_values() {
        let running = parse(BASE);
        let fresh = parse(
            "[server]\nlisten = \"127.0.0.1:8081\"\nthreads = 3\nkeepalive_timeout = \"5s\"\n\
             [upstream]\nbackends = [\"127.0.0.1:9002\"]\nretries = 20\n\
             [admin]\nlisten = \"127.0.0.1:9091\"\n[log]\nlevel = \"debug\"\n",
        );
        let (kept, changed) = keep_startup_settings(&running, fresh, 9);
        assert_eq!(
            changed,
            vec![
                "server.listen",
                "server.threads",
                "admin.listen",
                "log.level",
                "upstream.retries"
            ]
        );
        assert_eq!(kept.server.listen, running.server.listen);
        assert_eq!(kept.server.threads, 2);
        assert_eq!(
            kept.server.keepalive_timeout.as_secs(),
            5,
            "live setting applied"
        );
        assert_eq!(kept.admin, running.admin);
        assert_eq!(kept.log.level, "info");
        assert_eq!(kept.upstream.retries, 7);
        assert_eq!(kept.upstream.backends[0].port, 9002, "live setting applied");
    }

    #[test]
    fn a_swap_bumps_the_generation_and_keeps_staying_slots() {
        let (reloader, shared) = shared(BASE);
        let before = shared.load_full();
        let lease = before.pool.pick(&[]).unwrap();
        let done = reloader
            .apply(parse(
                "[server]\nlisten = \"127.0.0.1:8080\"\nthreads = 2\n\
                 [upstream]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n\
                 [admin]\nlisten = \"127.0.0.1:9090\"\n",
            ))
            .unwrap();
        assert_eq!(done.generation, 2);
        assert!(done.need_upgrade.is_empty());
        let after = shared.load_full();
        assert_eq!(after.generation, 2);
        assert_eq!(after.pool.members().len(), 2);
        let kept = &after.pool.members()[0].slot;
        assert!(Arc::ptr_eq(kept, lease.slot()), "the same slot object");
        assert_eq!(
            kept.in_flight(),
            1,
            "the in-flight count survived the reload"
        );
        drop(lease);
        assert_eq!(kept.in_flight(), 0);
        // The old snapshot is still whole for requests that hold it.
        assert_eq!(before.pool.members().len(), 1);
    }

    #[test]
    fn rediscovery_swaps_only_when_addresses_change() {
        let (reloader, shared) = shared(BASE);
        let same = |_: &config::BackendTarget| Ok(vec!["127.0.0.1:9001".parse().unwrap()]);
        assert_eq!(reloader.rediscover(same).unwrap(), None);
        let moved = |_: &config::BackendTarget| {
            Ok(vec![
                "127.0.0.1:9001".parse().unwrap(),
                "127.0.0.2:9001".parse().unwrap(),
            ])
        };
        assert_eq!(reloader.rediscover(moved).unwrap(), Some(2));
        assert_eq!(shared.load().pool.members().len(), 2);
        let failing = |t: &config::BackendTarget| {
            Err(crate::runtime::ResolveError {
                target: t.to_string(),
                reason: "SERVFAIL".into(),
            })
        };
        assert_eq!(
            reloader.rediscover(failing).unwrap(),
            None,
            "last good set kept"
        );
        assert_eq!(shared.load().pool.members().len(), 2);
    }

    /// Found by a race audit: the pid file is written before Pingora starts the reload
    /// service, and a SIGHUP in between (`--reload` right after the start) was ignored.
    #[tokio::test]
    async fn a_sighup_before_the_reload_service_starts_is_reloaded_for_when_it_starts() {
        let path =
            std::env::temp_dir().join(format!("custodia-early-sighup-{}.toml", std::process::id()));
        std::fs::write(&path, BASE).unwrap();
        let registry = Arc::new(SlotRegistry::new());
        let runtime = Runtime::build(config::load(&path).unwrap(), &registry, 1, None).unwrap();
        let shared: SharedRuntime = Arc::new(arc_swap::ArcSwap::from_pointee(runtime));
        let service = SignalReload::new(Arc::new(Reloader::new(shared.clone(), registry, 8)));

        remember_early_hangups().unwrap();
        // SAFETY: raising a signal this process handles (the line above).
        assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let watching = tokio::spawn(async move { service.start(shutdown).await });
        let mut generation = 1;
        for _ in 0..200 {
            generation = shared.load().generation;
            if generation > 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        stop.send(true).unwrap();
        watching.await.unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(generation, 2, "one reload for the early SIGHUP");
    }
}
