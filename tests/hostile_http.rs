//! Hostile HTTP/1 over raw TCP against a real custodia-proxy in front of a recording upstream:
//! every case asserts what the client gets back AND that nothing ambiguous reached the worker.
//! Each case prints `case → outcome` (run with `--nocapture` to see the table).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::time::Duration;

use support::custodia::{upstream_section, Proxy};
use support::echo::RecordingServer;
use support::raw_tcp::{self, Outcome};

/// A proxy (auth off: a plain load balancer still strips identity headers) in front of a
/// recording upstream, with a short client timeout for the slow-client cases.
fn stack() -> (RecordingServer, Proxy) {
    let upstream = RecordingServer::start();
    let proxy = Proxy::start(&format!(
        "{}\n[limits]\nclient_timeout = \"2s\"\n",
        upstream_section("least_conn", &[(upstream.addr, 1)])
    ));
    (upstream, proxy)
}

/// What a case expects back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Status(u16),
    /// A 4xx answer, or a close without one (both refuse; the table shows which).
    Refused,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: &'static str, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        expect,
    }
}

/// Every forwarded request as text, for asserting on.
fn forwarded(upstream: &RecordingServer) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(r).to_string())
        .collect()
}

fn run_table(cases: Vec<Case>) {
    let (upstream, proxy) = stack();
    let mut failures = Vec::new();
    for c in cases {
        let before = upstream.requests().len();
        let outcome = raw_tcp::send(proxy.addr, &c.bytes);
        let ok = match (c.expect, &outcome) {
            (Expect::Status(want), o) => o.status() == Some(want),
            (Expect::Refused, Outcome::Closed) => true,
            (Expect::Refused, o) => o.status().is_some_and(|s| (400..500).contains(&s)),
        };
        // Give a (wrongly) forwarded request time to arrive before looking.
        std::thread::sleep(Duration::from_millis(100));
        let leaked = forwarded(&upstream)[before..].to_vec();
        eprintln!("{:<40} → {}", c.name, outcome.describe());
        if !ok {
            failures.push(format!(
                "{}: expected {:?}, got {outcome:?}",
                c.name, c.expect
            ));
        }
        if !leaked.is_empty() {
            failures.push(format!("{}: forwarded {leaked:?}", c.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_plain_request_is_forwarded_as_sent() {
    let (upstream, proxy) = stack();
    let outcome = raw_tcp::send(
        proxy.addr,
        b"POST /api/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let seen = forwarded(&upstream);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].starts_with("POST /api/x HTTP/1.1\r\n"),
        "{}",
        seen[0]
    );
    assert!(seen[0].ends_with("\r\n\r\nhello"), "{}", seen[0]);
}

#[test]
fn request_smuggling_is_refused_and_nothing_is_forwarded() {
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
    run_table(vec![
        case(
            "content-length + transfer-encoding",
            format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            Expect::Status(400),
        ),
        case(
            "transfer-encoding + content-length",
            format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{smuggled}"),
            Expect::Status(400),
        ),
        case(
            "two different content-lengths",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            Expect::Status(400),
        ),
        case(
            "content-length list 5, 6",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\nhello!",
            Expect::Status(400),
        ),
        case(
            "content-length list 5, 5",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello",
            Expect::Status(400),
        ),
        case(
            "two equal content-lengths",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            Expect::Status(400),
        ),
        case(
            "a GET with content-length list 0, 0",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0, 0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "content-length not a number",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello",
            Expect::Status(400),
        ),
        case(
            "transfer-encoding: xchunked",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "transfer-encoding: chunked, identity",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "transfer-encoding: gzip, chunked",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "two transfer-encoding headers",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "space before the colon",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "vertical tab before chunked",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "transfer-encoding in HTTP/1.0",
            "POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "bare LF line ends",
            "GET / HTTP/1.1\nHost: h\n\n",
            Expect::Status(400),
        ),
        case(
            "bare LF in one header line",
            "GET / HTTP/1.1\r\nHost: h\nX-A: b\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "obs-fold continuation line",
            "GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n c\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "invalid chunk size",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            Expect::Refused,
        ),
        case(
            "overflowing chunk size",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            Expect::Refused,
        ),
    ]);
}

#[test]
fn oversized_heads_are_refused() {
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(9000));
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let big_cookie = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nCookie: c={}\r\n\r\n",
        "c".repeat(25_000)
    );
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n");
    let too_many_for_pingora: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let wide: String = (0..8)
        .map(|i| format!("X-W{i}: {}\r\n", "w".repeat(6000)))
        .collect();
    let wide_head = format!("GET / HTTP/1.1\r\nHost: h\r\n{wide}\r\n");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Huge: {}\r\n\r\n",
        "h".repeat(1_100_000)
    );
    run_table(vec![
        case(
            "request target over 8 KiB",
            long_target,
            Expect::Status(414),
        ),
        case("one header over 8 KiB", big_header, Expect::Status(431)),
        case("cookie over 24 KiB", big_cookie, Expect::Status(431)),
        case("150 headers", many_headers, Expect::Status(431)),
        case(
            "300 headers (Pingora's own limit)",
            format!("GET / HTTP/1.1\r\nHost: h\r\n{too_many_for_pingora}\r\n"),
            Expect::Refused,
        ),
        case("48 KiB of headers", wide_head, Expect::Status(431)),
        case("head over 1 MiB", huge, Expect::Refused),
    ]);
}

#[test]
fn odd_targets_hosts_and_versions_get_a_clear_4xx() {
    run_table(vec![
        case("no Host", "GET / HTTP/1.1\r\n\r\n", Expect::Status(400)),
        case(
            "two Hosts",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "Host with a space",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "Host with userinfo",
            "GET / HTTP/1.1\r\nHost: user@evil\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "Host with a slash",
            "GET / HTTP/1.1\r\nHost: evil/x\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "empty Host",
            "GET / HTTP/1.1\r\nHost:\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "absolute-form target",
            "GET http://evil.example/admin HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "absolute-form, other Host",
            "GET http://evil.example/admin HTTP/1.1\r\nHost: h\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "CONNECT",
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
            Expect::Status(405),
        ),
        case(
            "asterisk target with GET",
            "GET * HTTP/1.1\r\nHost: h\r\n\r\n",
            Expect::Status(400),
        ),
        case("HTTP/0.9", "GET /\r\n\r\n", Expect::Refused),
        case(
            "HTTP/2.0 on HTTP/1",
            "GET / HTTP/2.0\r\nHost: h\r\n\r\n",
            Expect::Refused,
        ),
        case(
            "HTTP/1.2",
            "GET / HTTP/1.2\r\nHost: h\r\n\r\n",
            Expect::Refused,
        ),
        case(
            "UTF-8 path",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(),
            Expect::Status(400),
        ),
        case(
            "Latin-1 path",
            b"GET /caf\xe9 HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(),
            Expect::Status(400),
        ),
        case(
            "control byte in path",
            b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(),
            Expect::Status(400),
        ),
        case(
            "percent-encoded NUL in path",
            "GET /a%00b HTTP/1.1\r\nHost: h\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "NUL in a header",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n".to_vec(),
            Expect::Status(400),
        ),
        case(
            "garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
    ]);
}

#[test]
fn connection_listed_headers_cannot_smuggle_identity() {
    let (upstream, proxy) = stack();
    // Naming identity headers in Connection: they are dropped as hop-by-hop, and the forged
    // copies never arrive; the proxy's own forwarding headers are set after that.
    let outcome = raw_tcp::send(
        proxy.addr,
        b"GET /api/me HTTP/1.1\r\nHost: h\r\n\
          Connection: close, X-Real-IP, X-Custodia-Identity, X-Forwarded-User\r\n\
          X-Forwarded-User: admin\r\nX-Forwarded-Email: admin@example.com\r\n\
          X-Custodia-Identity: forged\r\nX-Real-IP: 10.0.0.1\r\n\r\n",
    );
    eprintln!(
        "{:<40} → {}",
        "Connection naming identity headers",
        outcome.describe()
    );
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let seen = forwarded(&upstream);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let head = seen[0].to_ascii_lowercase();
    for forged in [
        "x-forwarded-user:",
        "x-forwarded-email:",
        "x-custodia-identity:",
        "10.0.0.1",
    ] {
        assert!(
            !head.contains(forged),
            "{forged} reached the worker:\n{head}"
        );
    }
    assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
    assert!(
        head.contains("x-real-ip: 127.0.0.1"),
        "the proxy's own header survives:\n{head}"
    );
    assert!(!head.contains("connection: close, x-"), "{head}");

    // Naming the forwarding headers the proxy sets: refused outright, nothing forwarded.
    run_table(vec![
        case(
            "Connection naming X-Forwarded-For",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Forwarded-For\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
            Expect::Status(400),
        ),
        case(
            "Connection naming Host",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Host\r\n\r\n",
            Expect::Status(400),
        ),
    ]);
}

#[test]
fn slow_clients_are_cut_off() {
    let (upstream, proxy) = stack();

    // A head that never ends.
    let mut silent = raw_tcp::connect(proxy.addr, None);
    silent.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n").unwrap();
    let outcome = raw_tcp::read_outcome(&mut silent);
    eprintln!(
        "{:<40} → {}",
        "partial head, then silence",
        outcome.describe()
    );
    assert_eq!(outcome, Outcome::Closed);

    // A connection that never sends anything.
    let mut idle = raw_tcp::connect(proxy.addr, None);
    let outcome = raw_tcp::read_outcome(&mut idle);
    eprintln!("{:<40} → {}", "connect, send nothing", outcome.describe());
    assert_eq!(outcome, Outcome::Closed);

    // Slowloris: a header byte every 200 ms keeps each read short but the head unfinished.
    assert!(
        trickle_until_closed(proxy.addr, b"GET / HTTP/1.1\r\nHost: h\r\n", 100),
        "a slowloris head was still accepted after 20 s (client_timeout is 2 s)"
    );
    eprintln!("{:<40} → closed", "slowloris head (1 byte / 200 ms)");

    // A slow body: the head is complete, the body trickles.
    assert!(
        trickle_until_closed(
            proxy.addr,
            b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nx",
            100
        ),
        "a slow body was still accepted after 20 s (client_timeout is 2 s)"
    );
    eprintln!("{:<40} → closed", "slow body (1 byte / 200 ms)");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        forwarded(&upstream).is_empty(),
        "no complete request was forwarded: {:?}",
        forwarded(&upstream)
    );

    // A keep-alive client that is simply idle between quick requests is not cut off early.
    let mut polite = raw_tcp::connect(proxy.addr, None);
    for _ in 0..2 {
        let outcome = raw_tcp::exchange(&mut polite, b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(outcome.status(), Some(200), "{outcome:?}");
        std::thread::sleep(Duration::from_millis(2500));
    }
}

/// Send `head`, then one byte every 200 ms, at most `steps` times; true when the proxy closed
/// the connection (a write or a peek fails) before that.
fn trickle_until_closed(addr: std::net::SocketAddr, head: &[u8], steps: usize) -> bool {
    let mut stream = raw_tcp::connect(addr, None);
    stream.write_all(head).unwrap();
    keeps_trickling_until_closed(&mut stream, steps)
}

/// One more byte every 200 ms, `steps` times at most: true once the proxy closes the
/// connection or answers (a 408/400 also ends the request), false if it is still waiting.
fn keeps_trickling_until_closed(stream: &mut std::net::TcpStream, steps: usize) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut probe = [0u8; 1024];
    for _ in 0..steps {
        std::thread::sleep(Duration::from_millis(200));
        match std::io::Read::read(stream, &mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => return true,
        }
        if stream.write_all(b"a").is_err() {
            return true;
        }
    }
    false
}

#[test]
fn a_slow_worker_is_not_mistaken_for_a_slow_client() {
    // The client timeout covers receiving the request only: a worker slower than it still
    // answers, with and without a request body.
    let worker = support::custodia::Worker::start_slow("slow", 3000);
    let proxy = Proxy::start(&format!(
        "{}\n[limits]\nclient_timeout = \"1s\"\n",
        upstream_section("least_conn", &[(worker.addr, 1)])
    ));
    let get = raw_tcp::send(
        proxy.addr,
        b"GET /api/hello HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(get.status(), Some(200), "{get:?}");
    let post = raw_tcp::send(
        proxy.addr,
        b"POST /api/hello HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert!(
        post.status().is_some_and(|s| s != 408 && s < 500),
        "{post:?}"
    );
}

#[test]
fn an_upgraded_connection_is_not_held_to_the_client_timeout() {
    // A WebSocket-style upstream: 101, then it answers the client's first bytes only after
    // 3 s, longer than the proxy's client timeout (1 s). The tunnel must survive the wait.
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut line = String::new();
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                if request_line.starts_with("GET /healthz") {
                    let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    return;
                }
                let _ = writer.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                );
                let mut ping = [0u8; 4];
                if reader.read_exact(&mut ping).is_ok() {
                    std::thread::sleep(Duration::from_secs(3));
                    let _ = writer.write_all(b"pong");
                }
            });
        }
    });
    let proxy = Proxy::start(&format!(
        "{}\n[limits]\nclient_timeout = \"1s\"\n",
        upstream_section("least_conn", &[(upstream, 1)])
    ));
    let mut client = raw_tcp::connect(proxy.addr, None);
    let switched = raw_tcp::exchange(
        &mut client,
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(switched.status(), Some(101), "{switched:?}");
    client.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    client
        .read_exact(&mut pong)
        .expect("the tunnel is still open after 3 s");
    assert_eq!(&pong, b"pong");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout_and_not_before() {
    // Between two requests a connection waits in the proxy's own keep-alive wait (a few bytes
    // per idle client instead of Pingora's whole request state): it must keep Pingora's
    // contract, serving the next request and closing at `keepalive_timeout`.
    let worker = support::custodia::Worker::start("w");
    let proxy = Proxy::start_with_server(
        "keepalive_timeout = \"2s\"\n",
        &upstream_section("least_conn", &[(worker.addr, 1)]),
    );
    let mut client = raw_tcp::connect(proxy.addr, None);
    for pause in [Duration::ZERO, Duration::from_millis(1200)] {
        std::thread::sleep(pause);
        let outcome = raw_tcp::exchange(&mut client, b"GET /api/hello HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(
            outcome.status(),
            Some(200),
            "after {pause:?} idle: {outcome:?}"
        );
    }
    let idle_since = std::time::Instant::now();
    client
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut probe = [0u8; 64];
    let read = std::io::Read::read(&mut client, &mut probe);
    let idle = idle_since.elapsed();
    assert!(
        matches!(read, Ok(0)),
        "an idle connection is closed, with nothing sent: {read:?}"
    );
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(10),
        "closed after {idle:?} idle (keepalive_timeout is 2 s)"
    );
}

#[test]
fn a_client_idle_long_enough_to_be_parked_keeps_its_address_its_place_and_its_guards() {
    // After a second idle, a keep-alive connection is parked down to its socket and served from
    // a new stream when it speaks again (proxy/src/limits/parking.rs): none of it may show.
    let upstream = RecordingServer::start();
    let proxy = Proxy::start(&format!(
        "{}\n[limits]\nclient_timeout = \"2s\"\nmax_connections = 2\n",
        upstream_section("least_conn", &[(upstream.addr, 1)])
    ));
    // The startup probe's connection must not hold one of the two places.
    proxy.wait_until_no_client_connections();
    let source: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let mut parked = raw_tcp::connect(proxy.addr, Some(source));
    let mut trickler = raw_tcp::connect(proxy.addr, None);
    for (client, path) in [(&mut parked, "/a1"), (&mut trickler, "/b1")] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n");
        let outcome = raw_tcp::exchange(client, request.as_bytes());
        assert_eq!(outcome.status(), Some(200), "{path}: {outcome:?}");
    }
    let parked_gauge = || {
        let mut admin = std::net::TcpStream::connect(proxy.admin).unwrap();
        admin
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        admin
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut admin, &mut body).unwrap();
        support::custodia::parse_samples(&body, "custodia_connections_parked")
            .first()
            .map(|(_, v)| *v)
    };
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(parked_gauge(), Some(2.0), "both idle clients are parked");

    // Parked, they still hold the two places of max_connections.
    let refused = raw_tcp::send(proxy.addr, b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(refused.status(), Some(503), "{refused:?}");

    // Served again, twice on the same connection, from the client's own address.
    for path in ["/a2", "/a3"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n");
        let outcome = raw_tcp::exchange(&mut parked, request.as_bytes());
        assert_eq!(
            outcome.status(),
            Some(200),
            "{path} after parking: {outcome:?}"
        );
    }
    let last = forwarded(&upstream).last().unwrap().to_ascii_lowercase();
    assert!(last.starts_with("get /a3 "), "{last}");
    assert!(
        last.contains("x-real-ip: 127.0.0.3") && last.contains("x-forwarded-for: 127.0.0.3"),
        "the client's address after parking: {last}"
    );
    assert_eq!(
        parked_gauge(),
        Some(1.0),
        "the one that spoke is no longer parked"
    );

    // Woken by a request that trickles, a parked connection is held to client_timeout (2 s).
    trickler.write_all(b"GET /slow HTTP/1.1\r\n").unwrap();
    assert!(
        keeps_trickling_until_closed(&mut trickler, 100),
        "a trickling request after parking was still accepted after 20 s"
    );
    let paths: Vec<String> = forwarded(&upstream)
        .iter()
        .map(|r| r.split(' ').nth(1).unwrap_or("").to_string())
        .collect();
    assert_eq!(
        paths,
        ["/a1", "/b1", "/a2", "/a3"],
        "nothing else was forwarded"
    );

    // Its place is free again once it is closed.
    let mut answered = None;
    for _ in 0..50 {
        let outcome = raw_tcp::send(
            proxy.addr,
            b"GET /d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        );
        if outcome.status() == Some(200) {
            answered = Some(outcome);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        answered.is_some(),
        "the closed connection's place is usable again"
    );

    // Shutting down closes a parked connection at once, and the proxy does not wait for it.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(parked_gauge(), Some(1.0), "parked again");
    let mut proxy = proxy;
    proxy.process.signal(libc::SIGTERM);
    parked
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut probe = [0u8; 64];
    let read = std::io::Read::read(&mut parked, &mut probe);
    assert!(matches!(read, Ok(0)), "closed at shutdown: {read:?}");
    assert!(
        proxy.process.wait_exit(Duration::from_secs(15)).is_some(),
        "the proxy exits with a parked client"
    );
}

#[test]
fn a_keep_alive_connection_reads_the_next_request_whatever_its_shape() {
    // Between two requests the proxy reads what the client already sent (up to 4 KiB) before
    // handing the connection back to the HTTP parser. The parser must get the rest from the
    // socket: a head larger than that read, a head split across writes, a head that trickles.
    let (upstream, proxy) = stack();
    let mut client = raw_tcp::connect(proxy.addr, None);
    let first = raw_tcp::exchange(&mut client, b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(first.status(), Some(200), "{first:?}");

    // 3 × 5000 bytes of headers: over the 4 KiB read ahead, under every head limit.
    let wide: String = (0..3)
        .map(|i| format!("X-Pad{i}: {}\r\n", "p".repeat(5000)))
        .collect();
    let large = format!("GET /large HTTP/1.1\r\nHost: h\r\n{wide}\r\n");
    let outcome = raw_tcp::exchange(&mut client, large.as_bytes());
    assert_eq!(outcome.status(), Some(200), "a 15 KB head: {outcome:?}");

    // The head's first bytes now, the rest 300 ms later.
    client.write_all(b"GET /split HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let outcome = raw_tcp::exchange(&mut client, b"st: h\r\n\r\n");
    assert_eq!(outcome.status(), Some(200), "a split head: {outcome:?}");

    let paths: Vec<String> = forwarded(&upstream)
        .iter()
        .filter_map(|r| r.split_whitespace().nth(1).map(str::to_string))
        .collect();
    assert_eq!(paths, ["/first", "/large", "/split"]);
    let large_forwarded = &forwarded(&upstream)[1];
    assert!(
        large_forwarded.contains(&format!("x-pad2: {}", "p".repeat(5000)))
            || large_forwarded.contains(&format!("X-Pad2: {}", "p".repeat(5000))),
        "the large head reached the worker whole"
    );

    // A next request that trickles is still held to client_timeout (2 s), like a first one.
    client.write_all(b"GET /slow HTTP/1.1\r\n").unwrap();
    assert!(
        keeps_trickling_until_closed(&mut client, 100),
        "a trickling second request was still accepted after 20 s"
    );
    assert_eq!(
        forwarded(&upstream).len(),
        3,
        "the slow request was not forwarded"
    );
}

#[test]
fn busy_keep_alive_clients_with_large_heads_get_every_request_answered() {
    // Under load the next request is usually in before the proxy is back from the previous
    // one, and the keep-alive wait reads it ahead (4 KiB at most). Heads larger than that
    // (big cookies are common) must still arrive whole, request after request.
    let (upstream, proxy) = stack();
    let clients = 8;
    let requests = 150;
    let padding = "q".repeat(6000);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let padding = padding.clone();
            let addr = proxy.addr;
            std::thread::spawn(move || {
                let mut stream = raw_tcp::connect(addr, None);
                for r in 0..requests {
                    let head = format!(
                        "GET /c{c}/r{r} HTTP/1.1\r\nHost: h\r\nCookie: big={padding}\r\n\r\n"
                    );
                    let outcome = raw_tcp::exchange(&mut stream, head.as_bytes());
                    assert_eq!(
                        outcome.status(),
                        Some(200),
                        "client {c} request {r}: {outcome:?}"
                    );
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("a client failed");
    }
    let forwarded = forwarded(&upstream);
    assert_eq!(forwarded.len(), clients * requests);
    let cookie = format!("big={padding}");
    assert!(
        forwarded.iter().all(|r| r.contains(&cookie)),
        "every head reached the worker whole"
    );
}

/// An HTTP/1.0 request without Host (which 1.0 allows) goes upstream as HTTP/1.1, which
/// requires one: the worker gets the proxy's address as Host, and a Host the client sent is
/// passed on as it was.
#[test]
fn an_http_1_0_request_without_host_reaches_the_worker_with_one() {
    let (upstream, proxy) = stack();
    let outcome = raw_tcp::send(proxy.addr, b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let outcome = raw_tcp::send(proxy.addr, b"GET /named HTTP/1.0\r\nHost: given\r\n\r\n");
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    let requests: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(r).to_ascii_lowercase())
        .collect();
    let host_of = |path: &str| -> Vec<String> {
        let request = requests
            .iter()
            .find(|r| r.starts_with(&format!("get {path} ")))
            .unwrap_or_else(|| panic!("{path} forwarded: {requests:?}"));
        request
            .lines()
            .filter_map(|l| l.strip_prefix("host:").map(|v| v.trim().to_string()))
            .collect()
    };
    assert_eq!(host_of("/old"), vec![proxy.addr.to_string()]);
    assert_eq!(host_of("/named"), vec!["given".to_string()]);
}

/// What Pingora refuses before any check of ours (an unparseable head, a version that is not
/// HTTP/1.x, CONNECT) is counted in `custodia_rejections_total` too, by reason: an operator
/// sees a flood of garbage or scanners, not nothing.
#[test]
fn refusals_before_the_edge_are_counted_by_reason() {
    let (_upstream, proxy) = stack();
    let rejected = |reason: &str| -> f64 {
        let body = proxy.scrape_blocking().expect("metrics");
        support::custodia::parse_samples(&body, "custodia_rejections_total")
            .iter()
            .find(|(labels, _)| labels == &format!("reason=\"{reason}\""))
            .map_or(0.0, |(_, v)| *v)
    };
    let (malformed, method) = (rejected("malformed"), rejected("method_not_allowed"));
    for (bytes, status) in [
        (&b"\x16\x03\x01\x00garbage\r\n\r\n"[..], 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405),
    ] {
        let outcome = raw_tcp::send(proxy.addr, bytes);
        assert_eq!(outcome.status(), Some(status), "{bytes:?}: {outcome:?}");
    }
    assert_eq!(rejected("malformed"), malformed + 2.0);
    assert_eq!(rejected("method_not_allowed"), method + 1.0);
    // Refused right behind a request Pingora's path served, in the same write.
    let mut stream = raw_tcp::connect(proxy.addr, None);
    stream
        .write_all(
            b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n\
              CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answers = Vec::new();
    // Until the proxy closes after its refusal (bounded by the read timeout).
    let _ = std::io::Read::read_to_end(&mut stream, &mut answers);
    let answers = String::from_utf8_lossy(&answers);
    let first = answers.find("HTTP/1.1 200 ").expect(&answers);
    let refusal = answers.find("HTTP/1.1 405 ").expect(&answers);
    assert!(first < refusal, "{answers}");
    assert_eq!(rejected("method_not_allowed"), method + 2.0);
    // A request the edge answers itself is counted once, as before (bare LF: malformed).
    let outcome = raw_tcp::send(proxy.addr, b"GET / HTTP/1.1\nHost: x\n\n");
    assert_eq!(outcome.status(), Some(400), "{outcome:?}");
    assert_eq!(rejected("malformed"), malformed + 3.0);
    // And ordinary answers, counted nowhere here.
    let outcome = raw_tcp::send(proxy.addr, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(outcome.status(), Some(200), "{outcome:?}");
    assert_eq!(rejected("malformed"), malformed + 3.0);
}

/// The start of a next request that arrived with the last one (or while it waited on a worker)
/// is under the client timeout too: a client that sends a request, one byte of the next and
/// then nothing is closed after `client_timeout` (it held its connection and its place forever).
#[test]
fn a_next_request_begun_with_the_last_one_is_under_the_client_timeout() {
    let (_upstream, proxy) = stack();
    // The fast path's request, and one Pingora's path serves (its parser carries the byte
    // over to its next session).
    for first in [
        &b"GET /first HTTP/1.1\r\nHost: h\r\n\r\nG"[..],
        b"POST /first HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nokG",
    ] {
        closes_after_the_first_answer(&proxy, first);
    }
}

fn closes_after_the_first_answer(proxy: &Proxy, bytes: &[u8]) {
    let mut stream = raw_tcp::connect(proxy.addr, None);
    stream.write_all(bytes).unwrap();
    // The first answer comes; then the proxy must not wait for the rest of "G…" for ever.
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match std::io::Read::read(&mut stream, &mut chunk) {
            Ok(0) => break true,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let seen = String::from_utf8_lossy(&seen);
    let sent = String::from_utf8_lossy(bytes);
    assert!(seen.starts_with("HTTP/1.1 200 "), "{sent:?}: {seen}");
    assert!(
        closed,
        "{sent:?}: still open {:?} after the first answer (client_timeout is 2 s)",
        started.elapsed()
    );
}
