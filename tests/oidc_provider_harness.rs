//! The certified-provider harness (npm `oidc-provider`, see `tests/oidc-provider/`) works, and the
//! `openidconnect` crate, configured as the proxy uses it, completes discovery, the PKCE code
//! exchange and ID token verification against it with both client authentication methods.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreIdTokenVerifier, CoreProviderMetadata,
};
use openidconnect::{
    AuthType, AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce,
    PkceCodeChallenge, RedirectUrl, Scope, TokenResponse,
};
use reqwest::{StatusCode, Url};
use serde_json::Value;

use support::oidc_provider::{
    login, login_as_demo, AuthMethod, LoginError, OidcProvider, DEMO_EMAIL, DEMO_SUB, DEMO_USERNAME,
};

/// Never contacted: the login driver stops at the redirect to it.
const CALLBACK: &str = "http://127.0.0.1:8080/callback";

fn http() -> openidconnect::reqwest::Client {
    openidconnect::reqwest::Client::builder()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

fn query_param(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .expect("callback URL")
        .query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

async fn discover(idp: &OidcProvider) -> CoreProviderMetadata {
    CoreProviderMetadata::discover_async(IssuerUrl::new(idp.issuer()).expect("issuer URL"), &http())
        .await
        .expect("discovery")
}

/// What one login through the proxy's OIDC library yields.
struct LoggedIn {
    id_token: openidconnect::core::CoreIdToken,
    nonce: Nonce,
}

/// Authorize (PKCE S256 + nonce) → scripted login → code exchange, with `metadata` as discovered.
async fn code_flow(
    idp: &OidcProvider,
    metadata: CoreProviderMetadata,
    client_id: &str,
) -> LoggedIn {
    let registered = idp.client(client_id);
    let auth_type = match registered.auth_method {
        AuthMethod::ClientSecretBasic => AuthType::BasicAuth,
        AuthMethod::ClientSecretPost => AuthType::RequestBody,
    };
    let client = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(registered.client_id.clone()),
        Some(ClientSecret::new(registered.client_secret.clone())),
    )
    .set_redirect_uri(RedirectUrl::new(CALLBACK.to_string()).expect("redirect URL"))
    .set_auth_type(auth_type);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (authorize_url, csrf, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("profile".to_string()))
        .add_scope(Scope::new("email".to_string()))
        .set_pkce_challenge(challenge)
        .url();

    let callback = login_as_demo(authorize_url.as_str(), CALLBACK).await;
    assert_eq!(
        query_param(&callback, "state").as_deref(),
        Some(csrf.secret().as_str())
    );
    let code = query_param(&callback, "code").expect("code in the callback");
    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .expect("token endpoint known")
        .set_pkce_verifier(verifier)
        .request_async(&http())
        .await
        .expect("code exchange");
    LoggedIn {
        id_token: token.id_token().expect("an ID token").clone(),
        nonce,
    }
}

fn verifier_for<'a>(
    idp: &OidcProvider,
    metadata: &'a CoreProviderMetadata,
    client_id: &str,
) -> CoreIdTokenVerifier<'a> {
    CoreIdTokenVerifier::new_confidential_client(
        ClientId::new(client_id.to_string()),
        ClientSecret::new(idp.client(client_id).client_secret.clone()),
        metadata.issuer().clone(),
        metadata.jwks().clone(),
    )
}

async fn openidconnect_completes_the_flow(client_id: &str) {
    let idp = OidcProvider::start(CALLBACK).await;
    let metadata = discover(&idp).await;
    let logged_in = code_flow(&idp, metadata.clone(), client_id).await;
    let claims = logged_in
        .id_token
        .claims(&verifier_for(&idp, &metadata, client_id), &logged_in.nonce)
        .expect("ID token verifies");
    assert_eq!(claims.issuer().as_str(), idp.issuer());
    assert_eq!(claims.subject().as_str(), DEMO_SUB);
    assert_eq!(claims.email().map(|email| email.as_str()), Some(DEMO_EMAIL));
    assert_eq!(claims.email_verified(), Some(true));
    let name = claims
        .name()
        .and_then(|name| name.get(None))
        .map(|name| name.as_str().to_string());
    assert_eq!(name.as_deref(), Some("Demo User"));
    assert!(
        claims.updated_at().is_some(),
        "Auth0-style RFC 3339 updated_at accepted"
    );
}

#[tokio::test]
async fn discovery_has_auth0_paths_and_the_fixed_key() {
    let idp = OidcProvider::start(CALLBACK).await;
    let doc: Value = reqwest::get(idp.url(".well-known/openid-configuration"))
        .await
        .expect("discovery")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["issuer"], idp.issuer());
    assert!(idp.issuer().ends_with('/'));
    assert_eq!(doc["authorization_endpoint"], idp.url("authorize"));
    assert_eq!(doc["token_endpoint"], idp.url("oauth/token"));
    assert_eq!(doc["jwks_uri"], idp.url(".well-known/jwks.json"));
    assert_eq!(doc["userinfo_endpoint"], idp.url("userinfo"));
    assert_eq!(doc["end_session_endpoint"], idp.url("oidc/logout"));
    assert_eq!(
        doc["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );

    let jwks: Value = reqwest::get(idp.url(".well-known/jwks.json"))
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], idp.kid());
    assert_eq!(keys[0]["kty"], "RSA");
    assert!(
        keys[0].get("d").is_none(),
        "only the public key is published"
    );
}

#[tokio::test]
async fn openidconnect_with_client_secret_basic() {
    openidconnect_completes_the_flow("custodia-basic").await;
}

#[tokio::test]
async fn openidconnect_with_client_secret_post() {
    openidconnect_completes_the_flow("custodia-post").await;
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let idp = OidcProvider::start(CALLBACK).await;
    let (challenge, _verifier) = PkceCodeChallenge::new_random_sha256();
    let authorize = Url::parse_with_params(
        &idp.url("authorize"),
        [
            ("client_id", "custodia-basic"),
            ("redirect_uri", CALLBACK),
            ("response_type", "code"),
            ("scope", "openid"),
            ("state", "s"),
            ("nonce", "n"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    )
    .expect("authorize URL");
    match login(authorize.as_str(), CALLBACK, DEMO_USERNAME, "wrong").await {
        Err(LoginError::Refused { status, body }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(body.contains("Wrong username or password"));
        }
        other => panic!("expected the login to be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn pkce_is_required() {
    let idp = OidcProvider::start(CALLBACK).await;
    let authorize = Url::parse_with_params(
        &idp.url("authorize"),
        [
            ("client_id", "custodia-post"),
            ("redirect_uri", CALLBACK),
            ("response_type", "code"),
            ("scope", "openid"),
            ("state", "s"),
        ],
    )
    .expect("authorize URL");
    let callback = login_as_demo(authorize.as_str(), CALLBACK).await;
    assert_eq!(
        query_param(&callback, "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query_param(&callback, "code"), None);
}

/// Restarting with a new key is how tests simulate rotation at the IdP: metadata discovered
/// before it (the `openidconnect` crate never refreshes its JWKS) rejects the new tokens, fresh
/// discovery accepts them.
#[tokio::test]
async fn key_rotation_needs_a_fresh_jwks() {
    let mut idp = OidcProvider::start(CALLBACK).await;
    let old_kid = idp.kid().to_string();
    let stale = discover(&idp).await;

    let new_kid = idp.rotate_key().await;
    assert_ne!(new_kid, old_kid);
    let logged_in = code_flow(&idp, stale.clone(), "custodia-basic").await;
    assert!(
        logged_in
            .id_token
            .claims(
                &verifier_for(&idp, &stale, "custodia-basic"),
                &logged_in.nonce
            )
            .is_err(),
        "the stale JWKS cannot verify a token signed with the new key"
    );
    let fresh = discover(&idp).await;
    logged_in
        .id_token
        .claims(
            &verifier_for(&idp, &fresh, "custodia-basic"),
            &logged_in.nonce,
        )
        .expect("the refreshed JWKS verifies it");
}

/// Each client must use its registered token endpoint auth method (the harness is stricter than
/// the library here), so a proxy configured with the wrong one fails in tests.
#[tokio::test]
async fn clients_must_use_their_registered_auth_method() {
    let idp = OidcProvider::start(CALLBACK).await;
    let metadata = discover(&idp).await;
    for (client_id, wrong) in [
        ("custodia-basic", AuthType::RequestBody),
        ("custodia-post", AuthType::BasicAuth),
    ] {
        let registered = idp.client(client_id);
        let client = CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(registered.client_id.clone()),
            Some(ClientSecret::new(registered.client_secret.clone())),
        )
        .set_redirect_uri(RedirectUrl::new(CALLBACK.to_string()).expect("redirect URL"))
        .set_auth_type(wrong);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (authorize_url, _csrf, _nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge)
            .url();
        let callback = login_as_demo(authorize_url.as_str(), CALLBACK).await;
        let code = query_param(&callback, "code").expect("code");
        let result = client
            .exchange_code(AuthorizationCode::new(code))
            .expect("token endpoint known")
            .set_pkce_verifier(verifier)
            .request_async(&http())
            .await;
        let error = format!("{:?}", result.expect_err("wrong auth method refused"));
        assert!(error.contains("invalid_client"), "{client_id}: {error}");
    }
}
