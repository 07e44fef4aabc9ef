//! Limits for the admin listener: a cap on its open connections and a lifetime for each.
//!
//! The admin listener serves Prometheus and probes, a handful of connections. Without limits,
//! anything that can reach it (in Kubernetes, any pod: it listens on all interfaces there) could
//! hold open connections until the process ran out of file descriptors, and then the public
//! listener could accept nothing either; a client trickling a header line every few seconds
//! kept one open indefinitely. Each connection now lives at most [`ADMIN_CONNECTION_LIFETIME`],
//! idles at most [`ADMIN_KEEPALIVE`] between two requests (a scraper reconnects), and above
//! [`MAX_ADMIN_CONNECTIONS`] a new one gets `503` and is closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

use super::connection::refuse;

/// Open admin connections at most: scrapers and probes need a few.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How long one admin connection may stay open, requests and keep-alive waits together: a
/// bound for a client that trickles, far above what a scrape takes (idle connections close
/// after [`ADMIN_KEEPALIVE`]).
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// How long an admin connection may idle between two requests.
pub const ADMIN_KEEPALIVE: Duration = Duration::from_secs(10);

/// Wraps the admin app with the limits above.
pub struct AdminGate<A> {
    app: Arc<A>,
    open: AtomicUsize,
    max: usize,
    lifetime: Duration,
}

impl<A> AdminGate<A> {
    pub fn new(app: A) -> AdminGate<A> {
        AdminGate::with_limits(app, MAX_ADMIN_CONNECTIONS, ADMIN_CONNECTION_LIFETIME)
    }

    pub fn with_limits(app: A, max: usize, lifetime: Duration) -> AdminGate<A> {
        AdminGate {
            app: Arc::new(app),
            open: AtomicUsize::new(0),
            max,
            lifetime,
        }
    }
}

/// One open admin connection; released on drop.
struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for AdminGate<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            refuse(stream).await;
            return None;
        }
        let _open = Open(&self.open);
        // Dropped at the deadline: the connection closes wherever it was.
        let _ = tokio::time::timeout(self.lifetime, self.app.process_new(stream, shutdown)).await;
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pingora_core::protocols::l4::stream::Stream as TcpStream;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An app that keeps every connection, as a client trickling a header would.
    struct Holds;

    #[async_trait]
    impl ServerApp for Holds {
        async fn process_new(
            self: &Arc<Self>,
            mut stream: Stream,
            _shutdown: &ShutdownWatch,
        ) -> Option<Stream> {
            let mut byte = [0u8; 1];
            while stream.read(&mut byte).await.is_ok_and(|n| n > 0) {}
            None
        }
    }

    async fn connection() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (Box::new(TcpStream::from(accepted)), client)
    }

    #[tokio::test]
    async fn a_connection_above_the_cap_gets_503_and_one_past_its_lifetime_is_closed() {
        let gate = Arc::new(AdminGate::with_limits(Holds, 1, Duration::from_millis(300)));
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let (held, mut holder) = connection().await;
        let (extra, mut refused) = connection().await;
        let started = Instant::now();
        let serve_held = {
            let (gate, shutdown) = (gate.clone(), shutdown.clone());
            tokio::spawn(async move { gate.process_new(held, &shutdown).await })
        };
        tokio::task::yield_now().await;
        // The second connection, while the first is open: refused with a 503, then closed.
        refused
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let _ = gate.process_new(extra, &shutdown).await;
        let mut answer = String::new();
        refused.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        // The first one, sending nothing more: closed at the end of its lifetime.
        serve_held.await.unwrap();
        let lived = started.elapsed();
        assert!(lived >= Duration::from_millis(300), "{lived:?}");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), holder.read_to_end(&mut rest));
        assert!(closed.await.is_ok(), "the client sees the connection close");
        // Its place is free again.
        assert_eq!(gate.open.load(Ordering::Relaxed), 0);
    }
}
