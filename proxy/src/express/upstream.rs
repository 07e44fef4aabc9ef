//! The fast path's keep-alive connections to the workers: one pool per worker thread, as
//! nginx keeps one per worker process, so taking and returning a connection is a thread-local
//! push and pop — no lock, no wake-up of another thread, no task per idle connection.
//!
//! Idle connections are not watched one by one (Pingora spawns a task per released
//! connection). Instead, while a thread's pool holds any, a sweeper task on that thread looks
//! at them every [`SWEEP_EVERY`] with one non-blocking peek each and closes those the worker
//! closed (no `CLOSE_WAIT` socket lingers) or that were idle longer than
//! `[upstream] idle_timeout`. Taking one checks it too, from tokio's readiness (no system call
//! unless something arrived): a connection with anything to read — bytes the worker sent after
//! its answer, its end of stream — is dropped, never reused ([`take`]). One the worker closes
//! just before its next use fails before any answer arrives; the caller then tries a new
//! connection to the same worker, which is safe for the requests the fast path takes (`GET`,
//! `HEAD`).
//!
//! The buffers answers are read into are kept per thread the same way ([`read_buffer`],
//! [`recycle`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Idle connections kept per worker and thread (Pingora's pool keeps 128 in all).
const MAX_IDLE_PER_BACKEND: usize = 64;

/// How often a thread's idle connections are checked.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A connection to a worker, with the timer its reads wait under.
pub struct Conn {
    pub stream: TcpStream,
    /// Set once, then moved on to each read's deadline: a deadline later than the one before
    /// moves tokio's timer entry with one atomic exchange, where a timer per read registered
    /// and removed an entry under the timer driver's lock (~0.6k instructions per request).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            timer: None,
        }
    }

    /// Read what the worker sent into `buf`; `Ok(0)` at its end of stream. Fails with
    /// `TimedOut` if nothing came by `deadline`.
    pub async fn read_by(&mut self, buf: &mut BytesMut, deadline: Instant) -> io::Result<usize> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        let read = self.stream.read_buf(buf);
        let mut read = std::pin::pin!(read);
        poll_fn(|cx| {
            if let Poll::Ready(result) = read.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(timed_out("read_timeout"))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// The error of an exchange with a worker that ran past `[upstream] <setting>`.
pub fn timed_out(setting: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the backend did not answer within upstream.{setting}"),
    )
}

struct Idle {
    conn: Conn,
    expires: Instant,
}

#[derive(Default)]
struct Pool {
    /// Keyed by the configured backends' addresses, never a client's: foldhash (~0.2k
    /// instructions less per `take` and `put` than SipHash).
    idle: HashMap<SocketAddr, Vec<Idle>, foldhash::fast::RandomState>,
    /// A sweeper task runs on this thread.
    sweeping: bool,
}

impl Pool {
    /// Close the connections that expired or that the worker closed; forget empty lists.
    fn sweep(&mut self, now: Instant) {
        self.idle.retain(|_, list| {
            list.retain(|idle| idle.expires > now && still_open(&idle.conn.stream));
            !list.is_empty()
        });
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
    /// Read buffers of finished exchanges, for the next ones on this thread: an 8 KiB block
    /// allocated and freed per request took mimalloc's slow path about every other time.
    static SPARE_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Capacity of a buffer an answer is read into.
pub const READ_BUFFER: usize = 8 * 1024;
/// Spare read buffers kept per thread, and the largest kept.
const MAX_SPARE_BUFFERS: usize = 64;
const MAX_SPARE_CAPACITY: usize = 64 * 1024;

/// An empty buffer to read an answer into, with room for [`READ_BUFFER`] bytes at least.
pub fn read_buffer() -> BytesMut {
    SPARE_BUFFERS
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_BUFFER))
}

/// Give back a buffer from [`read_buffer`] once its bytes are no longer needed.
pub fn recycle(mut buf: BytesMut) {
    buf.clear();
    // Whole again only if nothing else holds part of it; one grown for a long body goes.
    if buf.capacity() > MAX_SPARE_CAPACITY || !buf.try_reclaim(READ_BUFFER) {
        return;
    }
    SPARE_BUFFERS.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < MAX_SPARE_BUFFERS {
            spare.push(buf);
        }
    });
}

/// The most recently used idle connection to `addr` that has not expired by `now` and has
/// nothing to read: one the worker wrote to after its answer (more than its framing said, a
/// body after a HEAD's, a late second answer) or closed is dropped, never reused. Reused, its
/// leftover bytes would be read as the answer to the next request, and the answer to that one
/// as the answer to the request after it, of another client.
pub fn take(addr: SocketAddr, now: Instant) -> Option<Conn> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if idle.expires <= now {
                // The rest are older still.
                list.clear();
                return None;
            }
            if nothing_to_read(&idle.conn.stream) {
                return Some(idle.conn);
            }
        }
        None
    })
}

/// Whether nothing has arrived on an idle connection since its answer was read. Tokio's
/// readiness says so without a system call: the answer's last read, short of the buffer, left
/// the socket drained and its readiness cleared, and anything arriving since (bytes, the end of
/// stream) set it again when the thread's reactor saw it. Only when it is set, a peek decides.
fn nothing_to_read(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Ok(())) => still_open(stream),
        Poll::Ready(Err(_)) => false,
    }
}

/// Keep a connection whose last exchange ended cleanly for the next request to `addr`, until
/// `expires` at most.
pub fn put(addr: SocketAddr, conn: Conn, expires: Instant) {
    let start_sweeper = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_BACKEND {
            // The oldest goes; its socket closes.
            list.remove(0);
        }
        list.push(Idle { conn, expires });
        !std::mem::replace(&mut pool.sweeping, true)
    });
    if start_sweeper {
        // Each proxy worker thread runs its own single-threaded runtime (`server.rs`): the task
        // runs on this thread and sweeps this thread's pool.
        tokio::spawn(sweep_while_idle_connections_remain());
    }
}

async fn sweep_while_idle_connections_remain() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let done = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            pool.sweep(Instant::now());
            if pool.idle.is_empty() {
                pool.sweeping = false;
            }
            !pool.sweeping
        });
        if done {
            return;
        }
    }
}

/// Whether the worker still keeps the connection open: no end of stream, no error, and no
/// bytes it had no request for.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: `recv` writes at most one byte into `byte`, which outlives the call; the fd is
    // the open socket `stream` owns.
    let peeked = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    peeked < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

/// Idle connections to `addr` on this thread (tests).
pub fn idle_count(addr: SocketAddr) -> usize {
    POOL.with(|pool| pool.borrow().idle.get(&addr).map_or(0, Vec::len))
}

/// A new connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(connected) => connected?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect timed out (upstream.connect_timeout)",
            ))
        }
    };
    // Small requests and answers: no Nagle delay.
    stream.set_nodelay(true)?;
    Ok(Conn::new(stream))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A connection to a loopback listener, and the listener's side of it.
    async fn pair() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conn = connect(addr, Duration::from_secs(5)).await.unwrap();
        let (worker, _) = listener.accept().await.unwrap();
        (conn, worker)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// The worker's answer, read as the fast path reads one: into a buffer larger than it.
    async fn answered(conn: &mut Conn, worker: &mut TcpStream, answer: &[u8]) {
        worker.write_all(answer).await.unwrap();
        let mut buf = BytesMut::with_capacity(4096);
        let far = Instant::now() + Duration::from_secs(30);
        while buf.len() < answer.len() {
            assert!(conn.read_by(&mut buf, far).await.unwrap() > 0);
        }
    }

    /// Lets this thread's reactor see what arrived on the sockets.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_clean_idle_connection_is_reused() {
        let (mut conn, mut worker) = pair().await;
        let addr = conn.stream.peer_addr().unwrap();
        answered(&mut conn, &mut worker, OK).await;
        put(addr, conn, Instant::now() + Duration::from_secs(60));
        settle().await;
        assert!(take(addr, Instant::now()).is_some());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_connection_with_bytes_after_its_answer_is_never_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clean = connect(addr, Duration::from_secs(5)).await.unwrap();
        let (mut clean_worker, _) = listener.accept().await.unwrap();
        let mut dirty = connect(addr, Duration::from_secs(5)).await.unwrap();
        let (mut dirty_worker, _) = listener.accept().await.unwrap();
        let clean_port = clean.stream.local_addr().unwrap();
        let expires = || Instant::now() + Duration::from_secs(60);

        answered(
            &mut clean,
            &mut clean_worker,
            b"HTTP/1.1 204 No Content\r\n\r\n",
        )
        .await;
        put(addr, clean, expires());
        // The most recent one: its worker sends more than its framing said, in a later write.
        answered(&mut dirty, &mut dirty_worker, OK).await;
        put(addr, dirty, expires());
        dirty_worker
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!")
            .await
            .unwrap();
        settle().await;
        let taken = take(addr, Instant::now()).expect("the clean connection");
        assert_eq!(
            taken.stream.local_addr().unwrap(),
            clean_port,
            "the connection with bytes after its answer is dropped, the clean one taken"
        );
        assert_eq!(idle_count(addr), 0);

        // One the worker closed is not taken either.
        put(addr, taken, expires());
        drop(clean_worker);
        settle().await;
        assert!(take(addr, Instant::now()).is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn each_read_on_a_connection_has_its_own_deadline() {
        let (mut conn, mut worker) = pair().await;
        let mut buf = BytesMut::with_capacity(64);
        let far = || Instant::now() + Duration::from_secs(30);

        worker.write_all(b"first").await.unwrap();
        assert_eq!(conn.read_by(&mut buf, far()).await.unwrap(), 5);

        // Nothing comes: this read's deadline, sooner than the last one's, ends it.
        let started = Instant::now();
        let timed_out = conn
            .read_by(&mut buf, started + Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(timed_out.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));

        // After its timer went off, the next read waits for its own, later deadline.
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            worker.write_all(b"second").await.unwrap();
            worker
        });
        assert_eq!(conn.read_by(&mut buf, far()).await.unwrap(), 6);
        assert_eq!(&buf[..], b"firstsecond");
        drop(later.await.unwrap());
        assert_eq!(
            conn.read_by(&mut buf, far()).await.unwrap(),
            0,
            "end of stream"
        );
    }
}
