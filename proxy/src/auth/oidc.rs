//! The identity provider as the proxy sees it: discovery, the authorization URL (PKCE S256,
//! state, nonce), the code exchange with ID token verification (signature by JWKS, iss, aud, exp,
//! nonce, alg pinned to RS256), a rate-limited JWKS re-fetch when a token names an unknown key,
//! and the logout URL. The same code talks to Auth0, the test provider and the development one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreJsonWebKeySet, CoreJwsSigningAlgorithm,
};
use openidconnect::url::Url;
use openidconnect::{
    AuthType, AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, ProviderMetadataWithLogout, RedirectUrl, Scope, SignatureVerificationError,
    TokenResponse,
};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::config::{AuthSettings, ClientAuth};

type OidcClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// A JWKS re-fetch happens at most this often, however many unknown `kid`s arrive.
const JWKS_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Each call to the IdP gives up after this.
const IDP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider's metadata is not loaded yet (is {issuer} reachable?)")]
    NotReady { issuer: String },
    #[error("discovery at {issuer} failed: {reason}")]
    Discovery { issuer: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    #[error("the identity provider refused the code: {0}")]
    CodeRejected(String),
    #[error("the identity provider could not be reached: {0}")]
    Unreachable(String),
    #[error("the identity provider's answer could not be read: {0}")]
    BadAnswer(String),
    #[error("the identity provider returned no ID token")]
    NoIdToken,
    #[error("the ID token failed verification: {0}")]
    InvalidIdToken(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What the client needs to complete a login later.
#[derive(Debug)]
pub struct AuthorizeRequest {
    pub url: String,
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
}

/// The verified claims of a completed login.
#[derive(Debug, Clone)]
pub struct VerifiedUser {
    pub sub: String,
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub name: Option<String>,
    pub picture: Option<String>,
    pub id_token: String,
}

struct Discovered {
    metadata: ProviderMetadataWithLogout,
    client: OidcClient,
}

/// Shared by every request and kept across config reloads with the same IdP settings.
pub struct OidcProvider {
    issuer: String,
    client_id: String,
    client_secret: String,
    client_auth: Option<ClientAuth>,
    redirect_uri: String,
    scopes: Vec<String>,
    http: openidconnect::reqwest::Client,
    discovered: ArcSwapOption<Discovered>,
    last_jwks_refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl OidcProvider {
    pub fn new(settings: &AuthSettings) -> Result<OidcProvider, OidcError> {
        let http = openidconnect::reqwest::Client::builder()
            // Following redirects would open the token exchange to SSRF.
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(IDP_TIMEOUT)
            .build()
            .map_err(|e| OidcError::HttpClient(e.to_string()))?;
        Ok(OidcProvider {
            issuer: settings.issuer.clone(),
            client_id: settings.client_id.clone(),
            client_secret: settings.client_secret.0.clone(),
            client_auth: settings.client_auth,
            redirect_uri: settings.redirect_uri(),
            scopes: settings.scopes.clone(),
            http,
            discovered: ArcSwapOption::empty(),
            last_jwks_refresh: tokio::sync::Mutex::new(None),
        })
    }

    /// Whether this provider object can serve `settings` (same IdP and client).
    pub fn serves(&self, settings: &AuthSettings) -> bool {
        self.issuer == settings.issuer
            && self.client_id == settings.client_id
            && self.client_secret == settings.client_secret.0
            && self.client_auth == settings.client_auth
            && self.redirect_uri == settings.redirect_uri()
            && self.scopes == settings.scopes
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn is_ready(&self) -> bool {
        self.discovered.load().is_some()
    }

    /// Fetch the discovery document and the JWKS.
    pub async fn discover(&self) -> Result<(), OidcError> {
        let issuer = IssuerUrl::new(self.issuer.clone()).map_err(|e| OidcError::Discovery {
            issuer: self.issuer.clone(),
            reason: e.to_string(),
        })?;
        let metadata = ProviderMetadataWithLogout::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::Discovery {
                issuer: self.issuer.clone(),
                reason: error_chain(&e),
            })?;
        self.install(metadata)
    }

    fn install(&self, metadata: ProviderMetadataWithLogout) -> Result<(), OidcError> {
        let auth_type = match self.client_auth {
            Some(ClientAuth::Basic) => AuthType::BasicAuth,
            Some(ClientAuth::Post) => AuthType::RequestBody,
            None => {
                let methods = metadata.token_endpoint_auth_methods_supported();
                let advertises = |name: &str| {
                    methods.is_some_and(|m| {
                        m.iter().any(|x| {
                            serde_json::to_value(x)
                                .ok()
                                .and_then(|v| v.as_str().map(|s| s == name))
                                == Some(true)
                        })
                    })
                };
                if methods.is_none() || advertises("client_secret_basic") {
                    AuthType::BasicAuth
                } else if advertises("client_secret_post") {
                    AuthType::RequestBody
                } else {
                    AuthType::BasicAuth
                }
            }
        };
        let redirect = RedirectUrl::new(self.redirect_uri.clone())
            .map_err(|e| OidcError::Config(format!("redirect_uri: {e}")))?;
        let client = CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(self.client_id.clone()),
            Some(ClientSecret::new(self.client_secret.clone())),
        )
        .set_redirect_uri(redirect)
        .set_auth_type(auth_type);
        self.discovered
            .store(Some(Arc::new(Discovered { metadata, client })));
        Ok(())
    }

    fn current(&self) -> Result<Arc<Discovered>, OidcError> {
        self.discovered
            .load_full()
            .ok_or_else(|| OidcError::NotReady {
                issuer: self.issuer.clone(),
            })
    }

    /// A fresh authorization request: URL to send the browser to, and the secrets to keep.
    pub fn authorize(&self) -> Result<AuthorizeRequest, OidcError> {
        let discovered = self.current()?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = discovered.client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for scope in self.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        Ok(AuthorizeRequest {
            url: url.to_string(),
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
        })
    }

    /// Exchange the code and verify the ID token against `nonce`.
    pub async fn exchange(
        &self,
        code: &str,
        pkce_verifier: &str,
        nonce: &str,
    ) -> Result<VerifiedUser, OidcError> {
        let discovered = self.current()?;
        let request = discovered
            .client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| OidcError::Config(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.to_string()));
        let response = request.request_async(&self.http).await.map_err(|e| {
            use openidconnect::RequestTokenError::*;
            match &e {
                ServerResponse(r) => OidcError::CodeRejected(match r.error_description() {
                    Some(d) => format!("{} ({d})", r.error()),
                    None => r.error().to_string(),
                }),
                // It answered, with something that is not a token response (an HTML error
                // page, malformed JSON, a claim of the wrong type): not a network problem.
                Parse(..) | Other(_) => OidcError::BadAnswer(error_chain(&e)),
                Request(_) => OidcError::Unreachable(error_chain(&e)),
            }
        })?;
        let id_token = response.id_token().ok_or(OidcError::NoIdToken)?.clone();
        let nonce = Nonce::new(nonce.to_string());

        let mut discovered = discovered;
        let mut refreshed = false;
        loop {
            let current = discovered.clone();
            let verifier = current
                .client
                .id_token_verifier()
                .set_allowed_algs(vec![CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256])
                .set_issue_time_verifier_fn(|iat| {
                    check_issue_time(iat.timestamp(), super::flow::now_unix())
                });
            match id_token.claims(&verifier, &nonce) {
                Ok(claims) => {
                    return Ok(VerifiedUser {
                        sub: claims.subject().as_str().to_string(),
                        email: claims.email().map(|e| e.as_str().to_string()),
                        email_verified: claims.email_verified(),
                        name: claims
                            .name()
                            .and_then(|n| n.get(None))
                            .map(|n| n.as_str().to_string()),
                        picture: claims
                            .picture()
                            .and_then(|p| p.get(None))
                            .map(|p| p.as_str().to_string()),
                        id_token: id_token.to_string(),
                    })
                }
                Err(ClaimsVerificationError::SignatureVerification(
                    SignatureVerificationError::NoMatchingKey,
                )) if !refreshed => {
                    // The IdP may have rotated its keys since discovery.
                    self.refresh_jwks(&discovered).await?;
                    discovered = self.current()?;
                    refreshed = true;
                }
                Err(e) => return Err(OidcError::InvalidIdToken(e.to_string())),
            }
        }
    }

    /// Re-fetch the JWKS, at most once per [`JWKS_REFRESH_MIN_INTERVAL`]. `Ok` at once when the
    /// keys `seen` are no longer the current ones: a login that read them before another
    /// login's refresh (or a rediscovery) installed new ones checks again with those, rather
    /// than being refused by the rate limit that refresh just set.
    async fn refresh_jwks(&self, seen: &Arc<Discovered>) -> Result<(), OidcError> {
        let mut last = self.last_jwks_refresh.lock().await;
        if self.current().is_ok_and(|now| !Arc::ptr_eq(&now, seen)) {
            return Ok(());
        }
        if last.is_some_and(|t| t.elapsed() < JWKS_REFRESH_MIN_INTERVAL) {
            return Err(OidcError::InvalidIdToken(
                "signed with an unknown key (the key set was re-fetched moments ago)".into(),
            ));
        }
        *last = Some(Instant::now());
        let jwks = CoreJsonWebKeySet::fetch_async(seen.metadata.jwks_uri(), &self.http)
            .await
            .map_err(|e| OidcError::Unreachable(format!("JWKS: {}", error_chain(&e))))?;
        tracing::info!(issuer = %self.issuer, keys = jwks.keys().len(), "re-fetched the identity provider's signing keys");
        crate::metrics::auth().jwks_refreshes.inc();
        self.install(seen.metadata.clone().set_jwks(jwks))
    }

    /// Where to send the browser after the session is cleared: the IdP's end-session endpoint,
    /// Auth0's `/v2/logout`, or None when the IdP offers neither.
    pub fn logout_url(&self, id_token_hint: Option<&str>, return_to: &str) -> Option<String> {
        let discovered = self.discovered.load_full();
        let end_session = discovered.as_ref().and_then(|d| {
            d.metadata
                .additional_metadata()
                .end_session_endpoint
                .clone()
        });
        if let Some(endpoint) = end_session {
            let mut url = endpoint.url().clone();
            {
                let mut query = url.query_pairs_mut();
                if let Some(hint) = id_token_hint {
                    query.append_pair("id_token_hint", hint);
                }
                query.append_pair("post_logout_redirect_uri", return_to);
                query.append_pair("client_id", &self.client_id);
            }
            return Some(url.to_string());
        }
        let issuer = Url::parse(&self.issuer).ok()?;
        let host = issuer.host_str()?;
        if host.ends_with(".auth0.com") || host.ends_with(".auth0app.com") {
            let mut url = Url::parse(&format!("https://{host}/v2/logout")).ok()?;
            url.query_pairs_mut()
                .append_pair("client_id", &self.client_id)
                .append_pair("returnTo", return_to);
            return Some(url.to_string());
        }
        None
    }
}

impl std::fmt::Debug for OidcProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcProvider")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

/// How far ahead of our clock an ID token's `iat` may be: clocks drift, but a token issued
/// well in the future was minted wrongly (or to be replayed later) and is refused.
const MAX_ISSUED_AHEAD: std::time::Duration = std::time::Duration::from_secs(300);

/// The `iat` check of an ID token (seconds since the epoch), against `now`.
fn check_issue_time(iat: i64, now: u64) -> Result<(), String> {
    let latest = now.saturating_add(MAX_ISSUED_AHEAD.as_secs());
    if u64::try_from(iat).is_ok_and(|iat| iat > latest) {
        return Err(format!(
            "issued in the future (iat {iat}, {}s ahead of this clock)",
            iat.unsigned_abs().saturating_sub(now)
        ));
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Loads the IdP metadata in the background and retries until it succeeds, so the proxy starts
/// (and existing sessions keep working) while the IdP is down.
pub struct DiscoveryService {
    runtime: crate::runtime::SharedRuntime,
}

impl DiscoveryService {
    pub fn new(runtime: crate::runtime::SharedRuntime) -> DiscoveryService {
        DiscoveryService { runtime }
    }
}

#[async_trait]
impl BackgroundService for DiscoveryService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let provider = self.runtime.load().auth.as_ref().map(|a| a.oidc.clone());
            let wait = match provider.clone() {
                Some(provider) if !provider.is_ready() => match provider.discover().await {
                    Ok(()) => {
                        tracing::info!(
                            issuer = provider.issuer(),
                            "identity provider metadata loaded"
                        );
                        backoff = Duration::from_millis(500);
                        Duration::from_secs(1)
                    }
                    Err(e) => {
                        crate::metrics::auth()
                            .idp_errors
                            .with_label_values(&["discovery"])
                            .inc();
                        tracing::warn!(error = %e, retry_in = ?backoff, "identity provider discovery failed; /login answers 503 until it succeeds");
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        wait
                    }
                },
                // Loaded, or auth off: look again shortly in case a reload changed that.
                _ => Duration::from_secs(1),
            };
            // A reload that brings another identity provider (an issuer fixed) is tried at
            // once, with a fresh back-off, not after the old one's back-off ran out.
            let until = tokio::time::Instant::now() + wait;
            loop {
                let step = until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(PROVIDER_CHANGE_CHECK);
                if step.is_zero() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(step) => {}
                }
                let now = self.runtime.load().auth.as_ref().map(|a| a.oidc.clone());
                let changed = match (&provider, &now) {
                    (Some(before), Some(now)) => !Arc::ptr_eq(before, now),
                    (None, None) => false,
                    _ => true,
                };
                if changed {
                    backoff = Duration::from_millis(500);
                    break;
                }
            }
        }
    }
}

/// How often a discovery back-off looks for a reloaded identity provider.
const PROVIDER_CHANGE_CHECK: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RoutePolicy, Secret};

    fn settings(issuer: &str) -> AuthSettings {
        AuthSettings {
            issuer: issuer.into(),
            client_id: "client-1".into(),
            client_secret: Secret("s".into()),
            client_auth: None,
            public_url: "https://app.example".into(),
            secure_cookies: true,
            scopes: vec!["openid".into()],
            session_ttl: Duration::from_secs(60),
            allowed_emails: vec![],
            allowed_domains: vec![],
            trusted_proxies: vec![],
            default_policy: RoutePolicy::Required,
            routes: vec![],
            session_secret: Secret("k".repeat(32)),
            previous_session_secrets: vec![],
            assertion_key: Secret("a".repeat(32)),
        }
    }

    #[test]
    fn auth0_tenants_without_end_session_log_out_through_v2_logout() {
        let provider = OidcProvider::new(&settings("https://tenant.eu.auth0.com/")).unwrap();
        let url = provider
            .logout_url(Some("id.token"), "https://app.example/")
            .unwrap();
        assert_eq!(
            url,
            "https://tenant.eu.auth0.com/v2/logout?client_id=client-1&returnTo=https%3A%2F%2Fapp.example%2F"
        );
        let other = OidcProvider::new(&settings("https://idp.example/")).unwrap();
        assert_eq!(other.logout_url(None, "https://app.example/"), None);
    }

    #[test]
    fn login_before_discovery_is_refused_not_panicked() {
        let provider = OidcProvider::new(&settings("https://idp.example/")).unwrap();
        assert!(!provider.is_ready());
        assert!(matches!(
            provider.authorize(),
            Err(OidcError::NotReady { .. })
        ));
    }

    /// Discovery metadata with an empty key set (as after a rotation the proxy has not seen).
    fn metadata() -> ProviderMetadataWithLogout {
        serde_json::from_value(serde_json::json!({
            "issuer": "https://idp.example/",
            "authorization_endpoint": "https://idp.example/authorize",
            "token_endpoint": "https://idp.example/token",
            "jwks_uri": "https://idp.example/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }))
        .unwrap()
    }

    /// Found by a race audit: two logins whose tokens were signed with a rotated key; the
    /// first refreshes the key set, the second, which read the old set before that, found the
    /// refresh rate-limited and was refused ("sign-in did not complete").
    #[tokio::test]
    async fn a_login_that_read_the_keys_before_another_logins_refresh_checks_the_new_ones() {
        let provider = OidcProvider::new(&settings("https://idp.example/")).unwrap();
        provider.install(metadata()).unwrap();
        let seen = provider.current().unwrap();
        // Meanwhile another login refreshed the key set.
        provider.install(metadata()).unwrap();
        *provider.last_jwks_refresh.lock().await = Some(Instant::now());
        provider
            .refresh_jwks(&seen)
            .await
            .expect("the newer key set is there to check against");
        // With no newer key set, the rate limit stands: no fetch moments after the last one.
        let current = provider.current().unwrap();
        assert!(matches!(
            provider.refresh_jwks(&current).await,
            Err(OidcError::InvalidIdToken(_))
        ));
    }

    #[test]
    fn an_id_token_issued_well_ahead_of_our_clock_is_refused() {
        let now = 1_800_000_000;
        let ahead = MAX_ISSUED_AHEAD.as_secs() as i64;
        assert_eq!(check_issue_time(now as i64, now), Ok(()));
        assert_eq!(
            check_issue_time(now as i64 - 3600, now),
            Ok(()),
            "issued earlier"
        );
        assert_eq!(
            check_issue_time(now as i64 + ahead, now),
            Ok(()),
            "clock drift"
        );
        let refused = check_issue_time(now as i64 + 86_400, now).unwrap_err();
        assert!(refused.contains("86400s ahead"), "{refused}");
        assert_eq!(
            check_issue_time(-1, now),
            Ok(()),
            "before the epoch is not ahead"
        );
    }
}
