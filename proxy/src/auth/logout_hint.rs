//! The logout hint: the raw ID token, kept for the IdP's end-session `id_token_hint`, sealed in
//! its own cookie that browsers send only to `/logout`.
//!
//! It is bound to the session it was issued with (same `sub` and `iat`), so a hint left over
//! from another sign-in is never handed to the IdP for the current one.

use serde::{Deserialize, Serialize};

use super::keys::SecretKeys;
use super::seal::{seal, unseal, Purpose};
use super::session::Session;

#[derive(Serialize, Deserialize)]
struct LogoutHint {
    sub: String,
    iat: u64,
    id_token: String,
}

/// Seal `id_token` as the logout hint of `session`.
pub fn seal_logout_hint(keys: &SecretKeys, session: &Session, id_token: &str) -> String {
    let hint = LogoutHint {
        sub: session.sub.clone(),
        iat: session.iat,
        id_token: id_token.to_string(),
    };
    // Serialising strings and integers cannot fail; an empty plaintext would not open.
    let json = serde_json::to_vec(&hint).unwrap_or_default();
    seal(keys, Purpose::LogoutHint, &json)
}

/// The ID token of a sealed logout hint, if it opens and belongs to `session`.
pub fn open_logout_hint(keys: &SecretKeys, sealed: &str, session: &Session) -> Option<String> {
    let json = unseal(keys, Purpose::LogoutHint, sealed).ok()?;
    let hint: LogoutHint = serde_json::from_slice(&json).ok()?;
    (hint.sub == session.sub && hint.iat == session.iat).then_some(hint.id_token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::session::seal_session;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";

    fn keys() -> SecretKeys {
        SecretKeys::from_secrets("logout-hint-test-secret-logout-01", &[]).unwrap()
    }

    fn alice(iat: u64) -> Session {
        Session {
            sub: "auth0|alice".into(),
            email: None,
            name: None,
            picture: None,
            iat,
            exp: iat + 3600,
        }
    }

    #[test]
    fn opens_for_the_session_it_was_issued_with() {
        let k = keys();
        let sealed = seal_logout_hint(&k, &alice(10), TOKEN);
        assert_eq!(
            open_logout_hint(&k, &sealed, &alice(10)).as_deref(),
            Some(TOKEN)
        );
        assert!(!sealed.contains("eyJ"), "the token is sealed, not visible");
    }

    #[test]
    fn a_hint_from_another_sign_in_or_user_is_ignored() {
        let k = keys();
        let sealed = seal_logout_hint(&k, &alice(10), TOKEN);
        assert_eq!(open_logout_hint(&k, &sealed, &alice(11)), None);
        let bob = Session {
            sub: "auth0|bob".into(),
            ..alice(10)
        };
        assert_eq!(open_logout_hint(&k, &sealed, &bob), None);
    }

    #[test]
    fn a_session_cookie_or_tampered_value_is_not_a_hint() {
        let k = keys();
        assert_eq!(
            open_logout_hint(&k, &seal_session(&k, &alice(10)), &alice(10)),
            None
        );
        let mut sealed = seal_logout_hint(&k, &alice(10), TOKEN).into_bytes();
        let i = sealed.len() / 2;
        sealed[i] = if sealed[i] == b'A' { b'B' } else { b'A' };
        let sealed = String::from_utf8(sealed).unwrap();
        assert_eq!(open_logout_hint(&k, &sealed, &alice(10)), None);
        assert_eq!(open_logout_hint(&k, "garbage", &alice(10)), None);
    }
}
