//! The operator's secrets (APP_SECRET_KEY and the keys it replaced), turned into one AEAD key per
//! [`Purpose`] so a cookie sealed for one job can never be opened as another.
//!
//! Derivation: `key = HMAC-SHA256(secret, "custodia/v1/" + purpose)`. Changing it would log
//! everyone out, so a test pins it to a vector computed with `openssl dgst -hmac`.

use std::fmt;

use aes_gcm::{Aes256Gcm, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::seal::Purpose;

/// The shortest secret we accept: 256 bits, what `openssl rand -hex 32` prints (as 64 characters).
pub const MIN_SECRET_BYTES: usize = 32;

/// Why the secrets cannot be used. Messages are written for the operator reading a startup error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "APP_SECRET_KEY must be at least {MIN_SECRET_BYTES} bytes (it has {len}); \
         generate one with: openssl rand -hex 32"
    )]
    CurrentTooShort { len: usize },
    /// `index` counts from 1 in the order the previous keys were given.
    #[error(
        "previous secret key #{index} must be at least {MIN_SECRET_BYTES} bytes (it has {len}); \
         generate one with: openssl rand -hex 32"
    )]
    PreviousTooShort { index: usize, len: usize },
    /// HMAC accepts keys of any length, so this is not expected to happen.
    #[error("cannot derive keys from {which}")]
    Derivation { which: &'static str },
}

/// The ciphers for every purpose, for the current secret and each previous one.
///
/// Sealing always uses the current secret; opening tries the current one, then each previous
/// one in order, so rotating `APP_SECRET_KEY` does not log everyone out. The AES key schedules are
/// computed once here, not per request.
#[derive(Clone)]
pub struct SecretKeys {
    current: KeySet,
    previous: Vec<KeySet>,
}

#[derive(Clone)]
struct KeySet {
    session: Aes256Gcm,
    login_state: Aes256Gcm,
    logout_hint: Aes256Gcm,
}

impl SecretKeys {
    /// Check and derive. Every secret, current or previous, must be at least
    /// [`MIN_SECRET_BYTES`] long; the bytes are used as given (no trimming, no hex decoding).
    pub fn from_secrets(current: &str, previous: &[String]) -> Result<SecretKeys, KeyError> {
        if current.len() < MIN_SECRET_BYTES {
            return Err(KeyError::CurrentTooShort { len: current.len() });
        }
        let current = KeySet::derive(current.as_bytes(), "APP_SECRET_KEY")?;
        let previous = previous
            .iter()
            .enumerate()
            .map(|(i, secret)| {
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(KeyError::PreviousTooShort {
                        index: i + 1,
                        len: secret.len(),
                    });
                }
                KeySet::derive(secret.as_bytes(), "a previous secret key")
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SecretKeys { current, previous })
    }

    /// How many previous secrets are still accepted for opening.
    pub fn previous_count(&self) -> usize {
        self.previous.len()
    }

    /// The cipher that seals new values for `purpose`.
    pub(crate) fn sealing_cipher(&self, purpose: Purpose) -> &Aes256Gcm {
        self.current.cipher(purpose)
    }

    /// The ciphers to try when opening, current first.
    pub(crate) fn opening_ciphers(&self, purpose: Purpose) -> impl Iterator<Item = &Aes256Gcm> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .map(move |set| set.cipher(purpose))
    }
}

impl fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKeys")
            .field("current", &"<redacted>")
            .field(
                "previous",
                &format_args!("{} <redacted>", self.previous.len()),
            )
            .finish()
    }
}

impl KeySet {
    fn derive(secret: &[u8], which: &'static str) -> Result<KeySet, KeyError> {
        let cipher = |purpose| {
            derive_key(secret, purpose)
                .map(|key| Aes256Gcm::new(&key.into()))
                .ok_or(KeyError::Derivation { which })
        };
        Ok(KeySet {
            session: cipher(Purpose::Session)?,
            login_state: cipher(Purpose::LoginState)?,
            logout_hint: cipher(Purpose::LogoutHint)?,
        })
    }

    fn cipher(&self, purpose: Purpose) -> &Aes256Gcm {
        match purpose {
            Purpose::Session => &self.session,
            Purpose::LoginState => &self.login_state,
            Purpose::LogoutHint => &self.logout_hint,
        }
    }
}

/// `HMAC-SHA256(secret, "custodia/v1/" + purpose)`; `None` only if HMAC refused the key, which
/// it does not for any length.
fn derive_key(secret: &[u8], purpose: Purpose) -> Option<[u8; 32]> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
    mac.update(purpose.context().as_bytes());
    Some(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn derivation_is_pinned_to_hmac_sha256_of_the_purpose() {
        // printf 'custodia/v1/session' | openssl dgst -sha256 -hmac 0123456789abcdef0123456789abcdef
        assert_eq!(
            hex(&derive_key(SECRET.as_bytes(), Purpose::Session).unwrap()),
            "34466014e48274745d2163ece51a343fcc0e5ef2cee79c73d9b2f24c674472d8"
        );
        assert_eq!(
            hex(&derive_key(SECRET.as_bytes(), Purpose::LoginState).unwrap()),
            "9ebf47419528ccd3d7fbae4c3507586e2870a521df5884df2807704ac2b39421"
        );
    }

    #[test]
    fn a_short_current_secret_says_what_to_set_and_how_to_generate_one() {
        let err = SecretKeys::from_secrets("too-short", &[]).unwrap_err();
        assert_eq!(err, KeyError::CurrentTooShort { len: 9 });
        let message = err.to_string();
        assert!(message.contains("APP_SECRET_KEY"), "{message}");
        assert!(message.contains("at least 32 bytes"), "{message}");
        assert!(message.contains("openssl rand -hex 32"), "{message}");
        assert!(SecretKeys::from_secrets("", &[]).is_err());
        assert!(SecretKeys::from_secrets(&SECRET[..31], &[]).is_err());
        assert!(
            SecretKeys::from_secrets(SECRET, &[]).is_ok(),
            "exactly 32 is enough"
        );
    }

    #[test]
    fn a_short_previous_secret_is_named_by_position() {
        let previous = vec!["p".repeat(40), "short".to_string()];
        let err = SecretKeys::from_secrets(SECRET, &previous).unwrap_err();
        assert_eq!(err, KeyError::PreviousTooShort { index: 2, len: 5 });
        assert!(err.to_string().contains("openssl rand -hex 32"));
    }

    #[test]
    fn debug_never_prints_key_material() {
        let previous = vec!["previous-secret-previous-secret-!".to_string()];
        let keys = SecretKeys::from_secrets(SECRET, &previous).unwrap();
        let shown = format!("{keys:?} {keys:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!shown.contains("previous-secret"), "{shown}");
        for purpose in [Purpose::Session, Purpose::LoginState] {
            let key = derive_key(SECRET.as_bytes(), purpose).unwrap();
            assert!(!shown.contains(&hex(&key)), "{shown}");
            assert!(!shown.contains(&hex(&key[..4])), "{shown}");
        }
        assert!(shown.contains("redacted"), "{shown}");
        assert_eq!(keys.previous_count(), 1);
    }
}
