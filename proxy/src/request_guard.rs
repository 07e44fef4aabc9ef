//! Checks of a request head before anything acts on it: the request must be framed one way
//! only and its target, Host and header sizes must be plain, or it is refused with a 4xx and
//! nothing is forwarded. Called once per request from the edge's `early_request_filter`.
//!
//! What Pingora 0.9.1 refuses itself (400, before this runs): unparseable heads, more than
//! 256 header lines or 1 MiB of head, differing duplicate `Content-Length`s, a final
//! `Transfer-Encoding` other than chunked, `Transfer-Encoding` in HTTP/1.0, two `Host`s, an
//! absolute-form target whose authority differs from `Host`, userinfo in the target, a
//! `Connection` header naming `Host` or `X-Forwarded-For/-Host/-Proto`; and CONNECT (405).
//! Before the request goes upstream it also removes hop-by-hop headers and those `Connection`
//! names, and percent-escapes control bytes in the target (`/a\x01b` → `/a%01b`). What it lets
//! through and this module refuses:
//!
//! | what | answer |
//! |---|---|
//! | `Content-Length` together with `Transfer-Encoding` (Pingora drops the length) | 400 |
//! | `Content-Length` other than one number sent once (`5, 5`, two equal lines) | 400 |
//! | `Transfer-Encoding` other than exactly `chunked` (`gzip, chunked`, two headers) | 400 |
//! | a head with bare LF line ends (httparse accepts them) | 400 |
//! | HTTP/0.9, missing or malformed `Host` | 400 |
//! | absolute-form / authority-form targets, bytes outside visible ASCII in the target | 400 |
//! | control characters in the path, also percent-encoded (`%00`–`%1F`, `%7F`) | 400 |
//! | a target longer than [`MAX_TARGET`] | 414 |
//! | more than [`MAX_HEADERS`] headers, a header line over [`MAX_HEADER_LINE`] (a `Cookie`
//!   line over [`MAX_COOKIE_LINE`]), more than [`MAX_HEAD`] of headers | 431 |
//! | a declared `Content-Length` over the route's `max_body_size` | 413 |
//!
//! A well-formed request costs one pass over its headers and, on Pingora's path, one over the
//! raw head bytes (looking for bare LF; the fast path takes only heads without one); nothing is
//! allocated.

use http::Version;
use pingora_core::{Error, ErrorType};

use crate::auth::cookies::MAX_SESSION_VALUE_LEN;
use crate::config::LimitSettings;
use crate::metrics;
use crate::request_head::RequestHead;

/// Longest request target (path and query), like nginx's default 8k header buffer.
pub const MAX_TARGET: usize = 8 * 1024;
/// Longest single header line (name + value) other than `Cookie`.
pub const MAX_HEADER_LINE: usize = 8 * 1024;
/// Longest `Cookie` line: browsers send every cookie in one, and a large session comes in
/// chunks of up to [`MAX_SESSION_VALUE_LEN`] in all; 8 KiB more for the site's own cookies.
pub const MAX_COOKIE_LINE: usize = MAX_SESSION_VALUE_LEN + 8 * 1024;
/// All header names and values together.
pub const MAX_HEAD: usize = 32 * 1024;
/// Number of header lines.
pub const MAX_HEADERS: usize = 100;

/// What the body of an accepted request may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPlan {
    /// A body follows the head (chunked, or a non-zero `Content-Length`).
    pub has_body: bool,
    /// Largest body allowed on this route, in bytes.
    pub limit: u64,
}

/// Check the head of a request; `raw_head` is the head as received (HTTP/1), for framing
/// checks the parsed form no longer shows. `path` is the normalised path when the caller has
/// one (route body limits), else the raw path is used.
pub fn check(
    req: &impl RequestHead,
    raw_head: Option<&[u8]>,
    limits: &LimitSettings,
) -> Result<BodyPlan, Box<Error>> {
    if req.version() == Version::HTTP_09 {
        return refuse(400, Reason::Malformed, "HTTP/0.9 is not supported");
    }
    check_target(req)?;
    let seen = check_headers(req)?;
    let chunked = check_framing(&seen, raw_head)?;
    let declared = match seen.content_length {
        // Digits only (`check_framing`); too many of them is over any limit.
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX),
        None => 0,
    };
    let limit = if limits.route_body_sizes.is_empty() {
        limits.max_body_size
    } else {
        body_limit_for_target(req.path(), limits)
    };
    if declared > limit {
        return refuse(
            413,
            Reason::BodyTooLarge,
            "declared request body larger than max_body_size",
        );
    }
    Ok(BodyPlan {
        has_body: chunked || declared > 0,
        limit,
    })
}

/// The smaller of the limits of the raw and the normalised path, so no spelling of a path
/// escapes its route's limit.
fn body_limit_for_target(raw_path: &str, limits: &LimitSettings) -> u64 {
    let raw = limits.max_body_size_for(raw_path);
    match crate::auth::normalise_path(raw_path) {
        Ok(normalised) => raw.min(limits.max_body_size_for(&normalised)),
        Err(_) => raw,
    }
}

/// Bytes counted in a streamed (chunked) body above the plan's limit: 413.
pub fn body_too_large() -> Box<Error> {
    metrics::rejections().body_too_large.inc();
    Error::explain(
        ErrorType::HTTPStatus(413),
        "request body larger than max_body_size",
    )
}

fn check_target(req: &impl RequestHead) -> Result<(), Box<Error>> {
    let target = req.raw_path();
    if target.len() > MAX_TARGET {
        return refuse(414, Reason::TooLarge, "request target too long");
    }
    let origin_form = target.first() == Some(&b'/');
    let asterisk = target == b"*" && *req.method() == http::Method::OPTIONS;
    if !(origin_form || asterisk) {
        return refuse(
            400,
            Reason::Malformed,
            "only origin-form request targets are accepted",
        );
    }
    // Visible ASCII is UTF-8 too, as the rest of the proxy reads the path.
    if !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return refuse(
            400,
            Reason::Malformed,
            "request target with bytes outside visible ASCII",
        );
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or(target);
    if has_encoded_control(path) {
        return refuse(
            400,
            Reason::Malformed,
            "control character in the request path",
        );
    }
    Ok(())
}

/// `%00`–`%1F` or `%7F` (any case): what Pingora's escaping of raw control bytes also yields.
fn has_encoded_control(path: &[u8]) -> bool {
    path.windows(3).any(|w| {
        w[0] == b'%'
            && ((matches!(w[1], b'0' | b'1') && w[2].is_ascii_hexdigit())
                || (w[1] == b'7' && matches!(w[2], b'f' | b'F')))
    })
}

/// The headers the guard reads besides sizes, noted in the pass that checks the sizes: three
/// lookups by name would each hash it.
#[derive(Default)]
struct KeyHeaders<'a> {
    /// The first value of each, and how many there are.
    host: Option<&'a [u8]>,
    hosts: usize,
    content_length: Option<&'a [u8]>,
    content_lengths: usize,
    transfer_encoding: Option<&'a [u8]>,
    transfer_encodings: usize,
}

fn check_headers(req: &impl RequestHead) -> Result<KeyHeaders<'_>, Box<Error>> {
    if req.header_count() > MAX_HEADERS {
        return refuse(431, Reason::TooLarge, "too many header fields");
    }
    let mut seen = KeyHeaders::default();
    let mut total = 0;
    for (name, value) in req.header_lines() {
        // Names as received or in lower case: compared in any case.
        let is = |wanted: &[u8]| name.eq_ignore_ascii_case(wanted);
        if is(b"host") {
            seen.hosts += 1;
            seen.host.get_or_insert(value);
        } else if is(b"content-length") {
            seen.content_lengths += 1;
            seen.content_length.get_or_insert(value);
        } else if is(b"transfer-encoding") {
            seen.transfer_encodings += 1;
            seen.transfer_encoding.get_or_insert(value);
        }
        let line = name.len() + value.len();
        let max = if is(b"cookie") {
            MAX_COOKIE_LINE
        } else {
            MAX_HEADER_LINE
        };
        if line > max {
            return refuse(431, Reason::TooLarge, "header field too large");
        }
        total += line;
    }
    if total > MAX_HEAD {
        return refuse(431, Reason::TooLarge, "header section too large");
    }
    if req.version() != Version::HTTP_10 || seen.hosts > 0 {
        let valid = match (seen.host, seen.hosts) {
            (Some(host), 1) => valid_host(host),
            _ => false,
        };
        if !valid {
            return refuse(400, Reason::Malformed, "missing or malformed Host");
        }
    }
    Ok(seen)
}

/// `host`, `host:port`, `[v6]:port`: the characters of a reg-name or IP literal, no userinfo.
fn valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(b))
}

/// Returns whether the body is chunked.
fn check_framing(seen: &KeyHeaders<'_>, raw_head: Option<&[u8]>) -> Result<bool, Box<Error>> {
    if let Some(raw) = raw_head {
        if has_bare_lf(raw) {
            return refuse(400, Reason::Malformed, "bare LF in the request head");
        }
    }
    // One length, digits only, as nginx requires: `5, 5` or two equal lines are lists the
    // workers need not accept (hyper answers 400), and an ambiguity a smuggler looks for.
    if let Some(length) = seen.content_length {
        let one_number = !length.is_empty() && length.iter().all(u8::is_ascii_digit);
        if seen.content_lengths > 1 || !one_number {
            return refuse(
                400,
                Reason::Malformed,
                "Content-Length must be one number, sent once",
            );
        }
    }
    let Some(first) = seen.transfer_encoding else {
        return Ok(false);
    };
    let plain_chunked =
        seen.transfer_encodings == 1 && first.trim_ascii().eq_ignore_ascii_case(b"chunked");
    if !plain_chunked {
        return refuse(
            400,
            Reason::Malformed,
            "Transfer-Encoding other than exactly `chunked`",
        );
    }
    // Pingora removes Content-Length when Transfer-Encoding is present; the raw head still
    // shows whether the client sent both, which is how request smuggling starts.
    let had_length = seen.content_length.is_some()
        || raw_head.is_some_and(|raw| has_header_named(raw, b"content-length"));
    if had_length {
        return refuse(
            400,
            Reason::Malformed,
            "both Content-Length and Transfer-Encoding",
        );
    }
    Ok(true)
}

fn has_bare_lf(raw: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', raw).any(|i| i == 0 || raw[i - 1] != b'\r')
}

/// Whether a header line of the raw head starts with `name` followed by `:` (any case).
fn has_header_named(raw: &[u8], name: &[u8]) -> bool {
    raw.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()..]
                .iter()
                .find(|b| !matches!(b, b' ' | b'\t'))
                == Some(&b':')
    })
}

/// Why a request was refused, for `custodia_rejections_total{reason}`.
#[derive(Debug, Clone, Copy)]
enum Reason {
    Malformed,
    TooLarge,
    BodyTooLarge,
}

fn refuse<T>(status: u16, reason: Reason, why: &'static str) -> Result<T, Box<Error>> {
    let m = metrics::rejections();
    match reason {
        Reason::Malformed => m.malformed.inc(),
        Reason::TooLarge => m.head_too_large.inc(),
        Reason::BodyTooLarge => m.body_too_large.inc(),
    }
    Err(Error::explain(ErrorType::HTTPStatus(status), why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::RequestHeader;

    fn limits() -> LimitSettings {
        LimitSettings {
            max_connections: 10,
            max_body_size: 1000,
            route_body_sizes: vec![("/upload/".into(), 5000)],
            login_rate_per_minute: 10,
            client_timeout: std::time::Duration::from_secs(5),
            send_timeout: std::time::Duration::from_secs(5),
        }
    }

    fn req(target: &[u8], headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", target, None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn status(result: Result<BodyPlan, Box<Error>>) -> u16 {
        match result {
            Ok(_) => 200,
            Err(e) => match e.etype() {
                ErrorType::HTTPStatus(s) => *s,
                _ => 0,
            },
        }
    }

    #[test]
    fn the_fast_paths_view_is_judged_like_pingoras_header() {
        let big = "x".repeat(MAX_HEADER_LINE);
        for (host, name, value, expected) in [
            ("a.test", "X-Small", "1", 200),
            ("a b", "X-Small", "1", 400),
            ("a.test", "X-Big", big.as_str(), 431),
            ("a.test", "COOKIE", big.as_str(), 200),
        ] {
            let raw = format!("GET /a HTTP/1.1\r\nHOST: {host}\r\n{name}: {value}\r\n\r\n");
            let bytes = bytes::Bytes::from(raw);
            let view = crate::express::request::parse(&bytes).unwrap().head;
            let mut pingora = RequestHeader::build("GET", b"/a", None).unwrap();
            pingora.append_header("host", host).unwrap();
            pingora.append_header(name.to_owned(), value).unwrap();
            let judged = status(check(&view, Some(&bytes), &limits()));
            assert_eq!(judged, expected, "{host} {name}");
            assert_eq!(judged, status(check(&pingora, None, &limits())));
        }
    }

    #[test]
    fn plain_requests_pass_with_their_body_plan() {
        let r = req(
            b"/api/x?q=1",
            &[("host", "example.com"), ("content-length", "10")],
        );
        let plan = check(
            &r,
            Some(b"POST /api/x?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            &limits(),
        )
        .unwrap();
        assert_eq!(
            plan,
            BodyPlan {
                has_body: true,
                limit: 1000
            }
        );
        let r = req(
            b"/upload/big",
            &[("host", "example.com"), ("content-length", "4000")],
        );
        assert_eq!(check(&r, None, &limits()).unwrap().limit, 5000);
        let r = req(
            b"/UPLOAD/../api/x",
            &[("host", "example.com"), ("content-length", "4000")],
        );
        assert_eq!(
            status(check(&r, None, &limits())),
            413,
            "a spelling does not escape"
        );
    }

    #[test]
    fn ambiguous_or_oversized_heads_are_refused() {
        let host = ("host", "example.com");
        let cases: Vec<(RequestHeader, Option<&[u8]>, u16)> = vec![
            (req(b"/", &[host, ("transfer-encoding", "gzip, chunked")]), None, 400),
            (req(b"/", &[host, ("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")]), None, 400),
            (req(b"/", &[host, ("transfer-encoding", "chunked")]),
             Some(b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length : 5\r\nTransfer-Encoding: chunked\r\n\r\n"), 400),
            (req(b"/", &[host]), Some(b"GET / HTTP/1.1\nHost: e\n\n"), 400),
            (req(b"/a%00b", &[host]), None, 400),
            (req(b"/a%7fb", &[host]), None, 400),
            (req(b"/", &[]), None, 400),
            (req(b"/", &[("host", "a b")]), None, 400),
            (req(b"/", &[("host", "user@evil")]), None, 400),
            (req(b"http://example.com/", &[host]), None, 400),
            (req(&[b'/'; 9000], &[host]), None, 414),
            (req(b"/", &[host, ("x-big", &"a".repeat(9000))]), None, 431),
            // A chunked session fits; a Cookie line beyond it does not.
            (req(b"/", &[host, ("cookie", &"a".repeat(20_000))]), None, 200),
            (req(b"/", &[host, ("cookie", &"a".repeat(25_000))]), None, 431),
            (req(b"/", &[host, ("content-length", "1001")]), None, 413),
            (req(b"/", &[host, ("content-length", "5, 5")]), None, 400),
            (req(b"/", &[host, ("content-length", "5"), ("content-length", "5")]), None, 400),
            (req(b"/", &[host, ("content-length", "+5")]), None, 400),
            (req(b"/", &[host, ("content-length", "")]), None, 400),
            (req(b"/", &[host, ("content-length", "99999999999999999999999")]), None, 413),
            (req(b"/", &[host, ("content-length", "0")]), None, 200),
        ];
        for (i, (r, raw, want)) in cases.into_iter().enumerate() {
            assert_eq!(status(check(&r, raw, &limits())), want, "case {i}");
        }
        let mut many = req(b"/", &[host]);
        for i in 0..MAX_HEADERS {
            many.append_header(format!("x-h{i}"), "1").unwrap();
        }
        assert_eq!(status(check(&many, None, &limits())), 431);
    }
}
