//! Identity assertions: the HS256 JWT custodia-proxy signs and the worker verifies before trusting it.
//!
//! The proxy strips client-sent identity headers and adds [`IDENTITY_HEADER`] carrying a compact
//! JWS: header `{"alg":"HS256","typ":"JWT"}`, claims `iss` = [`ISSUER`], `aud` = [`AUDIENCE`],
//! `sub`, optional `email`/`name`/`picture`, `iat` and `exp` (unix seconds), all base64url without
//! padding, MAC'd with HMAC-SHA256 under the shared key (`CUSTODIA_ASSERTION_KEY`).
//! [`sign_assertion`] and [`verify_assertion`] are the one codec both sides use.
//!
//! Verification order: size → shape → header (only `HS256`; `none` and every other `alg` are
//! refused before any MAC is computed) → MAC in constant time → claims (`iss`, `aud`, `sub`,
//! `exp`, `iat`). Nothing from the payload is parsed until the MAC has matched.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The request header custodia-proxy puts the signed assertion in (lower-case, as `http` wants).
pub const IDENTITY_HEADER: &str = "x-custodia-identity";
/// The `iss` claim every assertion must carry.
pub const ISSUER: &str = "custodia-proxy";
/// The `aud` claim (or one element of it) every assertion must carry.
pub const AUDIENCE: &str = "custodia-app";
/// The request header of a health check's key check ([`sign_key_check`]).
pub const KEY_CHECK_HEADER: &str = "x-custodia-key-check";
/// The response header in which a worker's `/healthz` says why it fails (a key check it
/// refuses), for the proxy's log: health checks read the answer's head only.
pub const HEALTH_PROBLEM_HEADER: &str = "x-custodia-health";
/// The `aud` of a key check: never [`AUDIENCE`], so no key check is ever taken for a user.
pub const KEY_CHECK_AUDIENCE: &str = "custodia-app-key-check";
/// The `sub` of a key check.
const KEY_CHECK_SUBJECT: &str = "custodia-proxy-health-check";
/// How long a key check is valid: a check's whole round trip.
const KEY_CHECK_TTL_SECS: u64 = 60;
/// Shortest accepted key: 32 bytes, the HMAC-SHA256 output size (RFC 7518 §3.2).
pub const MIN_KEY_LEN: usize = 32;
/// Clock skew tolerated between proxy and worker when checking `exp` and `iat`.
pub const LEEWAY_SECS: u64 = 5;
/// Longest token looked at; a real one is a few hundred bytes, this bounds the work per request.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why a secret (`APP_SECRET_KEY`, an assertion key) is refused, whichever program reads it:
/// the proxy seals sessions with it, and the workers derive the assertion key they trust from
/// it, so a key one of them refuses must not be taken by the other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretWeakness {
    #[error("too weak ({len} bytes; at least {MIN_KEY_LEN} needed)")]
    TooShort { len: usize },
    /// The examples' placeholders are public, and so is anything sealed or signed with them.
    #[error("still the example's placeholder")]
    Placeholder,
    #[error("too weak (only {distinct} different characters; a random key has many more)")]
    FewCharacters { distinct: usize },
    #[error("too weak (a pattern of {period} characters repeated; a random key repeats none)")]
    Repeated { period: usize },
    #[error("too weak (it holds the word `{word}`)")]
    CommonWord { word: &'static str },
}

/// Words of the placeholders in `.env.example` and the docs (compared in lower case).
const PLACEHOLDER_MARKS: [&str; 4] = ["change-me", "changeme", "paste-it", "your-"];

/// Fewer different characters than this is no random key (`openssl rand -hex 32` prints 16
/// different ones, all but certainly; `aaaa…` has one).
const MIN_DISTINCT_SECRET_BYTES: usize = 8;

/// Whether `secret` is too weak to seal sessions or sign assertions with; `None` when it will do.
pub fn secret_weakness(secret: &[u8]) -> Option<SecretWeakness> {
    if secret.len() < MIN_KEY_LEN {
        return Some(SecretWeakness::TooShort { len: secret.len() });
    }
    let lower = secret.to_ascii_lowercase();
    if PLACEHOLDER_MARKS
        .iter()
        .any(|mark| lower.windows(mark.len()).any(|w| w == mark.as_bytes()))
    {
        return Some(SecretWeakness::Placeholder);
    }
    let mut seen = [false; 256];
    for &byte in secret {
        seen[usize::from(byte)] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < MIN_DISTINCT_SECRET_BYTES {
        return Some(SecretWeakness::FewCharacters { distinct });
    }
    // Typed, not drawn: a word a person picks, or one piece typed over and over
    // (`abcdefgh` four times); no random key of this length is either, but by a chance far
    // under one in a million.
    if let Some(word) = COMMON_WORDS
        .into_iter()
        .find(|word| lower.windows(word.len()).any(|w| w == word.as_bytes()))
    {
        return Some(SecretWeakness::CommonWord { word });
    }
    let len = secret.len();
    (1..=len / 2)
        .find(|&p| secret[p..] == secret[..len - p])
        .map(|period| SecretWeakness::Repeated { period })
}

/// Words people type as passwords (compared in lower case).
const COMMON_WORDS: [&str; 3] = ["password", "qwerty", "letmein"];

/// `base64url({"alg":"HS256","typ":"JWT"})`, the only header [`sign_assertion`] writes.
const SIGNED_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// Who the proxy says the user is, once [`verify_assertion`] has checked the proxy said it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The identity provider's subject identifier; never empty.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Profile picture URL as the identity provider gave it (not yet checked to be http(s)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
}

impl Identity {
    /// What to greet the user as: `name`, else `email`, else `sub` (empty strings are skipped).
    pub fn display_name(&self) -> &str {
        [self.name.as_deref(), self.email.as_deref()]
            .into_iter()
            .flatten()
            .find(|s| !s.trim().is_empty())
            .unwrap_or(&self.sub)
    }
}

/// Which of the three JWS segments a decoding error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Header,
    Payload,
    Signature,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Segment::Header => "header",
            Segment::Payload => "payload",
            Segment::Signature => "signature",
        })
    }
}

/// Why an assertion was refused. Every variant means "treat the request as a guest".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssertionError {
    #[error("assertion is {len} bytes, more than the {MAX_TOKEN_LEN} accepted")]
    TooLong { len: usize },
    #[error("assertion is not three dot-separated segments")]
    Malformed,
    #[error("assertion {segment} is not unpadded base64url")]
    Encoding { segment: Segment },
    #[error("assertion {segment} is not a JSON object")]
    NotAnObject { segment: Segment },
    #[error("assertion {segment} is not the expected JSON: {source}")]
    Json {
        segment: Segment,
        #[source]
        source: serde_json::Error,
    },
    #[error("assertion algorithm {alg:?} is not accepted (only HS256)")]
    Algorithm { alg: String },
    #[error("assertion type {typ:?} is not JWT")]
    Type { typ: String },
    #[error("assertion header marks extensions critical (crit), none are supported")]
    CriticalHeader,
    #[error("assertion signature does not match")]
    Signature,
    #[error("assertion issuer {iss:?} is not {ISSUER:?}")]
    Issuer { iss: Option<String> },
    #[error("assertion audience does not include {AUDIENCE:?}")]
    Audience,
    #[error("assertion has no subject (sub)")]
    MissingSubject,
    #[error("assertion has no expiry (exp)")]
    MissingExpiry,
    #[error("assertion expired at {exp} (now {now}, leeway {LEEWAY_SECS}s)")]
    Expired { exp: u64, now: u64 },
    #[error("assertion issued in the future at {iat} (now {now}, leeway {LEEWAY_SECS}s)")]
    IssuedInFuture { iat: u64, now: u64 },
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

/// `aud` may be one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn includes(&self, wanted: &str) -> bool {
        match self {
            Audience::One(aud) => aud == wanted,
            Audience::Many(auds) => auds.iter().any(|aud| aud == wanted),
        }
    }
}

#[derive(Deserialize)]
struct ClaimsIn {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    picture: Option<String>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    exp: Option<u64>,
}

#[derive(Serialize)]
struct ClaimsOut<'a> {
    iss: &'static str,
    aud: &'static str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    picture: Option<&'a str>,
    iat: u64,
    exp: u64,
}

fn mac_with(key: &[u8]) -> HmacSha256 {
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        // HMAC pads or hashes keys of any length; `new_from_slice` has no failing case for it.
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    }
}

fn decode(segment: Segment, text: &str) -> Result<Vec<u8>, AssertionError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| AssertionError::Encoding { segment })
}

/// Decodes a segment and parses it as a JSON object.
fn parse_object<T: serde::de::DeserializeOwned>(
    segment: Segment,
    text: &str,
) -> Result<T, AssertionError> {
    let json = decode(segment, text)?;
    // serde's derived structs also accept a positional array (`["HS256"]`); JOSE says object.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(AssertionError::NotAnObject { segment });
    }
    serde_json::from_slice(&json).map_err(|source| AssertionError::Json { segment, source })
}

/// The assertion key both sides use when `CUSTODIA_ASSERTION_KEY` is not set: derived from the
/// seed's `APP_SECRET_KEY` (HMAC-SHA256 under a fixed label, hex), so the seed's `.env` works
/// unchanged. It is unrelated to the keys that seal session cookies.
pub fn derive_assertion_key(app_secret_key: &str) -> String {
    let mut mac = mac_with(app_secret_key.as_bytes());
    mac.update(b"custodia/v1/identity-assertion");
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Signs `identity` as an assertion valid from `now_unix` for `ttl_secs` seconds.
///
/// The key should be at least [`MIN_KEY_LEN`] bytes; callers check that once at startup.
pub fn sign_assertion(identity: &Identity, key: &[u8], now_unix: u64, ttl_secs: u64) -> String {
    sign_for(AUDIENCE, identity, key, now_unix, ttl_secs)
}

/// A key check, sent by the proxy's health checks to the workers: a worker that refuses it
/// would refuse every signed-in user's assertion (another key, a skewed clock), and is not
/// healthy. Signed as an assertion, but for [`KEY_CHECK_AUDIENCE`], which
/// [`verify_assertion`] refuses.
pub fn sign_key_check(key: &[u8], now_unix: u64) -> String {
    let probe = Identity {
        sub: KEY_CHECK_SUBJECT.to_string(),
        ..Identity::default()
    };
    sign_for(
        KEY_CHECK_AUDIENCE,
        &probe,
        key,
        now_unix,
        KEY_CHECK_TTL_SECS,
    )
}

/// Whether `token` is a key check signed under `key` and valid at `now_unix`.
pub fn verify_key_check(token: &str, key: &[u8], now_unix: u64) -> Result<(), AssertionError> {
    verify_for(KEY_CHECK_AUDIENCE, token, key, now_unix).map(|_| ())
}

fn sign_for(
    audience: &'static str,
    identity: &Identity,
    key: &[u8],
    now_unix: u64,
    ttl_secs: u64,
) -> String {
    let claims = ClaimsOut {
        iss: ISSUER,
        aud: audience,
        sub: &identity.sub,
        email: identity.email.as_deref(),
        name: identity.name.as_deref(),
        picture: identity.picture.as_deref(),
        iat: now_unix,
        exp: now_unix.saturating_add(ttl_secs),
    };
    let payload = match serde_json::to_vec(&claims) {
        Ok(json) => json,
        // A struct of strings and integers always serialises.
        Err(_) => unreachable!("assertion claims always serialise"),
    };
    let mut token = String::with_capacity(SIGNED_HEADER.len() + payload.len() * 4 / 3 + 48);
    token.push_str(SIGNED_HEADER);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let mut mac = mac_with(key);
    mac.update(token.as_bytes());
    let signature = mac.finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    token
}

/// Verifies an assertion made by [`sign_assertion`] (or any conforming HS256 JWT) under `key`,
/// at time `now_unix`, and returns the identity it vouches for.
pub fn verify_assertion(
    token: &str,
    key: &[u8],
    now_unix: u64,
) -> Result<Identity, AssertionError> {
    verify_for(AUDIENCE, token, key, now_unix)
}

fn verify_for(
    audience: &str,
    token: &str,
    key: &[u8],
    now_unix: u64,
) -> Result<Identity, AssertionError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AssertionError::TooLong { len: token.len() });
    }
    let (header_b64, rest) = token.split_once('.').ok_or(AssertionError::Malformed)?;
    let (payload_b64, signature_b64) = rest.split_once('.').ok_or(AssertionError::Malformed)?;
    if signature_b64.contains('.') {
        return Err(AssertionError::Malformed);
    }

    let header: Header = parse_object(Segment::Header, header_b64)?;
    if header.alg != "HS256" {
        return Err(AssertionError::Algorithm { alg: header.alg });
    }
    if let Some(typ) = header.typ {
        if !typ.eq_ignore_ascii_case("JWT") {
            return Err(AssertionError::Type { typ });
        }
    }
    if header.crit.is_some() {
        return Err(AssertionError::CriticalHeader);
    }

    let signature = decode(Segment::Signature, signature_b64)?;
    let signed_len = header_b64.len() + 1 + payload_b64.len();
    let mut mac = mac_with(key);
    mac.update(&token.as_bytes()[..signed_len]);
    mac.verify_slice(&signature)
        .map_err(|_| AssertionError::Signature)?;

    let claims: ClaimsIn = parse_object(Segment::Payload, payload_b64)?;
    if claims.iss.as_deref() != Some(ISSUER) {
        return Err(AssertionError::Issuer { iss: claims.iss });
    }
    if !claims.aud.is_some_and(|aud| aud.includes(audience)) {
        return Err(AssertionError::Audience);
    }
    let sub = match claims.sub {
        Some(sub) if !sub.is_empty() => sub,
        _ => return Err(AssertionError::MissingSubject),
    };
    let exp = claims.exp.ok_or(AssertionError::MissingExpiry)?;
    if now_unix > exp.saturating_add(LEEWAY_SECS) {
        return Err(AssertionError::Expired { exp, now: now_unix });
    }
    if let Some(iat) = claims.iat {
        if iat > now_unix.saturating_add(LEEWAY_SECS) {
            return Err(AssertionError::IssuedInFuture { iat, now: now_unix });
        }
    }
    Ok(Identity {
        sub,
        email: claims.email,
        name: claims.name,
        picture: claims.picture,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-test-key";
    const NOW: u64 = 1_750_000_000;

    fn alice() -> Identity {
        Identity {
            sub: "auth0|alice".into(),
            email: Some("alice@example.com".into()),
            name: Some("Alice".into()),
            picture: Some("https://example.com/alice.png".into()),
        }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Builds a token from raw header and payload JSON, MAC'd with `key`.
    fn token_from(header: &str, payload: &str, key: &[u8]) -> String {
        let signing_input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let mut mac = mac_with(key);
        mac.update(signing_input.as_bytes());
        format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn claims_json(extra: &str) -> String {
        format!(
            r#"{{"iss":"custodia-proxy","aud":"custodia-app","iat":{NOW},"exp":{}{extra}}}"#,
            NOW + 60
        )
    }

    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    #[test]
    fn signed_header_constant_is_the_hs256_jwt_header() {
        let decoded = URL_SAFE_NO_PAD.decode(SIGNED_HEADER).unwrap();
        assert_eq!(decoded, HS256.as_bytes());
    }

    #[test]
    fn valid_assertion_round_trips() {
        let token = sign_assertion(&alice(), KEY, NOW, 60);
        assert_eq!(verify_assertion(&token, KEY, NOW).unwrap(), alice());
        assert_eq!(verify_assertion(&token, KEY, NOW + 60).unwrap(), alice());
    }

    #[test]
    fn a_key_check_verifies_under_its_key_only_and_is_never_a_users_assertion() {
        let check = sign_key_check(KEY, NOW);
        assert!(verify_key_check(&check, KEY, NOW + 30).is_ok());
        assert!(matches!(
            verify_key_check(&check, b"another-key-0123456789abcdef-0123456789", NOW),
            Err(AssertionError::Signature)
        ));
        assert!(matches!(
            verify_key_check(&check, KEY, NOW + 3600),
            Err(AssertionError::Expired { .. })
        ));
        // Sent as a user's assertion, it is refused; and a user's is no key check.
        assert!(matches!(
            verify_assertion(&check, KEY, NOW),
            Err(AssertionError::Audience)
        ));
        let users = sign_assertion(&alice(), KEY, NOW, 60);
        assert!(matches!(
            verify_key_check(&users, KEY, NOW),
            Err(AssertionError::Audience)
        ));
    }

    #[test]
    fn optional_claims_may_be_absent() {
        let bare = Identity {
            sub: "u1".into(),
            ..Identity::default()
        };
        let token = sign_assertion(&bare, KEY, NOW, 60);
        let payload = token.split('.').nth(1).unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert!(
            !json.contains("email") && !json.contains("picture"),
            "{json}"
        );
        assert_eq!(verify_assertion(&token, KEY, NOW).unwrap(), bare);
    }

    #[test]
    fn hand_built_token_with_audience_array_is_accepted() {
        let payload = format!(
            r#"{{"iss":"custodia-proxy","aud":["other","custodia-app"],"sub":"u2","exp":{}}}"#,
            NOW + 1
        );
        let token = token_from(HS256, &payload, KEY);
        assert_eq!(verify_assertion(&token, KEY, NOW).unwrap().sub, "u2");
    }

    #[test]
    fn tampered_payload_is_refused() {
        let token = sign_assertion(&alice(), KEY, NOW, 60);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let forged = claims_json(r#","sub":"auth0|mallory","name":"Mallory""#);
        parts[1] = b64(forged.as_bytes());
        let err = verify_assertion(&parts.join("."), KEY, NOW).unwrap_err();
        assert!(matches!(err, AssertionError::Signature), "{err:?}");
    }

    #[test]
    fn tampered_signature_is_refused() {
        let token = sign_assertion(&alice(), KEY, NOW, 60);
        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
        sig[0] ^= 0x01;
        let err =
            verify_assertion(&format!("{signing_input}.{}", b64(&sig)), KEY, NOW).unwrap_err();
        assert!(matches!(err, AssertionError::Signature), "{err:?}");
        // A truncated MAC must not verify either.
        let err = verify_assertion(&format!("{signing_input}.{}", b64(&sig[..16])), KEY, NOW)
            .unwrap_err();
        assert!(matches!(err, AssertionError::Signature), "{err:?}");
    }

    #[test]
    fn keys_typed_by_hand_are_weak_and_random_ones_are_not() {
        let weak = |key: &str| secret_weakness(key.as_bytes());
        assert_eq!(
            weak("abcdefghabcdefghabcdefghabcdefgh"),
            Some(SecretWeakness::Repeated { period: 8 })
        );
        assert_eq!(
            weak("passwordpassword1234567890123456"),
            Some(SecretWeakness::CommonWord { word: "password" })
        );
        assert_eq!(
            weak("0123456789abcdef0123456789abcdef"),
            Some(SecretWeakness::Repeated { period: 16 })
        );
        assert_eq!(weak("short"), Some(SecretWeakness::TooShort { len: 5 }));
        // What `openssl rand -hex 32` and `-base64 32` print.
        for random in [
            "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f8a1c3e5f7b9d0a2c",
            "9b1d0f3e5c7a2d4f6e8c0a1b3d5f7e9c",
            "q3Xv9LkP2mZ8rT5wY1nB7cH4jF6gD0sA+eU=",
        ] {
            assert_eq!(weak(random), None, "{random}");
        }
    }

    #[test]
    fn wrong_key_is_refused() {
        let token = sign_assertion(&alice(), b"another-key-another-key-another-key!", NOW, 60);
        let err = verify_assertion(&token, KEY, NOW).unwrap_err();
        assert!(matches!(err, AssertionError::Signature), "{err:?}");
    }

    #[test]
    fn alg_none_is_refused_even_without_signature() {
        let payload = claims_json(r#","sub":"auth0|mallory""#);
        let unsigned = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(payload.as_bytes())
        );
        let err = verify_assertion(&unsigned, KEY, NOW).unwrap_err();
        assert!(
            matches!(&err, AssertionError::Algorithm { alg } if alg == "none"),
            "{err:?}"
        );
    }

    #[test]
    fn other_algorithms_are_refused_even_when_mac_matches() {
        // A correct HMAC under the right key must still be refused if the header names another alg.
        for alg in ["RS256", "HS512", "hs256", "ES256"] {
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            let token = token_from(&header, &claims_json(r#","sub":"u""#), KEY);
            let err = verify_assertion(&token, KEY, NOW).unwrap_err();
            assert!(
                matches!(&err, AssertionError::Algorithm { alg: a } if a == alg),
                "{err:?}"
            );
        }
    }

    #[test]
    fn wrong_typ_and_crit_headers_are_refused() {
        let token = token_from(
            r#"{"alg":"HS256","typ":"JOSE+JSON"}"#,
            &claims_json(r#","sub":"u""#),
            KEY,
        );
        assert!(matches!(
            verify_assertion(&token, KEY, NOW),
            Err(AssertionError::Type { .. })
        ));
        let token = token_from(
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            &claims_json(r#","sub":"u""#),
            KEY,
        );
        assert!(matches!(
            verify_assertion(&token, KEY, NOW),
            Err(AssertionError::CriticalHeader)
        ));
        // typ may be omitted.
        let token = token_from(r#"{"alg":"HS256"}"#, &claims_json(r#","sub":"u""#), KEY);
        assert_eq!(verify_assertion(&token, KEY, NOW).unwrap().sub, "u");
    }

    #[test]
    fn expiry_is_enforced_with_leeway() {
        let token = sign_assertion(&alice(), KEY, NOW, 60);
        let exp = NOW + 60;
        assert!(verify_assertion(&token, KEY, exp + LEEWAY_SECS).is_ok());
        let err = verify_assertion(&token, KEY, exp + LEEWAY_SECS + 1).unwrap_err();
        assert!(
            matches!(err, AssertionError::Expired { exp: e, .. } if e == exp),
            "{err:?}"
        );
    }

    #[test]
    fn issued_in_the_future_is_refused_beyond_leeway() {
        let token = sign_assertion(&alice(), KEY, NOW + LEEWAY_SECS, 60);
        assert!(verify_assertion(&token, KEY, NOW).is_ok());
        let token = sign_assertion(&alice(), KEY, NOW + LEEWAY_SECS + 1, 60);
        let err = verify_assertion(&token, KEY, NOW).unwrap_err();
        assert!(
            matches!(err, AssertionError::IssuedInFuture { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn missing_or_empty_sub_is_refused() {
        for extra in ["", r#","sub":"""#, r#","sub":null"#] {
            let token = token_from(HS256, &claims_json(extra), KEY);
            let err = verify_assertion(&token, KEY, NOW).unwrap_err();
            assert!(
                matches!(err, AssertionError::MissingSubject),
                "{extra}: {err:?}"
            );
        }
        let err = verify_assertion(
            &sign_assertion(&Identity::default(), KEY, NOW, 60),
            KEY,
            NOW,
        )
        .unwrap_err();
        assert!(matches!(err, AssertionError::MissingSubject), "{err:?}");
    }

    #[test]
    fn missing_exp_wrong_iss_and_wrong_aud_are_refused() {
        let no_exp = token_from(
            HS256,
            r#"{"iss":"custodia-proxy","aud":"custodia-app","sub":"u"}"#,
            KEY,
        );
        assert!(matches!(
            verify_assertion(&no_exp, KEY, NOW),
            Err(AssertionError::MissingExpiry)
        ));

        let exp = NOW + 60;
        let wrong_iss = token_from(
            HS256,
            &format!(r#"{{"iss":"evil","aud":"custodia-app","sub":"u","exp":{exp}}}"#),
            KEY,
        );
        assert!(matches!(
            verify_assertion(&wrong_iss, KEY, NOW),
            Err(AssertionError::Issuer { iss: Some(i) }) if i == "evil"
        ));
        let no_iss = token_from(
            HS256,
            &format!(r#"{{"aud":"custodia-app","sub":"u","exp":{exp}}}"#),
            KEY,
        );
        assert!(matches!(
            verify_assertion(&no_iss, KEY, NOW),
            Err(AssertionError::Issuer { iss: None })
        ));

        let wrong_aud = token_from(
            HS256,
            &format!(r#"{{"iss":"custodia-proxy","aud":"billing","sub":"u","exp":{exp}}}"#),
            KEY,
        );
        assert!(matches!(
            verify_assertion(&wrong_aud, KEY, NOW),
            Err(AssertionError::Audience)
        ));
        let no_aud = token_from(
            HS256,
            &format!(r#"{{"iss":"custodia-proxy","sub":"u","exp":{exp}}}"#),
            KEY,
        );
        assert!(matches!(
            verify_assertion(&no_aud, KEY, NOW),
            Err(AssertionError::Audience)
        ));
    }

    #[test]
    fn bad_base64_is_refused() {
        let token = sign_assertion(&alice(), KEY, NOW, 60);
        let parts: Vec<&str> = token.split('.').collect();

        let bad_header = format!("{}!.{}.{}", parts[0], parts[1], parts[2]);
        let err = verify_assertion(&bad_header, KEY, NOW).unwrap_err();
        assert!(
            matches!(
                err,
                AssertionError::Encoding {
                    segment: Segment::Header
                }
            ),
            "{err:?}"
        );

        // Standard (non-URL) alphabet and padding are both refused in the signature.
        let padded_sig = format!("{}.{}.{}=", parts[0], parts[1], parts[2]);
        let err = verify_assertion(&padded_sig, KEY, NOW).unwrap_err();
        assert!(
            matches!(
                err,
                AssertionError::Encoding {
                    segment: Segment::Signature
                }
            ),
            "{err:?}"
        );
        let std_alphabet = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            parts[2].replace(['-', '_'], "+")
        );
        if std_alphabet != token {
            assert!(verify_assertion(&std_alphabet, KEY, NOW).is_err());
        }

        // A payload that is not base64 but carries a MAC over its text is refused as encoding.
        let signing_input = format!("{}.%%%", b64(HS256.as_bytes()));
        let mut mac = mac_with(KEY);
        mac.update(signing_input.as_bytes());
        let forged = format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()));
        let err = verify_assertion(&forged, KEY, NOW).unwrap_err();
        assert!(
            matches!(
                err,
                AssertionError::Encoding {
                    segment: Segment::Payload
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn malformed_shapes_are_refused() {
        for token in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "...",
            "header.payload.sig.extra",
        ] {
            assert!(
                verify_assertion(token, KEY, NOW).is_err(),
                "{token:?} accepted"
            );
        }
        assert!(matches!(
            verify_assertion("a.b", KEY, NOW),
            Err(AssertionError::Malformed)
        ));
        assert!(matches!(
            verify_assertion("a.b.c.d", KEY, NOW),
            Err(AssertionError::Malformed)
        ));
        let not_json = format!("{}.{}.", b64(b"not json"), b64(b"{}"));
        assert!(matches!(
            verify_assertion(&not_json, KEY, NOW),
            Err(AssertionError::NotAnObject {
                segment: Segment::Header
            })
        ));
        let not_json = format!("{}.{}.", b64(b"{not json"), b64(b"{}"));
        assert!(matches!(
            verify_assertion(&not_json, KEY, NOW),
            Err(AssertionError::Json {
                segment: Segment::Header,
                ..
            })
        ));
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            verify_assertion(&huge, KEY, NOW),
            Err(AssertionError::TooLong { .. })
        ));
    }

    #[test]
    fn payload_that_is_not_claims_json_is_refused_after_mac() {
        // Positional arrays would otherwise fill the claims in field order.
        let token = token_from(HS256, r#"["custodia-proxy","custodia-app","u"]"#, KEY);
        let err = verify_assertion(&token, KEY, NOW).unwrap_err();
        assert!(
            matches!(
                err,
                AssertionError::NotAnObject {
                    segment: Segment::Payload
                }
            ),
            "{err:?}"
        );
        let token = token_from(HS256, r#"{"iss":"custodia-proxy","sub":7}"#, KEY);
        let err = verify_assertion(&token, KEY, NOW).unwrap_err();
        assert!(
            matches!(
                err,
                AssertionError::Json {
                    segment: Segment::Payload,
                    ..
                }
            ),
            "{err:?}"
        );
        let token = token_from(r#"["HS256","JWT"]"#, &claims_json(r#","sub":"u""#), KEY);
        let err = verify_assertion(&token, KEY, NOW).unwrap_err();
        assert!(
            matches!(
                err,
                AssertionError::NotAnObject {
                    segment: Segment::Header
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn display_name_falls_back_to_email_then_sub() {
        let mut id = alice();
        assert_eq!(id.display_name(), "Alice");
        id.name = Some("  ".into());
        assert_eq!(id.display_name(), "alice@example.com");
        id.email = None;
        assert_eq!(id.display_name(), "auth0|alice");
    }
}
