//! Client-sent identity headers are removed before a request goes upstream, and so are our
//! cookies: a worker must only ever see the identity the proxy itself sets.

use http::header::{CONNECTION, COOKIE};
use http::{HeaderName, HeaderValue};

use crate::request_head::RequestHead;
use crate::upstream_head::UpstreamHead;

use super::cookies::{
    cookie_part_name, cookie_parts, is_custodia_cookie_name, strip_custodia_cookie_bytes,
};

/// Identity headers a client must never be able to send to a worker.
pub const STRIPPED_HEADERS: &[&str] = &[
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-custodia-identity",
    // The health checks' question to the workers (`custodia_identity::KEY_CHECK_HEADER`):
    // asked by anyone else, a worker would describe its key to the internet.
    "x-custodia-key-check",
    "remote-user",
    "x-remote-user",
];

/// Whether `name` is one of [`STRIPPED_HEADERS`], also when spelled with `_` for `-` (CGI-style
/// servers map both to the same variable) or in any case.
fn is_identity_header(name: &[u8]) -> bool {
    STRIPPED_HEADERS.iter().any(|stripped| {
        name.len() == stripped.len()
            && name
                .iter()
                .copied()
                .zip(stripped.bytes())
                .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
    })
}

/// Remove every client-sent identity header (all occurrences, any case, `_` or `-`).
///
/// Also removes those names from the `Connection` header (dropping the header if nothing is
/// left): a hop-by-hop listing like `Connection: close, X-Forwarded-User` would otherwise make a
/// later hop delete the identity header the proxy sets.
pub fn strip_client_identity(req: &mut impl UpstreamHead) {
    // Read before any edit (see `UpstreamHead`); nothing is allocated for a request that has
    // none of these.
    let received = req.received();
    let doomed: Vec<HeaderName> = received
        .header_lines()
        .filter(|(name, _)| is_identity_header(name))
        .filter_map(|(name, _)| HeaderName::from_bytes(name).ok())
        .collect();
    let names_identity = |value: &[u8]| {
        value
            .split(|&b| b == b',')
            .any(|token| is_identity_header(token.trim_ascii()))
    };
    let connection: Vec<Vec<u8>> = received.values(&CONNECTION).map(<[u8]>::to_vec).collect();
    for name in &doomed {
        req.remove(name);
    }
    if !connection.iter().any(|value| names_identity(value)) {
        return;
    }
    req.remove(&CONNECTION);
    for value in connection {
        let kept: Vec<&[u8]> = value
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .filter(|t| !is_identity_header(t))
            .collect();
        if kept.is_empty() {
            continue;
        }
        let joined = kept.join(&b", "[..]);
        if let Ok(value) = HeaderValue::from_bytes(&joined) {
            // Appending a valid name and value cannot fail.
            let _ = req.append(CONNECTION, value);
        }
    }
}

/// Remove our session and login-state cookies from every `Cookie` header (see
/// [`super::cookies::strip_custodia_cookies`]); a header left empty is removed. Requests
/// without our cookies are not touched.
pub fn remove_custodia_cookies(req: &mut impl UpstreamHead) {
    let received = req.received();
    let has_ours = received.values(&COOKIE).any(|value| {
        cookie_parts(value).any(|part| cookie_part_name(part).is_some_and(is_custodia_cookie_name))
    });
    if !has_ours {
        return;
    }
    let kept: Vec<Vec<u8>> = received
        .values(&COOKIE)
        .filter_map(strip_custodia_cookie_bytes)
        .collect();
    req.remove(&COOKIE);
    for value in kept {
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            // Appending a valid name and value cannot fail.
            let _ = req.append(COOKIE, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::RequestHeader;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/api/me", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn values(r: &RequestHeader, name: &str) -> Vec<String> {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    #[test]
    fn every_listed_header_is_removed_in_any_spelling() {
        let mut headers: Vec<(String, &str)> = Vec::new();
        for name in STRIPPED_HEADERS {
            headers.push((name.to_string(), "mallory"));
            headers.push((name.to_ascii_uppercase(), "mallory-again"));
            headers.push((name.replace('-', "_"), "mallory-underscored"));
        }
        headers.push(("X-Forwarded-For".into(), "203.0.113.1"));
        headers.push(("Accept".into(), "text/html"));
        headers.push(("X-Forwarded-Userx".into(), "not ours"));
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let mut r = req(&pairs);
        strip_client_identity(&mut r);
        for name in STRIPPED_HEADERS {
            assert!(r.headers.get(*name).is_none(), "{name} survived");
            assert!(
                r.headers.get(name.replace('-', "_")).is_none(),
                "{name} with _ survived"
            );
        }
        assert_eq!(values(&r, "x-forwarded-for"), ["203.0.113.1"]);
        assert_eq!(values(&r, "accept"), ["text/html"]);
        assert_eq!(values(&r, "x-forwarded-userx"), ["not ours"]);
        assert_eq!(r.headers.len(), 3);
    }

    #[test]
    fn connection_cannot_name_identity_headers() {
        let mut r = req(&[
            ("Connection", "keep-alive, X-Forwarded-User"),
            ("Connection", "x-forwarded-email ,Upgrade"),
            ("X-Forwarded-User", "mallory"),
            ("Upgrade", "websocket"),
        ]);
        strip_client_identity(&mut r);
        assert_eq!(values(&r, "connection"), ["keep-alive", "Upgrade"]);
        assert!(r.headers.get("x-forwarded-user").is_none());
        assert_eq!(values(&r, "upgrade"), ["websocket"]);

        let mut only = req(&[("Connection", "X-Forwarded-User, remote_user")]);
        strip_client_identity(&mut only);
        assert!(only.headers.get("connection").is_none());

        let mut untouched = req(&[("Connection", "close")]);
        strip_client_identity(&mut untouched);
        assert_eq!(values(&untouched, "connection"), ["close"]);
    }

    #[test]
    fn a_request_without_identity_headers_is_unchanged() {
        let mut r = req(&[("Host", "example.com"), ("Cookie", "a=1")]);
        strip_client_identity(&mut r);
        remove_custodia_cookies(&mut r);
        assert_eq!(values(&r, "host"), ["example.com"]);
        assert_eq!(values(&r, "cookie"), ["a=1"]);
        assert_eq!(r.headers.len(), 2);
    }

    #[test]
    fn our_cookies_never_reach_the_worker() {
        let mut r = req(&[
            ("Cookie", "theme=dark; __Host-custodia_session.0=v1.aaa"),
            ("Cookie", "__Host-custodia_session.1=bbb"),
            ("Cookie", "custodia_login_abcdefghijklmnop=v1.x; lang=en"),
            ("Cookie", "custodia_session=v1.old"),
        ]);
        remove_custodia_cookies(&mut r);
        assert_eq!(values(&r, "cookie"), ["theme=dark", "lang=en"]);

        let mut only_ours = req(&[("Cookie", "__Host-custodia_session=v1.aaa")]);
        remove_custodia_cookies(&mut only_ours);
        assert!(only_ours.headers.get("cookie").is_none());
    }

    #[test]
    fn non_utf8_cookie_headers_are_stripped_too() {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.append_header(
            "cookie",
            HeaderValue::from_bytes(b"a=\xff; custodia_session=v1.x").unwrap(),
        )
        .unwrap();
        remove_custodia_cookies(&mut r);
        assert_eq!(r.headers["cookie"].as_bytes(), b"a=\xff");
    }
}
