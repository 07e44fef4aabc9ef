//! A development OpenID Connect provider for running the local stack offline.
//!
//! `cargo run` of the root package starts it on loopback when no real issuer is configured, and
//! the proxy talks to it through the same OIDC code it uses for Auth0: discovery, the
//! authorization code flow with PKCE (S256 only), client authentication by `client_secret_basic`
//! or `client_secret_post`, RS256 ID tokens whose `kid` names the key in the JWKS, userinfo and
//! RP-initiated logout. It knows one client and one user ([`DemoUser`]) and keeps its state in
//! memory. It refuses to listen anywhere but loopback.
//!
//! | endpoint | path |
//! |---|---|
//! | discovery | `GET /.well-known/openid-configuration` |
//! | authorization (login form) | `GET, POST /authorize` |
//! | token | `POST /oauth/token` |
//! | JWKS | `GET /.well-known/jwks.json` |
//! | userinfo | `GET, POST /userinfo` |
//! | logout | `GET, POST /oidc/logout` |
//!
//! Paths are relative to the issuer's own path, so `http://127.0.0.1:9400/idp` serves
//! `/idp/authorize`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use custodia::dev_idp::{serve, DemoUser, DevIdpSettings};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9400").await?;
//! let settings = DevIdpSettings {
//!     issuer: "http://127.0.0.1:9400".into(),
//!     client_id: "custodia-local".into(),
//!     client_secret: "local-secret".into(),
//!     redirect_uris: vec!["http://127.0.0.1:8080/callback".into()],
//!     post_logout_redirect_uris: vec!["http://127.0.0.1:8080/".into()],
//!     user: DemoUser::default(),
//!     signing_key: None,
//! };
//! serve(listener, settings, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```
//! ```text
//! curl http://127.0.0.1:9400/.well-known/openid-configuration
//! curl http://127.0.0.1:9400/.well-known/jwks.json
//! ```

mod form;
mod handlers;
mod keys;
mod pages;
mod server;
mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub use keys::{generate_signing_key, key_id};

/// An inline SVG avatar (a "D" in a circle), so pages showing `picture` work offline.
const DEMO_PICTURE: &str = "data:image/svg+xml,%3Csvg%20xmlns%3D%27http%3A%2F%2Fwww.w3.org%2F2000%2Fsvg%27%20viewBox%3D%270%200%2064%2064%27%3E%3Ccircle%20cx%3D%2732%27%20cy%3D%2732%27%20r%3D%2732%27%20fill%3D%27%233b6ea5%27%2F%3E%3Ctext%20x%3D%2732%27%20y%3D%2742%27%20font-size%3D%2730%27%20font-family%3D%27sans-serif%27%20text-anchor%3D%27middle%27%20fill%3D%27%23fff%27%3ED%3C%2Ftext%3E%3C%2Fsvg%3E";

/// The one user the development provider knows.
#[derive(Clone, PartialEq, Eq)]
pub struct DemoUser {
    /// Subject identifier (`sub` claim).
    pub sub: String,
    /// `email` claim (released with the `email` scope, always `email_verified: true`).
    pub email: String,
    /// `name` claim (released with the `profile` scope).
    pub name: String,
    /// `picture` claim: a URL; the default is an inline `data:` SVG.
    pub picture: String,
    /// Login name typed on the form; also sent as the `nickname` claim.
    pub username: String,
    /// Password typed on the form (printed on the form and in the banner: demo only).
    pub password: String,
}

impl Default for DemoUser {
    /// `demo` / `custodia-demo`, "Demo User", `demo@example.test`.
    fn default() -> Self {
        Self {
            sub: "dev-idp|demo".into(),
            email: "demo@example.test".into(),
            name: "Demo User".into(),
            picture: DEMO_PICTURE.into(),
            username: "demo".into(),
            password: "custodia-demo".into(),
        }
    }
}

impl std::fmt::Debug for DemoUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoUser")
            .field("sub", &self.sub)
            .field("email", &self.email)
            .field("name", &self.name)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What [`serve`] runs: the issuer, its one registered client and its one user.
#[derive(Clone)]
pub struct DevIdpSettings {
    /// Issuer URL, e.g. `http://127.0.0.1:9400` — used verbatim as the `iss` claim (a trailing
    /// slash is kept there but not doubled in endpoint URLs).
    pub issuer: String,
    /// The registered client's id.
    pub client_id: String,
    /// The registered client's secret (accepted by Basic or in the body).
    pub client_secret: String,
    /// Redirect URIs accepted at `/authorize`, compared exactly.
    pub redirect_uris: Vec<String>,
    /// Where `/oidc/logout` may send the browser back to, compared exactly.
    pub post_logout_redirect_uris: Vec<String>,
    /// The demo account.
    pub user: DemoUser,
    /// The RS256 signing key (at least 2048 bits); `None` generates a fresh one at start.
    /// Give a key to keep tokens valid across restarts, or different keys to test rotation.
    pub signing_key: Option<rsa::RsaPrivateKey>,
}

impl std::fmt::Debug for DevIdpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdpSettings")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("redirect_uris", &self.redirect_uris)
            .field("post_logout_redirect_uris", &self.post_logout_redirect_uris)
            .field("user", &self.user)
            .field(
                "signing_key",
                &self
                    .signing_key
                    .as_ref()
                    .map(|key| key_id(&key.to_public_key())),
            )
            .finish()
    }
}

/// Why the development provider could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevIdpError {
    /// The listener is bound to a non-loopback address; this provider is for development only.
    #[error("the development identity provider only listens on loopback, not on {addr}")]
    NotLoopback { addr: SocketAddr },
    /// The listener's local address could not be read.
    #[error("cannot read the listener's address")]
    LocalAddr {
        #[source]
        source: std::io::Error,
    },
    /// A setting is unusable.
    #[error("dev IdP setting `{field}`: {problem}")]
    InvalidSettings {
        field: &'static str,
        problem: &'static str,
    },
    /// The supplied signing key is too short.
    #[error("the signing key has {bits} bits; at least 2048 are required")]
    WeakKey { bits: usize },
    /// Generating the RSA key failed.
    #[error("cannot generate the RSA signing key")]
    KeyGeneration {
        #[source]
        source: rsa::Error,
    },
    /// The blocking key-generation task panicked or was cancelled.
    #[error("the key generation task failed")]
    KeyGenerationTask {
        #[source]
        source: tokio::task::JoinError,
    },
    /// Signing a token failed.
    #[error("cannot sign a token")]
    Signing {
        #[source]
        source: rsa::Error,
    },
}

/// The "development only" banner [`serve`] prints to stderr when it starts.
pub fn banner(settings: &DevIdpSettings) -> String {
    let rule = "=".repeat(72);
    format!(
        "{rule}\n  {}\n  issuer:    {}\n  client_id: {}\n  sign in as `{}` with password `{}`\n{rule}",
        pages::NOT_FOR_PRODUCTION.to_uppercase(),
        settings.issuer,
        settings.client_id,
        settings.user.username,
        settings.user.password,
    )
}

/// Serves the development OIDC provider on `listener` until `shutdown` completes.
///
/// Refuses, before serving anything, a listener that is not on a loopback address
/// ([`DevIdpError::NotLoopback`]) and unusable settings. Generates an RSA-2048 key on a blocking
/// thread unless [`DevIdpSettings::signing_key`] is given. Requests that arrive while the key is
/// being generated wait in the listen backlog. On shutdown it stops accepting and gives open
/// connections a few seconds to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: DevIdpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DevIdpError> {
    let addr = listener
        .local_addr()
        .map_err(|source| DevIdpError::LocalAddr { source })?;
    if !addr.ip().to_canonical().is_loopback() {
        return Err(DevIdpError::NotLoopback { addr });
    }
    validate(&settings)?;
    let banner = banner(&settings);
    let DevIdpSettings {
        issuer,
        client_id,
        client_secret,
        redirect_uris,
        post_logout_redirect_uris,
        user,
        signing_key,
    } = settings;
    let private = match signing_key {
        Some(key) => key,
        None => tokio::task::spawn_blocking(generate_signing_key)
            .await
            .map_err(|source| DevIdpError::KeyGenerationTask { source })??,
    };
    let key = keys::SigningKey::new(private)?;
    let config = handlers::Config {
        issuer,
        client_id,
        client_secret,
        redirect_uris,
        post_logout_redirect_uris,
        user,
    };
    eprintln!(
        "{banner}\n  listening on http://{addr} (signing key kid {})",
        key.kid()
    );
    server::run(
        listener,
        Arc::new(handlers::DevIdp::new(config, key)),
        shutdown,
    )
    .await;
    Ok(())
}

/// Checks the settings once, at start:
/// 1. the issuer is an `http(s)://` URL with a host and no query or fragment;
/// 2. the client id and secret are not empty;
/// 3. at least one redirect URI is registered, each absolute `http(s)://`;
/// 4. the demo user has a `sub`, a username and a password.
fn validate(settings: &DevIdpSettings) -> Result<(), DevIdpError> {
    let invalid = |field, problem| Err(DevIdpError::InvalidSettings { field, problem });
    if !is_http_url(&settings.issuer) || settings.issuer.contains(['?', '#']) {
        return invalid("issuer", "must be an http(s) URL without query or fragment");
    }
    if settings.client_id.is_empty() {
        return invalid("client_id", "must not be empty");
    }
    if settings.client_secret.is_empty() {
        return invalid("client_secret", "must not be empty");
    }
    if settings.redirect_uris.is_empty() {
        return invalid("redirect_uris", "at least one is required");
    }
    if !settings.redirect_uris.iter().all(|uri| is_http_url(uri)) {
        return invalid("redirect_uris", "each must be an absolute http(s) URL");
    }
    if !settings
        .post_logout_redirect_uris
        .iter()
        .all(|uri| is_http_url(uri))
    {
        return invalid(
            "post_logout_redirect_uris",
            "each must be an absolute http(s) URL",
        );
    }
    let user = &settings.user;
    if user.sub.is_empty() || user.username.is_empty() || user.password.is_empty() {
        return invalid("user", "sub, username and password must not be empty");
    }
    Ok(())
}

/// `http://host…` or `https://host…` with a non-empty host and no whitespace or control bytes.
fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && !url
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn settings() -> DevIdpSettings {
        DevIdpSettings {
            issuer: "http://127.0.0.1:9400".into(),
            client_id: "client".into(),
            client_secret: "secret".into(),
            redirect_uris: vec!["http://127.0.0.1:8080/callback".into()],
            post_logout_redirect_uris: vec![],
            user: DemoUser::default(),
            signing_key: None,
        }
    }

    #[test]
    fn validation_catches_each_rule() {
        assert!(validate(&settings()).is_ok());
        type Breaker = fn(&mut DevIdpSettings);
        let cases: [(Breaker, &str); 5] = [
            (|s| s.issuer = "127.0.0.1:9400".into(), "issuer"),
            (|s| s.issuer = "http://h/?x".into(), "issuer"),
            (|s| s.client_secret.clear(), "client_secret"),
            (|s| s.redirect_uris.clear(), "redirect_uris"),
            (
                |s| s.redirect_uris = vec!["/callback".into()],
                "redirect_uris",
            ),
        ];
        for (break_it, expected) in cases {
            let mut settings = settings();
            break_it(&mut settings);
            match validate(&settings) {
                Err(DevIdpError::InvalidSettings { field, .. }) => assert_eq!(field, expected),
                other => panic!("expected {expected} to be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn banner_says_development_only_and_debug_hides_secrets() {
        let settings = settings();
        let banner = banner(&settings);
        assert!(banner.contains("NOT FOR PRODUCTION"));
        assert!(banner.contains("custodia-demo"));
        let debug = format!("{settings:?}");
        assert!(!debug.contains("secret\""), "{debug}");
        assert!(!debug.contains("custodia-demo"), "{debug}");
    }

    #[test]
    fn demo_picture_is_an_inline_svg() {
        let picture = DemoUser::default().picture;
        assert!(picture.starts_with("data:image/svg+xml,"));
        assert!(!picture.contains(['<', '>', '"', '#', ' ']));
    }
}
