//! Request identity and forwarding headers, as the seed's nginx set them.

use std::cell::RefCell;
use std::net::IpAddr;

use http::header::{self, HeaderMap};
use http::{HeaderName, HeaderValue};
use pingora_core::{Error, ErrorType};

use crate::request_head::RequestHead;
use crate::upstream_head::UpstreamHead;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_REAL_IP: &str = "x-real-ip";
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_FORWARDED_HOST: &str = "x-forwarded-host";

/// Heads with at most this many header values are searched by comparing names.
const SCAN_LIMIT: usize = 16;

/// The values of `name` in `headers`, in order. A request carries a handful of headers:
/// comparing their names costs less than hashing this one (~150 instructions a lookup, up to
/// nine lookups a request).
pub fn values<'a, 'n>(headers: &'a HeaderMap, name: &'n HeaderName) -> Values<'a, 'n> {
    if headers.len() <= SCAN_LIMIT {
        Values::Scan(headers.iter(), name)
    } else {
        Values::Hashed(headers.get_all(name).iter())
    }
}

/// The iterator [`values`] returns.
pub enum Values<'a, 'n> {
    Scan(header::Iter<'a, HeaderValue>, &'n HeaderName),
    Hashed(header::ValueIter<'a, HeaderValue>),
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a HeaderValue;

    fn next(&mut self) -> Option<&'a HeaderValue> {
        match self {
            // `HeaderMap::iter` yields a name's values together and in order, as `get_all`.
            Values::Scan(all, name) => all.find(|(n, _)| *n == *name).map(|(_, v)| v),
            Values::Hashed(values) => values.next(),
        }
    }
}

/// The client's id if it is a sane token (1–64 of `[A-Za-z0-9._-]`), else a fresh random one.
pub fn request_id(req: &impl RequestHead) -> HeaderValue {
    if let Some(given) = req.first(&X_REQUEST_ID_NAME) {
        let valid = (1..=64).contains(&given.len())
            && given
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            if let Ok(value) = HeaderValue::from_bytes(given) {
                return value;
            }
        }
    }
    generate_request_id()
}

fn generate_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for byte in out.iter_mut() {
        *byte = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // 32 ASCII hex digits: always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Names of the headers the edge sets and reads (lower case, as `http` keeps them); looking a
/// header up by one of these skips parsing the name each time.
pub const X_REAL_IP_NAME: HeaderName = HeaderName::from_static(X_REAL_IP);
pub const X_FORWARDED_FOR_NAME: HeaderName = HeaderName::from_static(X_FORWARDED_FOR);
pub const X_FORWARDED_PROTO_NAME: HeaderName = HeaderName::from_static(X_FORWARDED_PROTO);
pub const X_FORWARDED_HOST_NAME: HeaderName = HeaderName::from_static(X_FORWARDED_HOST);
pub const X_REQUEST_ID_NAME: HeaderName = HeaderName::from_static(X_REQUEST_ID);
pub const X_FORWARDED_USER_NAME: HeaderName = HeaderName::from_static(X_FORWARDED_USER);
pub const X_FORWARDED_EMAIL_NAME: HeaderName = HeaderName::from_static(X_FORWARDED_EMAIL);
pub const IDENTITY_HEADER_NAME: HeaderName =
    HeaderName::from_static(custodia_identity::IDENTITY_HEADER);

/// X-Real-IP (the real client), X-Forwarded-For (the peer appended, like nginx's
/// `$proxy_add_x_forwarded_for`), X-Forwarded-Proto and X-Request-Id on the upstream request.
pub fn set_forwarding(
    upstream: &mut impl UpstreamHead,
    peer_ip: Option<IpAddr>,
    client_ip: Option<IpAddr>,
    proto: &'static str,
    request_id: &HeaderValue,
) -> pingora_core::Result<()> {
    let peer = peer_ip.map(ip_value);
    // Read before any edit (see `UpstreamHead`): the client's list with the peer appended.
    let joined = match (&peer, upstream.received().list_str(&X_FORWARDED_FOR_NAME)) {
        (Some(ip), Some(prior)) if !prior.trim().is_empty() => {
            let joined = format!("{prior}, {}", ip.to_str().unwrap_or_default());
            // A received value, a comma and an address: always a valid value.
            HeaderValue::from_str(&joined).ok()
        }
        _ => None,
    };
    if let Some(client) = client_ip {
        // Usually the peer itself.
        let client = match &peer {
            Some(peer) if peer_ip == Some(client) => peer.clone(),
            _ => ip_value(client),
        };
        upstream.insert(X_REAL_IP_NAME, client)?;
    }
    if let Some(ip) = peer {
        upstream.insert(X_FORWARDED_FOR_NAME, joined.unwrap_or(ip))?;
    }
    upstream.insert(X_FORWARDED_PROTO_NAME, HeaderValue::from_static(proto))?;
    upstream.insert(X_REQUEST_ID_NAME, request_id.clone())?;
    Ok(())
}

/// Remove from a worker's answer the headers its `Connection` header names: they are about
/// that connection only (RFC 9110 §7.6.1), and go no further than the proxy.
pub fn remove_connection_named(response: &mut pingora_http::ResponseHeader) {
    let named: Vec<HeaderName> = response
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| !is_message_framing(name.as_str().as_bytes()))
        .collect();
    for name in named {
        response.remove_header(&name);
    }
}

/// Headers a `Connection` list cannot remove, on either path: how the body is framed, and
/// `Date` (nginx ignores such a `Connection` too; a length dropped left the body unframed).
pub fn is_message_framing(name: &[u8]) -> bool {
    [&b"content-length"[..], b"transfer-encoding", b"date"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// A Content-Length of digits only (at most 18 of them: no overflow), on either path.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

thread_local! {
    /// The last address formatted on this thread: nearly every request comes from the same
    /// peer (the ngrok agent in production), and formatting one costs ~1.3k instructions.
    static LAST_IP: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
}

/// `ip` as a header value (its usual text form).
fn ip_value(ip: IpAddr) -> HeaderValue {
    let recalled = LAST_IP.with(|last| match &*last.borrow() {
        Some((last_ip, value)) if *last_ip == ip => Some(value.clone()),
        _ => None,
    });
    recalled.unwrap_or_else(|| {
        // An address's text form (digits, hex, `.` and `:`) is always a valid value.
        let value =
            HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""));
        LAST_IP.with(|last| *last.borrow_mut() = Some((ip, value.clone())));
        value
    })
}

pub const X_FORWARDED_USER: &str = "x-forwarded-user";
pub const X_FORWARDED_EMAIL: &str = "x-forwarded-email";

/// The signed-in user for the worker: X-Forwarded-User (sub), X-Forwarded-Email and the signed
/// assertion the worker verifies (it trusts nothing else).
pub fn set_identity(
    upstream: &mut impl UpstreamHead,
    verified: &crate::auth::Verified,
) -> pingora_core::Result<()> {
    let Some(forwarded) = &verified.forwarded else {
        return Error::e_explain(
            ErrorType::InvalidHTTPHeader,
            "identity header value: the session's subject or email",
        );
    };
    upstream.insert(X_FORWARDED_USER_NAME, forwarded.user.clone())?;
    if let Some(email) = &forwarded.email {
        upstream.insert(X_FORWARDED_EMAIL_NAME, email.clone())?;
    }
    upstream.insert(IDENTITY_HEADER_NAME, verified.assertion.clone())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::RequestHeader;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn keeps_a_sane_request_id_and_replaces_junk() {
        assert_eq!(request_id(&req(&[("x-request-id", "abc-123")])), "abc-123");
        let fresh = request_id(&req(&[("x-request-id", "bad id with spaces")]));
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&req(&[])), "ids are random");
        let long = "a".repeat(65);
        assert_ne!(request_id(&req(&[("x-request-id", &long)])), long.as_str());
    }

    #[test]
    fn appends_to_forwarded_for_like_nginx() {
        let mut r = req(&[("x-forwarded-for", "203.0.113.7")]);
        let id = HeaderValue::from_static("rid");
        let peer = Some("10.0.0.1".parse().unwrap());
        set_forwarding(&mut r, peer, peer, "http", &id).unwrap();
        assert_eq!(r.headers["x-forwarded-for"], "203.0.113.7, 10.0.0.1");
        assert_eq!(r.headers["x-real-ip"], "10.0.0.1");
        assert_eq!(r.headers["x-forwarded-proto"], "http");
        assert_eq!(r.headers["x-request-id"], "rid");
    }

    #[test]
    fn each_peer_gets_its_own_address_though_the_last_one_is_remembered() {
        let id = HeaderValue::from_static("rid");
        for text in [
            "10.0.0.1",
            "2001:db8::1",
            "10.0.0.1",
            "192.168.1.20",
            "192.168.1.20",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let mut r = req(&[]);
            set_forwarding(&mut r, Some(ip), Some(ip), "https", &id).unwrap();
            assert_eq!(r.headers["x-real-ip"], text);
            assert_eq!(r.headers["x-forwarded-for"], text);
            assert_eq!(r.headers["x-forwarded-proto"], "https");
        }
    }

    fn verified(sub: &str, email: Option<&str>) -> crate::auth::Verified {
        let session = crate::auth::Session {
            sub: sub.into(),
            email: email.map(str::to_owned),
            name: None,
            picture: None,
            iat: 1,
            exp: 2,
        };
        crate::auth::Verified {
            forwarded: crate::auth::ForwardedIdentity::of(&session),
            session: std::sync::Arc::new(session),
            assertion: HeaderValue::from_static("signed"),
        }
    }

    #[test]
    fn the_identity_replaces_what_the_client_sent() {
        let mut r = req(&[
            ("x-forwarded-user", "mallory"),
            ("x-forwarded-email", "m@x"),
        ]);
        set_identity(&mut r, &verified("auth0|alice", Some("alice@example.test"))).unwrap();
        assert_eq!(r.headers["x-forwarded-user"], "auth0|alice");
        assert_eq!(r.headers["x-forwarded-email"], "alice@example.test");
        assert_eq!(r.headers.get_all("x-forwarded-user").iter().count(), 1);
        assert_eq!(r.headers[IDENTITY_HEADER_NAME], "signed");

        let mut r = req(&[]);
        set_identity(&mut r, &verified("auth0|bob", None)).unwrap();
        assert_eq!(r.headers["x-forwarded-user"], "auth0|bob");
        assert!(r.headers.get("x-forwarded-email").is_none());
    }

    #[test]
    fn an_identity_that_cannot_be_a_header_value_fails_the_request() {
        for (sub, email) in [
            ("auth0|a\nX-Admin: 1", None),
            ("auth0|b", Some("b\r@example.test")),
        ] {
            let mut r = req(&[]);
            assert!(
                set_identity(&mut r, &verified(sub, email)).is_err(),
                "{sub:?} {email:?}"
            );
        }
    }
}
