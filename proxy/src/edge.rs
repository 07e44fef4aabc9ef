//! The request path: one [`ProxyHttp`] implementation whose callbacks read like the life of a
//! request. The only place that knows the order of things.
//!
//! ```text
//!  request_filter ──▶ upstream_peer ──▶ upstream_request_filter ──▶ (worker) ──▶ response_filter ──▶ logging
//!   keep-alive,        least-conn pick,   strip client identity and             X-Request-Id      lease released
//!   request id,        lease taken once   our cookies; X-Forwarded-*,                             (drop guard)
//!   /login /callback                      X-Real-IP, X-Request-Id;
//!   /logout answered;                     identity headers + the
//!   policy + session                      assertion when signed in
//!   (+ its assertion)
//!   (no I/O)
//!                        ▲      │
//!                        └──────┘ fail_to_connect / error_while_proxy: retry on another backend
//! ```
//!
//! Before all of it, `early_request_filter` refuses ambiguous or oversized request heads
//! ([`crate::request_guard`]: 400/413/414/431) and `request_body_filter` counts streamed bodies
//! against `max_body_size`; `/login` and `/callback` are rate limited per client
//! ([`crate::limits`]).
//!
//! `logging` runs last for every request, also those the proxy answered itself: it counts the
//! request metrics and writes the access-log line ([`crate::access_log`]).
//!
//! Plain `GET`/`HEAD` requests usually take the fast path instead ([`crate::express`]), which
//! calls the same pieces: the request guard, [`gate_request`], [`rewrite_upstream_request`],
//! the error pages and [`record`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result, RetryType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};

use crate::access_log::{self, AccessRecord};
use crate::auth::flow::{self, AuthResponse, AuthRuntime, Endpoint, Gate};
use crate::auth::identity_headers;
use crate::auth::policy::Policy;
use crate::auth::Verified;
use crate::balancer::{FailureLog, Lease, ResponseFailure, Unlogged};
use crate::headers;
use crate::limits::{login_rate, ClientStream, LoginRate, ShutdownSignal};
use crate::metrics::{self, InFlight, PolicyClass};
use crate::pages;
use crate::request_guard;
use crate::request_head::RequestHead;
use crate::runtime::{Runtime, SharedRuntime};
use crate::upstream_head::UpstreamHead;

/// The proxy service (one per worker thread; see [`crate::server`]).
pub struct Edge {
    runtime: SharedRuntime,
    /// `/login` + `/callback` requests per client; kept across reloads and shared by all
    /// workers, so the limit holds per process whichever worker a connection lands on.
    login_rate: Arc<LoginRate>,
    /// Shutdown as this worker thread sees it (shared with its connection gate).
    shutdown: Arc<ShutdownSignal>,
}

impl Edge {
    pub fn new(
        runtime: SharedRuntime,
        login_rate: Arc<LoginRate>,
        shutdown: Arc<ShutdownSignal>,
    ) -> Edge {
        Edge {
            runtime,
            login_rate,
            shutdown,
        }
    }
}

/// Per-request state.
pub struct RequestCtx {
    /// The snapshot this request started with; a reload mid-request does not change it.
    runtime: Arc<Runtime>,
    request_id: HeaderValue,
    /// The backend currently serving this request; dropping it releases the in-flight count.
    lease: Option<Lease>,
    /// Backends that already failed this request.
    failed: Vec<SocketAddr>,
    /// The last of them timed out: with none left to try, the answer is a 504, as nginx's.
    last_timed_out: bool,
    /// A pooled connection was found closed and the request is sent again to the same backend:
    /// once per request, and not a failure of the backend's (nginx's extra try for a cached
    /// connection; the fast path's too).
    stale_retried: bool,
    /// That retry is the next `upstream_peer`'s to make.
    stale_retry_pending: bool,
    attempts: u32,
    /// The verified session, when the route's policy looked for one and found it.
    identity: Option<Verified>,
    // Measurements for metrics and the access log.
    /// When the request's headers had been read.
    started: Instant,
    /// Counts the request in `custodia_requests_in_flight` while it lives.
    _in_flight: InFlight,
    policy: PolicyClass,
    /// The real client (behind trusted proxies), once known.
    client: Option<IpAddr>,
    /// When the current attempt chose its backend, and how long until its response headers.
    upstream_started: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    /// Largest request body allowed on this route, and the body bytes read so far.
    body_limit: u64,
    body_read: u64,
    /// Whether this request's failure lines reach the log: decided at the first of them
    /// ([`failure_logged`]); Pingora asks through `&self`.
    failure_log: AtomicU8,
}

impl RequestCtx {
    fn may_retry(&self) -> bool {
        self.attempts <= self.runtime.config.upstream.retries
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            runtime: self.runtime.load_full(),
            request_id: HeaderValue::from_static(""),
            lease: None,
            failed: Vec::new(),
            last_timed_out: false,
            stale_retried: false,
            stale_retry_pending: false,
            attempts: 0,
            identity: None,
            started: Instant::now(),
            _in_flight: InFlight::start(),
            policy: PolicyClass::None,
            client: None,
            upstream_started: None,
            upstream_elapsed: None,
            body_limit: u64::MAX,
            body_read: 0,
            failure_log: AtomicU8::new(UNDECIDED),
        }
    }

    /// No downstream modules. Pingora's default installs its response-compression module,
    /// disabled, which still costs allocations and filter calls on every request; Custodia
    /// does not compress answers.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// Refuse ambiguous, malformed or oversized request heads before anything acts on them.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A client that stops reading the answer is let go after this (nginx's `send_timeout`),
        // and the worker with it; Pingora's default waits forever.
        session.set_write_timeout(Some(ctx.runtime.config.limits.send_timeout));
        if let Some(stream) = ClientStream::of(session) {
            // Its refusals below are counted by reason where they happen.
            stream.saw_request();
        }
        let raw_head = session
            .as_downstream()
            .as_http1()
            .map(|h1| h1.get_headers_raw_bytes());
        let plan = request_guard::check(
            session.req_header(),
            raw_head.as_deref(),
            &ctx.runtime.config.limits,
        )?;
        ctx.body_limit = plan.limit;
        if let (false, Some(stream)) = (plan.has_body, ClientStream::of(session)) {
            stream.request_read();
        }
        Ok(())
    }

    /// Count streamed body bytes against the route's limit.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_read += chunk.len() as u64;
            if ctx.body_read > ctx.body_limit {
                return Err(request_guard::body_too_large());
            }
        }
        if let (true, Some(stream)) = (end_of_stream, ClientStream::of(session)) {
            stream.request_read();
        }
        Ok(())
    }

    /// Returns `Ok(true)` when the proxy answered the request itself.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Pingora turns keep-alive off once a graceful shutdown or upgrade has begun (the
        // response then says `Connection: close`); only an open connection gets our timeout.
        // A hand-over of the listeners begins before Pingora hears of it: the proxy's own
        // answers from then on close the connection too, as its relayed ones do.
        if self.shutdown.is_shutting_down() {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() && !session.is_process_shutting_down() {
            let keepalive = ctx.runtime.config.server.keepalive_timeout.as_secs().max(1);
            session.set_keepalive(Some(keepalive));
        }
        ctx.request_id = headers::request_id(session.req_header());
        let runtime = ctx.runtime.clone();
        let Some(auth) = runtime.auth.as_ref() else {
            return Ok(false);
        };
        let req = session.req_header();
        let raw_path = req.uri.path();
        let Ok((policy, path)) = auth.routes.policy_and_path(raw_path) else {
            // A path we cannot normalise cannot be matched to a policy safely.
            let page = flow::Page {
                title: "Bad request",
                detail: "The request path is malformed.".into(),
            };
            let response = AuthResponse {
                status: 400,
                headers: Vec::new(),
                page: Some(page),
            };
            return self.answer(session, ctx, response).await;
        };
        ctx.policy = policy.into();
        let endpoint = Endpoint::from_path(&path);
        if let Some(refused) = endpoint.and_then(|e| e.refuse_method(&req.method)) {
            return self.answer(session, ctx, refused).await;
        }
        if matches!(endpoint, Some(Endpoint::Login | Endpoint::Callback)) {
            let per_minute = runtime.config.limits.login_rate_per_minute;
            if let Some(refused) =
                login_rate::over_limit(&self.login_rate, session, &auth.trusted, per_minute)
            {
                return self.answer(session, ctx, refused).await;
            }
        }
        let now = flow::now_unix();
        let cookies = || {
            req.headers
                .get_all(http::header::COOKIE)
                .iter()
                .map(|v| v.as_bytes())
        };
        let response = match endpoint {
            Some(Endpoint::Login) => flow::login(auth, req.uri.query(), cookies(), now),
            Some(Endpoint::Callback) => {
                let query = req.uri.query().map(str::to_owned);
                let cookie_values: Vec<Vec<u8>> = cookies().map(<[u8]>::to_vec).collect();
                flow::callback(
                    auth,
                    query.as_deref(),
                    cookie_values.iter().map(Vec::as_slice),
                    now,
                )
                .await
            }
            Some(Endpoint::Logout) => flow::logout(auth, cookies(), now),
            None => match gate_request(auth, policy, req, now) {
                Gate::Forward(identity) => {
                    ctx.identity = identity;
                    return Ok(false);
                }
                Gate::Respond(response) => response,
            },
        };
        self.answer(session, ctx, response).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // A retry moves the request: the previous backend's count is released first, and its
        // failover counted once another backend has taken the request.
        if std::mem::take(&mut ctx.stale_retry_pending) {
            // Sent again after a closed pooled connection: the same backend, which did not fail.
            if let Some(lease) = &ctx.lease {
                ctx.upstream_started = Some(Instant::now());
                return Ok(Box::new(peer_for(lease.slot().addr, &ctx.runtime)));
            }
        }
        let moved_from = ctx.lease.take().map(|lease| lease.slot().clone());
        let lease = match ctx.runtime.pool.pick(&ctx.failed) {
            Ok(lease) => lease,
            Err(none) => {
                let (status, why) = none.status(ctx.last_timed_out);
                return Err(Error::explain(ErrorType::HTTPStatus(status), why));
            }
        };
        if let Some(failed) = moved_from {
            failed.record_failover();
        }
        ctx.attempts += 1;
        ctx.upstream_started = Some(Instant::now());
        let peer = peer_for(lease.slot().addr, &ctx.runtime);
        ctx.lease = Some(lease);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.last_timed_out = is_timeout(&e);
        if let Some(lease) = &ctx.lease {
            let slot = lease.slot();
            ctx.failed.push(slot.addr);
            if slot.mark_failed() {
                tracing::warn!(backend = %slot.label, error = %e, "cannot connect: backend marked unhealthy");
            }
        }
        // Nothing reached the worker: always safe to try another one.
        e.set_retry(ctx.may_retry());
        if !e.retry() && ctx.runtime.pool.healthy_count() == 0 {
            // The last try of a pool that is all down: 503, as when no backend is left to try.
            return Error::because(ErrorType::HTTPStatus(503), "no healthy backend", e);
        }
        e.more_context(format!("backend {peer}"))
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // The worker may have seen the request: replay only what is safe to replay.
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none()
            && *e.esource() == ErrorSource::Upstream;
        // Pingora marks a failure that a reused connection explains (closed by the worker while
        // it idled in the pool) `ReusedOnly`: sent again once to the same backend, as the fast
        // path does, instead of a 502 (one backend) or a failover from a healthy one.
        if client_reused && e.retry == RetryType::ReusedOnly && replayable && !ctx.stale_retried {
            ctx.stale_retried = true;
            ctx.stale_retry_pending = true;
            e.set_retry(true);
            return e.more_context(format!("backend {peer}, a pooled connection"));
        }
        ctx.last_timed_out = is_timeout(&e);
        if let Some(lease) = &ctx.lease {
            ctx.failed.push(lease.slot().addr);
            if *e.esource() == ErrorSource::Upstream {
                if let Some(started) = ctx.upstream_started {
                    lease.slot().penalize_latency(started.elapsed());
                }
                lease.slot().record_response_failure(response_failure(&e));
            }
        }
        e.set_retry(replayable && ctx.may_retry());
        e.more_context(format!("backend {peer}"))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.client = rewrite_upstream_request(
            &ctx.runtime,
            upstream_request,
            peer_ip,
            &ctx.request_id,
            ctx.identity.as_ref(),
        )?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let arrived = Instant::now();
        ctx.upstream_elapsed = ctx
            .upstream_started
            .map(|t| arrived.saturating_duration_since(t));
        if let (Some(elapsed), Some(lease)) = (ctx.upstream_elapsed, ctx.lease.as_ref()) {
            lease.slot().observe_latency(elapsed, arrived);
        }
        if self.shutdown.is_shutting_down() {
            // Pingora decided keep-alive when the request came; its answer closes the
            // connection now, and says so, as the fast path's does.
            session.set_keepalive(None);
        }
        if let Some(problem) = unrelayable(upstream_response) {
            // Refused as the fast path refuses it: relayed, the client could not frame it.
            return Err(Error::explain(ErrorType::InvalidHTTPHeader, problem).into_up());
        }
        // The proxy speaks HTTP/1.1 to the client whatever the worker spoke (RFC 9110 §6.2),
        // as the fast path does.
        upstream_response.set_version(http::Version::HTTP_11);
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            if !session.is_upgrade_req() {
                // A protocol switch nobody asked for: relayed, it would leave the client on a
                // connection neither side can read (the fast path refuses it the same way).
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "101 Switching Protocols to a request without Upgrade",
                )
                .into_up());
            }
            // A tunnel from now on: the client deadline no longer applies.
            if let Some(stream) = ClientStream::of(session) {
                stream.tunnel();
            }
        } else {
            // (A 101 keeps its `Connection: upgrade` and `Upgrade`: the client switches on them.)
            headers::remove_connection_named(upstream_response);
        }
        if upstream_response.status == http::StatusCode::NO_CONTENT {
            // No body, so no framing for one (RFC 9110 §8.6, RFC 9112 §6.1), as on the fast path.
            upstream_response.remove_header(&http::header::CONTENT_LENGTH);
            upstream_response.remove_header(&http::header::TRANSFER_ENCODING);
        }
        upstream_response.insert_header(headers::X_REQUEST_ID, ctx.request_id.clone())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        // The worker is free once its whole answer has arrived (as nginx's least_conn counts):
        // the time spent writing to a slow client must not make it look busy.
        if end_of_stream {
            if let Some(lease) = ctx.lease.as_mut() {
                lease.release();
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let status = status_for(e);
        if status > 0 {
            if ctx.request_id.is_empty() {
                ctx.request_id = headers::request_id(session.req_header());
            }
            let id = ctx.request_id.to_str().unwrap_or("");
            let json = pages::wants_json(session.req_header());
            let written = match pages::error_page(status, json, id) {
                Ok(mut page) => {
                    let _ = page
                        .header
                        .insert_header(headers::X_REQUEST_ID, ctx.request_id.clone());
                    session.write_error_response(page.header, page.body).await
                }
                Err(e) => Err(e),
            };
            if let Err(write_error) = written {
                tracing::debug!(error = %write_error, "could not send the error page");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = match (session.response_written(), e) {
            (Some(header), _) => header.status.as_u16(),
            (None, Some(e)) => status_for(e),
            (None, None) => 0,
        };
        let req = session.req_header();
        let client = ctx.client.or_else(|| {
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            real_client(&ctx.runtime, peer, req)
        });
        record(&Finished {
            runtime: &ctx.runtime,
            method: &req.method,
            path: req.uri.path(),
            started: ctx.started,
            ended: Instant::now(),
            status,
            policy: ctx.policy,
            bytes_in: session.as_ref().body_bytes_read() as u64,
            bytes_out: session.as_ref().body_bytes_sent() as u64,
            attempts: ctx.attempts,
            upstream_elapsed: ctx.upstream_elapsed,
            lease: ctx.lease.as_ref(),
            request_id: &ctx.request_id,
            client,
            identity: ctx.identity.as_ref(),
        });
        ctx.lease = None;
    }

    /// Requests refused for the client's fault (4xx, malformed framing, a client that left or
    /// timed out) get no error line each: a flood of bad requests must not flood the log. They
    /// are counted and in the access log.
    // Pingora's own lines are free text ("Fail to proxy: Upstream ConnectRefused context: …"):
    // each is suppressed, and the line written here instead, with the fields the fast path's
    // has (backend, error, request_id, unlogged), so one query finds a failure on either path.
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        let status = status_for(e);
        let quiet = (400..500).contains(&status)
            || (status == 0 && *e.esource() == ErrorSource::Downstream);
        if !quiet {
            log_failure(session, ctx, e, false);
        }
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        e: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        // A pooled connection found closed is no failure of the backend's: no warning, as on
        // the fast path, and no share of its one line a second.
        if !ctx.stale_retry_pending {
            log_failure(session, ctx, e, true);
        }
        true
    }

    /// What Pingora's own log lines say about a request: no query string (it may hold
    /// `code=` or tokens).
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        format!("{} {}, Host: {host}", req.method, req.uri.path())
    }
}

impl Edge {
    /// Write an answer of the proxy's own; `Ok(true)` tells Pingora the request is handled.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        response: AuthResponse,
    ) -> Result<bool> {
        // A 401 only ever goes to API clients (browsers are redirected to /login).
        let json = response.status == 401 || pages::wants_json(session.req_header());
        let mut header = ResponseHeader::build(response.status, Some(response.headers.len() + 8))?;
        for (name, value) in response.headers {
            header.append_header(name, value)?;
        }
        header.insert_header(headers::X_REQUEST_ID, ctx.request_id.clone())?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        for (name, value) in own_answer_headers(&ctx.runtime) {
            header.insert_header(name, value)?;
        }
        let body = match &response.page {
            Some(page) => {
                let id = ctx.request_id.to_str().unwrap_or("");
                let (content_type, body) = flow::render(page, response.status, json, id);
                header.insert_header(http::header::CONTENT_TYPE, content_type)?;
                body
            }
            None => bytes::Bytes::new(),
        };
        header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        session
            .write_response_header(Box::new(header), body.is_empty())
            .await?;
        if !body.is_empty() {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    }
}

/// The security headers of an answer of the proxy's own ([`pages::OWN_ANSWER_HEADERS`]), and
/// HSTS when browsers reach it over https.
pub(crate) fn own_answer_headers(
    runtime: &Runtime,
) -> impl Iterator<Item = (&'static str, &'static str)> {
    let https = runtime
        .auth
        .as_ref()
        .is_some_and(|auth| auth.cookies.secure);
    pages::OWN_ANSWER_HEADERS
        .into_iter()
        .chain(https.then_some(pages::HSTS))
}

/// The session check of an ordinary request (no proxy endpoint) under its route's policy, on
/// either path: forward (with the identity when signed in), or answer with a login redirect
/// (browsers) or a 401.
pub(crate) fn gate_request(
    auth: &AuthRuntime,
    policy: Policy,
    req: &impl RequestHead,
    now: u64,
) -> Gate {
    let cookies = || req.values(&http::header::COOKIE);
    let target = req.path_and_query();
    let wants_html = || !pages::wants_json(req) && accepts_html(req);
    flow::gate(auth, policy, cookies, target, wants_html, now)
}

/// The headers a request goes upstream with, on either path: the client's identity headers
/// and Custodia's cookies removed; X-Forwarded-*, X-Real-IP and X-Request-Id set (the scheme,
/// host and real client believed only from trusted proxies); the identity headers and the
/// assertion when signed in. Returns the real client's address, for the access log.
pub(crate) fn rewrite_upstream_request(
    runtime: &Runtime,
    upstream_request: &mut impl UpstreamHead,
    peer_ip: Option<IpAddr>,
    request_id: &HeaderValue,
    identity: Option<&Verified>,
) -> Result<Option<IpAddr>> {
    // Identity headers only ever come from us, also when auth is off: a worker configured
    // with an assertion key must never see a client's copy.
    identity_headers::strip_client_identity(upstream_request);
    if upstream_request
        .received()
        .first_str(&http::header::HOST)
        .is_none()
    {
        // An HTTP/1.0 request may come without Host; it goes upstream as HTTP/1.1, which needs
        // one (RFC 9112 §3.2): the address users reach the proxy by.
        upstream_request.insert(http::header::HOST, default_host(runtime))?;
    }
    let Some(auth) = runtime.auth.as_ref() else {
        headers::set_forwarding(upstream_request, peer_ip, peer_ip, "http", request_id)?;
        return Ok(peer_ip);
    };
    // Only trusted proxies (the ngrok agent) may tell us the scheme and the real client.
    let received = upstream_request.received();
    let header = |name: &HeaderName| received.first_str(name);
    let (client_ip, proto, forwarded_host) = match peer_ip {
        Some(peer) => match auth.trusted.vouch_for(peer) {
            Some(trusted) => (
                Some(
                    trusted.client_ip(received.list_str(&headers::X_FORWARDED_FOR_NAME).as_deref()),
                ),
                trusted
                    .forwarded_proto(header(&headers::X_FORWARDED_PROTO_NAME))
                    .unwrap_or("http"),
                trusted
                    .forwarded_host(header(&headers::X_FORWARDED_HOST_NAME))
                    // Text of a received header value: valid as one.
                    .and_then(|host| HeaderValue::try_from(host).ok()),
            ),
            // Nothing an untrusted peer says about the client is believed.
            None => (Some(peer.to_canonical()), "http", None),
        },
        None => (None, "http", None),
    };
    // An untrusted client's X-Forwarded-Host must not reach the workers as if we vouched for it.
    match forwarded_host {
        Some(host) => upstream_request.insert(headers::X_FORWARDED_HOST_NAME, host)?,
        None => upstream_request.remove(&headers::X_FORWARDED_HOST_NAME),
    }
    identity_headers::remove_custodia_cookies(upstream_request);
    headers::set_forwarding(upstream_request, peer_ip, client_ip, proto, request_id)?;
    if let Some(identity) = identity {
        headers::set_identity(upstream_request, identity)?;
    }
    Ok(client_ip)
}

/// `Host` for a request that came without one: `public_url`'s host and port with auth on, else
/// the first listening address.
fn default_host(runtime: &Runtime) -> HeaderValue {
    let host = match &runtime.auth {
        Some(auth) => auth
            .settings
            .public_url
            .split_once("://")
            .map_or(auth.settings.public_url.as_str(), |(_, rest)| rest)
            .to_string(),
        None => runtime
            .config
            .server
            .listen
            .first()
            .map_or_else(|| "localhost".to_string(), ToString::to_string),
    };
    HeaderValue::try_from(host).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

/// The real client of a request answered without going upstream (a login redirect, a 401, a
/// 429), for the access log: as [`rewrite_upstream_request`] finds it, so the lines an
/// operator reads about abuse name the client behind the ngrok agent, not the agent.
pub(crate) fn real_client(
    runtime: &Runtime,
    peer_ip: Option<IpAddr>,
    req: &impl RequestHead,
) -> Option<IpAddr> {
    let peer = peer_ip?;
    Some(match runtime.auth.as_ref() {
        Some(auth) => auth.trusted.client_ip(
            peer,
            req.list_str(&headers::X_FORWARDED_FOR_NAME).as_deref(),
        ),
        None => peer,
    })
}

/// What a finished request leaves behind, on either path.
pub(crate) struct Finished<'a> {
    pub runtime: &'a Runtime,
    pub method: &'a http::Method,
    /// The request's path, without its query.
    pub path: &'a str,
    /// When the request's headers had been read.
    pub started: Instant,
    /// When the answer had gone out (or failed to).
    pub ended: Instant,
    /// 0: no response was sent.
    pub status: u16,
    pub policy: PolicyClass,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub attempts: u32,
    /// Choice of the last backend → its response headers.
    pub upstream_elapsed: Option<Duration>,
    pub lease: Option<&'a Lease>,
    pub request_id: &'a HeaderValue,
    pub client: Option<IpAddr>,
    pub identity: Option<&'a Verified>,
}

/// Count a finished request in the metrics and write its access-log line.
pub(crate) fn record(f: &Finished<'_>) {
    let total = f.ended.saturating_duration_since(f.started);
    metrics::requests().finished(&metrics::RequestCount {
        policy: f.policy,
        method: metrics::method_index(f.method),
        status: f.status,
        duration: total,
        bytes_in: f.bytes_in,
        bytes_out: f.bytes_out,
        retries: f.attempts.saturating_sub(1),
    });
    if let (Some(elapsed), Some(lease)) = (f.upstream_elapsed, f.lease) {
        lease.slot().observe_response(elapsed);
    }
    if f.runtime.config.log.access_log {
        access_log::emit(&AccessRecord {
            request_id: f.request_id.to_str().unwrap_or(""),
            client: f.client,
            method: f.method.as_str(),
            path: f.path,
            status: f.status,
            backend: f.lease.map(|l| l.slot().label.as_str()),
            upstream_ms: f.upstream_elapsed.map(access_log::millis),
            total_ms: access_log::millis(total),
            bytes_in: f.bytes_in,
            bytes_out: f.bytes_out,
            sub: f.identity.map(|v| v.session.sub.as_str()),
        });
    }
}

/// Why a worker's answer cannot be passed on, if it cannot: a status outside 100–599, a
/// `Content-Length` that is not one number, `Transfer-Encoding` codings a proxy cannot frame
/// a body by (none, or chunked before another coding): the fast path's checks
/// (`express::response`).
fn unrelayable(answer: &ResponseHeader) -> Option<&'static str> {
    if !(100..600).contains(&answer.status.as_u16()) {
        return Some("status code outside 100–599");
    }
    if answer.status.is_informational() {
        // Passed on as the fast path passes them on: a 1xx frames no body.
        return None;
    }
    let mut length = None;
    for value in answer.headers.get_all(http::header::CONTENT_LENGTH) {
        let Some(value) = headers::parse_length(value.as_bytes()) else {
            return Some("bad Content-Length");
        };
        if length.is_some_and(|known| known != value) {
            return Some("conflicting Content-Length");
        }
        length = Some(value);
    }
    let codings = answer.headers.get_all(http::header::TRANSFER_ENCODING);
    if codings.iter().next().is_some() {
        let lists: Vec<&[u8]> = codings.iter().map(|v| v.as_bytes().trim_ascii()).collect();
        if let Err(bad) = crate::express::TransferCodings::of(&lists) {
            return Some(bad.0);
        }
    }
    None
}

/// How the proxy reaches a backend: the upstream settings' timeouts.
fn peer_for(addr: SocketAddr, runtime: &Runtime) -> HttpPeer {
    let upstream = &runtime.config.upstream;
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.read_timeout);
    peer.options.write_timeout = Some(upstream.send_timeout);
    peer.options.idle_timeout = Some(upstream.idle_timeout);
    peer
}

/// A worker that did not answer (or accept, or read) in time.
fn is_timeout(e: &Error) -> bool {
    *e.esource() == ErrorSource::Upstream
        && matches!(
            e.etype(),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
        )
}

const UNDECIDED: u8 = 0;
const LOGGED: u8 = 1;
const QUIET: u8 = 2;

/// Failures with no backend to blame (none left to try), a line a second, on both paths.
pub(crate) static NO_BACKEND_LOG: FailureLog = FailureLog::new();

/// Whether a failed request's lines (its retry warning, its final error) reach the log, with
/// the failures left unlogged before it (the first line carries them, later ones 0): a line a
/// second per backend, as on the fast path, decided at the request's first line. A backend
/// that is down would otherwise write one or two lines per request.
fn failure_logged(ctx: &RequestCtx) -> Option<Unlogged> {
    match ctx.failure_log.load(Ordering::Relaxed) {
        LOGGED => {
            return Some(Unlogged {
                count: 0,
                over_secs: 0,
            })
        }
        QUIET => return None,
        _ => {}
    }
    let log = match &ctx.lease {
        Some(lease) => lease.slot().failure_log(),
        None => &NO_BACKEND_LOG,
    };
    let admitted = log.admit(flow::now_unix());
    let decision = if admitted.is_some() { LOGGED } else { QUIET };
    ctx.failure_log.store(decision, Ordering::Relaxed);
    admitted
}

/// A failed request's line, as the fast path writes it: a failure the request moves on from
/// is a warning, the one that fails it an error; within the backend's line a second.
fn log_failure(session: &Session, ctx: &RequestCtx, e: &Error, retrying: bool) {
    let Some(unlogged) = failure_logged(ctx) else {
        return;
    };
    let req = session.req_header();
    let (method, path) = (&req.method, req.uri.path());
    // The backend it last tried.
    let backend = ctx
        .lease
        .as_ref()
        .map_or("none", |lease| lease.slot().label.as_str());
    let error = failure_text(e);
    let request_id = ctx.request_id.to_str().unwrap_or("");
    if retrying {
        tracing::warn!(
            backend,
            error = %error,
            request_id,
            unlogged = unlogged.count,
            unlogged_over_secs = unlogged.over_secs,
            "{method} {path}: failed; trying another backend if one is left"
        );
    } else {
        tracing::error!(
            backend,
            error = %error,
            request_id,
            unlogged = unlogged.count,
            unlogged_over_secs = unlogged.over_secs,
            "{method} {path}: fail to proxy"
        );
    }
}

/// A Pingora error as one short phrase: the kind of the deepest Pingora error in its chain
/// (the outer ones wrap it: `HTTPStatus(502)`) and what went wrong at the bottom, without the
/// context every layer adds ("ConnectRefused: Connection refused (os error 111)").
fn failure_text(e: &Error) -> String {
    let mut deepest = e;
    let mut bottom: &(dyn std::error::Error + 'static) = e;
    while let Some(cause) = bottom.source() {
        if let Some(inner) = cause.downcast_ref::<Error>() {
            deepest = inner;
        }
        bottom = cause;
    }
    let kind = match deepest.etype() {
        // Ours: the status the request got, and why.
        ErrorType::HTTPStatus(code) => format!("status {code}"),
        _ => deepest.reason_str().to_string(),
    };
    if bottom.downcast_ref::<Error>().is_some() {
        // Pingora's own at the bottom: its kind and its context, if any.
        return match &deepest.context {
            Some(context) => format!("{kind}: {}", context.as_str()),
            None => kind,
        };
    }
    format!("{kind}: {bottom}")
}

fn accepts_html(req: &impl RequestHead) -> bool {
    req.first_str(&http::header::ACCEPT)
        .is_some_and(|a| a.contains("text/html"))
}

/// Why a Pingora-path attempt that reached the backend failed, for its metrics.
fn response_failure(e: &Error) -> ResponseFailure {
    match e.etype() {
        _ if is_timeout(e) => ResponseFailure::Timeout,
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error => ResponseFailure::Invalid,
        _ => ResponseFailure::Closed,
    }
}

/// The status the client sees for a failed request (0: the client is gone, send nothing).
pub fn status_for(e: &Error) -> u16 {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(code) => *code,
        ConnectTimedout | ReadTimedout | WriteTimedout if *e.esource() == ErrorSource::Upstream => {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}
