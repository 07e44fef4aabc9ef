//! The accept loop: TCP_NODELAY, hyper HTTP/1.1 keep-alive connections, and graceful shutdown.
//!
//! ```text
//!  accept ──► spawn connection task ──► hyper http1 ──► respond(): [delay] ──► routes::handle
//!    │                                      ▲
//!  shutdown resolves                        │ graceful_shutdown(): finish the request in
//!    ├─ /healthz → 503                      │ progress, then close; idle connections close now
//!    ├─ listener dropped (new connections refused)
//!    ├─ every connection told to wind down ─┘
//!    └─ wait for connections, at most DRAIN_TIMEOUT, then abort the rest
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::routes::{handle, AppSettings, AppState, HEALTH_PATH};

/// Longest wait for in-flight requests once shutdown has begun; the rest are then dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must finish sending a request head within this long (slowloris guard); this also
/// bounds how long an idle keep-alive connection is held open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after an accept error that is not about one connection (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves the worker's routes on `listener` until `shutdown` resolves, then drains.
///
/// When `shutdown` resolves: `/healthz` starts answering 503, the listener is closed (new
/// connections are refused), idle keep-alive connections are closed, and requests in progress
/// finish, for at most [`DRAIN_TIMEOUT`]. Accept errors are logged and retried, never fatal;
/// the only error returned is failing to read the listener's local address at startup.
pub async fn serve(
    listener: TcpListener,
    settings: AppSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_state(listener, Arc::new(AppState::new(settings)), shutdown).await
}

/// [`serve`] with caller-built state, so the caller can watch [`AppState::in_flight`] and
/// [`AppState::is_shutting_down`].
pub async fn serve_state(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(
        worker = state.worker_id(),
        %addr,
        identity_verification = if state.verifies_identity() { "on" } else { "off" },
        delay = ?state.delay(),
        "custodia-app listening"
    );
    if !state.verifies_identity() {
        tracing::warn!(
            "no assertion key (CUSTODIA_ASSERTION_KEY): identity verification is off, \
             every request is served as a guest"
        );
    }

    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let task = connection(stream, builder.clone(), Arc::clone(&state), stop_rx.clone());
                    connections.spawn(async move {
                        if let Err(error) = task.await {
                            tracing::debug!(%peer, %error, "connection ended with an error");
                        }
                    });
                }
                Err(error) if is_per_connection(&error) => {
                    tracing::debug!(%error, "accept failed for one connection");
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = finished {
                    tracing::error!(%error, "connection task failed");
                }
            }
        }
    }

    state.begin_shutdown();
    drop(listener);
    stop_tx.send_replace(true);
    tracing::info!(
        connections = connections.len(),
        in_flight = state.in_flight(),
        "shutting down: stopped accepting, draining"
    );
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            in_flight = state.in_flight(),
            "drain timed out after {DRAIN_TIMEOUT:?}; dropping the rest"
        );
        connections.shutdown().await;
    }
    tracing::info!("custodia-app stopped");
    Ok(())
}

/// Serves one connection; on the stop signal, lets hyper finish the current request and close.
async fn connection(
    stream: TcpStream,
    builder: http1::Builder,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) -> hyper::Result<()> {
    // Small responses must not wait for Nagle; failure only costs latency.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(respond(req, &state).await) }
    });
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let stopped = async move {
        // Err means the server is gone, which is a stop signal too.
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    tokio::select! {
        result = conn.as_mut() => result,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Applies the configured delay (except to health checks) and answers.
async fn respond(req: Request<Incoming>, state: &AppState) -> Response<Full<Bytes>> {
    let _in_flight = state.track_request();
    let delay = state.delay();
    if !delay.is_zero() && req.uri().path() != HEALTH_PATH {
        tokio::time::sleep(delay).await;
    }
    handle(&req, state)
}

/// Errors about one half-open connection, not about the listener.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
