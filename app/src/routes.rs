//! Request routing: the worker's routes, their responses, and the state they share.
//!
//! | route          | methods   | answer                                                        |
//! |----------------|-----------|---------------------------------------------------------------|
//! | `/`            | GET, HEAD | home page: guest, or signed in for a verified identity        |
//! | `/api/hello`   | GET, HEAD | `{"message", "timestamp", "worker"}`                           |
//! | `/api/me`      | GET, HEAD | the verified identity + `worker`, or 401                      |
//! | `/healthz`     | GET, HEAD | `ok` (200), or 503 once shutdown has begun                    |
//! | anything else  |           | 404 JSON; a known path with another method gets 405 + `Allow` |
//!
//! [`handle`] is a plain function of the request head and [`AppState`], so tests call it without a
//! socket; [`crate::server`] adds the configured delay and runs it under hyper.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, REFERRER_POLICY, WWW_AUTHENTICATE,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::identity::{
    verify_assertion, verify_key_check, AssertionError, Identity, HEALTH_PROBLEM_HEADER,
    IDENTITY_HEADER, KEY_CHECK_HEADER,
};
use crate::page::HomePage;

/// One literal for [`HELLO_MESSAGE`] and the precomputed head of the hello JSON.
macro_rules! hello_message {
    () => {
        "Hello, Custodia... This is Pascal!!!"
    };
}

/// The greeting the seed's `/` returned ("Hello, Flask...") with the project's name.
pub const HELLO_MESSAGE: &str = hello_message!();

/// `{"message":"…","timestamp":"`: the constant head of the hello JSON (the message needs no
/// JSON escaping).
const HELLO_HEAD: &str = concat!(r#"{"message":""#, hello_message!(), r#"","timestamp":""#);

const HTML: HeaderValue = HeaderValue::from_static("text/html; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
const GET_HEAD: HeaderValue = HeaderValue::from_static("GET, HEAD");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
const DENY: HeaderValue = HeaderValue::from_static("DENY");
const SAME_ORIGIN: HeaderValue = HeaderValue::from_static("same-origin");
/// The proxy's challenge for the same refusal (RFC 9110 §15.5.2: a 401 names one).
const CHALLENGE: HeaderValue = HeaderValue::from_static("Bearer realm=\"custodia\"");

/// What a worker is told at startup; [`AppState::new`] turns it into the runtime state.
#[derive(Clone, Default)]
pub struct AppSettings {
    /// Reported as `worker` in JSON answers; the CLI defaults it to the bound address.
    pub worker_id: String,
    /// Fixed delay before every response except `/healthz` (the "slow worker" knob).
    pub delay: Duration,
    /// HMAC key for identity assertions; `None` means every request is a guest.
    pub assertion_key: Option<Vec<u8>>,
    /// Keys of a rotation still under way, tried when `assertion_key` refuses an assertion.
    pub previous_assertion_keys: Vec<Vec<u8>>,
}

impl fmt::Debug for AppSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSettings")
            .field("worker_id", &self.worker_id)
            .field("delay", &self.delay)
            .field(
                "assertion_key",
                &self
                    .assertion_key
                    .as_ref()
                    .map(|k| format!("<{} bytes>", k.len())),
            )
            .field(
                "previous_assertion_keys",
                &self.previous_assertion_keys.len(),
            )
            .finish()
    }
}

/// Everything a request needs, built once per worker and shared by all connections.
pub struct AppState {
    settings: AppSettings,
    page: HomePage,
    /// `","worker":"<id>"}`: the constant tail of the hello JSON, worker id already escaped.
    hello_tail: String,
    shutting_down: AtomicBool,
    in_flight: AtomicUsize,
    /// Identity assertions refused so far (for the log's back-off).
    assertions_refused: AtomicU64,
    /// Health checks whose key check failed so far (for the log's back-off).
    key_checks_failed: AtomicU64,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("settings", &self.settings)
            .field("shutting_down", &self.is_shutting_down())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Precomputes the guest page and the constant parts of the JSON answers.
    pub fn new(settings: AppSettings) -> Self {
        let worker_json = serde_json::Value::from(settings.worker_id.as_str()).to_string();
        AppState {
            hello_tail: format!(r#"","worker":{worker_json}}}"#),
            page: HomePage::new(),
            settings,
            shutting_down: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            assertions_refused: AtomicU64::new(0),
            key_checks_failed: AtomicU64::new(0),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.settings.worker_id
    }

    pub fn delay(&self) -> Duration {
        self.settings.delay
    }

    /// Whether identity assertions are checked (a key is configured).
    pub fn verifies_identity(&self) -> bool {
        self.settings.assertion_key.is_some()
    }

    /// Marks the worker as draining: `/healthz` answers 503 from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Requests currently being answered (including any delay).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard is dropped (answered or cancelled).
    pub(crate) fn track_request(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// The identity vouched for by a valid assertion header, if a key is configured.
    /// `X-Forwarded-User` and friends are never looked at. More than one assertion header, or
    /// an invalid one, means guest.
    fn verified_identity<B>(&self, req: &Request<B>, now_unix: u64) -> Option<Identity> {
        let key = self.settings.assertion_key.as_deref()?;
        let mut values = req.headers().get_all(IDENTITY_HEADER).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let token = value.to_str().ok()?;
        let verified = verify_assertion(token, key, now_unix).or_else(|error| {
            // Signed by a proxy still on the key before a rotation, or refused for the
            // current key's reason.
            self.settings
                .previous_assertion_keys
                .iter()
                .find_map(|old| verify_assertion(token, old, now_unix).ok())
                .ok_or(error)
        });
        match verified {
            Ok(identity) => Some(identity),
            Err(error) => {
                // Only the proxy sends assertions: a refused one means the two disagree (the
                // assertion key, the clocks). Said at warn, but not once per request: the 1st,
                // 2nd, 4th, 8th… refusal.
                let refused = self.assertions_refused.fetch_add(1, Ordering::Relaxed) + 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        %error,
                        refused,
                        "identity assertion refused; serving as guest \
                         (is CUSTODIA_ASSERTION_KEY the proxy's? are the clocks in sync?)"
                    );
                } else {
                    tracing::debug!(%error, "identity assertion refused; serving as guest");
                }
                None
            }
        }
    }
}

impl AppState {
    /// Why this worker would refuse the identity assertions of the proxy whose health check
    /// sent `req`, if it would: no key, another key, or a clock too far from the proxy's. The
    /// proxy then takes it out of the pool, where it would have served signed-in users as
    /// guests. `None` when it verifies, or the check sent none (a proxy without logins).
    fn key_check_problem<B>(&self, req: &Request<B>, now_unix: u64) -> Option<String> {
        let token = req.headers().get(KEY_CHECK_HEADER)?;
        let refused = match (self.settings.assertion_key.as_deref(), token.to_str()) {
            (None, _) => "this worker has no identity assertion key (set APP_SECRET_KEY or \
                          CUSTODIA_ASSERTION_KEY as the proxy's)"
                .to_string(),
            (Some(_), Err(_)) => "the key check is not text".to_string(),
            (Some(key), Ok(token)) => {
                let keys = std::iter::once(key).chain(
                    self.settings
                        .previous_assertion_keys
                        .iter()
                        .map(Vec::as_slice),
                );
                // Under the key that signed it, a refusal says more than "another key" does
                // (an old key's check that expired is a clock problem).
                let mut refusal = AssertionError::Signature;
                for key in keys {
                    match verify_key_check(token, key, now_unix) {
                        Ok(()) => {
                            self.key_checks_failed.store(0, Ordering::Relaxed);
                            return None;
                        }
                        Err(AssertionError::Signature) => {}
                        Err(error) => refusal = error,
                    }
                }
                key_check_refusal(&refusal)
            }
        };
        // The 1st, 2nd, 4th… refusal of a run of them: a worker checked every 2 s says it once
        // in a while, and again at once when it goes wrong after a success.
        let failed = self.key_checks_failed.fetch_add(1, Ordering::Relaxed) + 1;
        if failed.is_power_of_two() {
            tracing::warn!(failed, "the proxy's key check refused: {refused}");
        }
        Some(refused)
    }
}

fn key_check_refusal(error: &AssertionError) -> String {
    match error {
        AssertionError::Expired { .. } | AssertionError::IssuedInFuture { .. } => {
            format!("the proxy's clock and this worker's disagree ({error})")
        }
        _ => format!(
            "this worker refuses the proxy's identity assertions ({error}): its key \
             (CUSTODIA_ASSERTION_KEY, or the one derived from APP_SECRET_KEY) is not the proxy's"
        ),
    }
}

pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Home,
    Hello,
    Me,
    Health,
}

impl Route {
    fn of(path: &str) -> Option<Route> {
        match path {
            "/" => Some(Route::Home),
            "/api/hello" => Some(Route::Hello),
            "/api/me" => Some(Route::Me),
            HEALTH_PATH => Some(Route::Health),
            _ => None,
        }
    }
}

/// The health check path; exempt from the configured delay.
pub const HEALTH_PATH: &str = "/healthz";

/// Answers one request from its head alone (bodies are never read), at the current time.
pub fn handle<B>(req: &Request<B>, state: &AppState) -> Response<Full<Bytes>> {
    handle_at(req, state, SystemTime::now())
}

/// [`handle`] at a given wall-clock time (used for `exp` checks and the hello timestamp).
pub fn handle_at<B>(req: &Request<B>, state: &AppState, now: SystemTime) -> Response<Full<Bytes>> {
    let Some(route) = Route::of(req.uri().path()) else {
        return json_response(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"error":"not found"}"#),
        );
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(br#"{"error":"method not allowed"}"#),
        );
        response.headers_mut().insert(ALLOW, GET_HEAD);
        return response;
    }
    // A clock before 1970 is broken; clamp rather than fail the request.
    let now = if now < UNIX_EPOCH { UNIX_EPOCH } else { now };
    let now_unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match route {
        Route::Home => home(req, state, now_unix),
        Route::Hello => hello(state, now),
        Route::Me => me(req, state, now_unix),
        Route::Health => health(req, state, now_unix),
    }
}

fn home<B>(req: &Request<B>, state: &AppState, now_unix: u64) -> Response<Full<Bytes>> {
    let (body, cache) = match state.verified_identity(req, now_unix) {
        Some(identity) => (state.page.signed_in(&identity), NO_STORE),
        // The guest page is the same bytes for everyone, but must not be served from a browser
        // cache after the user signs in.
        None => (state.page.guest(), NO_CACHE),
    };
    let mut response = response(StatusCode::OK, HTML, body);
    response.headers_mut().insert(CACHE_CONTROL, cache);
    response
}

fn hello(state: &AppState, now: SystemTime) -> Response<Full<Bytes>> {
    // "2025-01-01T00:00:00.000Z" is 24 bytes.
    let mut body = String::with_capacity(HELLO_HEAD.len() + 24 + state.hello_tail.len());
    body.push_str(HELLO_HEAD);
    // Writing to a String cannot fail; humantime only refuses years past 9999 (then no timestamp).
    let _ = write!(body, "{}", humantime::format_rfc3339_millis(now));
    body.push_str(&state.hello_tail);
    json_response(StatusCode::OK, Bytes::from(body))
}

#[derive(Serialize)]
struct Me<'a> {
    #[serde(flatten)]
    identity: &'a Identity,
    worker: &'a str,
}

fn me<B>(req: &Request<B>, state: &AppState, now_unix: u64) -> Response<Full<Bytes>> {
    let Some(identity) = state.verified_identity(req, now_unix) else {
        let mut refused = json_response(
            StatusCode::UNAUTHORIZED,
            Bytes::from_static(br#"{"error":"unauthenticated"}"#),
        );
        refused.headers_mut().insert(WWW_AUTHENTICATE, CHALLENGE);
        return refused;
    };
    let me = Me {
        identity: &identity,
        worker: state.worker_id(),
    };
    match serde_json::to_vec(&me) {
        Ok(body) => {
            let mut response = json_response(StatusCode::OK, Bytes::from(body));
            response.headers_mut().insert(CACHE_CONTROL, NO_STORE);
            response
        }
        Err(error) => {
            tracing::error!(%error, "cannot serialise identity");
            json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(br#"{"error":"internal"}"#),
            )
        }
    }
}

fn health<B>(req: &Request<B>, state: &AppState, now_unix: u64) -> Response<Full<Bytes>> {
    if state.is_shutting_down() {
        return response(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            Bytes::from_static(b"shutting down"),
        );
    }
    match state.key_check_problem(req, now_unix) {
        None => response(StatusCode::OK, TEXT, Bytes::from_static(b"ok")),
        Some(problem) => {
            let mut refused = response(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                Bytes::from(format!("{problem}\n")),
            );
            // For the proxy's log: it reads the answer's head, not its body.
            if let Ok(reason) = HeaderValue::try_from(problem) {
                refused.headers_mut().insert(HEALTH_PROBLEM_HEADER, reason);
            }
            refused
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    response(status, JSON, body)
}

fn response(status: StatusCode, content_type: HeaderValue, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, content_type);
    // No content sniffing, no framing (clickjacking of Login and Logout), and no `Referer`
    // beyond this origin (the links out are to the IdP and avatars).
    headers.insert(X_CONTENT_TYPE_OPTIONS, NOSNIFF);
    headers.insert(X_FRAME_OPTIONS, DENY);
    headers.insert(REFERRER_POLICY, SAME_ORIGIN);
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::identity::sign_assertion;
    use http_body_util::BodyExt as _;

    const KEY: &[u8] = b"routes-test-key-routes-test-key-0123";

    fn state(key: Option<&[u8]>) -> AppState {
        AppState::new(AppSettings {
            worker_id: "w-\"1\"".into(),
            delay: Duration::ZERO,
            assertion_key: key.map(<[u8]>::to_vec),
            previous_assertion_keys: Vec::new(),
        })
    }

    fn get(path: &str) -> http::request::Builder {
        Request::get(path)
    }

    fn body(response: Response<Full<Bytes>>) -> String {
        let collected = ready_now(response.into_body().collect()).unwrap();
        String::from_utf8(collected.to_bytes().to_vec()).unwrap()
    }

    /// `Full` is ready immediately, so one poll with a no-op waker collects it.
    fn ready_now<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(output) => output,
            std::task::Poll::Pending => panic!("Full<Bytes> body was not ready"),
        }
    }

    fn alice() -> Identity {
        Identity {
            sub: "auth0|alice".into(),
            email: Some("alice@example.com".into()),
            name: Some("Alice <3".into()),
            picture: None,
        }
    }

    fn now_unix() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn signed(identity: &Identity, key: &[u8]) -> String {
        sign_assertion(identity, key, now_unix(), 60)
    }

    #[test]
    fn hello_is_json_with_message_timestamp_and_escaped_worker() {
        let state = state(None);
        let response = handle(&get("/api/hello").body(()).unwrap(), &state);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let json: serde_json::Value = serde_json::from_str(&body(response)).unwrap();
        assert_eq!(json["message"], HELLO_MESSAGE);
        assert_eq!(json["worker"], "w-\"1\"");
        let timestamp = json["timestamp"].as_str().unwrap();
        let parsed = humantime::parse_rfc3339(timestamp).unwrap();
        assert!(SystemTime::now().duration_since(parsed).unwrap() < Duration::from_secs(60));
        assert!(
            timestamp.ends_with('Z') && timestamp.len() == 24,
            "{timestamp}"
        );
        assert_eq!(json.as_object().unwrap().len(), 3);
    }

    #[test]
    fn hello_timestamp_uses_the_given_time() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let response = handle_at(&get("/api/hello").body(()).unwrap(), &state(None), at);
        assert!(body(response).contains(r#""timestamp":"2023-11-14T22:13:20.123Z""#));
    }

    #[test]
    fn home_is_guest_without_assertion_and_signed_in_with_one() {
        let state = state(Some(KEY));
        let guest = handle(&get("/").body(()).unwrap(), &state);
        assert_eq!(guest.status(), StatusCode::OK);
        assert_eq!(guest.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_ne!(guest.headers()[CACHE_CONTROL], "no-store");
        assert!(body(guest).contains("Welcome.... Guest!!!"));

        let req = get("/")
            .header(IDENTITY_HEADER, signed(&alice(), KEY))
            .body(())
            .unwrap();
        let response = handle(&req, &state);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        let text = body(response);
        assert!(
            text.contains("Welcome to this space... Alice &lt;3!"),
            "{text}"
        );
        assert!(!text.contains("Guest!!!"));
    }

    #[test]
    fn forwarded_user_headers_alone_are_never_trusted() {
        let state = state(Some(KEY));
        let req = get("/")
            .header("x-forwarded-user", "auth0|mallory")
            .header("x-forwarded-email", "mallory@example.com")
            .body(())
            .unwrap();
        assert!(body(handle(&req, &state)).contains("Welcome.... Guest!!!"));
        let req = get("/api/me")
            .header("x-forwarded-user", "auth0|mallory")
            .body(())
            .unwrap();
        assert_eq!(handle(&req, &state).status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn invalid_or_duplicated_assertions_mean_guest() {
        let state = state(Some(KEY));
        let forged = signed(&alice(), b"not-the-key-not-the-key-not-the-key!");
        let req = get("/api/me")
            .header(IDENTITY_HEADER, forged)
            .body(())
            .unwrap();
        assert_eq!(handle(&req, &state).status(), StatusCode::UNAUTHORIZED);

        let good = signed(&alice(), KEY);
        let req = get("/api/me")
            .header(IDENTITY_HEADER, good.clone())
            .header(IDENTITY_HEADER, good)
            .body(())
            .unwrap();
        assert_eq!(handle(&req, &state).status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn without_a_key_even_valid_assertions_mean_guest() {
        let state = state(None);
        let req = get("/api/me")
            .header(IDENTITY_HEADER, signed(&alice(), KEY))
            .body(())
            .unwrap();
        assert_eq!(handle(&req, &state).status(), StatusCode::UNAUTHORIZED);
    }

    /// During a key rotation, a proxy still signing with the key before it is believed; a key
    /// that is neither the current nor a previous one is not.
    #[test]
    fn assertions_signed_with_a_previous_key_pass_while_a_rotation_rolls_out() {
        const OLD: &[u8] = b"routes-test-old-key-routes-test-old-key";
        let state = AppState::new(AppSettings {
            assertion_key: Some(KEY.to_vec()),
            previous_assertion_keys: vec![OLD.to_vec()],
            ..AppSettings::default()
        });
        for (key, status) in [
            (KEY, StatusCode::OK),
            (OLD, StatusCode::OK),
            (
                &b"routes-test-other-key-routes-test-other"[..],
                StatusCode::UNAUTHORIZED,
            ),
        ] {
            let req = get("/api/me")
                .header(IDENTITY_HEADER, signed(&alice(), key))
                .body(())
                .unwrap();
            assert_eq!(handle(&req, &state).status(), status);
        }
    }

    #[test]
    fn me_is_401_without_and_the_identity_with_a_verified_assertion() {
        let state = state(Some(KEY));
        let response = handle(&get("/api/me").body(()).unwrap(), &state);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"custodia\""
        );
        assert_eq!(body(response), r#"{"error":"unauthenticated"}"#);

        let req = get("/api/me")
            .header(IDENTITY_HEADER, signed(&alice(), KEY))
            .body(())
            .unwrap();
        let response = handle(&req, &state);
        assert_eq!(response.status(), StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body(response)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "sub": "auth0|alice",
                "email": "alice@example.com",
                "name": "Alice <3",
                "worker": "w-\"1\"",
            })
        );
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let state = state(None);
        for path in ["/nope", "/api/hello/", "/api", "/healthz/x"] {
            let response = handle(&get(path).body(()).unwrap(), &state);
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(body(response), r#"{"error":"not found"}"#);
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let req = Request::builder()
                .method(method.clone())
                .uri("/api/hello")
                .body(())
                .unwrap();
            let response = handle(&req, &state);
            assert_eq!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method}"
            );
            assert_eq!(response.headers()[ALLOW], "GET, HEAD");
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        }
    }

    #[test]
    fn head_is_answered_like_get() {
        let state = state(None);
        let req = Request::head("/").body(()).unwrap();
        let response = handle(&req, &state);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    }

    #[test]
    fn query_strings_do_not_change_the_route() {
        let response = handle(&get("/api/hello?x=1").body(()).unwrap(), &state(None));
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn healthz_turns_503_once_shutdown_begins() {
        let state = state(None);
        let response = handle(&get("/healthz").body(()).unwrap(), &state);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response), "ok");
        state.begin_shutdown();
        let response = handle(&get("/healthz").body(()).unwrap(), &state);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn every_answer_forbids_sniffing_framing_and_outside_referers() {
        let state = state(Some(KEY));
        for path in ["/", "/api/hello", "/api/me", "/healthz", "/nowhere"] {
            let response = handle(&get(path).body(()).unwrap(), &state);
            let headers = response.headers();
            assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            assert_eq!(headers[X_FRAME_OPTIONS], "DENY", "{path}");
            assert_eq!(headers[REFERRER_POLICY], "same-origin", "{path}");
        }
    }

    #[test]
    fn healthz_fails_a_proxys_key_check_this_worker_cannot_verify() {
        use crate::identity::sign_key_check;
        let check = |state: &AppState, key: &[u8], at: u64| {
            let req = get("/healthz")
                .header(KEY_CHECK_HEADER, sign_key_check(key, at))
                .body(())
                .unwrap();
            handle(&req, state)
        };
        let other: &[u8] = b"another-key-another-key-0123456789";

        // The proxy's key, or one a rotation still accepts: healthy.
        assert_eq!(
            check(&state(Some(KEY)), KEY, now_unix()).status(),
            StatusCode::OK
        );
        let rotating = AppState::new(AppSettings {
            assertion_key: Some(other.to_vec()),
            previous_assertion_keys: vec![KEY.to_vec()],
            ..AppSettings::default()
        });
        assert_eq!(check(&rotating, KEY, now_unix()).status(), StatusCode::OK);
        // Signed with the previous key but too old: a clock problem, not another key.
        let stale = check(&rotating, KEY, now_unix() - 600);
        let reason = stale.headers()[HEALTH_PROBLEM_HEADER].to_str().unwrap();
        assert!(reason.contains("clock"), "{reason}");

        // Another key, no key, or a clock far from the proxy's: not, and the head says why.
        for (state, at, why) in [
            (state(Some(other)), now_unix(), "is not the proxy's"),
            (state(None), now_unix(), "no identity assertion key"),
            (state(Some(KEY)), now_unix() - 600, "clock"),
        ] {
            let response = check(&state, KEY, at);
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{why}");
            let reason = response.headers()[HEALTH_PROBLEM_HEADER].to_str().unwrap();
            assert!(reason.contains(why), "{reason}");
            assert!(body(response).contains(why));
        }

        // A check without one (a proxy with no logins) asks nothing of the key.
        let plain = handle(&get("/healthz").body(()).unwrap(), &state(None));
        assert_eq!(plain.status(), StatusCode::OK);
    }

    #[test]
    fn in_flight_guard_counts_and_settings_debug_hides_the_key() {
        let state = state(Some(KEY));
        {
            let _a = state.track_request();
            let _b = state.track_request();
            assert_eq!(state.in_flight(), 2);
        }
        assert_eq!(state.in_flight(), 0);
        let debug = format!("{state:?}");
        assert!(!debug.contains("routes-test-key"), "{debug}");
        assert!(debug.contains("36 bytes"), "{debug}");
    }
}
