//! A request's head as the edge reads it, on either path: Pingora's parsed request header, or
//! the fast path's view over the bytes it received ([`crate::express`]), which builds no
//! header map at all.
//!
//! The edge's checks and decisions (request guard, session check, header rewrite, error pages,
//! access log) read a request only through this trait, so both paths run the same code.

use bytes::Bytes;
use http::{HeaderName, Method, Version};
use pingora_http::RequestHeader;

/// What the edge reads of a request's head.
pub trait RequestHead {
    fn method(&self) -> &Method;

    fn version(&self) -> Version;

    /// The target as received.
    fn raw_path(&self) -> &[u8];

    /// The target's path, without its query.
    fn path(&self) -> &str;

    /// The target's path and query (`/` when there is none).
    fn path_and_query(&self) -> &str;

    /// How many header lines there are.
    fn header_count(&self) -> usize;

    /// Every header line, `(name, value)`. Names are in lower case or as received.
    fn header_lines(&self) -> impl Iterator<Item = (&[u8], &[u8])>;

    /// The values of `name`, in the order received.
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]>;

    /// The first value of `name`.
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.values(name).next()
    }

    /// The first value of `name`, if it is text.
    fn first_str(&self, name: &HeaderName) -> Option<&str> {
        self.first(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of `name` as the one comma-separated list they are (RFC 9110 §5.3), if all
    /// of it is text. A list header such as `X-Forwarded-For` may arrive as several lines (a
    /// proxy that adds its own line instead of extending the last): reading only the first
    /// would believe whatever the client put there.
    fn list_str(&self, name: &HeaderName) -> Option<std::borrow::Cow<'_, str>> {
        let mut values = self.values(name);
        let first = std::str::from_utf8(values.next()?).ok()?;
        let Some(second) = values.next() else {
            return Some(std::borrow::Cow::Borrowed(first));
        };
        let mut joined = String::from(first);
        for value in std::iter::once(second).chain(values) {
            joined.push_str(", ");
            joined.push_str(std::str::from_utf8(value).ok()?);
        }
        Some(std::borrow::Cow::Owned(joined))
    }
}

impl RequestHead for RequestHeader {
    fn method(&self) -> &Method {
        &self.method
    }

    fn version(&self) -> Version {
        self.version
    }

    fn raw_path(&self) -> &[u8] {
        RequestHeader::raw_path(self)
    }

    fn path(&self) -> &str {
        self.uri.path()
    }

    fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", |pq| pq.as_str())
    }

    fn header_count(&self) -> usize {
        self.headers.len()
    }

    fn header_lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
    }

    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        crate::headers::values(&self.headers, name).map(|v| v.as_bytes())
    }
}

/// Header lines a [`ReceivedHead`] holds: a request with more is not one for the fast path.
pub const MAX_LINES: usize = 32;

/// The fast path's request: a view over the bytes received, with the places of its target and
/// of the header lines it forwards (the hop-by-hop ones left out). Nothing is copied or parsed
/// again; offsets fit in `u16` because a head the fast path takes is at most a few KiB.
#[derive(Debug, Clone)]
pub struct ReceivedHead {
    bytes: Bytes,
    method: Method,
    target: Span,
    /// Length of the target's path, before any `?`.
    path_len: u16,
    lines: [Line; MAX_LINES],
    count: u8,
}

/// A range of the received bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u16,
    len: u16,
}

impl Span {
    /// `part`, a slice of `bytes`, as a span; `None` if it lies beyond what offsets can say.
    fn of(bytes: &[u8], part: &[u8]) -> Option<Span> {
        let start = offset_in(bytes, part)?;
        Some(Span {
            start: u16::try_from(start).ok()?,
            len: u16::try_from(part.len()).ok()?,
        })
    }

    fn range(self) -> std::ops::Range<usize> {
        let start = usize::from(self.start);
        start..start + usize::from(self.len)
    }
}

/// Where `part`, a slice of `bytes`, starts in it; `None` if it is not a slice of `bytes`.
pub fn offset_in(bytes: &[u8], part: &[u8]) -> Option<usize> {
    let start = (part.as_ptr() as usize).checked_sub(bytes.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= bytes.len()).then_some(start)
}

/// A forwarded header line: where its name and its value are.
#[derive(Debug, Clone, Copy, Default)]
struct Line {
    name: Span,
    value: Span,
}

/// Why a head cannot be viewed by a [`ReceivedHead`] (Pingora serves it instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotViewable;

impl ReceivedHead {
    /// A view of a request in `bytes` whose target is `target` (a slice of `bytes`). The
    /// target must be origin-form, of the characters a URI may hold (RFC 3986: visible ASCII but
    /// `"<>\^`{|}`), without a fragment: anything else is left to Pingora, which refuses what it
    /// cannot parse (a worker must not get a target the proxy's other path refuses).
    pub fn new(bytes: Bytes, method: Method, target: &[u8]) -> Result<ReceivedHead, NotViewable> {
        let visible = target.iter().all(|b| {
            (0x21..=0x7e).contains(b)
                && !matches!(
                    b,
                    b'#' | b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
                )
        });
        if target.first() != Some(&b'/') || !visible {
            return Err(NotViewable);
        }
        let span = Span::of(&bytes, target).ok_or(NotViewable)?;
        let path_len = memchr::memchr(b'?', target).unwrap_or(target.len());
        Ok(ReceivedHead {
            bytes,
            method,
            target: span,
            path_len: u16::try_from(path_len).map_err(|_| NotViewable)?,
            lines: [Line::default(); MAX_LINES],
            count: 0,
        })
    }

    /// Add a header line; `name` and `value` are slices of the bytes given to [`Self::new`].
    pub fn push_line(&mut self, name: &[u8], value: &[u8]) -> Result<(), NotViewable> {
        let slot = self
            .lines
            .get_mut(usize::from(self.count))
            .ok_or(NotViewable)?;
        *slot = Line {
            name: Span::of(&self.bytes, name).ok_or(NotViewable)?,
            value: Span::of(&self.bytes, value).ok_or(NotViewable)?,
        };
        self.count += 1;
        Ok(())
    }

    fn part(&self, span: Span) -> &[u8] {
        self.bytes.get(span.range()).unwrap_or_default()
    }

    fn lines(&self) -> &[Line] {
        self.lines
            .get(..usize::from(self.count))
            .unwrap_or_default()
    }

    /// The header lines named `name` (any case), with their indexes.
    fn named<'s, 'n>(
        &'s self,
        name: &'n [u8],
    ) -> impl Iterator<Item = (usize, &'s Line)> + use<'s, 'n> {
        self.lines().iter().enumerate().filter(move |(_, line)| {
            usize::from(line.name.len) == name.len()
                && self.part(line.name).eq_ignore_ascii_case(name)
        })
    }

    /// The indexes of the header lines named `name` (any case).
    pub fn lines_named<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
        self.named(name).map(|(index, _)| index)
    }

    /// The lengths of the header lines' names.
    pub fn name_lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.lines().iter().map(|line| usize::from(line.name.len))
    }

    /// The bytes the head was received in.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where each header line is in [`Self::bytes`], from its name to the end of its value
    /// (its line break left out).
    pub fn line_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.lines()
            .iter()
            .map(|line| usize::from(line.name.start)..line.value.range().end)
    }

    /// The target as text: read three times per request, and checked once, in `new`.
    fn target_text(&self) -> &str {
        let target = self.part(self.target);
        debug_assert!(target.is_ascii());
        // SAFETY: `new` admitted the target only as visible ASCII, which is UTF-8, and neither
        // the bytes nor the target's span change after.
        unsafe { std::str::from_utf8_unchecked(target) }
    }
}

impl RequestHead for ReceivedHead {
    fn method(&self) -> &Method {
        &self.method
    }

    fn version(&self) -> Version {
        Version::HTTP_11
    }

    fn raw_path(&self) -> &[u8] {
        self.part(self.target)
    }

    fn path(&self) -> &str {
        let target = self.target_text();
        // `path_len` is at a `?` or the end: an ASCII boundary.
        target.get(..usize::from(self.path_len)).unwrap_or(target)
    }

    fn path_and_query(&self) -> &str {
        self.target_text()
    }

    fn header_count(&self) -> usize {
        usize::from(self.count)
    }

    fn header_lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines()
            .iter()
            .map(|line| (self.part(line.name), self.part(line.value)))
    }

    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        self.named(name.as_str().as_bytes())
            .map(|(_, line)| self.part(line.value))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::header::{ACCEPT, COOKIE, HOST};

    const RAW: &str = "GET /api/a%2Fb?q=1&r HTTP/1.1\r\nHost: a.test\r\nCOOKIE: a=1\r\n\
                       Accept:  text/html  \r\ncookie: b=2\r\nX-Empty:\r\n\r\n";

    fn view(raw: &str) -> ReceivedHead {
        let bytes = Bytes::copy_from_slice(raw.as_bytes());
        crate::express::request::parse(&bytes).unwrap().head
    }

    /// Pingora's parse of the same head.
    fn pingora(raw: &str) -> RequestHeader {
        let mut lines = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Request::new(&mut lines);
        parsed.parse(raw.as_bytes()).unwrap();
        let mut req = RequestHeader::build(
            parsed.method.unwrap(),
            parsed.path.unwrap().as_bytes(),
            None,
        )
        .unwrap();
        for line in parsed.headers.iter() {
            req.append_header(line.name.to_owned(), line.value).unwrap();
        }
        req
    }

    fn reads(head: &impl RequestHead) -> Vec<String> {
        let value = |v: Option<&[u8]>| v.map(|v| String::from_utf8(v.to_vec()).unwrap());
        let all = |name| {
            head.values(name)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
                .collect::<Vec<_>>()
                .join("|")
        };
        vec![
            head.method().to_string(),
            format!("{:?}", head.version()),
            String::from_utf8(head.raw_path().to_vec()).unwrap(),
            head.path().to_owned(),
            head.path_and_query().to_owned(),
            head.header_count().to_string(),
            all(&COOKIE),
            format!("{:?}", value(head.first(&HOST))),
            format!("{:?}", head.first_str(&ACCEPT)),
            format!("{:?}", head.first(&HeaderName::from_static("x-empty"))),
            format!("{:?}", head.first(&HeaderName::from_static("x-absent"))),
        ]
    }

    #[test]
    fn the_view_of_the_received_bytes_reads_as_pingoras_header() {
        let read = reads(&view(RAW));
        assert_eq!(read, reads(&pingora(RAW)));
        assert_eq!(read[3], "/api/a%2Fb");
        assert_eq!(read[4], "/api/a%2Fb?q=1&r");
        assert_eq!(read[6], "a=1|b=2", "values of a name in any case, in order");
        assert_eq!(
            read[8], "Some(\"text/html\")",
            "surrounding space is not the value"
        );
    }

    #[test]
    fn a_list_header_on_several_lines_reads_as_one_list_on_both_paths() {
        let xff = HeaderName::from_static("x-forwarded-for");
        let raw = "GET / HTTP/1.1\r\nX-Forwarded-For: 203.0.113.9\r\nHost: a\r\n\
                   x-forwarded-for: 198.51.100.1, 10.0.0.2\r\n\r\n";
        for list in [view(raw).list_str(&xff), pingora(raw).list_str(&xff)] {
            assert_eq!(list.as_deref(), Some("203.0.113.9, 198.51.100.1, 10.0.0.2"));
        }
        let one = view(RAW);
        assert_eq!(one.list_str(&COOKIE).as_deref(), Some("a=1, b=2"));
        assert!(matches!(
            one.list_str(&ACCEPT),
            Some(std::borrow::Cow::Borrowed("text/html"))
        ));
        assert_eq!(one.list_str(&xff), None);
    }

    #[test]
    fn header_lines_are_where_they_were_received() {
        let head = view(RAW);
        let lines: Vec<&[u8]> = head
            .line_ranges()
            .map(|r| head.bytes().get(r).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                b"Host: a.test".as_slice(),
                b"COOKIE: a=1",
                b"Accept:  text/html",
                b"cookie: b=2",
                b"X-Empty:",
            ]
        );
    }

    #[test]
    fn targets_the_view_does_not_read_are_left_to_pingora() {
        let bytes = Bytes::from_static(b"/a#frag /b\x7f /c /d e");
        for target in [&bytes[0..7], &bytes[8..11]] {
            assert_eq!(
                ReceivedHead::new(bytes.clone(), Method::GET, target).unwrap_err(),
                NotViewable
            );
        }
        assert!(ReceivedHead::new(bytes.clone(), Method::GET, &bytes[12..14]).is_ok());
        // Not a slice of the bytes.
        assert!(ReceivedHead::new(bytes.clone(), Method::GET, b"/x").is_err());
    }

    #[test]
    fn a_head_with_more_lines_than_the_view_holds_is_refused() {
        let target = Bytes::from_static(b"/");
        assert!(ReceivedHead::new(target.clone(), Method::GET, &target[..0]).is_err());
        let mut head = ReceivedHead::new(target.clone(), Method::GET, &target).unwrap();
        for _ in 0..MAX_LINES {
            head.push_line(&target[..0], &target[..1]).unwrap();
        }
        assert_eq!(head.push_line(&target[..0], &target[..1]), Err(NotViewable));
        assert_eq!(head.header_count(), MAX_LINES);
    }
}
