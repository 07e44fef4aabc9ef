//! Per-connection limits, below HTTP: the global cap on open client connections and the
//! deadline by which a client must have sent its whole request (slowloris, slow bodies).
//!
//! Pingora 0.9 has no connection cap, and its downstream read timeouts restart on every read,
//! so a client trickling one byte at a time holds a connection for as long as it likes. The
//! service is therefore wrapped: [`ConnectionGate`] counts connections as they are handed to
//! the HTTP app and answers `503` + close above `[limits] max_connections`; every accepted
//! stream is wrapped in a [`ClientStream`] that enforces `[limits] client_timeout`.
//!
//! The deadline of a [`ClientStream`] is armed when a connection opens and when the first
//! byte of a new request arrives, and cleared when the request has been read (the edge calls
//! [`ClientStream::request_read`]) or when the proxy starts answering (any write). A read that
//! is still waiting, or that brings data, after the deadline fails with `TimedOut` and Pingora
//! closes the connection. An upgraded connection (`101`, e.g. WebSocket) is a tunnel and is
//! not guarded any more ([`ClientStream::tunnel`]). A request read in one go costs one clock read and two relaxed
//! atomic stores; the timer exists only while a partial request waits for more bytes.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::Session;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::parking::{self, Parked, PARK_AFTER};
use super::shutdown::ShutdownSignal;
use crate::express;
use crate::metrics;
use crate::runtime::{HeldRuntime, SharedRuntime};

/// No deadline armed.
const DISARMED: u64 = u64::MAX;
/// A request's first bytes are in and the deadline is not yet taken: it is, from the clock, at
/// the next read or wait on the same request, a moment later. Most heads arrive whole in one
/// read and never need the clock (~40 ns a reading here).
const STARTED: u64 = u64::MAX - 1;

/// The answer to a connection above the cap: nothing of the request is read or forwarded.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\nretry-after: 1\r\ncache-control: no-store\r\n\
connection: close\r\ncontent-length: 38\r\n\r\nToo many connections; try again soon.\n";

/// Wraps the HTTP app: counts open connections and guards their streams.
pub struct ConnectionGate<A> {
    app: Arc<A>,
    runtime: SharedRuntime,
    open: Arc<AtomicUsize>,
    /// Pingora's shutdown channel relayed for this gate's thread (a gate serves one).
    shutdown: Arc<ShutdownSignal>,
}

impl<A> ConnectionGate<A> {
    /// `open` counts the connections of every gate that shares it: `max_connections` is a
    /// limit for the process, whichever worker accepted the connection. `shutdown` is the
    /// thread's, which the gate relays Pingora's channel to (the thread's edge reads it too).
    pub fn new(
        app: A,
        runtime: SharedRuntime,
        open: Arc<AtomicUsize>,
        shutdown: Arc<ShutdownSignal>,
    ) -> ConnectionGate<A> {
        ConnectionGate {
            app: Arc::new(app),
            runtime,
            open,
            shutdown,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ConnectionGate<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (max, timeouts) = {
            let runtime = self.runtime.load();
            let limits = &runtime.config.limits;
            let timeouts = ClientTimeouts {
                request: limits.client_timeout,
                send: limits.send_timeout,
            };
            (limits.max_connections, timeouts)
        };
        let Some(slot) = ConnectionSlot::take(&self.open, max) else {
            metrics::rejections().connection_limit.inc();
            // Boxed: its scratch buffer must not size every connection's future.
            Box::pin(refuse(stream)).await;
            return None;
        };
        self.shutdown.follow(shutdown);
        let guarded: Stream = Box::new(ClientStream::new(stream, timeouts, slot));
        self.serve_http1(guarded, None, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> ConnectionGate<A> {
    /// Pingora's HTTP/1 keep-alive loop (its `ServerApp` for an `HttpServerApp`, without the
    /// h2c and custom protocols we never turn on), except where an idle connection waits.
    ///
    /// Pingora waits for the next request inside the request handler, holding the whole
    /// request state machine (tens of KiB) and a 4 KiB header buffer per idle keep-alive client.
    /// Here a connection between two requests is only its stream: the handler starts when the
    /// next request's first byte is in. After [`PARK_AFTER`] the connection is parked, down to
    /// its socket ([`parking`]), and served from a new task when the client speaks again. The
    /// wait ends, closing the connection, after `keepalive_timeout` or when the server shuts
    /// down, as Pingora's own wait would. Keep-alive is handled here: nothing goes back to
    /// Pingora's loop.
    async fn serve_http1(
        self: &Arc<Self>,
        stream: Stream,
        settings: Option<HttpPersistentSettings>,
        shutdown: &ShutdownWatch,
    ) {
        // The configuration of this connection's last request, refreshed by the next.
        let mut held = HeldRuntime::new(&self.runtime);
        let mut served = self
            .serve_next(stream, settings, true, &mut held, shutdown)
            .await;
        while let Some((reused, answered_at)) = served {
            let (stream, settings) = reused.consume();
            // Only Pingora's sessions (no `answered_at`) carry bytes over; the fast path hands
            // on the settings it was given untouched.
            if answered_at.is_none() && settings.as_ref().is_some_and(carries_pipelined_bytes) {
                // The client sent its next request with the last one: no wait, and only
                // Pingora's session can read what it already took of it. The request has
                // begun: the rest of it is under the client deadline, and the edge has not
                // seen it yet (a refusal of Pingora's is counted).
                if let Some(client) = stream.as_any().downcast_ref::<ClientStream>() {
                    client.request_begins();
                }
                served = self
                    .serve_by_pingora(stream, settings, false, shutdown)
                    .await;
                continue;
            }
            // Whole seconds, at least one (config/README.md), as the edge tells the client.
            let idle = (held.load().config.server.keepalive_timeout).max(Duration::from_secs(1));
            // Idle from the answer; the fast path read the clock then.
            let mut idle_since = answered_at.unwrap_or_else(Instant::now);
            let closes_at = tokio::time::Instant::from_std(idle_since) + idle;
            let (mut stream, mut settings) = (stream, settings);
            let stream = loop {
                match next_request_arrives(stream, idle_since, closes_at, &self.shutdown).await {
                    NextRequest::Arrived(stream) => break stream,
                    NextRequest::Close => return,
                    NextRequest::Park(idle) => match Parked::park(idle, settings, closes_at) {
                        Ok(parked) => {
                            let gate = self.clone();
                            parking::wait(parked, shutdown, move |stream, settings, shutdown| {
                                gate.serve_resumed(stream, settings, shutdown)
                            });
                            return;
                        }
                        // Not parkable: wait on here.
                        Err((idle, kept)) => {
                            (stream, settings) = (idle, kept);
                            idle_since = Instant::now();
                        }
                    },
                }
            };
            served = self
                .serve_next(stream, settings, false, &mut held, shutdown)
                .await;
        }
    }

    /// One request (`first` on this stream) through the HTTP app: the stream to reuse, if
    /// any, and when the answer went out if that is known without reading the clock again.
    async fn serve_next(
        &self,
        stream: Stream,
        settings: Option<HttpPersistentSettings>,
        first: bool,
        held: &mut HeldRuntime<'_>,
        shutdown: &ShutdownWatch,
    ) -> Option<(ReusedHttpStream, Option<Instant>)> {
        let stream = match express::serve(held, stream, &self.shutdown).await {
            express::Outcome::KeepAlive(stream, answered_at) => {
                return Some((ReusedHttpStream::new(stream, settings), Some(answered_at)))
            }
            express::Outcome::Close => return None,
            express::Outcome::Decline(stream) => stream,
        };
        self.serve_by_pingora(stream, settings, first, shutdown)
            .await
    }

    /// One request through Pingora's HTTP app. Pipelining is on (RFC 9112 §9.3.2: answered in
    /// order, one at a time): without it Pingora closes a connection it has read past the
    /// current request on, and the requests the client sent with it go unanswered.
    async fn serve_by_pingora(
        &self,
        stream: Stream,
        settings: Option<HttpPersistentSettings>,
        first: bool,
        shutdown: &ShutdownWatch,
    ) -> Option<(ReusedHttpStream, Option<Instant>)> {
        let mut session = ServerSession::new_http1(stream);
        if first {
            // Until `request_filter` sets ours; none once shutting down.
            session.set_keepalive((!self.shutdown.is_shutting_down()).then_some(60));
        }
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        session.set_pipelining_enabled(true);
        let reused = self.app.process_new_http(session, shutdown).await?;
        Some((reused, None))
    }

    /// A parked connection whose next request arrived. A plain function returning a boxed
    /// future: `serve_http1` spawns it, and an `async fn` here would make its type recursive.
    fn serve_resumed(
        self: Arc<Self>,
        stream: Stream,
        settings: Option<HttpPersistentSettings>,
        shutdown: ShutdownWatch,
    ) -> parking::Resume {
        Box::pin(async move { self.serve_http1(stream, settings, &shutdown).await })
    }
}

/// Whether Pingora carries bytes of the client's next request over from the last one (read
/// with its head or body): they travel in `settings`, to be parsed by Pingora's next session,
/// so that request must go to Pingora at once — the keep-alive wait would wait for bytes the
/// client has already sent, and the fast path reads the socket. Pingora 0.9 has no accessor
/// for them; its `Debug` form names the field (pinned by the test below).
fn carries_pipelined_bytes(settings: &HttpPersistentSettings) -> bool {
    format!("{settings:?}").contains("pipelined_prefix: Some(")
}

/// How the wait between two requests ended.
enum NextRequest {
    /// Its first bytes are in the stream, for the parser.
    Arrived(Stream),
    /// Still idle after [`PARK_AFTER`], with time left before `keepalive_timeout`.
    Park(Stream),
    /// The client closed, `keepalive_timeout` passed or the server is shutting down.
    Close,
}

/// Wait for the first bytes of the next request on a keep-alive connection until `closes_at`,
/// or until [`PARK_AFTER`] from `idle_since` when there is more time than that left, and read
/// them into the stream's read-ahead for the parser.
///
/// One read through tokio, as nginx reads: tokio forgets a socket's readiness after a short
/// read, so the wait costs no system call and the read that ends it takes the whole head
/// (a 1-byte peek, then the parser's read, were two, and a non-blocking read before the
/// wait a third when the client had not spoken yet, as it mostly has not under load).
async fn next_request_arrives(
    stream: Stream,
    idle_since: Instant,
    closes_at: tokio::time::Instant,
    shutdown: &ShutdownSignal,
) -> NextRequest {
    if !stream.as_any().is::<ClientStream>() {
        // Every stream the gate serves is a ClientStream; were one not, the parser waits.
        return match shutdown.is_stopping() {
            true => NextRequest::Close,
            false => NextRequest::Arrived(stream),
        };
    }
    let Ok(mut client) = stream.into_any().downcast::<ClientStream>() else {
        return NextRequest::Close;
    };
    if !client.read_ahead.is_empty() {
        // Pipelined: the next request has begun already.
        return NextRequest::Arrived(client);
    }
    // During a hand-over the wait goes on: the next answer says `Connection: close`, and only
    // shutdown proper closes a connection between two requests (the client may be sending).
    if shutdown.is_stopping() {
        return last_request_or_close(client).await;
    }
    let park_at = tokio::time::Instant::from_std(idle_since) + PARK_AFTER;
    let wait_until = park_at.min(closes_at);
    let mut timer = client.idle_timer(wait_until);
    let mut head = BytesMut::with_capacity(READ_AHEAD);
    let waited = tokio::select! {
        biased;
        read = client.read_buf(&mut head) => match read {
            Ok(n) if n > 0 => Waited::Bytes,
            _ => Waited::Closed,
        },
        _ = timer.as_mut() => Waited::Idle,
        _ = shutdown.stopping() => Waited::ShuttingDown,
    };
    client.idle_timer = Some(timer);
    match waited {
        Waited::Bytes => {
            client.read_ahead = head.freeze();
            NextRequest::Arrived(client)
        }
        Waited::ShuttingDown => last_request_or_close(client).await,
        Waited::Closed => NextRequest::Close,
        Waited::Idle if park_at < closes_at => NextRequest::Park(client),
        Waited::Idle => NextRequest::Close,
    }
}

/// Shutdown has begun while a keep-alive connection was between two requests: a request the
/// client has already sent (its bytes are in the socket) is still served, its answer saying
/// `Connection: close`; closing under it would reset it. Otherwise the connection closes now.
async fn last_request_or_close(mut client: Box<ClientStream>) -> NextRequest {
    // One poll: what the socket holds now, without waiting for more. The buffer lives in the
    // poll, not across the await: it would otherwise size every connection's future.
    let sent = std::future::poll_fn(|cx| {
        let mut scratch = [0u8; READ_AHEAD];
        let mut buf = ReadBuf::new(&mut scratch);
        Poll::Ready(match Pin::new(&mut *client).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                Some(Bytes::copy_from_slice(buf.filled()))
            }
            _ => None,
        })
    })
    .await;
    match sent {
        Some(bytes) => {
            client.read_ahead = bytes;
            NextRequest::Arrived(client)
        }
        None => NextRequest::Close,
    }
}

/// How [`next_request_arrives`]'s wait ended.
enum Waited {
    /// The next request's first bytes came.
    Bytes,
    /// The client closed or failed.
    Closed,
    /// The server is shutting down.
    ShuttingDown,
    /// Nothing came before the wait's end.
    Idle,
}

/// The most a keep-alive wait reads ahead: Pingora's initial request-head buffer.
pub(super) const READ_AHEAD: usize = 4096;

/// Answer 503 without forwarding anything. The request is read briefly first so closing does
/// not reset the connection before the client has our answer.
pub(super) async fn refuse(mut stream: Stream) {
    let mut scratch = [0u8; 4096];
    let short = Duration::from_millis(200);
    let _ = tokio::time::timeout(short, stream.read(&mut scratch)).await;
    let write = async {
        stream.write_all(OVER_CAPACITY).await?;
        stream.flush().await
    };
    if tokio::time::timeout(Duration::from_secs(1), write)
        .await
        .is_ok()
    {
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(short, stream.read(&mut scratch)).await;
    }
}

/// One open connection in the count; released on drop.
pub(super) struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<ConnectionSlot> {
        let mut current = open.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match open.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    metrics::open_connections().inc();
                    return Some(ConnectionSlot(open.clone()));
                }
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::open_connections().dec();
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection's `[limits]`, as they were when it opened.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// `client_timeout`: to send a whole request once begun.
    pub request: Duration,
    /// `send_timeout`: for one write of an answer to be taken.
    pub send: Duration,
}

/// A client connection with a deadline for receiving each request.
pub struct ClientStream {
    inner: Stream,
    /// How long one write of an answer may wait for the client (the fast path's writes).
    send_timeout: Duration,
    /// Deadlines are milliseconds since this instant.
    opened: Instant,
    timeout_ms: u64,
    /// The current request must be in by then; [`DISARMED`] when no request is being read.
    deadline_ms: AtomicU64,
    /// Wakes a read waiting for the rest of a request when its deadline passes.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Ends the keep-alive wait ([`next_request_arrives`]). Kept, and moved on to each wait's
    /// end: a later deadline moves tokio's timer entry with one atomic exchange, where a new
    /// timer per wait registered and removed an entry under the timer driver's lock.
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Upgraded (e.g. WebSocket): the bytes are no longer requests; no deadlines.
    tunnel: AtomicBool,
    /// The current request reached the edge (its checks count their own refusals). One that
    /// did not and is answered was refused by Pingora before any callback of ours (an
    /// unparseable head: 400; CONNECT: 405): [`ClientStream::count_refusal`] counts it.
    request_seen: AtomicBool,
    /// Bytes the keep-alive wait read off the socket ([`next_request_arrives`]) and not yet
    /// handed to the parser. Empty (no allocation) the rest of the time.
    read_ahead: Bytes,
    _slot: ConnectionSlot,
}

impl ClientStream {
    fn new(inner: Stream, timeouts: ClientTimeouts, slot: ConnectionSlot) -> ClientStream {
        let timeout_ms = u64::try_from(timeouts.request.as_millis()).unwrap_or(u64::MAX / 2);
        ClientStream {
            inner,
            send_timeout: timeouts.send,
            opened: Instant::now(),
            timeout_ms,
            // A new connection must bring its first request within the timeout too.
            deadline_ms: AtomicU64::new(timeout_ms),
            timer: None,
            idle_timer: None,
            tunnel: AtomicBool::new(false),
            request_seen: AtomicBool::new(false),
            read_ahead: Bytes::new(),
            _slot: slot,
        }
    }

    /// A parked connection's new stream around the same socket, with the first bytes of its
    /// next request already read: its deadline is armed as for a request that has begun.
    pub(super) fn resumed(
        inner: Stream,
        timeouts: ClientTimeouts,
        slot: ConnectionSlot,
        first_bytes: Bytes,
    ) -> ClientStream {
        let mut stream = ClientStream::new(inner, timeouts, slot);
        stream.read_ahead = first_bytes;
        stream
    }

    /// What a parked connection keeps: its place in the count and its timeouts.
    pub(super) fn into_parts(self) -> (ConnectionSlot, ClientTimeouts) {
        let timeouts = ClientTimeouts {
            request: Duration::from_millis(self.timeout_ms),
            send: self.send_timeout,
        };
        (self._slot, timeouts)
    }

    /// `[limits] send_timeout` as it was when the connection opened.
    pub fn send_timeout(&self) -> Duration {
        self.send_timeout
    }

    pub(super) fn inner(&self) -> &Stream {
        &self.inner
    }

    /// The guarded stream under a request, if it is one (HTTP/1 connections from the gate).
    pub fn of(session: &Session) -> Option<&ClientStream> {
        session
            .as_downstream()
            .stream()
            .and_then(|s| s.as_any().downcast_ref::<ClientStream>())
    }

    /// Bytes already read off the socket and not parsed yet (the next request's start). A
    /// request begun in them is under the client deadline from now on, as one whose first
    /// bytes come from the socket: bytes read ahead while the last answer was out (pipelined,
    /// or while a worker was awaited) came with the deadline off, and the rest of the head
    /// must not be waited for without one.
    pub fn take_read_ahead(&mut self) -> Bytes {
        let ahead = std::mem::take(&mut self.read_ahead);
        if !ahead.is_empty() {
            self.request_begins();
        }
        ahead
    }

    /// The first bytes of a new request are in: its deadline runs from the next read or wait,
    /// and the edge has not seen it yet.
    fn request_begins(&self) {
        let _ = self.deadline_ms.compare_exchange(
            DISARMED,
            STARTED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.request_seen.store(false, Ordering::Relaxed);
    }

    /// Hand bytes read off the socket back, for whoever parses the next request: before any
    /// read ahead since (they came first).
    pub fn put_back(&mut self, bytes: Bytes) {
        if self.read_ahead.is_empty() {
            self.read_ahead = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.read_ahead.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.read_ahead);
            self.read_ahead = joined.freeze();
        }
    }

    /// While the proxy waits on a worker: ready when the client has gone (its end of stream,
    /// or an error), as Pingora's path watches it. What the client sends meanwhile (its next
    /// request, pipelined) is kept for the parser; past [`READ_AHEAD`] of it the client is not
    /// read any more until its answer is out.
    pub fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.tunnel.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        while self.read_ahead.len() < READ_AHEAD {
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
            let mut buf = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {
                    let mut ahead =
                        BytesMut::with_capacity(self.read_ahead.len() + buf.filled().len());
                    ahead.extend_from_slice(&self.read_ahead);
                    ahead.extend_from_slice(buf.filled());
                    self.read_ahead = ahead.freeze();
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }

    /// The keep-alive wait's timer, set to end at `until` (taken out while the wait reads).
    fn idle_timer(&mut self, until: tokio::time::Instant) -> Pin<Box<tokio::time::Sleep>> {
        match self.idle_timer.take() {
            Some(mut timer) => {
                if timer.deadline() != until {
                    timer.as_mut().reset(until);
                }
                timer
            }
            None => Box::pin(tokio::time::sleep_until(until)),
        }
    }

    /// The request has been read completely: no deadline until the next one starts.
    pub fn request_read(&self) {
        self.deadline_ms.store(DISARMED, Ordering::Relaxed);
    }

    /// The current request's head reached the edge (fast path or Pingora's callbacks).
    pub fn saw_request(&self) {
        self.request_seen.store(true, Ordering::Relaxed);
    }

    /// An answer is going out to a request the edge never saw: Pingora refused it. Counted
    /// once, by the status it carries, in `custodia_rejections_total`.
    #[cold]
    fn count_refusal(&self, answer: &[u8]) {
        self.request_seen.store(true, Ordering::Relaxed);
        let status = answer
            .strip_prefix(b"HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse::<u16>().ok());
        let rejections = metrics::rejections();
        match status {
            Some(405) => rejections.method_not_allowed.inc(),
            Some(414 | 431) => rejections.head_too_large.inc(),
            Some(400..=499) => rejections.malformed.inc(),
            _ => {}
        }
    }

    /// The connection was upgraded (`101 Switching Protocols`): stop guarding it.
    pub fn tunnel(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
        self.deadline_ms.store(DISARMED, Ordering::Relaxed);
    }

    /// The current request must be in within the client timeout from `now_ms`.
    fn arm(&self, now_ms: u64) -> u64 {
        let deadline = now_ms.saturating_add(self.timeout_ms).min(STARTED - 1);
        self.deadline_ms.store(deadline, Ordering::Relaxed);
        deadline
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn timed_out(&self) -> io::Error {
        metrics::rejections().client_timeout.inc();
        self.deadline_ms.store(DISARMED, Ordering::Relaxed);
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not send its request within limits.client_timeout",
        )
    }
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .field("deadline_ms", &self.deadline_ms)
            .finish()
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = if !this.read_ahead.is_empty() && buf.remaining() > 0 {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead.split_to(n));
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if this.tunnel.load(Ordering::Relaxed) {
                    return Poll::Ready(Ok(()));
                }
                let deadline = this.deadline_ms.load(Ordering::Relaxed);
                if deadline == DISARMED {
                    // The first bytes of a new request (or, pipelined, of the one after the
                    // request being answered: the edge's view of that one stays as it is).
                    this.deadline_ms.store(STARTED, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                let now = this.now_ms();
                if deadline == STARTED {
                    this.arm(now);
                } else if now > deadline {
                    return Poll::Ready(Err(this.timed_out()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let deadline = match this.deadline_ms.load(Ordering::Relaxed) {
                    DISARMED => return Poll::Pending,
                    STARTED => this.arm(this.now_ms()),
                    armed => armed,
                };
                let at =
                    tokio::time::Instant::from_std(this.opened) + Duration::from_millis(deadline);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                    Poll::Pending => Poll::Pending,
                }
            }
            other => other,
        }
    }
}

use std::future::Future as _;

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The proxy answers: whatever the client still sends belongs to no deadline of ours.
        self.deadline_ms.store(DISARMED, Ordering::Relaxed);
        if !self.request_seen.load(Ordering::Relaxed) && !self.tunnel.load(Ordering::Relaxed) {
            self.count_refusal(buf);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.deadline_ms.store(DISARMED, Ordering::Relaxed);
        if !self.request_seen.load(Ordering::Relaxed) && !self.tunnel.load(Ordering::Relaxed) {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            self.count_refusal(first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(buf.len());
            buf[..n].copy_from_slice(&self.read_ahead[..n]);
            return Ok(true);
        }
        self.inner.try_peek(buf).await
    }
}

/// A client connection over loopback as the gate hands it on (10 s timeouts), and its
/// client's end: for tests of what reads it.
#[cfg(test)]
pub(crate) async fn client_connection() -> (ClientStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback listener");
    let client = tokio::net::TcpStream::connect(listener.local_addr().expect("its address"))
        .await
        .expect("connected");
    let (accepted, _) = listener.accept().await.expect("accepted");
    let slot = ConnectionSlot::take(&Arc::new(AtomicUsize::new(0)), 1).expect("a slot");
    let inner: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(accepted));
    let timeouts = ClientTimeouts {
        request: Duration::from_secs(10),
        send: Duration::from_secs(10),
    };
    (ClientStream::new(inner, timeouts, slot), client)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy's side of a loopback connection, guarded as the gate guards it, and the client.
    async fn guarded_connection() -> (Stream, tokio::net::TcpStream) {
        let (guarded, client) = client_connection().await;
        (Box::new(guarded), client)
    }

    #[tokio::test]
    async fn pipelined_bytes_pingora_carries_over_are_seen() {
        let (stream, _client) = guarded_connection().await;
        let session = ServerSession::new_http1(stream);
        let mut settings = HttpPersistentSettings::for_session(&session);
        assert!(!carries_pipelined_bytes(&settings));
        settings.set_pipelined_prefix(BytesMut::from(&b"GET /next HTTP/1.1\r\n"[..]));
        assert!(carries_pipelined_bytes(&settings));
    }

    fn long_keepalive() -> (Instant, tokio::time::Instant) {
        let now = Instant::now();
        (
            now,
            tokio::time::Instant::from_std(now) + Duration::from_secs(60),
        )
    }

    /// A request the client sent before it could see the connection close is answered, not
    /// reset: shutdown closes only connections with nothing sent.
    #[tokio::test]
    async fn a_request_already_sent_when_shutdown_begins_is_still_served() {
        let (stream, mut client) = guarded_connection().await;
        let shutdown = ShutdownSignal::new();
        shutdown.announce();
        client
            .write_all(b"GET /last HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        // The bytes are in the proxy's socket before it looks.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (idle_since, closes_at) = long_keepalive();
        match next_request_arrives(stream, idle_since, closes_at, &shutdown).await {
            NextRequest::Arrived(stream) => {
                let client = stream.as_any().downcast_ref::<ClientStream>().unwrap();
                assert!(client.read_ahead.starts_with(b"GET /last "));
            }
            _ => panic!("the request already sent is served"),
        }
        // With nothing sent, the connection closes at once.
        let (stream, _client) = guarded_connection().await;
        let (idle_since, closes_at) = long_keepalive();
        assert!(matches!(
            next_request_arrives(stream, idle_since, closes_at, &shutdown).await,
            NextRequest::Close
        ));
    }

    #[tokio::test]
    async fn the_keep_alive_wait_ends_when_shutdown_begins() {
        let (stream, _client) = guarded_connection().await;
        let shutdown = ShutdownSignal::new();
        let (idle_since, closes_at) = long_keepalive();
        let announce = async {
            tokio::task::yield_now().await;
            shutdown.announce();
        };
        // Unheard, the wait would end after PARK_AFTER with the connection to park.
        let (next, ()) = tokio::join!(
            next_request_arrives(stream, idle_since, closes_at, &shutdown),
            announce
        );
        assert!(matches!(next, NextRequest::Close), "closed at shutdown");
    }

    #[tokio::test]
    async fn the_next_request_ends_the_wait_with_its_bytes_read_ahead() {
        let (stream, mut client) = guarded_connection().await;
        client.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        let shutdown = ShutdownSignal::new();
        let (idle_since, closes_at) = long_keepalive();
        let next = next_request_arrives(stream, idle_since, closes_at, &shutdown).await;
        let NextRequest::Arrived(stream) = next else {
            panic!("the request's first bytes end the wait");
        };
        let mut client_stream = stream.into_any().downcast::<ClientStream>().unwrap();
        assert_eq!(
            &client_stream.take_read_ahead()[..],
            b"GET /next HTTP/1.1\r\n"
        );
    }
}
