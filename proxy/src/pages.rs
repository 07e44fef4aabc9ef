//! Responses the proxy writes itself: error pages in HTML (the seed's nginx `50x.html`) or JSON.

use bytes::Bytes;
use http::StatusCode;
use pingora_http::ResponseHeader;

use crate::request_head::RequestHead;

/// Whether the client asked for JSON rather than a page.
pub fn wants_json(req: &impl RequestHead) -> bool {
    let accept = req.first_str(&http::header::ACCEPT).unwrap_or("");
    accept.contains("json") && !accept.contains("text/html")
}

/// Headers on every answer the proxy writes itself (error pages, login redirects, its 401s):
/// no content sniffing, no framing (clickjacking of the Login and Logout links), and no
/// `Referer` carrying the proxy's URLs (`rd=`, `/callback?code=…`) elsewhere.
pub const OWN_ANSWER_HEADERS: [(&str, &str); 3] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
];

/// Over https (`[auth] public_url`), the proxy's own answers also tell browsers to come back
/// over https only, for a year (Pomerium's default; no `includeSubDomains`: the operator's
/// other hosts are not the proxy's to decide).
pub const HSTS: (&str, &str) = ("strict-transport-security", "max-age=31536000");

/// What an error page tells a person about `status`: the request's fault (4xx) or the site's.
fn explanation(status: u16) -> &'static str {
    match status {
        400 => "The request could not be understood.",
        403 => "You do not have access to this page.",
        404 => "The page you are looking for does not exist.",
        405 => "This kind of request is not allowed here.",
        408 => "The request took too long to arrive.",
        413 => "The request is larger than this site accepts.",
        414 => "The address (URL) is longer than this site accepts.",
        429 => "Too many requests. Please wait a moment and try again.",
        431 => "The request's headers are larger than this site accepts.",
        status if status < 500 => "The request could not be handled.",
        // The seed's nginx 50x.html.
        _ => {
            "Sorry, the page you are looking for is currently unavailable.<br/>\n\
              Please try again later."
        }
    }
}

/// A complete error response: header and body.
pub struct ErrorPage {
    pub header: ResponseHeader,
    pub body: Bytes,
}

/// Render the error page for `status`, tagged with the request id.
pub fn error_page(status: u16, json: bool, request_id: &str) -> pingora_core::Result<ErrorPage> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let reason = code.canonical_reason().unwrap_or("Error");
    let (content_type, body) = if json {
        let body = serde_json::json!({
            "error": reason.to_ascii_lowercase(),
            "status": code.as_u16(),
            "request_id": request_id,
        });
        ("application/json", body.to_string())
    } else {
        let body = format!(
            "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>{status} {reason}</title>\n\
             <style>body{{font-family:Arial,sans-serif;background:#f4f4f4;text-align:center;padding-top:80px}}\
             .container{{display:inline-block;background:#fff;padding:30px 40px;border-radius:10px;box-shadow:0 0 15px rgba(0,0,0,.1)}}\
             small{{color:#777}}</style>\n</head>\n<body>\n<div class=\"container\">\n\
             <h1>An error occurred.</h1>\n<p>{explanation}</p>\n\
             <p><small>{status} {reason} &middot; request id {id}</small></p>\n\
             </div>\n</body>\n</html>\n",
            status = code.as_u16(),
            reason = reason,
            explanation = explanation(code.as_u16()),
            id = escape_html(request_id),
        );
        ("text/html; charset=utf-8", body)
    };
    let body = Bytes::from(body);
    let mut header = ResponseHeader::build(code, Some(4 + OWN_ANSWER_HEADERS.len()))?;
    header.insert_header(http::header::CONTENT_TYPE, content_type)?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    for (name, value) in OWN_ANSWER_HEADERS {
        header.insert_header(name, value)?;
    }
    Ok(ErrorPage { header, body })
}

/// A small page for the proxy's own answers (sign-in problems, access denied…).
pub fn message_page(status: u16, title: &str, detail: &str, request_id: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n\
         <style>body{{font-family:Arial,sans-serif;background:#f4f4f4;text-align:center;padding-top:80px}}\
         .container{{display:inline-block;background:#fff;padding:30px 40px;border-radius:10px;box-shadow:0 0 15px rgba(0,0,0,.1)}}\
         small{{color:#777}}</style>\n</head>\n<body>\n<div class=\"container\">\n\
         <h1>{title}</h1>\n<p>{detail}</p>\n<p><a href=\"/\">Home</a> &middot; <a href=\"/login\">Sign in</a></p>\n\
         <p><small>{status} &middot; request id {id}</small></p>\n</div>\n</body>\n</html>\n",
        title = escape_html(title),
        detail = escape_html(detail),
        id = escape_html(request_id),
    )
}

/// Minimal HTML escaping for interpolated text.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::RequestHeader;

    fn request(accept: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(a) = accept {
            req.insert_header("accept", a).unwrap();
        }
        req
    }

    #[test]
    fn browsers_get_html_and_api_clients_json() {
        assert!(!wants_json(&request(Some(
            "text/html,application/xhtml+xml,*/*;q=0.8"
        ))));
        assert!(wants_json(&request(Some("application/json"))));
        assert!(!wants_json(&request(None)));
    }

    #[test]
    fn pages_carry_status_and_request_id() {
        let page = error_page(503, false, "abc<1>").unwrap();
        assert_eq!(page.header.status.as_u16(), 503);
        let body = std::str::from_utf8(&page.body).unwrap();
        assert!(body.contains("503 Service Unavailable"));
        assert!(body.contains("abc&lt;1&gt;"), "request id escaped: {body}");
        assert!(body.contains("currently unavailable"), "{body}");
        for (name, value) in OWN_ANSWER_HEADERS {
            assert_eq!(page.header.headers[name], value);
        }
        // A refusal for the client's fault says so, not "try again later".
        let too_large = error_page(413, false, "id").unwrap();
        let body = std::str::from_utf8(&too_large.body).unwrap();
        assert!(body.contains("larger than this site accepts"), "{body}");
        assert!(!body.contains("try again later"), "{body}");
        let json = error_page(502, true, "id-1").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
        assert_eq!(v["status"], 502);
        assert_eq!(v["request_id"], "id-1");
    }
}
