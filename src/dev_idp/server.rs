//! The HTTP/1.1 accept loop around [`DevIdp`]: bounded request bodies, header timeout, graceful stop.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::handlers::{DevIdp, HttpResponse};

/// Largest request body read (forms and token requests are a few hundred bytes).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// A client has this long to send its request headers (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown is requested, open connections get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `idp` on `listener` until `shutdown` completes, then drains open connections.
pub(crate) async fn run(
    listener: TcpListener,
    idp: Arc<DevIdp>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(connection(stream, Arc::clone(&idp), stop_rx.clone()));
                }
                Err(error) => {
                    eprintln!("dev-idp: accept failed: {error}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // Receivers only wait for the change; nobody may be listening any more, which is fine.
    let _ = stop_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        connections.abort_all();
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    idp: Arc<DevIdp>,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        let idp = Arc::clone(&idp);
        async move { Ok::<_, Infallible>(answer(&idp, request).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopping = async move {
        // An error means the sender is gone, which happens only after stopping too.
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    tokio::select! {
        // Connection errors (resets, timeouts) concern only that client.
        _ = conn.as_mut() => {}
        () = stopping => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Buffers the body (up to [`MAX_BODY_BYTES`]) and hands the request to the handlers.
async fn answer(idp: &DevIdp, request: Request<Incoming>) -> HttpResponse {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let mut response = HttpResponse::new(Full::new(Bytes::from_static(
                b"request body too large or unreadable",
            )));
            *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return response;
        }
    };
    idp.handle(Request::from_parts(parts, body))
}
