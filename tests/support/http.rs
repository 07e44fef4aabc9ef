//! HTTP clients for edge tests: [`CookieClient`], a browser-like client for one origin whose
//! cookie jar the test can read and rewrite (tamper, truncate, replay) and which never follows
//! redirects by itself; and [`raw_request`], which sends bytes exactly as written (request
//! targets like `/public/../api/me` that `reqwest`/`url` would normalise away, odd headers).
//!
//! ```ignore
//! let browser = CookieClient::new(&proxy.url("/"));
//! let reply = browser.get_html("/login?rd=/api/me").await;   // 302, Set-Cookie stored
//! let idp = reply.location().unwrap();                       // follow by hand
//! browser.set_cookie("custodia_session", "tampered");
//! let raw = raw_request(proxy.addr, "GET /%61pi/me HTTP/1.1", &[("Accept", "application/json")]);
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode, Url};

/// How long any single request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub const ACCEPT_HTML: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
pub const ACCEPT_JSON: &str = "application/json";

/// One `Set-Cookie` header, parsed.
#[derive(Debug, Clone)]
pub struct SetCookie {
    pub name: String,
    pub value: String,
    /// Attributes in order, names as sent (`("Max-Age", Some("0"))`, `("HttpOnly", None)`).
    pub attributes: Vec<(String, Option<String>)>,
    /// The header as received, for messages.
    pub raw: String,
}

impl SetCookie {
    pub fn parse(raw: &str) -> Option<SetCookie> {
        let mut parts = raw.split(';');
        let (name, value) = parts.next()?.split_once('=')?;
        let attributes = parts
            .map(|part| match part.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
                None => (part.trim().to_string(), None),
            })
            .filter(|(k, _)| !k.is_empty())
            .collect();
        Some(SetCookie {
            name: name.trim().to_string(),
            value: value.trim().trim_matches('"').to_string(),
            attributes,
            raw: raw.to_string(),
        })
    }

    /// The attribute's value (`Some(None)` for a flag like `HttpOnly`), case-insensitively.
    pub fn attribute(&self, name: &str) -> Option<Option<&str>> {
        self.attributes
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    pub fn has(&self, name: &str) -> bool {
        self.attribute(name).is_some()
    }

    /// True when this header deletes the cookie: `Max-Age` ≤ 0 or an `Expires` in the past
    /// (anything before 2000 counts, which is what servers send to delete).
    pub fn is_removal(&self) -> bool {
        if let Some(Some(max_age)) = self.attribute("Max-Age") {
            if max_age.parse::<i64>().is_ok_and(|age| age <= 0) {
                return true;
            }
        }
        if let Some(Some(expires)) = self.attribute("Expires") {
            return ["1970", "1980", "1990"]
                .iter()
                .any(|year| expires.contains(year));
        }
        false
    }

    fn path(&self) -> String {
        match self.attribute("Path") {
            Some(Some(path)) if path.starts_with('/') => path.to_string(),
            _ => "/".to_string(),
        }
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    /// The URL that was requested.
    pub url: Url,
}

impl Reply {
    /// The `Location` header as sent.
    pub fn location(&self) -> Option<String> {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// `Location` resolved against the request URL; panics when there is none.
    pub fn redirect_target(&self) -> Url {
        let location = self
            .location()
            .unwrap_or_else(|| panic!("{} answered {} without Location", self.url, self.status));
        self.url
            .join(&location)
            .unwrap_or_else(|e| panic!("bad Location {location:?}: {e}"))
    }

    pub fn set_cookies(&self) -> Vec<SetCookie> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(SetCookie::parse)
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: body is not JSON ({e}):\n{}",
                self.status, self.url, self.body
            )
        })
    }

    /// A one-line summary for assertion messages.
    pub fn describe(&self) -> String {
        let body: String = self.body.chars().take(300).collect();
        format!(
            "{} {} (Location: {:?}) body: {body}",
            self.status,
            self.url,
            self.location()
        )
    }
}

#[derive(Debug, Clone)]
struct StoredCookie {
    value: String,
    path: String,
}

/// A browser-like client for one origin (scheme, host and port).
///
/// - Redirects are never followed: every hop is the test's to make and inspect.
/// - Cookies from that origin's responses go into a jar the test can read and edit; they are
///   sent back on requests to the origin whose path is within the cookie's `Path`. Deletions
///   (`Max-Age=0`, past `Expires`) are honoured, positive lifetimes are **not**: an old cookie is
///   replayed as an attacker would, so expiry must be enforced by the server. `Secure` is not
///   enforced either: the tests speak plain http to a proxy whose public URL may be https.
/// - Requests to any other origin carry no cookies and store none.
/// - No connection reuse, so a server restarted on the same port is reached afresh.
pub struct CookieClient {
    pub origin: Url,
    http: reqwest::Client,
    jar: Mutex<BTreeMap<String, StoredCookie>>,
}

impl CookieClient {
    /// A client for the origin of `origin` (any path is ignored), with an empty jar.
    pub fn new(origin: &str) -> CookieClient {
        let origin = Url::parse(origin)
            .unwrap_or_else(|e| panic!("origin {origin}: {e}"))
            .join("/")
            .expect("origin root");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .expect("reqwest client");
        CookieClient {
            origin,
            http,
            jar: Mutex::new(BTreeMap::new()),
        }
    }

    /// `path_or_url` resolved against the origin (`/x`, or an absolute URL).
    pub fn url(&self, path_or_url: &str) -> Url {
        self.origin
            .join(path_or_url)
            .unwrap_or_else(|e| panic!("bad URL {path_or_url}: {e}"))
    }

    /// GET as a browser navigating (`Accept: text/html…`).
    pub async fn get_html(&self, path_or_url: &str) -> Reply {
        self.request(Method::GET, path_or_url, &[("accept", ACCEPT_HTML)])
            .await
    }

    /// GET as an API client (`Accept: application/json`).
    pub async fn get_json(&self, path_or_url: &str) -> Reply {
        self.request(Method::GET, path_or_url, &[("accept", ACCEPT_JSON)])
            .await
    }

    /// GET with extra headers (added after the jar's `Cookie`, so a test-given `Cookie` header
    /// is sent as a second one).
    pub async fn get_with(&self, path_or_url: &str, headers: &[(&str, &str)]) -> Reply {
        self.request(Method::GET, path_or_url, headers).await
    }

    pub async fn request(
        &self,
        method: Method,
        path_or_url: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let url = self.url(path_or_url);
        let same_origin = self.is_same_origin(&url);
        let mut request = self.http.request(method.clone(), url.clone());
        if same_origin {
            if let Some(cookie) = self.cookie_header_for(url.path()) {
                request = request.header(COOKIE, cookie);
            }
        }
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("accept"))
        {
            request = request.header(ACCEPT, "*/*");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status();
        let response_headers = response.headers().clone();
        let body = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"));
        let reply = Reply {
            status,
            headers: response_headers,
            body,
            url,
        };
        if same_origin {
            self.store(&reply);
        }
        reply
    }

    fn is_same_origin(&self, url: &Url) -> bool {
        url.scheme() == self.origin.scheme()
            && url.host_str() == self.origin.host_str()
            && url.port_or_known_default() == self.origin.port_or_known_default()
    }

    fn store(&self, reply: &Reply) {
        let mut jar = self.jar.lock().expect("jar");
        for cookie in reply.set_cookies() {
            if cookie.is_removal() {
                jar.remove(&cookie.name);
            } else {
                let path = cookie.path();
                jar.insert(
                    cookie.name,
                    StoredCookie {
                        value: cookie.value,
                        path,
                    },
                );
            }
        }
    }

    fn cookie_header_for(&self, request_path: &str) -> Option<String> {
        let jar = self.jar.lock().expect("jar");
        let pairs: Vec<String> = jar
            .iter()
            .filter(|(_, c)| path_matches(request_path, &c.path))
            .map(|(name, c)| format!("{name}={}", c.value))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    /// The `Cookie` header this client would send to `/`.
    pub fn cookie_header(&self) -> Option<String> {
        self.cookie_header_for("/")
    }

    pub fn cookie(&self, name: &str) -> Option<String> {
        self.jar
            .lock()
            .expect("jar")
            .get(name)
            .map(|c| c.value.clone())
    }

    /// Every cookie in the jar as (name, value).
    pub fn cookies(&self) -> Vec<(String, String)> {
        self.jar
            .lock()
            .expect("jar")
            .iter()
            .map(|(k, c)| (k.clone(), c.value.clone()))
            .collect()
    }

    pub fn cookie_names(&self) -> Vec<String> {
        self.jar.lock().expect("jar").keys().cloned().collect()
    }

    /// Sets (or overwrites) a cookie sent with every request to the origin (`Path=/`).
    pub fn set_cookie(&self, name: &str, value: &str) {
        self.jar.lock().expect("jar").insert(
            name.to_string(),
            StoredCookie {
                value: value.to_string(),
                path: "/".to_string(),
            },
        );
    }

    pub fn remove_cookie(&self, name: &str) {
        self.jar.lock().expect("jar").remove(name);
    }

    pub fn clear_cookies(&self) {
        self.jar.lock().expect("jar").clear();
    }

    /// Puts these (name, value) pairs in the jar (e.g. another client's [`CookieClient::cookies`]).
    pub fn import(&self, cookies: &[(String, String)]) {
        for (name, value) in cookies {
            self.set_cookie(name, value);
        }
    }
}

/// RFC 6265 §5.1.4 path-match.
fn path_matches(request_path: &str, cookie_path: &str) -> bool {
    request_path == cookie_path
        || (request_path.starts_with(cookie_path)
            && (cookie_path.ends_with('/')
                || request_path.as_bytes().get(cookie_path.len()) == Some(&b'/')))
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header (name lower-cased, value) pairs in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{}: body is not JSON ({e}):\n{}", self.status, self.body))
    }
}

/// Sends `request_line` (e.g. `GET /%61pi/me HTTP/1.1`) with `Host: addr`, then `headers` exactly
/// as given, to `addr`; adds `Connection: close` unless `headers` has a `Connection`. Reads the
/// answer to end of stream (de-chunking it if needed). Panics on I/O errors or after 15 s.
pub fn raw_request(addr: SocketAddr, request_line: &str, headers: &[(&str, &str)]) -> RawReply {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("timeout");
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .expect("timeout");
    let mut request = format!("{request_line}\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        request.push_str("Connection: close\r\n");
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    let mut raw = Vec::new();
    // Read until the response is complete (content-length / chunked / close).
    let mut buf = [0u8; 8192];
    loop {
        if let Some(done) = complete_response(&raw) {
            if done {
                break;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read from {addr} after {} bytes: {e}", raw.len()),
        }
    }
    parse_raw(&raw).unwrap_or_else(|| {
        panic!(
            "malformed response from {addr}:\n{}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// Some(true) when `raw` holds a whole response with a known length.
fn complete_response(raw: &[u8]) -> Option<bool> {
    let head_end = find(raw, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let body = &raw[head_end..];
    if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return Some(body.len() >= length);
    }
    if head.contains("transfer-encoding: chunked") {
        return Some(find(body, b"0\r\n\r\n").is_some());
    }
    if head.starts_with("http/1.1 204") || head.starts_with("http/1.1 304") {
        return Some(true);
    }
    Some(false)
}

fn parse_raw(raw: &[u8]) -> Option<RawReply> {
    let head_end = find(raw, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(RawReply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of query parameter `name` in `url` (decoded), if present.
pub fn query_param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `value` percent-encoded for a query string (`application/x-www-form-urlencoded`).
pub fn form_encode(value: &str) -> String {
    reqwest::Url::parse_with_params("http://x/", &[("v", value)])
        .expect("url")
        .query()
        .unwrap_or("")
        .trim_start_matches("v=")
        .to_string()
}
