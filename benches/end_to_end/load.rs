//! The load generator: a fixed number of HTTP/1.1 keep-alive connections (hyper 1 client, one
//! connection per task), each sending its next GET as soon as the previous answer is read. A
//! warm-up, then a measured window; only requests that start and finish inside the window count.
//! Latency goes into an HdrHistogram (µs). It runs on a one-thread tokio runtime so that it takes
//! at most one core away from the proxy and the workers.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One load run's shape.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub path: String,
    /// Sent as `Cookie:` on every request (the sealed session), if any.
    pub cookie: Option<String>,
    pub concurrency: usize,
    pub warmup: Duration,
    pub measure: Duration,
    /// Count the answers whose body contains this (e.g. `"worker":"slow"`).
    pub count_marker: Option<String>,
}

/// What one run measured (inside the window only).
#[derive(Clone, Debug)]
pub struct LoadResult {
    pub requests: u64,
    pub non_2xx: u64,
    pub errors: u64,
    /// Answers whose body contained [`LoadSpec::count_marker`].
    pub marked: u64,
    pub latency_us: Histogram<u64>,
    pub window: Duration,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }
    pub fn p50_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.50) as f64 / 1000.0
    }
    pub fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }
}

/// Called at the start and at the end of the measured window (e.g. to read a proxy's CPU time).
pub trait WindowProbe {
    fn at_start(&mut self);
    fn at_end(&mut self);
}

/// Runs `spec` on a fresh one-thread runtime; `probe` is read at the window's edges.
pub fn run(spec: &LoadSpec, probe: &mut dyn WindowProbe) -> Result<LoadResult, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("load generator runtime: {e}"))?;
    runtime.block_on(drive(spec, probe))
}

struct TaskTally {
    requests: u64,
    non_2xx: u64,
    errors: u64,
    marked: u64,
    latency_us: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|e| panic!("histogram: {e}"))
}

async fn drive(spec: &LoadSpec, probe: &mut dyn WindowProbe) -> Result<LoadResult, String> {
    let start = Instant::now() + Duration::from_millis(50);
    let window_start = start + spec.warmup;
    let window_end = window_start + spec.measure;
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency {
        tasks.push(tokio::spawn(connection_task(
            spec.clone(),
            window_start,
            window_end,
        )));
    }
    tokio::time::sleep_until(window_start).await;
    probe.at_start();
    let measured_from = std::time::Instant::now();
    tokio::time::sleep_until(window_end).await;
    probe.at_end();
    let window = measured_from.elapsed();

    let mut total = TaskTally {
        requests: 0,
        non_2xx: 0,
        errors: 0,
        marked: 0,
        latency_us: histogram(),
    };
    for task in tasks {
        let tally = task.await.map_err(|e| format!("load task failed: {e}"))?;
        total.requests += tally.requests;
        total.non_2xx += tally.non_2xx;
        total.errors += tally.errors;
        total.marked += tally.marked;
        total
            .latency_us
            .add(&tally.latency_us)
            .map_err(|e| format!("histogram merge: {e}"))?;
    }
    Ok(LoadResult {
        requests: total.requests,
        non_2xx: total.non_2xx,
        errors: total.errors,
        marked: total.marked,
        latency_us: total.latency_us,
        window,
    })
}

/// A request that has not answered after this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn connection_task(spec: LoadSpec, window_start: Instant, window_end: Instant) -> TaskTally {
    let mut tally = TaskTally {
        requests: 0,
        non_2xx: 0,
        errors: 0,
        marked: 0,
        latency_us: histogram(),
    };
    let host = spec.addr.to_string();
    let marker = spec.count_marker.as_deref().map(str::as_bytes);
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    while Instant::now() < window_end {
        let began = Instant::now();
        let outcome = timeout(async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = Some(connect(spec.addr).await?);
            }
            let Some(s) = sender.as_mut() else {
                return Err("no connection".to_string());
            };
            s.ready().await.map_err(|e| format!("not ready: {e}"))?;
            let mut request = Request::get(spec.path.as_str()).header(http::header::HOST, &host);
            if let Some(cookie) = &spec.cookie {
                request = request.header(http::header::COOKIE, cookie);
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = s
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((status, body))
        })
        .await;
        let done = Instant::now();
        let counted = began >= window_start && done <= window_end;
        match outcome {
            Ok((status, body)) => {
                if counted {
                    tally.requests += 1;
                    if !status.is_success() {
                        tally.non_2xx += 1;
                    }
                    if marker.is_some_and(|m| contains(&body, m)) {
                        tally.marked += 1;
                    }
                    let micros = done.duration_since(began).as_micros().max(1) as u64;
                    tally.latency_us.saturating_record(micros);
                }
            }
            Err(_) => {
                if counted {
                    tally.errors += 1;
                }
                sender = None;
                // Do not spin on a refused connection.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

async fn timeout<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Holds `count` idle keep-alive connections to `addr`, each after one answered GET, until
/// `hold` returns; opens them `batch` at a time. Returns how many were opened and answered (a
/// connection refused or unanswered is not held, and the report shows the shortfall).
pub fn hold_idle_connections(
    addr: SocketAddr,
    path: &str,
    count: usize,
    batch: usize,
    hold: &mut dyn FnMut(usize),
) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        let mut held = Vec::with_capacity(count);
        let mut opened = 0;
        while opened < count {
            let n = batch.min(count - opened);
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                let path = path.to_string();
                set.spawn(async move { one_request_then_idle(addr, &path).await });
            }
            while let Some(joined) = set.join_next().await {
                if let Ok(Ok(stream)) = joined {
                    held.push(stream);
                }
            }
            opened += n;
        }
        hold(held.len());
        let answered = held.len();
        drop(held);
        Ok(answered)
    })
}

/// Plain bytes rather than hyper: the client side of 10k idle connections should cost little.
async fn one_request_then_idle(addr: SocketAddr, path: &str) -> Result<TcpStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before the answer".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    return Err(format!("answer: {}", head.lines().next().unwrap_or("")));
                }
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or("no content-length")?;
                if buf.len() >= end + 4 + length {
                    return Ok(stream);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
