//! Which requests the fast path takes (their head, as received, is what goes upstream, with the
//! edge's edits: [`crate::upstream_head::Overlay`]).
//!
//! It takes an HTTP/1.1 `GET` or `HEAD` whose whole head is in hand and that has nothing the
//! fast path would have to interpret: no body framing at all (`Content-Length`,
//! `Transfer-Encoding`), no `Upgrade`, no `Expect`, one `Host`, an origin-form target, and a
//! `Connection` header, if any, that says only `keep-alive` or `close`, a target of visible
//! ASCII and at most [`MAX_LINES`](crate::request_head::MAX_LINES) header lines to forward. Anything else is left to Pingora,
//! which parses the same bytes again. Hop-by-hop headers are not forwarded, as Pingora does not
//! forward them.
//!
//! What it takes is not copied into a header map: [`ReceivedHead`] notes where the target and
//! each forwarded line are in the bytes received.

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::Method;

use crate::request_head::{offset_in, ReceivedHead};

/// Header lines the fast path reads; a request with more goes to Pingora.
const MAX_HEADERS: usize = crate::request_guard::MAX_HEADERS;

/// A request the fast path takes.
#[derive(Debug)]
pub struct Plain {
    /// The request as received, without the hop-by-hop headers.
    pub head: ReceivedHead,
    /// Length of the head in the bytes parsed; what follows belongs to the next request.
    pub head_len: usize,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// Why a request is not taken (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotPlain {
    /// The head is not complete in these bytes.
    Partial,
    /// Not for the fast path: Pingora's.
    Other,
}

/// Look at a request head (and whatever follows it) in `bytes`.
pub fn parse(bytes: &Bytes) -> Result<Plain, NotPlain> {
    // Left uninitialised: the parser writes the lines it finds (3 KiB not cleared per request).
    let mut lines = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let head_len = match parsed.parse_with_uninit_headers(bytes, &mut lines) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(NotPlain::Partial),
        Err(_) => return Err(NotPlain::Other),
    };
    let method = match parsed.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Err(NotPlain::Other),
    };
    let (Some(1), Some(path)) = (parsed.version, parsed.path) else {
        return Err(NotPlain::Other);
    };
    if !crlf_only(bytes, &parsed, head_len) {
        return Err(NotPlain::Other);
    }
    // The head stays the bytes received: the view notes where its parts are, and httparse
    // admitted only bytes a header value may hold (`value_bytes_httparse_admits_are_valid`).
    let mut head =
        ReceivedHead::new(bytes.clone(), method, path.as_bytes()).map_err(|_| NotPlain::Other)?;
    let mut close = false;
    let mut hosts = 0;
    for line in parsed.headers.iter() {
        let name = line.name.as_bytes();
        match classify(name) {
            Kind::Forward => {}
            Kind::Host => hosts += 1,
            Kind::HopByHop => continue,
            Kind::Connection => {
                match connection_tokens(line.value) {
                    Some(says_close) => close |= says_close,
                    None => return Err(NotPlain::Other),
                }
                continue;
            }
            Kind::NotPlain => return Err(NotPlain::Other),
        }
        head.push_line(name, line.value)
            .map_err(|_| NotPlain::Other)?;
    }
    if hosts != 1 {
        return Err(NotPlain::Other);
    }
    Ok(Plain {
        head,
        head_len,
        close,
    })
}

/// Whether every line of the head ends in CRLF. A bare LF, which the request guard refuses, is
/// left to Pingora, whose guard answers it. httparse admits no CR or LF inside a line and
/// leaves the space after a value out of it, so each line ends right after its last part.
fn crlf_only(bytes: &[u8], parsed: &httparse::Request<'_, '_>, head_len: usize) -> bool {
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return false;
    };
    let crlf_at = |at: usize| bytes.get(at..at + 2) == Some(b"\r\n".as_slice());
    // No empty lines before the request line (httparse skips them).
    if offset_in(bytes, method.as_bytes()) != Some(0) {
        return false;
    }
    let Some(path_end) = offset_in(bytes, path.as_bytes()).map(|at| at + path.len()) else {
        return false;
    };
    if bytes.get(path_end..path_end + 9) != Some(b" HTTP/1.1".as_slice()) || !crlf_at(path_end + 9)
    {
        return false;
    }
    for line in parsed.headers.iter() {
        let Some(mut end) = offset_in(bytes, line.value).map(|at| at + line.value.len()) else {
            return false;
        };
        while matches!(bytes.get(end), Some(b' ' | b'\t')) {
            end += 1;
        }
        if !crlf_at(end) {
            return false;
        }
    }
    head_len >= 2 && crlf_at(head_len - 2)
}

enum Kind {
    Forward,
    Host,
    /// Dropped, as Pingora drops it.
    HopByHop,
    Connection,
    /// Something only Pingora's full HTTP machinery handles.
    NotPlain,
}

fn classify(name: &[u8]) -> Kind {
    // Only names of these lengths are special: most headers are decided by their length.
    match name.len() {
        2 | 4 | 6 | 7 | 10 | 14 | 16 | 17 | 19 | 22 => {}
        _ => return Kind::Forward,
    }
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    if is("host") {
        Kind::Host
    } else if is("connection") {
        Kind::Connection
    } else if is("content-length") || is("transfer-encoding") || is("upgrade") || is("expect") {
        Kind::NotPlain
    } else if is("keep-alive")
        || is("proxy-connection")
        || is("proxy-authenticate")
        || is("proxy-authorization")
        || is("te")
        || is("trailer")
        || is("http2-settings")
    {
        Kind::HopByHop
    } else {
        Kind::Forward
    }
}

/// `Some(close?)` for a `Connection` value of only `keep-alive` / `close` tokens; `None` when
/// it names other headers (which Pingora removes) or is not text.
fn connection_tokens(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in value.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
            return None;
        }
    }
    Some(close)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_head::RequestHead;
    use crate::upstream_head::Overlay;
    use http::HeaderValue;

    fn plain(raw: &str) -> Plain {
        parse(&Bytes::copy_from_slice(raw.as_bytes())).unwrap_or_else(|e| panic!("{e:?}: {raw:?}"))
    }

    fn is_other(raw: &str) -> bool {
        parse(&Bytes::copy_from_slice(raw.as_bytes())).is_err()
    }

    #[test]
    fn takes_a_plain_get_and_forwards_its_headers_without_the_hop_by_hop_ones() {
        let raw = "GET /api/hello?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\
                   Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
                   Proxy-Authorization: Basic x\r\n\r\nGET /next";
        let p = plain(raw);
        assert_eq!(p.head_len, raw.len() - "GET /next".len());
        assert!(!p.close);
        let wire = String::from_utf8(Overlay::new(&p.head).wire()).unwrap();
        assert!(
            wire.starts_with("GET /api/hello?x=1 HTTP/1.1\r\n"),
            "{wire}"
        );
        let lower = wire.to_ascii_lowercase();
        assert!(
            lower.contains("\r\nhost: a\r\n") && lower.contains("\r\naccept: */*\r\n"),
            "{wire:?}"
        );
        for gone in ["connection", "keep-alive", "te:", "proxy-authorization"] {
            assert!(
                !wire.to_ascii_lowercase().contains(gone),
                "{gone} in {wire}"
            );
        }
        assert!(wire.ends_with("\r\n\r\n"));
    }

    #[test]
    fn value_bytes_httparse_admits_are_valid() {
        // In a short value and in the middle of a long one: httparse checks long runs with
        // SIMD and short ones a byte at a time.
        for pad in [1, 40] {
            let filler = vec![b'a'; pad];
            let mut admitted = 0;
            for byte in 0..=u8::MAX {
                let head = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".as_slice();
                let raw = [head, &filler, &[byte], &filler, b"\r\n\r\n"].concat();
                let mut lines = [httparse::EMPTY_HEADER; 4];
                let mut req = httparse::Request::new(&mut lines);
                if let Ok(httparse::Status::Complete(_)) = req.parse(&raw) {
                    let value = req.headers[1].value;
                    assert!(
                        HeaderValue::from_bytes(value).is_ok(),
                        "httparse admits byte {byte:#x} that a header value may not hold"
                    );
                    admitted += 1;
                }
            }
            // Visible ASCII at least, or the check above checked nothing.
            assert!(admitted >= 95, "{admitted} bytes admitted");
        }
    }

    #[test]
    fn takes_crlf_heads_with_space_after_values_and_empty_values() {
        let raw = "GET /a?b HTTP/1.1\r\nHost: a  \r\nX-Empty:\r\nX-Blank: \t\r\nAccept:*/*\r\n\r\n";
        let p = plain(raw);
        assert_eq!(p.head_len, raw.len());
        assert_eq!(p.head.header_count(), 4);
    }

    #[test]
    fn notes_a_client_that_asks_to_close() {
        assert!(plain("HEAD / HTTP/1.1\r\nhost: a\r\nconnection: Close\r\n\r\n").close);
    }

    #[test]
    fn leaves_everything_else_to_pingora() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-forwarded-for\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            // Bare LFs, which the request guard refuses: in each line, and before the head.
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\nHost: a  \n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\nAccept: */*\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\n",
            "\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(is_other(raw), "{raw:?}");
        }
        let partial = Bytes::from_static(b"GET / HTTP/1.1\r\nHost: a\r\n");
        assert_eq!(parse(&partial).unwrap_err(), NotPlain::Partial);
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "x: y\r\n".repeat(MAX_HEADERS)
        );
        assert!(is_other(&many));
    }
}
