//! `--probe URL` of custodia-app and custodia-proxy: the container health check, for runtime
//! images without curl. One small client shared by both binaries.
//!
//! One plain HTTP/1.1 `GET` over a std [`TcpStream`]: healthy (exit 0) on a `200`, unhealthy
//! (exit 1, the reason on stderr) on any other status, a refused connection, a bad answer or no
//! answer within [`PROBE_TIMEOUT`].
//!
//! ```text
//! custodia-app --probe http://127.0.0.1:8000/healthz && echo healthy
//! custodia-proxy --probe http://127.0.0.1:9090/readyz && echo ready
//! ```

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

/// How long a probe may take in all: connect, send, and read the status line.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The status line must arrive within this many bytes.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{url:?} is not an http://HOST:PORT/PATH URL")]
    BadUrl { url: String },
    #[error("cannot resolve {authority}: {source}")]
    Resolve {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection error: {0}")]
    Io(#[source] std::io::Error),
    #[error("not an HTTP/1.x answer: {0:?}")]
    NotHttp(String),
    #[error("answered {0:?}, not 200")]
    Status(String),
}

/// Where a probe goes: `http://HOST[:PORT][/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeUrl {
    /// Host as written (brackets removed from an IPv6 literal).
    pub host: String,
    pub port: u16,
    /// `HOST:PORT` as written in the URL, for the `Host` header.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl ProbeUrl {
    pub fn parse(url: &str) -> Result<ProbeUrl, ProbeError> {
        let bad = || ProbeError::BadUrl {
            url: url.to_string(),
        };
        let rest = url
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
            .map(|_| &url[7..])
            .ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.is_empty()
            || authority.contains('@')
            || url.chars().any(|c| c.is_whitespace() || c.is_control())
            || path.contains('#')
        {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(port) => (host, port.parse().map_err(|_| bad())?),
                None if after.is_empty() => (host, 80),
                None => return Err(bad()),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
                None => (authority, 80),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(ProbeUrl {
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

/// GETs `url` and succeeds on a `200`, all within `timeout`.
pub fn probe(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let target = ProbeUrl::parse(url)?;
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|source| ProbeError::Resolve {
            authority: target.authority.clone(),
            source,
        })?
        .collect();
    let left = |deadline: Instant| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ProbeError::Timeout(timeout))
    };
    let mut last_error = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left(deadline)?) {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(error) => last_error = error,
        }
    }
    let mut stream = stream.ok_or_else(|| ProbeError::Connect {
        authority: target.authority.clone(),
        source: last_error,
    })?;
    let io = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ProbeError::Timeout(timeout)
        }
        _ => ProbeError::Io(error),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: custodia-probe\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        target.path, target.authority
    );
    stream
        .set_write_timeout(Some(left(deadline)?))
        .map_err(io)?;
    stream.write_all(request.as_bytes()).map_err(io)?;

    let mut received = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let line_end = loop {
        if let Some(end) = received.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if received.len() > MAX_STATUS_LINE {
            return Err(ProbeError::NotHttp(status_text(&received)));
        }
        stream.set_read_timeout(Some(left(deadline)?)).map_err(io)?;
        match stream.read(&mut chunk).map_err(io)? {
            0 if received.is_empty() => {
                return Err(ProbeError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed without an answer",
                )))
            }
            0 => break received.len(),
            n => received.extend_from_slice(&chunk[..n]),
        }
    };
    let line = status_text(&received[..line_end]);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(version), Some("200")) if version.starts_with("HTTP/1.") => Ok(()),
        (Some(version), Some(_)) if version.starts_with("HTTP/1.") => Err(ProbeError::Status(line)),
        _ => Err(ProbeError::NotHttp(line)),
    }
}

fn status_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

/// Runs a probe and returns the exit status: 0 healthy, 1 not (the reason on stderr).
pub fn run_probe(program: &str, url: &str) -> i32 {
    match probe(url, PROBE_TIMEOUT) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("{program}: probe {url}: {error}");
            1
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A one-connection server: reads the request head, writes `answer` (if any), returns the
    /// request it read. `None` answer: hold the connection open without answering.
    fn serve_once(answer: Option<&'static str>) -> (String, JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            match answer {
                Some(answer) => stream.write_all(answer.as_bytes()).unwrap(),
                None => std::thread::sleep(Duration::from_millis(1500)),
            }
            String::from_utf8(head).unwrap()
        });
        (format!("http://{addr}"), handle)
    }

    #[test]
    fn a_200_is_healthy_and_the_request_is_a_plain_get() {
        let (base, server) = serve_once(Some("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"));
        probe(&format!("{base}/healthz"), PROBE_TIMEOUT).unwrap();
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        let host = base.trim_start_matches("http://");
        assert!(
            request.contains(&format!("\r\nHost: {host}\r\n")),
            "{request}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
    }

    #[test]
    fn other_statuses_and_garbage_are_unhealthy() {
        let (base, server) = serve_once(Some("HTTP/1.1 503 Service Unavailable\r\n\r\n"));
        let error = probe(&format!("{base}/readyz"), PROBE_TIMEOUT).unwrap_err();
        assert!(
            matches!(&error, ProbeError::Status(s) if s.contains("503")),
            "{error}"
        );
        server.join().unwrap();

        let (base, server) = serve_once(Some("SSH-2.0-nope\r\n"));
        let error = probe(&base, PROBE_TIMEOUT).unwrap_err();
        assert!(matches!(error, ProbeError::NotHttp(_)), "{error}");
        server.join().unwrap();

        let (base, server) = serve_once(Some(""));
        let error = probe(&base, PROBE_TIMEOUT).unwrap_err();
        assert!(matches!(error, ProbeError::Io(_)), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn a_closed_port_fails_fast() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let started = Instant::now();
        let error = probe(&format!("http://{addr}/healthz"), PROBE_TIMEOUT).unwrap_err();
        assert!(matches!(error, ProbeError::Connect { .. }), "{error}");
        assert!(started.elapsed() < PROBE_TIMEOUT);
        assert_eq!(run_probe("test", &format!("http://{addr}/healthz")), 1);
    }

    #[test]
    fn a_silent_server_times_out_within_the_budget() {
        let (base, server) = serve_once(None);
        let started = Instant::now();
        let error = probe(&base, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(error, ProbeError::Timeout(_)), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        server.join().unwrap();
    }

    #[test]
    fn urls() {
        let url = ProbeUrl::parse("http://127.0.0.1:8000/healthz").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("127.0.0.1", 8000, "/healthz")
        );
        let url = ProbeUrl::parse("HTTP://[::1]:9090").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("::1", 9090, "/")
        );
        assert_eq!(url.authority, "[::1]:9090");
        let url = ProbeUrl::parse("http://localhost/readyz?x=1").unwrap();
        assert_eq!((url.port, url.path.as_str()), (80, "/readyz?x=1"));
        for bad in [
            "",
            "127.0.0.1:8000/healthz",
            "https://127.0.0.1/",
            "http://",
            "http:///healthz",
            "http://u@host/",
            "http://host:port/",
            "http://host:0/",
            "http://host:99999/",
            "http://[::1/",
            "http://host/a b",
        ] {
            assert!(
                matches!(ProbeUrl::parse(bad), Err(ProbeError::BadUrl { .. })),
                "{bad:?}"
            );
        }
    }
}
