//! Authenticated encryption of small values (session and login-state cookies): AES-256-GCM with a
//! random 96-bit nonce, the purpose bound as associated data, and key rotation on open.
//!
//! Format: `"v1." + base64url_no_pad(nonce[12] || ciphertext || tag[16])`.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Nonce, Tag};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::keys::SecretKeys;

/// The version prefix of every sealed value.
pub const SEAL_PREFIX: &str = "v1.";
/// Longest sealed value [`unseal`] will look at; anything longer is refused before decoding.
pub const MAX_SEALED_LEN: usize = 16 * 1024;
/// Longest plaintext whose sealed form still fits in [`MAX_SEALED_LEN`].
pub const MAX_PLAINTEXT_LEN: usize =
    (MAX_SEALED_LEN - SEAL_PREFIX.len()) / 4 * 3 - NONCE_LEN - TAG_LEN;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What a sealed value is for. Each purpose has its own derived key *and* is bound as associated
/// data, so a login-state cookie can never be replayed as a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    Session,
    LoginState,
    LogoutHint,
}

impl Purpose {
    /// The key-derivation context and associated data: `"custodia/v1/" + purpose`.
    pub fn context(self) -> &'static str {
        match self {
            Purpose::Session => "custodia/v1/session",
            Purpose::LoginState => "custodia/v1/login-state",
            Purpose::LogoutHint => "custodia/v1/logout-hint",
        }
    }
}

/// Why a sealed value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not something we could have produced: wrong prefix, bad base64, too short or too long.
    #[error("sealed value is malformed")]
    Malformed,
    /// Well-formed but authentication failed under every key: tampered, truncated, forged,
    /// sealed for another purpose, or sealed with a key that is no longer configured.
    #[error("sealed value failed authentication")]
    Invalid,
}

/// Why [`try_seal`] could not seal.
#[derive(Debug, thiserror::Error)]
pub enum SealFailure {
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("plaintext of {len} bytes is too large for AES-GCM")]
    TooLarge { len: usize },
}

/// Seal `plaintext` for `purpose` with the current key.
///
/// Never fails in practice. If the operating system's random generator is broken (or the
/// plaintext exceeds AES-GCM's 64 GiB limit) this logs an error and returns the bare
/// [`SEAL_PREFIX`], which every [`unseal`] refuses as [`SealError::Malformed`]: we fail closed
/// rather than reuse a nonce. Callers that want the error use [`try_seal`].
///
/// No size limit is applied here; values longer than [`MAX_SEALED_LEN`] cannot be opened, and
/// the cookie writer refuses them (`CookieError::TooLarge`).
pub fn seal(keys: &SecretKeys, purpose: Purpose, plaintext: &[u8]) -> String {
    match try_seal(keys, purpose, plaintext) {
        Ok(sealed) => sealed,
        Err(error) => {
            tracing::error!(%error, purpose = purpose.context(), "cannot seal a value");
            SEAL_PREFIX.to_string()
        }
    }
}

/// [`seal`], reporting failures instead of returning an unopenable value.
pub fn try_seal(
    keys: &SecretKeys,
    purpose: Purpose,
    plaintext: &[u8],
) -> Result<String, SealFailure> {
    let mut buf = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    buf.resize(NONCE_LEN, 0);
    getrandom::getrandom(&mut buf[..NONCE_LEN]).map_err(SealFailure::Random)?;
    buf.extend_from_slice(plaintext);
    let (nonce, body) = buf.split_at_mut(NONCE_LEN);
    let tag = keys
        .sealing_cipher(purpose)
        .encrypt_in_place_detached(Nonce::from_slice(nonce), purpose.context().as_bytes(), body)
        .map_err(|_| SealFailure::TooLarge {
            len: plaintext.len(),
        })?;
    buf.extend_from_slice(&tag);
    let mut out = String::with_capacity(SEAL_PREFIX.len() + buf.len().div_ceil(3) * 4);
    out.push_str(SEAL_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&buf, &mut out);
    Ok(out)
}

/// Open a value sealed for `purpose`, trying the current key and then each previous key.
pub fn unseal(keys: &SecretKeys, purpose: Purpose, sealed: &str) -> Result<Vec<u8>, SealError> {
    if sealed.len() > MAX_SEALED_LEN {
        return Err(SealError::Malformed);
    }
    let body = sealed
        .strip_prefix(SEAL_PREFIX)
        .ok_or(SealError::Malformed)?;
    let mut raw = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| SealError::Malformed)?;
    if raw.len() < NONCE_LEN + TAG_LEN {
        return Err(SealError::Malformed);
    }
    let tag_at = raw.len() - TAG_LEN;
    let (head, tag) = raw.split_at_mut(tag_at);
    let (nonce, body) = head.split_at_mut(NONCE_LEN);
    let (nonce, tag) = (Nonce::from_slice(nonce), Tag::from_slice(tag));
    let aad = purpose.context().as_bytes();
    // aes-gcm checks the tag before decrypting, so a failed attempt leaves `body` untouched
    // for the next key.
    let opened = keys.opening_ciphers(purpose).any(|cipher| {
        cipher
            .decrypt_in_place_detached(nonce, aad, body, tag)
            .is_ok()
    });
    if !opened {
        return Err(SealError::Invalid);
    }
    raw.truncate(tag_at);
    raw.drain(..NONCE_LEN);
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURRENT: &str = "current-secret-current-secret-0001";
    const OLD: &str = "old-secret-old-secret-old-secret-01";

    fn keys(current: &str, previous: &[&str]) -> SecretKeys {
        let previous: Vec<String> = previous.iter().map(|s| s.to_string()).collect();
        SecretKeys::from_secrets(current, &previous).unwrap()
    }

    fn decode(sealed: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD
            .decode(sealed.strip_prefix(SEAL_PREFIX).unwrap())
            .unwrap()
    }

    fn encode(raw: &[u8]) -> String {
        format!("{SEAL_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    #[test]
    fn round_trips_and_uses_a_fresh_nonce_each_time() {
        let k = keys(CURRENT, &[]);
        for plaintext in [&b""[..], b"x", b"hello, sealed world", &[0u8; 5000][..]] {
            let a = seal(&k, Purpose::Session, plaintext);
            let b = seal(&k, Purpose::Session, plaintext);
            assert!(a.starts_with("v1."), "{a}");
            assert_ne!(a, b, "same plaintext must not give the same sealed value");
            assert_ne!(decode(&a)[..NONCE_LEN], decode(&b)[..NONCE_LEN]);
            assert_eq!(unseal(&k, Purpose::Session, &a).unwrap(), plaintext);
            assert_eq!(unseal(&k, Purpose::Session, &b).unwrap(), plaintext);
        }
    }

    #[test]
    fn the_plaintext_is_not_visible_in_the_sealed_value() {
        let k = keys(CURRENT, &[]);
        let sealed = seal(&k, Purpose::Session, b"alice@example.com");
        let raw = decode(&sealed);
        assert!(!raw.windows(5).any(|w| w == b"alice"));
        assert!(!sealed.contains("alice"));
        assert_eq!(raw.len(), NONCE_LEN + 17 + TAG_LEN);
    }

    #[test]
    fn the_sealed_value_is_cookie_and_url_safe() {
        let k = keys(CURRENT, &[]);
        for len in 0..64 {
            let sealed = seal(&k, Purpose::Session, &vec![0xAB; len]);
            assert!(
                sealed
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
                "{sealed}"
            );
        }
    }

    #[test]
    fn every_single_byte_change_of_the_sealed_text_is_refused() {
        let k = keys(CURRENT, &[]);
        let sealed = seal(&k, Purpose::Session, b"{\"sub\":\"alice\"}");
        let bytes = sealed.as_bytes();
        for i in 0..bytes.len() {
            for replacement in [b'A', b'z', b'0', b'-', b'_', b'.', b'=', b'+', b'/', b' '] {
                if bytes[i] == replacement {
                    continue;
                }
                let mut mutated = bytes.to_vec();
                mutated[i] = replacement;
                let mutated = String::from_utf8(mutated).unwrap();
                assert!(
                    unseal(&k, Purpose::Session, &mutated).is_err(),
                    "byte {i} -> {:?} was accepted: {mutated}",
                    replacement as char
                );
            }
        }
    }

    #[test]
    fn every_bit_flip_of_the_decoded_bytes_fails_authentication() {
        let k = keys(CURRENT, &[]);
        let raw = decode(&seal(&k, Purpose::Session, b"some session"));
        for i in 0..raw.len() {
            for bit in 0..8 {
                let mut flipped = raw.clone();
                flipped[i] ^= 1 << bit;
                assert_eq!(
                    unseal(&k, Purpose::Session, &encode(&flipped)),
                    Err(SealError::Invalid),
                    "flip of bit {bit} in byte {i} was not detected"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let k = keys(CURRENT, &[]);
        let sealed = seal(&k, Purpose::Session, b"a session worth keeping");
        for len in 0..sealed.len() {
            assert!(
                unseal(&k, Purpose::Session, &sealed[..len]).is_err(),
                "truncated to {len} was accepted"
            );
        }
        let raw = decode(&sealed);
        for len in 0..raw.len() {
            let expected = if len < NONCE_LEN + TAG_LEN {
                SealError::Malformed
            } else {
                SealError::Invalid
            };
            assert_eq!(
                unseal(&k, Purpose::Session, &encode(&raw[..len])),
                Err(expected),
                "decoded bytes truncated to {len}"
            );
        }
        let mut extended = raw.clone();
        extended.push(0);
        assert_eq!(
            unseal(&k, Purpose::Session, &encode(&extended)),
            Err(SealError::Invalid)
        );
    }

    #[test]
    fn malformed_input_is_told_apart_from_a_failed_check() {
        let k = keys(CURRENT, &[]);
        let sealed = seal(&k, Purpose::Session, b"x");
        let body = &sealed[SEAL_PREFIX.len()..];
        for junk in [
            String::new(),
            "v1.".into(),
            "v1".into(),
            body.to_string(),
            format!("v2.{body}"),
            format!("V1.{body}"),
            format!("v1.{body}="),
            format!("v1.{body}!"),
            format!("v1. {body}"),
            "v1.*****************************************".into(),
            format!("v1.{}", "A".repeat(10)),
            "\u{0}\u{1}\u{7f}\u{ff}".into(),
        ] {
            assert_eq!(
                unseal(&k, Purpose::Session, &junk),
                Err(SealError::Malformed),
                "{junk:?}"
            );
        }
        // Standard (non-url-safe) base64 alphabet and padding are not accepted either.
        let standard = base64::engine::general_purpose::STANDARD.encode(decode(&sealed));
        if standard.contains(['+', '/', '=']) {
            assert_eq!(
                unseal(&k, Purpose::Session, &format!("v1.{standard}")),
                Err(SealError::Malformed)
            );
        }
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let k = keys(CURRENT, &[]);
        let huge = format!("v1.{}", "A".repeat(MAX_SEALED_LEN));
        assert_eq!(
            unseal(&k, Purpose::Session, &huge),
            Err(SealError::Malformed)
        );
        let largest = seal(&k, Purpose::Session, &vec![7u8; MAX_PLAINTEXT_LEN]);
        assert!(largest.len() <= MAX_SEALED_LEN, "{}", largest.len());
        assert_eq!(
            unseal(&k, Purpose::Session, &largest).unwrap().len(),
            MAX_PLAINTEXT_LEN
        );
        let too_big = seal(&k, Purpose::Session, &vec![7u8; MAX_PLAINTEXT_LEN + 3]);
        assert!(too_big.len() > MAX_SEALED_LEN);
        assert_eq!(
            unseal(&k, Purpose::Session, &too_big),
            Err(SealError::Malformed)
        );
    }

    #[test]
    fn a_wrong_key_is_refused() {
        let sealed = seal(&keys(CURRENT, &[]), Purpose::Session, b"x");
        let other = keys("another-secret-another-secret-00001", &[]);
        assert_eq!(
            unseal(&other, Purpose::Session, &sealed),
            Err(SealError::Invalid)
        );
    }

    #[test]
    fn rotation_opens_old_values_only_while_the_old_key_is_listed() {
        let old = keys(OLD, &[]);
        let sealed_with_old = seal(&old, Purpose::Session, b"old session");

        let rotated = keys(CURRENT, &[OLD]);
        assert_eq!(
            unseal(&rotated, Purpose::Session, &sealed_with_old).unwrap(),
            b"old session"
        );
        let rotated_later = keys(CURRENT, &["unrelated-unrelated-unrelated-0001", OLD]);
        assert_eq!(
            unseal(&rotated_later, Purpose::Session, &sealed_with_old).unwrap(),
            b"old session",
            "any position in the previous list works"
        );
        let dropped = keys(CURRENT, &[]);
        assert_eq!(
            unseal(&dropped, Purpose::Session, &sealed_with_old),
            Err(SealError::Invalid)
        );

        // New values are sealed with the current key: the old key alone cannot open them.
        let fresh = seal(&rotated, Purpose::Session, b"new session");
        assert_eq!(
            unseal(&old, Purpose::Session, &fresh),
            Err(SealError::Invalid)
        );
        assert_eq!(
            unseal(&dropped, Purpose::Session, &fresh).unwrap(),
            b"new session"
        );
    }

    #[test]
    fn a_value_sealed_for_one_purpose_does_not_open_as_another() {
        let k = keys(CURRENT, &[OLD]);
        let login = seal(&k, Purpose::LoginState, b"{\"sub\":\"x\"}");
        assert_eq!(
            unseal(&k, Purpose::Session, &login),
            Err(SealError::Invalid)
        );
        let session = seal(&k, Purpose::Session, b"{\"sub\":\"x\"}");
        assert_eq!(
            unseal(&k, Purpose::LoginState, &session),
            Err(SealError::Invalid)
        );
        assert!(unseal(&k, Purpose::LoginState, &login).is_ok());
    }

    #[test]
    fn the_fallback_value_never_opens() {
        let k = keys(CURRENT, &[]);
        assert_eq!(
            unseal(&k, Purpose::Session, SEAL_PREFIX),
            Err(SealError::Malformed)
        );
    }
}
