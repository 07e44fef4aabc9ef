//! The fast path (`[server] fast_path`, on by default): plain GET/HEAD requests forwarded by
//! Custodia's own HTTP/1 path. It must be indistinguishable from Pingora's path for workers
//! and clients, survive workers that close idle connections, and relay every body framing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::custodia::{client, upstream_section, Proxy, Worker};
use support::echo::{OneRequestServer, RecordingServer, ScriptedServer, PAUSE};
use support::process::{eventually, eventually_async};
use support::raw_tcp;

/// The request as the worker got it: request line, then header lines lower-cased and sorted.
fn normalised(raw: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let request_line = lines.next().unwrap_or("").to_string();
    let mut headers: Vec<String> = lines
        .map(|l| {
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            format!("{}: {}", name.trim().to_ascii_lowercase(), value.trim())
        })
        .collect();
    headers.sort();
    let mut out = vec![request_line];
    out.extend(headers);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_clients_see_the_same_request_and_answer_on_both_paths() {
    let worker = RecordingServer::start();
    let upstream = upstream_section("least_conn", &[(worker.addr, 1)]);
    let fast = Proxy::start_with_server("fast_path = true\n", &upstream);
    let pingora = Proxy::start_with_server("fast_path = false\n", &upstream);
    let send = |proxy: &Proxy| {
        client()
            .get(proxy.url("/some/path?q=1&r=%20"))
            .header("host", "custodia.example")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-host", "evil.example")
            .header("x-request-id", "same-id")
            .header("x-forwarded-user", "spoofed")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic eDp5")
            .header("te", "trailers")
            .header("x-custom", "kept")
            .header("cookie", "theme=dark")
            .header("accept", "application/json")
            .send()
    };
    let via_fast = send(&fast).await.unwrap();
    let via_pingora = send(&pingora).await.unwrap();
    let answer = |r: &reqwest::Response| {
        let mut headers: Vec<String> = r
            .headers()
            .iter()
            .filter(|(name, _)| *name != "date")
            .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
            .collect();
        headers.sort();
        (r.status(), headers)
    };
    assert_eq!(answer(&via_fast), answer(&via_pingora));
    assert_eq!(
        via_fast.text().await.unwrap(),
        via_pingora.text().await.unwrap()
    );

    let seen = worker.requests();
    assert_eq!(seen.len(), 2, "one request each");
    let (first, second) = (normalised(&seen[0]), normalised(&seen[1]));
    assert_eq!(first, second, "the worker cannot tell the paths apart");
    assert_eq!(first[0], "GET /some/path?q=1&r=%20 HTTP/1.1");
    for expected in [
        "host: custodia.example",
        "x-forwarded-for: 203.0.113.9, 127.0.0.1",
        "x-real-ip: 127.0.0.1",
        "x-request-id: same-id",
        "x-custom: kept",
    ] {
        assert!(
            first.contains(&expected.to_string()),
            "{expected} in {first:?}"
        );
    }
    for gone in [
        "keep-alive",
        "proxy-authorization",
        "te",
        "x-forwarded-user",
        "connection",
    ] {
        assert!(
            !first.iter().any(|l| l.starts_with(&format!("{gone}:"))),
            "{gone} forwarded: {first:?}"
        );
    }
}

/// A signed-in request: the session cookie comes off, the client's identity headers and
/// X-Forwarded-Host are replaced by the proxy's own, the same on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_in_request_reaches_the_worker_alike_on_both_paths() {
    use custodia_proxy::auth::{seal_session, CookieSettings, SecretKeys, Session};

    let worker = RecordingServer::start();
    let app_secret = "fast-path-test-0123456789abcdef0123456789abcdef";
    let env = [
        ("APP_SECRET_KEY", app_secret),
        ("AUTH0_CLIENT_SECRET", "fast-path-client-secret"),
    ];
    // Nothing listens at the issuer: sealed sessions are checked without the IdP. The test
    // client (loopback) is not a trusted proxy.
    let sections = format!(
        "{}\n[auth]\nissuer = \"http://127.0.0.1:9/\"\nclient_id = \"custodia-test\"\n\
         public_url = \"http://127.0.0.1:9\"\ndefault_policy = \"required\"\n\
         trusted_proxies = [\"10.0.0.0/8\"]\n",
        upstream_section("least_conn", &[(worker.addr, 1)])
    );
    let fast = Proxy::start_with_server_env("fast_path = true\n", &sections, &env);
    let pingora = Proxy::start_with_server_env("fast_path = false\n", &sections, &env);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let session = Session {
        sub: "auth0|fast-path".into(),
        email: Some("fast@example.test".into()),
        name: Some("Fast Path".into()),
        picture: None,
        iat: now,
        exp: now + 3600,
    };
    let keys = SecretKeys::from_secrets(app_secret, &[]).unwrap();
    let sealed = seal_session(&keys, &session);
    let cookie_name = CookieSettings { secure: false }.session_cookie_name();
    let send = |proxy: &Proxy| {
        client()
            .get(proxy.url("/api/hello"))
            .header(
                "cookie",
                format!("theme=dark; {cookie_name}={sealed}; lang=en"),
            )
            .header("x-forwarded-user", "spoofed")
            .header("X-Forwarded-Email", "spoofed@example.test")
            .header("host", "custodia.example")
            .header("x-request-id", "signed-in")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-host", "evil.example")
            .header("x-custodia-identity", "forged")
            .header("accept", "application/json")
            .send()
    };
    assert_eq!(send(&fast).await.unwrap().status(), 200);
    assert_eq!(send(&pingora).await.unwrap().status(), 200);

    let seen = worker.requests();
    assert_eq!(seen.len(), 2, "one request each");
    // The assertion is signed for the second it is made in: compare it apart.
    let split = |raw: &[u8]| {
        let lines = normalised(raw);
        let (assertions, rest): (Vec<String>, Vec<String>) = lines
            .into_iter()
            .partition(|l| l.starts_with("x-custodia-identity:"));
        (assertions, rest)
    };
    let ((fast_assertion, first), (pingora_assertion, second)) = (split(&seen[0]), split(&seen[1]));
    assert_eq!(first, second, "the worker cannot tell the paths apart");
    for expected in [
        "cookie: theme=dark; lang=en",
        "x-forwarded-user: auth0|fast-path",
        "x-forwarded-email: fast@example.test",
        "x-real-ip: 127.0.0.1",
    ] {
        assert!(
            first.contains(&expected.to_string()),
            "{expected} in {first:?}"
        );
    }
    assert!(
        !first.iter().any(|l| l.starts_with("x-forwarded-host:")),
        "an untrusted X-Forwarded-Host was forwarded: {first:?}"
    );
    for assertion in [&fast_assertion, &pingora_assertion] {
        assert_eq!(assertion.len(), 1, "one assertion: {assertion:?}");
        assert!(!assertion[0].ends_with("forged"), "{assertion:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_closing_its_idle_connections_costs_no_request() {
    // Says nothing about closing, then closes each connection 50 ms after answering: the
    // proxy's pooled connection is dead when the next request comes.
    let worker = ScriptedServer::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
            true,
        )
    });
    // No retries: a dead pooled connection must not count as a failed attempt.
    let upstream =
        upstream_section("least_conn", &[(worker.addr, 1)]).replace("retries = 2", "retries = 0");
    let proxy = Proxy::start(&upstream);
    let client = client();
    for i in 0..4 {
        let response = client.get(proxy.url("/api/x")).send().await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(response.text().await.unwrap(), "hello");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the connections the worker closed do not linger half-closed in the proxy's pool.
    let half_closed_to_worker = || {
        proxy
            .process
            .tcp_sockets()
            .into_iter()
            .filter(|s| s.state == "CLOSE_WAIT" && s.remote == worker.addr)
            .count()
    };
    eventually(
        "no CLOSE_WAIT socket to the worker",
        Duration::from_secs(5),
        || (half_closed_to_worker() == 0).then_some(()),
    );
}

/// A pooled worker connection the worker closes just as the proxy sends on it costs no
/// request, on either path: the request goes again to the same worker on a new connection
/// (nginx's extra try for a cached connection). Pingora's path answered every other one 502
/// with a single worker, and failed over from a healthy worker with several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_under_a_request_costs_no_request_on_both_paths() {
    let worker = OneRequestServer::start();
    let upstream =
        upstream_section("least_conn", &[(worker.addr, 1)]).replace("retries = 2", "retries = 0");
    for fast_path in [true, false] {
        let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
        let client = client();
        for i in 0..6 {
            let response = client.get(proxy.url("/again")).send().await.unwrap();
            assert_eq!(
                response.status(),
                200,
                "fast_path = {fast_path}, request {i}"
            );
            assert_eq!(response.text().await.unwrap(), "one");
        }
        let failovers: f64 = proxy
            .metric("custodia_upstream_failovers_total")
            .await
            .iter()
            .map(|(_, v)| v)
            .sum();
        assert_eq!(failovers, 0.0, "fast_path = {fast_path}");
    }
}

/// A worker that sends more than its framing said, in a later write: the bytes after its answer
/// must never be taken for the answer to another request (another client's, in production).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_worker_sends_after_its_answer_never_answer_another_request() {
    let worker = ScriptedServer::start(|request_line| {
        let bytes = if request_line.starts_with("GET /late-extra ") {
            [
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".as_slice(),
                PAUSE,
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!",
            ]
            .concat()
        } else {
            let who = request_line.split(['?', ' ']).nth(2).unwrap_or("");
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{who}",
                who.len()
            )
            .into_bytes()
        };
        (bytes, false)
    });
    for fast_path in ["true", "false"] {
        let upstream = upstream_section("least_conn", &[(worker.addr, 1)]);
        let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
        // One client connection: its requests are served by one proxy thread, whose pool the
        // worker's connection goes back to.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        let late = client.get(proxy.url("/late-extra")).send().await.unwrap();
        assert_eq!(late.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(300)).await;
        for who in ["first", "second", "third"] {
            let response = client
                .get(proxy.url(&format!("/echo?{who}")))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "fast_path = {fast_path}");
            assert_eq!(
                response.text().await.unwrap(),
                who,
                "fast_path = {fast_path}: each request gets its own answer"
            );
        }
    }
}

/// `GET path` (raw bytes, `Connection: close`) through a proxy with the fast path on, then
/// through one with it off, both in front of `worker`: `(fast_path, outcome)` each.
fn raw_get_on_both_paths(
    worker: std::net::SocketAddr,
    path: &str,
) -> Vec<(&'static str, raw_tcp::Outcome)> {
    let upstream = upstream_section("least_conn", &[(worker, 1)]);
    ["true", "false"]
        .into_iter()
        .map(|fast_path| {
            let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
            let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
            (fast_path, raw_tcp::send(proxy.addr, request.as_bytes()))
        })
        .collect()
}

/// An answer with many header lines (150; Pingora's path takes up to 256) is relayed on both
/// paths alike, not a 502 on one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_many_header_lines_is_relayed_on_both_paths() {
    let worker = ScriptedServer::start(|_| {
        let mut head = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
        for i in 0..150 {
            head.push_str(&format!("x-line-{i}: {i}\r\n"));
        }
        head.push_str("\r\nok");
        (head.into_bytes(), false)
    });
    // Raw: reqwest itself reads at most 100 header lines.
    for (fast_path, outcome) in raw_get_on_both_paths(worker.addr, "/many") {
        assert_eq!(
            outcome.status(),
            Some(200),
            "fast_path = {fast_path}: {outcome:?}"
        );
        assert_eq!(outcome.header("x-line-149"), Some("149"), "{outcome:?}");
    }
}

/// A worker's answer whose body framing is broken from its first bytes is a 502 with a page,
/// not a 200 cut short: nothing had gone to the client yet. (Pingora's path sends the head
/// before it reads the body, and can only close.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_answer_is_a_502_while_nothing_has_gone_out() {
    let worker = ScriptedServer::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n0\r\n\r\n"
                .to_vec(),
            false,
        )
    });
    let proxy = Proxy::start(&upstream_section("least_conn", &[(worker.addr, 1)]));
    let outcome = raw_tcp::send(
        proxy.addr,
        b"GET /broken HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(outcome.status(), Some(502), "{outcome:?}");
}

/// A worker's 103 Early Hints reach the client before its answer, on both paths (a proxy
/// passes on the 1xx it did not ask for; the fast path dropped them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_are_passed_on_before_the_answer_on_both_paths() {
    let worker = ScriptedServer::start(|_| {
        let bytes = [
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n".as_slice(),
            PAUSE,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ]
        .concat();
        (bytes, false)
    });
    let upstream = upstream_section("least_conn", &[(worker.addr, 1)]);
    for fast_path in ["true", "false"] {
        let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
        let all = exchange(
            proxy.addr,
            b"GET /page HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        let hints = all.find("HTTP/1.1 103").expect(&all);
        let answer = all.find("HTTP/1.1 200 OK").expect(&all);
        assert!(hints < answer, "fast_path = {fast_path}: {all}");
        assert!(
            all[hints..answer]
                .to_ascii_lowercase()
                .contains("link: </a.css>"),
            "{all}"
        );
        assert!(all.ends_with("ok"), "{all}");
    }
}

/// Answers no client may be given, on both paths: a status code outside 100–599 from the
/// worker (502), and a request target with characters no URI has (400, never forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_status_codes_and_targets_are_refused_on_both_paths() {
    let worker = ScriptedServer::start(|request_line| {
        assert!(!request_line.contains('`'), "forwarded: {request_line}");
        (
            b"HTTP/1.1 099 Odd\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            false,
        )
    });
    for (fast_path, outcome) in raw_get_on_both_paths(worker.addr, "/odd") {
        assert_eq!(
            outcome.status(),
            Some(502),
            "fast_path = {fast_path}: {outcome:?}"
        );
    }
    for (fast_path, outcome) in raw_get_on_both_paths(worker.addr, "/a`b") {
        assert_eq!(
            outcome.status(),
            Some(400),
            "fast_path = {fast_path}: {outcome:?}"
        );
    }
}

/// Answers no client could frame or read alike are a 502 on both paths (Pingora's relayed
/// them: a status of 600, `Content-Length: 5, 5`, an empty `Transfer-Encoding` the client
/// then waited on); and an HTTP/1.0 worker's answer reaches the client as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_could_not_frame_are_a_502_on_both_paths() {
    let worker = ScriptedServer::start(|request_line| {
        let head = if request_line.starts_with("GET /600 ") {
            "HTTP/1.1 600 Odd\r\ncontent-length: 5"
        } else if request_line.starts_with("GET /listed ") {
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5"
        } else if request_line.starts_with("GET /empty-coding ") {
            "HTTP/1.1 200 OK\r\ntransfer-encoding: \r\ncontent-length: 5"
        } else if request_line.starts_with("GET /chunked-twice ") {
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked"
        } else {
            "HTTP/1.0 200 OK\r\ncontent-length: 5"
        };
        (format!("{head}\r\n\r\nhello").into_bytes(), false)
    });
    for path in ["/600", "/listed", "/empty-coding", "/chunked-twice"] {
        for (fast_path, outcome) in raw_get_on_both_paths(worker.addr, path) {
            assert_eq!(
                outcome.status(),
                Some(502),
                "{path}, fast_path = {fast_path}: {outcome:?}"
            );
        }
    }
    let upstream = upstream_section("least_conn", &[(worker.addr, 1)]);
    for fast_path in ["true", "false"] {
        let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
        let answer = exchange(
            proxy.addr,
            b"GET /old HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        );
        assert!(
            answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("hello"),
            "fast_path = {fast_path}: {answer}"
        );
    }
}

/// Headers a worker's `Connection` header names are about its connection to the proxy: they
/// reach no client, on either path (both passed them on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_the_workers_connection_header_names_stay_at_the_proxy() {
    let worker = ScriptedServer::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nconnection: x-secret, X-Other, Content-Length, Date\r\n\
              x-secret: s\r\nx-other: o\r\nx-kept: k\r\ncontent-length: 2\r\n\
              date: Sun, 06 Dec 2026 09:00:00 GMT\r\n\r\nok"
                .to_vec(),
            false,
        )
    });
    for (fast_path, outcome) in raw_get_on_both_paths(worker.addr, "/page") {
        assert_eq!(
            outcome.status(),
            Some(200),
            "fast_path = {fast_path}: {outcome:?}"
        );
        assert_eq!(
            outcome.header("x-secret"),
            None,
            "fast_path = {fast_path}: {outcome:?}"
        );
        assert_eq!(
            outcome.header("x-other"),
            None,
            "fast_path = {fast_path}: {outcome:?}"
        );
        assert_eq!(outcome.header("x-kept"), Some("k"), "{outcome:?}");
        // Not the framing or the date: without its length the answer could only end by
        // closing, and a keep-alive client hung until the idle timeout.
        assert_eq!(outcome.header("content-length"), Some("2"), "{outcome:?}");
        assert!(outcome.header("date").is_some(), "{outcome:?}");
    }
}

/// A worker's 204 with body framing (`Transfer-Encoding: chunked`, `Content-Length: 0`)
/// reaches the client without it on both paths: a 204 has no body to frame (RFC 9110 §8.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_204_reaches_the_client_without_body_framing_on_both_paths() {
    let worker = ScriptedServer::start(|request| {
        let framing = if request.contains("/chunked") {
            "transfer-encoding: chunked"
        } else {
            "content-length: 0"
        };
        (
            format!("HTTP/1.1 204 No Content\r\n{framing}\r\nx-kept: k\r\n\r\n").into_bytes(),
            false,
        )
    });
    for path in ["/chunked", "/sized"] {
        for (fast_path, outcome) in raw_get_on_both_paths(worker.addr, path) {
            let seen = format!("{path}, fast_path = {fast_path}: {outcome:?}");
            assert_eq!(outcome.status(), Some(204), "{seen}");
            assert_eq!(outcome.header("x-kept"), Some("k"), "{seen}");
            assert_eq!(outcome.header("transfer-encoding"), None, "{seen}");
            assert_eq!(outcome.header("content-length"), None, "{seen}");
        }
    }
}

/// A worker's answer in transfer codings besides chunked (`gzip, chunked`, or `gzip` ending
/// when the worker closes) reaches the client on both paths with the codings named, for the
/// client to undo: the fast path answered it with a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_besides_chunked_are_passed_on_on_both_paths() {
    // Not real gzip: the proxy does not look inside a coding, and neither does the test.
    let worker = ScriptedServer::start(|request| {
        if request.contains("/chunked") {
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n"
                    .to_vec(),
                false,
            )
        } else {
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\nGZIP"
                    .to_vec(),
                true,
            )
        }
    });
    let upstream = upstream_section("least_conn", &[(worker.addr, 1)]);
    for fast_path in ["true", "false"] {
        let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
        for path in ["/chunked", "/until-close"] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
            let answer = exchange(proxy.addr, request.as_bytes());
            let seen = format!("{path}, fast_path = {fast_path}: {answer}");
            assert!(answer.starts_with("HTTP/1.1 200 "), "{seen}");
            let lower = answer.to_ascii_lowercase();
            let chunked = lower.contains("\r\ntransfer-encoding: gzip, chunked\r\n")
                && answer.ends_with("4\r\nGZIP\r\n0\r\n\r\n");
            // Pingora's path ends a body without chunks by closing, as the worker did.
            let closed = path == "/until-close"
                && lower.contains("\r\ntransfer-encoding: gzip\r\n")
                && lower.contains("\r\nconnection: close\r\n")
                && answer.ends_with("\r\n\r\nGZIP");
            assert!(chunked || closed, "{seen}");
        }
    }
}

/// A worker switching protocols for a request that asked for no upgrade gets a 502 on both
/// paths, never a tunnel the client cannot use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_protocol_switch_is_a_502_on_both_paths() {
    let worker = ScriptedServer::start(|_| {
        (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
                .to_vec(),
            false,
        )
    });
    for (fast_path, outcome) in raw_get_on_both_paths(worker.addr, "/switch") {
        assert_eq!(
            outcome.status(),
            Some(502),
            "fast_path = {fast_path}: {outcome:?}"
        );
    }
}

/// One connection: `request` sent whole, then everything the proxy answers within 5 s.
fn exchange(proxy: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = raw_tcp::connect(proxy, None);
    std::io::Write::write_all(&mut stream, request).unwrap();
    read_for(&mut stream, Duration::from_secs(5))
}

/// Read everything until the proxy closes or `patience` passes.
fn read_for(stream: &mut std::net::TcpStream, patience: Duration) -> String {
    stream.set_read_timeout(Some(patience)).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&raw).into_owned()
}

/// What the stream sends until it ends with `end`, closes, or `patience` runs out.
fn read_until(stream: &mut std::net::TcpStream, end: &str, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    while !raw.ends_with(end.as_bytes()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_unframed_answers_are_relayed_whole_on_a_connection_that_stays_open() {
    let worker = ScriptedServer::start(|request_line| {
        if request_line.starts_with("GET /chunked ") {
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n"
                    .to_vec(),
                false,
            )
        } else {
            // No length, no chunks: the body ends when the worker closes.
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close".to_vec(),
                true,
            )
        }
    });
    let proxy = Proxy::start(&upstream_section("least_conn", &[(worker.addr, 1)]));

    let reqwest_client = client();
    let chunked = reqwest_client
        .get(proxy.url("/chunked"))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.text().await.unwrap(), "hello, world");
    let unframed = reqwest_client
        .get(proxy.url("/unframed"))
        .send()
        .await
        .unwrap();
    assert_eq!(unframed.headers()["transfer-encoding"], "chunked");
    assert_eq!(unframed.text().await.unwrap(), "until close");

    // Both on one client connection, pipelined in one write; then a HEAD.
    let all = exchange(
        proxy.addr,
        b"GET /unframed HTTP/1.1\r\nHost: a\r\n\r\nGET /chunked HTTP/1.1\r\nHost: a\r\n\r\n\
          HEAD /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let answers: Vec<&str> = all.matches("HTTP/1.1 200 OK\r\n").collect();
    assert_eq!(answers.len(), 3, "three answers in order: {all}");
    let unframed_at = all.find("b\r\nuntil close\r\n0\r\n\r\n").expect(&all);
    let chunked_at = all
        .find("5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n")
        .expect(&all);
    assert!(unframed_at < chunked_at);
    let head_answer = &all[all.rfind("HTTP/1.1 200 OK").unwrap()..];
    assert!(
        head_answer.ends_with("\r\n\r\n"),
        "no body after a HEAD: {head_answer}"
    );
    assert!(head_answer
        .to_ascii_lowercase()
        .contains("connection: close"));
}

/// A chunked answer's bytes are counted as its body, on both paths: the fast path counted its
/// chunk sizes, line ends and trailers too (56 bytes for a body of 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_counts_its_body_bytes_on_both_paths() {
    let worker = ScriptedServer::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n"
                .to_vec(),
            false,
        )
    });
    let upstream = upstream_section("least_conn", &[(worker.addr, 1)]);
    for fast_path in [true, false] {
        let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
        let answer = client().get(proxy.url("/chunked")).send().await.unwrap();
        assert_eq!(answer.text().await.unwrap(), "hello, world");
        let counted = eventually_async("the answer counted", Duration::from_secs(5), || async {
            let bytes: f64 = proxy
                .metric("custodia_response_bytes_total")
                .await
                .iter()
                .map(|(_, v)| v)
                .sum();
            (bytes > 0.0).then_some(bytes)
        })
        .await;
        assert_eq!(counted, 12.0, "fast_path = {fast_path}");
    }
}

/// Requests pipelined behind one Pingora's path serves (a POST with a body, or everything
/// with the fast path off) are answered, in order, on both paths: Pingora closed such a
/// connection after the first answer and the rest went unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_behind_pingoras_path_are_answered_in_order() {
    let worker = Worker::start("w");
    let upstream = upstream_section("least_conn", &[(worker.addr, 1)]);
    let pipelined: &[u8] = b"GET /api/hello?first HTTP/1.1\r\nHost: a\r\n\r\n\
        POST /api/hello HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
        GET /api/hello?third HTTP/1.1\r\nHost: a\r\n\r\n\
        GET /api/hello?fourth HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    for fast_path in ["true", "false"] {
        let proxy = Proxy::start_with_server(&format!("fast_path = {fast_path}\n"), &upstream);
        let all = exchange(proxy.addr, pipelined);
        let statuses: Vec<&str> = all
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &all[at + 9..at + 12])
            .collect();
        assert_eq!(
            statuses,
            ["200", "405", "200", "200"],
            "fast_path = {fast_path}: four answers in order: {all}"
        );
    }
}

/// A pipelined request whose head arrives in two pieces, the first with the request before
/// it, the second while the first is still at the worker: the piece that came early is not
/// lost when the rest comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_head_split_across_reads_is_put_together() {
    let worker = Worker::start_slow("slow", 300);
    let proxy = Proxy::start(&upstream_section("least_conn", &[(worker.addr, 1)]));
    let mut stream = raw_tcp::connect(proxy.addr, None);
    std::io::Write::write_all(
        &mut stream,
        b"GET /api/hello HTTP/1.1\r\nHost: a\r\n\r\nGET /api/hello?second HTTP/1.1\r\nHo",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::io::Write::write_all(&mut stream, b"st: a\r\nConnection: close\r\n\r\n").unwrap();
    let all = read_for(&mut stream, Duration::from_secs(5));
    assert_eq!(
        all.matches("HTTP/1.1 200 OK\r\n").count(),
        2,
        "two answers: {all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_answers_become_a_502_and_requests_it_does_not_take_still_work() {
    let worker = ScriptedServer::start(|request_line| {
        if request_line.starts_with("GET /conflict ") {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxx".to_vec(),
                true,
            )
        } else {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                false,
            )
        }
    });
    let upstream =
        upstream_section("least_conn", &[(worker.addr, 1)]).replace("retries = 2", "retries = 0");
    let proxy = Proxy::start(&upstream);
    let client = client();
    let broken = client.get(proxy.url("/conflict")).send().await.unwrap();
    assert_eq!(broken.status(), 502);
    // A POST and an HTTP/1.0 GET go through Pingora's path, to the same worker.
    let post = client
        .post(proxy.url("/x"))
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(post.text().await.unwrap(), "ok");
    let old = raw_tcp::send(proxy.addr, b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n");
    assert_eq!(old.status(), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_past_read_timeout_gets_a_504_or_the_request_moves_to_another() {
    // Answers /slow after 3 s, past the proxy's 1 s read timeout.
    let answer = |request_line: &str| {
        if request_line.starts_with("GET /slow ") {
            std::thread::sleep(Duration::from_secs(3));
        }
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            false,
        )
    };
    let slow = ScriptedServer::start(answer);
    let upstream = |backends: &[(std::net::SocketAddr, u32)], retries: u32| {
        upstream_section("least_conn", backends)
            .replace("read_timeout = \"5s\"", "read_timeout = \"1s\"")
            .replace("retries = 2", &format!("retries = {retries}"))
    };
    let alone = Proxy::start(&upstream(&[(slow.addr, 1)], 0));
    let timed_out = client()
        .get(alone.url("/slow"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(timed_out.status(), 504);
    let id = timed_out.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let page: serde_json::Value = timed_out.json().await.unwrap();
    assert_eq!(page["status"], 504);
    assert_eq!(page["request_id"], id.as_str());

    // With retries left but no other worker to try, still a 504 (it was a 502), on both
    // paths, and the operator is told which worker timed out.
    for fast_path in [true, false] {
        let proxy = Proxy::start_with_server_capturing(
            &format!("fast_path = {fast_path}\n"),
            &upstream(&[(slow.addr, 1)], 2),
        );
        let response = client().get(proxy.url("/slow")).send().await.unwrap();
        assert_eq!(response.status(), 504, "fast_path = {fast_path}");
        // Pingora's path writes its line once the page is sent.
        let told = |logged: &str| {
            logged.contains("no other backend left") && logged.contains(&slow.addr.to_string())
        };
        let mut logged = proxy.output();
        for _ in 0..100 {
            if told(&logged) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            logged = proxy.output();
        }
        assert!(told(&logged), "fast_path = {fast_path}: {logged}");
        // And its metrics say it too: a timeout, where its response times record nothing.
        let backend = format!("backend=\"{}\"", slow.addr);
        let failures = proxy
            .metric("custodia_upstream_response_failures_total")
            .await;
        let count = |reason: &str| {
            failures
                .iter()
                .find(|(labels, _)| {
                    labels.contains(&backend) && labels.contains(&format!("reason=\"{reason}\""))
                })
                .map(|(_, v)| *v)
        };
        assert_eq!(
            count("timeout"),
            Some(1.0),
            "fast_path = {fast_path}: {failures:?}"
        );
        assert_eq!(
            count("closed"),
            Some(0.0),
            "fast_path = {fast_path}: {failures:?}"
        );
    }

    // With a second worker and a retry, the GET is replayed there.
    let quick = ScriptedServer::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nquick".to_vec(),
            false,
        )
    });
    let pair = Proxy::start(&upstream(&[(slow.addr, 1), (quick.addr, 1)], 1));
    // Ties go to each worker in turn: some of these go to the slow one first.
    for _ in 0..4 {
        let response = client().get(pair.url("/slow")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "quick");
    }
    let retries: f64 = pair
        .metric("custodia_upstream_retries_total")
        .await
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert!(retries >= 1.0, "no request was replayed: {retries}");
}

/// Two workers answering "old" and "new", and a proxy sending every request to the old one.
fn old_and_new_backends() -> (ScriptedServer, ScriptedServer, Proxy) {
    let answering = |body: &'static str| {
        move |_: &str| {
            let response = format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{body}");
            (response.into_bytes(), false)
        }
    };
    let old = ScriptedServer::start(answering("old"));
    let new = ScriptedServer::start(answering("new"));
    let proxy = Proxy::start(&upstream_section("least_conn", &[(old.addr, 1)]));
    (old, new, proxy)
}

/// Reload the proxy with `worker` as its only backend, and wait until the reload is in.
async fn reload_to(proxy: &Proxy, worker: &ScriptedServer) {
    proxy.rewrite(&upstream_section("least_conn", &[(worker.addr, 1)]));
    proxy.sighup();
    eventually_async("the reload is in", Duration::from_secs(10), || async {
        let generation = proxy.metric("custodia_config_generation").await;
        generation.iter().any(|(_, v)| *v == 2.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_sends_its_next_request_after_a_reload_to_the_new_set() {
    let (_old, new, proxy) = old_and_new_backends();
    let mut client = raw_tcp::connect(proxy.addr, None);
    std::io::Write::write_all(&mut client, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let first = read_until(&mut client, "\r\n\r\nold", Duration::from_secs(5));
    assert!(first.ends_with("\r\n\r\nold"), "{first}");

    reload_to(&proxy, &new).await;
    // The same connection, still open: its next request runs under the new configuration.
    std::io::Write::write_all(
        &mut client,
        b"GET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let second = read_for(&mut client, Duration::from_secs(5));
    assert!(second.ends_with("\r\n\r\nnew"), "{second}");
    assert!(!second.contains("old"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_before_a_reload_sends_its_first_request_to_the_new_set() {
    let (_old, new, proxy) = old_and_new_backends();
    // Accepted and waiting for its first request while the configuration changes.
    let mut early = raw_tcp::connect(proxy.addr, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    reload_to(&proxy, &new).await;
    std::io::Write::write_all(
        &mut early,
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let answer = read_for(&mut early, Duration::from_secs(5));
    assert!(answer.ends_with("\r\n\r\nnew"), "{answer}");
}

/// A request the client pipelines while its previous one waits on a slow worker (read then, to
/// notice a client that leaves) is answered after it, in order, also when it began in the
/// previous one's bytes; and one sent on the heels of that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_while_the_previous_waits_on_the_worker_is_answered_next() {
    let slow = Worker::start_slow("slow", 300);
    let proxy = Proxy::start(&upstream_section("least_conn", &[(slow.addr, 1)]));
    let mut stream = raw_tcp::connect(proxy.addr, None);
    // The second request begins in the first write and ends while the first one waits.
    std::io::Write::write_all(
        &mut stream,
        b"GET /api/hello?one HTTP/1.1\r\nHost: a\r\n\r\nGET / HT",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::io::Write::write_all(&mut stream, b"TP/1.1\r\nHost: a\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    std::io::Write::write_all(
        &mut stream,
        b"GET /api/hello?three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let all = read_for(&mut stream, Duration::from_secs(5));
    let statuses = all.matches("HTTP/1.1 200 OK\r\n").count();
    assert_eq!(statuses, 3, "three answers: {all}");
    let first_json = all.find("\"worker\"").expect(&all);
    let page = all.find("<html").or_else(|| all.find("<!")).expect(&all);
    let last_json = all.rfind("\"worker\"").expect(&all);
    assert!(
        first_json < page && page < last_json,
        "in order: hello, page, hello: {all}"
    );
}
