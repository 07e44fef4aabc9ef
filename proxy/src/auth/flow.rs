//! The login flow at the edge: the per-request gate (policy + session check, no I/O) and the
//! reserved endpoints `/login`, `/callback`, `/logout`. Plain functions over request parts that
//! return what to answer, so they are testable without a Pingora session.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;
use openidconnect::url::form_urlencoded;

use super::cookies::{cookie_text, CookieSettings};
use super::keys::SecretKeys;
use super::login_state::{open_login_state, seal_login_state, LoginState, LOGIN_STATE_TTL};
use super::logout_hint::{open_logout_hint, seal_logout_hint};
use super::oidc::{OidcError, OidcProvider, VerifiedUser};
use super::policy::{Policy, RouteTable};
use super::redirect::safe_return_target;
use super::session::{open_session, seal_session, Session, SessionError};
use super::session_cache::{SessionCache, Verified};
use super::trusted::TrustedProxies;
use crate::balancer::FailureLog;
use crate::config::{AuthSettings, RoutePolicy};
use crate::metrics::{self, SessionCheck};

/// Everything the request path needs for auth, built once per config generation.
#[derive(Debug)]
pub struct AuthRuntime {
    pub settings: AuthSettings,
    pub keys: SecretKeys,
    pub cookies: CookieSettings,
    pub routes: RouteTable,
    pub trusted: TrustedProxies,
    /// Shared across reloads while the IdP settings stay the same.
    pub oidc: Arc<OidcProvider>,
    /// Sessions opened lately under these keys (a new one per config generation).
    pub sessions: SessionCache,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("{0}")]
    Keys(String),
    #[error("{0}")]
    Routes(String),
    #[error("{0}")]
    Oidc(#[from] OidcError),
}

pub fn to_policy(p: RoutePolicy) -> Policy {
    match p {
        RoutePolicy::Public => Policy::Public,
        RoutePolicy::Optional => Policy::Optional,
        RoutePolicy::Required => Policy::Required,
    }
}

impl AuthRuntime {
    /// `previous`: the provider of the config being replaced, reused when it serves the same IdP.
    pub fn build(
        settings: AuthSettings,
        previous: Option<&Arc<OidcProvider>>,
    ) -> Result<AuthRuntime, AuthSetupError> {
        let old: Vec<String> = settings
            .previous_session_secrets
            .iter()
            .map(|s| s.0.clone())
            .collect();
        let keys = SecretKeys::from_secrets(&settings.session_secret.0, &old)
            .map_err(|e| AuthSetupError::Keys(e.to_string()))?;
        let routes = RouteTable::new(
            settings
                .routes
                .iter()
                .map(|(prefix, p)| (prefix.clone(), to_policy(*p)))
                .collect(),
            to_policy(settings.default_policy),
        )
        .map_err(|e| AuthSetupError::Routes(e.to_string()))?;
        let trusted = TrustedProxies::from_nets(settings.trusted_proxies.clone());
        let oidc = match previous {
            Some(p) if p.serves(&settings) => p.clone(),
            _ => Arc::new(OidcProvider::new(&settings)?),
        };
        Ok(AuthRuntime {
            cookies: CookieSettings {
                secure: settings.secure_cookies,
            },
            settings,
            keys,
            routes,
            trusted,
            oidc,
            sessions: SessionCache::new(),
        })
    }
}

/// An answer the proxy writes itself.
#[derive(Debug)]
pub struct AuthResponse {
    pub status: u16,
    /// Extra headers (Location, Set-Cookie…); several Set-Cookie entries are allowed.
    pub headers: Vec<(&'static str, String)>,
    pub page: Option<Page>,
}

/// A message page, rendered as HTML or JSON by the caller.
#[derive(Debug)]
pub struct Page {
    pub title: &'static str,
    pub detail: String,
}

impl AuthResponse {
    fn redirect(location: String) -> AuthResponse {
        AuthResponse {
            status: 302,
            headers: vec![("location", location)],
            page: None,
        }
    }

    fn page(status: u16, title: &'static str, detail: impl Into<String>) -> AuthResponse {
        AuthResponse {
            status,
            headers: Vec::new(),
            page: Some(Page {
                title,
                detail: detail.into(),
            }),
        }
    }

    fn with_cookie(mut self, set_cookie: String) -> AuthResponse {
        self.headers.push(("set-cookie", set_cookie));
        self
    }
}

/// The reserved paths the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Login,
    Callback,
    Logout,
}

impl Endpoint {
    pub fn from_path(normalised: &str) -> Option<Endpoint> {
        match normalised {
            "/login" => Some(Endpoint::Login),
            "/callback" => Some(Endpoint::Callback),
            "/logout" => Some(Endpoint::Logout),
            _ => None,
        }
    }

    /// The `405` for a method the endpoint does not take, or `None` when it takes it. A login
    /// starts only on `GET`: a link checker's `HEAD` or a preflight's `OPTIONS` would set a
    /// login cookie and push a real tab's sign-in out of the [`MAX_PENDING_LOGINS`]. Logout
    /// also takes `POST`, the form a site can use for it.
    pub fn refuse_method(self, method: &http::Method) -> Option<AuthResponse> {
        let allowed = match self {
            Endpoint::Login | Endpoint::Callback => "GET",
            Endpoint::Logout => "GET, POST",
        };
        if *method == http::Method::GET
            || (self == Endpoint::Logout && *method == http::Method::POST)
        {
            return None;
        }
        let mut refused = AuthResponse::page(
            405,
            "Method not allowed",
            format!("This address takes {allowed} only."),
        );
        refused.headers.push(("allow", allowed.to_string()));
        Some(refused)
    }
}

/// What the gate decided for an ordinary request.
#[derive(Debug)]
pub enum Gate {
    /// Forward, with the verified identity if there is one.
    Forward(Option<Verified>),
    /// Answer now (login redirect or 401).
    Respond(AuthResponse),
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Read and check the session cookie (microseconds; no network), counting the result; a
/// verified session comes with its assertion for the workers. `cookie_headers` gives the
/// request's `Cookie` values, again if the first session cookie fails and others came.
pub fn check_session<'a, I>(
    auth: &AuthRuntime,
    cookie_headers: impl Fn() -> I,
    now: u64,
) -> Result<Verified, SessionError>
where
    I: Iterator<Item = &'a [u8]>,
{
    let m = metrics::auth();
    let first = auth.cookies.find_session(cookie_headers());
    let mut result = match &first {
        None => Err(SessionError::Absent),
        Some(found) => verify_session(auth, found, now),
    };
    // A stale cookie of the same name (on a longer path, sent first) must not hide a valid
    // one: the login would succeed and land back on the login, round and round.
    if let (Err(_), Some(first)) = (&result, &first) {
        for other in auth.cookies.all_sessions(&cookie_headers) {
            if other.as_ref() != first.as_ref() {
                if let Ok(verified) = verify_session(auth, &other, now) {
                    result = Ok(verified);
                    break;
                }
            }
        }
    }
    m.session_checked(match &result {
        Ok(_) => SessionCheck::Valid,
        Err(SessionError::Absent) => SessionCheck::Absent,
        Err(SessionError::Expired) => SessionCheck::Expired,
        Err(SessionError::NotAllowed) => SessionCheck::NotAllowed,
        Err(_) => SessionCheck::Invalid,
    });
    result
}

/// One session value as sent: the memo first (a value it knows passed the octet check below
/// when it was stored), else opened.
fn verify_session(auth: &AuthRuntime, found: &[u8], now: u64) -> Result<Verified, SessionError> {
    auth.sessions.verify(
        found,
        now,
        || match cookie_text(found) {
            Some(sealed) => {
                let session = open_session(&auth.keys, sealed, now)?;
                // The lists may have changed since the sign-in (a reload starts a new memo,
                // so this runs again for every session after one).
                if !email_allowed(&auth.settings, session.email.as_deref()) {
                    return Err(SessionError::NotAllowed);
                }
                Ok(session)
            }
            // Not cookie octets: as if there were no session cookie.
            None => Err(SessionError::Absent),
        },
        |session, now| sign_assertion(auth.settings.assertion_key.0.as_bytes(), session, now),
    )
}

/// The assertion that tells the workers who is signed in (`custodia_identity`), signed with
/// `assertion_key`, valid from `now` for [`ASSERTION_TTL`].
pub fn sign_assertion(assertion_key: &[u8], session: &Session, now: u64) -> HeaderValue {
    let identity = custodia_identity::Identity {
        sub: session.sub.clone(),
        email: session.email.clone(),
        name: session.name.clone(),
        picture: session.picture.clone(),
    };
    let token =
        custodia_identity::sign_assertion(&identity, assertion_key, now, ASSERTION_TTL.as_secs());
    match HeaderValue::try_from(token) {
        Ok(value) => value,
        // Base64url segments joined by dots: always a valid header value, whatever the session says.
        Err(_) => unreachable!("a signed assertion is always a valid header value"),
    }
}

/// The per-request decision for a normalised path under its route policy. `wants_html` (a
/// browser, to be sent to the login page, rather than an API client, to get a 401) is asked
/// only when a required session is missing: a signed-in request never looks at `Accept`.
pub fn gate<'a, I>(
    auth: &AuthRuntime,
    policy: Policy,
    cookie_headers: impl Fn() -> I,
    original_target: &str,
    wants_html: impl FnOnce() -> bool,
    now: u64,
) -> Gate
where
    I: Iterator<Item = &'a [u8]>,
{
    if policy == Policy::Public {
        return Gate::Forward(None);
    }
    let error = match check_session(auth, &cookie_headers, now) {
        Ok(session) => return Gate::Forward(Some(session)),
        Err(_) if policy == Policy::Optional => return Gate::Forward(None),
        Err(error) => error,
    };
    let mut refused = if wants_html() {
        let rd = safe_return_target(original_target).unwrap_or_else(|| "/".into());
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("rd", &rd)
            .finish();
        AuthResponse::redirect(format!("/login?{query}"))
    } else {
        AuthResponse {
            status: 401,
            headers: vec![("www-authenticate", "Bearer realm=\"custodia\"".into())],
            page: Some(Page {
                title: "unauthenticated",
                detail: "Sign in at /login first.".into(),
            }),
        }
    };
    // A session cookie that can never pass again (expired, or not a sealed session at all):
    // the browser is told to drop it rather than send it with every request. Not one that
    // fails to open (a key left out of a rotation by mistake) or whose email a reload dropped:
    // put right, those sessions are good again, and users would have to sign in anew.
    if matches!(error, SessionError::Expired | SessionError::Malformed) {
        for clear in auth.cookies.clear_sent_session_cookies(cookie_headers()) {
            refused = refused.with_cookie(clear);
        }
    }
    Gate::Respond(refused)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// What anyone can make happen once a request — an IdP outage met by every user, `/callback`
/// with a stale or forged state, an `error` a bot sends — is logged one line a second per kind,
/// with the number left unlogged since (`unlogged`): one line per request would bury the rest
/// of the log (an outage under load wrote 50,000 a second). The metrics count every one.
static LOG_IDP_UNAVAILABLE: FailureLog = FailureLog::new();
static LOG_IDP_REPORTED: FailureLog = FailureLog::new();
static LOG_NO_LOGIN_COOKIE: FailureLog = FailureLog::new();
static LOG_BAD_LOGIN_STATE: FailureLog = FailureLog::new();

/// Logins one browser may have under way at once (tabs); starting one more forgets the oldest.
pub const MAX_PENDING_LOGINS: usize = 4;

/// `GET /login[?rd=/path]`: start an authorization code flow.
pub fn login<'a>(
    auth: &AuthRuntime,
    query: Option<&str>,
    cookie_headers: impl Iterator<Item = &'a [u8]>,
    now: u64,
) -> AuthResponse {
    let return_to = query_param(query, "rd")
        .and_then(|rd| safe_return_target(&rd))
        .unwrap_or_else(|| "/".into());
    let request = match auth.oidc.authorize() {
        Ok(r) => r,
        Err(e) => {
            if let Some(unlogged) = LOG_IDP_UNAVAILABLE.admit(now) {
                tracing::warn!(
                    error = %e,
                    unlogged = unlogged.count,
                    unlogged_over_secs = unlogged.over_secs,
                    "login refused: identity provider unavailable"
                );
            }
            metrics::auth()
                .logins
                .with_label_values(&["failed", "idp_unavailable"])
                .inc();
            return AuthResponse::page(
                503,
                "Sign-in is unavailable",
                "The identity provider cannot be reached right now. Please try again in a moment.",
            );
        }
    };
    metrics::auth()
        .logins
        .with_label_values(&["started", "none"])
        .inc();
    let state = LoginState {
        state: request.state.clone(),
        nonce: request.nonce,
        pkce_verifier: request.pkce_verifier,
        return_to,
        exp: now + LOGIN_STATE_TTL.as_secs(),
    };
    let sealed = seal_login_state(&auth.keys, &state);
    let mut response = AuthResponse::redirect(request.url);
    for stale in auth
        .cookies
        .clear_stale_login_cookies(cookie_headers, MAX_PENDING_LOGINS - 1)
    {
        response = response.with_cookie(stale);
    }
    response.with_cookie(
        auth.cookies
            .set_login_cookie(&request.state, &sealed, LOGIN_STATE_TTL),
    )
}

/// At most [`MAX_SHOWN_CHARS`] characters of a text the identity provider (or anyone) sent.
fn truncated(text: &str) -> &str {
    text.char_indices()
        .nth(MAX_SHOWN_CHARS)
        .map_or(text, |(end, _)| &text[..end])
}

const MAX_SHOWN_CHARS: usize = 300;

fn login_failed(reason: &'static str) {
    debug_assert!(
        metrics::LOGIN_FAILURES.contains(&reason),
        "{reason} is not in metrics::LOGIN_FAILURES (its series would appear only once used)"
    );
    metrics::auth()
        .logins
        .with_label_values(&["failed", reason])
        .inc();
}

/// `GET /callback?code&state`: finish the flow, set the session, go back where the user was.
pub async fn callback<'a>(
    auth: &AuthRuntime,
    query: Option<&str>,
    cookie_headers: impl Iterator<Item = &'a [u8]> + Clone,
    now: u64,
) -> AuthResponse {
    let state = query_param(query, "state");
    let clear_login = |r: AuthResponse| match &state {
        Some(s) => r.with_cookie(auth.cookies.clear_login_cookie(s)),
        None => r,
    };
    if let Some(error) = query_param(query, "error") {
        let description = query_param(query, "error_description").unwrap_or_default();
        // Anyone can send a browser here with any text: logged escaped (no forged lines), and
        // shown on our page only for a sign-in this browser really started (no words put in
        // the site's mouth by a crafted link).
        if let Some(unlogged) = LOG_IDP_REPORTED.admit(now) {
            tracing::warn!(
                error = ?truncated(&error),
                description = ?truncated(&description),
                unlogged = unlogged.count,
                unlogged_over_secs = unlogged.over_secs,
                "the identity provider reported a failed sign-in"
            );
        }
        let (status, reason) = if error == "access_denied" {
            (403, "access_denied")
        } else {
            (400, "idp_error")
        };
        login_failed(reason);
        let started_here = state.as_deref().is_some_and(|state| {
            let name = auth.cookies.login_cookie_name(state);
            super::cookies::read_cookie(cookie_headers.clone(), &name)
                .is_some_and(|sealed| open_login_state(&auth.keys, &sealed, state, now).is_ok())
        });
        let detail = match (started_here, description.is_empty()) {
            (false, _) => "The identity provider did not complete the sign-in.".to_string(),
            (true, true) => format!("The identity provider answered: {}.", truncated(&error)),
            (true, false) => format!(
                "The identity provider answered: {} ({}).",
                truncated(&error),
                truncated(&description)
            ),
        };
        return clear_login(AuthResponse::page(
            status,
            "Sign-in did not complete",
            detail,
        ));
    }
    let (Some(code), Some(state_value)) = (query_param(query, "code"), state.clone()) else {
        login_failed("bad_request");
        return AuthResponse::page(
            400,
            "Sign-in did not complete",
            "The callback is missing its code or state.",
        );
    };
    // A callback that cannot finish, from a browser signed in already (Back to the IdP's form
    // and through it again, a second tab's sign-in): home, not "sign-in expired".
    let signed_in = || check_session(auth, || cookie_headers.clone(), now).is_ok();
    let name = auth.cookies.login_cookie_name(&state_value);
    let Some(sealed) = super::cookies::read_cookie(cookie_headers.clone(), &name) else {
        if signed_in() {
            return AuthResponse::redirect("/".into());
        }
        if let Some(unlogged) = LOG_NO_LOGIN_COOKIE.admit(now) {
            tracing::warn!(
                unlogged = unlogged.count,
                unlogged_over_secs = unlogged.over_secs,
                "callback with no matching login cookie (expired, already used, or another browser)"
            );
        }
        login_failed("state_mismatch");
        return AuthResponse::page(
            400,
            "Sign-in expired",
            "This sign-in attempt has expired or was already used. Please sign in again.",
        );
    };
    let login = match open_login_state(&auth.keys, &sealed, &state_value, now) {
        Ok(login) => login,
        Err(_) if signed_in() => return clear_login(AuthResponse::redirect("/".into())),
        Err(e) => {
            if let Some(unlogged) = LOG_BAD_LOGIN_STATE.admit(now) {
                tracing::warn!(
                    error = %e,
                    unlogged = unlogged.count,
                    unlogged_over_secs = unlogged.over_secs,
                    "callback with an invalid login state"
                );
            }
            login_failed("state_mismatch");
            return clear_login(AuthResponse::page(
                400,
                "Sign-in expired",
                "This sign-in attempt has expired or does not match. Please sign in again.",
            ));
        }
    };
    let user = match auth
        .oidc
        .exchange(&code, &login.pkce_verifier, &login.nonce)
        .await
    {
        Ok(user) => user,
        Err(e) => {
            tracing::warn!(error = %e, "sign-in failed at the code exchange");
            if matches!(e, OidcError::Unreachable(_) | OidcError::BadAnswer(_)) {
                metrics::auth()
                    .idp_errors
                    .with_label_values(&["token"])
                    .inc();
            }
            let (status, reason, detail) = match &e {
                OidcError::Unreachable(_) => (
                    502,
                    "idp_unreachable",
                    "The identity provider could not be reached. Please try again.",
                ),
                OidcError::BadAnswer(_) => (
                    502,
                    "idp_bad_answer",
                    "The identity provider's answer could not be read. Please try again.",
                ),
                OidcError::NotReady { .. } => (
                    503,
                    "idp_unavailable",
                    "The identity provider is unavailable right now.",
                ),
                OidcError::InvalidIdToken(_) | OidcError::NoIdToken => (
                    400,
                    "invalid_id_token",
                    "The identity provider's answer could not be verified.",
                ),
                _ => (
                    400,
                    "code_rejected",
                    "The identity provider refused this sign-in. Please sign in again.",
                ),
            };
            login_failed(reason);
            return clear_login(AuthResponse::page(
                status,
                "Sign-in did not complete",
                detail,
            ));
        }
    };
    if !is_allowed(&auth.settings, &user) {
        let why = if email_allowed(&auth.settings, user.email.as_deref()) {
            "the identity provider did not say the email is verified"
        } else {
            "email not allowed"
        };
        tracing::warn!(sub = ?user.sub, "sign-in refused: {why}");
        login_failed("not_allowed");
        return clear_login(AuthResponse::page(
            403,
            "Access denied",
            "Your account is not allowed to use this site.",
        ));
    }
    let ttl = auth.settings.session_ttl;
    let session = Session {
        sub: user.sub,
        email: user.email,
        name: user.name,
        picture: user.picture,
        iat: now,
        exp: now + ttl.as_secs(),
    };
    // The workers refuse assertions over this size (and would serve the user as a guest):
    // a profile that large is refused here, where the user is told.
    let assertion = sign_assertion(auth.settings.assertion_key.0.as_bytes(), &session, now);
    if assertion.len() > custodia_identity::MAX_TOKEN_LEN {
        tracing::warn!(
            sub = ?session.sub,
            bytes = assertion.len(),
            "sign-in refused: the profile is too large to forward to the workers"
        );
        login_failed("session_too_large");
        return clear_login(AuthResponse::page(
            400,
            "Sign-in did not complete",
            "Your profile at the identity provider is too large to sign in with.",
        ));
    }
    let sealed = seal_session(&auth.keys, &session);
    let cookies = match auth.cookies.set_session_cookies(&sealed, ttl) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "session too large for cookies");
            login_failed("session_too_large");
            return clear_login(AuthResponse::page(
                400,
                "Sign-in did not complete",
                "The session is too large to store.",
            ));
        }
    };
    metrics::auth()
        .logins
        .with_label_values(&["completed", "none"])
        .inc();
    tracing::info!(sub = %session.sub, "signed in");
    let mut response = clear_login(AuthResponse::redirect(login.return_to));
    for c in cookies {
        response = response.with_cookie(c);
    }
    // Without the hint, logout still works (the IdP is told our client_id instead).
    let hint = seal_logout_hint(&auth.keys, &session, &user.id_token);
    match auth.cookies.set_logout_hint_cookie(&hint, ttl) {
        Ok(c) => response.with_cookie(c),
        Err(e) => {
            tracing::debug!(error = %e, "ID token not kept for logout");
            response.with_cookie(auth.cookies.clear_logout_hint_cookie())
        }
    }
}

/// May this user sign in? With `allowed_emails` / `allowed_domains` set, only with an email they
/// admit that the identity provider says it verified (`email_verified: true`; a missing claim
/// proves nothing about who owns the address, so it does not count).
pub fn is_allowed(settings: &AuthSettings, user: &VerifiedUser) -> bool {
    if no_allow_lists(settings) {
        return true;
    }
    user.email_verified == Some(true) && email_allowed(settings, user.email.as_deref())
}

fn no_allow_lists(settings: &AuthSettings) -> bool {
    settings.allowed_emails.is_empty() && settings.allowed_domains.is_empty()
}

/// `email` against `allowed_emails` / `allowed_domains` (ASCII case-insensitive). Anything but
/// one `local@domain` (two `@`, an empty side) matches neither list.
pub fn email_allowed(settings: &AuthSettings, email: Option<&str>) -> bool {
    if no_allow_lists(settings) {
        return true;
    }
    let Some(email) = email.map(str::to_ascii_lowercase) else {
        return false;
    };
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return false;
    }
    settings.allowed_emails.contains(&email) || settings.allowed_domains.iter().any(|d| d == domain)
}

/// `GET /logout`: clear the session, then leave through the IdP's logout if it has one.
pub fn logout<'a>(
    auth: &AuthRuntime,
    cookie_headers: impl Iterator<Item = &'a [u8]>,
    now: u64,
) -> AuthResponse {
    let cookie_headers: Vec<&[u8]> = cookie_headers.collect();
    let session = auth
        .cookies
        .read_session(cookie_headers.iter().copied())
        .and_then(|sealed| open_session(&auth.keys, &sealed, now).ok());
    let home = format!("{}/", auth.settings.public_url);
    let hint = session.as_ref().and_then(|session| {
        let sealed = auth
            .cookies
            .read_logout_hint(cookie_headers.iter().copied())?;
        open_logout_hint(&auth.keys, &sealed, session)
    });
    let target = auth.oidc.logout_url(hint.as_deref(), &home).unwrap_or(home);
    let mut response = AuthResponse::redirect(target);
    for c in auth.cookies.clear_session_cookies() {
        response = response.with_cookie(c);
    }
    response = response.with_cookie(auth.cookies.clear_logout_hint_cookie());
    if let Some(s) = session {
        tracing::info!(sub = %s.sub, "signed out");
    }
    response
}

/// How long the identity assertion sent to workers is valid.
pub const ASSERTION_TTL: Duration = Duration::from_secs(60);

/// Render an [`AuthResponse`] body for a browser or an API client.
pub fn render(page: &Page, status: u16, json: bool, request_id: &str) -> (&'static str, Bytes) {
    if json {
        let body = serde_json::json!({
            "error": page.title,
            "detail": page.detail,
            "status": status,
            "request_id": request_id,
        });
        ("application/json", Bytes::from(body.to_string()))
    } else {
        (
            "text/html; charset=utf-8",
            Bytes::from(crate::pages::message_page(
                status,
                page.title,
                &page.detail,
                request_id,
            )),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(email: Option<&str>, verified: Option<bool>) -> VerifiedUser {
        VerifiedUser {
            sub: "u1".into(),
            email: email.map(String::from),
            email_verified: verified,
            name: None,
            picture: None,
            id_token: String::new(),
        }
    }

    fn settings(emails: &[&str], domains: &[&str]) -> AuthSettings {
        let mut config = crate::config::parse_with_env(
            "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[auth]\npublic_url = \"http://127.0.0.1:8080\"\n",
            std::path::Path::new("t.toml"),
            &[
                ("CUSTODIA_AUTH_ISSUER", "http://127.0.0.1:1"),
                ("AUTH0_CLIENT_ID", "c"),
                ("AUTH0_CLIENT_SECRET", "s"),
                ("APP_SECRET_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::HashMap<_, _>>(),
        )
        .unwrap()
        .auth
        .unwrap();
        config.allowed_emails = emails.iter().map(|e| e.to_string()).collect();
        config.allowed_domains = domains.iter().map(|e| e.to_string()).collect();
        config
    }

    #[test]
    fn allow_lists_admit_only_verified_matching_emails() {
        let open = settings(&[], &[]);
        assert!(is_allowed(&open, &user(None, None)), "no lists: anyone");
        let lists = settings(&["boss@corp.example"], &["team.example"]);
        assert!(is_allowed(
            &lists,
            &user(Some("Boss@Corp.example"), Some(true))
        ));
        assert!(is_allowed(
            &lists,
            &user(Some("anyone@team.example"), Some(true))
        ));
        assert!(
            !is_allowed(&lists, &user(Some("anyone@team.example"), None)),
            "no email_verified claim: not known to be verified"
        );
        for forged in [
            "a@evil.example@team.example",
            "@team.example",
            "team.example",
            "x@",
        ] {
            assert!(
                !is_allowed(&lists, &user(Some(forged), Some(true))),
                "{forged}"
            );
        }
        assert!(!is_allowed(
            &lists,
            &user(Some("x@evil.example"), Some(true))
        ));
        assert!(
            !is_allowed(&lists, &user(Some("x@team.example"), Some(false))),
            "unverified"
        );
        assert!(!is_allowed(
            &lists,
            &user(Some("x@sub.team.example.evil"), Some(true))
        ));
        assert!(!is_allowed(&lists, &user(None, None)), "no email");
    }

    #[test]
    fn a_session_is_checked_against_the_lists_of_today() {
        assert!(email_allowed(&settings(&[], &[]), None), "no lists");
        let lists = settings(&[], &["team.example"]);
        assert!(email_allowed(&lists, Some("Ann@Team.Example")));
        assert!(!email_allowed(&lists, Some("ann@other.example")));
        assert!(!email_allowed(&lists, None));
    }

    /// User "u1"'s session, signed in at 1 and valid until 100.
    fn u1_until_100() -> Session {
        Session {
            sub: "u1".into(),
            email: None,
            name: None,
            picture: None,
            iat: 1,
            exp: 100,
        }
    }

    /// The Back button to the IdP's form and through it again, or a second tab's sign-in: a
    /// callback that cannot finish, from a browser signed in already, goes home.
    #[tokio::test]
    async fn a_stale_callback_from_a_signed_in_browser_goes_home() {
        let auth = AuthRuntime::build(settings(&[], &[]), None).unwrap();
        let now = 50;
        let session = u1_until_100();
        let signed_in = format!("custodia_session={}", seal_session(&auth.keys, &session));
        let query = Some("code=abc&state=used-already");
        let home = callback(&auth, query, std::iter::once(signed_in.as_bytes()), now).await;
        assert_eq!(home.status, 302);
        assert!(home.headers.contains(&("location", "/".to_string())));
        // A login cookie for that state that does not open: home too, and the cookie cleared.
        let name = auth.cookies.login_cookie_name("used-already");
        let both = format!("{signed_in}; {name}=garbage");
        let home = callback(&auth, query, std::iter::once(both.as_bytes()), now).await;
        assert_eq!(home.status, 302, "{home:?}");
        assert!(home
            .headers
            .iter()
            .any(|(h, v)| *h == "set-cookie" && v.starts_with(&name)));
        // Signed out, the same callbacks still say the sign-in expired.
        let expired = callback(&auth, query, std::iter::empty(), now).await;
        assert_eq!(expired.status, 400);
        let garbage = format!("{name}=garbage");
        let expired = callback(&auth, query, std::iter::once(garbage.as_bytes()), now).await;
        assert_eq!(expired.status, 400);
    }

    #[test]
    fn required_paths_send_browsers_to_login_and_api_clients_a_401() {
        let auth = AuthRuntime::build(settings(&[], &[]), None).unwrap();
        let no_cookies = std::iter::empty::<&[u8]>;
        match gate(
            &auth,
            Policy::Required,
            no_cookies,
            "/api/me?x=1",
            || true,
            1,
        ) {
            Gate::Respond(r) => {
                assert_eq!(r.status, 302);
                assert_eq!(
                    r.headers[0],
                    ("location", "/login?rd=%2Fapi%2Fme%3Fx%3D1".to_string())
                );
            }
            other => panic!("{other:?}"),
        }
        match gate(&auth, Policy::Required, no_cookies, "/api/me", || false, 1) {
            Gate::Respond(r) => assert_eq!(r.status, 401),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            gate(&auth, Policy::Optional, no_cookies, "/", || true, 1),
            Gate::Forward(None)
        ));
        assert!(matches!(
            gate(&auth, Policy::Public, no_cookies, "/", || true, 1),
            Gate::Forward(None)
        ));

        let session = u1_until_100();
        let cookie = format!("custodia_session={}", seal_session(&auth.keys, &session));
        let cookies = || std::iter::once(cookie.as_bytes());
        match gate(&auth, Policy::Required, cookies, "/api/me", || false, 50) {
            Gate::Forward(Some(verified)) => {
                assert_eq!(verified.session.sub, "u1");
                let vouched = custodia_identity::verify_assertion(
                    verified.assertion.to_str().unwrap(),
                    auth.settings.assertion_key.0.as_bytes(),
                    50,
                )
                .unwrap();
                assert_eq!(vouched.sub, "u1");
            }
            other => panic!("{other:?}"),
        }
        match gate(&auth, Policy::Required, cookies, "/api/me", || false, 100) {
            // Expired: refused, and the browser told to drop the cookie it sent (not others).
            Gate::Respond(refused) => {
                let cleared: Vec<&String> = refused
                    .headers
                    .iter()
                    .filter(|(h, _)| *h == "set-cookie")
                    .map(|(_, v)| v)
                    .collect();
                assert_eq!(cleared.len(), 1, "{cleared:?}");
                assert!(cleared[0].starts_with("custodia_session=; Max-Age=0"));
            }
            other => panic!("expired: {other:?}"),
        }
        match gate(&auth, Policy::Required, no_cookies, "/api/me", || true, 100) {
            Gate::Respond(refused) => assert!(
                refused.headers.iter().all(|(h, _)| *h != "set-cookie"),
                "no cookie sent, none cleared: {refused:?}"
            ),
            other => panic!("{other:?}"),
        }

        // A stale cookie of the same name (on a longer path: browsers send it first) does not
        // hide the valid one, in one Cookie header or two; found the other way round too.
        let valid = seal_session(&auth.keys, &session);
        let forwarded = |headers: &[String]| {
            let cookies = || headers.iter().map(|h| h.as_bytes());
            matches!(
                gate(&auth, Policy::Required, cookies, "/api/me", || false, 50),
                Gate::Forward(Some(_))
            )
        };
        for stale in ["stale", "v1.AAAA", "\u{1}"] {
            assert!(forwarded(&[format!(
                "custodia_session={stale}; custodia_session={valid}"
            )]));
            assert!(forwarded(&[
                format!("custodia_session={stale}"),
                format!("other=1; custodia_session={valid}"),
            ]));
            assert!(forwarded(&[format!(
                "custodia_session={valid}; custodia_session={stale}"
            )]));
            assert!(!forwarded(&[format!(
                "custodia_session={stale}; custodia_session={stale}x"
            )]));
        }
    }
}
