//! End-to-end tests: a worker served in-process on 127.0.0.1:0 and the real binary, over real TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use custodia_app::identity::IDENTITY_HEADER;
use custodia_app::{handle, serve, serve_state, sign_assertion, AppSettings, AppState, Identity};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const KEY: &[u8] = b"integration-test-key-0123456789abcdef";
/// Upper bound for every network wait and every "eventually".
const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// In-process worker

/// A worker serving on an ephemeral port; stops (and is aborted) when dropped.
struct Worker {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl Worker {
    async fn start(settings: AppSettings) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, settings, async {
            let _ = stopped.await;
        }));
        Worker {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Like [`Worker::start`], but through `serve_state` so the test can watch the state.
    async fn start_with_state(state: Arc<AppState>) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_state(listener, state, async {
            let _ = stopped.await;
        }));
        Worker {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for `serve` to return and re-raises its error or panic.
    async fn stopped(&mut self) -> io::Result<()> {
        let task = self.task.take().expect("already stopped");
        timeout(PATIENCE, task)
            .await
            .expect("serve did not return in time")
            .expect("serve panicked")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.trigger_shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn settings(worker_id: &str, key: Option<&[u8]>, delay: Duration) -> AppSettings {
    AppSettings {
        worker_id: worker_id.into(),
        delay,
        assertion_key: key.map(<[u8]>::to_vec),
        previous_assertion_keys: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Client: hyper's low-level http1 connection, one per `Client`

struct Client {
    sender: SendRequest<Empty<Bytes>>,
    driver: JoinHandle<hyper::Result<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

async fn connect(addr: SocketAddr) -> io::Result<Client> {
    let stream = timeout(PATIENCE, TcpStream::connect(addr))
        .await
        .expect("connect timed out")?;
    let (sender, conn) = timeout(PATIENCE, handshake(TokioIo::new(stream)))
        .await
        .expect("handshake timed out")
        .map_err(io::Error::other)?;
    Ok(Client {
        sender,
        driver: tokio::spawn(conn),
    })
}

impl Client {
    async fn send(&mut self, req: Request<Empty<Bytes>>) -> Reply {
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(req).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Reply {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8(body.to_vec()).unwrap(),
            })
        };
        timeout(PATIENCE, exchange)
            .await
            .expect("request timed out")
            .expect("request failed")
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.send(request(path).body(Empty::new()).unwrap()).await
    }
}

fn request(path: &str) -> http::request::Builder {
    Request::get(path).header(http::header::HOST, "custodia.test")
}

/// One request on a fresh connection.
async fn get(addr: SocketAddr, path: &str) -> Reply {
    connect(addr).await.unwrap().get(path).await
}

async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = request(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    connect(addr)
        .await
        .unwrap()
        .send(builder.body(Empty::new()).unwrap())
        .await
}

/// Polls `condition` until it holds, failing after [`PATIENCE`].
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ada() -> Identity {
    Identity {
        sub: "auth0|ada".into(),
        email: Some("ada@example.com".into()),
        name: Some("Ada <Lovelace>".into()),
        picture: Some("https://cdn.example.com/ada.png".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Routes over the wire

#[tokio::test]
async fn hello_answers_json_with_message_timestamp_and_worker() {
    let worker = Worker::start(settings("worker-7", None, Duration::ZERO)).await;
    let reply = get(worker.addr, "/api/hello").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    let json = reply.json();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 3, "{json}");
    assert_eq!(json["message"], "Hello, Custodia... This is Pascal!!!");
    assert_eq!(json["worker"], "worker-7");
    let stamp = humantime::parse_rfc3339(json["timestamp"].as_str().unwrap()).unwrap();
    let age = SystemTime::now().duration_since(stamp).unwrap();
    assert!(age < PATIENCE, "timestamp {age:?} old");
}

#[tokio::test]
async fn home_is_the_guest_page_without_an_assertion() {
    let worker = Worker::start(settings("w", Some(KEY), Duration::ZERO)).await;
    let reply = get(worker.addr, "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "text/html; charset=utf-8");
    assert!(reply.body.starts_with("<!DOCTYPE html>"));
    assert!(reply.body.contains("<h1>Welcome.... Guest!!!</h1>"));
    assert!(reply
        .body
        .contains(r#"<a href="/login" onclick="showLoader()">Login</a>"#));
    assert!(reply.body.contains(r#"<div id="loader">"#));
    assert!(!reply.body.contains("/logout"));
}

#[tokio::test]
async fn home_is_signed_in_with_a_signed_assertion() {
    let worker = Worker::start(settings("w", Some(KEY), Duration::ZERO)).await;
    let token = sign_assertion(&ada(), KEY, now_unix(), 60);
    let reply = get_with(worker.addr, "/", &[(IDENTITY_HEADER, &token)]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert!(
        reply
            .body
            .contains("<h1>Welcome to this space... Ada &lt;Lovelace&gt;!</h1>"),
        "{}",
        reply.body
    );
    assert!(reply.body.contains(
        r#"<img src="https://cdn.example.com/ada.png" alt="Profile Picture" class="profile-pic" />"#
    ));
    assert!(reply.body.contains(r#"<a href="/logout">Logout</a>"#));
    assert!(!reply.body.contains("Guest!!!"));
}

#[tokio::test]
async fn forwarded_user_headers_alone_give_a_guest() {
    let worker = Worker::start(settings("w", Some(KEY), Duration::ZERO)).await;
    let spoofed = [
        ("x-forwarded-user", "auth0|ada"),
        ("x-forwarded-email", "ada@example.com"),
    ];
    let reply = get_with(worker.addr, "/", &spoofed).await;
    assert!(reply.body.contains("Welcome.... Guest!!!"));
    let reply = get_with(worker.addr, "/api/me", &spoofed).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // A forged assertion (wrong key) is no better.
    let forged = sign_assertion(
        &ada(),
        b"attacker-key-attacker-key-attacker-key",
        now_unix(),
        60,
    );
    let reply = get_with(worker.addr, "/api/me", &[(IDENTITY_HEADER, &forged)]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn me_is_401_without_and_the_identity_with_an_assertion() {
    let worker = Worker::start(settings("w-me", Some(KEY), Duration::ZERO)).await;
    let reply = get(worker.addr, "/api/me").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.json(),
        serde_json::json!({"error": "unauthenticated"})
    );

    let token = sign_assertion(&ada(), KEY, now_unix(), 60);
    let reply = get_with(worker.addr, "/api/me", &[(IDENTITY_HEADER, &token)]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        serde_json::json!({
            "sub": "auth0|ada",
            "email": "ada@example.com",
            "name": "Ada <Lovelace>",
            "picture": "https://cdn.example.com/ada.png",
            "worker": "w-me",
        })
    );
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let worker = Worker::start(settings("w", None, Duration::ZERO)).await;
    let reply = get(worker.addr, "/does/not/exist").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json(), serde_json::json!({"error": "not found"}));

    let mut client = connect(worker.addr).await.unwrap();
    let post = Request::post("/api/hello")
        .header("host", "custodia.test")
        .body(Empty::new())
        .unwrap();
    let reply = client.send(post).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "GET, HEAD");
}

#[tokio::test]
async fn head_sends_headers_without_a_body() {
    let worker = Worker::start(settings("w", None, Duration::ZERO)).await;
    let full = get(worker.addr, "/").await;
    let mut client = connect(worker.addr).await.unwrap();
    let reply = client
        .send(
            Request::head("/")
                .header("host", "t")
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(
        reply.headers["content-length"],
        full.body.len().to_string().as_str()
    );
}

#[tokio::test]
async fn keep_alive_serves_two_requests_on_one_connection() {
    let worker = Worker::start(settings("w", None, Duration::ZERO)).await;
    let mut client = connect(worker.addr).await.unwrap();
    let first = client.get("/api/hello").await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        first.headers.get("connection").is_none(),
        "{:?}",
        first.headers
    );
    let second = client.get("/").await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.body.contains("Guest!!!"));
    assert!(
        !client.sender.is_closed(),
        "connection closed after two requests"
    );
    assert!(!client.driver.is_finished());
}

#[tokio::test]
async fn delay_slows_every_route_but_healthz() {
    let delay = Duration::from_millis(1500);
    let worker = Worker::start(settings("slow", None, delay)).await;

    let started = Instant::now();
    let reply = get(worker.addr, "/healthz").await;
    assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, "ok"));
    assert!(
        started.elapsed() < delay,
        "healthz took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    assert_eq!(get(worker.addr, "/api/hello").await.status, StatusCode::OK);
    assert!(
        started.elapsed() >= delay,
        "hello took only {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    let state = Arc::new(AppState::new(settings(
        "draining",
        None,
        Duration::from_secs(1),
    )));
    let mut worker = Worker::start_with_state(Arc::clone(&state)).await;
    assert_eq!(get(worker.addr, "/healthz").await.status, StatusCode::OK);

    // An idle keep-alive connection and a connection with a (delayed) request in flight.
    let mut idle = connect(worker.addr).await.unwrap();
    assert_eq!(idle.get("/healthz").await.status, StatusCode::OK);
    let mut busy = connect(worker.addr).await.unwrap();
    let in_flight = tokio::spawn(async move { busy.get("/api/hello").await });
    eventually("the request to be in flight", async || {
        state.in_flight() == 1
    })
    .await;

    worker.trigger_shutdown();
    eventually("shutdown to begin", async || state.is_shutting_down()).await;
    assert!(
        !in_flight.is_finished(),
        "request finished before shutdown began"
    );
    let health = handle(&Request::get("/healthz").body(()).unwrap(), &state);
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    eventually("new connections to be refused", async || {
        connect(worker.addr).await.is_err()
    })
    .await;
    // The idle connection is closed by the server rather than kept for the drain.
    let idle_end = timeout(PATIENCE, &mut idle.driver)
        .await
        .expect("idle connection kept open");
    assert!(idle_end.unwrap().is_ok());

    let reply = timeout(PATIENCE, in_flight).await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["worker"], "draining");
    assert_eq!(reply.headers["connection"], "close");

    worker.stopped().await.unwrap();
    assert_eq!(state.in_flight(), 0);
}

#[tokio::test]
async fn healthz_is_never_200_after_shutdown_over_the_wire() {
    let mut worker = Worker::start(settings("w", None, Duration::ZERO)).await;
    worker.trigger_shutdown();
    worker.stopped().await.unwrap();
    match connect(worker.addr).await {
        Err(_) => {}
        Ok(mut client) => {
            let answer = timeout(PATIENCE, async {
                client.sender.ready().await?;
                client
                    .sender
                    .send_request(request("/healthz").body(Empty::new()).unwrap())
                    .await
            })
            .await
            .unwrap();
            assert!(answer.is_err() || answer.unwrap().status() != StatusCode::OK);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// A child process killed (and reaped) when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    fn spawn(args: &[&str], key: Option<&str>) -> ChildGuard {
        let mut command = Command::new(env!("CARGO_BIN_EXE_custodia-app"));
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match key {
            Some(key) => command.env("CUSTODIA_ASSERTION_KEY", key),
            None => command.env_remove("CUSTODIA_ASSERTION_KEY"),
        };
        ChildGuard(command.spawn().expect("cannot start custodia-app"))
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "custodia-app did not exit in time"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for exit, then returns (status, stdout, stderr).
    fn finish(&mut self) -> (ExitStatus, String, String) {
        let status = self.wait();
        let mut stdout = String::new();
        let mut stderr = String::new();
        self.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        self.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status, stdout, stderr)
    }
}

#[test]
fn binary_refuses_bad_arguments_with_exit_2() {
    for (args, expected) in [
        (&[][..], "missing --listen"),
        (&["--listen"][..], "--listen needs a value"),
        (
            &["--listen", "not-an-address"][..],
            "not an IP:PORT address",
        ),
        (
            &["--listen", "127.0.0.1:0", "--frobnicate"][..],
            "unknown argument",
        ),
        (
            &["--listen", "127.0.0.1:0", "--delay", "soon"][..],
            "--delay",
        ),
    ] {
        let (status, _, stderr) = ChildGuard::spawn(args, None).finish();
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(stderr.contains("--help"), "{args:?}: {stderr}");
    }
}

#[test]
fn binary_refuses_a_short_assertion_key_with_exit_2() {
    let (status, _, stderr) =
        ChildGuard::spawn(&["--listen", "127.0.0.1:0"], Some("too-short")).finish();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CUSTODIA_ASSERTION_KEY"), "{stderr}");
    assert!(stderr.contains("openssl rand -hex 32"), "{stderr}");
}

#[test]
fn binary_prints_help_and_version() {
    let (status, stdout, _) = ChildGuard::spawn(&["--help"], None).finish();
    assert_eq!(status.code(), Some(0));
    assert!(
        stdout.contains("--listen ADDR") && stdout.contains("--delay MS"),
        "{stdout}"
    );
    let (status, stdout, _) = ChildGuard::spawn(&["--version"], None).finish();
    assert_eq!(status.code(), Some(0));
    assert!(stdout.starts_with("custodia-app "), "{stdout}");
}

/// `custodia-app --help | head -1`: a reader that has gone is no panic.
#[test]
fn a_closed_stdout_is_no_panic() {
    for flag in ["--help", "--version"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_custodia-app"))
            .arg(flag)
            .env_clear()
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{flag}: {stderr}");
        assert!(stderr.is_empty(), "{flag}: {stderr}");
    }
}

#[cfg(unix)]
#[test]
fn binary_serves_and_stops_cleanly_on_sigterm() {
    let key = "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f8a1c3e5f7b9d0a2c".to_string();
    let mut child = ChildGuard::spawn(&["--listen", "127.0.0.1:0"], Some(&key));
    let stderr = child.0.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if lines_tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });

    // The startup line names the bound address and says verification is on.
    let deadline = Instant::now() + PATIENCE;
    let startup = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(remaining)
            .expect("no startup line from custodia-app");
        if line.contains("custodia-app listening") {
            break line;
        }
    };
    assert!(
        startup.contains("identity_verification=\"on\"")
            || startup.contains("identity_verification=on"),
        "{startup}"
    );
    let addr: SocketAddr = startup
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .expect("no addr= in the startup line")
        .parse()
        .unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let json = runtime.block_on(async { get(addr, "/api/hello").await.json() });
    assert_eq!(
        json["worker"],
        addr.to_string(),
        "worker id defaults to the bound address"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(
        child.wait().code(),
        Some(0),
        "SIGTERM should be a clean exit"
    );
}
