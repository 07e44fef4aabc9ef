//! The signed-in session: what workers need to know about the user, sealed into a cookie and
//! checked on every request without any network call.
//!
//! It is kept small on purpose: opening it is on every request's path, and its cost grows with
//! its size. The ID token (over 1 KB from Auth0) is needed only at logout, so it lives in its own
//! cookie scoped to `/logout` ([`super::logout_hint`]), which browsers send nowhere else.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keys::SecretKeys;
use super::seal::{seal, unseal, Purpose, SealError};

/// Metric label for a request whose session opened and has not expired.
pub const VALID_LABEL: &str = "valid";
/// Every label of the "session checks by result" metric, for registering them up front.
pub const SESSION_RESULT_LABELS: [&str; 5] =
    [VALID_LABEL, "absent", "expired", "invalid", "not_allowed"];

/// A signed-in user. Times are unix seconds.
///
/// Sessions sealed by earlier versions also carried the raw ID token; it is ignored on opening.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct Session {
    /// The IdP's subject identifier.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
    /// When the session was issued.
    pub iat: u64,
    /// When the session stops being accepted.
    pub exp: u64,
}

impl Session {
    /// What is left of the session's life at `now_unix`, for the cookie's `Max-Age`.
    pub fn remaining(&self, now_unix: u64) -> Duration {
        Duration::from_secs(self.exp.saturating_sub(now_unix))
    }

    /// Whether the session is no longer accepted at `now_unix` (from its `exp` on).
    pub fn expired_at(&self, now_unix: u64) -> bool {
        now_unix >= self.exp
    }
}

/// Why a request has no usable session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no session cookie")]
    Absent,
    #[error("session cookie is malformed")]
    Malformed,
    #[error("session cookie failed authentication (tampered, or sealed with a key no longer configured)")]
    Invalid,
    #[error("session has expired")]
    Expired,
    /// Sealed by us, but for an email `allowed_emails` / `allowed_domains` no longer admit (the
    /// lists changed since the sign-in).
    #[error("the session's email is not allowed by allowed_emails / allowed_domains")]
    NotAllowed,
}

impl SessionError {
    /// The "session checks by result" metric label: `absent`, `expired` or `invalid`
    /// (malformed counts as invalid). A valid session is [`VALID_LABEL`].
    pub fn as_label(&self) -> &'static str {
        match self {
            SessionError::Absent => "absent",
            SessionError::Malformed | SessionError::Invalid => "invalid",
            SessionError::Expired => "expired",
            SessionError::NotAllowed => "not_allowed",
        }
    }
}

/// Seal a session for the session cookie (JSON inside [`seal`]).
pub fn seal_session(keys: &SecretKeys, session: &Session) -> String {
    // Serialising strings and integers cannot fail; an empty plaintext would open as Malformed.
    let json = serde_json::to_vec(session).unwrap_or_default();
    seal(keys, Purpose::Session, &json)
}

/// Open and check a session cookie value. An empty value is [`SessionError::Absent`]; a session
/// is expired once `now_unix >= exp`.
pub fn open_session(
    keys: &SecretKeys,
    sealed: &str,
    now_unix: u64,
) -> Result<Session, SessionError> {
    if sealed.is_empty() {
        return Err(SessionError::Absent);
    }
    let json = unseal(keys, Purpose::Session, sealed).map_err(|e| match e {
        SealError::Malformed => SessionError::Malformed,
        SealError::Invalid => SessionError::Invalid,
    })?;
    // Authentic but unreadable: sealed by an incompatible version of us.
    let session: Session = serde_json::from_slice(&json).map_err(|_| SessionError::Malformed)?;
    if session.expired_at(now_unix) {
        return Err(SessionError::Expired);
    }
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::seal::seal;

    const NOW: u64 = 1_700_000_000;

    fn keys() -> SecretKeys {
        SecretKeys::from_secrets("session-test-secret-session-test-01", &[]).unwrap()
    }

    fn alice() -> Session {
        Session {
            sub: "auth0|alice".into(),
            email: Some("alice@example.com".into()),
            name: Some("Alice Liddell".into()),
            picture: Some("https://example.com/alice.png".into()),
            iat: NOW,
            exp: NOW + 8 * 3600,
        }
    }

    #[test]
    fn round_trips_every_field() {
        let k = keys();
        let session = alice();
        assert_eq!(
            open_session(&k, &seal_session(&k, &session), NOW),
            Ok(session)
        );
        let minimal = Session {
            email: None,
            name: None,
            picture: None,
            ..alice()
        };
        let sealed = seal_session(&k, &minimal);
        assert_eq!(open_session(&k, &sealed, NOW), Ok(minimal));
        assert!(sealed.len() < seal_session(&k, &alice()).len());
    }

    #[test]
    fn expires_exactly_at_exp() {
        let k = keys();
        let sealed = seal_session(&k, &alice());
        let exp = alice().exp;
        assert!(open_session(&k, &sealed, exp - 1).is_ok());
        assert_eq!(open_session(&k, &sealed, exp), Err(SessionError::Expired));
        assert_eq!(
            open_session(&k, &sealed, exp + 86_400),
            Err(SessionError::Expired)
        );
        assert_eq!(alice().remaining(exp - 5), Duration::from_secs(5));
        assert_eq!(alice().remaining(exp + 5), Duration::ZERO);
    }

    #[test]
    fn absent_malformed_invalid_are_told_apart_and_labelled() {
        let k = keys();
        assert_eq!(open_session(&k, "", NOW), Err(SessionError::Absent));
        assert_eq!(
            open_session(&k, "garbage", NOW),
            Err(SessionError::Malformed)
        );
        let sealed = seal_session(&k, &alice());
        let mut tampered = sealed.clone().into_bytes();
        let i = tampered.len() / 2;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(open_session(&k, &tampered, NOW), Err(SessionError::Invalid));

        assert_eq!(SessionError::Absent.as_label(), "absent");
        assert_eq!(SessionError::Expired.as_label(), "expired");
        assert_eq!(SessionError::Invalid.as_label(), "invalid");
        assert_eq!(SessionError::Malformed.as_label(), "invalid");
        assert_eq!(SessionError::NotAllowed.as_label(), "not_allowed");
        for e in [
            SessionError::Absent,
            SessionError::Malformed,
            SessionError::Invalid,
            SessionError::Expired,
            SessionError::NotAllowed,
        ] {
            assert!(SESSION_RESULT_LABELS.contains(&e.as_label()));
        }
    }

    #[test]
    fn a_wrong_key_or_another_purpose_is_invalid() {
        let k = keys();
        let other = SecretKeys::from_secrets("some-other-secret-some-other-00001", &[]).unwrap();
        assert_eq!(
            open_session(&other, &seal_session(&k, &alice()), NOW),
            Err(SessionError::Invalid)
        );
        // A login-state cookie carrying session-shaped JSON cannot be used as a session.
        let json = serde_json::to_vec(&alice()).unwrap();
        let as_login = seal(&k, Purpose::LoginState, &json);
        assert_eq!(open_session(&k, &as_login, NOW), Err(SessionError::Invalid));
    }

    #[test]
    fn authentic_but_unreadable_content_is_malformed() {
        let k = keys();
        let sealed = seal(&k, Purpose::Session, b"{\"not\":\"a session\"}");
        assert_eq!(open_session(&k, &sealed, NOW), Err(SessionError::Malformed));
    }

    #[test]
    fn a_session_sealed_with_an_id_token_by_an_earlier_version_still_opens() {
        let k = keys();
        let mut json = serde_json::to_value(alice()).unwrap();
        json["id_token"] = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl".into();
        let sealed = seal(&k, Purpose::Session, &serde_json::to_vec(&json).unwrap());
        assert_eq!(open_session(&k, &sealed, NOW), Ok(alice()));
    }
}
