//! Route policies: which paths need a session, matched by prefix on the *normalised* path so
//! `/public/../api/x`, `/%61pi/x` or `//api/x` cannot slip past a rule for `/api/`.
//!
//! Matching decisions:
//! - Prefixes match as plain strings on the normalised path (`/api/` matches `/api/x`, not
//!   `/api`; `/api` would also match `/apix`), longest prefix wins, else the default policy.
//! - Matching is **ASCII case-insensitive** (`/API/x` gets the `/api/` policy): a worker that
//!   routes case-insensitively can then not be reached under a weaker rule; for a case-sensitive
//!   worker it only makes a 404 need a login. Two prefixes differing only in case are refused.
//! - [`RouteTable::policy_for_request`] is what the edge should call: the path is forwarded as
//!   sent, and a worker that does *not* resolve `..` (or does not decode `%2F`) would route
//!   `/api/x/../../public` to the API, so the stronger of the resolved and the unresolved reading
//!   is used.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

/// What a route needs. Ordered by strength: `Public < Optional < Required`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Forwarded as is; no session lookup.
    Public,
    /// Forwarded with identity when there is a valid session, anonymously otherwise.
    Optional,
    /// A valid session is needed: browsers are sent to log in, other clients get 401.
    Required,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Public => "public",
            Policy::Optional => "optional",
            Policy::Required => "required",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request path cannot be normalised; the edge answers 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("invalid percent-escape at byte {at}")]
    BadEscape { at: usize },
    #[error("path contains a control character")]
    ControlChar,
    #[error("path is not valid UTF-8 once decoded")]
    InvalidUtf8,
}

/// Why a route table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route prefix {prefix:?} must start with '/'")]
    NotAbsolute { prefix: String },
    #[error("route prefix {prefix:?} is not a valid path: {source}")]
    Invalid { prefix: String, source: PathError },
    #[error(
        "route prefix {prefix:?} is not normalised; write it as {normalised:?} \
         (decoded, no '.'/'..' segments, no repeated '/', no '?')"
    )]
    NotNormalised { prefix: String, normalised: String },
    #[error("route prefix {prefix:?} is listed twice (prefixes are matched ignoring ASCII case)")]
    Duplicate { prefix: String },
}

/// Normalise a request path for policy matching.
///
/// 1. Only the path counts: everything from the first `?` is dropped.
/// 2. Every `%XX` is decoded once; a `%` not followed by two hex digits is an error.
/// 3. The decoded path must be UTF-8 (non-ASCII is fine) with no control characters.
/// 4. `\` counts as `/`; the path must start with one of them.
/// 5. Repeated `/` collapse; `.` segments vanish; `..` removes the previous segment and never
///    climbs above the root.
/// 6. A trailing `/` is kept (also after a final `.` or `..`, as RFC 3986 does).
pub fn normalise_path(raw_path: &str) -> Result<String, PathError> {
    let decoded = decode(raw_path)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    Ok(join(&segments, trailing_slash))
}

/// Steps 1–4 and the collapsing of repeated `/`, but with `.` and `..` left in place: the path
/// as a worker that does not resolve dot segments would route it.
fn unresolved_path(raw_path: &str) -> Result<String, PathError> {
    let decoded = decode(raw_path)?;
    let segments: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    Ok(join(&segments, decoded.len() > 1 && decoded.ends_with('/')))
}

/// Steps 1–4: the decoded path with every `\` turned into `/`, starting with `/`.
fn decode(raw_path: &str) -> Result<String, PathError> {
    let path = raw_path.split('?').next().unwrap_or_default();
    if !matches!(path.as_bytes().first(), Some(b'/' | b'\\')) {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).and_then(|&h| (h as char).to_digit(16));
            let decoded = match (hex(i + 1), hex(i + 2)) {
                (Some(hi), Some(lo)) => (hi * 16 + lo) as u8,
                _ => return Err(PathError::BadEscape { at: i }),
            };
            out.push(if decoded == b'\\' { b'/' } else { decoded });
            i += 3;
        } else {
            out.push(if b == b'\\' { b'/' } else { b });
            i += 1;
        }
    }
    let text = String::from_utf8(out).map_err(|_| PathError::InvalidUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(PathError::ControlChar);
    }
    Ok(text)
}

/// The path before any `?`, when [`normalise_path`] and [`unresolved_path`] would both return
/// it unchanged: printable ASCII without `%` or `\`, no repeated `/`, no `.` or `..` segment.
/// Nearly every request's path is; the full normalisation allocates and copies.
fn already_normal(raw_path: &str) -> Option<&str> {
    let end = memchr::memchr(b'?', raw_path.as_bytes()).unwrap_or(raw_path.len());
    let path = &raw_path[..end];
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return None;
    }
    // One pass (every request takes it): plain bytes only, and no `.` or `..` segment and no
    // empty one, unless it is the last (a trailing '/').
    let segment_ok = |s: &[u8], last: bool| !(s == b"." || s == b".." || (s.is_empty() && !last));
    let mut segment_start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if b == b'/' {
            if !segment_ok(&bytes[segment_start..i], false) {
                return None;
            }
            segment_start = i + 1;
        } else if !matches!(b, 0x21..=0x7e) || matches!(b, b'%' | b'\\') {
            return None;
        }
    }
    segment_ok(&bytes[segment_start..], true).then_some(path)
}

fn join(segments: &[&str], trailing_slash: bool) -> String {
    let mut out = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum::<usize>() + 1);
    for segment in segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

/// Route prefixes and their policies, longest match first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTable {
    /// Sorted by prefix length, longest first.
    routes: Vec<(String, Policy)>,
    default: Policy,
}

impl RouteTable {
    /// Check the prefixes (absolute, already normalised, no duplicates ignoring ASCII case) and
    /// build the table; `default` applies where no prefix matches.
    pub fn new(routes: Vec<(String, Policy)>, default: Policy) -> Result<RouteTable, RouteError> {
        let mut checked: Vec<(String, Policy)> = Vec::with_capacity(routes.len());
        for (prefix, policy) in routes {
            if !prefix.starts_with('/') {
                return Err(RouteError::NotAbsolute { prefix });
            }
            let normalised = match normalise_path(&prefix) {
                Ok(normalised) => normalised,
                Err(source) => return Err(RouteError::Invalid { prefix, source }),
            };
            if normalised != prefix {
                return Err(RouteError::NotNormalised { prefix, normalised });
            }
            if checked.iter().any(|(p, _)| p.eq_ignore_ascii_case(&prefix)) {
                return Err(RouteError::Duplicate { prefix });
            }
            checked.push((prefix, policy));
        }
        // Stable: equal lengths keep their configured order (they cannot both match anyway).
        checked.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(RouteTable {
            routes: checked,
            default,
        })
    }

    /// The policy of the longest prefix of `normalised_path` (ASCII case-insensitive), else the
    /// default. Give it the output of [`normalise_path`].
    pub fn policy_for(&self, normalised_path: &str) -> Policy {
        let path = normalised_path.as_bytes();
        self.routes
            .iter()
            .find(|(prefix, _)| {
                path.len() >= prefix.len()
                    && path[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            })
            .map_or(self.default, |(_, policy)| *policy)
    }

    /// The policy for a raw request path (origin form, query allowed): the stronger of the
    /// policies of its normalised form and of its decoded-but-unresolved form (see the module
    /// notes). Errors are those of [`normalise_path`].
    pub fn policy_for_request(&self, raw_path: &str) -> Result<Policy, PathError> {
        self.policy_and_path(raw_path).map(|(policy, _)| policy)
    }

    /// [`RouteTable::policy_for_request`] and the normalised path it judged (which names the
    /// proxy's own endpoints), normalised once.
    pub fn policy_and_path<'a>(
        &self,
        raw_path: &'a str,
    ) -> Result<(Policy, Cow<'a, str>), PathError> {
        if let Some(path) = already_normal(raw_path) {
            // Both forms are the path itself: nothing to decode, collapse or resolve.
            return Ok((self.policy_for(path), Cow::Borrowed(path)));
        }
        let normalised = normalise_path(raw_path)?;
        let resolved = self.policy_for(&normalised);
        let unresolved = self.policy_for(&unresolved_path(raw_path)?);
        Ok((resolved.max(unresolved), Cow::Owned(normalised)))
    }

    /// The configured prefixes, longest first.
    pub fn routes(&self) -> &[(String, Policy)] {
        &self.routes
    }

    pub fn default_policy(&self) -> Policy {
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_found_already_normal_is_what_the_full_normalisation_gives() {
        for path in [
            "/",
            "/api/hello",
            "/api/",
            "/static/app.v2.js",
            "/a/.b/...",
            "/x?q=/../",
        ] {
            assert!(already_normal(path).is_some(), "{path}");
        }
        // Every path of up to 6 characters over an alphabet of the troublemakers.
        let alphabet = ['/', 'a', '.', '%', '2', 'f', '\\', '?', ' '];
        let mut paths = vec![String::from("/")];
        let mut checked = 0;
        while let Some(path) = paths.pop() {
            if let Some(fast) = already_normal(&path) {
                assert_eq!(normalise_path(&path).as_deref(), Ok(fast), "{path:?}");
                assert_eq!(unresolved_path(&path).as_deref(), Ok(fast), "{path:?}");
                checked += 1;
            }
            if path.len() < 6 {
                paths.extend(alphabet.iter().map(|c| format!("{path}{c}")));
            }
        }
        assert!(checked > 1000, "only {checked} paths took the quick way");
    }

    fn table() -> RouteTable {
        RouteTable::new(
            vec![
                ("/".into(), Policy::Optional),
                ("/api/".into(), Policy::Required),
                ("/public/".into(), Policy::Public),
                ("/static/".into(), Policy::Public),
            ],
            Policy::Required,
        )
        .unwrap()
    }

    #[test]
    fn policies_are_ordered_by_strength_and_read_from_config() {
        assert!(Policy::Public < Policy::Optional && Policy::Optional < Policy::Required);
        assert_eq!(Policy::Public.max(Policy::Required), Policy::Required);
        #[derive(Deserialize)]
        struct Wrapper {
            policy: Policy,
        }
        for (text, policy) in [
            ("public", Policy::Public),
            ("optional", Policy::Optional),
            ("required", Policy::Required),
        ] {
            let w: Wrapper = serde_json::from_str(&format!("{{\"policy\":\"{text}\"}}")).unwrap();
            assert_eq!(w.policy, policy);
            assert_eq!(policy.to_string(), text);
        }
        assert!(serde_json::from_str::<Wrapper>("{\"policy\":\"Required\"}").is_err());
        assert!(serde_json::from_str::<Wrapper>("{\"policy\":\"none\"}").is_err());
    }

    #[test]
    fn normalisation_table() {
        for (raw, expected) in [
            ("/", "/"),
            ("\\", "/"),
            ("/api/x", "/api/x"),
            ("/api/x?y=1", "/api/x"),
            ("/api/x?y=/../public", "/api/x"),
            ("/api/", "/api/"),
            ("/api", "/api"),
            ("//api//x//", "/api/x/"),
            ("/api/./x", "/api/x"),
            ("/api/.", "/api/"),
            ("/api/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/../../..", "/"),
            ("/..", "/"),
            ("/../api/x", "/api/x"),
            ("/public/../api/x", "/api/x"),
            ("/%61pi/x", "/api/x"),
            ("/%41PI/x", "/API/x"),
            ("/api%2fx", "/api/x"),
            ("/api%2Fx", "/api/x"),
            ("\\api\\x", "/api/x"),
            ("/api%5cx", "/api/x"),
            ("/static/..%2f..%2fapi/x", "/api/x"),
            ("/%2e%2e/api/x", "/api/x"),
            ("/public/%2E%2E/api/x", "/api/x"),
            ("/a/...", "/a/..."),
            ("/a/.b/..c", "/a/.b/..c"),
            ("/a%20b", "/a b"),
            ("/%25", "/%"),
            ("/%2561pi", "/%61pi"),
            ("/caf%C3%A9/", "/café/"),
            ("/café", "/café"),
            ("/%3Fx", "/?x"),
            ("/a#b", "/a#b"),
        ] {
            assert_eq!(normalise_path(raw).as_deref(), Ok(expected), "{raw:?}");
        }
    }

    #[test]
    fn normalisation_errors() {
        for (raw, expected) in [
            ("", PathError::NotAbsolute),
            ("api/x", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("http://host/api/x", PathError::NotAbsolute),
            ("%2fapi", PathError::NotAbsolute),
            ("?/api", PathError::NotAbsolute),
            ("/a%", PathError::BadEscape { at: 2 }),
            ("/a%2", PathError::BadEscape { at: 2 }),
            ("/a%zz", PathError::BadEscape { at: 2 }),
            ("/a%%20", PathError::BadEscape { at: 2 }),
            ("/a%2g", PathError::BadEscape { at: 2 }),
            ("/a%00", PathError::ControlChar),
            ("/a%0a", PathError::ControlChar),
            ("/a%0D", PathError::ControlChar),
            ("/a%7f", PathError::ControlChar),
            ("/a%c2%85", PathError::ControlChar),
            ("/a\tb", PathError::ControlChar),
            ("/a\u{0}", PathError::ControlChar),
            ("/a%ff", PathError::InvalidUtf8),
            ("/a%c3", PathError::InvalidUtf8),
            ("/a%c3%28", PathError::InvalidUtf8),
            ("/%e2%82", PathError::InvalidUtf8),
        ] {
            assert_eq!(normalise_path(raw), Err(expected), "{raw:?}");
        }
    }

    #[test]
    fn path_tricks_reach_the_api_policy() {
        let t = table();
        for raw in [
            "/api/x",
            "/public/../api/x",
            "/%61pi/x",
            "//api/x",
            "/api/./x",
            "/API/x",
            "/Api/X",
            "/api%2fx",
            "\\api\\x",
            "/static/..%2f..%2fapi/x",
            "/public/%2e%2e/api/x",
            "/public/..%5capi/x",
            "/./api/x",
            "/api//x",
            "/%2f%2fapi/x",
            "/api/x?next=/public/",
            "/..//api/x",
            "/api/",
        ] {
            let normalised = normalise_path(raw).unwrap();
            assert_eq!(
                t.policy_for(&normalised),
                Policy::Required,
                "{raw:?} → {normalised:?}"
            );
            assert_eq!(t.policy_for_request(raw), Ok(Policy::Required), "{raw:?}");
        }
    }

    #[test]
    fn longest_prefix_wins_and_the_default_applies_elsewhere() {
        let t = RouteTable::new(
            vec![
                ("/api/".into(), Policy::Required),
                ("/api/health/".into(), Policy::Public),
                ("/docs".into(), Policy::Public),
            ],
            Policy::Optional,
        )
        .unwrap();
        assert_eq!(t.policy_for("/api/x"), Policy::Required);
        assert_eq!(t.policy_for("/api/health/live"), Policy::Public);
        assert_eq!(t.policy_for("/api/health"), Policy::Required);
        assert_eq!(
            t.policy_for("/api"),
            Policy::Optional,
            "'/api/' does not match '/api'"
        );
        assert_eq!(t.policy_for("/docs"), Policy::Public);
        assert_eq!(
            t.policy_for("/docsxyz"),
            Policy::Public,
            "plain string prefix"
        );
        assert_eq!(t.policy_for("/"), Policy::Optional);
        assert_eq!(t.policy_for("/other"), Policy::Optional);
        assert_eq!(t.routes()[0].0, "/api/health/");
        assert_eq!(t.default_policy(), Policy::Optional);
        assert_eq!(
            table().policy_for("/anything"),
            Policy::Optional,
            "'/' matches all"
        );
        let empty = RouteTable::new(vec![], Policy::Public).unwrap();
        assert_eq!(empty.policy_for("/api/x"), Policy::Public);
    }

    #[test]
    fn matching_ignores_ascii_case_only() {
        let t = table();
        assert_eq!(t.policy_for("/API/x"), Policy::Required);
        assert_eq!(t.policy_for("/aPi/"), Policy::Required);
        // Unicode look-alikes are different paths.
        assert_eq!(t.policy_for("/ａｐｉ/x"), Policy::Optional);
        assert_eq!(t.policy_for("/ÀPI/x"), Policy::Optional);
        // Multi-byte characters at the prefix boundary do not panic.
        assert_eq!(t.policy_for("/é"), Policy::Optional);
        assert_eq!(t.policy_for("/ap"), Policy::Optional);
        assert_eq!(
            t.policy_for(""),
            Policy::Required,
            "not a normalised path: the default"
        );
    }

    #[test]
    fn the_unresolved_reading_keeps_dot_segment_tricks_from_weakening_a_route() {
        let t = table();
        // A worker that does not resolve dot segments routes these to /api/ handlers.
        for raw in [
            "/api/x/../../public/y",
            "/api/%2e%2e/public/y",
            "/api/x%2f..%2f..%2fpublic/y",
            "/api/..",
            "/api/../static/app.js",
        ] {
            assert_eq!(t.policy_for_request(raw), Ok(Policy::Required), "{raw:?}");
        }
        // ...while plain paths keep their own policy.
        assert_eq!(t.policy_for_request("/public/y"), Ok(Policy::Public));
        assert_eq!(
            t.policy_for_request("/static/app.js?v=1"),
            Ok(Policy::Public)
        );
        assert_eq!(t.policy_for_request("/"), Ok(Policy::Optional));
        assert_eq!(t.policy_for_request("/public/../y"), Ok(Policy::Optional));
        assert_eq!(
            t.policy_for_request("/a%zz"),
            Err(PathError::BadEscape { at: 2 })
        );
    }

    #[test]
    fn route_prefixes_are_validated() {
        let build = |prefixes: &[&str]| {
            RouteTable::new(
                prefixes
                    .iter()
                    .map(|p| (p.to_string(), Policy::Public))
                    .collect(),
                Policy::Required,
            )
        };
        assert!(build(&["/", "/api/", "/api", "/café/"]).is_ok());
        assert_eq!(
            build(&["api/"]),
            Err(RouteError::NotAbsolute {
                prefix: "api/".into()
            })
        );
        assert_eq!(
            build(&["\\api\\"]),
            Err(RouteError::NotAbsolute {
                prefix: "\\api\\".into()
            })
        );
        for (prefix, normalised) in [
            ("//api/", "/api/"),
            ("/api/./", "/api/"),
            ("/public/../api/", "/api/"),
            ("/%61pi/", "/api/"),
            ("/api/?x", "/api/"),
            ("/a\\b/", "/a/b/"),
        ] {
            assert_eq!(
                build(&[prefix]),
                Err(RouteError::NotNormalised {
                    prefix: prefix.into(),
                    normalised: normalised.into()
                }),
                "{prefix:?}"
            );
        }
        assert!(matches!(
            build(&["/a%zz/"]),
            Err(RouteError::Invalid {
                source: PathError::BadEscape { .. },
                ..
            })
        ));
        assert_eq!(
            build(&["/api/", "/x/", "/API/"]),
            Err(RouteError::Duplicate {
                prefix: "/API/".into()
            })
        );
        let message = build(&["//api/"]).unwrap_err().to_string();
        assert!(message.contains("\"/api/\""), "{message}");
    }

    /// Every encoding, case, slash and dot-segment disguise of a required path must still be
    /// required, under both the plain lookup and the request lookup.
    #[test]
    fn no_disguise_of_a_required_path_is_weaker() {
        let t = table();
        let mut rng = fastrand::Rng::with_seed(0xC0FFEE);
        let detours = [
            "/public/..",
            "/static/x/../..",
            "/./",
            "//",
            "/nope/..",
            "\\",
        ];
        for _ in 0..20_000 {
            let mut raw = String::new();
            if rng.u8(..4) == 0 {
                raw.push_str(detours[rng.usize(..detours.len())]);
            }
            for (i, segment) in ["api", "secret", "x"].iter().enumerate() {
                if i > 0 && rng.u8(..6) == 0 {
                    raw.push_str(detours[rng.usize(..detours.len())]);
                }
                // Separator: '/', '\', repeated, or percent-encoded (only after a real one so
                // the path stays absolute).
                raw.push_str(match rng.u8(..6) {
                    0 => "\\",
                    1 => "//",
                    2 if !raw.is_empty() => "%2f",
                    3 if !raw.is_empty() => "%5C",
                    _ => "/",
                });
                if rng.u8(..5) == 0 {
                    raw.push_str("./");
                }
                for ch in segment.chars() {
                    let ch = if rng.bool() {
                        ch.to_ascii_uppercase()
                    } else {
                        ch
                    };
                    match rng.u8(..3) {
                        0 => raw.push_str(&format!("%{:02x}", ch as u8)),
                        1 => raw.push_str(&format!("%{:02X}", ch as u8)),
                        _ => raw.push(ch),
                    }
                }
            }
            if rng.bool() {
                raw.push_str(["/", "?q=1", "/.", "#f", "?x=/../public/"][rng.usize(..5)]);
            }
            let normalised = normalise_path(&raw).unwrap();
            assert_eq!(
                t.policy_for(&normalised),
                Policy::Required,
                "{raw:?} → {normalised:?}"
            );
            assert_eq!(t.policy_for_request(&raw), Ok(Policy::Required), "{raw:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(42);
        let pieces = [
            "/", "\\", "%", "%2", "%2f", "%e2%82", "..", ".", "?", "é", "a", "%00", "\t",
        ];
        for _ in 0..20_000 {
            let raw: String = (0..rng.usize(0..10))
                .map(|_| pieces[rng.usize(..pieces.len())])
                .collect();
            if let Ok(normalised) = normalise_path(&raw) {
                assert!(normalised.starts_with('/'), "{raw:?}");
                assert!(!normalised.contains("//"), "{raw:?} → {normalised:?}");
                assert!(
                    !normalised.split('/').any(|s| s == "." || s == ".."),
                    "{raw:?} → {normalised:?}"
                );
                // Idempotent once the characters decoding produced are escaped again.
                let escaped = normalised.replace('%', "%25").replace('?', "%3F");
                assert_eq!(normalise_path(&escaped), Ok(normalised.clone()), "{raw:?}");
                let _ = table().policy_for_request(&raw);
            }
        }
    }
}
