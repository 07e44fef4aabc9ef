//! The OIDC endpoints — discovery, authorize (login form), token, JWKS, userinfo, logout — as plain
//! functions from a buffered request to a response, so they are tested without a socket.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::form::{self, Params};
use super::keys::SigningKey;
use super::pages::{self, LoginForm};
use super::store::ExpiringMap;
use super::DemoUser;

/// How long a login form stays valid between `GET /authorize` and its submission.
pub(crate) const PENDING_TTL: Duration = Duration::from_secs(10 * 60);
/// Authorization codes are short-lived and single-use (RFC 6749 §4.1.2 recommends ≤ 10 min).
pub(crate) const CODE_TTL: Duration = Duration::from_secs(60);
/// Lifetime of access tokens and ID tokens.
pub(crate) const TOKEN_TTL: Duration = Duration::from_secs(60 * 60);
/// Most entries kept per kind of state; the oldest are dropped beyond it, so no client can make
/// the provider's memory grow without bound.
pub(crate) const STATE_CAPACITY: usize = 10_000;
/// Wrong passwords allowed per login form before the request is refused with `access_denied`.
const MAX_FAILED_LOGINS: u8 = 5;
/// Scopes this provider understands; others in a request are ignored, as Auth0 does.
const SUPPORTED_SCOPES: [&str; 3] = ["openid", "profile", "email"];
/// Realm in `WWW-Authenticate` challenges.
const REALM: &str = "dev-idp";

/// The response type of every endpoint.
pub(crate) type HttpResponse = Response<Full<Bytes>>;

/// The registered client and the demo user: validated settings, minus the key.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub user: DemoUser,
}

/// The current time, as the monotonic clock (expiry) and as Unix seconds (token claims).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub instant: Instant,
    pub unix: u64,
}

impl Now {
    pub(crate) fn current() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        Self {
            instant: Instant::now(),
            unix,
        }
    }

    /// The same moment `by` later.
    #[cfg(test)]
    pub(crate) fn later(self, by: Duration) -> Self {
        Self {
            instant: self.instant + by,
            unix: self.unix + by.as_secs(),
        }
    }
}

/// A validated authorization request waiting for the login form.
#[derive(Debug, Clone)]
struct PendingAuthorization {
    client_id: String,
    redirect_uri: String,
    state: String,
    nonce: String,
    code_challenge: String,
    scope: String,
    failed_logins: u8,
}

/// An issued authorization code and what it is bound to.
#[derive(Debug)]
struct IssuedCode {
    client_id: String,
    redirect_uri: String,
    nonce: String,
    code_challenge: String,
    scope: String,
    auth_time: u64,
    /// Set by the first redemption attempt; a replay then fails and revokes `access_token`.
    redeemed: bool,
    access_token: Option<String>,
}

/// What an access token grants at `/userinfo`.
#[derive(Debug)]
struct AccessGrant {
    scope: String,
}

#[derive(Debug)]
struct State {
    pending: ExpiringMap<PendingAuthorization>,
    codes: ExpiringMap<IssuedCode>,
    tokens: ExpiringMap<AccessGrant>,
}

/// Why an authorization request was refused.
#[derive(Debug, PartialEq, Eq)]
enum AuthorizeError {
    /// The client or redirect URI cannot be trusted: answer with a page, never redirect.
    Page(&'static str),
    /// Report `error` to the (registered) redirect URI.
    Redirect {
        redirect_uri: String,
        state: Option<String>,
        error: &'static str,
        description: &'static str,
    },
}

/// Why the token endpoint did not accept the client's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuthError {
    /// Unknown client, wrong secret or unreadable credentials: `401 invalid_client`.
    Failed(&'static str),
    /// Contradictory authentication parameters: `400 invalid_request`.
    Malformed(&'static str),
}

impl ClientAuthError {
    fn response(self) -> HttpResponse {
        match self {
            Self::Failed(description) => invalid_client(description),
            Self::Malformed(description) => {
                oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
            }
        }
    }
}

/// The provider: configuration, signing key and in-memory state.
pub(crate) struct DevIdp {
    config: Config,
    key: SigningKey,
    /// Path part of the issuer without trailing slash (`""` for an issuer at the root).
    base_path: String,
    /// The issuer without trailing slash, to which endpoint paths are appended.
    base_url: String,
    /// The user's `updated_at` claim, an RFC 3339 string as Auth0 sends it.
    updated_at: String,
    state: Mutex<State>,
}

impl DevIdp {
    pub(crate) fn new(config: Config, key: SigningKey) -> Self {
        let base_url = config.issuer.trim_end_matches('/').to_owned();
        let base_path = issuer_path(&base_url).to_owned();
        Self {
            config,
            key,
            base_path,
            base_url,
            updated_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            state: Mutex::new(State {
                pending: ExpiringMap::new(PENDING_TTL, STATE_CAPACITY),
                codes: ExpiringMap::new(CODE_TTL, STATE_CAPACITY),
                tokens: ExpiringMap::new(TOKEN_TTL, STATE_CAPACITY),
            }),
        }
    }

    /// Answers one request at the current time.
    pub(crate) fn handle(&self, request: Request<Bytes>) -> HttpResponse {
        self.handle_at(request, Now::current())
    }

    /// Answers one request as if at `now`.
    pub(crate) fn handle_at(&self, request: Request<Bytes>, now: Now) -> HttpResponse {
        let (parts, body) = request.into_parts();
        let mut response = self.route(&parts.method, &parts.uri, &parts.headers, &body, now);
        response.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        response
    }

    fn route(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: Now,
    ) -> HttpResponse {
        let Some(path) = uri.path().strip_prefix(self.base_path.as_str()) else {
            return not_found();
        };
        let query = uri.query().unwrap_or("");
        match (path, method) {
            ("" | "/", &Method::GET) => html(
                StatusCode::OK,
                pages::index_page(
                    &self.config.issuer,
                    &self.url("/.well-known/openid-configuration"),
                ),
            ),
            ("/.well-known/openid-configuration", &Method::GET) => {
                json_response(StatusCode::OK, &self.discovery(), Caching::Public)
            }
            ("/.well-known/jwks.json", &Method::GET) => {
                json_response(StatusCode::OK, &self.key.jwks(), Caching::Public)
            }
            ("/authorize", &Method::GET) => self.authorize(query, now),
            ("/authorize", &Method::POST) => self.login(body, now),
            ("/oauth/token", &Method::POST) => self.token(headers, body, now),
            ("/userinfo", &Method::GET | &Method::POST) => self.userinfo(headers, now),
            ("/oidc/logout", &Method::GET) => self.logout(query.as_bytes()),
            ("/oidc/logout", &Method::POST) => self.logout(body),
            ("" | "/" | "/.well-known/openid-configuration" | "/.well-known/jwks.json", _) => {
                method_not_allowed("GET")
            }
            ("/authorize" | "/userinfo", _) => method_not_allowed("GET, POST"),
            ("/oauth/token", _) => method_not_allowed("POST"),
            ("/oidc/logout", _) => method_not_allowed("GET, POST"),
            _ => not_found(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one map call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `GET /.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §3).
    fn discovery(&self) -> Value {
        json!({
            "issuer": self.config.issuer,
            "authorization_endpoint": self.url("/authorize"),
            "token_endpoint": self.url("/oauth/token"),
            "jwks_uri": self.url("/.well-known/jwks.json"),
            "userinfo_endpoint": self.url("/userinfo"),
            "end_session_endpoint": self.url("/oidc/logout"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": SUPPORTED_SCOPES,
            "claims_supported": [
                "sub", "iss", "aud", "exp", "iat", "auth_time", "nonce",
                "name", "nickname", "picture", "updated_at", "email", "email_verified"
            ],
            "claims_parameter_supported": false,
            "request_parameter_supported": false,
            "request_uri_parameter_supported": false,
        })
    }

    /// Checks an authorization request (RFC 6749 §4.1.1, RFC 7636 §4.3, OIDC Core §3.1.2.1).
    fn validate_authorization(
        &self,
        params: &Params,
    ) -> Result<PendingAuthorization, AuthorizeError> {
        let Some(client_id) = params.get("client_id") else {
            return Err(AuthorizeError::Page("The request has no client_id."));
        };
        if client_id != self.config.client_id {
            return Err(AuthorizeError::Page(
                "The client_id is not registered with this provider.",
            ));
        }
        let Some(redirect_uri) = params.get("redirect_uri") else {
            return Err(AuthorizeError::Page("The request has no redirect_uri."));
        };
        if !self
            .config
            .redirect_uris
            .iter()
            .any(|uri| uri == redirect_uri)
        {
            return Err(AuthorizeError::Page(
                "The redirect_uri is not registered for this client.",
            ));
        }
        let state = params.get("state");
        let refuse = |error, description| AuthorizeError::Redirect {
            redirect_uri: redirect_uri.to_owned(),
            state: state.map(str::to_owned),
            error,
            description,
        };
        if params.get("request").is_some() {
            return Err(refuse(
                "request_not_supported",
                "request objects are not supported",
            ));
        }
        if params.get("request_uri").is_some() {
            return Err(refuse(
                "request_uri_not_supported",
                "request_uri is not supported",
            ));
        }
        match params.get("response_type") {
            None => return Err(refuse("invalid_request", "response_type is required")),
            Some("code") => {}
            Some(_) => {
                return Err(refuse(
                    "unsupported_response_type",
                    "only response_type=code is supported",
                ))
            }
        }
        if params
            .get("response_mode")
            .is_some_and(|mode| mode != "query")
        {
            return Err(refuse(
                "invalid_request",
                "only response_mode=query is supported",
            ));
        }
        let requested = params.get("scope").unwrap_or("");
        if !has_scope(requested, "openid") {
            return Err(refuse("invalid_scope", "scope must include openid"));
        }
        let Some(state) = state else {
            return Err(refuse("invalid_request", "state is required"));
        };
        let Some(nonce) = params.get("nonce") else {
            return Err(refuse("invalid_request", "nonce is required"));
        };
        // Each pending sign-in is kept for minutes: its size, not only their number, is bounded.
        if state.len() > MAX_STATE_LEN || nonce.len() > MAX_STATE_LEN {
            return Err(refuse(
                "invalid_request",
                "state and nonce must be at most 512 characters",
            ));
        }
        let Some(code_challenge) = params.get("code_challenge") else {
            return Err(refuse(
                "invalid_request",
                "code_challenge is required (PKCE with S256)",
            ));
        };
        if params.get("code_challenge_method") != Some("S256") {
            return Err(refuse(
                "invalid_request",
                "code_challenge_method must be S256",
            ));
        }
        if !is_s256_challenge(code_challenge) {
            return Err(refuse(
                "invalid_request",
                "code_challenge is not a base64url SHA-256 digest",
            ));
        }
        if params
            .get("prompt")
            .is_some_and(|prompt| prompt.split(' ').any(|value| value == "none"))
        {
            return Err(refuse(
                "login_required",
                "this provider keeps no session; prompt=none cannot succeed",
            ));
        }
        let scope = SUPPORTED_SCOPES
            .iter()
            .copied()
            .filter(|wanted| has_scope(requested, wanted))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(PendingAuthorization {
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            state: state.to_owned(),
            nonce: nonce.to_owned(),
            code_challenge: code_challenge.to_owned(),
            scope,
            failed_logins: 0,
        })
    }

    /// `GET /authorize`: validate, remember the request server-side, show the login form.
    fn authorize(&self, query: &str, now: Now) -> HttpResponse {
        let params = match Params::parse(query) {
            Ok(params) => params,
            Err(error) => {
                return error_html(
                    StatusCode::BAD_REQUEST,
                    "Invalid request",
                    &error.to_string(),
                )
            }
        };
        let pending = match self.validate_authorization(&params) {
            Ok(pending) => pending,
            Err(AuthorizeError::Page(message)) => {
                return error_html(
                    StatusCode::BAD_REQUEST,
                    "Invalid authorization request",
                    message,
                )
            }
            Err(AuthorizeError::Redirect {
                redirect_uri,
                state,
                error,
                description,
            }) => return redirect_with_error(&redirect_uri, error, description, state.as_deref()),
        };
        let Some(request_id) = random_token() else {
            return internal_error();
        };
        let page = self.login_form(&request_id, "", None);
        self.lock().pending.insert(request_id, pending, now.instant);
        html(StatusCode::OK, page)
    }

    fn login_form(&self, request_id: &str, username: &str, error: Option<&str>) -> String {
        pages::login_page(&LoginForm {
            action: &self.url("/authorize"),
            request_id,
            client_id: &self.config.client_id,
            demo_username: &self.config.user.username,
            demo_password: &self.config.user.password,
            username,
            error,
        })
    }

    /// `POST /authorize`: the login form's submission (sign in or cancel).
    fn login(&self, body: &[u8], now: Now) -> HttpResponse {
        let params = match Params::parse_bytes(body) {
            Ok(params) => params,
            Err(error) => {
                return error_html(StatusCode::BAD_REQUEST, "Invalid form", &error.to_string())
            }
        };
        let Some(request_id) = params.get("request_id") else {
            return error_html(
                StatusCode::BAD_REQUEST,
                "Invalid form",
                "The form has no request_id.",
            );
        };
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(pending) = state.pending.get_mut(request_id, now.instant) else {
            return error_html(
                StatusCode::BAD_REQUEST,
                "Sign-in request expired",
                "This sign-in request is unknown or has expired. Start again from the application.",
            );
        };
        if params.get("action") == Some("cancel") {
            let (redirect_uri, client_state) =
                (pending.redirect_uri.clone(), pending.state.clone());
            state.pending.remove(request_id, now.instant);
            return redirect_with_error(
                &redirect_uri,
                "access_denied",
                "the user cancelled the sign-in",
                Some(&client_state),
            );
        }
        let username = params.get("username").unwrap_or("");
        let password = params.get("password").unwrap_or("");
        let user = &self.config.user;
        let valid = constant_time_eq(username.as_bytes(), user.username.as_bytes())
            & constant_time_eq(password.as_bytes(), user.password.as_bytes());
        if !valid {
            pending.failed_logins = pending.failed_logins.saturating_add(1);
            if pending.failed_logins >= MAX_FAILED_LOGINS {
                let (redirect_uri, client_state) =
                    (pending.redirect_uri.clone(), pending.state.clone());
                state.pending.remove(request_id, now.instant);
                return redirect_with_error(
                    &redirect_uri,
                    "access_denied",
                    "too many failed sign-in attempts",
                    Some(&client_state),
                );
            }
            drop(guard);
            let page = self.login_form(request_id, username, Some("Wrong username or password."));
            return html(StatusCode::UNAUTHORIZED, page);
        }
        let Some(pending) = state.pending.remove(request_id, now.instant) else {
            return internal_error();
        };
        let Some(code) = random_token() else {
            return internal_error();
        };
        let location = form::with_query(
            &pending.redirect_uri,
            &[("code", &code), ("state", &pending.state)],
        );
        state.codes.insert(
            code,
            IssuedCode {
                client_id: pending.client_id,
                redirect_uri: pending.redirect_uri,
                nonce: pending.nonce,
                code_challenge: pending.code_challenge,
                scope: pending.scope,
                auth_time: now.unix,
                redeemed: false,
                access_token: None,
            },
            now.instant,
        );
        redirect(&location)
    }

    /// Client authentication at the token endpoint (RFC 6749 §2.3.1): HTTP Basic with
    /// form-urlencoded id and secret, or both in the body.
    fn authenticate_client(
        &self,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<(), ClientAuthError> {
        use ClientAuthError::{Failed, Malformed};
        let authorization = headers.get(header::AUTHORIZATION);
        let (client_id, secret) = match (authorization, params.get("client_secret")) {
            (Some(_), Some(_)) => {
                return Err(Malformed("use exactly one client authentication method"))
            }
            (Some(value), None) => {
                let Some((id, secret)) = parse_basic(value) else {
                    return Err(Failed("malformed HTTP Basic client credentials"));
                };
                if params.get("client_id").is_some_and(|body_id| body_id != id) {
                    return Err(Malformed(
                        "client_id does not match the Authorization header",
                    ));
                }
                (id, secret)
            }
            (None, Some(secret)) => {
                let Some(id) = params.get("client_id") else {
                    return Err(Failed("client_id is required with client_secret"));
                };
                (id.to_owned(), secret.to_owned())
            }
            (None, None) => return Err(Failed("client authentication is required")),
        };
        let known = constant_time_eq(client_id.as_bytes(), self.config.client_id.as_bytes())
            & constant_time_eq(secret.as_bytes(), self.config.client_secret.as_bytes());
        if known {
            Ok(())
        } else {
            Err(Failed("client authentication failed"))
        }
    }

    /// `POST /oauth/token`: the authorization code grant (RFC 6749 §4.1.3, RFC 7636 §4.6).
    fn token(&self, headers: &HeaderMap, body: &[u8], now: Now) -> HttpResponse {
        let params = match Params::parse_bytes(body) {
            Ok(params) => params,
            Err(error) => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &error.to_string(),
                )
            }
        };
        if let Err(error) = self.authenticate_client(headers, &params) {
            return error.response();
        }
        match params.get("grant_type") {
            None => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "grant_type is required",
                )
            }
            Some("authorization_code") => {}
            Some(_) => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "only authorization_code is supported",
                )
            }
        }
        let Some(code) = params.get("code") else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "code is required",
            );
        };
        let Some(redirect_uri) = params.get("redirect_uri") else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "redirect_uri is required",
            );
        };
        let Some(access_token) = random_token() else {
            return internal_error();
        };

        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(issued) = state.codes.get_mut(code, now.instant) else {
            return invalid_grant("the code is unknown or expired");
        };
        if issued.redeemed {
            // RFC 6749 §4.1.2: a replayed code revokes what it was exchanged for.
            if let Some(revoked) = issued.access_token.take() {
                state.tokens.remove(&revoked, now.instant);
            }
            return invalid_grant("the code has already been used");
        }
        // Any redemption attempt uses the code up, so a wrong code_verifier cannot be retried.
        issued.redeemed = true;
        if issued.client_id != self.config.client_id {
            return invalid_grant("the code was issued to another client");
        }
        if issued.redirect_uri != redirect_uri {
            return invalid_grant("redirect_uri does not match the authorization request");
        }
        let verifier = params.get("code_verifier").unwrap_or("");
        if !is_code_verifier(verifier) {
            return invalid_grant("code_verifier is missing or malformed");
        }
        let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        if !constant_time_eq(computed.as_bytes(), issued.code_challenge.as_bytes()) {
            return invalid_grant("code_verifier does not match the code_challenge");
        }
        issued.access_token = Some(access_token.clone());
        let scope = issued.scope.clone();
        let mut claims = self.user_claims(&scope);
        claims.insert("iss".into(), json!(self.config.issuer));
        claims.insert("aud".into(), json!(issued.client_id));
        claims.insert("iat".into(), json!(now.unix));
        claims.insert("exp".into(), json!(now.unix + TOKEN_TTL.as_secs()));
        claims.insert("auth_time".into(), json!(issued.auth_time));
        claims.insert("nonce".into(), json!(issued.nonce));
        state.tokens.insert(
            access_token.clone(),
            AccessGrant {
                scope: scope.clone(),
            },
            now.instant,
        );
        drop(guard);

        let Ok(id_token) = self.key.sign_jwt(&Value::Object(claims)) else {
            return internal_error();
        };
        json_response(
            StatusCode::OK,
            &json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": TOKEN_TTL.as_secs(),
                "id_token": id_token,
                "scope": scope,
            }),
            Caching::NoStore,
        )
    }

    /// The user's claims released for `scope` (Auth0's shape: `updated_at` is a string).
    fn user_claims(&self, scope: &str) -> Map<String, Value> {
        let user = &self.config.user;
        let mut claims = Map::new();
        claims.insert("sub".into(), json!(user.sub));
        if has_scope(scope, "profile") {
            claims.insert("name".into(), json!(user.name));
            claims.insert("nickname".into(), json!(user.username));
            claims.insert("picture".into(), json!(user.picture));
            claims.insert("updated_at".into(), json!(self.updated_at));
        }
        if has_scope(scope, "email") {
            claims.insert("email".into(), json!(user.email));
            claims.insert("email_verified".into(), json!(true));
        }
        claims
    }

    /// `GET|POST /userinfo` with `Authorization: Bearer <access token>` (OIDC Core §5.3).
    fn userinfo(&self, headers: &HeaderMap, now: Now) -> HttpResponse {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token else {
            let mut response = oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "a Bearer token is required",
            );
            set_header(
                &mut response,
                header::WWW_AUTHENTICATE,
                &format!("Bearer realm=\"{REALM}\""),
            );
            return response;
        };
        let scope = self
            .lock()
            .tokens
            .get(token, now.instant)
            .map(|grant| grant.scope.clone());
        let Some(scope) = scope else {
            let mut response = oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the access token is unknown or expired",
            );
            set_header(
                &mut response,
                header::WWW_AUTHENTICATE,
                &format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""),
            );
            return response;
        };
        json_response(
            StatusCode::OK,
            &Value::Object(self.user_claims(&scope)),
            Caching::NoStore,
        )
    }

    /// `GET|POST /oidc/logout` (OIDC RP-Initiated Logout 1.0). This provider keeps no session,
    /// so logging out is only the redirect back, which goes to registered URIs only.
    fn logout(&self, raw_params: &[u8]) -> HttpResponse {
        let params = match Params::parse_bytes(raw_params) {
            Ok(params) => params,
            Err(error) => {
                return error_html(
                    StatusCode::BAD_REQUEST,
                    "Invalid logout request",
                    &error.to_string(),
                )
            }
        };
        if params
            .get("client_id")
            .is_some_and(|client_id| client_id != self.config.client_id)
        {
            return error_html(
                StatusCode::BAD_REQUEST,
                "Invalid logout request",
                "The client_id is not registered with this provider.",
            );
        }
        match params.get("post_logout_redirect_uri") {
            Some(target)
                if self
                    .config
                    .post_logout_redirect_uris
                    .iter()
                    .any(|uri| uri == target) =>
            {
                let location = match params.get("state") {
                    Some(state) => form::with_query(target, &[("state", state)]),
                    None => target.to_owned(),
                };
                redirect(&location)
            }
            _ => html(StatusCode::OK, pages::signed_out_page()),
        }
    }
}

/// Longest `state` or `nonce` accepted (Custodia's are 43 characters).
const MAX_STATE_LEN: usize = 512;

/// The path of an issuer URL (`http://h:1/a/b` → `/a/b`, `http://h:1` → ``).
fn issuer_path(issuer: &str) -> &str {
    let after_scheme = issuer.split_once("://").map_or(issuer, |(_, rest)| rest);
    after_scheme.find('/').map_or("", |at| &after_scheme[at..])
}

/// Whether the space-separated `scope` contains `wanted`.
fn has_scope(scope: &str, wanted: &str) -> bool {
    scope.split(' ').any(|item| item == wanted)
}

/// An S256 `code_challenge`: base64url without padding of 32 bytes, so 43 characters.
fn is_s256_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A `code_verifier` per RFC 7636 §4.1: 43–128 unreserved characters.
fn is_code_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// Compares secrets in time independent of where they differ (both are hashed first, so the
/// length of the expected value does not leak either).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Decodes `Basic base64(urlencoded(id) ":" urlencoded(secret))` (RFC 6749 §2.3.1).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let (scheme, credentials) = value.to_str().ok()?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(credentials.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form::decode(id).ok()?, form::decode(secret).ok()?))
}

/// 32 random bytes, base64url: request ids, codes and access tokens.
fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

/// How a JSON response may be cached.
#[derive(Clone, Copy)]
enum Caching {
    /// Discovery and JWKS: shared, briefly.
    Public,
    /// Tokens and user data (RFC 6749 §5.1).
    NoStore,
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Sets a header from a computed value; values that are not valid header text are skipped.
fn set_header(response: &mut HttpResponse, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

fn json_response(status: StatusCode, body: &Value, caching: Caching) -> HttpResponse {
    let mut response = response(status, "application/json", body.to_string());
    let headers = response.headers_mut();
    match caching {
        Caching::Public => {
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=60"),
            );
        }
        Caching::NoStore => {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        }
    }
    response
}

/// An RFC 6749 §5.2 error body.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> HttpResponse {
    json_response(
        status,
        &json!({ "error": error, "error_description": description }),
        Caching::NoStore,
    )
}

fn invalid_grant(description: &str) -> HttpResponse {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn invalid_client(description: &str) -> HttpResponse {
    let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    set_header(
        &mut response,
        header::WWW_AUTHENTICATE,
        &format!("Basic realm=\"{REALM}\""),
    );
    response
}

fn html(status: StatusCode, body: String) -> HttpResponse {
    let mut response = response(status, "text/html; charset=utf-8", body);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // No `form-action`: browsers apply it to the redirect that follows the login POST, which
    // goes to the client's origin.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn error_html(status: StatusCode, title: &str, message: &str) -> HttpResponse {
    html(status, pages::error_page(title, message))
}

fn internal_error() -> HttpResponse {
    error_html(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "The development identity provider could not complete the request.",
    )
}

fn not_found() -> HttpResponse {
    error_html(StatusCode::NOT_FOUND, "Not found", "No such endpoint.")
}

fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = error_html(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        "Method not allowed.",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// A 302 to `location`; a location that is not valid header text becomes a 500.
fn redirect(location: &str) -> HttpResponse {
    let Ok(value) = HeaderValue::from_str(location) else {
        return internal_error();
    };
    let mut response = response(StatusCode::FOUND, "text/plain; charset=utf-8", Bytes::new());
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, value);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An authorization error sent back to the client (RFC 6749 §4.1.2.1).
fn redirect_with_error(
    redirect_uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> HttpResponse {
    let mut pairs = vec![("error", error), ("error_description", description)];
    if let Some(state) = state {
        pairs.push(("state", state));
    }
    redirect(&form::with_query(redirect_uri, &pairs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::dev_idp::keys::generate_signing_key;
    use std::sync::OnceLock;

    const REDIRECT: &str = "http://127.0.0.1:8080/callback";
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    /// RFC 7636 appendix B: the S256 challenge of `VERIFIER`.
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    /// One key for all unit tests: generating RSA keys is the slow part.
    fn key() -> SigningKey {
        static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
        SigningKey::new(KEY.get_or_init(|| generate_signing_key().unwrap()).clone()).unwrap()
    }

    fn idp(issuer: &str) -> DevIdp {
        DevIdp::new(
            Config {
                issuer: issuer.into(),
                client_id: "client".into(),
                client_secret: "s3cret:+&".into(),
                redirect_uris: vec![REDIRECT.into()],
                post_logout_redirect_uris: vec!["http://127.0.0.1:8080/".into()],
                user: DemoUser::default(),
            },
            key(),
        )
    }

    fn get(idp: &DevIdp, uri: &str, now: Now) -> HttpResponse {
        let request = Request::builder().uri(uri).body(Bytes::new()).unwrap();
        idp.handle_at(request, now)
    }

    fn post(idp: &DevIdp, uri: &str, body: &str, auth: Option<&str>, now: Now) -> HttpResponse {
        let mut builder = Request::builder().method(Method::POST).uri(uri);
        if let Some(auth) = auth {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        idp.handle_at(builder.body(Bytes::from(body.to_owned())).unwrap(), now)
    }

    fn location(response: &HttpResponse) -> String {
        assert_eq!(response.status(), StatusCode::FOUND);
        response.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned()
    }

    fn query_of(url: &str) -> Params {
        Params::parse(url.split_once('?').unwrap().1).unwrap()
    }

    fn body_text(response: HttpResponse) -> String {
        let bytes = body_bytes(response);
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn body_bytes(response: HttpResponse) -> Bytes {
        use http_body_util::BodyExt;
        let collected = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(response.into_body().collect())
            .unwrap();
        collected.to_bytes()
    }

    fn authorize_uri(extra: &str) -> String {
        format!(
            "/authorize?client_id=client&redirect_uri={}&response_type=code&scope=openid%20profile%20email\
             &state=st&nonce=nn&code_challenge={CHALLENGE}&code_challenge_method=S256{extra}",
            form::encode(REDIRECT)
        )
    }

    /// Drives authorize + login and returns the code.
    fn code(idp: &DevIdp, now: Now) -> String {
        let page = body_text(get(idp, &authorize_uri(""), now));
        let request_id = page
            .split("name=\"request_id\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .to_owned();
        let response = post(
            idp,
            "/authorize",
            &format!("request_id={request_id}&username=demo&password=custodia-demo&action=login"),
            None,
            now,
        );
        let params = query_of(&location(&response));
        assert_eq!(params.get("state"), Some("st"));
        params.get("code").unwrap().to_owned()
    }

    fn exchange(idp: &DevIdp, code: &str, verifier: &str, now: Now) -> HttpResponse {
        let body = format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={verifier}\
             &client_id=client&client_secret={}",
            form::encode(REDIRECT),
            form::encode("s3cret:+&")
        );
        post(idp, "/oauth/token", &body, None, now)
    }

    #[test]
    fn issuer_paths() {
        assert_eq!(issuer_path("http://127.0.0.1:9400"), "");
        assert_eq!(issuer_path("http://127.0.0.1:9400/idp"), "/idp");
        assert_eq!(issuer_path("https://h"), "");
    }

    #[test]
    fn discovery_under_an_issuer_path_with_trailing_slash() {
        let idp = idp("http://127.0.0.1:9400/idp/");
        let response = get(
            &idp,
            "/idp/.well-known/openid-configuration",
            Now::current(),
        );
        assert_eq!(response.status(), StatusCode::OK);
        let doc: Value = serde_json::from_str(&body_text(response)).unwrap();
        assert_eq!(doc["issuer"], "http://127.0.0.1:9400/idp/");
        assert_eq!(
            doc["token_endpoint"],
            "http://127.0.0.1:9400/idp/oauth/token"
        );
        assert_eq!(
            get(&idp, "/.well-known/openid-configuration", Now::current()).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn authorization_errors_redirect_only_to_registered_uris() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let unknown = get(
            &idp,
            &authorize_uri("").replace("client_id=client", "client_id=evil"),
            now,
        );
        assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
        let unregistered = get(
            &idp,
            &authorize_uri("").replace("8080%2Fcallback", "8080%2Fother"),
            now,
        );
        assert_eq!(unregistered.status(), StatusCode::BAD_REQUEST);
        assert!(unregistered.headers().get(header::LOCATION).is_none());

        // A nonce the size of a query string, kept for minutes per pending sign-in: refused.
        let long_nonce = format!("&nonce={}", "n".repeat(MAX_STATE_LEN + 1));
        let cases = [
            (
                "&code_challenge_method=plain",
                "code_challenge_method=S256",
                "invalid_request",
            ),
            ("", "response_type=code", "invalid_request"),
            (
                "&response_type=token",
                "response_type=code",
                "unsupported_response_type",
            ),
            (
                "&scope=profile",
                "scope=openid%20profile%20email",
                "invalid_scope",
            ),
            ("", "nonce=nn", "invalid_request"),
            ("&prompt=none", "", "login_required"),
            (&long_nonce, "nonce=nn", "invalid_request"),
        ];
        for (add, remove, expected) in cases {
            let uri = authorize_uri(add).replacen(
                &format!("&{remove}"),
                "",
                usize::from(!remove.is_empty()),
            );
            let params = query_of(&location(&get(&idp, &uri, now)));
            assert_eq!(params.get("error"), Some(expected), "{uri}");
            assert_eq!(params.get("state"), Some("st"));
        }
    }

    #[test]
    fn code_is_single_use_and_replay_revokes_the_token() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let code = code(&idp, now);
        let first = exchange(&idp, &code, VERIFIER, now);
        assert_eq!(first.status(), StatusCode::OK);
        let token: Value = serde_json::from_str(&body_text(first)).unwrap();
        let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
        let userinfo = post(&idp, "/userinfo", "", Some(&bearer), now);
        assert_eq!(userinfo.status(), StatusCode::OK);

        let replay: Value =
            serde_json::from_str(&body_text(exchange(&idp, &code, VERIFIER, now))).unwrap();
        assert_eq!(replay["error"], "invalid_grant");
        let revoked = post(&idp, "/userinfo", "", Some(&bearer), now);
        assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn codes_expire_after_a_minute() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let code = code(&idp, now);
        let late = exchange(
            &idp,
            &code,
            VERIFIER,
            now.later(CODE_TTL + Duration::from_secs(1)),
        );
        assert_eq!(late.status(), StatusCode::BAD_REQUEST);
        let body: Value = serde_json::from_str(&body_text(late)).unwrap();
        assert_eq!(body["error"], "invalid_grant");
    }

    #[test]
    fn wrong_verifier_uses_the_code_up() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let code = code(&idp, now);
        let wrong = exchange(&idp, &code, &"a".repeat(43), now);
        assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            exchange(&idp, &code, VERIFIER, now).status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn basic_credentials_are_form_urlencoded() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let code = code(&idp, now);
        let credentials = STANDARD.encode(format!("client:{}", form::encode("s3cret:+&")));
        let body = format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={VERIFIER}",
            form::encode(REDIRECT)
        );
        let response = post(
            &idp,
            "/oauth/token",
            &body,
            Some(&format!("Basic {credentials}")),
            now,
        );
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    }

    #[test]
    fn bad_client_credentials_are_401() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        for auth in ["Basic !!!", "Basic Y2xpZW50Ondyb25n", "Bearer x", "Basic"] {
            let response = post(
                &idp,
                "/oauth/token",
                "grant_type=authorization_code",
                Some(auth),
                now,
            );
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{auth}");
            assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        }
        let none = post(
            &idp,
            "/oauth/token",
            "grant_type=authorization_code",
            None,
            now,
        );
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn garbage_never_panics() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let inputs = [
            "",
            "%",
            "a=%FF",
            "&&&==",
            "request_id=%00",
            "a=1&a=2",
            "code=\u{7f}",
        ];
        for input in inputs {
            for path in ["/authorize", "/oauth/token", "/oidc/logout", "/userinfo"] {
                let _ = post(&idp, path, input, Some("Basic %%%"), now);
                let _ = get(&idp, &format!("{path}?{}", form::encode(input)), now);
            }
        }
        let binary = Request::builder()
            .method(Method::POST)
            .uri("/oauth/token")
            .body(Bytes::from_static(b"\xff\xfe"))
            .unwrap();
        assert_eq!(idp.handle_at(binary, now).status(), StatusCode::BAD_REQUEST);
        // Header bytes that are not text (obs-text) reach the parsers too.
        for path in ["/oauth/token", "/userinfo"] {
            let opaque = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header(
                    header::AUTHORIZATION,
                    HeaderValue::from_bytes(b"Basic \xff\xfe").unwrap(),
                )
                .body(Bytes::new())
                .unwrap();
            assert_eq!(
                idp.handle_at(opaque, now).status(),
                StatusCode::UNAUTHORIZED
            );
        }
    }

    #[test]
    fn cancel_and_lockout_redirect_with_access_denied() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let request_id = |page: String| {
            page.split("name=\"request_id\" value=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap()
                .to_owned()
        };
        let id = request_id(body_text(get(&idp, &authorize_uri(""), now)));
        let cancel = post(
            &idp,
            "/authorize",
            &format!("request_id={id}&action=cancel"),
            None,
            now,
        );
        assert_eq!(
            query_of(&location(&cancel)).get("error"),
            Some("access_denied")
        );

        let id = request_id(body_text(get(&idp, &authorize_uri(""), now)));
        for _ in 1..MAX_FAILED_LOGINS {
            let wrong = post(
                &idp,
                "/authorize",
                &format!("request_id={id}&username=demo&password=x"),
                None,
                now,
            );
            assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        }
        let last = post(
            &idp,
            "/authorize",
            &format!("request_id={id}&username=demo&password=x"),
            None,
            now,
        );
        assert_eq!(
            query_of(&location(&last)).get("error"),
            Some("access_denied")
        );
    }

    #[test]
    fn logout_redirects_only_to_registered_uris() {
        let idp = idp("http://127.0.0.1:9400");
        let now = Now::current();
        let ok = get(
            &idp,
            "/oidc/logout?post_logout_redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2F&state=x%20y",
            now,
        );
        assert_eq!(location(&ok), "http://127.0.0.1:8080/?state=x%20y");
        let elsewhere = get(
            &idp,
            "/oidc/logout?post_logout_redirect_uri=http%3A%2F%2Fevil%2F",
            now,
        );
        assert_eq!(elsewhere.status(), StatusCode::OK);
        assert!(body_text(elsewhere).contains("You are signed out"));
    }

    #[test]
    fn pkce_helpers() {
        assert!(is_s256_challenge(CHALLENGE));
        assert!(!is_s256_challenge("short"));
        assert!(is_code_verifier(VERIFIER));
        assert!(!is_code_verifier(&"a".repeat(42)));
        assert!(!is_code_verifier(&"a".repeat(129)));
        assert!(!is_code_verifier(&format!("{}+", "a".repeat(43))));
        assert_eq!(URL_SAFE_NO_PAD.encode(Sha256::digest(VERIFIER)), CHALLENGE);
    }
}
