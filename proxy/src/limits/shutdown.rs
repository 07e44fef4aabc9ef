//! Server shutdown as one worker thread's connections see it.
//!
//! Pingora announces shutdown on one `watch` channel for the whole process. Asking it per
//! request is costly on the hot path: reading its value takes the channel's read lock, and
//! waiting for a change registers with one of its shared wait lists and leaves it again —
//! atomic writes to cache lines that every thread's connections write, each fetched from the
//! other core. Each worker thread has a [`ShutdownSignal`] of its own, shared by its
//! [`ConnectionGate`](super::ConnectionGate) and its edge: one task relays the channel to it,
//! and the requests of that thread read a flag and wait on a list nobody else touches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pingora_core::server::ShutdownWatch;
use tokio::sync::Notify;

/// Whether the server is shutting down, and a way to wait until it is.
///
/// A hand-over of the listeners to a new process (`--upgrade`) counts as shutting down for
/// keep-alive (answers say `Connection: close`, idle connections close) but not for a new
/// connection's first request: the old process still accepts on the shared listeners for a
/// few seconds, and closing those connections unanswered would reset them.
#[derive(Debug, Default)]
pub struct ShutdownSignal {
    shutting_down: AtomicBool,
    handing_over: AtomicBool,
    /// Wakes the connections waiting in [`ShutdownSignal::begun`].
    waiters: Notify,
    /// The relay from Pingora's channel is running (started by the first connection).
    relayed: AtomicBool,
}

impl ShutdownSignal {
    pub fn new() -> Arc<ShutdownSignal> {
        Arc::new(ShutdownSignal::default())
    }

    /// Start relaying `watch` here, once: the first call spawns the task (on the caller's
    /// runtime, the thread this signal serves), later calls only read a flag. A channel whose
    /// sender is gone counts as shutdown: the server that would announce it is gone too.
    pub fn follow(self: &Arc<ShutdownSignal>, watch: &ShutdownWatch) {
        if self.relayed.load(Ordering::Relaxed) || self.relayed.swap(true, Ordering::Relaxed) {
            return;
        }
        let signal = self.clone();
        let mut watch = watch.clone();
        tokio::spawn(async move {
            while !*watch.borrow_and_update() {
                if watch.changed().await.is_err() {
                    break;
                }
            }
            signal.announce();
        });
    }

    /// Shutdown has begun: close idle connections, keep no more alive.
    pub fn announce(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.waiters.notify_waiters();
    }

    /// The listeners are being handed to a new process: keep no connection alive, but serve
    /// the connections still accepted here.
    pub fn announce_hand_over(&self) {
        self.handing_over.store(true, Ordering::SeqCst);
        self.waiters.notify_waiters();
    }

    /// Shutdown or a hand-over has begun: no connection is kept alive.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst) || self.handing_over.load(Ordering::SeqCst)
    }

    /// Shutdown proper has begun: idle keep-alive connections close, and a new connection's
    /// first request is waited for only a moment.
    pub fn is_stopping(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Ready once shutdown proper has begun (at once if it has already).
    pub async fn stopping(&self) {
        loop {
            // Registered before the flag is read: an announcement between the two still wakes
            // this wait (a `Notified` sees every `notify_waiters` after its creation).
            let announced = self.waiters.notified();
            if self.is_stopping() {
                return;
            }
            announced.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_end_when_shutdown_is_announced() {
        let signal = ShutdownSignal::new();
        let waits: Vec<_> = (0..3)
            .map(|_| {
                let signal = signal.clone();
                tokio::spawn(async move { signal.stopping().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(!signal.is_shutting_down());
        for wait in &waits {
            assert!(!wait.is_finished(), "nothing announced yet");
        }
        signal.announce();
        for wait in waits {
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .expect("a waiting connection hears of the shutdown")
                .unwrap();
        }
        assert!(signal.is_shutting_down());
        // A wait that starts after the announcement ends at once.
        tokio::time::timeout(Duration::from_secs(10), signal.stopping())
            .await
            .expect("shutdown already begun");
    }

    /// A hand-over ends keep-alive but is not shutdown proper: waits for it go on.
    #[tokio::test]
    async fn a_hand_over_ends_keep_alive_but_not_the_wait_for_shutdown() {
        let signal = ShutdownSignal::new();
        signal.announce_hand_over();
        assert!(signal.is_shutting_down() && !signal.is_stopping());
        let wait = tokio::spawn({
            let signal = signal.clone();
            async move { signal.stopping().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!wait.is_finished(), "still serving during the hand-over");
        signal.announce();
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("shutdown proper ends it")
            .unwrap();
    }

    #[tokio::test]
    async fn the_relay_follows_pingoras_channel() {
        let (tell, watch) = tokio::sync::watch::channel(false);
        let signal = ShutdownSignal::new();
        signal.follow(&watch);
        signal.follow(&watch);
        tokio::task::yield_now().await;
        assert!(!signal.is_shutting_down());
        tell.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), signal.stopping())
            .await
            .expect("relayed");
        assert!(signal.is_shutting_down());
    }

    #[tokio::test]
    async fn a_channel_without_sender_counts_as_shutdown() {
        let (tell, watch) = tokio::sync::watch::channel(false);
        let signal = ShutdownSignal::new();
        signal.follow(&watch);
        drop(tell);
        tokio::time::timeout(Duration::from_secs(10), signal.stopping())
            .await
            .expect("a gone server shuts its connections");
    }
}
