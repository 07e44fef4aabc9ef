//! `application/x-www-form-urlencoded` parsing and encoding, for query strings and form bodies.

use std::borrow::Cow;
use std::collections::HashMap;

use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Bytes left as they are when encoding: the RFC 3986 unreserved characters.
const ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a query string or form body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FormError {
    /// A name or value did not decode to UTF-8.
    NotUtf8,
    /// A parameter appeared more than once (RFC 6749 §3.1 forbids repeats).
    Repeated(String),
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("parameters are not valid UTF-8"),
            Self::Repeated(name) => write!(f, "parameter `{name}` is repeated"),
        }
    }
}

/// Decoded parameters. Per RFC 6749 §3.1 a parameter sent without a value counts as omitted.
#[derive(Debug, Default, Clone)]
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    /// Parses `a=1&b=two+words&c=%2F`; empty pieces are skipped, repeats are an error.
    pub(crate) fn parse(input: &str) -> Result<Self, FormError> {
        let mut map = HashMap::new();
        for piece in input.split('&').filter(|piece| !piece.is_empty()) {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            let name = decode(name)?;
            let value = decode(value)?;
            if value.is_empty() {
                continue;
            }
            if map.contains_key(&name) {
                return Err(FormError::Repeated(name));
            }
            map.insert(name, value);
        }
        Ok(Self(map))
    }

    /// Parses a request body; bytes that are not UTF-8 are refused.
    pub(crate) fn parse_bytes(input: &[u8]) -> Result<Self, FormError> {
        std::str::from_utf8(input)
            .map_err(|_| FormError::NotUtf8)
            .and_then(Self::parse)
    }

    /// The value of `name`, if present and not empty.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// Decodes one name or value: `+` is a space, then `%XX` escapes.
pub(crate) fn decode(raw: &str) -> Result<String, FormError> {
    let spaced: Cow<'_, str> = if raw.contains('+') {
        Cow::Owned(raw.replace('+', " "))
    } else {
        Cow::Borrowed(raw)
    };
    percent_decode(spaced.as_bytes())
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| FormError::NotUtf8)
}

/// Percent-encodes everything but the unreserved characters.
pub(crate) fn encode(value: &str) -> String {
    utf8_percent_encode(value, ENCODE_SET).to_string()
}

/// Appends `pairs` to `base` as query parameters (`?` or `&` as needed).
pub(crate) fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut url = base.to_owned();
    let mut separator = if base.contains('?') { '&' } else { '?' };
    for (name, value) in pairs {
        url.push(separator);
        url.push_str(&encode(name));
        url.push('=');
        url.push_str(&encode(value));
        separator = '&';
    }
    url
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_plus_and_percent_escapes() {
        let params = Params::parse("a=1&b=two+words&c=%2F%2B&d=&e").unwrap();
        assert_eq!(params.get("a"), Some("1"));
        assert_eq!(params.get("b"), Some("two words"));
        assert_eq!(params.get("c"), Some("/+"));
        assert_eq!(params.get("d"), None, "empty value counts as omitted");
        assert_eq!(params.get("e"), None);
    }

    #[test]
    fn refuses_repeats_and_bad_utf8() {
        assert_eq!(
            Params::parse("a=1&a=2").unwrap_err(),
            FormError::Repeated("a".into())
        );
        assert_eq!(Params::parse("a=%FF").unwrap_err(), FormError::NotUtf8);
        assert_eq!(
            Params::parse_bytes(b"a=\xff").unwrap_err(),
            FormError::NotUtf8
        );
        // A stray `%` that is not an escape is kept literally, not a panic.
        assert_eq!(Params::parse("a=%zz%").unwrap().get("a"), Some("%zz%"));
    }

    #[test]
    fn encodes_round_trip() {
        let url = with_query(
            "http://h/cb?x=1",
            &[("state", "a b&c=d/é"), ("code", "Z-_.~")],
        );
        assert_eq!(
            url,
            "http://h/cb?x=1&state=a%20b%26c%3Dd%2F%C3%A9&code=Z-_.~"
        );
        let query = url.split_once('?').unwrap().1;
        assert_eq!(
            Params::parse(query).unwrap().get("state"),
            Some("a b&c=d/é")
        );
    }
}
