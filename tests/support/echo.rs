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
    fn start(handle: fn(TcpStream)) -> Acceptor {
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
