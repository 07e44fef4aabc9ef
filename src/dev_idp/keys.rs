//! The provider's RSA signing key: generation, `kid`, the public JWKS and RS256 JWT signing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::DevIdpError;

/// Modulus size of generated keys, and the smallest accepted from settings.
pub(crate) const KEY_BITS: usize = 2048;

/// Generates a fresh RSA-2048 private key from the OS RNG.
///
/// This takes from tens of milliseconds to a second: call it from a blocking task
/// (`tokio::task::spawn_blocking`), as [`serve`](super::serve) does.
pub fn generate_signing_key() -> Result<RsaPrivateKey, DevIdpError> {
    RsaPrivateKey::new(&mut OsRng, KEY_BITS).map_err(|source| DevIdpError::KeyGeneration { source })
}

/// The `kid` of a public key: base64url of the first 8 bytes of SHA-256 over the modulus.
pub fn key_id(public: &RsaPublicKey) -> String {
    let digest = Sha256::digest(public.n().to_bytes_be());
    URL_SAFE_NO_PAD.encode(&digest[..8])
}

/// A private key with its derived `kid` and public JWK.
pub(crate) struct SigningKey {
    private: RsaPrivateKey,
    kid: String,
    public_jwk: Value,
}

impl SigningKey {
    /// Wraps `private`, refusing keys shorter than [`KEY_BITS`].
    pub(crate) fn new(private: RsaPrivateKey) -> Result<Self, DevIdpError> {
        let bits = private.n().bits();
        if bits < KEY_BITS {
            return Err(DevIdpError::WeakKey { bits });
        }
        let public = private.to_public_key();
        let kid = key_id(&public);
        let public_jwk = json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        });
        Ok(Self {
            private,
            kid,
            public_jwk,
        })
    }

    /// The key id carried in every token header.
    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS document: `{"keys": [public JWK]}`.
    pub(crate) fn jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk] })
    }

    /// Signs `claims` as a compact RS256 JWT with `kid` in the header.
    pub(crate) fn sign_jwt(&self, claims: &Value) -> Result<String, DevIdpError> {
        let header = json!({ "alg": "RS256", "typ": "JWT", "kid": self.kid });
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let digest = Sha256::digest(token.as_bytes());
        // Blinded signing (the RNG argument) so signing time does not leak the key.
        let signature = self
            .private
            .sign_with_rng(&mut OsRng, Pkcs1v15Sign::new::<Sha256>(), &digest)
            .map_err(|source| DevIdpError::Signing { source })?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(token)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rsa::BigUint;

    #[test]
    fn signed_jwt_verifies_against_the_jwk() {
        let key = SigningKey::new(generate_signing_key().unwrap()).unwrap();
        let token = key.sign_jwt(&json!({ "sub": "x" })).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);

        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["kid"], key.kid());
        assert_eq!(header["alg"], "RS256");

        let jwk = &key.jwks()["keys"][0];
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
        let public =
            RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e)).unwrap();
        assert_eq!(key_id(&public), key.kid());
        let digest = Sha256::digest(format!("{}.{}", parts[0], parts[1]).as_bytes());
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        public
            .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &signature)
            .unwrap();
    }

    #[test]
    fn short_keys_are_refused() {
        let weak = RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
        assert!(matches!(
            SigningKey::new(weak),
            Err(DevIdpError::WeakKey { bits: 1024 })
        ));
    }
}
