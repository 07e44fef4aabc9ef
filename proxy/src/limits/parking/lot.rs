//! The lot: every connection parked on a worker thread waits in one task of that thread, so a
//! parked client costs its socket's registration and some bookkeeping, not a task, a timer and
//! a shutdown watch of its own.
//!
//! - Each parked socket is polled for readability with a waker of its own, which names it in
//!   the lot's ready queue and wakes the lot: one wake-up looks at the sockets that spoke, not
//!   at all of them.
//! - Deadlines (`keepalive_timeout`) wait in a heap under one timer.
//! - At shutdown the lot closes every parked connection and takes no more.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use pingora_core::apps::HttpPersistentSettings;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::{read_ahead, Parked, Resume};

/// What serves a parked connection once its next request has arrived.
pub(super) type Serve =
    Box<dyn FnOnce(Stream, Option<HttpPersistentSettings>, ShutdownWatch) -> Resume + Send>;

/// A parked connection and what serves it next.
pub(super) struct Waiting {
    pub parked: Parked,
    pub serve: Serve,
}

thread_local! {
    /// This thread's lot (each proxy worker is a one-thread runtime).
    static LOT: RefCell<Option<mpsc::UnboundedSender<Waiting>>> = const { RefCell::new(None) };
}

/// Hand `waiting` to this thread's lot, opening it on first use. Once the server is shutting
/// down the connection is closed instead.
pub(super) fn admit(waiting: Waiting, shutdown: &ShutdownWatch) {
    if *shutdown.borrow() {
        return;
    }
    LOT.with(|lot| {
        let mut lot = lot.borrow_mut();
        let waiting = match lot.as_ref() {
            Some(sender) => match sender.send(waiting) {
                Ok(()) => return,
                // A lot of an earlier runtime on this thread is gone: open a new one.
                Err(mpsc::error::SendError(waiting)) => waiting,
            },
            None => waiting,
        };
        let (sender, arrivals) = mpsc::unbounded_channel();
        // The receiver is alive: it is right here.
        let _ = sender.send(waiting);
        *lot = Some(sender);
        tokio::spawn(run(arrivals, shutdown.clone()));
    });
}

async fn run(mut arrivals: mpsc::UnboundedReceiver<Waiting>, shutdown: ShutdownWatch) {
    let mut watch = shutdown.clone();
    let mut shutting_down = Box::pin(async move {
        // An error means the server is gone: as good as a shutdown.
        let _ = watch.changed().await;
    });
    let mut lot = Lot {
        entries: Vec::new(),
        vacant: Vec::new(),
        next_generation: 0,
        deadlines: BinaryHeap::new(),
        ready: Arc::new(ReadyQueue::default()),
        timer: Box::pin(tokio::time::sleep_until(Instant::now())),
        shutdown,
    };
    poll_fn(|cx| {
        if shutting_down.as_mut().poll(cx).is_ready() || *lot.shutdown.borrow() {
            // Close every parked connection, and any still on its way in; but a client that
            // has already sent its next request gets it answered (with `Connection: close`),
            // not a reset.
            arrivals.close();
            let arriving = std::iter::from_fn(|| arrivals.try_recv().ok());
            let parked = lot.entries.drain(..).flatten().map(|entry| entry.waiting);
            for waiting in parked.collect::<Vec<_>>().into_iter().chain(arriving) {
                if let Ok(Some(first_bytes)) = read_ahead(&waiting.parked.socket) {
                    let Waiting { parked, serve } = waiting;
                    let (stream, settings) = parked.resume(first_bytes);
                    tokio::spawn(serve(stream, settings, lot.shutdown.clone()));
                }
            }
            return Poll::Ready(());
        }
        lot.poll(cx, &mut arrivals);
        Poll::Pending
    })
    .await;
}

struct Lot {
    /// Parked connections by key; `None` where a key is free (listed in `vacant`).
    entries: Vec<Option<Entry>>,
    vacant: Vec<usize>,
    /// Tells a key's current occupant from an earlier one, in stale wake-ups and deadlines.
    next_generation: u64,
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    ready: Arc<ReadyQueue>,
    timer: Pin<Box<Sleep>>,
    shutdown: ShutdownWatch,
}

struct Entry {
    waiting: Waiting,
    generation: u64,
    waker: Waker,
}

impl Lot {
    fn poll(&mut self, cx: &mut Context<'_>, arrivals: &mut mpsc::UnboundedReceiver<Waiting>) {
        // Before draining, so a socket that speaks meanwhile wakes this poll's task.
        self.ready.set_lot(cx.waker());
        loop {
            let mut busy = false;
            while let Poll::Ready(Some(waiting)) = arrivals.poll_recv(cx) {
                self.insert(waiting);
                busy = true;
            }
            for (key, generation) in self.ready.take() {
                if self.is_current(key, generation) {
                    self.poll_socket(key);
                }
                busy = true;
            }
            let now = Instant::now();
            while let Some(&Reverse((at, key, generation))) = self.deadlines.peek() {
                if at > now {
                    break;
                }
                self.deadlines.pop();
                if self.is_current(key, generation) {
                    // Dropped: the keep-alive wait is over, the connection closes.
                    self.remove(key);
                }
            }
            if !busy {
                break;
            }
        }
        if let Some(&Reverse((at, _, _))) = self.deadlines.peek() {
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
    }

    fn insert(&mut self, waiting: Waiting) {
        let key = self.vacant.pop().unwrap_or_else(|| {
            self.entries.push(None);
            self.entries.len() - 1
        });
        let generation = self.next_generation;
        self.next_generation += 1;
        // Deadlines of connections that left stay in the heap until their time; a client that
        // parks every few seconds would pile them up for a whole keep-alive timeout.
        if self.deadlines.len() > 2 * self.live() + 64 {
            let entries = &self.entries;
            let current = |key: usize, generation: u64| matches!(entries.get(key), Some(Some(e)) if e.generation == generation);
            retain_current(&mut self.deadlines, current);
        }
        self.deadlines
            .push(Reverse((waiting.parked.closes_at, key, generation)));
        let waker = Waker::from(Arc::new(SocketWaker {
            key,
            generation,
            ready: self.ready.clone(),
        }));
        self.entries[key] = Some(Entry {
            waiting,
            generation,
            waker,
        });
        self.poll_socket(key);
    }

    /// Parked connections now.
    fn live(&self) -> usize {
        self.entries.len() - self.vacant.len()
    }

    fn is_current(&self, key: usize, generation: u64) -> bool {
        matches!(self.entries.get(key), Some(Some(entry)) if entry.generation == generation)
    }

    fn remove(&mut self, key: usize) -> Option<Entry> {
        let entry = self.entries.get_mut(key)?.take()?;
        self.vacant.push(key);
        Some(entry)
    }

    /// Ask the socket at `key` whether the client spoke; serve it if so, close it if it left,
    /// leave its waker registered otherwise.
    fn poll_socket(&mut self, key: usize) {
        let Some(Some(entry)) = self.entries.get(key) else {
            return;
        };
        let mut cx = Context::from_waker(&entry.waker);
        let first_bytes = loop {
            match entry.waiting.parked.socket.poll_read_ready(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(Err(_)) => break None,
                Poll::Ready(Ok(())) => match read_ahead(&entry.waiting.parked.socket) {
                    Ok(Some(bytes)) => break Some(bytes),
                    // Readiness was stale and is cleared now: ask again, which registers.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    // The client closed, or the socket failed.
                    Ok(None) | Err(_) => break None,
                },
            }
        };
        let Some(entry) = self.remove(key) else {
            return;
        };
        if let Some(first_bytes) = first_bytes {
            let Waiting { parked, serve } = entry.waiting;
            let (stream, settings) = parked.resume(first_bytes);
            tokio::spawn(serve(stream, settings, self.shutdown.clone()));
        }
    }
}

/// Drop the deadlines whose connection is gone (`current` says which are not).
fn retain_current(
    deadlines: &mut BinaryHeap<Reverse<(Instant, usize, u64)>>,
    current: impl Fn(usize, u64) -> bool,
) {
    deadlines.retain(|Reverse((_, key, generation))| current(*key, *generation));
}

/// Keys of the sockets that reported readiness since the lot last looked.
#[derive(Default)]
struct ReadyQueue {
    keys: Mutex<Vec<(usize, u64)>>,
    lot: Mutex<Option<Waker>>,
}

impl ReadyQueue {
    fn set_lot(&self, waker: &Waker) {
        let mut lot = self.lot.lock().unwrap_or_else(PoisonError::into_inner);
        if !lot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *lot = Some(waker.clone());
        }
    }

    fn take(&self) -> Vec<(usize, u64)> {
        std::mem::take(&mut *self.keys.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn push(&self, key: usize, generation: u64) {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((key, generation));
        if let Some(lot) = self
            .lot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            lot.wake_by_ref();
        }
    }
}

/// The waker a parked socket's readiness calls: it names the socket to the lot.
struct SocketWaker {
    key: usize,
    generation: u64,
    ready: Arc<ReadyQueue>,
}

impl Wake for SocketWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.key, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_deadlines_are_dropped_and_live_ones_kept_in_order() {
        let now = Instant::now();
        let at = |s: u64| now + std::time::Duration::from_secs(s);
        let mut deadlines = BinaryHeap::new();
        // Key 1 was reused: generation 7 left, generation 9 is parked now.
        for (s, key, generation) in [(5, 1, 7), (3, 2, 8), (9, 1, 9), (1, 3, 4)] {
            deadlines.push(Reverse((at(s), key, generation)));
        }
        retain_current(&mut deadlines, |key, generation| {
            matches!((key, generation), (1, 9) | (2, 8))
        });
        let left: Vec<_> = std::iter::from_fn(|| deadlines.pop().map(|Reverse(d)| d)).collect();
        assert_eq!(left, vec![(at(3), 2, 8), (at(9), 1, 9)]);
    }
}
