//! Request identity and forwarding headers, as the seed's nginx set them.

use http::HeaderValue;
use pingora_http::RequestHeader;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_REAL_IP: &str = "x-real-ip";
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_FORWARDED_HOST: &str = "x-forwarded-host";

/// The client's id if it is a sane token (1–64 of `[A-Za-z0-9._-]`), else a fresh random one.
pub fn request_id(req: &RequestHeader) -> HeaderValue {
    if let Some(given) = req.headers.get(X_REQUEST_ID) {
        let bytes = given.as_bytes();
        let valid = (1..=64).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            return given.clone();
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

/// X-Real-IP (the real client), X-Forwarded-For (the peer appended, like nginx's
/// `$proxy_add_x_forwarded_for`), X-Forwarded-Proto and X-Request-Id on the upstream request.
pub fn set_forwarding(
    upstream: &mut RequestHeader,
    peer_ip: Option<std::net::IpAddr>,
    client_ip: Option<std::net::IpAddr>,
    proto: &'static str,
    request_id: &HeaderValue,
) -> pingora_core::Result<()> {
    let peer = peer_ip.map(|ip| ip.to_string());
    if let Some(client) = client_ip {
        // Usually the peer itself: formatted once.
        let client = match &peer {
            Some(peer) if peer_ip == Some(client) => peer.clone(),
            _ => client.to_string(),
        };
        upstream.insert_header(X_REAL_IP, client)?;
    }
    if let Some(ip) = peer {
        let forwarded_for = match upstream.headers.get(X_FORWARDED_FOR) {
            Some(prior) => match prior.to_str() {
                Ok(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
                _ => ip,
            },
            None => ip,
        };
        upstream.insert_header(X_FORWARDED_FOR, forwarded_for)?;
    }
    upstream.insert_header(X_FORWARDED_PROTO, proto)?;
    upstream.insert_header(X_REQUEST_ID, request_id.clone())?;
    Ok(())
}

pub const X_FORWARDED_USER: &str = "x-forwarded-user";
pub const X_FORWARDED_EMAIL: &str = "x-forwarded-email";

/// The signed-in user for the worker: X-Forwarded-User (sub), X-Forwarded-Email and the signed
/// assertion the worker verifies (it trusts nothing else).
pub fn set_identity(
    upstream: &mut RequestHeader,
    verified: &crate::auth::Verified,
) -> pingora_core::Result<()> {
    let session = &verified.session;
    upstream.insert_header(X_FORWARDED_USER, session.sub.as_str())?;
    if let Some(email) = &session.email {
        upstream.insert_header(X_FORWARDED_EMAIL, email.as_str())?;
    }
    upstream.insert_header(
        custodia_identity::IDENTITY_HEADER,
        verified.assertion.clone(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
