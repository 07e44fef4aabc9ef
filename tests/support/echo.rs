//! In-process fake upstreams on 127.0.0.1: an echo server that answers with what it received,
//! and a server that hangs up on every connection. Threads stop when the guard drops.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Acceptor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Acceptor {
    /// Accept on a fresh loopback port, each connection on its own thread running `handle`.
    fn start<F>(handle: F) -> Acceptor
    where
        F: Fn(TcpStream) + Clone + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                        let handle = handle.clone();
                        std::thread::spawn(move || handle(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Acceptor { addr, stop }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers every request with `{"method", "path", "headers": {name: value}}` (HTTP/1.1,
/// keep-alive; request bodies are not expected).
pub struct EchoServer {
    pub addr: SocketAddr,
    _acceptor: Acceptor,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let acceptor = Acceptor::start(echo_connection);
        EchoServer {
            addr: acceptor.addr,
            _acceptor: acceptor,
        }
    }
}

/// The request line and headers (lower-cased names) of the next request, or None at EOF.
fn read_head(reader: &mut BufReader<TcpStream>) -> Option<(String, Vec<(String, String)>)> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Some((request_line, headers));
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
}

fn echo_connection(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    while let Some((request_line, received)) = read_head(&mut reader) {
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = serde_json::Map::new();
        for (name, value) in received {
            match headers.get_mut(&name) {
                Some(serde_json::Value::String(prior)) => {
                    prior.push_str(", ");
                    prior.push_str(&value);
                }
                _ => {
                    headers.insert(name, serde_json::Value::String(value));
                }
            }
        }
        let body =
            serde_json::json!({"method": method, "path": path, "headers": headers}).to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            body.len(),
            body
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Passes health checks (`GET /healthz`) but hangs up on every other request without an
/// answer: an upstream error on every proxied request.
pub struct HangUpServer {
    pub addr: SocketAddr,
    _acceptor: Acceptor,
}

impl HangUpServer {
    pub fn start() -> HangUpServer {
        let acceptor = Acceptor::start(hang_up_connection);
        HangUpServer {
            addr: acceptor.addr,
            _acceptor: acceptor,
        }
    }
}

fn hang_up_connection(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    while let Some((request_line, _)) = read_head(&mut reader) {
        if !request_line.starts_with("GET /healthz ") {
            return; // dropping the stream closes it with no response
        }
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if writer.write_all(ok.as_bytes()).is_err() {
            return;
        }
    }
}

/// Answers the first request of each connection with `200 one`, keeping the connection open,
/// and closes it without an answer when a second request comes on it: a pooled connection the
/// worker dropped just as the proxy sent on it. Health checks get `200 ok`.
#[allow(dead_code)]
pub struct OneRequestServer {
    pub addr: SocketAddr,
    _acceptor: Acceptor,
}

#[allow(dead_code)]
impl OneRequestServer {
    pub fn start() -> OneRequestServer {
        let acceptor = Acceptor::start(one_request_connection);
        OneRequestServer {
            addr: acceptor.addr,
            _acceptor: acceptor,
        }
    }
}

fn one_request_connection(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut answered = false;
    while let Some((request_line, _)) = read_head(&mut reader) {
        let ok = if request_line.starts_with("GET /healthz ") {
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        } else if answered {
            return; // dropping the stream closes it with no response
        } else {
            answered = true;
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none"
        };
        if writer.write_all(ok.as_bytes()).is_err() {
            return;
        }
    }
}

/// Records the raw bytes of every request that reaches it (except health checks) and answers
/// each with `200 ok`: tests see exactly what the proxy forwarded. Request bodies are read by
/// `Content-Length` or chunked framing, as a worker would.
pub struct RecordingServer {
    pub addr: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    _acceptor: Acceptor,
}

impl RecordingServer {
    pub fn start() -> RecordingServer {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        let acceptor = Acceptor::start(move |stream| record_connection(stream, &log));
        RecordingServer {
            addr: acceptor.addr,
            received,
            _acceptor: acceptor,
        }
    }

    /// Every request received so far (head and body, as bytes on the wire).
    pub fn requests(&self) -> Vec<Vec<u8>> {
        self.received.lock().expect("lock").clone()
    }
}

fn record_connection(stream: TcpStream, log: &std::sync::Mutex<Vec<Vec<u8>>>) {
    use std::io::Read;
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    loop {
        let mut raw = Vec::new();
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                return;
            }
            raw.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line).to_ascii_lowercase();
            if let Some(v) = text.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if text.starts_with("transfer-encoding:") && text.contains("chunked") {
                chunked = true;
            }
            if line == b"\r\n" || line == b"\n" {
                break;
            }
        }
        if chunked {
            loop {
                // A body cut short is not a request the worker would act on: not recorded.
                let mut size_line = Vec::new();
                if reader.read_until(b'\n', &mut size_line).unwrap_or(0) == 0 {
                    return;
                }
                raw.extend_from_slice(&size_line);
                let text = String::from_utf8_lossy(&size_line);
                let hex = text.trim().split(';').next().unwrap_or("");
                let Ok(size) = usize::from_str_radix(hex, 16) else {
                    return;
                };
                let mut data = vec![0; size + 2];
                if reader.read_exact(&mut data).is_err() {
                    return;
                }
                raw.extend_from_slice(&data);
                if size == 0 {
                    break;
                }
            }
        } else if length > 0 {
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            raw.extend_from_slice(&body);
        }
        if !raw.starts_with(b"GET /healthz ") {
            log.lock().expect("lock").push(raw);
        }
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if writer.write_all(ok.as_bytes()).is_err() {
            return;
        }
    }
}

/// Answers each request with what `answer` returns for its request line: the raw response
/// bytes, and whether to close the connection after them (after a pause, so the close comes
/// while the proxy holds the connection idle). Health checks get `200 ok`. For framings and
/// connection behaviour no ordinary worker shows. [`PAUSE`] in the bytes splits them into two
/// writes 50 ms apart.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    _acceptor: Acceptor,
}

impl ScriptedServer {
    pub fn start<F>(answer: F) -> ScriptedServer
    where
        F: Fn(&str) -> (Vec<u8>, bool) + Clone + Send + Sync + 'static,
    {
        let acceptor = Acceptor::start(move |stream| scripted_connection(stream, &answer));
        ScriptedServer {
            addr: acceptor.addr,
            _acceptor: acceptor,
        }
    }
}

/// In a [`ScriptedServer`]'s answer: send what comes before, wait 50 ms, send the rest.
#[allow(dead_code)]
pub const PAUSE: &[u8] = b"\0custodia-test-pause\0";

fn memchr_pause(bytes: &[u8]) -> Option<usize> {
    bytes.windows(PAUSE.len()).position(|w| w == PAUSE)
}

fn scripted_connection(stream: TcpStream, answer: &dyn Fn(&str) -> (Vec<u8>, bool)) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    while let Some((request_line, _)) = read_head(&mut reader) {
        let (bytes, close) = if request_line.starts_with("GET /healthz ") {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                false,
            )
        } else {
            answer(&request_line)
        };
        let mut rest: &[u8] = &bytes;
        loop {
            let (now, later) = match memchr_pause(rest) {
                Some(at) => (&rest[..at], Some(&rest[at + PAUSE.len()..])),
                None => (rest, None),
            };
            if writer.write_all(now).is_err() {
                return;
            }
            match later {
                Some(later) => {
                    std::thread::sleep(Duration::from_millis(50));
                    rest = later;
                }
                None => break,
            }
        }
        if close {
            std::thread::sleep(Duration::from_millis(50));
            return;
        }
    }
}
