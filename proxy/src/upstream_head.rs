//! The header edits a request gets on its way to a worker, and the two ways they are applied.
//!
//! The edge decides the edits once, for both paths ([`crate::edge::rewrite_upstream_request`]).
//! Pingora's path edits its request header in place. The fast path leaves the head as received
//! and keeps the edits beside it in an [`Overlay`], written straight onto the wire: an insert
//! into Pingora's header parses the name again and allocates, ~0.8k instructions each, seven
//! times per signed-in request, about a fifth of what the fast path itself does.

use bytes::BufMut;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_core::Result;
use pingora_http::RequestHeader;

/// A request head being edited for the worker.
///
/// Reads see the headers **as received**; an implementation may or may not show its own edits,
/// so every header is read before it is edited, never after.
pub trait UpstreamHead {
    /// The request's headers as received.
    fn headers(&self) -> &HeaderMap;
    /// Replace every value of `name` with `value`.
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
    /// Add a value of `name`, after those it has.
    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
    /// Drop every value of `name`.
    fn remove(&mut self, name: &HeaderName);
}

/// Pingora's path: the header is edited in place (its case map kept in step).
impl UpstreamHead for RequestHeader {
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        // As a string, so Pingora keeps the name as written (lower case) on the wire.
        self.insert_header(name.as_str().to_owned(), value)
    }

    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.append_header(name, value).map(|_| ())
    }

    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
}

/// The fast path's request: the head as received, the names of the received headers that are
/// not forwarded, and the headers the edge adds.
#[derive(Debug)]
pub struct Overlay<'a> {
    received: &'a RequestHeader,
    /// The lengths of the received names, and of the added ones, as [`length_bit`]s: a name
    /// whose length is not among them is not there, which spares comparing names for nearly
    /// every edit (the edge makes nine per signed-in request).
    received_lengths: u64,
    added_lengths: u64,
    removed: Vec<HeaderName>,
    added: Vec<(HeaderName, HeaderValue)>,
}

/// One bit for the length of `name` (longer names share the last).
fn length_bit(name: &HeaderName) -> u64 {
    1 << name.as_str().len().min(63)
}

impl<'a> Overlay<'a> {
    pub fn new(received: &'a RequestHeader) -> Overlay<'a> {
        Overlay {
            received,
            received_lengths: received.headers.keys().fold(0, |m, n| m | length_bit(n)),
            added_lengths: 0,
            removed: Vec::new(),
            // The forwarding headers, the request id and a signed-in user's three.
            added: Vec::with_capacity(8),
        }
    }

    /// The request as the worker gets it: request line, the received headers that are
    /// forwarded, the added ones, end of head. Names go in lower case (as HTTP/2 writes them;
    /// HTTP/1.1 names are case-insensitive).
    pub fn wire(&self) -> Vec<u8> {
        let req = self.received;
        let mut wire = Vec::with_capacity(head_len_hint(req, &self.added));
        wire.put_slice(req.method.as_str().as_bytes());
        wire.put_u8(b' ');
        wire.put_slice(req.raw_path());
        wire.put_slice(b" HTTP/1.1\r\n");
        let forwarded = req
            .headers
            .iter()
            .filter(|(name, _)| !self.removed.contains(name));
        for (name, value) in forwarded.chain(self.added.iter().map(|(n, v)| (n, v))) {
            wire.put_slice(name.as_str().as_bytes());
            wire.put_slice(b": ");
            wire.put_slice(value.as_bytes());
            wire.put_slice(b"\r\n");
        }
        wire.put_slice(b"\r\n");
        wire
    }
}

/// Room for the whole head, so the buffer is not grown while it is written.
fn head_len_hint(req: &RequestHeader, added: &[(HeaderName, HeaderValue)]) -> usize {
    let line = |n: &HeaderName, v: &HeaderValue| n.as_str().len() + v.len() + 4;
    let received: usize = req.headers.iter().map(|(n, v)| line(n, v)).sum();
    let added: usize = added.iter().map(|(n, v)| line(n, v)).sum();
    req.raw_path().len() + 32 + received + added
}

impl UpstreamHead for Overlay<'_> {
    fn headers(&self) -> &HeaderMap {
        &self.received.headers
    }

    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.remove(&name);
        self.append(name, value)
    }

    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.added_lengths |= length_bit(&name);
        self.added.push((name, value));
        Ok(())
    }

    fn remove(&mut self, name: &HeaderName) {
        let bit = length_bit(name);
        if self.added_lengths & bit != 0 {
            self.added.retain(|(added, _)| added != name);
        }
        // A head has a handful of names: comparing them costs less than hashing this one.
        let received =
            self.received_lengths & bit != 0 && self.received.headers.keys().any(|key| key == name);
        if received && !self.removed.contains(name) {
            self.removed.push(name.clone());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn received() -> RequestHeader {
        let mut req = RequestHeader::build_no_case("GET", b"/api/hello?x=1", None).unwrap();
        for (name, value) in [
            ("host", "a.test"),
            ("accept", "*/*"),
            ("x-forwarded-for", "203.0.113.7"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("x-remove-me", "1"),
        ] {
            req.append_header(name, value).unwrap();
        }
        req
    }

    /// The same edits, in the order the edge makes them.
    fn edit(head: &mut impl UpstreamHead) {
        let v = HeaderValue::from_static;
        let prior = head.headers().get("x-forwarded-for").cloned();
        head.remove(&HeaderName::from_static("x-remove-me"));
        head.remove(&HeaderName::from_static("x-not-there"));
        head.remove(&http::header::COOKIE);
        head.append(http::header::COOKIE, v("b=2")).unwrap();
        assert_eq!(
            prior.unwrap(),
            "203.0.113.7",
            "reads see the received header"
        );
        head.insert(
            HeaderName::from_static("x-forwarded-for"),
            v("203.0.113.7, 10.0.0.1"),
        )
        .unwrap();
        head.insert(HeaderName::from_static("x-real-ip"), v("10.0.0.1"))
            .unwrap();
        head.insert(HeaderName::from_static("x-real-ip"), v("10.0.0.2"))
            .unwrap();
        head.append(HeaderName::from_static("x-twice"), v("1"))
            .unwrap();
        head.append(HeaderName::from_static("x-twice"), v("2"))
            .unwrap();
    }

    /// Header lines, lower-cased and sorted (order between names is not meaningful; order
    /// within a name is, and sorting is stable for equal lines only, so compare as lists).
    fn lines(wire: &[u8]) -> (String, Vec<String>) {
        let text = String::from_utf8(wire.to_vec()).unwrap();
        assert!(text.ends_with("\r\n\r\n"), "{text:?}");
        let mut lines = text.trim_end().split("\r\n").map(str::to_owned);
        let request_line = lines.next().unwrap();
        let mut headers: Vec<String> = lines.map(|l| l.to_ascii_lowercase()).collect();
        headers.sort();
        (request_line, headers)
    }

    #[test]
    fn the_overlay_sends_what_pingoras_edited_header_sends() {
        let original = received();
        let mut in_place = original.clone();
        edit(&mut in_place);
        let mut pingora_wire = b"GET /api/hello?x=1 HTTP/1.1\r\n".to_vec();
        in_place.header_to_h1_wire(&mut pingora_wire);
        pingora_wire.extend_from_slice(b"\r\n");

        let mut overlay = Overlay::new(&original);
        edit(&mut overlay);
        let wire = overlay.wire();

        assert_eq!(lines(&wire), lines(&pingora_wire));
        let (request_line, headers) = lines(&wire);
        assert_eq!(request_line, "GET /api/hello?x=1 HTTP/1.1");
        assert_eq!(
            headers,
            [
                "accept: */*",
                "cookie: b=2",
                "host: a.test",
                "x-forwarded-for: 203.0.113.7, 10.0.0.1",
                "x-real-ip: 10.0.0.2",
                "x-twice: 1",
                "x-twice: 2",
            ]
        );
        let text = String::from_utf8(wire).unwrap();
        assert!(
            text.find("x-twice: 1").unwrap() < text.find("x-twice: 2").unwrap(),
            "appended values keep their order: {text}"
        );
    }

    #[test]
    fn an_unedited_overlay_forwards_the_head_as_received() {
        let original = received();
        let wire = Overlay::new(&original).wire();
        let mut expected = b"GET /api/hello?x=1 HTTP/1.1\r\n".to_vec();
        original.header_to_h1_wire(&mut expected);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(lines(&wire), lines(&expected));
    }
}
