//! Parked keep-alive connections: a client idle for longer than [`PARK_AFTER`] between two
//! requests keeps only its socket, its place in the connection count and a place in its worker
//! thread's [`lot`].
//!
//! A connection waiting in [`super::connection`]'s keep-alive wait still holds Pingora's stream
//! around its socket (the 1460-byte write buffer, digests, timers) and the task that serves it:
//! about 7 KB per idle client, where nginx keeps under 1 KB. Parked, the stream and the task are
//! dropped and the socket waits in the lot, one task per worker thread for all its parked
//! connections; when the client's next request arrives, a fresh stream is built around the same
//! socket and served like a new connection. Clients that come back within [`PARK_AFTER`] (every
//! busy one) never pay for it.
//!
//! The socket outlives the stream through a duplicate descriptor: the stream closes its own
//! descriptor when dropped, and the connection stays open through the copy.
//!
//! The new stream is Pingora's plain one around a tokio socket, which has no write buffer (the
//! listener's buffer settings cannot be applied from outside Pingora): a response after a
//! wake-up leaves in two `send`s, its head and its body, instead of one. That is the price of a
//! client that idles for seconds between requests; busy clients keep their first stream.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::apps::HttpPersistentSettings;
use pingora_core::protocols::l4::stream::Stream as TcpStream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora_core::server::ShutdownWatch;
use tokio::time::Instant;

use super::connection::{ClientStream, ClientTimeouts, ConnectionSlot, READ_AHEAD};
use crate::metrics;

mod lot;

/// How long a keep-alive connection waits, stream and all, before it is parked.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// A keep-alive connection between two requests, reduced to its socket.
pub struct Parked {
    socket: tokio::net::TcpStream,
    slot: ConnectionSlot,
    timeouts: ClientTimeouts,
    /// Boxed: the size of every parked connection's place in the lot.
    settings: Option<Box<HttpPersistentSettings>>,
    /// When the keep-alive wait ends and the connection is closed.
    closes_at: Instant,
    _counted: Counted,
}

/// One parked connection in `custodia_connections_parked`, for as long as it is parked.
struct Counted;

impl Counted {
    fn new() -> Counted {
        metrics::parked_connections().inc();
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::parked_connections().dec();
    }
}

impl Parked {
    /// Park `stream` until `closes_at`. Gives the stream back when it cannot be parked (not one
    /// of our TCP client streams, or the descriptor could not be duplicated): its caller then
    /// keeps waiting the old way.
    pub fn park(
        stream: Stream,
        settings: Option<HttpPersistentSettings>,
        closes_at: Instant,
    ) -> Result<Parked, (Stream, Option<HttpPersistentSettings>)> {
        let parkable = stream
            .as_any()
            .downcast_ref::<ClientStream>()
            .is_some_and(|client| client.inner().as_any().is::<TcpStream>());
        if !parkable {
            return Err((stream, settings));
        }
        let socket = match duplicate(stream.id()) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::debug!(error = %e, "cannot park an idle connection");
                return Err((stream, settings));
            }
        };
        let Ok(client) = stream.into_any().downcast::<ClientStream>() else {
            unreachable!("checked to be a ClientStream above");
        };
        let (slot, timeouts) = (*client).into_parts();
        // The stream is gone: let the allocator give its memory back.
        collect_soon();
        Ok(Parked {
            socket,
            slot,
            timeouts,
            settings: settings.map(Box::new),
            closes_at,
            _counted: Counted::new(),
        })
    }

    /// The client's next request has begun with `first_bytes`: a new stream around the same
    /// socket, guarded as a new connection's.
    fn resume(self, first_bytes: Bytes) -> (Stream, Option<HttpPersistentSettings>) {
        let Parked {
            socket,
            slot,
            timeouts,
            settings,
            ..
        } = self;
        let fd = socket.as_raw_fd();
        let mut stream = TcpStream::from(socket);
        // The peer address the request path reads (X-Forwarded-For, access log, login limits).
        stream.set_socket_digest(SocketDigest::from_raw_fd(fd));
        let client = ClientStream::resumed(Box::new(stream), timeouts, slot, first_bytes);
        (Box::new(client), settings.map(|s| *s))
    }
}

/// A second descriptor for the socket behind `fd`, registered with this thread's reactor.
fn duplicate(fd: i32) -> io::Result<tokio::net::TcpStream> {
    // SAFETY: `fd` is the open socket of a live stream; `dup` only creates a new descriptor.
    let copy = unsafe { libc::dup(fd) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` was just created by `dup` and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(copy) };
    let socket = std::net::TcpStream::from(owned);
    // Shared with the original descriptor, so already set; said again for tokio's sake.
    socket.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(socket)
}

/// What the client has sent, without waiting: `Ok(None)` when it closed the connection.
/// A synchronous function, so its buffer is not part of any parked task.
fn read_ahead(socket: &tokio::net::TcpStream) -> io::Result<Option<Bytes>> {
    let mut buf = [0u8; READ_AHEAD];
    match socket.try_read(&mut buf)? {
        0 => Ok(None),
        n => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
    }
}

/// The serving of a connection whose next request arrived, boxed: its state must not size
/// anything that waits.
pub type Resume = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Let `parked` wait in this thread's lot; `serve` runs as a task of its own once the client's
/// next request arrives. Closed instead when the server is shutting down.
pub fn wait<F>(parked: Parked, shutdown: &ShutdownWatch, serve: F)
where
    F: FnOnce(Stream, Option<HttpPersistentSettings>, ShutdownWatch) -> Resume + Send + 'static,
{
    let serve: lot::Serve = Box::new(serve);
    lot::admit(lot::Waiting { parked, serve }, shutdown);
}

/// Ask the allocator, four times a second at most per thread, to return the pages freed since.
///
/// mimalloc keeps freed pages for reuse and gives them back to the system only when the
/// thread that owns them collects; a worker thread that has just parked thousands of idle
/// clients and then sits idle itself would otherwise keep their streams' memory for good.
fn collect_soon() {
    thread_local! {
        static SCHEDULED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if SCHEDULED.with(|s| s.replace(true)) {
        return;
    }
    // On this thread: each proxy worker is a one-thread runtime, and mimalloc collects the
    // calling thread's heap.
    tokio::spawn(async {
        tokio::time::sleep(COLLECT_AFTER).await;
        SCHEDULED.with(|s| s.set(false));
        // Forced: pages freed in the last few milliseconds are returned too, not kept for the
        // purge delay with nothing left to run a later collection.
        // SAFETY: `mi_collect` only walks and trims the calling thread's own heap.
        unsafe { libmimalloc_sys::mi_collect(true) };
    });
}

/// How long after a park the allocator collects (parks in between share the collection).
const COLLECT_AFTER: Duration = Duration::from_millis(250);
