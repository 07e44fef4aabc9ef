//! Property tests (proptest) for the edge's untrusted-input parsers, through the public API:
//!
//! - sealed values: `seal`/`unseal`, the session and login-state cookies on top of them, and the
//!   chunked session cookie as a browser stores and returns it — round trips hold, any mutation,
//!   wrong key or wrong purpose is refused, nothing panics;
//! - `rd` return targets: nothing accepted leaves the origin under any number of decodings;
//! - path normalisation and route policies: no disguise of a path gets a weaker policy;
//! - configuration text through the entry point `--check` uses: `Ok` or `Err`, never a panic.
//!
//! The modules' unit tests hold the hand-picked cases and their simpler randomized loops; this
//! file adds structured generators with shrinking. Case counts keep the file at a few seconds in
//! a debug build (`PROPTEST_CASES=N` raises them for a longer hunt).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use openidconnect::url::Url;
use percent_encoding::percent_decode;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};

use custodia_proxy::auth::cookies::{is_custodia_cookie_name, CHUNK_LEN, MAX_SESSION_VALUE_LEN};
use custodia_proxy::auth::redirect::DECODE_ROUNDS;
use custodia_proxy::auth::{
    normalise_path, open_login_state, open_session, read_cookie, safe_return_target, seal,
    seal_login_state, seal_session, strip_custodia_cookies, unseal, CookieSettings, LoginState,
    LoginStateError, Policy, Purpose, RouteTable, SealError, SecretKeys, Session, SessionError,
};

/// Cases per property unless `PROPTEST_CASES` says otherwise; failures are not persisted to
/// files (a failing input becomes a unit test in the module instead).
fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Sealed values
// ---------------------------------------------------------------------------------------------

/// An `APP_SECRET_KEY`-like secret: 32–48 visible ASCII characters.
fn secret() -> impl Strategy<Value = String> {
    "[!-~]{32,48}"
}

fn keys(current: &str, previous: &[String]) -> SecretKeys {
    SecretKeys::from_secrets(current, previous).unwrap()
}

fn purpose() -> impl Strategy<Value = Purpose> {
    prop_oneof![
        Just(Purpose::Session),
        Just(Purpose::LoginState),
        Just(Purpose::LogoutHint)
    ]
}

fn other(purpose: Purpose) -> Purpose {
    match purpose {
        Purpose::Session => Purpose::LoginState,
        Purpose::LoginState => Purpose::LogoutHint,
        Purpose::LogoutHint => Purpose::Session,
    }
}

/// One way an attacker (or a broken proxy in between) can change a sealed value.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace one character with another.
    Replace(Index, char),
    /// Insert text somewhere.
    Insert(Index, String),
    /// Remove 1–8 characters from somewhere.
    Delete(Index, usize),
    /// Keep only a prefix.
    Truncate(Index),
    /// Append text.
    Extend(String),
    /// Flip one bit of the decoded bytes and encode again (valid base64, wrong content).
    FlipBit(Index, u8),
    /// Swap two characters.
    Swap(Index, Index),
    /// Flip the ASCII case of one character.
    Case(Index),
    /// The same bytes in another base64 alphabet or with padding.
    Reencode(Index),
    /// Append bytes to the decoded value, or drop some from its end, and encode again (the
    /// index is for the fallback).
    Resize(Index, Vec<u8>, usize),
}

/// Characters that matter to base64, cookies and our prefix, plus anything at all.
fn mutation_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=.v1 ;,\"\\%"
                .chars()
                .collect::<Vec<_>>()
        ),
        1 => any::<char>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let text = || vec(mutation_char(), 1..6).prop_map(|c| c.into_iter().collect::<String>());
    prop_oneof![
        (any::<Index>(), mutation_char()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<Index>(), text()).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (any::<Index>(), 1..8usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        text().prop_map(Mutation::Extend),
        (any::<Index>(), 0..8u8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        any::<Index>().prop_map(Mutation::Case),
        any::<Index>().prop_map(Mutation::Reencode),
        (any::<Index>(), vec(any::<u8>(), 0..4), 0..20usize)
            .prop_map(|(i, v, n)| Mutation::Resize(i, v, n)),
    ]
}

/// The bytes of a sealed value, if it is one.
fn decode(sealed: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(sealed.strip_prefix("v1.")?).ok()
}

fn encode(raw: &[u8]) -> String {
    format!("v1.{}", URL_SAFE_NO_PAD.encode(raw))
}

/// `sealed` changed by `m`. Mutations of the decoded bytes fall back to replacing a character
/// when `sealed` does not decode (a mutated value, or one chunk of a value).
fn mutate(sealed: &str, m: &Mutation) -> String {
    let mut chars: Vec<char> = sealed.chars().collect();
    if chars.is_empty() {
        return "v1.".to_string();
    }
    let raw = decode(sealed);
    match m {
        Mutation::FlipBit(i, _) | Mutation::Reencode(i) | Mutation::Resize(i, ..)
            if raw.is_none() =>
        {
            let i = i.index(chars.len());
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        }
        Mutation::Replace(i, c) => {
            let i = i.index(chars.len());
            chars[i] = *c;
        }
        Mutation::Insert(i, s) => {
            let i = i.index(chars.len() + 1);
            chars.splice(i..i, s.chars());
        }
        Mutation::Delete(i, n) => {
            let i = i.index(chars.len());
            let end = (i + n).min(chars.len());
            chars.drain(i..end);
        }
        Mutation::Truncate(i) => chars.truncate(i.index(chars.len())),
        Mutation::Extend(s) => chars.extend(s.chars()),
        Mutation::FlipBit(i, bit) => {
            let mut raw = raw.unwrap_or_default();
            if raw.is_empty() {
                return format!("{sealed}A");
            }
            let i = i.index(raw.len());
            raw[i] ^= 1 << bit;
            return encode(&raw);
        }
        Mutation::Swap(a, b) => {
            let (a, b) = (a.index(chars.len()), b.index(chars.len()));
            chars.swap(a, b);
        }
        Mutation::Case(i) => {
            let i = i.index(chars.len());
            let c = chars[i];
            chars[i] = if c.is_ascii_lowercase() {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
        }
        Mutation::Reencode(engine) => {
            let raw = raw.unwrap_or_default();
            let body = match engine.index(3) {
                0 => STANDARD.encode(&raw),
                1 => STANDARD_NO_PAD.encode(&raw),
                _ => URL_SAFE.encode(&raw),
            };
            return format!("v1.{body}");
        }
        Mutation::Resize(_, extra, drop) => {
            let mut raw = raw.unwrap_or_default();
            raw.truncate(raw.len().saturating_sub(*drop));
            raw.extend_from_slice(extra);
            return encode(&raw);
        }
    }
    chars.into_iter().collect()
}

/// The fields of a [`Session`] that vary: sub, email, name, picture.
type SessionFields = (String, Option<String>, Option<String>, Option<String>);

/// Any session: arbitrary Unicode claims, any times.
fn session() -> impl Strategy<Value = Session> {
    let text = || "\\PC{0,40}";
    let fields = (
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
    );
    (fields, any::<u64>(), any::<u64>()).prop_map(
        |((sub, email, name, picture), iat, exp): (SessionFields, u64, u64)| Session {
            sub,
            email,
            name,
            picture,
            iat,
            exp,
        },
    )
}

fn login_state() -> impl Strategy<Value = LoginState> {
    (
        "[A-Za-z0-9_-]{0,43}",
        "[A-Za-z0-9_-]{0,43}",
        "[A-Za-z0-9._~-]{43,128}",
        "/\\PC{0,40}",
        any::<u64>(),
    )
        .prop_map(|(state, nonce, pkce_verifier, return_to, exp)| LoginState {
            state,
            nonce,
            pkce_verifier,
            return_to,
            exp,
        })
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn seal_round_trips_for_any_plaintext_key_and_purpose(
        secret in secret(),
        plaintext in vec(any::<u8>(), 0..600),
        purpose in purpose(),
    ) {
        let k = keys(&secret, &[]);
        let sealed = seal(&k, purpose, &plaintext);
        prop_assert!(sealed.starts_with("v1."));
        prop_assert!(
            sealed.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "not cookie/URL safe: {}", sealed
        );
        prop_assert_eq!(unseal(&k, purpose, &sealed), Ok(plaintext));
    }

    #[test]
    fn any_mutation_of_a_sealed_value_is_refused(
        secret in secret(),
        plaintext in vec(any::<u8>(), 0..200),
        purpose in purpose(),
        mutations in vec(mutation(), 1..4),
    ) {
        let k = keys(&secret, &[]);
        let sealed = seal(&k, purpose, &plaintext);
        let mut mutated = sealed.clone();
        for m in &mutations {
            mutated = mutate(&mutated, m);
            // A mutation may make the value undecodable; later ones then apply to the text only.
            // Later mutations of an undecodable value fall back to text changes; fine either way.
        }
        prop_assume!(mutated != sealed);
        prop_assert!(
            unseal(&k, purpose, &mutated).is_err(),
            "{:?} of {} was accepted: {}", mutations, sealed, mutated
        );
    }

    #[test]
    fn a_wrong_key_or_the_other_purpose_fails_authentication(
        secret in secret(),
        wrong in secret(),
        plaintext in vec(any::<u8>(), 0..200),
        purpose in purpose(),
    ) {
        prop_assume!(secret != wrong);
        let k = keys(&secret, &[]);
        let sealed = seal(&k, purpose, &plaintext);
        prop_assert_eq!(unseal(&keys(&wrong, &[]), purpose, &sealed), Err(SealError::Invalid));
        prop_assert_eq!(unseal(&k, other(purpose), &sealed), Err(SealError::Invalid));
        // Listing the right key only as a *previous* key of the wrong one still opens it.
        prop_assert_eq!(
            unseal(&keys(&wrong, std::slice::from_ref(&secret)), purpose, &sealed),
            Ok(plaintext)
        );
    }

    #[test]
    fn rotation_opens_values_of_any_listed_previous_key_only(
        current in secret(),
        old in secret(),
        others in vec(secret(), 0..3),
        at in any::<Index>(),
        plaintext in vec(any::<u8>(), 0..100),
    ) {
        prop_assume!(current != old && !others.contains(&old));
        let sealed = seal(&keys(&old, &[]), Purpose::Session, &plaintext);
        let mut previous = others.clone();
        previous.insert(at.index(others.len() + 1), old.clone());
        prop_assert_eq!(
            unseal(&keys(&current, &previous), Purpose::Session, &sealed),
            Ok(plaintext)
        );
        prop_assert_eq!(
            unseal(&keys(&current, &others), Purpose::Session, &sealed),
            Err(SealError::Invalid)
        );
    }

    #[test]
    fn arbitrary_text_never_opens_and_never_panics(
        secret in secret(),
        text in prop_oneof![
            "\\PC{0,80}",
            "v1\\.[A-Za-z0-9_-]{0,120}",
            vec(any::<u8>(), 0..120).prop_map(|b| encode(&b)),
        ],
    ) {
        let k = keys(&secret, &[]);
        prop_assert!(unseal(&k, Purpose::Session, &text).is_err(), "{:?}", text);
        prop_assert!(unseal(&k, Purpose::LoginState, &text).is_err(), "{:?}", text);
        prop_assert!(open_session(&k, &text, 0).is_err());
        prop_assert!(open_login_state(&k, &text, "state", 0).is_err());
    }

    #[test]
    fn sessions_round_trip_and_expire_exactly_at_exp(
        secret in secret(),
        session in session(),
        now in any::<u64>(),
    ) {
        let k = keys(&secret, &[]);
        let sealed = seal_session(&k, &session);
        let expected = if now >= session.exp { Err(SessionError::Expired) } else { Ok(session.clone()) };
        prop_assert_eq!(open_session(&k, &sealed, now), expected);
        // The claims are not readable in the cookie.
        if session.sub.len() >= 8 {
            prop_assert!(!sealed.contains(&session.sub));
        }
    }

    #[test]
    fn a_mutated_session_cookie_never_opens(
        secret in secret(),
        session in session(),
        mutation in mutation(),
    ) {
        let k = keys(&secret, &[]);
        let sealed = seal_session(&k, &session);
        let mutated = mutate(&sealed, &mutation);
        prop_assume!(mutated != sealed);
        let opened = open_session(&k, &mutated, 0);
        prop_assert!(
            matches!(opened, Err(SessionError::Invalid | SessionError::Malformed | SessionError::Absent)),
            "{:?} gave {:?}", mutation, opened
        );
    }

    #[test]
    fn login_states_open_only_for_their_own_state_in_time(
        secret in secret(),
        login in login_state(),
        returned_state in prop_oneof!["[A-Za-z0-9_-]{0,43}", Just(String::new())],
        use_own in any::<bool>(),
        now in any::<u64>(),
    ) {
        let k = keys(&secret, &[]);
        let sealed = seal_login_state(&k, &login);
        let returned = if use_own { login.state.clone() } else { returned_state };
        let expected = if returned != login.state || returned.is_empty() {
            Err(LoginStateError::StateMismatch)
        } else if now >= login.exp {
            Err(LoginStateError::Expired)
        } else {
            Ok(login.clone())
        };
        prop_assert_eq!(open_login_state(&k, &sealed, &returned, now), expected);
        // Never usable as a session, and a session never as a login state.
        prop_assert_eq!(open_session(&k, &sealed, 0), Err(SessionError::Invalid));
        let debug = format!("{login:?}");
        prop_assert!(!debug.contains(&login.pkce_verifier), "Debug shows the PKCE verifier");
    }

    #[test]
    fn a_mutated_login_cookie_never_opens(
        secret in secret(),
        login in login_state(),
        mutation in mutation(),
    ) {
        let k = keys(&secret, &[]);
        let sealed = seal_login_state(&k, &login);
        let mutated = mutate(&sealed, &mutation);
        prop_assume!(mutated != sealed);
        let opened = open_login_state(&k, &mutated, &login.state, 0);
        prop_assert!(opened.is_err(), "{:?} gave {:?}", mutation, opened);
    }
}

// ---------------------------------------------------------------------------------------------
// Session cookies as a browser stores and returns them
// ---------------------------------------------------------------------------------------------

/// A browser cookie jar for our `Set-Cookie` lines: `name=value; Max-Age=N; …`.
fn apply(jar: &mut BTreeMap<String, String>, set_cookies: &[String]) {
    for line in set_cookies {
        let (pair, attrs) = line.split_once("; ").unwrap();
        let (name, value) = pair.split_once('=').unwrap();
        let max_age = attrs
            .split("; ")
            .find_map(|a| a.strip_prefix("Max-Age="))
            .unwrap();
        if max_age == "0" {
            jar.remove(name);
        } else {
            jar.insert(name.to_string(), value.to_string());
        }
    }
}

/// Other sites' cookies a request may also carry.
fn foreign_cookie() -> impl Strategy<Value = String> {
    ("[a-z_]{1,12}", "[A-Za-z0-9._-]{0,20}").prop_map(|(n, v)| format!("{n}={v}"))
}

proptest! {
    #![proptest_config(cases(64))]

    /// Any session value, in one cookie or in chunks, comes back whole from `Cookie` headers in
    /// any order, split over several headers, mixed with other cookies.
    #[test]
    fn chunked_sessions_survive_any_cookie_order(
        secret in secret(),
        session in session(),
        big_token_len in prop_oneof![Just(0usize), 0..12_000usize],
        secure in any::<bool>(),
        foreign in vec(foreign_cookie(), 0..6),
        order in any::<u64>(),
        headers in 1..4usize,
    ) {
        let k = keys(&secret, &[]);
        let mut session = session;
        if big_token_len > 0 {
            session.picture = Some("e".repeat(big_token_len));
        }
        let value = seal_session(&k, &session);
        let settings = CookieSettings { secure };
        let lines = settings.set_session_cookies(&value, Duration::from_secs(3600));
        if value.len() > MAX_SESSION_VALUE_LEN {
            prop_assert!(lines.is_err());
            return Ok(());
        }
        let mut jar = BTreeMap::new();
        apply(&mut jar, &lines.unwrap());
        prop_assert_eq!(jar.len(), if value.len() <= CHUNK_LEN { 1 } else { value.len().div_ceil(CHUNK_LEN) });

        let mut pairs: Vec<String> = jar.iter().map(|(n, v)| format!("{n}={v}")).collect();
        pairs.extend(foreign);
        // A deterministic shuffle from the generated seed.
        let mut seed = order;
        for i in (1..pairs.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            pairs.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let per_header = pairs.len().div_ceil(headers).max(1);
        let cookie_headers: Vec<String> = pairs.chunks(per_header).map(|c| c.join("; ")).collect();
        let read = settings.read_session(cookie_headers.iter().map(|h| h.as_bytes()));
        prop_assert_eq!(read.as_deref(), Some(value.as_str()));
        let expected = if session.exp == 0 { Err(SessionError::Expired) } else { Ok(session.clone()) };
        prop_assert_eq!(open_session(&k, read.as_deref().unwrap(), 0), expected);
        // Cookies written for the other scheme are not read.
        let other = CookieSettings { secure: !secure };
        prop_assert_eq!(other.read_session(cookie_headers.iter().map(|h| h.as_bytes())), None);
        // And stripping before the request goes upstream removes every piece of it.
        for header in &cookie_headers {
            if let Some(kept) = strip_custodia_cookies(header) {
                prop_assert!(!kept.contains(&value[..value.len().min(CHUNK_LEN)]));
                for part in kept.split(';') {
                    let name = part.split_once('=').map_or("", |(n, _)| n.trim());
                    prop_assert!(!is_custodia_cookie_name(name.as_bytes()), "{} kept {}", header, part);
                }
            }
        }
    }

    /// Changing one chunk of a chunked session (or dropping, duplicating or reordering the
    /// pieces' contents) never yields a session.
    #[test]
    fn a_tampered_chunk_never_opens(
        secret in secret(),
        token_len in 4_000..12_000usize,
        which in any::<Index>(),
        mutation in mutation(),
    ) {
        let k = keys(&secret, &[]);
        let session = Session {
            sub: "sub".into(),
            email: None,
            name: None,
            // Claims too large for one cookie (the session is split into chunks).
            picture: Some("t".repeat(token_len)),
            iat: 0,
            exp: u64::MAX,
        };
        let value = seal_session(&k, &session);
        let settings = CookieSettings { secure: false };
        let mut jar = BTreeMap::new();
        apply(&mut jar, &settings.set_session_cookies(&value, Duration::from_secs(60)).unwrap());
        prop_assert!(jar.len() >= 2);
        let name = jar.keys().nth(which.index(jar.len())).unwrap().clone();
        let chunk = jar[&name].clone();
        // Mutate the chunk as if it were a whole value ("v1." is only on the first chunk).
        let mutated = mutate(&format!("v1.{}", chunk.trim_start_matches("v1.")), &mutation);
        let mutated = if chunk.starts_with("v1.") { mutated } else { mutated.trim_start_matches("v1.").to_string() };
        // What the proxy reads: whitespace around a value, one pair of quotes, or anything after
        // a `;` are not part of it.
        let pair = format!("{name}={mutated}");
        let effective = read_cookie(std::iter::once(pair.as_bytes()), &name);
        prop_assume!(effective.as_deref() != Some(chunk.as_str()));
        jar.insert(name, mutated);
        let header: Vec<String> = jar.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let header = header.join("; ");
        if let Some(read) = settings.read_session(std::iter::once(header.as_bytes())) {
            prop_assert!(open_session(&k, &read, 0).is_err(), "{:?}", mutation);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Return targets
// ---------------------------------------------------------------------------------------------

/// Pieces a hostile `rd` is made of: separators and their encodings (nested too), dot segments,
/// scheme and authority characters, controls and Unicode spaces raw and encoded.
const RD_PIECES: &[&str] = &[
    "/",
    "/",
    "/",
    "\\",
    "//",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%25",
    "%252f",
    "%25252F",
    "%255c",
    "%2e",
    "%2E",
    "%252e",
    ".",
    "..",
    ":",
    "%3a",
    "%3A",
    "@",
    "%40",
    "?",
    "%3f",
    "#",
    "%23",
    "%",
    "%0",
    "%00",
    "%0a",
    "%0D",
    "%09",
    "%20",
    " ",
    "\t",
    "\n",
    "é",
    "%C3%A9",
    "%E2%80%A8",
    "\u{2028}",
    "\u{a0}",
    "%C2%A0",
    "%C2%85",
    "evil.example",
    "http:",
    "https://",
    "javascript:",
    "a",
    "b",
    ";",
    "&",
    "=",
    "+",
    "~",
    "x.y",
    "%ff",
    "%e2%82",
];

fn hostile_rd() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        8 => select(RD_PIECES).prop_map(str::to_string),
        1 => any::<char>().prop_map(String::from),
    ];
    (any::<bool>(), vec(piece, 0..10)).prop_map(|(slash, pieces)| {
        let mut rd = if slash {
            "/".to_string()
        } else {
            String::new()
        };
        rd.extend(pieces);
        rd
    })
}

/// A plainly safe same-origin target: segments with no dot segment, an optional query and
/// fragment.
fn plain_rd() -> impl Strategy<Value = String> {
    (
        vec("[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,8}", 0..5),
        any::<bool>(),
        proptest::option::of("[a-z]{1,5}=[A-Za-z0-9:/._-]{0,12}"),
        proptest::option::of("[A-Za-z0-9/._-]{0,10}"),
    )
        .prop_map(|(segments, trailing, query, fragment)| {
            let mut rd = format!("/{}", segments.join("/"));
            if trailing && !segments.is_empty() {
                rd.push('/');
            }
            if let Some(q) = query {
                rd.push('?');
                rd.push_str(&q);
            }
            if let Some(f) = fragment {
                rd.push('#');
                rd.push_str(&f);
            }
            rd
        })
}

/// How a browser (WHATWG URL parsing) resolves `target` on our origin: it must stay there.
fn assert_same_origin(target: &str, rd: &str) -> Result<(), TestCaseError> {
    let base = Url::parse("https://app.example:8443/some/page?x=1").unwrap();
    let resolved = base.join(target);
    prop_assert!(
        resolved.is_ok(),
        "{:?}: {:?} does not resolve: {:?}",
        rd,
        target,
        resolved
    );
    let resolved = resolved.unwrap();
    prop_assert_eq!(
        resolved.origin(),
        base.origin(),
        "{:?}: {:?} leaves the origin as {}",
        rd,
        target,
        resolved
    );
    Ok(())
}

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn no_accepted_target_leaves_the_origin_under_any_decoding(rd in hostile_rd()) {
        let Some(target) = safe_return_target(&rd) else { return Ok(()) };
        prop_assert!(target.is_ascii(), "{:?} → {:?}", rd, target);
        prop_assert!(http::HeaderValue::from_str(&target).is_ok(), "{:?} → {:?}", rd, target);
        // Same meaning as what was asked for: only non-ASCII got percent-encoded.
        prop_assert_eq!(
            percent_decode(target.as_bytes()).collect::<Vec<u8>>(),
            percent_decode(rd.as_bytes()).collect::<Vec<u8>>()
        );
        // The target itself and every decoding a later hop might apply to it.
        let mut form = target.clone();
        for round in 0..=DECODE_ROUNDS + 1 {
            let bytes = form.as_bytes();
            prop_assert_eq!(bytes.first(), Some(&b'/'), "{:?} round {}: {:?}", rd, round, form);
            prop_assert!(!matches!(bytes.get(1), Some(b'/' | b'\\')), "{:?} round {}: {:?}", rd, round, form);
            prop_assert!(!form.contains('\\'), "{:?} round {}: {:?}", rd, round, form);
            prop_assert!(
                !form.chars().any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')),
                "{:?} round {}: {:?}", rd, round, form
            );
            assert_same_origin(&form, &rd)?;
            form = percent_decode(form.as_bytes()).decode_utf8_lossy().into_owned();
        }
    }

    #[test]
    fn plain_same_origin_paths_are_kept_as_they_are(rd in plain_rd()) {
        prop_assert_eq!(safe_return_target(&rd), Some(rd.clone()));
        assert_same_origin(&rd, &rd)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Path normalisation and route policies
// ---------------------------------------------------------------------------------------------

/// Segment names for route prefixes and request paths; look-alikes included.
const SEGMENTS: &[&str] = &[
    "api",
    "public",
    "static",
    "admin",
    "a",
    "b",
    "x",
    "café",
    "日本",
    "a;b",
    "api;v=1",
    "a b",
    "v1.2",
    "...",
    ".x",
    "x.",
    "%",
    "?",
    "#",
    "ａｐｉ",
    "API2",
    "~u",
];

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Public),
        Just(Policy::Optional),
        Just(Policy::Required)
    ]
}

/// A route table of normalised prefixes (no two equal ignoring ASCII case).
fn route_table() -> impl Strategy<Value = RouteTable> {
    let prefix = (vec(select(SEGMENTS), 0..3), any::<bool>()).prop_map(|(segments, slash)| {
        let mut p = format!("/{}", segments.join("/"));
        if slash && !segments.is_empty() {
            p.push('/');
        }
        p
    });
    (vec((prefix, policy()), 0..6), policy()).prop_map(|(routes, default)| {
        let mut unique: Vec<(String, Policy)> = Vec::new();
        for (prefix, policy) in routes {
            // `%` and `?` segments are request-path material, not valid prefixes.
            let valid = normalise_path(&prefix).as_deref() == Ok(prefix.as_str());
            if valid && !unique.iter().any(|(p, _)| p.eq_ignore_ascii_case(&prefix)) {
                unique.push((prefix, policy));
            }
        }
        RouteTable::new(unique, default).expect("generated prefixes are valid")
    })
}

/// A normalised path: segments, optional trailing slash.
fn normalised_path() -> impl Strategy<Value = (Vec<&'static str>, bool)> {
    (vec(select(SEGMENTS), 0..5), any::<bool>())
}

/// How one character of a path is written in the request.
#[derive(Debug, Clone, Copy)]
enum CharForm {
    Plain,
    OtherCase,
    LowerHex,
    UpperHex,
}

/// A separator between segments that normalises to a single `/`.
const SEPARATORS: &[&str] = &[
    "/",
    "/",
    "/",
    "\\",
    "//",
    "/./",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "/%2e/",
    "/%2E/",
    "\\.\\",
    "/./././",
    "/zz/../",
    "/zz/%2e%2e/",
    "/zz%2f..%2f",
    "/%2E/./",
    "/public/../",
    "/api/x/../../",
    "/a;b/../",
];

/// The request path: `segments` written with disguises, every separator one of [`SEPARATORS`]
/// (the first a literal `/` or `\`), and an optional query.
fn disguise(
    segments: &[&str],
    trailing: bool,
    forms: &[CharForm],
    seps: &[Index],
    query: &Option<String>,
) -> String {
    let mut raw = String::new();
    let mut form = forms.iter().cycle();
    for (i, segment) in segments.iter().enumerate() {
        let sep = SEPARATORS[seps[i % seps.len()].index(SEPARATORS.len())];
        if i == 0 && !sep.starts_with(['/', '\\']) {
            raw.push('/');
        }
        raw.push_str(sep);
        for c in segment.chars() {
            let mut buf = [0u8; 4];
            let encoded: String = c
                .encode_utf8(&mut buf)
                .bytes()
                .map(|b| format!("%{b:02x}"))
                .collect();
            // These have to be encoded to stay part of the path segment.
            let must_encode = matches!(c, '%' | '?' | '#' | '/' | '\\' | ' ');
            match form.next().copied().unwrap_or(CharForm::Plain) {
                _ if must_encode => raw.push_str(&encoded),
                CharForm::Plain => raw.push(c),
                CharForm::OtherCase if c.is_ascii_lowercase() => raw.push(c.to_ascii_uppercase()),
                CharForm::OtherCase => raw.push(c.to_ascii_lowercase()),
                CharForm::LowerHex => raw.push_str(&encoded),
                CharForm::UpperHex => raw.push_str(&encoded.to_uppercase()),
            }
        }
    }
    if trailing || segments.is_empty() {
        raw.push(if seps[0].index(2) == 0 { '/' } else { '\\' });
    }
    if let Some(q) = query {
        raw.push('?');
        raw.push_str(q);
    }
    raw
}

fn char_form() -> impl Strategy<Value = CharForm> {
    prop_oneof![
        3 => Just(CharForm::Plain),
        1 => Just(CharForm::OtherCase),
        1 => Just(CharForm::LowerHex),
        1 => Just(CharForm::UpperHex),
    ]
}

/// Text a request path may be made of, hostile pieces weighted up.
fn raw_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        6 => select(&[
            "/", "\\", "//", "%", "%2", "%2f", "%5C", "%2e", "%2E%2e", "..", ".", "?", "#", ";",
            "é", "%C3%A9", "%e2%82", "%00", "%c2%85", "\t", "api", "API", "%61pi", "public",
            "static", "a", "%25", "%252f", "ａｐｉ", "%ef%bd%81",
        ][..]).prop_map(str::to_string),
        1 => any::<char>().prop_map(String::from),
    ];
    vec(piece, 0..14).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(cases(1024))]

    /// Any way of writing a path — encodings, case, `\`, repeated `/`, `.`/`..` detours, a query —
    /// gets at least the policy of the path itself.
    #[test]
    fn no_disguise_of_a_path_gets_a_weaker_policy(
        table in route_table(),
        (segments, trailing) in normalised_path(),
        forms in vec(char_form(), 1..16),
        seps in vec(any::<Index>(), 1..6),
        query in proptest::option::of("[a-z=&/.]{0,12}"),
    ) {
        let mut path = format!("/{}", segments.join("/"));
        if trailing && !segments.is_empty() {
            path.push('/');
        }
        let own = table.policy_for(&path);
        let raw = disguise(&segments, trailing, &forms, &seps, &query);
        let normalised = normalise_path(&raw);
        prop_assert!(normalised.is_ok(), "{:?} → {:?}", raw, normalised);
        let normalised = normalised.unwrap();
        prop_assert!(
            normalised.eq_ignore_ascii_case(&path),
            "{:?} normalises to {:?}, not {:?}", raw, normalised, path
        );
        let applied = table.policy_for_request(&raw).unwrap();
        prop_assert!(
            applied >= own,
            "{:?} gets {} but {:?} is {} ({:?})", raw, applied, path, own, table
        );
    }

    /// For any text at all: no panic; an accepted path normalises to a clean absolute path that
    /// is a fixed point, and the policy applied is never weaker than the normalised path's.
    #[test]
    fn any_request_path_is_refused_or_normalised_cleanly(
        table in route_table(),
        raw in raw_path(),
        absolute in any::<bool>(),
    ) {
        let raw = if absolute { format!("/{raw}") } else { raw };
        let normalised = normalise_path(&raw);
        let applied = table.policy_for_request(&raw);
        prop_assert_eq!(normalised.is_ok(), applied.is_ok(), "{:?}", raw);
        let (Ok(normalised), Ok(applied)) = (normalised, applied) else { return Ok(()) };
        prop_assert!(normalised.starts_with('/'), "{:?} → {:?}", raw, normalised);
        prop_assert!(!normalised.contains("//"), "{:?} → {:?}", raw, normalised);
        prop_assert!(!normalised.chars().any(char::is_control), "{:?} → {:?}", raw, normalised);
        prop_assert!(
            !normalised.split('/').any(|s| s == "." || s == ".."),
            "{:?} → {:?}", raw, normalised
        );
        let own = table.policy_for(&normalised);
        prop_assert!(applied >= own, "{:?}: {} < {} of {:?}", raw, applied, own, normalised);
        // Requesting the normalised path itself (escaped so it decodes back) gives exactly its
        // policy: there is nothing left to resolve.
        let escaped = normalised.replace('%', "%25").replace('?', "%3F");
        prop_assert_eq!(normalise_path(&escaped), Ok(normalised.clone()));
        prop_assert_eq!(table.policy_for_request(&escaped), Ok(own), "{:?}", escaped);
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration text, through the entry point `--check` uses
// ---------------------------------------------------------------------------------------------

const SHIPPED: &str = include_str!("../../config/custodia.toml");

/// What `--check` does with a file's text: parse and validate, then print the summary.
fn check(text: &str, env: &HashMap<String, String>) -> Result<String, String> {
    custodia_proxy::config::parse_with_env(text, Path::new("prop.toml"), env)
        .map(|config| custodia_proxy::config::summary(&config))
        .map_err(|e| e.to_string())
}

/// The secrets `[auth]` needs, sometimes with odd or missing values. A good value names its
/// variable, so a message can be searched for it.
fn environment() -> impl Strategy<Value = HashMap<String, String>> {
    let good = |name: &str| format!("{name}-0123456789abcdef0123456789abcdef");
    let names = select(
        &[
            "APP_SECRET_KEY",
            "APP_SECRET_KEY_PREVIOUS",
            "AUTH0_CLIENT_SECRET",
            "AUTH0_CLIENT_ID",
            "AUTH0_DOMAIN",
            "CUSTODIA_AUTH_ISSUER",
            "CUSTODIA_ASSERTION_KEY",
        ][..],
    );
    let value = prop_oneof![
        4 => Just(None),
        1 => "\\PC{0,40}".prop_map(Some),
        1 => Just(Some(String::new())),
    ];
    (any::<bool>(), vec((names, value), 0..6)).prop_map(move |(full, extra)| {
        let mut env = HashMap::new();
        if full {
            for name in ["APP_SECRET_KEY", "AUTH0_CLIENT_SECRET", "AUTH0_CLIENT_ID"] {
                env.insert(name.to_string(), good(name));
            }
            env.insert("CUSTODIA_AUTH_ISSUER".into(), "http://127.0.0.1:1/".into());
        }
        for (name, value) in extra {
            env.insert(name.to_string(), value.unwrap_or_else(|| good(name)));
        }
        env
    })
}

/// TOML values an operator (or a typo) might write, extremes included.
fn toml_value() -> impl Strategy<Value = String> {
    let scalar: BoxedStrategy<String> = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        select(
            &[
                "0",
                "-1",
                "1",
                "65535",
                "65536",
                "4294967296",
                "18446744073709551615",
                "9223372036854775807",
                "-9223372036854775808",
                "1e308",
                "-1e308",
                "nan",
                "inf",
                "-inf",
                "0.5",
                "true",
                "false",
                "1979-05-27T07:32:00Z",
                "\"\"",
                "''",
            ][..]
        )
        .prop_map(str::to_string),
        select(
            &[
                "0s",
                "1ns",
                "1ms",
                "99ms",
                "100ms",
                "1s",
                "2s",
                "30d",
                "31d",
                "1y",
                "18446744073709551615s",
                "18446744073709551615ms",
                "584942417355y",
                "9999999999999h",
                "1s 1ns",
                "-1s",
                "s",
                "1",
                "1.5s",
                "1 s",
            ][..]
        )
        .prop_map(|d| format!("{d:?}")),
        select(
            &[
                "127.0.0.1:0",
                "127.0.0.1:8080",
                "[::1]:65535",
                "0.0.0.0:1",
                "host:99999",
                "app:8000",
                ":80",
                "127.0.0.1",
                "a:1",
                "[::1]",
                "localhost:0",
            ][..]
        )
        .prop_map(|a| format!("{a:?}")),
        select(
            &[
                "/",
                "/healthz",
                "",
                "healthz",
                "/%zz",
                "/a b",
                "//x",
                "http://127.0.0.1:1/",
                "https://idp.example/",
                "http://idp.example/",
                "https://x",
                "ftp://x/",
                "https://u:p@x/",
                "https://x/#f",
                "https://x/?q",
                "required",
                "public",
                "optional",
                "none",
                "least_conn",
                "round_robin",
                "json",
                "text",
                "debug",
                "info,foo=trace",
                "[",
                "client_secret_basic",
                "client_secret_post",
                "127.0.0.1/32",
                "::1/128",
                "10.0.0.0/33",
                "example.com",
                "@example.com",
                "a@b",
                "openid",
            ][..]
        )
        .prop_map(|s| format!("{s:?}")),
        "\\PC{0,12}".prop_map(|s| format!("{s:?}")),
    ]
    .boxed();
    prop_oneof![
        4 => scalar.clone(),
        1 => vec(scalar.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => (scalar.clone(), proptest::option::of(scalar)).prop_map(|(addr, weight)| match weight {
            Some(w) => format!("[{{ addr = {addr}, weight = {w} }}]"),
            None => format!("{{ addr = {addr} }}"),
        }),
    ]
}

/// A document from our sections and keys (and some that are not ours) with arbitrary values.
fn toml_document() -> impl Strategy<Value = String> {
    let header = select(
        &[
            "[server]",
            "[upstream]",
            "[upstream.health]",
            "[log]",
            "[admin]",
            "[auth]",
            "[[route]]",
            "[limits]",
            "[[upstream]]",
            "[server.x]",
            "",
        ][..],
    );
    let key = select(
        &[
            "listen",
            "threads",
            "grace_period",
            "keepalive_timeout",
            "pid_file",
            "upgrade_sock",
            "balance",
            "backends",
            "connect_timeout",
            "read_timeout",
            "send_timeout",
            "idle_timeout",
            "retries",
            "discovery_interval",
            "path",
            "interval",
            "timeout",
            "healthy_after",
            "unhealthy_after",
            "level",
            "format",
            "access_log",
            "issuer",
            "client_id",
            "public_url",
            "scopes",
            "session_ttl",
            "allowed_emails",
            "allowed_domains",
            "trusted_proxies",
            "default_policy",
            "client_auth",
            "prefix",
            "policy",
            "unknown",
        ][..],
    );
    let section = (header, vec((key, toml_value()), 0..6)).prop_map(|(header, entries)| {
        let mut text = format!("{header}\n");
        for (key, value) in entries {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text
    });
    vec(section, 0..7).prop_map(|s| s.concat())
}

/// A change to a line-oriented text.
#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    /// Replace the value of a `key = value` line.
    SetValue(Index, String),
    InsertText(Index, String),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => any::<Index>().prop_map(Edit::DeleteLine),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        4 => (any::<Index>(), toml_value()).prop_map(|(i, v)| Edit::SetValue(i, v)),
        1 => (any::<Index>(), prop_oneof![
            select(&["\n", "=", "[", "]", "\"", "'", "#", "{", "}", ",", "\\", "\n[auth]\n", "\n[[route]]\n"][..])
                .prop_map(str::to_string),
            "\\PC{1,6}",
        ]).prop_map(|(i, s)| Edit::InsertText(i, s)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply_edit(text: &str, edit: &Edit) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    match edit {
        Edit::DeleteLine(i) => {
            lines.remove(i.index(lines.len()));
        }
        Edit::DuplicateLine(i) => {
            let i = i.index(lines.len());
            lines.insert(i, lines[i].clone());
        }
        Edit::SwapLines(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
        }
        Edit::SetValue(i, value) => {
            // The i-th `key = value` line, if there is one.
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&n| !lines[n].starts_with('#') && lines[n].contains(" = "))
                .collect();
            if !assignments.is_empty() {
                let n = assignments[i.index(assignments.len())];
                let key = lines[n].split(" = ").next().unwrap_or_default().to_string();
                lines[n] = format!("{key} = {value}");
            }
        }
        Edit::InsertText(i, s) => {
            let mut chars: Vec<char> = text.chars().collect();
            let at = i.index(chars.len() + 1);
            chars.splice(at..at, s.chars());
            return chars.into_iter().collect();
        }
        Edit::Truncate(i) => {
            let chars: Vec<char> = text.chars().collect();
            return chars[..i.index(chars.len() + 1)].iter().collect();
        }
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn edits_of_the_shipped_config_are_accepted_or_refused_never_a_panic(
        edits in vec(edit(), 1..5),
        env in environment(),
    ) {
        let mut text = SHIPPED.to_string();
        for e in &edits {
            text = apply_edit(&text, e);
        }
        if let Err(message) = check(&text, &env) {
            prop_assert!(message.starts_with("prop.toml"), "{}", message);
            // Secrets are never echoed, even when they are refused.
            for name in ["APP_SECRET_KEY", "APP_SECRET_KEY_PREVIOUS", "AUTH0_CLIENT_SECRET", "CUSTODIA_ASSERTION_KEY"] {
                if let Some(secret) = env.get(name).filter(|v| v.trim().len() >= 8) {
                    prop_assert!(!message.contains(secret.trim()), "{} in {}", name, message);
                }
            }
        }
    }

    #[test]
    fn generated_documents_are_accepted_or_refused_never_a_panic(
        text in toml_document(),
        env in environment(),
    ) {
        let _ = check(&text, &env);
    }

    #[test]
    fn arbitrary_text_is_refused_never_a_panic(text in "\\PC{0,200}", env in environment()) {
        let _ = check(&text, &env);
    }
}

/// The shipped file is the base the edits start from: it must pass as it is.
#[test]
fn the_shipped_config_passes_the_check() {
    let mut env = HashMap::new();
    env.insert(
        "APP_SECRET_KEY".to_string(),
        "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d".to_string(),
    );
    env.insert("AUTH0_CLIENT_SECRET".to_string(), "secret".to_string());
    env.insert("AUTH0_CLIENT_ID".to_string(), "client".to_string());
    env.insert(
        "CUSTODIA_AUTH_ISSUER".to_string(),
        "http://127.0.0.1:1/".to_string(),
    );
    let summary = check(SHIPPED, &env).unwrap();
    assert!(summary.contains("127.0.0.1:8080"), "{summary}");
}
