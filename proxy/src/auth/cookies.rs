//! Cookie plumbing: the names and attributes of our cookies, chunking of large sessions,
//! tolerant parsing of `Cookie` headers, and stripping our cookies before a request goes upstream.
//!
//! - Session: `__Host-custodia_session` when the public URL is https (`Secure` is then set and
//!   the `__Host-` prefix makes the browser refuse any `Domain` or non-`/` path for it), else
//!   `custodia_session`. Values over [`CHUNK_LEN`] bytes are split into `NAME.0`, `NAME.1`, …
//! - Login state: one cookie per login attempt, `custodia_login_<id>` (or with `__Host-`), so two
//!   tabs logging in at once do not overwrite each other.
//! - Logout hint: `custodia_logout` (`__Secure-custodia_logout` when secure; `__Host-` would
//!   force `Path=/`) with `Path=/logout`, so the ID token it carries travels only to /logout and
//!   the session cookie checked on every request stays small.
//! - Attributes are `Path=/; HttpOnly; SameSite=Lax` (+ `Secure`; the logout hint's path is
//!   `/logout`), never `Domain`.
//!   `SameSite=Lax` still sends the login cookie on the IdP's top-level GET redirect to /callback.

use std::borrow::Cow;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::seal::MAX_SEALED_LEN;

/// Largest value carried by one session cookie; with name and attributes a `Set-Cookie` stays
/// under the 4096 bytes every browser accepts per cookie.
pub const CHUNK_LEN: usize = 3800;
/// Most chunks a session may use (`NAME.0` … `NAME.7`).
pub const MAX_CHUNKS: usize = 8;
/// Longest session value we write or read back: what fits in the chunks *and* what `unseal`
/// will open.
pub const MAX_SESSION_VALUE_LEN: usize = if MAX_SEALED_LEN < CHUNK_LEN * MAX_CHUNKS {
    MAX_SEALED_LEN
} else {
    CHUNK_LEN * MAX_CHUNKS
};

const SESSION_NAME: &str = "custodia_session";
const SECURE_SESSION_NAME: &str = "__Host-custodia_session";
const LOGIN_PREFIX: &str = "custodia_login_";
const LOGOUT_HINT_NAME: &str = "custodia_logout";
const SECURE_LOGOUT_HINT_NAME: &str = "__Secure-custodia_logout";
/// The only path browsers send the logout hint to.
const LOGOUT_HINT_PATH: &str = "/logout";
const SECURE_LOGIN_PREFIX: &str = "__Host-custodia_login_";
/// Characters of the login-cookie id (base64url of SHA-256(state)): 96 bits.
const LOGIN_ID_LEN: usize = 16;

/// Why a session cookie cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    #[error(
        "session cookie value of {len} bytes is too large (at most {max}, \
         {MAX_CHUNKS} cookies of {CHUNK_LEN}); the identity provider's tokens or claims are \
         unusually large"
    )]
    TooLarge { len: usize, max: usize },
    #[error("cookie value is empty or has characters a cookie cannot carry")]
    InvalidValue,
}

/// How our cookies are written; `secure` is true when the public URL is https.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieSettings {
    pub secure: bool,
}

impl CookieSettings {
    /// `__Host-custodia_session` when secure, else `custodia_session`.
    pub fn session_cookie_name(&self) -> &'static str {
        if self.secure {
            SECURE_SESSION_NAME
        } else {
            SESSION_NAME
        }
    }

    /// `NAME.index`, the name of one chunk of a large session.
    pub fn session_chunk_name(&self, index: usize) -> String {
        format!("{}.{index}", self.session_cookie_name())
    }

    /// `Set-Cookie` values that store `value` as the session.
    ///
    /// Up to [`CHUNK_LEN`] bytes go in one cookie under the plain name; longer values are split
    /// into `NAME.0` … `NAME.(n-1)`. Every *other* session cookie name (the plain one or the
    /// unused chunk numbers up to [`MAX_CHUNKS`]) is expired in the same response, so a session
    /// that shrank or grew never leaves stale pieces that would spoil the reassembly. That is at
    /// most 9 headers, written only at login.
    pub fn set_session_cookies(
        &self,
        value: &str,
        max_age: Duration,
    ) -> Result<Vec<String>, CookieError> {
        if value.is_empty() || !is_cookie_value(value.as_bytes()) {
            return Err(CookieError::InvalidValue);
        }
        if value.len() > MAX_SESSION_VALUE_LEN {
            return Err(CookieError::TooLarge {
                len: value.len(),
                max: MAX_SESSION_VALUE_LEN,
            });
        }
        let max_age = max_age.as_secs();
        let mut headers = Vec::with_capacity(MAX_CHUNKS + 1);
        if value.len() <= CHUNK_LEN {
            headers.push(self.set_cookie(self.session_cookie_name(), value, max_age));
            for index in 0..MAX_CHUNKS {
                headers.push(self.set_cookie(&self.session_chunk_name(index), "", 0));
            }
        } else {
            // `value` is ASCII (checked above), so every byte offset is a char boundary.
            let mut rest = value;
            let mut index = 0;
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(rest.len().min(CHUNK_LEN));
                headers.push(self.set_cookie(&self.session_chunk_name(index), chunk, max_age));
                rest = tail;
                index += 1;
            }
            headers.push(self.set_cookie(self.session_cookie_name(), "", 0));
            for index in index..MAX_CHUNKS {
                headers.push(self.set_cookie(&self.session_chunk_name(index), "", 0));
            }
        }
        Ok(headers)
    }

    /// `Set-Cookie` values that delete the session: the plain name and every chunk name.
    pub fn clear_session_cookies(&self) -> Vec<String> {
        std::iter::once(self.set_cookie(self.session_cookie_name(), "", 0))
            .chain((0..MAX_CHUNKS).map(|i| self.set_cookie(&self.session_chunk_name(i), "", 0)))
            .collect()
    }

    /// `Set-Cookie` values that delete the session cookies `cookie_headers` carry (the plain
    /// name, the chunks): the ones a refused session came in, and no more.
    pub fn clear_sent_session_cookies<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a [u8]>,
    ) -> Vec<String> {
        let name = self.session_cookie_name();
        let mut plain = false;
        let mut chunks = [false; MAX_CHUNKS];
        for header in cookie_headers {
            for (n, _) in cookie_pairs(header) {
                if n == name.as_bytes() {
                    plain = true;
                } else if let Some(sent) =
                    chunk_index(n, name.as_bytes()).and_then(|i| chunks.get_mut(i))
                {
                    *sent = true;
                }
            }
        }
        let plain = plain.then(|| self.set_cookie(name, "", 0));
        let chunks = (0..MAX_CHUNKS)
            .filter(|&i| chunks[i])
            .map(|i| self.set_cookie(&self.session_chunk_name(i), "", 0));
        plain.into_iter().chain(chunks).collect()
    }

    /// The session value from the request's `Cookie` headers (all of them, in order).
    ///
    /// The plain name wins if present and non-empty; otherwise chunks `NAME.0`, `NAME.1`, … are
    /// joined, and they must run without a gap from `.0` (a missing or empty chunk followed by a
    /// later one gives `None`). For a duplicated name the first occurrence wins. Values that are
    /// not valid cookie octets, or longer than [`MAX_SESSION_VALUE_LEN`] in total, give `None`.
    /// Only the name for the current `secure` setting is read.
    pub fn read_session<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a [u8]>,
    ) -> Option<String> {
        let found = self.find_session(cookie_headers)?;
        cookie_text(&found).map(str::to_owned)
    }

    /// [`CookieSettings::read_session`] before its octet check: the value as sent (chunks
    /// joined), at most [`MAX_SESSION_VALUE_LEN`] bytes. Pass it through [`cookie_text`]
    /// before reading it; the session memo compares it with values that passed, first.
    pub fn find_session<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a [u8]>,
    ) -> Option<Cow<'a, [u8]>> {
        let name = self.session_cookie_name().as_bytes();
        let mut plain: Option<&[u8]> = None;
        let mut chunks: [Option<&[u8]>; MAX_CHUNKS] = [None; MAX_CHUNKS];
        for header in cookie_headers {
            for (n, v) in cookie_pairs(header) {
                if n == name {
                    plain.get_or_insert(v);
                } else if let Some(index) = chunk_index(n, name) {
                    if let Some(slot) = chunks.get_mut(index) {
                        slot.get_or_insert(v);
                    }
                }
            }
        }
        if let Some(value) = plain.filter(|v| !v.is_empty()) {
            return (value.len() <= MAX_SESSION_VALUE_LEN).then_some(Cow::Borrowed(value));
        }
        joined_chunks(&chunks)
    }

    /// The session's chunks (`NAME.0`, `NAME.1`, …) in `cookie_headers`, joined.
    fn join_chunks<'a>(
        name: &[u8],
        cookie_headers: impl Iterator<Item = &'a [u8]>,
    ) -> Option<Cow<'a, [u8]>> {
        let mut chunks: [Option<&[u8]>; MAX_CHUNKS] = [None; MAX_CHUNKS];
        for header in cookie_headers {
            for (n, v) in cookie_pairs(header) {
                if let Some(slot) = chunk_index(n, name).and_then(|i| chunks.get_mut(i)) {
                    slot.get_or_insert(v);
                }
            }
        }
        joined_chunks(&chunks)
    }

    /// Every session value sent: each cookie of the session's name, in order, then the chunks
    /// joined. More than one comes when a browser also holds a stale cookie of that name (on a
    /// longer path, which it sends first, or from a sibling host). Read only when the one
    /// [`CookieSettings::find_session`] found fails, so the request path pays nothing for it.
    pub fn all_sessions<'a, I: Iterator<Item = &'a [u8]>>(
        &self,
        cookie_headers: impl Fn() -> I,
    ) -> Vec<Cow<'a, [u8]>> {
        let name = self.session_cookie_name().as_bytes();
        let mut all: Vec<Cow<'a, [u8]>> = cookie_headers()
            .flat_map(cookie_pairs)
            .filter(|(n, v)| *n == name && !v.is_empty() && v.len() <= MAX_SESSION_VALUE_LEN)
            .map(|(_, v)| Cow::Borrowed(v))
            .collect();
        all.extend(CookieSettings::join_chunks(name, cookie_headers()));
        all
    }

    /// `custodia_login_<id>` (`__Host-` prefixed when secure), where `id` is the first 16
    /// characters of base64url(SHA-256(state)).
    pub fn login_cookie_name(&self, state: &str) -> String {
        let mut id = URL_SAFE_NO_PAD.encode(Sha256::digest(state.as_bytes()));
        id.truncate(LOGIN_ID_LEN);
        let prefix = if self.secure {
            SECURE_LOGIN_PREFIX
        } else {
            LOGIN_PREFIX
        };
        format!("{prefix}{id}")
    }

    /// `Set-Cookie` value storing a sealed login state for `state`. `value` must be a sealed
    /// value (base64url characters), which needs no escaping.
    pub fn set_login_cookie(&self, state: &str, value: &str, max_age: Duration) -> String {
        self.set_cookie(&self.login_cookie_name(state), value, max_age.as_secs())
    }

    /// `Set-Cookie` value deleting the login cookie for `state`.
    pub fn clear_login_cookie(&self, state: &str) -> String {
        self.set_cookie(&self.login_cookie_name(state), "", 0)
    }

    /// `Set-Cookie` values deleting the oldest of the login cookies in the request's `Cookie`
    /// headers so that, with the one a new login adds, at most `keep + 1` remain. Each
    /// abandoned login leaves its cookie for [`crate::auth::login_state::LOGIN_STATE_TTL`]:
    /// without a bound, enough of them make the browser's `Cookie` header too large for any
    /// request (431), `/login` included. Browsers send older cookies first (RFC 6265 §5.4).
    pub fn clear_stale_login_cookies<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a [u8]>,
        keep: usize,
    ) -> Vec<String> {
        let prefix = if self.secure {
            SECURE_LOGIN_PREFIX
        } else {
            LOGIN_PREFIX
        };
        let names: Vec<&[u8]> = cookie_headers
            .flat_map(cookie_parts)
            .filter_map(cookie_part_name)
            // Ours are base64url after the prefix; anything else is not ours to name back.
            .filter(|name| {
                name.starts_with(prefix.as_bytes())
                    && name
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .collect();
        let stale = names.len().saturating_sub(keep);
        names
            .iter()
            .take(stale)
            .map(|name| self.set_cookie(&String::from_utf8_lossy(name), "", 0))
            .collect()
    }

    /// The login cookie for `state` from the request's `Cookie` headers.
    pub fn read_login_cookie<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a [u8]>,
        state: &str,
    ) -> Option<String> {
        read_cookie(cookie_headers, &self.login_cookie_name(state))
    }

    /// `__Secure-custodia_logout` when secure, else `custodia_logout`.
    pub fn logout_hint_cookie_name(&self) -> &'static str {
        if self.secure {
            SECURE_LOGOUT_HINT_NAME
        } else {
            LOGOUT_HINT_NAME
        }
    }

    /// `Set-Cookie` value storing a sealed logout hint, sent back only to `/logout`.
    pub fn set_logout_hint_cookie(
        &self,
        value: &str,
        max_age: Duration,
    ) -> Result<String, CookieError> {
        if value.is_empty() || !is_cookie_value(value.as_bytes()) {
            return Err(CookieError::InvalidValue);
        }
        if value.len() > CHUNK_LEN {
            return Err(CookieError::TooLarge {
                len: value.len(),
                max: CHUNK_LEN,
            });
        }
        Ok(self.cookie_at(
            self.logout_hint_cookie_name(),
            value,
            max_age.as_secs(),
            LOGOUT_HINT_PATH,
        ))
    }

    /// `Set-Cookie` value deleting the logout hint.
    pub fn clear_logout_hint_cookie(&self) -> String {
        self.cookie_at(self.logout_hint_cookie_name(), "", 0, LOGOUT_HINT_PATH)
    }

    /// The sealed logout hint from the request's `Cookie` headers.
    pub fn read_logout_hint<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a [u8]>,
    ) -> Option<String> {
        read_cookie(cookie_headers, self.logout_hint_cookie_name())
    }

    fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> String {
        self.cookie_at(name, value, max_age, "/")
    }

    fn cookie_at(&self, name: &str, value: &str, max_age: u64, path: &str) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{name}={value}; Max-Age={max_age}; Path={path}; HttpOnly; SameSite=Lax{secure}")
    }
}

/// The first non-empty value of cookie `name` (exact, case-sensitive) in the `Cookie` headers;
/// `None` if absent, empty, or not made of cookie octets.
pub fn read_cookie<'a>(
    cookie_headers: impl Iterator<Item = &'a [u8]>,
    name: &str,
) -> Option<String> {
    let name = name.as_bytes();
    for header in cookie_headers {
        if let Some((_, value)) = cookie_pairs(header).find(|(n, _)| *n == name) {
            return if value.is_empty() {
                None
            } else {
                cookie_text(value).map(str::to_owned)
            };
        }
    }
    None
}

/// The `Cookie` header without our session (any chunk) and login-state cookies, under either the
/// secure or the plain name; `None` when nothing else remains. A header with none of ours comes
/// back unchanged.
///
/// Names are matched ASCII case-insensitively and with an optional `__Host-`/`__Secure-`
/// prefix: stripping too much here can only hide a look-alike from the workers.
pub fn strip_custodia_cookies(cookie_header: &str) -> Option<String> {
    strip_custodia_cookie_bytes(cookie_header.as_bytes()).map(|kept| {
        match String::from_utf8(kept) {
            Ok(kept) => kept,
            // Splitting UTF-8 at ';' and trimming ASCII whitespace keeps it UTF-8.
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    })
}

/// [`strip_custodia_cookies`] for a header value that need not be UTF-8.
pub fn strip_custodia_cookie_bytes(cookie_header: &[u8]) -> Option<Vec<u8>> {
    // One pass over the parts (a session cookie is a few hundred bytes, on every signed-in
    // request); nothing is allocated when ours is all there is.
    let mut kept = Vec::new();
    let mut stripped = false;
    let mut any = false;
    for part in cookie_parts(cookie_header) {
        let trimmed = part.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        any = true;
        if cookie_part_name(part).is_some_and(is_custodia_cookie_name) {
            stripped = true;
            continue;
        }
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(trimmed);
    }
    if !stripped {
        return any.then(|| cookie_header.to_vec());
    }
    (!kept.is_empty()).then_some(kept)
}

/// Whether `name` is (a look-alike of) one of our cookies: `custodia_session`, `custodia_session.N`,
/// `custodia_login_*`, `custodia_logout`, with or without `__Host-`/`__Secure-`, in any ASCII case.
pub fn is_custodia_cookie_name(name: &[u8]) -> bool {
    let rest = strip_prefix_ignore_case(name, b"__host-")
        .or_else(|| strip_prefix_ignore_case(name, b"__secure-"))
        .unwrap_or(name);
    if let Some(after) = strip_prefix_ignore_case(rest, SESSION_NAME.as_bytes()) {
        return after.is_empty() || after[0] == b'.';
    }
    rest.eq_ignore_ascii_case(LOGOUT_HINT_NAME.as_bytes())
        || strip_prefix_ignore_case(rest, LOGIN_PREFIX.as_bytes()).is_some()
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// The `;`-separated parts of one `Cookie` header, untrimmed. memchr: a session cookie is a few
/// hundred bytes to skip over on every request, more than once.
pub(crate) fn cookie_parts(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(header);
    std::iter::from_fn(move || {
        let header = rest?;
        match memchr::memchr(b';', header) {
            Some(end) => {
                rest = Some(&header[end + 1..]);
                Some(&header[..end])
            }
            None => {
                rest = None;
                Some(header)
            }
        }
    })
}

/// The trimmed name of a `name=value` cookie part; `None` for a part without `=`.
pub(crate) fn cookie_part_name(part: &[u8]) -> Option<&[u8]> {
    let part = part.trim_ascii_start();
    memchr::memchr(b'=', part).map(|eq| part[..eq].trim_ascii_end())
}

/// Chunks found in order, joined: `None` when the first is missing or empty, one after a gap
/// is set, or they add up to more than [`MAX_SESSION_VALUE_LEN`].
fn joined_chunks<'a>(chunks: &[Option<&'a [u8]>; MAX_CHUNKS]) -> Option<Cow<'a, [u8]>> {
    let count = chunks
        .iter()
        .take_while(|c| c.is_some_and(|v| !v.is_empty()))
        .count();
    if count == 0 || chunks[count..].iter().any(Option::is_some) {
        return None;
    }
    let present = chunks[..count].iter().flatten();
    let total: usize = present.clone().map(|c| c.len()).sum();
    if total > MAX_SESSION_VALUE_LEN {
        return None;
    }
    let mut joined = Vec::with_capacity(total);
    for chunk in present {
        joined.extend_from_slice(chunk);
    }
    Some(Cow::Owned(joined))
}

/// `(name, value)` pairs of one `Cookie` header, RFC 6265 style but tolerant: `;` separated,
/// whitespace around names and values ignored, one pair of surrounding quotes removed, a part
/// without `=` read as a nameless value. Borrowed, no allocation.
fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    cookie_parts(header).filter_map(|part| {
        let part = part.trim_ascii();
        if part.is_empty() {
            return None;
        }
        let (name, value) = match memchr::memchr(b'=', part) {
            Some(eq) => (part[..eq].trim_ascii(), part[eq + 1..].trim_ascii()),
            None => (&[][..], part),
        };
        let value = match value {
            [b'"', inner @ .., b'"'] => inner,
            _ => value,
        };
        Some((name, value))
    })
}

/// `NAME.<digit>` → the digit's value.
fn chunk_index(cookie_name: &[u8], base: &[u8]) -> Option<usize> {
    match cookie_name.strip_prefix(base)? {
        [b'.', digit @ b'0'..=b'9'] => Some(usize::from(digit - b'0')),
        _ => None,
    }
}

/// RFC 6265 `cookie-octet`s: visible ASCII except `"` `,` `;` `\`.
fn is_cookie_value(value: &[u8]) -> bool {
    // A table lookup per byte: the session cookie is checked on every signed-in request, and
    // the chain of range comparisons cost more than opening the cookie's AES-GCM seal.
    value.iter().all(|&b| COOKIE_OCTETS[usize::from(b)])
}

const COOKIE_OCTETS: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x21;
    while b <= 0x7E {
        table[b] = !matches!(b, 0x22 | 0x2C | 0x3B | 0x5C);
        b += 1;
    }
    table
};

/// A cookie value (e.g. one found by [`CookieSettings::find_session`]) as text, if it is all
/// cookie octets (RFC 6265) and at most [`MAX_SESSION_VALUE_LEN`] bytes; `None` otherwise.
pub fn cookie_text(value: &[u8]) -> Option<&str> {
    if value.len() > MAX_SESSION_VALUE_LEN || !is_cookie_value(value) {
        return None;
    }
    std::str::from_utf8(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn cookie_octets_are_rfc_6265s() {
        for b in 0..=255u8 {
            // cookie-octet = %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E
            let rfc = matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E);
            assert_eq!(is_cookie_value(&[b]), rfc, "byte {b:#04x}");
        }
        assert!(is_cookie_value(b"abc-DEF_123.~!#$%&'()*+/:<=>?@[]^`{|}"));
        assert!(!is_cookie_value(b"has space"));
    }

    const SECURE: CookieSettings = CookieSettings { secure: true };
    const PLAIN: CookieSettings = CookieSettings { secure: false };
    const EIGHT_HOURS: Duration = Duration::from_secs(8 * 3600);

    /// A browser's cookie jar, just enough of one: applies `Set-Cookie` values, renders `Cookie`.
    #[derive(Default)]
    struct Jar(BTreeMap<String, String>);

    impl Jar {
        fn apply(&mut self, set_cookies: &[String]) {
            for line in set_cookies {
                let (pair, attrs) = line.split_once("; ").unwrap();
                let (name, value) = pair.split_once('=').unwrap();
                let max_age: u64 = attrs
                    .split("; ")
                    .find_map(|a| a.strip_prefix("Max-Age="))
                    .unwrap()
                    .parse()
                    .unwrap();
                if max_age == 0 {
                    self.0.remove(name);
                } else {
                    self.0.insert(name.to_string(), value.to_string());
                }
            }
        }

        fn header(&self) -> String {
            let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
            pairs.join("; ")
        }

        fn names(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }

    fn value(len: usize) -> String {
        // A stand-in for a sealed value: base64url-ish characters with a position pattern, so a
        // misordered reassembly is caught.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..len)
            .map(|i| ALPHABET[(i * 7 + i / 64) % 64] as char)
            .collect()
    }

    fn read(settings: CookieSettings, headers: &[&str]) -> Option<String> {
        settings.read_session(headers.iter().map(|h| h.as_bytes()))
    }

    #[test]
    fn names_and_attributes_follow_the_public_url_scheme() {
        assert_eq!(SECURE.session_cookie_name(), "__Host-custodia_session");
        assert_eq!(PLAIN.session_cookie_name(), "custodia_session");
        assert_eq!(SECURE.session_chunk_name(3), "__Host-custodia_session.3");

        let secure = SECURE.set_session_cookies("v1.abc", EIGHT_HOURS).unwrap();
        assert_eq!(
            secure[0],
            "__Host-custodia_session=v1.abc; Max-Age=28800; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
        let plain = PLAIN.set_session_cookies("v1.abc", EIGHT_HOURS).unwrap();
        assert_eq!(
            plain[0],
            "custodia_session=v1.abc; Max-Age=28800; Path=/; HttpOnly; SameSite=Lax"
        );
        for line in secure.iter().chain(&plain) {
            assert!(!line.to_ascii_lowercase().contains("domain"), "{line}");
            assert!(line.contains("; Path=/; HttpOnly; SameSite=Lax"), "{line}");
        }
        assert!(secure.iter().all(|l| l.ends_with("; Secure")));
        assert!(plain.iter().all(|l| !l.contains("Secure")));
    }

    #[test]
    fn a_small_session_is_one_cookie_and_expires_every_chunk() {
        let lines = SECURE.set_session_cookies("v1.small", EIGHT_HOURS).unwrap();
        assert_eq!(lines.len(), 1 + MAX_CHUNKS);
        for (i, line) in lines[1..].iter().enumerate() {
            assert_eq!(
                *line,
                format!(
                    "__Host-custodia_session.{i}=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax; Secure"
                )
            );
        }
        let exactly_one_chunk = value(CHUNK_LEN);
        let lines = PLAIN
            .set_session_cookies(&exactly_one_chunk, EIGHT_HOURS)
            .unwrap();
        assert!(lines[0].starts_with(&format!("custodia_session={exactly_one_chunk};")));
    }

    #[test]
    fn a_9kb_session_is_split_into_three_chunks_and_reassembled() {
        let big = value(9 * 1024);
        let lines = SECURE.set_session_cookies(&big, EIGHT_HOURS).unwrap();
        let mut jar = Jar::default();
        jar.apply(&lines);
        assert_eq!(
            jar.names(),
            [
                "__Host-custodia_session.0",
                "__Host-custodia_session.1",
                "__Host-custodia_session.2"
            ]
        );
        assert_eq!(jar.0["__Host-custodia_session.0"].len(), CHUNK_LEN);
        assert_eq!(
            jar.0["__Host-custodia_session.2"].len(),
            9 * 1024 - 2 * CHUNK_LEN
        );
        for line in &lines {
            assert!(line.len() < 4096, "a Set-Cookie of {} bytes", line.len());
        }
        assert_eq!(
            read(SECURE, &[&jar.header()]).as_deref(),
            Some(big.as_str())
        );

        // Browsers may send the pieces in any order, or in several Cookie headers.
        let c = |i: usize| {
            format!(
                "__Host-custodia_session.{i}={}",
                jar.0[&format!("__Host-custodia_session.{i}")]
            )
        };
        let shuffled = format!("theme=dark; {}; {}; {}", c(2), c(0), c(1));
        assert_eq!(read(SECURE, &[&shuffled]).as_deref(), Some(big.as_str()));
        assert_eq!(
            read(SECURE, &[&c(1), "a=b", &format!("{}; {}", c(2), c(0))]).as_deref(),
            Some(big.as_str())
        );
    }

    #[test]
    fn rewriting_a_session_of_another_size_leaves_no_stale_pieces() {
        let mut jar = Jar::default();
        let sizes = [9 * 1024, 5000, 100, 12_000, 3801, 7600, 20];
        for len in sizes {
            let v = value(len).replace('A', "B") + &len.to_string();
            jar.apply(&SECURE.set_session_cookies(&v, EIGHT_HOURS).unwrap());
            assert_eq!(read(SECURE, &[&jar.header()]), Some(v.clone()), "len {len}");
            let expected = if v.len() <= CHUNK_LEN {
                1
            } else {
                v.len().div_ceil(CHUNK_LEN)
            };
            assert_eq!(jar.0.len(), expected, "len {len}: {:?}", jar.names());
        }
        jar.apply(&SECURE.clear_session_cookies());
        assert!(jar.0.is_empty(), "{:?}", jar.names());
        assert_eq!(read(SECURE, &[&jar.header()]), None);
    }

    #[test]
    fn clearing_names_the_plain_cookie_and_every_chunk() {
        let lines = PLAIN.clear_session_cookies();
        assert_eq!(lines.len(), 1 + MAX_CHUNKS);
        assert_eq!(
            lines[0],
            "custodia_session=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            lines[8],
            "custodia_session.7=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn oversized_or_unsafe_values_are_refused() {
        assert_eq!(MAX_SESSION_VALUE_LEN, MAX_SEALED_LEN);
        assert!(SECURE
            .set_session_cookies(&value(MAX_SESSION_VALUE_LEN), EIGHT_HOURS)
            .is_ok());
        assert_eq!(
            SECURE.set_session_cookies(&value(MAX_SESSION_VALUE_LEN + 1), EIGHT_HOURS),
            Err(CookieError::TooLarge {
                len: MAX_SESSION_VALUE_LEN + 1,
                max: MAX_SESSION_VALUE_LEN
            })
        );
        assert_eq!(
            SECURE.set_session_cookies(&value(CHUNK_LEN * MAX_CHUNKS + 1), EIGHT_HOURS),
            Err(CookieError::TooLarge {
                len: CHUNK_LEN * MAX_CHUNKS + 1,
                max: MAX_SESSION_VALUE_LEN
            })
        );
        for bad in ["", "a b", "a;b", "a,b", "a\"b", "a\\b", "é", "a\nb"] {
            assert_eq!(
                SECURE.set_session_cookies(bad, EIGHT_HOURS),
                Err(CookieError::InvalidValue),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parsing_tolerates_what_real_clients_send() {
        let s = Some("v1.abc".to_string());
        assert_eq!(read(PLAIN, &["custodia_session=v1.abc"]), s);
        assert_eq!(read(PLAIN, &["a=1;custodia_session=v1.abc;b=2"]), s);
        assert_eq!(read(PLAIN, &["a=1 ;  custodia_session = v1.abc  ; b=2"]), s);
        assert_eq!(read(PLAIN, &["\tcustodia_session=v1.abc\t"]), s);
        assert_eq!(read(PLAIN, &["custodia_session=\"v1.abc\""]), s);
        assert_eq!(read(PLAIN, &[";;custodia_session=v1.abc;;"]), s);
        assert_eq!(read(PLAIN, &["nameless; custodia_session=v1.abc"]), s);
        assert_eq!(read(PLAIN, &["x=1", "custodia_session=v1.abc"]), s);
        // First occurrence wins, across headers too.
        assert_eq!(
            read(
                PLAIN,
                &["custodia_session=v1.abc; custodia_session=v1.evil"]
            ),
            s
        );
        assert_eq!(
            read(PLAIN, &["custodia_session=v1.abc", "custodia_session=v1.x"]),
            s
        );
        // The plain cookie wins over chunks.
        assert_eq!(
            read(PLAIN, &["custodia_session.0=v1.; custodia_session=v1.abc"]),
            s
        );
    }

    #[test]
    fn parsing_refuses_lookalikes_gaps_and_junk() {
        for header in [
            "",
            ";",
            "custodia_session",
            "custodia_session=",
            "custodia_session=\"\"",
            "Custodia_Session=v1.abc",
            "custodia_session2=v1.abc",
            "xcustodia_session=v1.abc",
            "__Host-custodia_session=v1.abc",
            "custodia_session=v1 abc",
            "custodia_session=v1.a\\bc",
            "custodia_session=v1.ab,c",
            "custodia_session.1=abc",
            "custodia_session.0=abc; custodia_session.2=def",
            "custodia_session.0=abc; custodia_session.1=; custodia_session.2=def",
            "custodia_session.0=; custodia_session.1=abc",
            "custodia_session.8=abc",
            "custodia_session.00=abc",
        ] {
            assert_eq!(read(PLAIN, &[header]), None, "{header:?}");
        }
        // In secure mode only the __Host- name counts: the plain one can be planted by a
        // sibling domain.
        assert_eq!(read(SECURE, &["custodia_session=v1.abc"]), None);
        assert_eq!(
            read(SECURE, &["__Host-custodia_session=v1.abc"]).as_deref(),
            Some("v1.abc")
        );
        // Non-UTF-8 bytes elsewhere in the header do not hide our cookie.
        let junk: &[u8] = b"\xff\xfe=\x80; custodia_session=v1.ok; \xc3=\x28";
        assert_eq!(
            PLAIN.read_session([junk].into_iter()).as_deref(),
            Some("v1.ok")
        );
        assert_eq!(
            PLAIN.read_session([&b"custodia_session=v1.\xff"[..]].into_iter()),
            None
        );
        // Over-long values are not copied.
        let huge = format!("custodia_session={}", "A".repeat(MAX_SESSION_VALUE_LEN + 1));
        assert_eq!(read(PLAIN, &[&huge]), None);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let alphabet = b"=; \t\"._-,\\0123abc\xff\x80custodia_session__Host-login";
        for _ in 0..5000 {
            let len = rng.usize(0..80);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.bool() {
                        alphabet[rng.usize(..alphabet.len())]
                    } else {
                        rng.u8(..)
                    }
                })
                .collect();
            let _ = PLAIN.read_session([bytes.as_slice()].into_iter());
            let _ = SECURE.read_session([bytes.as_slice(), bytes.as_slice()].into_iter());
            let _ = read_cookie([bytes.as_slice()].into_iter(), "custodia_session");
            if let Some(kept) = strip_custodia_cookie_bytes(&bytes) {
                assert!(PLAIN.read_session([kept.as_slice()].into_iter()).is_none());
                assert!(SECURE.read_session([kept.as_slice()].into_iter()).is_none());
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = strip_custodia_cookies(text);
            }
        }
    }

    #[test]
    fn stripping_removes_every_form_of_our_cookies_and_keeps_the_rest() {
        let cases: &[(&str, Option<&str>)] = &[
            ("theme=dark", Some("theme=dark")),
            ("theme=dark;lang=en", Some("theme=dark;lang=en")),
            ("custodia_session=v1.x", None),
            ("__Host-custodia_session=v1.x", None),
            ("theme=dark; custodia_session=v1.x", Some("theme=dark")),
            ("custodia_session=v1.x; theme=dark", Some("theme=dark")),
            (
                "a=1; __Host-custodia_session.0=x; b=2; __Host-custodia_session.1=y; c=3",
                Some("a=1; b=2; c=3"),
            ),
            (
                "custodia_session.0=x;custodia_session.7=y;custodia_session.12=z",
                None,
            ),
            ("custodia_login_abcDEF0123456789=v1.s; x=1", Some("x=1")),
            ("__Host-custodia_login_abcDEF0123456789=v1.s", None),
            (
                "CUSTODIA_SESSION=v1.x; __host-Custodia_Session.0=y; x=1",
                Some("x=1"),
            ),
            ("__Secure-custodia_session=v1.x; x=1", Some("x=1")),
            ("  custodia_session = v1.x ;x=1", Some("x=1")),
            ("custodia_session=\"v1.x\"; x=\"q\"", Some("x=\"q\"")),
            // Look-alikes that are not ours stay.
            (
                "custodia_sessions=1; custodia_session_x=2",
                Some("custodia_sessions=1; custodia_session_x=2"),
            ),
            ("my_custodia_session=1", Some("my_custodia_session=1")),
            ("custodia_login=1", Some("custodia_login=1")),
            ("custodia_logout=v1.h; x=1", Some("x=1")),
            ("__Secure-custodia_logout=v1.h", None),
            ("custodia_logouts=1", Some("custodia_logouts=1")),
            // A nameless value is not a cookie named like ours.
            ("custodia_session", Some("custodia_session")),
            ("", None),
            ("  ;  ", None),
            ("custodia_session=v1.x; ;", None),
        ];
        for (header, expected) in cases {
            assert_eq!(
                strip_custodia_cookies(header).as_deref(),
                *expected,
                "{header:?}"
            );
        }
        assert_eq!(
            strip_custodia_cookie_bytes(b"\xff=1; custodia_session=v1.x; b=\x80"),
            Some(b"\xff=1; b=\x80".to_vec())
        );
    }

    #[test]
    fn the_logout_hint_goes_only_to_logout() {
        assert_eq!(
            SECURE
                .set_logout_hint_cookie("v1.hint", Duration::from_secs(600))
                .unwrap(),
            "__Secure-custodia_logout=v1.hint; Max-Age=600; Path=/logout; HttpOnly; SameSite=Lax; Secure"
        );
        assert_eq!(
            PLAIN.clear_logout_hint_cookie(),
            "custodia_logout=; Max-Age=0; Path=/logout; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            SECURE.read_logout_hint(
                [&b"__Secure-custodia_logout=v1.hint; custodia_logout=v1.plain"[..]].into_iter()
            ),
            Some("v1.hint".to_string())
        );
        assert_eq!(
            SECURE.read_logout_hint([&b"custodia_logout=v1.planted"[..]].into_iter()),
            None,
            "in secure mode a plain-named cookie is not ours"
        );
        assert_eq!(
            PLAIN.set_logout_hint_cookie(&value(CHUNK_LEN + 1), Duration::from_secs(1)),
            Err(CookieError::TooLarge {
                len: CHUNK_LEN + 1,
                max: CHUNK_LEN
            })
        );
        assert_eq!(
            PLAIN.set_logout_hint_cookie("a;b", Duration::from_secs(1)),
            Err(CookieError::InvalidValue)
        );
    }

    #[test]
    fn login_cookie_names_are_derived_from_the_state() {
        // printf 'state-abc' | openssl dgst -sha256 -binary | base64 | tr '+/' '-_' | cut -c1-16
        assert_eq!(
            PLAIN.login_cookie_name("state-abc"),
            "custodia_login_-TII-zn8V3mSVgTg"
        );
        assert_eq!(
            SECURE.login_cookie_name("state-abc"),
            "__Host-custodia_login_-TII-zn8V3mSVgTg"
        );
        assert_ne!(
            SECURE.login_cookie_name("tab-one"),
            SECURE.login_cookie_name("tab-two"),
            "two logins at once use two cookies"
        );
        for state in ["", "x", "a;b=c", "\u{1F600}", &"s".repeat(500)] {
            let name = SECURE.login_cookie_name(state);
            assert_eq!(name.len(), "__Host-custodia_login_".len() + 16);
            assert!(is_custodia_cookie_name(name.as_bytes()));
        }
    }

    #[test]
    fn abandoned_login_cookies_beyond_the_bound_are_cleared_oldest_first() {
        let names: Vec<String> = (0..6)
            .map(|n| SECURE.login_cookie_name(&format!("tab-{n}")))
            .collect();
        let mut header = String::from("theme=dark");
        for name in &names {
            header.push_str(&format!("; {name}=v1.x"));
        }
        // Look-alikes that are not this config's login cookies stay.
        header.push_str("; custodia_login_plainform=v; __Host-custodia_login_a.b=v");
        let cleared = SECURE.clear_stale_login_cookies([header.as_bytes()].into_iter(), 3);
        let expected: Vec<String> = names[..3]
            .iter()
            .map(|name| format!("{name}=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax; Secure"))
            .collect();
        assert_eq!(cleared, expected);
        let few = SECURE.clear_stale_login_cookies([header.as_bytes()].into_iter(), 6);
        assert!(few.is_empty(), "within the bound nothing is cleared");
        assert!(SECURE
            .clear_stale_login_cookies(std::iter::empty(), 0)
            .is_empty());
    }

    #[test]
    fn login_cookies_are_set_read_and_cleared_per_state() {
        let set = SECURE.set_login_cookie("st1", "v1.login", Duration::from_secs(600));
        assert_eq!(
            set,
            format!(
                "{}=v1.login; Max-Age=600; Path=/; HttpOnly; SameSite=Lax; Secure",
                SECURE.login_cookie_name("st1")
            )
        );
        let clear = SECURE.clear_login_cookie("st1");
        assert!(clear.starts_with(&format!("{}=; Max-Age=0;", SECURE.login_cookie_name("st1"))));

        let mut jar = Jar::default();
        jar.apply(&[
            set,
            SECURE.set_login_cookie("st2", "v1.other", Duration::from_secs(600)),
        ]);
        let header = format!("theme=dark; {}", jar.header());
        let headers = || [header.as_bytes()].into_iter();
        assert_eq!(
            SECURE.read_login_cookie(headers(), "st1").as_deref(),
            Some("v1.login")
        );
        assert_eq!(
            SECURE.read_login_cookie(headers(), "st2").as_deref(),
            Some("v1.other")
        );
        assert_eq!(SECURE.read_login_cookie(headers(), "st3"), None);
        assert_eq!(PLAIN.read_login_cookie(headers(), "st1"), None);
        assert_eq!(read_cookie(headers(), "theme").as_deref(), Some("dark"));
        assert_eq!(read_cookie(headers(), "Theme"), None);
        jar.apply(&[clear]);
        assert_eq!(jar.0.len(), 1);
    }
}
