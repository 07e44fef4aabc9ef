//! `cargo bench`: the cost of the proxy as a ratio. One request through proxy → worker next to
//! the same request sent straight to a worker (HTTP/1.1 keep-alive, concurrency 1), through the
//! fast path and through Pingora's path (`[server] fast_path = false`), plus the
//! per-request pieces of the edge on their own, in memory: the session check, the
//! least-connections pick (alone and with a second thread picking at once), the least_time
//! pick, the route policy match, the request header rewrite and the metrics of a request.
//!
//! The end-to-end comparison with nginx is `benches/end_to_end.rs` (see BENCHMARKS.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::BatchSize;
use custodia_proxy::auth::flow::sign_assertion;
use custodia_proxy::auth::{
    cookie_text, open_session, remove_custodia_cookies, seal, seal_session, strip_client_identity,
    CookieSettings, ForwardedIdentity, Policy, Purpose, RouteTable, SecretKeys, Session,
    SessionCache, SessionError, Verified,
};
use custodia_proxy::balancer::{Member, Pool, SlotRegistry};
use custodia_proxy::config::Balance;
use custodia_proxy::headers::{request_id, set_forwarding, set_identity};
use custodia_proxy::metrics::{self, InFlight, PolicyClass, RequestCount};
use pingora_http::RequestHeader;

/// The in-memory pieces run on the allocator the proxy runs on.
#[global_allocator]
static ALLOCATOR: custodia_proxy::Allocator = custodia_proxy::Allocator;

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

fn wait_for(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(args: &[&str]) -> Guard {
    Guard(
        Command::new(env!("CARGO_BIN_EXE_custodia"))
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn custodia"),
    )
}

/// A minimal keep-alive HTTP/1.1 client: one GET, read the body by Content-Length.
struct KeepAlive {
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
}

impl KeepAlive {
    fn connect(addr: SocketAddr, path: &str) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        KeepAlive {
            reader: BufReader::new(stream),
            request: format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes(),
        }
    }

    fn get(&mut self) -> usize {
        self.reader
            .get_mut()
            .write_all(&self.request)
            .expect("write");
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("read header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("content-length");
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("read body");
        length
    }
}

fn end_to_end(c: &mut Criterion) {
    let worker = free_addr();
    let _worker = spawn(&[
        "app",
        "--listen",
        &worker.to_string(),
        "--worker-id",
        "bench",
    ]);
    wait_for(worker);

    let dir = std::env::temp_dir().join(format!("custodia-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The same proxy twice: the fast path (the default) and every request through Pingora.
    let start_proxy = |name: &str, fast_path: bool| {
        let listen = free_addr();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{listen}\"\nthreads = 1\nfast_path = {fast_path}\n\
                 pid_file = \"{}\"\nupgrade_sock = \"{}\"\n\
                 [upstream]\nbackends = [\"{worker}\"]\n",
                dir.join(format!("{name}.pid")).display(),
                dir.join(format!("{name}.sock")).display()
            ),
        )
        .expect("write config");
        let proxy = spawn(&["proxy", "--config", config.to_str().expect("utf-8 path")]);
        wait_for(listen);
        (proxy, listen)
    };
    let (_fast, fast) = start_proxy("fast", true);
    let (_pingora, pingora) = start_proxy("pingora", false);

    let mut group = c.benchmark_group("GET /api/hello, keep-alive, concurrency 1");
    for (name, addr) in [
        ("direct to worker", worker),
        ("through custodia-proxy", fast),
        ("through custodia-proxy, pingora path", pingora),
    ] {
        let mut client = KeepAlive::connect(addr, "/api/hello");
        group.bench_function(name, |b| b.iter(|| client.get()));
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn pool_of(registry: &SlotRegistry, n: usize) -> Pool {
    pool_balanced(registry, n, Balance::LeastConn)
}

fn pool_balanced(registry: &SlotRegistry, n: usize, balance: Balance) -> Pool {
    let members = (0..n)
        .map(|i| Member {
            slot: registry.slot(SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))),
            weight: 1,
        })
        .collect();
    Pool::new(members, balance)
}

/// The pick + release while a second thread does the same on the same pool, as the proxy's two
/// threads do: the cost of sharing the in-flight counters' cache lines.
fn least_conn_pick_contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("least_conn pick + release, 2 threads at once");
    for n in [3usize, 32, 256] {
        let registry = SlotRegistry::new();
        let pool = pool_of(&registry, n);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    drop(std::hint::black_box(pool.pick(&[])));
                }
            });
            group.bench_with_input(BenchmarkId::from_parameter(n), &pool, |b, pool| {
                b.iter(|| pool.pick(&[]).map(|lease| lease.slot().addr))
            });
            stop.store(true, Ordering::Relaxed);
        });
    }
    group.finish();
}

/// What the request path counted on before its figures went per thread: prometheus metrics,
/// whose atomics every thread shares.
struct SharedMetrics {
    requests: prometheus::IntCounter,
    duration: prometheus::Histogram,
    in_flight: prometheus::IntGauge,
    response_bytes: prometheus::IntCounter,
}

impl SharedMetrics {
    fn new() -> SharedMetrics {
        SharedMetrics {
            requests: prometheus::IntCounter::new("r", "r").unwrap(),
            duration: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("d", "d"))
                .unwrap(),
            in_flight: prometheus::IntGauge::new("f", "f").unwrap(),
            response_bytes: prometheus::IntCounter::new("b", "b").unwrap(),
        }
    }

    fn count(&self, request: &RequestCount) {
        self.in_flight.inc();
        self.requests.inc();
        self.duration.observe(request.duration.as_secs_f64());
        self.response_bytes.inc_by(request.bytes_out);
        self.in_flight.dec();
    }
}

/// Counting a finished request (in flight, then done) while a second thread counts too, as the
/// proxy's two threads do: the per-thread figures against shared prometheus metrics.
fn request_metrics(c: &mut Criterion) {
    let request = RequestCount {
        policy: PolicyClass::Required,
        method: 0,
        status: 200,
        duration: Duration::from_micros(180),
        bytes_in: 0,
        bytes_out: 35,
        retries: 0,
    };
    let per_thread = || {
        let in_flight = InFlight::start();
        metrics::requests().finished(&request);
        drop(in_flight);
    };
    let shared = SharedMetrics::new();
    let mut group = c.benchmark_group("count a finished request, 2 threads at once");
    for (name, count) in [
        ("per-thread figures", &per_thread as &(dyn Fn() + Sync)),
        ("shared prometheus metrics", &|| shared.count(&request)),
    ] {
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    count();
                }
            });
            group.bench_function(name, |b| b.iter(count));
            stop.store(true, Ordering::Relaxed);
        });
    }
    group.finish();
}

/// The route policy of a request path (normalise, then longest prefix), with the local
/// config's routes.
fn route_policy(c: &mut Criterion) {
    let table = RouteTable::new(
        vec![
            ("/".into(), Policy::Optional),
            ("/healthz".into(), Policy::Public),
            ("/api/hello".into(), Policy::Public),
            ("/api/".into(), Policy::Required),
        ],
        Policy::Required,
    )
    .expect("routes");
    let mut group = c.benchmark_group("route policy");
    for path in ["/api/me", "/api/hello?name=x", "/", "/static/../api/%6de"] {
        group.bench_with_input(BenchmarkId::from_parameter(path), path, |b, path| {
            b.iter(|| table.policy_for_request(path))
        });
    }
    group.finish();
}

/// The edge's header rewrite of a browser request: drop client-sent identity headers, then set
/// X-Real-IP / X-Forwarded-For / -Proto / X-Request-Id (the request is cloned outside the timing).
fn header_rewrite(c: &mut Criterion) {
    let mut request = RequestHeader::build("GET", b"/api/hello", None).expect("request");
    for (name, value) in [
        ("host", "custodia.example.test"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/133.0",
        ),
        ("accept", "application/json"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("cookie", "_ga=GA1.1.123; theme=dark"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-user", "spoofed"),
    ] {
        request.append_header(name, value).expect("header");
    }
    let peer = Some(std::net::IpAddr::from([127, 0, 0, 1]));
    let client = Some(std::net::IpAddr::from([203, 0, 113, 7]));
    let mut group = c.benchmark_group("header rewrite");
    group.bench_function("strip identity + forwarding", |b| {
        b.iter_batched(
            || request.clone(),
            |mut upstream| {
                strip_client_identity(&mut upstream);
                let id = request_id(&upstream);
                set_forwarding(&mut upstream, peer, client, "https", &id).expect("forwarding");
                upstream
            },
            BatchSize::SmallInput,
        )
    });
    // Signed in: the session cookie comes off and the identity headers and the assertion (signed
    // by the session check) go on, as `upstream_request_filter` does with auth on.
    let keys = SecretKeys::from_secrets("0123456789abcdef0123456789abcdef", &[]).expect("keys");
    let session = demo_session();
    let sealed = seal_session(&keys, &session);
    let name = CookieSettings { secure: true }.session_cookie_name();
    let mut signed_in = request.clone();
    signed_in.remove_header("cookie");
    signed_in
        .append_header(
            "cookie",
            format!("_ga=GA1.1.123; {name}={sealed}; theme=dark"),
        )
        .expect("cookie");
    let verified = Verified {
        assertion: sign(&session, 1_900_000_000),
        forwarded: ForwardedIdentity::of(&session),
        session: std::sync::Arc::new(session),
    };
    group.bench_function(
        "signed in: + session cookie removed, identity headers set",
        |b| {
            b.iter_batched(
                || signed_in.clone(),
                |mut upstream| {
                    strip_client_identity(&mut upstream);
                    remove_custodia_cookies(&mut upstream);
                    let id = request_id(&upstream);
                    set_forwarding(&mut upstream, peer, client, "https", &id).expect("forwarding");
                    set_identity(&mut upstream, &verified).expect("identity");
                    upstream
                },
                BatchSize::SmallInput,
            )
        },
    );
    group.finish();
}

fn demo_session() -> Session {
    Session {
        sub: "auth0|5f1c2e9a7b3d4c0012345678".into(),
        email: Some("demo@example.test".into()),
        name: Some("Demo User".into()),
        picture: Some("https://s.gravatar.com/avatar/0123456789abcdef.png".into()),
        iat: 1_800_000_000,
        exp: 4_000_000_000,
    }
}

/// least_time over backends timed once at the start: every pick decays each estimate with an
/// `exp` (backends observed within the last 10 µs take a cheaper path), the worst case.
fn least_time_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("least_time pick + release");
    for n in [3usize, 32, 256] {
        let registry = SlotRegistry::new();
        let pool = pool_balanced(&registry, n, Balance::LeastTime);
        for (i, member) in pool.members().iter().enumerate() {
            let time = std::time::Duration::from_micros(500 + 10 * i as u64);
            member.slot.observe_latency(time, std::time::Instant::now());
        }
        group.bench_with_input(BenchmarkId::from_parameter(n), &pool, |b, pool| {
            b.iter(|| pool.pick(&[]).map(|lease| lease.slot().addr))
        });
    }
    group.finish();
}

fn least_conn_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("least_conn pick + release");
    for n in [3usize, 32, 256] {
        let registry = SlotRegistry::new();
        let pool = pool_of(&registry, n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &pool, |b, pool| {
            b.iter(|| pool.pick(&[]).map(|lease| lease.slot().addr))
        });
    }
    group.finish();
}

/// The workers' identity assertion for `session` at `now`, as the proxy signs it.
fn sign(session: &Session, now: u64) -> http::HeaderValue {
    sign_assertion(b"0123456789abcdef0123456789abcdef-assertion", session, now)
}

/// The per-request session check: find the cookie in the Cookie header, open it (AES-256-GCM),
/// parse it and check expiry; then, as the edge does it, through the memo of cookies seen
/// before, which also keeps the workers' assertion for the current second.
fn session_check(c: &mut Criterion) {
    let keys = SecretKeys::from_secrets("0123456789abcdef0123456789abcdef", &[]).expect("keys");
    let cookies = CookieSettings { secure: true };
    let session = demo_session();
    let sealed = seal_session(&keys, &session);
    let name = cookies.session_cookie_name();
    let valid = format!("_ga=GA1.1.123; {name}={sealed}; theme=dark");
    let mut tampered_value = sealed.clone().into_bytes();
    let middle = tampered_value.len() / 2;
    tampered_value[middle] = if tampered_value[middle] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered = format!(
        "_ga=GA1.1.123; {name}={}; theme=dark",
        String::from_utf8(tampered_value).expect("ascii")
    );
    let absent = "_ga=GA1.1.123; theme=dark".to_string();
    // The session as earlier versions sealed it, with an Auth0-sized ID token inside (~2.9 KB
    // cookie; it still opens): what moving the token to the logout hint saved, side by side.
    let mut legacy = serde_json::to_value(&session).expect("session json");
    legacy["id_token"] = "e".repeat(1100).into();
    let legacy = seal(
        &keys,
        Purpose::Session,
        &serde_json::to_vec(&legacy).expect("json"),
    );
    let valid_legacy = format!("_ga=GA1.1.123; {name}={legacy}; theme=dark");

    let mut group = c.benchmark_group("session check");
    for (case, header) in [
        ("valid", &valid),
        ("tampered", &tampered),
        ("absent", &absent),
        ("valid, with the ID token inside (before)", &valid_legacy),
    ] {
        group.bench_function(case, |b| {
            b.iter(|| {
                cookies
                    .read_session(std::iter::once(header.as_bytes()))
                    .map(|v| open_session(&keys, &v, 1_900_000_000).is_ok())
            })
        });
    }
    let now = 1_900_000_000;
    group.bench_function("assertion signing (first sight, then once a second)", |b| {
        b.iter(|| sign(&session, now))
    });
    let memo = SessionCache::new();
    group.bench_function("valid, seen before: recalled with its assertion", |b| {
        // As the edge does it: the memo first, the octet check and the opening on a miss.
        b.iter(|| {
            cookies
                .find_session(std::iter::once(valid.as_bytes()))
                .map(|v| {
                    let open = || match cookie_text(&v) {
                        Some(sealed) => open_session(&keys, sealed, now),
                        None => Err(SessionError::Absent),
                    };
                    memo.verify(&v, now, open, sign).is_ok()
                })
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    session_check,
    least_conn_pick,
    least_conn_pick_contended,
    least_time_pick,
    route_policy,
    header_rewrite,
    request_metrics,
    end_to_end
);
criterion_main!(benches);
