//! A worker's response head, read by the fast path: how its body is framed, whether the
//! connection can be used again, and the head the client gets.
//!
//! The client's head is the worker's with what Pingora changes in it: hop-by-hop headers out,
//! `Connection: keep-alive` or `close` for the client connection, `X-Request-Id` set, a `Date`
//! when the worker sent none. A body without a length (read until the worker closes) goes to
//! the client chunked, so the client connection stays open.

use std::mem::MaybeUninit;

use bytes::BufMut;
use http::HeaderValue;

use crate::headers::{is_message_framing, parse_length};
use crate::limits::ShutdownSignal;

/// Header lines read from a worker's response: Pingora's limit, so an answer Pingora's path
/// relays is relayed here too.
const MAX_HEADERS: usize = 256;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (`HEAD`, 204, 304).
    Empty,
    Length(u64),
    /// Relayed as it comes, chunk framing and all.
    Chunked,
    /// Until the worker closes; re-framed as chunked for the client.
    UntilClose,
}

/// A complete response head.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head in the buffer it was parsed from.
    pub len: usize,
    pub framing: Framing,
    /// The worker may be sent another request on this connection afterwards.
    pub reusable: bool,
    /// The head for the client.
    pub client_head: Vec<u8>,
    /// The head tells the client the connection stays open after this answer.
    pub keepalive: bool,
}

/// What the bytes read so far from a worker hold.
#[derive(Debug)]
pub enum Parsed {
    Head(Head),
    /// A 1xx (other than 101) of this many bytes: skipped; the real response follows.
    Informational(usize),
    /// Not complete yet.
    Partial,
}

/// A response the proxy cannot pass on: 502.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid response from the backend: {0}")]
pub struct BadResponse(pub &'static str);

/// How the client connection goes on after this response.
#[derive(Debug, Clone, Copy)]
pub struct ClientSide<'a> {
    pub head_request: bool,
    /// The connection may stay open, as far as the request goes.
    pub keepalive: bool,
    pub request_id: &'a HeaderValue,
    /// An answer that arrives once shutdown has begun closes the connection, and says so.
    pub shutdown: &'a ShutdownSignal,
}

pub fn parse(buf: &[u8], client: ClientSide<'_>) -> Result<Parsed, BadResponse> {
    // Left uninitialised: the parser writes the lines it finds.
    let mut lines = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    // As Pingora reads answers: a space before a header's colon is taken (the line goes to the
    // client written anew, without it, as RFC 9112 §5.1 asks of a proxy).
    let parsed = httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .parse_response_with_uninit_headers(&mut response, buf, &mut lines);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err(BadResponse("unparseable head")),
    };
    let status = response.code.unwrap_or(0);
    if !(100..600).contains(&status) {
        return Err(BadResponse("status code outside 100–599"));
    }
    if status == 101 {
        return Err(BadResponse("101 to a request that asked for no upgrade"));
    }
    if (100..200).contains(&status) {
        return Ok(Parsed::Informational(len));
    }
    let mut length: Option<u64> = None;
    // The `Transfer-Encoding` values, in order: the codings the client is told of.
    let mut coding_lists: [&[u8]; 4] = [b""; 4];
    let mut coding_count = 0;
    let mut worker_closes = response.version != Some(1);
    let mut has_date = false;
    // The `Connection` values: the headers they name stay here (RFC 9110 §7.6.1).
    let mut connection_lists: [&[u8]; 4] = [b""; 4];
    let mut connection_count = 0;
    for line in response.headers.iter() {
        let name = line.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let value = parse_length(line.value).ok_or(BadResponse("bad Content-Length"))?;
            if length.is_some_and(|known| known != value) {
                return Err(BadResponse("conflicting Content-Length"));
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            match coding_lists.get_mut(coding_count) {
                Some(slot) => {
                    *slot = line.value.trim_ascii();
                    coding_count += 1;
                }
                None => return Err(BadResponse("more than 4 Transfer-Encoding headers")),
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            worker_closes |= line
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            match connection_lists.get_mut(connection_count) {
                Some(slot) => {
                    *slot = line.value;
                    connection_count += 1;
                }
                None => return Err(BadResponse("more than 4 Connection headers")),
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        }
    }
    let codings = TransferCodings::of(&coding_lists[..coding_count])?;
    // A transfer coding replaces a length (RFC 9112 §6.3), on a HEAD's answer too: a message
    // never carries both.
    let coded = codings != TransferCodings::None;
    let framing = if client.head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if codings == TransferCodings::ChunkedLast {
        Framing::Chunked
    } else if codings == TransferCodings::ChunkedNotLast {
        // RFC 9112 §6.3: the body then ends when the worker closes.
        Framing::UntilClose
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    let reusable = !worker_closes && framing != Framing::UntilClose;

    let mut head = Vec::with_capacity(len + 128);
    head.put_slice(b"HTTP/1.1 ");
    // httparse reads exactly three digits.
    head.put_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    head.put_u8(b' ');
    head.put_slice(response.reason.unwrap_or("").as_bytes());
    head.put_slice(b"\r\n");
    for line in response.headers.iter() {
        let name = line.name.as_bytes();
        let named_by_connection = || {
            connection_lists
                .iter()
                .take(connection_count)
                .flat_map(|list| list.split(|&b| b == b','))
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
        };
        let dropped = is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"x-request-id")
            // The message's framing and date are not the connection's to take away (nginx
            // ignores such a `Connection` too): a length dropped left the body unframed.
            || (connection_count > 0 && !is_message_framing(name) && named_by_connection())
            || (coded && name.eq_ignore_ascii_case(b"content-length"))
            // A 204 has no body to frame (RFC 9110 §8.6).
            || (status == 204 && name.eq_ignore_ascii_case(b"content-length"));
        if dropped {
            continue;
        }
        head.put_slice(name);
        head.put_slice(b": ");
        head.put_slice(line.value);
        head.put_slice(b"\r\n");
    }
    // A 204 has no body, so no framing for one (RFC 9112 §6.1). Codings other than chunked
    // (`gzip, chunked`) are the client's to undo, as Pingora's path passes them on; a body
    // read until the worker closes goes on chunked after them.
    if status != 204 && (coded || framing == Framing::UntilClose) {
        head.put_slice(b"transfer-encoding: ");
        for (i, list) in coding_lists.iter().take(coding_count).enumerate() {
            if i > 0 {
                head.put_slice(b", ");
            }
            head.put_slice(list);
        }
        if codings != TransferCodings::ChunkedLast {
            head.put_slice(if coded { &b", chunked"[..] } else { b"chunked" });
        }
        head.put_slice(b"\r\n");
    }
    if !has_date {
        head.put_slice(b"date: ");
        head.put_slice(pingora_core::protocols::http::date::get_cached_date().as_bytes());
        head.put_slice(b"\r\n");
    }
    head.put_slice(b"x-request-id: ");
    head.put_slice(client.request_id.as_bytes());
    let keepalive = client.keepalive && !client.shutdown.is_shutting_down();
    head.put_slice(if keepalive {
        b"\r\nconnection: keep-alive\r\n\r\n"
    } else {
        b"\r\nconnection: close\r\n\r\n"
    });
    Ok(Parsed::Head(Head {
        status,
        len,
        framing,
        reusable,
        client_head: head,
        keepalive,
    }))
}

/// What a response's `Transfer-Encoding` lines say of its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransferCodings {
    None,
    /// Chunked is the final coding: the body's chunks say where it ends.
    ChunkedLast,
    /// Codings without chunked last: the body ends when the worker closes.
    ChunkedNotLast,
}

impl TransferCodings {
    /// What `Transfer-Encoding` lines (their values, in order) say, or why no client could
    /// frame the body by them. Pingora's path asks it too (`edge::unrelayable`).
    pub(crate) fn of(lists: &[&[u8]]) -> Result<Self, BadResponse> {
        if lists.is_empty() {
            return Ok(TransferCodings::None);
        }
        let mut codings = lists
            .iter()
            .flat_map(|list| list.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|coding| !coding.is_empty())
            .peekable();
        let mut last_is_chunked = None;
        while let Some(coding) = codings.next() {
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            // RFC 9112 §6.1 lets a response end by closing after `chunked, gzip`; relayed
            // chunked, that would be chunked twice, which no sender may do.
            if chunked && codings.peek().is_some() {
                return Err(BadResponse("chunked before another transfer coding"));
            }
            last_is_chunked = Some(chunked);
        }
        match last_is_chunked {
            None => Err(BadResponse("empty Transfer-Encoding")),
            Some(true) => Ok(TransferCodings::ChunkedLast),
            Some(false) => Ok(TransferCodings::ChunkedNotLast),
        }
    }
}

/// Headers about one connection, not the message (Transfer-Encoding is written again when the
/// body is chunked). `Trailer` is not one: it announces the trailer fields relayed with the
/// chunks.
fn is_hop_by_hop(name: &[u8]) -> bool {
    [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(keepalive: bool) -> ClientSide<'static> {
        static ID: HeaderValue = HeaderValue::from_static("rid-1");
        ClientSide {
            head_request: false,
            keepalive,
            request_id: &ID,
            shutdown: Box::leak(Box::default()),
        }
    }

    fn head(raw: &str, client: ClientSide<'_>) -> Head {
        match parse(raw.as_bytes(), client).unwrap() {
            Parsed::Head(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_sized_answer_keeps_its_headers_and_gets_ours() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\
                   Date: Sat, 05 Dec 2026 06:00:00 GMT\r\nConnection: keep-alive\r\n\
                   Keep-Alive: timeout=5\r\nX-Request-Id: spoofed\r\n\r\n{\"a\":\"bc\"}..";
        let h = head(raw, side(true));
        assert_eq!(
            (h.status, h.framing, h.reusable),
            (200, Framing::Length(12), true)
        );
        assert_eq!(h.len, raw.len() - 12);
        let out = String::from_utf8(h.client_head).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\
             Date: Sat, 05 Dec 2026 06:00:00 GMT\r\nx-request-id: rid-1\r\n\
             connection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn an_answer_arriving_once_shutdown_has_begun_closes_the_connection() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let kept = head(raw, side(true));
        assert!(kept.keepalive);
        let shutdown = ShutdownSignal::new();
        shutdown.announce();
        let client = ClientSide {
            shutdown: &shutdown,
            ..side(true)
        };
        let closing = head(raw, client);
        assert!(!closing.keepalive, "the connection closes after it");
        assert!(
            String::from_utf8(closing.client_head)
                .unwrap()
                .ends_with("\r\nconnection: close\r\n\r\n"),
            "and the client is told"
        );
        // The worker's connection is not the client's: it goes back to the pool all the same.
        assert!(closing.reusable);
    }

    #[test]
    fn framing_follows_the_status_the_method_and_the_headers() {
        let chunked = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            side(false),
        );
        assert_eq!(chunked.framing, Framing::Chunked);
        let out = String::from_utf8(chunked.client_head).unwrap();
        assert!(out.contains("transfer-encoding: chunked\r\n") && !out.contains("Content-Length"));
        assert!(out.ends_with("connection: close\r\n\r\n") && out.contains("\r\ndate: "));

        let until_close = head("HTTP/1.1 200 OK\r\n\r\n", side(true));
        assert_eq!(
            (until_close.framing, until_close.reusable),
            (Framing::UntilClose, false)
        );

        let closing = head(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            side(true),
        );
        assert_eq!(
            (closing.framing, closing.reusable),
            (Framing::Length(0), false)
        );

        let old = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", side(true));
        assert!(!old.reusable);

        let not_modified = head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            side(true),
        );
        assert_eq!(not_modified.framing, Framing::Empty);
        let mut for_head = side(true);
        for_head.head_request = true;
        let to_head = head("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", for_head);
        assert_eq!((to_head.framing, to_head.reusable), (Framing::Empty, true));
        assert!(String::from_utf8(to_head.client_head)
            .unwrap()
            .contains("Content-Length: 9"));
    }

    #[test]
    fn connection_cannot_take_away_the_length_or_the_date() {
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: Sun, 06 Dec 2026 09:00:00 GMT\r\n\
             X-Hop: 1\r\nConnection: Content-Length, Date, X-Hop\r\n\r\nhello",
            side(true),
        );
        assert_eq!((h.framing, h.keepalive), (Framing::Length(5), true));
        let out = String::from_utf8(h.client_head).unwrap();
        assert!(out.contains("\r\nContent-Length: 5\r\n"), "{out}");
        assert!(out.contains("\r\nDate: Sun, 06 Dec 2026"), "{out}");
        assert!(!out.contains("X-Hop"), "{out}");
    }

    #[test]
    fn codings_other_than_chunked_are_the_clients_to_undo() {
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding:  chunked \r\n\
                   Content-Length: 3\r\n\r\n";
        let h = head(raw, side(true));
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, true));
        let out = String::from_utf8(h.client_head).unwrap();
        assert!(
            out.contains("\r\ntransfer-encoding: gzip, chunked\r\n"),
            "{out}"
        );
        assert!(!out.contains("Content-Length"), "{out}");

        // Without chunked last, the body ends when the worker closes: chunked is added.
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
            side(true),
        );
        assert_eq!((h.framing, h.reusable), (Framing::UntilClose, false));
        let out = String::from_utf8(h.client_head).unwrap();
        assert!(
            out.contains("\r\ntransfer-encoding: gzip, chunked\r\n"),
            "{out}"
        );
        assert!(!out.contains("Content-Length"), "{out}");
    }

    #[test]
    fn a_space_before_a_colon_is_taken_and_not_passed_on() {
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length : 2\r\nX-A  : 1\r\n\r\nok",
            side(true),
        );
        assert_eq!(h.framing, Framing::Length(2));
        let out = String::from_utf8(h.client_head).unwrap();
        assert!(
            out.contains("\r\nContent-Length: 2\r\n") && out.contains("\r\nX-A: 1\r\n"),
            "{out}"
        );
    }

    #[test]
    fn a_204_reaches_the_client_without_body_framing() {
        for raw in [
            "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n",
        ] {
            let h = head(raw, side(true));
            assert_eq!((h.framing, h.reusable), (Framing::Empty, true), "{raw:?}");
            let out = String::from_utf8(h.client_head)
                .unwrap()
                .to_ascii_lowercase();
            assert!(out.contains("x-a: 1\r\n"), "{out}");
            assert!(
                !out.contains("transfer-encoding") && !out.contains("content-length"),
                "{out}"
            );
        }
        // A 304 may carry the length a 200 would have had.
        let not_modified = head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            side(true),
        );
        assert!(String::from_utf8(not_modified.client_head)
            .unwrap()
            .contains("Content-Length: 9"));
    }

    #[test]
    fn informational_answers_are_skipped_and_partial_heads_wait() {
        assert!(matches!(
            parse(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200",
                side(true)
            ),
            Ok(Parsed::Informational(40))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nA: b", side(true)),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn ambiguous_or_broken_answers_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(parse(raw.as_bytes(), side(true)).is_err(), "{raw:?}");
        }
    }
}
