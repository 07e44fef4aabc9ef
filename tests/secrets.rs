//! Secrets never leak: a full login → signed-in page → `/api/me` → logout run against the
//! certified npm `oidc-provider`, plus the error paths (a callback with a bad state, a replayed
//! code, tampered session and login cookies, a 502 with the worker down), then every byte the
//! run produced is searched for every secret it involved:
//!
//! - where: the proxy's stdout (access log) and stderr (diagnostics), the worker's output, every
//!   response the client got from the proxy (status, headers, body), and the admin `/metrics`,
//!   `/readyz` and `/healthz` texts;
//! - what: the session cookie value (and each chunk of a chunked one), the login-state cookie,
//!   the authorization codes, the access, ID and refresh tokens the IdP issued (from its token
//!   log), the PKCE verifier, the client secret, `APP_SECRET_KEY` and the previous key, and the
//!   identity-assertion key.
//!
//! Allowed, because that is how they travel: a cookie's value in the `Set-Cookie` that sets that
//! cookie, and the ID token as `id_token_hint` in the `Location` of `/logout` (OIDC RP-initiated
//! logout sends it to the IdP through the browser).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;

use custodia_proxy::auth::{
    open_login_state, open_session, seal_session, CookieSettings, SecretKeys, Session,
};
use support::edge_auth::{
    is_login_cookie, is_session_cookie, session_set_cookies, AuthConfig, AuthStack, APP_SECRET_KEY,
    ASSERTION_KEY, OTHER_APP_SECRET_KEY,
};
use support::http::{query_param, Reply};
use support::oidc_provider::{confirm_logout, DEMO_SUB};
use support::process::eventually_async;

const PATIENCE: Duration = Duration::from_secs(20);

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// How a secret may legitimately appear in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// Nowhere.
    None,
    /// As the value of a `Set-Cookie` for a cookie with this kind of name.
    SessionCookie,
    LoginCookie,
    /// As `id_token_hint` in the `Location` of `/logout`.
    LogoutHint,
}

struct Secret {
    what: String,
    value: String,
    carrier: Carrier,
}

/// One response the client saw, flattened to text.
struct Seen {
    what: String,
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: String,
}

#[derive(Default)]
struct Evidence {
    secrets: Vec<Secret>,
    responses: Vec<Seen>,
    /// Requests to the public listener (each gets an access-log line).
    public_requests: usize,
}

impl Evidence {
    fn secret(&mut self, what: &str, value: &str, carrier: Carrier) {
        assert!(
            value.len() >= 16,
            "{what} is too short to search for meaningfully: {value:?}"
        );
        if !self.secrets.iter().any(|s| s.value == value) {
            self.secrets.push(Secret {
                what: what.to_string(),
                value: value.to_string(),
                carrier,
            });
        }
    }

    /// Records a response from the proxy's public listener.
    fn reply(&mut self, what: &str, reply: &Reply) {
        self.public_requests += 1;
        self.responses.push(Seen {
            what: format!("{what} ({})", reply.url),
            status: reply.status,
            headers: reply
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: reply.body.clone(),
        });
    }

    /// Records an admin-listener text.
    fn admin_text(&mut self, what: &str, body: String) {
        self.responses.push(Seen {
            what: what.to_string(),
            status: StatusCode::OK,
            headers: Vec::new(),
            body,
        });
    }

    /// Every place a secret appears where it must not, as messages.
    fn leaks(&self, output: &str) -> Vec<String> {
        let mut leaks = Vec::new();
        for secret in &self.secrets {
            if let Some(line) = output.lines().find(|l| l.contains(&secret.value)) {
                leaks.push(format!(
                    "{} appears in the proxy/worker output: {line}",
                    secret.what
                ));
            }
            for seen in &self.responses {
                if seen.status.as_str().contains(&secret.value) || seen.body.contains(&secret.value)
                {
                    leaks.push(format!(
                        "{} appears in the body of {}: {}",
                        secret.what, seen.what, seen.body
                    ));
                }
                for (name, value) in &seen.headers {
                    if value.contains(&secret.value) && !allowed(secret, &seen.what, name, value) {
                        leaks.push(format!(
                            "{} appears in header {name} of {}: {value}",
                            secret.what, seen.what
                        ));
                    }
                }
            }
        }
        leaks
    }
}

/// Whether `secret` in header `name: value` of response `what` is how it legitimately travels.
fn allowed(secret: &Secret, what: &str, name: &str, value: &str) -> bool {
    let set_cookie = || {
        let pair = value.split(';').next().unwrap_or_default();
        pair.split_once('=')
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
    };
    match secret.carrier {
        Carrier::None => false,
        Carrier::SessionCookie | Carrier::LoginCookie if name == "set-cookie" => set_cookie()
            .is_some_and(|(cookie, v)| {
                v == secret.value
                    && if secret.carrier == Carrier::SessionCookie {
                        is_session_cookie(&cookie)
                    } else {
                        is_login_cookie(&cookie)
                    }
            }),
        Carrier::LogoutHint => {
            name == "location"
                && what.starts_with("GET /logout")
                && value.contains(&format!("id_token_hint={}", secret.value))
        }
        _ => false,
    }
}

/// `(name, value)` of each `Set-Cookie` line that sets (not deletes) a cookie.
fn cookie_pairs(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter(|l| !l.contains("Max-Age=0"))
        .filter_map(|l| {
            let (name, value) = l.split(';').next()?.split_once('=')?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

/// Records the tokens of every token endpoint response so far.
fn record_tokens(stack: &AuthStack, evidence: &mut Evidence) {
    for response in stack.idp().token_responses() {
        for (field, what) in [
            ("access_token", "the access token"),
            ("id_token", "the ID token"),
            ("refresh_token", "the refresh token"),
        ] {
            if let Some(token) = response[field].as_str() {
                let carrier = if field == "id_token" {
                    Carrier::LogoutHint
                } else {
                    Carrier::None
                };
                evidence.secret(what, token, carrier);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_error_pages_or_metrics() {
    // Debug logging everywhere: what an operator chasing a problem turns on. (At `trace`,
    // Pingora's own request-header dump shows cookies and the callback's code.)
    let mut config = AuthConfig::new().capture_output().rust_log("debug");
    config.app_secret_key_previous = Some(OTHER_APP_SECRET_KEY.to_string());
    let mut stack = config.start().await;
    let keys = SecretKeys::from_secrets(APP_SECRET_KEY, &[]).unwrap();
    let mut evidence = Evidence::default();
    let client_secret = stack.idp().client("custodia-basic").client_secret.clone();
    evidence.secret("the client secret", &client_secret, Carrier::None);
    evidence.secret("APP_SECRET_KEY", APP_SECRET_KEY, Carrier::None);
    evidence.secret(
        "the previous APP_SECRET_KEY",
        OTHER_APP_SECRET_KEY,
        Carrier::None,
    );
    evidence.secret("CUSTODIA_ASSERTION_KEY", ASSERTION_KEY, Carrier::None);

    // --- Login: /login → the IdP's form → /callback.
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, Some("/api/me")).await;
    evidence.reply("GET /login", &pending.reply);
    for (_, value) in &pending.login_cookies {
        evidence.secret("the login-state cookie", value, Carrier::LoginCookie);
        let login = open_login_state(&keys, value, &pending.state, now_unix()).unwrap();
        evidence.secret("the PKCE verifier", &login.pkce_verifier, Carrier::None);
    }
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    let code = query_param(&callback, "code").expect("a code in the callback");
    evidence.secret("the authorization code", &code, Carrier::None);
    let signed_in = browser.get_html(callback.as_str()).await;
    evidence.reply("GET /callback", &signed_in);
    assert_eq!(
        signed_in.status,
        StatusCode::FOUND,
        "{}",
        signed_in.describe()
    );
    let session_cookies = session_set_cookies(&signed_in);
    assert!(!session_cookies.is_empty(), "{}", signed_in.describe());
    for cookie in &session_cookies {
        evidence.secret("the session cookie", &cookie.value, Carrier::SessionCookie);
    }
    let session = open_session(&keys, &session_cookies[0].value, now_unix()).unwrap();
    assert_eq!(session.sub, DEMO_SUB);
    record_tokens(&stack, &mut evidence);
    assert!(
        evidence
            .secrets
            .iter()
            .any(|s| s.what == "the access token"),
        "the IdP's token log has the access token: {:?}",
        stack.idp().token_responses()
    );

    // --- Signed in: the home page and /api/me.
    let home = browser.get_html("/").await;
    evidence.reply("GET / signed in", &home);
    assert_eq!(home.status, StatusCode::OK, "{}", home.describe());
    let me = browser.get_json("/api/me").await;
    evidence.reply("GET /api/me signed in", &me);
    assert_eq!(me.status, StatusCode::OK, "{}", me.describe());
    assert_eq!(me.json()["sub"], DEMO_SUB);

    // --- A session too big for one cookie, in chunks.
    // (Claims too large for one cookie, e.g. a long picture URL; they are no secret, the
    // sealed chunks are. They stay small enough for the identity assertion the worker accepts,
    // custodia_identity::MAX_TOKEN_LEN.)
    let big = Session {
        picture: Some(format!("https://example.test/{}", "0123456789".repeat(450))),
        ..session.clone()
    };
    let sealed = seal_session(&keys, &big);
    let lines = CookieSettings { secure: false }
        .set_session_cookies(&sealed, Duration::from_secs(3600))
        .unwrap();
    let chunks = cookie_pairs(&lines);
    assert!(chunks.len() >= 2, "a chunked session: {lines:?}");
    let chunked = stack.browser();
    for (name, value) in &chunks {
        evidence.secret(
            &format!("session cookie chunk {name}"),
            value,
            Carrier::SessionCookie,
        );
        chunked.set_cookie(name, value);
    }
    let me_chunked = chunked.get_json("/api/me").await;
    evidence.reply("GET /api/me with a chunked session", &me_chunked);
    assert_eq!(
        me_chunked.status,
        StatusCode::OK,
        "{}",
        me_chunked.describe()
    );

    // --- Error paths at the callback.
    // A second login, whose (valid, unused) code comes back with a wrong state.
    let second = stack.browser();
    let pending2 = stack.begin_login(&second, None).await;
    evidence.reply("GET /login (second)", &pending2.reply);
    for (_, value) in &pending2.login_cookies {
        evidence.secret("the second login-state cookie", value, Carrier::LoginCookie);
        let login = open_login_state(&keys, value, &pending2.state, now_unix()).unwrap();
        evidence.secret(
            "the second PKCE verifier",
            &login.pkce_verifier,
            Carrier::None,
        );
    }
    let callback2 = stack.authorize_at_idp(&pending2.authorize_url).await;
    let code2 = query_param(&callback2, "code").expect("a code in the second callback");
    evidence.secret("the second authorization code", &code2, Carrier::None);
    let bad_state = second
        .get_html(&format!(
            "/callback?code={code2}&state=not-the-state-of-this-login"
        ))
        .await;
    evidence.reply("GET /callback with a bad state", &bad_state);
    assert_eq!(
        bad_state.status,
        StatusCode::BAD_REQUEST,
        "{}",
        bad_state.describe()
    );
    // A tampered login cookie with the right state.
    let tampered_login = stack.browser();
    for (name, value) in &pending2.login_cookies {
        tampered_login.set_cookie(name, &flip_middle(value));
    }
    let bad_login = tampered_login
        .get_html(&format!("/callback?code={code2}&state={}", pending2.state))
        .await;
    evidence.reply("GET /callback with a tampered login cookie", &bad_login);
    assert_eq!(
        bad_login.status,
        StatusCode::BAD_REQUEST,
        "{}",
        bad_login.describe()
    );
    // The first (already redeemed) code with the second login's state: the IdP refuses it at the
    // token endpoint.
    let replayed = second
        .get_html(&format!("/callback?code={code}&state={}", pending2.state))
        .await;
    evidence.reply("GET /callback with a redeemed code", &replayed);
    assert!(
        replayed.status.is_client_error() || replayed.status.is_server_error(),
        "{}",
        replayed.describe()
    );
    record_tokens(&stack, &mut evidence);
    assert!(
        stack
            .idp()
            .token_responses()
            .iter()
            .any(|r| r["error"].is_string()),
        "the replayed code reached the token endpoint and was refused: {:?}",
        stack.idp().token_responses()
    );

    // --- A tampered session cookie.
    let tampered = stack.browser();
    tampered.set_cookie(
        &session_cookies[0].name,
        &flip_middle(&session_cookies[0].value),
    );
    let me_tampered = tampered.get_json("/api/me").await;
    evidence.reply("GET /api/me with a tampered session", &me_tampered);
    assert_eq!(
        me_tampered.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        me_tampered.describe()
    );
    let home_tampered = tampered.get_html("/").await;
    evidence.reply("GET / with a tampered session", &home_tampered);
    assert_eq!(home_tampered.status, StatusCode::OK);

    // --- Logout, at the proxy and at the IdP.
    let logout = browser.get_html("/logout").await;
    evidence.reply("GET /logout", &logout);
    assert_eq!(logout.status, StatusCode::FOUND, "{}", logout.describe());
    confirm_logout(logout.redirect_target().as_str())
        .await
        .unwrap_or_else(|e| panic!("the IdP refused the logout: {e:?}"));
    let me_after = browser.get_json("/api/me").await;
    evidence.reply("GET /api/me after logout", &me_after);
    assert_eq!(me_after.status, StatusCode::UNAUTHORIZED);

    // --- The worker goes down: a signed-in request gets the proxy's error page (502).
    {
        let worker = stack.workers.first_mut().expect("a worker");
        worker.process.child.kill().unwrap();
        worker.process.child.wait().unwrap();
    }
    let down = stack.browser();
    for cookie in &session_cookies {
        down.set_cookie(&cookie.name, &cookie.value);
    }
    let mut tries = 0;
    let failed = eventually_async("a 502 with the worker down", PATIENCE, || {
        tries += 1;
        let request = down.get_html("/api/me");
        async move {
            let reply = request.await;
            reply.status.is_server_error().then_some(reply)
        }
    })
    .await;
    evidence.public_requests += tries - 1; // the attempts before the error page
    evidence.reply("GET /api/me with the worker down", &failed);
    // 502 for the failed attempt; 503 once health checks have taken the worker out.
    assert!(
        matches!(failed.status.as_u16(), 502 | 503),
        "{}",
        failed.describe()
    );

    // --- The admin listener.
    for path in ["/metrics", "/readyz", "/healthz"] {
        let body = reqwest::get(stack.proxy().admin_url(path))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        evidence.admin_text(&format!("admin {path}"), body);
    }

    // Every request has its access-log line before the output is searched.
    let requests = evidence.public_requests;
    let output = eventually_async("an access-log line per request", PATIENCE, || {
        let output = stack.output();
        let lines = output
            .lines()
            .filter(|l| l.starts_with('{') && l.contains("\"request_id\""))
            .count();
        async move { (lines >= requests).then_some(output) }
    })
    .await;
    // Not vacuous: the output has the sign-in, the failed callbacks and the backend failure.
    for expected in [
        "signed in",
        "callback with an invalid login state",
        "sign-in failed at the code exchange",
        "/api/me",
    ] {
        assert!(
            output.contains(expected),
            "the output mentions {expected:?}:\n{output}"
        );
    }
    assert!(
        evidence
            .responses
            .iter()
            .any(|r| r.body.contains("custodia_auth_session_checks_total")),
        "the metrics were scraped"
    );

    let leaks = evidence.leaks(&output);
    assert!(
        leaks.is_empty(),
        "{} leak(s) of {} secrets:\n{}",
        leaks.len(),
        evidence.secrets.len(),
        leaks.join("\n")
    );
}

/// `value` with its middle character changed (still cookie-safe).
fn flip_middle(value: &str) -> String {
    let mut bytes = value.as_bytes().to_vec();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

/// At `debug` and `trace` (what an operator chasing a problem turns on), Pingora dumps whole
/// request and response heads: none of them reaches the output. A request with an
/// `Authorization` bearer token, a cookie and a query string goes both ways to the worker
/// (a `GET` by the fast path, a `POST` through Pingora's proxy) and leaves none of the three in
/// what the proxy printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingora_header_dumps_never_reach_the_logs_at_debug_or_trace() {
    use support::custodia::{client, upstream_section, Proxy, Worker};
    use support::process::free_addr;

    const BEARER: &str = "bearer-secret-5d0c7a1e9b";
    const COOKIE: &str = "cookie-secret-81f2e6d4a3";
    const QUERY: &str = "query-secret-c49a0b7e15";
    let worker = Worker::start("w");
    for level in ["debug", "trace"] {
        let proxy = Proxy::start_at_capturing(
            free_addr(),
            &upstream_section("least_conn", &[(worker.addr, 1)]),
            &[("RUST_LOG", level)],
        );
        let http = client();
        let url = proxy.url(&format!("/api/hello?token={QUERY}"));
        let get = http
            .get(&url)
            .header("authorization", format!("Bearer {BEARER}"))
            .header("cookie", format!("sid={COOKIE}"));
        let post = http
            .post(&url)
            .header("authorization", format!("Bearer {BEARER}"))
            .header("cookie", format!("sid={COOKIE}"))
            .body("a body");
        for request in [get, post] {
            let reply = request.send().await.unwrap();
            assert!(reply.status().as_u16() < 500, "{level}: {}", reply.status());
        }
        let output = eventually_async("both access-log lines", PATIENCE, || {
            let output = proxy.output();
            let lines = output
                .lines()
                .filter(|l| l.starts_with('{') && l.contains("/api/hello"))
                .count();
            async move { (lines >= 2).then_some(output) }
        })
        .await;
        // Not vacuous: the level let Pingora's own debug lines through.
        assert!(
            output.contains("DEBUG pingora"),
            "{level}: Pingora's debug events are printed:\n{output}"
        );
        for (what, secret) in [
            ("the bearer token", BEARER),
            ("the cookie", COOKIE),
            ("the query string", QUERY),
        ] {
            if let Some(line) = output.lines().find(|l| l.contains(secret)) {
                panic!("RUST_LOG={level}: {what} reached the output: {line}");
            }
        }
    }
}
