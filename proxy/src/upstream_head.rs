//! The header edits a request gets on its way to a worker, and the two ways they are applied.
//!
//! The edge decides the edits once, for both paths ([`crate::edge::rewrite_upstream_request`]).
//! Pingora's path edits its request header in place. The fast path leaves the head as received
//! ([`ReceivedHead`], a view over the bytes) and keeps the edits beside it in an [`Overlay`],
//! written onto the wire with the received lines it forwards, copied as they came: an insert
//! into Pingora's header parses the name again and allocates, ~0.8k instructions each, seven
//! times per signed-in request, about a fifth of what the fast path itself does.

use bytes::BufMut;
use http::{HeaderName, HeaderValue};
use pingora_core::Result;
use pingora_http::RequestHeader;

use crate::request_head::{ReceivedHead, RequestHead, MAX_LINES};

/// A request head being edited for the worker.
///
/// Reads see the headers **as received**; an implementation may or may not show its own edits,
/// so every header is read before it is edited, never after.
pub trait UpstreamHead {
    /// The request as received.
    type Received: RequestHead;
    fn received(&self) -> &Self::Received;
    /// Replace every value of `name` with `value`.
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
    /// Add a value of `name`, after those it has.
    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
    /// Drop every value of `name`.
    fn remove(&mut self, name: &HeaderName);
}

/// Pingora's path: the header is edited in place (its case map kept in step).
impl UpstreamHead for RequestHeader {
    type Received = RequestHeader;

    fn received(&self) -> &RequestHeader {
        self
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

/// The fast path's request: the head as received, which of its lines are not forwarded, and
/// the headers the edge adds.
#[derive(Debug)]
pub struct Overlay<'a> {
    received: &'a ReceivedHead,
    /// The lengths of the received names, and of the added ones, as [`length_bit`]s: a name
    /// whose length is not among them is not there, which spares comparing names for nearly
    /// every edit (the edge makes nine per signed-in request).
    received_lengths: u64,
    added_lengths: u64,
    /// One bit per received line (its index) that is not forwarded.
    removed: u32,
    added: Vec<(HeaderName, HeaderValue)>,
}

// Every received line has its bit in `Overlay::removed`.
const _: () = assert!(MAX_LINES <= u32::BITS as usize);

/// One bit for a name of `len` bytes (longer names share the last).
fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl<'a> Overlay<'a> {
    pub fn new(received: &'a ReceivedHead) -> Overlay<'a> {
        Overlay {
            received,
            received_lengths: received
                .name_lengths()
                .fold(0, |m, len| m | length_bit(len)),
            added_lengths: 0,
            removed: 0,
            // The forwarding headers, the request id and a signed-in user's three.
            added: Vec::with_capacity(8),
        }
    }

    /// The request as the worker gets it: request line, the received header lines that are
    /// forwarded, as received, then the added ones (names in lower case, as HTTP/2 writes
    /// them; HTTP/1.1 names are case-insensitive), end of head. Received lines that follow
    /// each other go on the wire in one copy.
    pub fn wire(&self) -> Vec<u8> {
        let req = self.received;
        let bytes = req.bytes();
        let mut wire = Vec::with_capacity(self.len_hint());
        wire.put_slice(req.method().as_str().as_bytes());
        wire.put_u8(b' ');
        wire.put_slice(req.raw_path());
        wire.put_slice(b" HTTP/1.1\r\n");
        let mut run: Option<std::ops::Range<usize>> = None;
        let put_run = |wire: &mut Vec<u8>, run: std::ops::Range<usize>| {
            wire.put_slice(bytes.get(run).unwrap_or_default());
            wire.put_slice(b"\r\n");
        };
        for (i, line) in req.line_ranges().enumerate() {
            if self.removed & (1 << i) != 0 {
                continue;
            }
            run = match run {
                Some(r)
                    if r.end + 2 == line.start
                        && bytes.get(r.end..line.start) == Some(b"\r\n".as_slice()) =>
                {
                    Some(r.start..line.end)
                }
                Some(r) => {
                    put_run(&mut wire, r);
                    Some(line)
                }
                None => Some(line),
            };
        }
        if let Some(r) = run {
            put_run(&mut wire, r);
        }
        for (name, value) in &self.added {
            wire.put_slice(name.as_str().as_bytes());
            wire.put_slice(b": ");
            wire.put_slice(value.as_bytes());
            wire.put_slice(b"\r\n");
        }
        wire.put_slice(b"\r\n");
        wire
    }

    /// Room for the whole head, so the buffer is not grown while it is written.
    fn len_hint(&self) -> usize {
        let received: usize = self.received.line_ranges().map(|r| r.len() + 2).sum();
        let added: usize = self
            .added
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        self.received.raw_path().len() + 32 + received + added
    }
}

impl UpstreamHead for Overlay<'_> {
    type Received = ReceivedHead;

    fn received(&self) -> &ReceivedHead {
        self.received
    }

    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.remove(&name);
        self.append(name, value)
    }

    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.added_lengths |= length_bit(name.as_str().len());
        self.added.push((name, value));
        Ok(())
    }

    fn remove(&mut self, name: &HeaderName) {
        let wanted = name.as_str().as_bytes();
        let bit = length_bit(wanted.len());
        if self.added_lengths & bit != 0 {
            self.added.retain(|(added, _)| added != name);
        }
        // A head has a handful of names: comparing them costs less than hashing this one.
        if self.received_lengths & bit != 0 {
            for index in self.received.lines_named(wanted) {
                self.removed |= 1 << index;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const RECEIVED: &str = "GET /api/hello?x=1 HTTP/1.1\r\nhost: a.test\r\naccept: */*\r\n\
        x-forwarded-for: 203.0.113.7\r\ncookie: a=1\r\ncookie: b=2\r\nx-remove-me: 1\r\n\r\n";

    fn view(raw: &'static str) -> ReceivedHead {
        crate::express::request::parse(&Bytes::from_static(raw.as_bytes()))
            .unwrap()
            .head
    }

    /// The same request as Pingora's parsed header.
    fn pingora(raw: &str) -> RequestHeader {
        let mut lines = raw.trim_end().split("\r\n");
        let mut request_line = lines.next().unwrap().split(' ');
        let (method, target) = (request_line.next().unwrap(), request_line.next().unwrap());
        let mut req = RequestHeader::build_no_case(method, target.as_bytes(), None).unwrap();
        for line in lines {
            let (name, value) = line.split_once(':').unwrap();
            req.append_header(name.to_owned(), value.trim()).unwrap();
        }
        req
    }

    /// The same edits, in the order the edge makes them.
    fn edit(head: &mut impl UpstreamHead) {
        let v = HeaderValue::from_static;
        let prior = head
            .received()
            .first_str(&HeaderName::from_static("x-forwarded-for"))
            .map(str::to_owned);
        head.remove(&HeaderName::from_static("x-remove-me"));
        head.remove(&HeaderName::from_static("x-not-there"));
        head.remove(&http::header::COOKIE);
        head.append(http::header::COOKIE, v("b=2")).unwrap();
        assert_eq!(
            prior.as_deref(),
            Some("203.0.113.7"),
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

    fn pingora_wire(req: &RequestHeader) -> Vec<u8> {
        let mut wire = b"GET /api/hello?x=1 HTTP/1.1\r\n".to_vec();
        req.header_to_h1_wire(&mut wire);
        wire.extend_from_slice(b"\r\n");
        wire
    }

    #[test]
    fn the_overlay_sends_what_pingoras_edited_header_sends() {
        let mut in_place = pingora(RECEIVED);
        edit(&mut in_place);

        let received = view(RECEIVED);
        let mut overlay = Overlay::new(&received);
        edit(&mut overlay);
        let wire = overlay.wire();

        assert_eq!(lines(&wire), lines(&pingora_wire(&in_place)));
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
        let wire = Overlay::new(&view(RECEIVED)).wire();
        assert_eq!(wire, RECEIVED.as_bytes());
        assert_eq!(lines(&wire), lines(&pingora_wire(&pingora(RECEIVED))));
    }

    #[test]
    fn received_lines_keep_their_spelling_and_lose_trailing_space() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nX-Remove-Me:  1\r\nAccept:\t*/*  \r\n\
                   X-Last: 2\r\n\r\n";
        let received = view(raw);
        let mut overlay = Overlay::new(&received);
        overlay.remove(&HeaderName::from_static("x-remove-me"));
        overlay.remove(&HeaderName::from_static("x-last-"));
        let wire = String::from_utf8(overlay.wire()).unwrap();
        assert_eq!(
            wire,
            "GET / HTTP/1.1\r\nHost: a\r\nAccept:\t*/*\r\nX-Last: 2\r\n\r\n"
        );
    }
}
