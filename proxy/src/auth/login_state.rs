//! The per-login state (OAuth `state`, OIDC `nonce`, PKCE verifier, where to go afterwards),
//! sealed into a short-lived cookie named after the state so parallel logins do not collide.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::keys::SecretKeys;
use super::seal::{seal, unseal, Purpose, SealError};

/// How long a login may take between /login and /callback; also the login cookie's Max-Age.
pub const LOGIN_STATE_TTL: Duration = Duration::from_secs(10 * 60);

/// What /callback needs to finish the login started by /login. `exp` is unix seconds.
/// `Debug` leaves out the nonce and the PKCE verifier.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
pub struct LoginState {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    /// A path already checked by `safe_return_target`.
    pub return_to: String,
    pub exp: u64,
}

impl fmt::Debug for LoginState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginState")
            .field("state", &self.state)
            .field("nonce", &"<redacted>")
            .field("pkce_verifier", &"<redacted>")
            .field("return_to", &self.return_to)
            .field("exp", &self.exp)
            .finish()
    }
}

/// Why /callback cannot use the login cookie. Messages suit the 4xx page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginStateError {
    #[error("no login in progress in this browser (missing login cookie); please sign in again")]
    Absent,
    #[error("the login cookie is malformed; please sign in again")]
    Malformed,
    #[error("the login cookie failed authentication; please sign in again")]
    Invalid,
    #[error("the login took longer than 10 minutes; please sign in again")]
    Expired,
    #[error("the state returned by the identity provider does not match this login")]
    StateMismatch,
}

impl LoginStateError {
    /// A short label for logs and metrics.
    pub fn as_label(&self) -> &'static str {
        match self {
            LoginStateError::Absent => "absent",
            LoginStateError::Malformed => "malformed",
            LoginStateError::Invalid => "invalid",
            LoginStateError::Expired => "expired",
            LoginStateError::StateMismatch => "state_mismatch",
        }
    }
}

/// Seal a login state for its cookie.
pub fn seal_login_state(keys: &SecretKeys, login: &LoginState) -> String {
    // Serialising strings and integers cannot fail; an empty plaintext would open as Malformed.
    let json = serde_json::to_vec(login).unwrap_or_default();
    seal(keys, Purpose::LoginState, &json)
}

/// Open a login cookie and check it belongs to `expected_state` (the `state` query parameter of
/// /callback, compared in constant time) and has not expired (`now_unix >= exp` is expired).
/// An empty `expected_state` never matches.
pub fn open_login_state(
    keys: &SecretKeys,
    sealed: &str,
    expected_state: &str,
    now_unix: u64,
) -> Result<LoginState, LoginStateError> {
    if sealed.is_empty() {
        return Err(LoginStateError::Absent);
    }
    let json = unseal(keys, Purpose::LoginState, sealed).map_err(|e| match e {
        SealError::Malformed => LoginStateError::Malformed,
        SealError::Invalid => LoginStateError::Invalid,
    })?;
    let login: LoginState =
        serde_json::from_slice(&json).map_err(|_| LoginStateError::Malformed)?;
    let matches: bool = login
        .state
        .as_bytes()
        .ct_eq(expected_state.as_bytes())
        .into();
    if !matches || expected_state.is_empty() {
        return Err(LoginStateError::StateMismatch);
    }
    if now_unix >= login.exp {
        return Err(LoginStateError::Expired);
    }
    Ok(login)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::session::{open_session, seal_session, Session, SessionError};

    const NOW: u64 = 1_700_000_000;

    fn keys() -> SecretKeys {
        SecretKeys::from_secrets("login-state-secret-login-state-0001", &[]).unwrap()
    }

    fn login() -> LoginState {
        LoginState {
            state: "Zm9vYmFyYmF6cXV4".into(),
            nonce: "bm9uY2Utbm9uY2Utbm9uY2U".into(),
            pkce_verifier: "dmVyaWZpZXItdmVyaWZpZXItdmVyaWZpZXI".into(),
            return_to: "/api/x?y=1".into(),
            exp: NOW + LOGIN_STATE_TTL.as_secs(),
        }
    }

    #[test]
    fn round_trips_for_the_matching_state() {
        let k = keys();
        let sealed = seal_login_state(&k, &login());
        assert_eq!(
            open_login_state(&k, &sealed, "Zm9vYmFyYmF6cXV4", NOW),
            Ok(login())
        );
        assert_eq!(LOGIN_STATE_TTL, Duration::from_secs(600));
    }

    #[test]
    fn another_state_is_refused() {
        let k = keys();
        let sealed = seal_login_state(&k, &login());
        for other in [
            "",
            "Zm9vYmFyYmF6cXV",
            "Zm9vYmFyYmF6cXV4x",
            "zm9vYmFyYmF6cXV4",
            "other",
        ] {
            assert_eq!(
                open_login_state(&k, &sealed, other, NOW),
                Err(LoginStateError::StateMismatch),
                "{other:?}"
            );
        }
        let empty = LoginState {
            state: String::new(),
            ..login()
        };
        assert_eq!(
            open_login_state(&k, &seal_login_state(&k, &empty), "", NOW),
            Err(LoginStateError::StateMismatch),
            "an empty state never matches"
        );
    }

    #[test]
    fn expires_after_the_ttl() {
        let k = keys();
        let sealed = seal_login_state(&k, &login());
        let exp = login().exp;
        assert!(open_login_state(&k, &sealed, &login().state, exp - 1).is_ok());
        assert_eq!(
            open_login_state(&k, &sealed, &login().state, exp),
            Err(LoginStateError::Expired)
        );
    }

    #[test]
    fn tampered_wrong_key_and_junk_are_refused() {
        let k = keys();
        let sealed = seal_login_state(&k, &login());
        let state = login().state;
        assert_eq!(
            open_login_state(&k, "", &state, NOW),
            Err(LoginStateError::Absent)
        );
        assert_eq!(
            open_login_state(&k, "nonsense", &state, NOW),
            Err(LoginStateError::Malformed)
        );
        let mut bytes = sealed.clone().into_bytes();
        let i = bytes.len() - 10;
        bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
        assert_eq!(
            open_login_state(&k, &String::from_utf8(bytes).unwrap(), &state, NOW),
            Err(LoginStateError::Invalid)
        );
        let other = SecretKeys::from_secrets("another-login-secret-another-00001", &[]).unwrap();
        assert_eq!(
            open_login_state(&other, &sealed, &state, NOW),
            Err(LoginStateError::Invalid)
        );
    }

    #[test]
    fn login_state_and_session_cannot_stand_in_for_each_other() {
        let k = keys();
        let login_cookie = seal_login_state(&k, &login());
        assert_eq!(
            open_session(&k, &login_cookie, NOW),
            Err(SessionError::Invalid)
        );
        let session = Session {
            sub: "alice".into(),
            email: None,
            name: None,
            picture: None,
            iat: NOW,
            exp: NOW + 60,
        };
        assert_eq!(
            open_login_state(&k, &seal_session(&k, &session), "alice", NOW),
            Err(LoginStateError::Invalid)
        );
    }

    #[test]
    fn debug_hides_the_nonce_and_verifier() {
        let shown = format!("{:?}", login());
        assert!(!shown.contains("bm9uY2U"), "{shown}");
        assert!(!shown.contains("dmVyaWZpZXI"), "{shown}");
        assert!(shown.contains("/api/x?y=1"), "{shown}");
    }
}
