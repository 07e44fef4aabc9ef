//! `[limits]` end to end: login rate per client (429 + Retry-After), body sizes (413, declared
//! and chunked, per route), the cap on open connections (503), the send timeout for clients that stop
//! reading, and the rejection metrics.
//! The identity provider is never reached: the limits act before the login does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::custodia::{upstream_section, Proxy};
use support::echo::RecordingServer;
use support::process::{free_addr, unix_second};
use support::raw_tcp::{self, Outcome};

const LOGINS_PER_MINUTE: usize = 3;

/// A proxy with `[auth]` (an issuer on a closed loopback port: logins never get far, which is
/// fine, the limits come first) in front of a recording upstream. `trusted` are the peers
/// whose `X-Forwarded-For` is believed.
fn auth_stack(trusted: &str) -> (RecordingServer, Proxy) {
    auth_stack_with(trusted, false)
}

/// [`auth_stack`], keeping the proxy's output (its access log) when `capturing`.
fn auth_stack_with(trusted: &str, capturing: bool) -> (RecordingServer, Proxy) {
    let upstream = RecordingServer::start();
    let addr = free_addr();
    let dead_idp = free_addr();
    let sections = format!(
        "{upstream}\n[limits]\nlogin_rate_per_minute = {LOGINS_PER_MINUTE}\nmax_body_size = \"1k\"\n\n\
         [auth]\nissuer = \"http://{dead_idp}/\"\nclient_id = \"custodia\"\n\
         public_url = \"http://{addr}\"\ntrusted_proxies = [{trusted}]\ndefault_policy = \"public\"\n\n\
         [[route]]\nprefix = \"/upload/\"\npolicy = \"public\"\nmax_body_size = \"4k\"\n",
        upstream = upstream_section("least_conn", &[(upstream.addr, 1)]),
    );
    let env = [
        ("AUTH0_CLIENT_SECRET", "custodia-secret"),
        (
            "APP_SECRET_KEY",
            "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f",
        ),
        // The access log is info events.
        ("RUST_LOG", if capturing { "info" } else { "warn" }),
    ];
    let proxy = if capturing {
        Proxy::start_at_capturing(addr, &sections, &env)
    } else {
        Proxy::start_at(addr, &sections, &env)
    };
    (upstream, proxy)
}

/// `GET path` from `source` (a loopback address) with an optional `X-Forwarded-For`.
fn get_from(proxy: &Proxy, source: Option<IpAddr>, path: &str, xff: Option<&str>) -> Outcome {
    get_with_lines(proxy, source, path, xff.as_slice())
}

/// `GET path` from `source` with one `X-Forwarded-For` line per entry of `xff`.
fn get_with_lines(proxy: &Proxy, source: Option<IpAddr>, path: &str, xff: &[&str]) -> Outcome {
    let mut stream = raw_tcp::connect(proxy.addr, source);
    let xff: String = xff
        .iter()
        .map(|v| format!("X-Forwarded-For: {v}\r\n"))
        .collect();
    let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\n{xff}Connection: close\r\n\r\n");
    raw_tcp::exchange(&mut stream, request.as_bytes())
}

fn ip(text: &str) -> Option<IpAddr> {
    Some(text.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_rate_limited_per_real_client() {
    let (_upstream, proxy) = auth_stack("\"127.0.0.1/32\"");

    // Behind the trusted proxy (127.0.0.1), each X-Forwarded-For client has its own budget.
    for i in 0..LOGINS_PER_MINUTE {
        let path = if i % 2 == 0 {
            "/login"
        } else {
            "/callback?code=x&state=y"
        };
        let outcome = get_from(&proxy, None, path, Some("203.0.113.1"));
        assert_ne!(
            outcome.status(),
            Some(429),
            "request {i} is within the limit: {outcome:?}"
        );
    }
    let limited = get_from(&proxy, None, "/login", Some("203.0.113.1"));
    assert_eq!(limited.status(), Some(429), "{limited:?}");
    let retry: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=120).contains(&retry), "retry after {retry}");
    assert_eq!(
        get_from(&proxy, None, "/callback", Some("203.0.113.1")).status(),
        Some(429),
        "/callback shares the budget"
    );
    let other = get_from(&proxy, None, "/login", Some("203.0.113.2"));
    assert_ne!(
        other.status(),
        Some(429),
        "another client is unaffected: {other:?}"
    );
    let page = get_from(&proxy, None, "/", Some("203.0.113.1"));
    assert_eq!(
        page.status(),
        Some(200),
        "other paths are not limited: {page:?}"
    );

    // An untrusted peer (127.0.0.3) cannot dodge the limit with made-up X-Forwarded-For.
    let untrusted = ip("127.0.0.3");
    for i in 0..LOGINS_PER_MINUTE {
        let fake = format!("198.51.100.{i}");
        let outcome = get_from(&proxy, untrusted, "/login", Some(&fake));
        assert_ne!(outcome.status(), Some(429), "{outcome:?}");
    }
    let dodged = get_from(&proxy, untrusted, "/login", Some("198.51.100.99"));
    assert_eq!(dodged.status(), Some(429), "{dodged:?}");

    let rejected = proxy.metric("custodia_rejections_total").await;
    let login_rate = rejected
        .iter()
        .find(|(labels, _)| labels.contains("reason=\"login_rate\""))
        .map(|(_, v)| *v);
    assert!(login_rate.is_some_and(|v| v >= 3.0), "{rejected:?}");
}

/// An identity provider that is down, met by many users at once (each a client of its own
/// behind the trusted proxy): every refused login is counted, but logged a line a second, not
/// one per request (50,000 lines a second under load before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_are_counted_each_and_logged_a_line_a_second() {
    let (_upstream, proxy) = auth_stack_with("\"127.0.0.1/32\"", true);
    let first_second = unix_second();
    const USERS: usize = 200;
    for user in 0..USERS {
        let client = format!("198.51.{}.{}", user / 250, user % 250 + 1);
        let refused = get_from(&proxy, None, "/login", Some(&client));
        assert_eq!(refused.status(), Some(503), "{refused:?}");
    }
    let seconds = unix_second() - first_second + 1;
    let failed = proxy
        .metric("custodia_auth_logins_total")
        .await
        .into_iter()
        .find(|(labels, _)| labels.contains("reason=\"idp_unavailable\""))
        .map(|(_, v)| v);
    assert_eq!(failed, Some(USERS as f64), "every refusal is counted");
    let output = proxy.output();
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("login refused: identity provider unavailable"))
        .collect();
    assert!(
        (1..=seconds as usize).contains(&lines.len()),
        "{} lines in {seconds} s: {lines:?}",
        lines.len()
    );
    // What the skipped lines would have said is not lost: the next line counts them.
    assert!(lines[0].contains("unlogged"), "{}", lines[0]);
}

/// A login starts only on GET: a link checker's HEAD or a preflight's OPTIONS would set a login
/// cookie and push a real tab's sign-in out. Logout takes GET and POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_endpoints_take_only_their_methods() {
    let (_upstream, proxy) = auth_stack("\"127.0.0.1/32\"");
    let send = |method: &str, path: &str| {
        let mut stream = raw_tcp::connect(proxy.addr, None);
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        raw_tcp::exchange(&mut stream, request.as_bytes())
    };
    for (method, path, allow) in [
        ("HEAD", "/login", "GET"),
        ("OPTIONS", "/login", "GET"),
        ("POST", "/login", "GET"),
        ("POST", "/callback?code=a&state=b", "GET"),
        ("PUT", "/logout", "GET, POST"),
        ("DELETE", "/logout", "GET, POST"),
    ] {
        let refused = send(method, path);
        assert_eq!(refused.status(), Some(405), "{method} {path}: {refused:?}");
        assert_eq!(refused.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(
            refused.header("set-cookie"),
            None,
            "{method} {path}: no login started, no session cleared"
        );
    }
    // Their own methods go on as before: GET /login meets the IdP that is down (503).
    assert_eq!(send("GET", "/login").status(), Some(503));
    for method in ["GET", "POST"] {
        let out = send(method, "/logout");
        assert_eq!(out.status(), Some(302), "{method} /logout: {out:?}");
    }
}

/// A trusted proxy that adds its own `X-Forwarded-For` line (HAProxy's `option forwardfor`)
/// instead of extending the client's: the lines are one list, read from the right, so a client
/// cannot pick its own budget, its own name in the access log or the upstream's
/// `X-Real-IP` by sending a line first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_on_several_lines_is_one_list() {
    let (upstream, proxy) = auth_stack_with("\"127.0.0.1/32\"", true);
    let real = "203.0.113.50";
    for i in 0..LOGINS_PER_MINUTE {
        let chosen = format!("198.51.100.{i}");
        let outcome = get_with_lines(&proxy, None, "/login", &[&chosen, real]);
        assert_ne!(outcome.status(), Some(429), "{outcome:?}");
    }
    let limited = get_with_lines(&proxy, None, "/login", &["198.51.100.77", real]);
    assert_eq!(
        limited.status(),
        Some(429),
        "a new first line is not a new client: {limited:?}"
    );

    let forwarded = get_with_lines(&proxy, None, "/page", &["198.51.100.9", real]);
    assert_eq!(forwarded.status(), Some(200), "{forwarded:?}");
    let seen = upstream
        .requests()
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r).to_ascii_lowercase())
        .find(|r| r.starts_with("get /page"))
        .expect("the page request reached the upstream");
    assert!(
        seen.contains(&format!("x-real-ip: {real}\r\n")),
        "the real client: {seen}"
    );
    assert!(
        seen.contains(&format!(
            "x-forwarded-for: 198.51.100.9, {real}, 127.0.0.1\r\n"
        )),
        "every line, then the peer: {seen}"
    );

    // The access log names the real client for answers the proxy gives itself (the 429s) too.
    support::process::eventually(
        "the access log to have the 429 lines",
        Duration::from_secs(10),
        || {
            let output = proxy.output();
            let refused: Vec<&str> = output
                .lines()
                .filter(|l| l.contains("\"status\":429"))
                .collect();
            (!refused.is_empty()).then(|| {
                for line in refused {
                    assert!(line.contains(&format!("\"client\":\"{real}\"")), "{line}");
                }
            })
        },
    );
}

#[test]
fn bodies_over_the_limit_get_413_and_are_not_forwarded() {
    let (upstream, proxy) = auth_stack("\"127.0.0.1/32\"");
    let post = |path: &str, extra: &str, body: &[u8]| {
        let mut request =
            format!("POST {path} HTTP/1.1\r\nHost: h\r\n{extra}Connection: close\r\n\r\n")
                .into_bytes();
        request.extend_from_slice(body);
        raw_tcp::send(proxy.addr, &request)
    };
    let chunked = |size: usize| {
        let mut body = Vec::new();
        for _ in 0..size / 500 {
            body.extend_from_slice(format!("1f4\r\n{}\r\n", "c".repeat(500)).as_bytes());
        }
        body.extend_from_slice(b"0\r\n\r\n");
        body
    };

    let small = post("/api/x", "Content-Length: 1000\r\n", &[b's'; 1000]);
    assert_eq!(small.status(), Some(200), "at the limit: {small:?}");
    let declared = post("/api/x", "Content-Length: 1025\r\n", &[b'd'; 1025]);
    assert_eq!(declared.status(), Some(413), "{declared:?}");
    let streamed = post("/api/x", "Transfer-Encoding: chunked\r\n", &chunked(3000));
    assert_eq!(streamed.status(), Some(413), "{streamed:?}");
    let route = post("/upload/file", "Content-Length: 3000\r\n", &[b'u'; 3000]);
    assert_eq!(route.status(), Some(200), "the route allows 4k: {route:?}");
    let route_over = post("/upload/file", "Content-Length: 5000\r\n", &[b'u'; 5000]);
    assert_eq!(route_over.status(), Some(413), "{route_over:?}");
    let route_chunked = post(
        "/upload/file",
        "Transfer-Encoding: chunked\r\n",
        &chunked(3000),
    );
    assert_eq!(route_chunked.status(), Some(200), "{route_chunked:?}");

    std::thread::sleep(Duration::from_millis(200));
    let complete: Vec<usize> = upstream.requests().iter().map(Vec::len).collect();
    assert_eq!(
        complete.len(),
        3,
        "only the three allowed bodies arrived whole: {complete:?}"
    );
}

#[test]
fn connections_above_the_cap_get_503() {
    let upstream = RecordingServer::start();
    let proxy = Proxy::start(&format!(
        "{}\n[limits]\nmax_connections = 2\n",
        upstream_section("least_conn", &[(upstream.addr, 1)])
    ));
    // The startup probe's connection must not hold one of the two places.
    proxy.wait_until_no_client_connections();
    let addr: SocketAddr = proxy.addr;
    // Two open keep-alive connections take the two places.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = raw_tcp::connect(addr, None);
        let outcome = raw_tcp::exchange(&mut stream, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(outcome.status(), Some(200), "{outcome:?}");
        held.push(stream);
    }
    assert_eq!(
        proxy.sample_blocking("custodia_connections_open"),
        Some(2.0),
        "operators see the two places taken"
    );
    let refused = raw_tcp::send(addr, b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(refused.status(), Some(503), "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        upstream.requests().len(),
        2,
        "the refused request was not forwarded"
    );

    // A place frees up when a connection closes (give the proxy a moment to notice).
    drop(held.pop());
    let mut answered = None;
    for _ in 0..50 {
        let outcome = raw_tcp::send(
            addr,
            b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        );
        if outcome.status() == Some(200) {
            answered = Some(outcome);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered.is_some(), "a freed place is usable again");
    held[0]
        .write_all(b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n")
        .unwrap();
    let kept = raw_tcp::read_outcome(&mut held[0]);
    assert_eq!(
        kept.status(),
        Some(200),
        "held connections keep working: {kept:?}"
    );
}

/// A worker that answers every request but `/healthz` with an endless body (a 1 GB
/// Content-Length) and counts the connections that ended while it was still writing.
struct EndlessWorker {
    addr: SocketAddr,
    ended: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl EndlessWorker {
    fn start() -> EndlessWorker {
        use std::io::{BufRead, BufReader};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ended = Arc::new(AtomicUsize::new(0));
        let counter = ended.clone();
        // Detached: the test process ends it (the listener thread holds nothing else).
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let ended = counter.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    loop {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut line = String::new();
                        while reader.read_line(&mut line).unwrap_or(0) > 2 {
                            line.clear();
                        }
                        if request_line.starts_with("GET /healthz ") {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if writer.write_all(ok).is_err() {
                                return;
                            }
                            continue;
                        }
                        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n";
                        let chunk = vec![b'x'; 64 * 1024];
                        if writer.write_all(head).is_ok() {
                            while writer.write_all(&chunk).is_ok() {}
                        }
                        ended.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                });
            }
        });
        EndlessWorker { addr, ended }
    }

    fn ended(&self) -> usize {
        self.ended.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A client that stops reading an answer is let go after `[limits] send_timeout`, on both paths
/// (GET takes the fast path, POST Pingora's), and the worker's connection with it: it no longer
/// holds a worker connection and its least-connections count for as long as it likes.
#[test]
fn a_client_that_stops_reading_is_let_go_after_send_timeout() {
    let worker = EndlessWorker::start();
    let proxy = Proxy::start(&format!(
        "{}\n[limits]\nsend_timeout = \"1s\"\n",
        upstream_section("least_conn", &[(worker.addr, 1)])
    ));
    let requests: [&[u8]; 2] = [
        b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /big HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n\r\n",
    ];
    let mut stalled = Vec::new();
    for request in requests {
        let mut stream = raw_tcp::connect(proxy.addr, None);
        stream.write_all(request).unwrap();
        stalled.push(stream);
    }
    // Neither client reads: the buffers fill, the proxy's writes wait, and the timeout ends both.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while worker.ended() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(worker.ended(), 2, "both worker connections were let go");
    assert_eq!(
        proxy.sample_blocking("custodia_requests_in_flight"),
        Some(0.0)
    );
    // The clients find their connections closed: what was buffered, then the end.
    for mut stream in stalled {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut sink = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut stream, &mut sink) {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "still open: {e}"
            );
        }
        assert!(sink.len() < 1_000_000_000, "cut short: {}", sink.len());
    }
}
