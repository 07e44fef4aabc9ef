//! Safe post-login return targets (`/login?rd=…`): only a same-origin absolute path survives,
//! closing the open-redirect class of the oauth2-proxy advisories.
//!
//! A target is accepted when it starts with a single `/` and neither it nor any of its
//! percent-decoded forms (decoded up to [`DECODE_ROUNDS`] times) could be read by a browser or a
//! later decoder as another origin: no `//`, `/\` or `\` at the start, no scheme before the first
//! `/`, no backslash or dot segment (`.`/`..`) in the path, no control characters, and no
//! whitespace in the raw value. What comes back is the raw value with non-ASCII characters
//! percent-encoded, ready for a `Location` header.

use std::borrow::Cow;

use percent_encoding::{percent_decode, utf8_percent_encode, CONTROLS};

use super::flow::Endpoint;
use super::policy::normalise_path;

/// Longest return target accepted.
pub const MAX_RETURN_TARGET_LEN: usize = 2048;
/// Decoding rounds tried; a value still changing after this many is refused.
pub const DECODE_ROUNDS: usize = 4;

/// `Some(target)` if `rd` is a safe same-origin path (query and fragment allowed), else `None`;
/// the caller then uses `/`.
pub fn safe_return_target(rd: &str) -> Option<String> {
    if rd.is_empty() || rd.len() > MAX_RETURN_TARGET_LEN || !rd.starts_with('/') {
        return None;
    }
    if rd
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return None;
    }
    let mut form: Cow<'_, [u8]> = Cow::Borrowed(rd.as_bytes());
    for round in 0..=DECODE_ROUNDS {
        if looks_foreign(&form) {
            return None;
        }
        let decoded: Cow<'_, [u8]> = percent_decode(&form).into();
        if decoded == form {
            break;
        }
        if round == DECODE_ROUNDS {
            return None;
        }
        form = Cow::Owned(decoded.into_owned());
    }
    // The proxy's own endpoints are no place to return to: `rd=/logout` would sign the user
    // straight out again after the sign-in, `rd=/callback` show "sign-in did not complete".
    let path = &rd[..rd.find(['?', '#']).unwrap_or(rd.len())];
    if normalise_path(path).is_ok_and(|normal| Endpoint::from_path(&normal).is_some()) {
        return None;
    }
    Some(utf8_percent_encode(rd, CONTROLS).to_string())
}

/// Whether this (possibly decoded) form could leave our origin or hide something.
fn looks_foreign(form: &[u8]) -> bool {
    // Some decoders treat '\' as '/': check the form with both as separators.
    let is_sep = |b: u8| b == b'/' || b == b'\\';
    match form {
        [first, ..] if !is_sep(*first) => return true,
        [_, second, ..] if is_sep(*second) => return true,
        [] => return true,
        _ => {}
    }
    if form.contains(&b'\\') {
        return true;
    }
    // A scheme is a ':' before the first separator.
    let first_sep = form.iter().position(|&b| is_sep(b)).unwrap_or(form.len());
    if form[..first_sep].contains(&b':') {
        return true;
    }
    if has_control(form) {
        return true;
    }
    let path_end = form
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(form.len());
    form[..path_end]
        .split(|&b| is_sep(b))
        .any(|segment| segment == b"." || segment == b"..")
}

/// C0, DEL, and C1 controls and Unicode line/paragraph separators in the form's UTF-8 parts: an
/// invalid byte elsewhere (`%ff`) must not hide them from a decoder that replaces it.
fn has_control(form: &[u8]) -> bool {
    if form.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return true;
    }
    String::from_utf8_lossy(form)
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_paths_are_accepted() {
        for (rd, expected) in [
            ("/", "/"),
            ("/api/x?y=1#z", "/api/x?y=1#z"),
            ("/dashboard", "/dashboard"),
            ("/a/b/c/", "/a/b/c/"),
            ("/search?q=hello%20world", "/search?q=hello%20world"),
            ("/search?q=a+b&page=2", "/search?q=a+b&page=2"),
            (
                "/x?next=https://evil.example",
                "/x?next=https://evil.example",
            ),
            ("/x?next=%2F%2Fevil.example", "/x?next=%2F%2Fevil.example"),
            ("/x#/../../y", "/x#/../../y"),
            ("/time/12:30", "/time/12:30"),
            ("/@evil.example", "/@evil.example"),
            ("/100%", "/100%"),
            ("/50%zz", "/50%zz"),
            ("/files/a%2Fb", "/files/a%2Fb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/café", "/caf%C3%A9"),
            ("/日本", "/%E6%97%A5%E6%9C%AC"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a..b/c.", "/a..b/c."),
        ] {
            assert_eq!(safe_return_target(rd).as_deref(), Some(expected), "{rd:?}");
        }
        let longest = format!("/{}", "a".repeat(MAX_RETURN_TARGET_LEN - 1));
        assert_eq!(safe_return_target(&longest), Some(longest.clone()));
    }

    #[test]
    fn other_origins_and_their_disguises_are_refused() {
        for rd in [
            // Not a path at all.
            "",
            "evil.example",
            "evil.example/x",
            "https://evil.example",
            "http:evil.example",
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "%2F%2Fevil.example",
            "%2f",
            // Protocol-relative and backslash forms.
            "//evil.example",
            "///evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "\\/evil.example",
            "/\\/evil.example",
            "/x\\y",
            // Percent-encoded forms, any case, nested.
            "/%2f%2fevil.example",
            "/%2F%2Fevil.example",
            "/%2fevil.example",
            "/%5cevil.example",
            "/%5Cevil.example",
            "/%5c%5cevil.example",
            "/%252f%252fevil.example",
            "/%25252f%25252fevil.example",
            "/%2525252f%2525252fevil.example",
            "/%%32%66%2fevil.example",
            "/x%5cy",
            // Whitespace and control characters, raw or encoded.
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r/evil.example",
            "/\r\n/evil.example",
            " /x",
            "/x ",
            "/x y",
            "/\u{0}x",
            "/x\u{7f}",
            "/\u{a0}x",
            "/\u{2028}x",
            "/\u{3000}x",
            "/\u{85}x",
            "/%09/evil.example",
            "/%0a/evil.example",
            "/%0d%0aSet-Cookie:%20x=y",
            "/%00",
            "/%C2%85x",
            "/%E2%80%A8x",
            // Next to an invalid UTF-8 byte (found by proxy/tests/properties.rs).
            "/%ff%E2%80%A8",
            "/%ff%C2%85",
            "/x%E2%80%A9%c3",
            // Dot segments that collapse to //host.
            "/.//evil.example",
            "/..//evil.example",
            "/x/../..//evil.example",
            "/%2e%2e//evil.example",
            "/%2e/%2fevil.example",
            "/.%5c%5cevil.example",
            "/./x",
            "/x/..",
        ] {
            assert_eq!(safe_return_target(rd), None, "{rd:?} was accepted");
        }
    }

    #[test]
    fn the_proxys_own_endpoints_are_no_return_target() {
        for rd in [
            "/logout",
            "/logout?x=1",
            "/callback",
            "/callback?code=a&state=b",
            "/login",
            "/login?rd=/logout",
            "/%6cogout",
            "/login#x",
        ] {
            assert_eq!(safe_return_target(rd), None, "{rd:?} was accepted");
        }
        for rd in ["/logouts", "/api/logout", "/login/x", "/callbacks?x"] {
            assert_eq!(safe_return_target(rd).as_deref(), Some(rd), "{rd:?}");
        }
    }

    #[test]
    fn over_long_targets_are_refused() {
        let too_long = format!("/{}", "a".repeat(MAX_RETURN_TARGET_LEN));
        assert_eq!(safe_return_target(&too_long), None);
    }

    #[test]
    fn a_value_that_keeps_decoding_is_refused() {
        // "/a" under DECODE_ROUNDS + 1 layers of encoding of its '%' signs.
        let mut rd = "/%61".to_string();
        for _ in 0..DECODE_ROUNDS {
            rd = rd.replace('%', "%25");
        }
        assert_eq!(safe_return_target(&rd), None, "{rd}");
        let shallow = "/%2561";
        assert_eq!(safe_return_target(shallow).as_deref(), Some(shallow));
    }

    #[test]
    fn accepted_targets_are_valid_location_headers() {
        for rd in ["/", "/café?x=ü#ß", "/api/x?y=1#z", "/%E2%80%8B"] {
            let target = safe_return_target(rd).unwrap();
            assert!(target.is_ascii(), "{target}");
            assert!(http::HeaderValue::from_str(&target).is_ok(), "{target}");
        }
    }

    #[test]
    fn random_inputs_never_panic_and_accepted_ones_start_with_one_slash() {
        let mut rng = fastrand::Rng::with_seed(7);
        let pieces = [
            "/", "\\", "%2f", "%5c", "%25", "%2e", ".", "..", ":", "evil", "@", "?", "#", "%",
            "%0", "é", "\t", " ", "a",
        ];
        for _ in 0..20_000 {
            let n = rng.usize(0..8);
            let rd: String = (0..n).map(|_| pieces[rng.usize(..pieces.len())]).collect();
            if let Some(target) = safe_return_target(&rd) {
                let bytes = target.as_bytes();
                assert_eq!(bytes[0], b'/', "{rd:?}");
                assert!(bytes.get(1) != Some(&b'/'), "{rd:?}");
                assert!(!target.contains('\\'), "{rd:?}");
                let decoded = percent_decode(bytes).decode_utf8_lossy().into_owned();
                assert!(!decoded.starts_with("//"), "{rd:?}");
                assert!(!decoded.contains('\\'), "{rd:?}");
            }
        }
    }
}
