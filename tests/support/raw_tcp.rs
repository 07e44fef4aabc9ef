//! Raw bytes over TCP for tests that must send what no HTTP client would: the answer is read
//! as an [`Outcome`] (a status, or the connection closed without one).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// What came back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status; headers lower-cased.
    Status(u16, Vec<(String, String)>),
    /// The proxy closed the connection (or reset it) without a response.
    Closed,
}

impl Outcome {
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Status(s, _) => Some(*s),
            Outcome::Closed => None,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Outcome::Status(_, headers) => headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            Outcome::Closed => None,
        }
    }

    /// `"400"` or `"closed"`, for tables.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Status(s, _) => s.to_string(),
            Outcome::Closed => "closed".into(),
        }
    }
}

/// Connect to `addr`, from `source` (another loopback address, e.g. 127.0.0.3) when given.
pub fn connect(addr: SocketAddr, source: Option<IpAddr>) -> TcpStream {
    let stream: TcpStream = match source {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"),
        Some(ip) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .expect("socket");
            socket
                .bind(&SocketAddr::new(ip, 0).into())
                .expect("bind source address");
            socket
                .connect_timeout(&addr.into(), Duration::from_secs(5))
                .expect("connect from source address");
            socket.into()
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream
}

/// Send `bytes` on a new connection and read the answer.
pub fn send(addr: SocketAddr, bytes: &[u8]) -> Outcome {
    let mut stream = connect(addr, None);
    exchange(&mut stream, bytes)
}

/// Send `bytes` on `stream` and read one answer (or the close).
pub fn exchange(stream: &mut TcpStream, bytes: &[u8]) -> Outcome {
    if stream.write_all(bytes).is_err() {
        return read_outcome(stream);
    }
    read_outcome(stream)
}

/// Read one response head (and its body when it has a length), or the close.
pub fn read_outcome(stream: &mut TcpStream) -> Outcome {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = find(&raw, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP response: {head}"));
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            while raw.len() < end + 4 + length {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
            }
            return Outcome::Status(status, headers);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Outcome::Closed,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Outcome::Closed,
            Err(e) => panic!("no answer and no close within the read timeout: {e}"),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
