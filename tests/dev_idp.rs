//! End-to-end tests of the development OIDC provider (`custodia::dev_idp`) over a real loopback
//! socket: scripted with reqwest, then driven by the `openidconnect` crate the proxy uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use custodia::dev_idp::{self, DemoUser, DevIdpError, DevIdpSettings};
use reqwest::redirect::Policy;
use reqwest::{StatusCode, Url};
use rsa::{BigUint, Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CLIENT_ID: &str = "custodia-local";
/// Characters that must be form-urlencoded inside HTTP Basic credentials (RFC 6749 §2.3.1).
const CLIENT_SECRET: &str = "s3cret: +&/%";
const CALLBACK: &str = "http://127.0.0.1:8080/callback";
const AFTER_LOGOUT: &str = "http://127.0.0.1:8080/";

/// One key shared by the tests that do not care which key signs (RSA keygen is the slow part).
fn shared_key() -> RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| dev_idp::generate_signing_key().expect("keygen"))
        .clone()
}

fn settings(issuer: &str) -> DevIdpSettings {
    DevIdpSettings {
        issuer: issuer.to_owned(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_uris: vec![CALLBACK.into()],
        post_logout_redirect_uris: vec![AFTER_LOGOUT.into()],
        user: DemoUser::default(),
        signing_key: Some(shared_key()),
    }
}

/// A provider serving on a fresh loopback port; stops (and checks it stopped cleanly) on drop.
struct Idp {
    issuer: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), DevIdpError>>>,
}

impl Idp {
    async fn start() -> Self {
        Self::start_with(|settings| settings).await
    }

    async fn start_with(adjust: impl FnOnce(DevIdpSettings) -> DevIdpSettings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let settings = adjust(settings(&issuer));
        let task = tokio::spawn(dev_idp::serve(listener, settings, async {
            let _ = stopped.await;
        }));
        Self {
            issuer,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    /// Stops the server and waits for `serve` to return.
    async fn shutdown(mut self) -> Result<(), DevIdpError> {
        let _ = self.stop.take().map(|stop| stop.send(()));
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
    }
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .cookie_store(true)
        .build()
        .unwrap()
}

fn random_b64(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    getrandom::getrandom(&mut bytes).unwrap();
    URL_SAFE_NO_PAD.encode(bytes)
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce() -> Pkce {
    let verifier = random_b64(32);
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

fn authorize_url(idp: &Idp, pkce: &Pkce, state: &str, nonce: &str) -> Url {
    Url::parse_with_params(
        &idp.url("/authorize"),
        [
            ("client_id", CLIENT_ID),
            ("redirect_uri", CALLBACK),
            ("response_type", "code"),
            ("scope", "openid profile email"),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", &pkce.challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .unwrap()
}

/// The value of attribute `attr` in the first tag of `html` that contains `marker`.
fn attribute(html: &str, marker: &str, attr: &str) -> String {
    let at = html
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in {html}"));
    let tag_start = html[..at].rfind('<').unwrap();
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>').unwrap()];
    let needle = format!("{attr}=\"");
    let value_start = tag.find(&needle).unwrap() + needle.len();
    let value = &tag[value_start..value_start + tag[value_start..].find('"').unwrap()];
    value.replace("&amp;", "&").replace("&quot;", "\"")
}

fn query_param(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn location(response: &reqwest::Response) -> String {
    assert_eq!(response.status(), StatusCode::FOUND, "expected a redirect");
    response.headers()["location"].to_str().unwrap().to_owned()
}

/// GET /authorize, read the form, POST the credentials; returns the login POST's response.
async fn submit_login(browser: &reqwest::Client, url: Url, password: &str) -> reqwest::Response {
    let page = browser.get(url).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("Development identity provider — not for production"));
    assert!(html.contains("<code>demo</code>") && html.contains("<code>custodia-demo</code>"));
    let action = attribute(&html, "method=\"post\"", "action");
    let request_id = attribute(&html, "name=\"request_id\"", "value");
    browser
        .post(action)
        .form(&[
            ("request_id", request_id.as_str()),
            ("username", "demo"),
            ("password", password),
            ("action", "login"),
        ])
        .send()
        .await
        .unwrap()
}

/// Logs in as the demo user and returns the code from the callback (checking `state`).
async fn login(idp: &Idp, pkce: &Pkce, nonce: &str) -> String {
    let response = submit_login(
        &browser(),
        authorize_url(idp, pkce, "st-1", nonce),
        "custodia-demo",
    )
    .await;
    let callback = location(&response);
    assert!(callback.starts_with(CALLBACK), "{callback}");
    assert_eq!(query_param(&callback, "state").as_deref(), Some("st-1"));
    query_param(&callback, "code").expect("code in callback")
}

#[derive(Clone, Copy)]
enum ClientAuth {
    Basic,
    Post,
}

async fn exchange(idp: &Idp, code: &str, verifier: &str, auth: ClientAuth) -> reqwest::Response {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", CALLBACK),
        ("code_verifier", verifier),
    ];
    let request = reqwest::Client::new().post(idp.url("/oauth/token"));
    let request = match auth {
        ClientAuth::Basic => {
            let encode = |value: &str| url_encode(value);
            request.basic_auth(encode(CLIENT_ID), Some(encode(CLIENT_SECRET)))
        }
        ClientAuth::Post => {
            form.push(("client_id", CLIENT_ID));
            form.push(("client_secret", CLIENT_SECRET));
            request
        }
    };
    request.form(&form).send().await.unwrap()
}

/// application/x-www-form-urlencoded encoding of one value.
fn url_encode(value: &str) -> String {
    Url::parse_with_params("http://x/", [("v", value)])
        .unwrap()
        .query()
        .unwrap()
        .trim_start_matches("v=")
        .to_owned()
}

async fn oauth_error(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert!(body["error_description"].is_string());
    (status, body["error"].as_str().unwrap().to_owned())
}

/// Verifies the RS256 signature against the provider's JWKS and returns the claims.
async fn verify_id_token(idp: &Idp, id_token: &str) -> Value {
    let parts: Vec<&str> = id_token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    let kid = header["kid"].as_str().expect("kid in header");

    let jwks: Value = reqwest::get(idp.url("/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["kid"] == kid)
        .expect("the token's kid is in the JWKS");
    assert_eq!(
        (
            jwk["kty"].as_str(),
            jwk["use"].as_str(),
            jwk["alg"].as_str()
        ),
        (Some("RSA"), Some("sig"), Some("RS256"))
    );
    let component = |name: &str| {
        BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap())
    };
    let public = RsaPublicKey::new(component("n"), component("e")).unwrap();
    assert_eq!(dev_idp::key_id(&public), kid);

    let digest = Sha256::digest(format!("{}.{}", parts[0], parts[1]).as_bytes());
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    public
        .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &signature)
        .expect("ID token signature verifies against the JWKS");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn discovery_document_describes_the_endpoints() {
    let idp = Idp::start().await;
    let response = reqwest::get(idp.url("/.well-known/openid-configuration"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["issuer"], idp.issuer);
    assert_eq!(doc["authorization_endpoint"], idp.url("/authorize"));
    assert_eq!(doc["token_endpoint"], idp.url("/oauth/token"));
    assert_eq!(doc["jwks_uri"], idp.url("/.well-known/jwks.json"));
    assert_eq!(doc["userinfo_endpoint"], idp.url("/userinfo"));
    assert_eq!(doc["end_session_endpoint"], idp.url("/oidc/logout"));
    assert_eq!(doc["response_types_supported"], serde_json::json!(["code"]));
    assert_eq!(
        doc["subject_types_supported"],
        serde_json::json!(["public"])
    );
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256"])
    );
    assert_eq!(
        doc["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
    assert_eq!(
        doc["token_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post"])
    );
    for claim in ["sub", "email", "name", "picture", "updated_at", "nonce"] {
        assert!(
            doc["claims_supported"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == claim),
            "{claim}"
        );
    }
    assert!(doc["scopes_supported"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "openid"));
    idp.shutdown().await.unwrap();
}

async fn full_code_flow(auth: ClientAuth) {
    let idp = Idp::start().await;
    let pkce = pkce();
    let nonce = random_b64(16);
    let code = login(&idp, &pkce, &nonce).await;
    assert_eq!(URL_SAFE_NO_PAD.decode(&code).unwrap().len(), 32);

    let response = exchange(&idp, &code, &pkce.verifier, auth).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let token: Value = response.json().await.unwrap();
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["scope"], "openid profile email");
    assert!(token["expires_in"].as_u64().unwrap() > 0);

    let claims = verify_id_token(&idp, token["id_token"].as_str().unwrap()).await;
    let now = unix_now();
    assert_eq!(claims["iss"], idp.issuer);
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["nonce"], nonce);
    assert_eq!(claims["sub"], DemoUser::default().sub);
    assert_eq!(claims["email"], "demo@example.test");
    assert_eq!(claims["email_verified"], true);
    assert_eq!(claims["name"], "Demo User");
    assert!(claims["picture"]
        .as_str()
        .unwrap()
        .starts_with("data:image/svg+xml,"));
    let updated_at = claims["updated_at"]
        .as_str()
        .expect("updated_at is an RFC 3339 string");
    humantime::parse_rfc3339(updated_at).unwrap();
    let (iat, exp, auth_time) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
        claims["auth_time"].as_u64().unwrap(),
    );
    assert!(iat.abs_diff(now) < 60 && auth_time <= iat + 1);
    assert_eq!(exp, iat + 3600);

    let userinfo: Value = reqwest::Client::new()
        .get(idp.url("/userinfo"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(userinfo["sub"], claims["sub"]);
    assert_eq!(userinfo["email"], "demo@example.test");
    idp.shutdown().await.unwrap();
}

#[tokio::test]
async fn code_flow_with_client_secret_basic() {
    full_code_flow(ClientAuth::Basic).await;
}

#[tokio::test]
async fn code_flow_with_client_secret_post() {
    full_code_flow(ClientAuth::Post).await;
}

#[tokio::test]
async fn wrong_password_shows_the_form_again() {
    let idp = Idp::start().await;
    let browser = browser();
    let response = submit_login(&browser, authorize_url(&idp, &pkce(), "s", "n"), "wrong").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().get("location").is_none());
    let html = response.text().await.unwrap();
    assert!(html.contains("Wrong username or password."));
    assert!(
        html.contains("name=\"request_id\""),
        "the form is shown again"
    );
}

#[tokio::test]
async fn cancel_redirects_with_access_denied() {
    let idp = Idp::start().await;
    let browser = browser();
    let html = browser
        .get(authorize_url(&idp, &pkce(), "st-c", "n"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let request_id = attribute(&html, "name=\"request_id\"", "value");
    let response = browser
        .post(idp.url("/authorize"))
        .form(&[("request_id", request_id.as_str()), ("action", "cancel")])
        .send()
        .await
        .unwrap();
    let callback = location(&response);
    assert_eq!(
        query_param(&callback, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(query_param(&callback, "state").as_deref(), Some("st-c"));
}

#[tokio::test]
async fn pkce_mismatch_is_invalid_grant() {
    let idp = Idp::start().await;
    let pkce = pkce();
    let code = login(&idp, &pkce, "n").await;
    let other = self::pkce();
    let (status, error) =
        oauth_error(exchange(&idp, &code, &other.verifier, ClientAuth::Basic).await).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_grant")
    );
}

#[tokio::test]
async fn code_replay_is_invalid_grant() {
    let idp = Idp::start().await;
    let pkce = pkce();
    let code = login(&idp, &pkce, "n").await;
    assert_eq!(
        exchange(&idp, &code, &pkce.verifier, ClientAuth::Post)
            .await
            .status(),
        StatusCode::OK
    );
    let (status, error) =
        oauth_error(exchange(&idp, &code, &pkce.verifier, ClientAuth::Post).await).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_grant")
    );
}

#[tokio::test]
async fn wrong_client_secret_is_invalid_client() {
    let idp = Idp::start().await;
    let response = reqwest::Client::new()
        .post(idp.url("/oauth/token"))
        .basic_auth(CLIENT_ID, Some("nope"))
        .form(&[("grant_type", "authorization_code"), ("code", "x")])
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("www-authenticate"));
    let (status, error) = oauth_error(response).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_client")
    );
}

#[tokio::test]
async fn missing_or_plain_pkce_is_refused() {
    let idp = Idp::start().await;
    let pkce = pkce();
    let mut without = authorize_url(&idp, &pkce, "st-p", "n");
    let kept: Vec<(String, String)> = without
        .query_pairs()
        .filter(|(key, _)| !key.starts_with("code_challenge"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    without.query_pairs_mut().clear().extend_pairs(kept);

    let mut plain = authorize_url(&idp, &pkce, "st-p", "n");
    let kept: Vec<(String, String)> = plain
        .query_pairs()
        .map(|(k, v)| {
            if k == "code_challenge_method" {
                (k.into_owned(), "plain".to_owned())
            } else {
                (k.into_owned(), v.into_owned())
            }
        })
        .collect();
    plain.query_pairs_mut().clear().extend_pairs(kept);

    for url in [without, plain] {
        let response = browser().get(url.clone()).send().await.unwrap();
        let callback = location(&response);
        assert!(callback.starts_with(CALLBACK), "{callback}");
        assert_eq!(
            query_param(&callback, "error").as_deref(),
            Some("invalid_request"),
            "{url}"
        );
        assert_eq!(query_param(&callback, "state").as_deref(), Some("st-p"));
        assert_eq!(query_param(&callback, "code"), None);
    }
}

#[tokio::test]
async fn unregistered_redirect_uri_is_400_without_redirect() {
    let idp = Idp::start().await;
    let mut url = authorize_url(&idp, &pkce(), "s", "n");
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            if k == "redirect_uri" {
                (k.into_owned(), "https://attacker.example/cb".to_owned())
            } else {
                (k.into_owned(), v.into_owned())
            }
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(kept);
    let response = browser().get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.headers().get("location").is_none());
    let html = response.text().await.unwrap();
    assert!(!html.contains("attacker.example"));
    assert!(html.contains("not registered"));
}

#[tokio::test]
async fn logout_returns_to_registered_uris_only() {
    let idp = Idp::start().await;
    let registered = Url::parse_with_params(
        &idp.url("/oidc/logout"),
        [
            ("post_logout_redirect_uri", AFTER_LOGOUT),
            ("state", "bye"),
            ("id_token_hint", "x.y.z"),
        ],
    )
    .unwrap();
    let response = browser().get(registered).send().await.unwrap();
    assert_eq!(location(&response), format!("{AFTER_LOGOUT}?state=bye"));

    let other = Url::parse_with_params(
        &idp.url("/oidc/logout"),
        [("post_logout_redirect_uri", "https://elsewhere.example/")],
    )
    .unwrap();
    let response = browser().get(other).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("You are signed out"));
}

#[tokio::test]
async fn non_loopback_listener_is_refused() {
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let result = dev_idp::serve(listener, settings("http://127.0.0.1"), async {}).await;
    match result {
        Err(DevIdpError::NotLoopback { addr }) => {
            assert_eq!(addr, SocketAddr::from(([0, 0, 0, 0], port)))
        }
        other => panic!("expected NotLoopback, got {other:?}"),
    }
}

#[tokio::test]
async fn generates_a_key_when_none_is_given_and_kid_follows_the_key() {
    let first = Idp::start_with(|settings| DevIdpSettings {
        signing_key: None,
        ..settings
    })
    .await;
    let second = Idp::start_with(|settings| DevIdpSettings {
        signing_key: None,
        ..settings
    })
    .await;
    let kid = |idp: &Idp| {
        let url = idp.url("/.well-known/jwks.json");
        async move {
            let jwks: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            jwks["keys"][0]["kid"].as_str().unwrap().to_owned()
        }
    };
    assert_ne!(kid(&first).await, kid(&second).await);
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// The proxy's OIDC library completes discovery, the code flow and ID token verification.
async fn openidconnect_flow(auth_type: openidconnect::AuthType, issuer_suffix: &str) {
    use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
    use openidconnect::{
        AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
        RedirectUrl, Scope, TokenResponse,
    };

    let idp = Idp::start_with(|settings| DevIdpSettings {
        issuer: format!("{}{issuer_suffix}", settings.issuer),
        ..settings
    })
    .await;
    let issuer = format!("{}{issuer_suffix}", idp.issuer);
    let http = openidconnect::reqwest::Client::builder()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let metadata =
        CoreProviderMetadata::discover_async(IssuerUrl::new(issuer.clone()).unwrap(), &http)
            .await
            .expect("discovery");
    let client = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(CLIENT_ID.into()),
        Some(ClientSecret::new(CLIENT_SECRET.into())),
    )
    .set_redirect_uri(RedirectUrl::new(CALLBACK.into()).unwrap())
    .set_auth_type(auth_type);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("profile".into()))
        .add_scope(Scope::new("email".into()))
        .set_pkce_challenge(challenge)
        .url();

    let callback = location(&submit_login(&browser(), url, "custodia-demo").await);
    assert_eq!(
        query_param(&callback, "state").as_deref(),
        Some(csrf.secret().as_str())
    );
    let code = query_param(&callback, "code").unwrap();
    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .expect("code exchange");
    let id_token = token.id_token().expect("an ID token");
    let claims = id_token
        .claims(&client.id_token_verifier(), &nonce)
        .expect("ID token verifies");
    assert_eq!(claims.issuer().as_str(), issuer);
    assert_eq!(claims.subject().as_str(), DemoUser::default().sub);
    assert_eq!(
        claims.email().map(|email| email.as_str()),
        Some("demo@example.test")
    );
    assert_eq!(claims.email_verified(), Some(true));
    assert!(
        claims.updated_at().is_some(),
        "RFC 3339 updated_at accepted"
    );
    let name = claims
        .name()
        .and_then(|name| name.get(None))
        .map(|name| name.as_str().to_owned());
    assert_eq!(name.as_deref(), Some("Demo User"));
    idp.shutdown().await.unwrap();
}

#[tokio::test]
async fn openidconnect_crate_with_client_secret_basic() {
    openidconnect_flow(openidconnect::AuthType::BasicAuth, "").await;
}

#[tokio::test]
async fn openidconnect_crate_with_client_secret_post_and_auth0_style_issuer() {
    // Auth0's issuer ends with a slash; the provider keeps it verbatim in `iss`.
    openidconnect_flow(openidconnect::AuthType::RequestBody, "/").await;
}
