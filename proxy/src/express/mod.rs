//! The fast path: the requests that make up nearly all of the traffic — an HTTP/1.1 `GET` or
//! `HEAD` without a body on an ordinary route — go to the workers on Custodia's own HTTP/1
//! path instead of through Pingora's proxy.
//!
//! Pingora's proxy costs ~27 µs of user CPU per request on this workload where nginx spends
//! ~7 µs (BENCHMARKS.md): its request state machine, header maps built twice, a boxed future
//! per filter, a timer per upstream read and a task per released upstream connection. The fast
//! path parses the head once, keeps upstream connections in a per-thread pool ([`upstream`])
//! and writes each answer in one `send` when it is small.
//!
//! It decides nothing on its own: the request guard, the route policy and session check, the
//! balancer, the forwarding and identity headers, the error pages, the metrics and the access
//! log are the edge's ([`crate::edge`]), called the same way. What it does not take — other
//! methods, bodies, upgrades, HTTP/1.0, `/login`, `/callback`, `/logout`, a head not yet
//! complete, anything unusual in the head ([`request`]) — it hands to Pingora untouched, with
//! the bytes it read. `[server] fast_path = false` sends everything through Pingora.
//!
//! ```text
//!  head in ──▶ plain? ──no──▶ Pingora (same bytes)
//!                │yes
//!                ▼
//!  request guard ──▶ policy + session ──▶ pick ──▶ pooled connection ──▶ head ──▶ body relayed
//!  (4xx page)        (401 / login         (retry on      (stale one: a new        (lease released,
//!                     redirect answered)   another)       connection)              connection pooled)
//! ```

mod chunked;
pub(crate) mod request;
mod response;
mod upstream;

use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderValue;
use pingora_core::protocols::{GetSocketDigest, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::flow::{self, AuthResponse, Endpoint, Gate};
use crate::auth::Verified;
use crate::balancer::{BackendSlot, Lease, ResponseFailure};
use crate::config::UpstreamSettings;
use crate::edge::{self, Finished};
use crate::limits::{ClientStream, ShutdownSignal};
use crate::metrics::{InFlight, PolicyClass};
use crate::request_head::{ReceivedHead, RequestHead};
use crate::runtime::{HeldRuntime, Runtime};
use crate::upstream_head::Overlay;
use crate::{pages, request_guard};

pub(crate) use response::TransferCodings;
pub use upstream::idle_count;

/// The most of a request head read in one go: Pingora's initial head buffer.
const HEAD_READ: usize = 4096;
/// How long, once shutdown has begun, a connection with nothing of a request yet is given
/// for its first bytes (see [`read_head`]).
const FIRST_BYTES_AT_SHUTDOWN: Duration = Duration::from_secs(1);
/// The most of a response head the fast path waits for.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Body bytes relayed per read.
const BODY_READ: usize = 16 * 1024;

/// How a request on the fast path ended.
pub enum Outcome {
    /// Answered at the instant given; the connection waits for the next request from then.
    KeepAlive(Stream, Instant),
    /// Answered, or failed: the connection is done.
    Close,
    /// Not a request for the fast path: Pingora serves it, from the bytes the stream holds.
    Decline(Stream),
}

/// Serve the next request on a client connection, if it is one the fast path takes.
/// `held` is the configuration the connection's last request ran under.
pub async fn serve(
    held: &mut HeldRuntime<'_>,
    stream: Stream,
    shutdown: &ShutdownSignal,
) -> Outcome {
    if !stream.as_any().is::<ClientStream>() {
        return Outcome::Decline(stream);
    }
    if !held.load().config.server.fast_path {
        return Outcome::Decline(stream);
    }
    let Ok(mut client) = stream.into_any().downcast::<ClientStream>() else {
        return Outcome::Close;
    };
    let (plain, bytes) = match read_head(&mut client, shutdown).await {
        Ok(head) => head,
        Err(Unread::Closed) => return Outcome::Close,
        Err(Unread::NotPlain(bytes)) => {
            client.put_back(bytes);
            return Outcome::Decline(client);
        }
    };
    // The configuration the request arrived under: a connection can wait for its next request
    // across a reload, and from the swap on new requests must see only the new one.
    let snapshot: &Runtime = held.load();
    if !snapshot.config.server.fast_path {
        client.put_back(bytes);
        return Outcome::Decline(client);
    }
    // A plain request has no body: it is all in.
    client.request_read();
    client.saw_request();
    let peer = client
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
    let mut exchange = Exchange {
        runtime: snapshot,
        shutdown,
        req: plain.head,
        request_id: HeaderValue::from_static(""),
        started: Instant::now(),
        _in_flight: InFlight::start(),
        policy: PolicyClass::None,
        identity: None,
        peer,
        client_ip: None,
        lease: None,
        attempts: 0,
        upstream_elapsed: None,
        keepalive: !plain.close && !shutdown.is_shutting_down(),
        status: 0,
        bytes_out: 0,
    };
    let answered = match exchange.prepare() {
        Prepared::Forward => exchange.forward(&mut client).await,
        Prepared::Answer(response) => exchange.answer(&mut client, response).await,
        Prepared::Refuse(status) => {
            exchange.keepalive = false;
            exchange.error_page(&mut client, status).await
        }
        Prepared::Decline => {
            client.put_back(bytes);
            return Outcome::Decline(client);
        }
    };
    let ended = exchange.record();
    if !(answered && exchange.keepalive) {
        if answered {
            let _ = client.shutdown().await;
        }
        return Outcome::Close;
    }
    // Whatever followed the head is the start of the next request (pipelining).
    let rest = bytes.slice(plain.head_len..);
    if !rest.is_empty() {
        client.put_back(rest);
    }
    Outcome::KeepAlive(client, ended)
}

/// Why no plain request was read.
enum Unread {
    /// The client closed or failed (a client timeout included), before or within a head.
    Closed,
    /// These bytes start a request for Pingora.
    NotPlain(Bytes),
}

/// The next request's head: from the bytes the keep-alive wait read ahead, and from the
/// socket until the head is complete (under the client timeout) or larger than [`HEAD_READ`].
/// Waiting for the first byte of a new connection's first request ends at shutdown, as
/// Pingora's wait does.
async fn read_head(
    client: &mut ClientStream,
    shutdown: &ShutdownSignal,
) -> Result<(request::Plain, Bytes), Unread> {
    let ahead = client.take_read_ahead();
    let mut buf = BytesMut::new();
    if !ahead.is_empty() {
        match request::parse(&ahead) {
            Ok(plain) => return Ok((plain, ahead)),
            Err(request::NotPlain::Other) => return Err(Unread::NotPlain(ahead)),
            Err(request::NotPlain::Partial) if ahead.len() >= HEAD_READ => {
                return Err(Unread::NotPlain(ahead))
            }
            Err(request::NotPlain::Partial) => buf.extend_from_slice(&ahead),
        }
    }
    buf.reserve(HEAD_READ - buf.len());
    loop {
        let read = if buf.is_empty() {
            tokio::select! {
                biased;
                read = client.read_buf(&mut buf) => read,
                // Nothing of a request yet when shutdown begins: a connection accepted in the
                // listeners' last instant, its first request most likely on its way. Closing
                // it now would fail that request unanswered; it has a moment to arrive.
                _ = shutdown.stopping() => {
                    let first_bytes = client.read_buf(&mut buf);
                    match tokio::time::timeout(FIRST_BYTES_AT_SHUTDOWN, first_bytes).await {
                        Ok(read) => read,
                        Err(_) => return Err(Unread::Closed),
                    }
                }
            }
        } else {
            client.read_buf(&mut buf).await
        };
        // Closed, failed or past the client timeout, also mid-head: Pingora would only close.
        if read.unwrap_or(0) == 0 {
            return Err(Unread::Closed);
        }
        let bytes = buf.split().freeze();
        match request::parse(&bytes) {
            Ok(plain) => return Ok((plain, bytes)),
            Err(request::NotPlain::Partial) if bytes.len() < HEAD_READ => {
                buf.extend_from_slice(&bytes);
                buf.reserve(HEAD_READ - bytes.len());
            }
            Err(_) => return Err(Unread::NotPlain(bytes)),
        }
    }
}

/// What the edge's checks decided before anything goes upstream.
enum Prepared {
    Forward,
    /// The proxy answers (login redirect, 401).
    Answer(AuthResponse),
    /// The request guard refused the head with this status; the connection closes after.
    Refuse(u16),
    /// A request the fast path does not take after all (`/login`, an odd path): Pingora's.
    Decline,
}

/// One request on the fast path: what the edge's `RequestCtx` holds on Pingora's.
struct Exchange<'a> {
    runtime: &'a Runtime,
    shutdown: &'a ShutdownSignal,
    req: ReceivedHead,
    request_id: HeaderValue,
    started: Instant,
    _in_flight: InFlight,
    policy: PolicyClass,
    identity: Option<Verified>,
    /// The connection's peer, and the real client behind trusted proxies.
    peer: Option<IpAddr>,
    client_ip: Option<IpAddr>,
    lease: Option<Lease>,
    attempts: u32,
    upstream_elapsed: Option<Duration>,
    keepalive: bool,
    /// Sent to the client; 0 while nothing was.
    status: u16,
    bytes_out: u64,
}

/// A worker's answer whose head has arrived.
struct Answer {
    conn: upstream::Conn,
    head: response::Head,
    /// What was read after the head.
    body_start: BytesMut,
    /// When the head was complete.
    arrived: Instant,
}

/// Why an attempt on a worker failed.
enum Failed {
    /// Nothing reached the worker.
    Connect(io::Error),
    /// The worker did not answer properly; it may have seen the request.
    Upstream(io::Error),
    /// The client closed its connection while the worker had not answered yet.
    ClientGone,
}

impl Exchange<'_> {
    /// The edge's `early_request_filter` and `request_filter`, for a plain request.
    fn prepare(&mut self) -> Prepared {
        let runtime = self.runtime;
        // No raw head for the framing checks: the fast path takes only heads whose every line
        // ends in CRLF and that frame no body (`request::parse`), all they would look for.
        if let Err(e) = request_guard::check(&self.req, None, &runtime.config.limits) {
            self.request_id = crate::headers::request_id(&self.req);
            return Prepared::Refuse(edge::status_for(&e));
        }
        let Some(auth) = runtime.auth.as_ref() else {
            self.request_id = crate::headers::request_id(&self.req);
            return Prepared::Forward;
        };
        let Ok((policy, path)) = auth.routes.policy_and_path(self.req.path()) else {
            return Prepared::Decline;
        };
        if Endpoint::from_path(&path).is_some() {
            return Prepared::Decline;
        }
        self.request_id = crate::headers::request_id(&self.req);
        self.policy = policy.into();
        match edge::gate_request(auth, policy, &self.req, flow::now_unix()) {
            Gate::Forward(identity) => {
                self.identity = identity;
                Prepared::Forward
            }
            Gate::Respond(response) => Prepared::Answer(response),
        }
    }

    /// The edge's upstream callbacks: choose a worker, send the request, retry elsewhere when
    /// that is safe, relay the answer. `false` when the client connection cannot go on.
    async fn forward(&mut self, client: &mut ClientStream) -> bool {
        let runtime = self.runtime;
        // The head stays as received; the edits go on the wire with it.
        let mut upstream = Overlay::new(&self.req);
        let rewritten = edge::rewrite_upstream_request(
            runtime,
            &mut upstream,
            self.peer,
            &self.request_id,
            self.identity.as_ref(),
        );
        let wire = upstream.wire();
        match rewritten {
            Ok(client_ip) => self.client_ip = client_ip,
            Err(_) => return self.error_page(client, 500).await,
        }
        let settings = &runtime.config.upstream;
        let mut failed: Vec<SocketAddr> = Vec::new();
        // The last failure was a timeout: an answer that never came is a 504, as nginx says.
        let mut last_timed_out = false;
        loop {
            // A retry moves the request: the previous backend's count is released first, and
            // its failover counted once another backend has taken the request.
            let moved_from = self.lease.take().map(|lease| lease.slot().clone());
            let lease = match runtime.pool.pick(&failed) {
                Ok(lease) => lease,
                Err(none) => {
                    let (status, why) = none.status(last_timed_out);
                    self.log_no_backend_left(why);
                    return self.error_page(client, status).await;
                }
            };
            if let Some(failed) = moved_from {
                failed.record_failover();
            }
            self.attempts += 1;
            let chosen = Instant::now();
            let slot = lease.slot().clone();
            self.lease = Some(lease);
            let may_retry = self.attempts <= settings.retries;
            let client_side = response::ClientSide {
                head_request: *self.req.method() == http::Method::HEAD,
                keepalive: self.keepalive,
                request_id: &self.request_id,
                shutdown: self.shutdown,
            };
            let (e, connect_failed) = match attempt(
                slot.addr,
                &wire,
                settings,
                client_side,
                chosen,
                client,
            )
            .await
            {
                Ok(answer) => {
                    let elapsed = answer.arrived.saturating_duration_since(chosen);
                    self.upstream_elapsed = Some(elapsed);
                    slot.observe_latency(elapsed, answer.arrived);
                    return self.relay(client, answer, &slot, settings).await;
                }
                Err(Failed::Connect(e)) => {
                    if slot.mark_failed() {
                        tracing::warn!(backend = %slot.label, error = %e, "cannot connect: backend marked unhealthy");
                    }
                    (e, true)
                }
                Err(Failed::Upstream(e)) => {
                    slot.penalize_latency(chosen.elapsed());
                    slot.record_response_failure(ResponseFailure::of_io(&e));
                    (e, false)
                }
                Err(Failed::ClientGone) => {
                    // Nobody to answer: the worker's connection closes (its answer would come
                    // to no one) and its count is released; as Pingora's path, status 0.
                    tracing::debug!(
                        backend = slot.label.as_str(),
                        "the client closed its connection before the answer"
                    );
                    self.status = 0;
                    self.keepalive = false;
                    return false;
                }
            };
            failed.push(slot.addr);
            last_timed_out = e.kind() == io::ErrorKind::TimedOut;
            // Nothing of the answer has reached the client, and a GET or HEAD is safe to replay
            // (a failed connect never reached the worker at all).
            if may_retry {
                self.log_failure(&slot, &e, true);
                continue;
            }
            let status = if connect_failed && runtime.pool.healthy_count() == 0 {
                503
            } else if last_timed_out {
                504
            } else {
                502
            };
            self.log_failure(&slot, &e, false);
            return self.error_page(client, status).await;
        }
    }

    /// At most a line a second per backend ([`crate::balancer::FailureLog`]); the metrics
    /// count every failure. A failure the request moves on from is a warning, as on Pingora's
    /// path; the one that fails it, an error.
    fn log_failure(&self, slot: &BackendSlot, e: &io::Error, retrying: bool) {
        let Some(unlogged) = slot.failure_log().admit(flow::now_unix()) else {
            return;
        };
        let request_id = self.request_id.to_str().unwrap_or("");
        let (method, path) = (self.req.method(), self.req.path());
        if retrying {
            tracing::warn!(
                backend = slot.label.as_str(),
                error = %e,
                request_id,
                unlogged = unlogged.count,
                unlogged_over_secs = unlogged.over_secs,
                "{method} {path}: failed; trying another backend if one is left"
            );
        } else {
            tracing::error!(
                backend = slot.label.as_str(),
                error = %e,
                request_id,
                unlogged = unlogged.count,
                unlogged_over_secs = unlogged.over_secs,
                "{method} {path}: fail to proxy"
            );
        }
    }

    /// The request failed for want of a backend to try: a line a second, shared with
    /// Pingora's path.
    fn log_no_backend_left(&self, why: &str) {
        let Some(unlogged) = edge::NO_BACKEND_LOG.admit(flow::now_unix()) else {
            return;
        };
        tracing::error!(
            request_id = self.request_id.to_str().unwrap_or(""),
            unlogged = unlogged.count,
            unlogged_over_secs = unlogged.over_secs,
            "{} {}: fail to proxy: {why}",
            self.req.method(),
            self.req.path()
        );
    }

    /// Pass the worker's answer on. The worker is released once its whole answer is in (as
    /// the edge does), and its connection pooled when the answer ended cleanly.
    async fn relay(
        &mut self,
        client: &mut ClientStream,
        answer: Answer,
        slot: &BackendSlot,
        settings: &UpstreamSettings,
    ) -> bool {
        let Answer {
            mut conn,
            head,
            body_start,
            arrived,
        } = answer;
        self.status = head.status;
        self.keepalive = head.keepalive;
        let mut out = head.client_head;
        let mut body = Body::new(head.framing);
        let mut reusable = head.reusable;
        let mut data = body_start;
        let mut head_sent = false;
        loop {
            let (done, extra) = match body.frame(&data, &mut out) {
                Ok(step) => step,
                Err(e) => {
                    self.log_failure(slot, &e, false);
                    self.keepalive = false;
                    if !head_sent {
                        // Nothing has gone out yet: the client can still be told.
                        self.status = 502;
                        let _ = self.error_page(client, 502).await;
                        return false;
                    }
                    // The head is out: the client cannot be told; close.
                    let _ = write_out(client, &out).await;
                    return false;
                }
            };
            reusable &= !extra;
            self.bytes_out += body.take_sent();
            if done {
                if let Some(lease) = self.lease.as_mut() {
                    lease.release();
                }
                if reusable {
                    // Idle since its answer's head, or a little later for a longer body: the
                    // sooner expiry is the safe side of the worker's own keep-alive timeout.
                    upstream::put(slot.addr, conn, arrived + settings.idle_timeout);
                }
                let sent = write_out(client, &out).await.is_ok();
                upstream::recycle(data);
                return sent;
            }
            if !out.is_empty() {
                if write_out(client, &out).await.is_err() {
                    return false;
                }
                head_sent = true;
                out.clear();
            }
            data.clear();
            data.reserve(BODY_READ);
            let deadline = Instant::now() + settings.read_timeout;
            match conn.read_by(&mut data, deadline).await {
                Ok(0) if body.ends_at_close() => body.closed(),
                Ok(0) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed mid-answer",
                    );
                    self.log_failure(slot, &e, false);
                    return false;
                }
                Ok(_) => {}
                Err(e) => {
                    self.log_failure(slot, &e, false);
                    return false;
                }
            }
        }
    }

    /// An answer of the proxy's own (the edge's `answer`).
    async fn answer(&mut self, client: &mut ClientStream, response: AuthResponse) -> bool {
        // A 401 only ever goes to API clients (browsers are redirected to /login).
        let json = response.status == 401 || pages::wants_json(&self.req);
        let body = match &response.page {
            Some(page) => {
                let id = self.request_id.to_str().unwrap_or("");
                Some(flow::render(page, response.status, json, id))
            }
            None => None,
        };
        let mut extra: Vec<(&str, &[u8])> = response
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_bytes()))
            .collect();
        extra.push(("cache-control", b"no-store"));
        extra.extend(edge::own_answer_headers(self.runtime).map(|(n, v)| (n, v.as_bytes())));
        if let Some((content_type, _)) = &body {
            extra.push(("content-type", content_type.as_bytes()));
        }
        let body = body.map(|(_, b)| b).unwrap_or_default();
        self.send_own(client, response.status, &extra, &body).await
    }

    /// An error page (the edge's `fail_to_proxy`).
    async fn error_page(&mut self, client: &mut ClientStream, status: u16) -> bool {
        if self.request_id.is_empty() {
            self.request_id = crate::headers::request_id(&self.req);
        }
        let json = pages::wants_json(&self.req);
        let id = self.request_id.to_str().unwrap_or("").to_owned();
        let Ok(page) = pages::error_page(status, json, &id) else {
            return false;
        };
        // Content-Length is written with the body.
        let extra: Vec<(&str, &[u8])> = page
            .header
            .headers
            .iter()
            .filter(|(name, _)| *name != http::header::CONTENT_LENGTH)
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        self.send_own(client, status, &extra, &page.body).await
    }

    /// Write a complete answer of the proxy's own in one go.
    async fn send_own(
        &mut self,
        client: &mut ClientStream,
        status: u16,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> bool {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut out = Vec::with_capacity(256 + body.len());
        out.put_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
        for (name, value) in headers {
            put_header(&mut out, name.as_bytes(), value);
        }
        put_header(
            &mut out,
            b"content-length",
            body.len().to_string().as_bytes(),
        );
        put_header(
            &mut out,
            b"date",
            pingora_core::protocols::http::date::get_cached_date().as_bytes(),
        );
        put_header(&mut out, b"x-request-id", self.request_id.as_bytes());
        // Shutdown may have begun since the request came: its answer closes the connection.
        self.keepalive &= !self.shutdown.is_shutting_down();
        let connection: &[u8] = if self.keepalive {
            b"keep-alive"
        } else {
            b"close"
        };
        put_header(&mut out, b"connection", connection);
        out.put_slice(b"\r\n");
        if *self.req.method() != http::Method::HEAD {
            out.put_slice(body);
            self.bytes_out = body.len() as u64;
        }
        self.status = status;
        write_out(client, &out).await.is_ok()
    }

    /// Metrics and the access-log line (the edge's `logging`); when the request ended.
    fn record(&mut self) -> Instant {
        let ended = Instant::now();
        edge::record(&Finished {
            runtime: self.runtime,
            method: self.req.method(),
            path: self.req.path(),
            started: self.started,
            ended,
            status: self.status,
            policy: self.policy,
            bytes_in: 0,
            bytes_out: self.bytes_out,
            attempts: self.attempts,
            upstream_elapsed: self.upstream_elapsed,
            lease: self.lease.as_ref(),
            request_id: &self.request_id,
            client: self
                .client_ip
                .or_else(|| edge::real_client(self.runtime, self.peer, &self.req)),
            identity: self.identity.as_ref(),
        });
        self.lease = None;
        ended
    }
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Write `bytes` to the client within `[limits] send_timeout` (nginx's `send_timeout`): a
/// client that stops reading does not hold the connection, and with it the worker's, forever.
async fn write_out(client: &mut ClientStream, bytes: &[u8]) -> io::Result<()> {
    let patience = client.send_timeout();
    let write = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    let mut write = std::pin::pin!(write);
    // An answer almost always fits the socket's buffer at once: a timer only for one that waits.
    if let Poll::Ready(done) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return done;
    }
    match tokio::time::timeout(patience, write).await {
        Ok(done) => done,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took nothing of the answer within limits.send_timeout",
        )),
    }
}

/// Send the request to `addr` and read the answer's head: on a pooled connection when there is
/// one, and on a new one when the pooled one turns out closed before answering. `chosen` is
/// the clock read when `addr` was chosen, a moment ago.
async fn attempt(
    addr: SocketAddr,
    wire: &[u8],
    settings: &UpstreamSettings,
    client_side: response::ClientSide<'_>,
    chosen: Instant,
    client: &mut ClientStream,
) -> Result<Answer, Failed> {
    let mut pooled = upstream::take(addr, chosen);
    loop {
        let (mut conn, reused) = match pooled.take() {
            Some(conn) => (conn, true),
            // Boxed: a new connection is the rare case, and its state machine would otherwise
            // sit inside every request's.
            None => (
                Box::pin(upstream::connect(addr, settings.connect_timeout))
                    .await
                    .map_err(Failed::Connect)?,
                false,
            ),
        };
        // A pooled connection is used at once: the choice's clock reading times its exchange.
        let now = reused.then_some(chosen);
        match exchange_head(&mut conn, wire, settings, client_side, now, client).await {
            Ok((head, body_start, arrived)) => {
                return Ok(Answer {
                    conn,
                    head,
                    body_start,
                    arrived,
                })
            }
            // The worker closed the idle connection before it got the request: a new one.
            Err(HeadError::Stale(_)) if reused => continue,
            Err(HeadError::Stale(e) | HeadError::Other(e)) => return Err(Failed::Upstream(e)),
            Err(HeadError::ClientGone) => return Err(Failed::ClientGone),
        }
    }
}

enum HeadError {
    /// The connection failed before a single byte of answer came back.
    Stale(io::Error),
    Other(io::Error),
    /// The client left while the head was awaited.
    ClientGone,
}

/// Send the request and read the answer's head, and when the head was complete. `now` is a
/// reading of the clock taken just before, if there is one.
///
/// The clock is read only where a timeout has to start from it (~40 ns a reading here): a
/// head sent whole at once, as a small head on a connection with room always is, starts
/// `read_timeout` from `now`, as nginx times with the clock it reads once per turn of its
/// event loop.
async fn exchange_head(
    conn: &mut upstream::Conn,
    wire: &[u8],
    settings: &UpstreamSettings,
    client_side: response::ClientSide<'_>,
    now: Option<Instant>,
    client: &mut ClientStream,
) -> Result<(response::Head, BytesMut, Instant), HeadError> {
    let written = match conn.stream.try_write(wire) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(HeadError::Stale(e)),
    };
    let mut sent = now;
    if written < wire.len() {
        let rest = &wire[written..];
        // Boxed, as the connect above: a head that does not go out in one write is rare.
        let write = tokio::time::timeout(settings.send_timeout, conn.stream.write_all(rest));
        match Box::pin(write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(HeadError::Stale(e)),
            Err(_) => return Err(HeadError::Other(upstream::timed_out("send_timeout"))),
        }
        sent = None;
    }
    let mut read_from = sent.unwrap_or_else(Instant::now);
    let mut buf = upstream::read_buffer();
    let mut received = false;
    loop {
        // The client is watched meanwhile: one that closes (a browser's stop, a client
        // timeout) releases the worker at once, not when its answer comes, maybe much later.
        let read = {
            let read = conn.read_by(&mut buf, read_from + settings.read_timeout);
            let mut read = std::pin::pin!(read);
            poll_fn(|cx| {
                if let Poll::Ready(read) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(read));
                }
                match client.poll_gone(cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        let Some(read) = read else {
            return Err(HeadError::ClientGone);
        };
        match read {
            Ok(0) if !received => {
                return Err(HeadError::Stale(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the backend closed the connection without answering",
                )))
            }
            Ok(0) => {
                return Err(HeadError::Other(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the backend closed the connection mid-head",
                )))
            }
            Ok(_) => received = true,
            Err(e) if !received && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(HeadError::Stale(e))
            }
            Err(e) => return Err(HeadError::Other(e)),
        }
        loop {
            match response::parse(&buf, client_side) {
                Ok(response::Parsed::Head(head)) => {
                    buf.advance(head.len);
                    return Ok((head, buf, Instant::now()));
                }
                Ok(response::Parsed::Informational(len)) => {
                    // A proxy passes on the 1xx it did not ask for (RFC 9110 §15.2), as they
                    // come: 103 Early Hints are worth something only before the answer.
                    let interim = buf.split_to(len);
                    if let Err(e) = write_out(client, &interim).await {
                        return Err(HeadError::Other(e));
                    }
                }
                Ok(response::Parsed::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
                    return Err(HeadError::Other(invalid("response head too large")))
                }
                Ok(response::Parsed::Partial) => break,
                Err(bad) => return Err(HeadError::Other(invalid(bad.0))),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(upstream::READ_BUFFER);
        }
        // The head is not complete: `read_timeout` runs between two reads, as nginx's.
        read_from = Instant::now();
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The body of an answer as it passes through.
struct Body {
    framing: response::Framing,
    /// Length framing: bytes still to come.
    remaining: u64,
    chunks: chunked::ChunkedEnd,
    /// Body bytes framed since the last [`Body::take_sent`].
    sent: u64,
    /// Until-close framing: the worker closed.
    closed: bool,
}

impl Body {
    fn new(framing: response::Framing) -> Body {
        Body {
            framing,
            remaining: match framing {
                response::Framing::Length(n) => n,
                _ => 0,
            },
            chunks: chunked::ChunkedEnd::default(),
            sent: 0,
            closed: false,
        }
    }

    /// Add what arrived (`data`) to `out`, framed for the client: `(done, extra)` where `extra`
    /// says the worker sent more than its answer (its connection cannot be reused).
    fn frame(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<(bool, bool)> {
        use response::Framing;
        match self.framing {
            Framing::Empty => Ok((true, !data.is_empty())),
            Framing::Length(_) => {
                let take = (data.len() as u64).min(self.remaining);
                // `take` ≤ data.len().
                out.put_slice(&data[..take as usize]);
                self.remaining -= take;
                self.sent += take;
                Ok((self.remaining == 0, data.len() as u64 > take))
            }
            Framing::Chunked => {
                // Relayed framing and all; counted as the body it carries.
                let before = self.chunks.data_bytes();
                let fed = self.chunks.feed(data);
                self.sent += self.chunks.data_bytes() - before;
                match fed {
                    Ok(Some(end)) => {
                        out.put_slice(&data[..end]);
                        Ok((true, end < data.len()))
                    }
                    Ok(None) => {
                        out.put_slice(data);
                        Ok((false, false))
                    }
                    Err(chunked::Malformed) => Err(invalid("malformed chunked body")),
                }
            }
            Framing::UntilClose => {
                if !data.is_empty() {
                    out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.put_slice(data);
                    out.put_slice(b"\r\n");
                    self.sent += data.len() as u64;
                }
                if self.closed {
                    out.put_slice(b"0\r\n\r\n");
                }
                Ok((self.closed, false))
            }
        }
    }

    fn ends_at_close(&self) -> bool {
        self.framing == response::Framing::UntilClose
    }

    fn closed(&mut self) {
        self.closed = true;
    }

    fn take_sent(&mut self) -> u64 {
        std::mem::take(&mut self.sent)
    }
}

#[cfg(test)]
mod tests;
