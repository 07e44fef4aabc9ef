//! Edge authentication, negative cases, each its own test: forged, damaged, expired and
//! wrong-key session cookies; callback attacks (state, login cookie, replayed or injected codes,
//! nonce); IdP errors; email policy; open redirects; spoofed and smuggled identity headers;
//! policy bypass by path tricks; untrusted forwarding headers. The IdP is the certified npm
//! `oidc-provider`; the upstream is a real worker, or the echo server when the test must see
//! exactly what the proxy forwarded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{StatusCode, Url};

use support::edge_auth::{
    is_login_cookie, session_cookies, session_set_cookies, AuthConfig, AuthStack, Upstream,
    APP_SECRET_KEY, ASSERTION_KEY, OTHER_APP_SECRET_KEY,
};
use support::http::{query_param, raw_request, CookieClient, Reply, ACCEPT_HTML, ACCEPT_JSON};
use support::oidc_provider::{DEMO_EMAIL, DEMO_SUB};
use support::process::eventually_async;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A stack and a browser signed in through it; returns the session cookies too.
async fn signed_in(config: AuthConfig) -> (AuthStack, CookieClient, Vec<(String, String)>) {
    let stack = config.start().await;
    let browser = stack.browser();
    stack.login(&browser, None).await;
    let cookies = session_cookies(&browser);
    assert!(!cookies.is_empty(), "a session cookie after login");
    (stack, browser, cookies)
}

/// A fresh browser holding exactly `cookies`.
fn browser_with(stack: &AuthStack, cookies: &[(String, String)]) -> CookieClient {
    let browser = stack.browser();
    browser.import(cookies);
    browser
}

/// `value` with the character in the middle replaced by another base64url character (a
/// middle character carries six full bits, so the decoded bytes change).
fn flip_middle(value: &str) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    let at = chars.len() / 2;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

/// The callback reply is a clean refusal: a 4xx (never 5xx), no session cookie set, and the
/// browser is still a guest afterwards.
async fn assert_refused(stack: &AuthStack, browser: &CookieClient, reply: &Reply, what: &str) {
    assert!(
        reply.status.is_client_error(),
        "{what}: a 4xx answer, got {}",
        reply.describe()
    );
    assert!(
        session_set_cookies(reply).is_empty(),
        "{what}: no session cookie is set: {:?}",
        reply.set_cookies()
    );
    stack.assert_guest(browser, what).await;
}

/// `url` with query parameter `name` set to `value` (or removed when `None`).
fn with_param(url: &Url, name: &str, value: Option<&str>) -> Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut out = url.clone();
    {
        let mut query = out.query_pairs_mut();
        query.clear();
        for (k, v) in &pairs {
            query.append_pair(k, v);
        }
        if let Some(value) = value {
            query.append_pair(name, value);
        }
    }
    out
}

// ---------------------------------------------------------------- session cookies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_session_cookie_is_no_session() {
    let (stack, _browser, cookies) = signed_in(AuthConfig::new()).await;
    let valid_before = stack.session_checks("valid").await;
    let invalid_before = stack.session_checks("invalid").await;
    for (i, (name, value)) in cookies.iter().enumerate() {
        let mut tampered = cookies.clone();
        tampered[i] = (name.clone(), flip_middle(value));
        let browser = browser_with(&stack, &tampered);
        stack
            .assert_guest(&browser, &format!("one character of {name} changed"))
            .await;
    }
    assert_eq!(
        stack.session_checks("valid").await,
        valid_before,
        "no tampered cookie was counted as a valid session"
    );
    assert!(
        stack.session_checks("invalid").await > invalid_before,
        "tampered cookies are counted as invalid sessions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_session_cookie_is_no_session() {
    let (stack, _browser, cookies) = signed_in(AuthConfig::new()).await;
    let (name, value) = cookies[0].clone();
    for cut in [value.len() - 1, value.len() / 2, 8, 0] {
        let mut truncated = cookies.clone();
        truncated[0] = (name.clone(), value[..cut].to_string());
        let browser = browser_with(&stack, &truncated);
        stack
            .assert_guest(&browser, &format!("{name} cut to {cut} characters"))
            .await;
    }
    if cookies.len() > 1 {
        // A chunked session with its last chunk missing.
        let browser = browser_with(&stack, &cookies[..cookies.len() - 1]);
        stack
            .assert_guest(&browser, "a missing session chunk")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_session_cookies_are_no_session() {
    let stack = AuthConfig::new().start().await;
    let big = "A".repeat(6000);
    for value in [
        "",
        "x",
        "%%%",
        "not.a.session",
        "eyJhbGciOiJub25lIn0.e30.",
        &big,
    ] {
        let browser = stack.browser();
        browser.set_cookie("custodia_session", value);
        let shown: String = value.chars().take(20).collect();
        stack
            .assert_guest(&browser, &format!("custodia_session={shown}…"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_session_cookie_is_no_session() {
    // Expiry is in whole seconds (a session lives ttl − 1 to ttl s): 5 s leaves the login and
    // the first check time on a loaded machine.
    let (stack, browser, cookies) = signed_in(AuthConfig::new().session_ttl("5s")).await;
    stack.assert_signed_in(&browser).await;
    // Replay the very cookie from the login (a browser would drop it; an attacker would not),
    // so a refreshed cookie cannot hide a missing server-side expiry check.
    eventually_async(
        "the session to expire (session_ttl = 5s)",
        Duration::from_secs(20),
        || {
            let replay = browser_with(&stack, &cookies);
            async move {
                let me = replay.get_json("/api/me").await;
                (me.status == StatusCode::UNAUTHORIZED).then_some(())
            }
        },
    )
    .await;
    let replay = browser_with(&stack, &cookies);
    stack
        .assert_guest(&replay, "an expired session cookie")
        .await;
    assert!(
        stack.session_checks("expired").await >= 1.0,
        "the refusal is counted as an expired session (the seal still opened)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_sealed_with_another_key_is_no_session() {
    let (mut stack, _browser, cookies) = signed_in(AuthConfig::new()).await;
    stack
        .restart_proxy(|config| {
            config.app_secret_key = OTHER_APP_SECRET_KEY.to_string();
            config.app_secret_key_previous = None;
        })
        .await;
    let replay = browser_with(&stack, &cookies);
    stack
        .assert_guest(
            &replay,
            "a session sealed under a key the proxy no longer has",
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_sealed_with_a_previous_key_is_still_valid() {
    let (mut stack, _browser, cookies) = signed_in(AuthConfig::new()).await;
    stack
        .restart_proxy(|config| {
            config.app_secret_key = OTHER_APP_SECRET_KEY.to_string();
            config.app_secret_key_previous = Some(APP_SECRET_KEY.to_string());
        })
        .await;
    let replay = browser_with(&stack, &cookies);
    stack.assert_signed_in(&replay).await;
    // New sessions are sealed with the new key and work too.
    let fresh = stack.browser();
    stack.login(&fresh, None).await;
    stack.assert_signed_in(&fresh).await;
}

// ---------------------------------------------------------------- the callback

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_mismatch_is_400() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    let forged = with_param(&callback, "state", Some(&format!("{}x", pending.state)));
    let reply = browser.get_html(forged.as_str()).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "{}",
        reply.describe()
    );
    assert!(
        reply.content_type().starts_with("text/html"),
        "an HTML page for browsers: {}",
        reply.describe()
    );
    assert_refused(&stack, &browser, &reply, "a state that matches no login").await;

    // Without any state at all.
    let stateless = with_param(&callback, "state", None);
    let reply = browser.get_json(stateless.as_str()).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "{}",
        reply.describe()
    );
    assert!(
        reply.content_type().starts_with("application/json"),
        "JSON for Accept: application/json: {}",
        reply.describe()
    );
    reply.json();
    assert_refused(&stack, &browser, &reply, "a callback without state").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_login_cookie_is_400() {
    let stack = AuthConfig::new().start().await;
    let started_here = stack.browser();
    let pending = stack.begin_login(&started_here, None).await;
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    // The callback arrives in a browser that never visited /login (login CSRF).
    let elsewhere = stack.browser();
    let reply = elsewhere.get_html(callback.as_str()).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "{}",
        reply.describe()
    );
    assert_refused(
        &stack,
        &elsewhere,
        &reply,
        "a callback without the login cookie",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_login_cookie_is_refused() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    for (name, value) in &pending.login_cookies {
        browser.set_cookie(name, &flip_middle(value));
    }
    let reply = browser.get_html(callback.as_str()).await;
    assert_refused(&stack, &browser, &reply, "a tampered login cookie").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_code_is_refused() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    let first = browser.get_html(callback.as_str()).await;
    assert_eq!(
        first.status,
        StatusCode::FOUND,
        "first use: {}",
        first.describe()
    );
    assert!(!session_set_cookies(&first).is_empty());

    // The same callback again, with the login cookie as it was (a captured request replayed).
    let attacker = stack.browser();
    attacker.import(&pending.login_cookies);
    let replay = attacker.get_html(callback.as_str()).await;
    assert_refused(&stack, &attacker, &replay, "a replayed authorization code").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_from_another_login_is_refused() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let login_a = stack.begin_login(&browser, None).await;
    let login_b = stack.begin_login(&browser, None).await;
    let callback_a = stack.authorize_at_idp(&login_a.authorize_url).await;
    // A's code delivered with B's state (and B's cookie, which the browser holds): the PKCE
    // verifier and nonce belong to B.
    let injected = with_param(&callback_a, "state", Some(&login_b.state));
    let reply = browser.get_html(injected.as_str()).await;
    assert_refused(&stack, &browser, &reply, "a code issued for another login").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_mismatch_is_refused() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    // The authorization request is altered on its way to the IdP: same state and PKCE
    // challenge, another nonce. The code exchange succeeds; the ID token's nonce is wrong.
    let altered = with_param(
        &pending.authorize_url,
        "nonce",
        Some("attacker-chosen-nonce-0123456789"),
    );
    let callback = stack.authorize_at_idp(&altered).await;
    let reply = browser.get_html(callback.as_str()).await;
    assert_refused(&stack, &browser, &reply, "an ID token with another nonce").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_token_without_nonce_is_refused() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    let altered = with_param(&pending.authorize_url, "nonce", None);
    let callback = stack.authorize_at_idp(&altered).await;
    let reply = browser.get_html(callback.as_str()).await;
    assert_refused(&stack, &browser, &reply, "an ID token without a nonce").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_error_access_denied_is_a_4xx_page() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    let script = "<script>alert(1)</script>";
    let mut url = browser.url("/callback");
    url.query_pairs_mut()
        .append_pair("error", "access_denied")
        .append_pair("error_description", &format!("User cancelled {script}"))
        .append_pair("state", &pending.state);
    let reply = browser.get_html(url.as_str()).await;
    assert!(
        reply.content_type().starts_with("text/html"),
        "a page for browsers: {}",
        reply.describe()
    );
    assert!(
        !reply.body.contains(script),
        "the IdP's error_description is escaped, not reflected: {}",
        reply.describe()
    );
    assert_refused(&stack, &browser, &reply, "?error=access_denied").await;

    // The same for an API client, and without a state.
    let mut url = browser.url("/callback");
    url.query_pairs_mut().append_pair("error", "access_denied");
    let reply = browser.get_json(url.as_str()).await;
    assert!(
        reply.content_type().starts_with("application/json"),
        "JSON for Accept: application/json: {}",
        reply.describe()
    );
    reply.json();
    assert_refused(
        &stack,
        &browser,
        &reply,
        "?error=access_denied without state",
    )
    .await;
}

/// Anyone can link a browser to `/callback?error=…&error_description=…`: the text is shown only
/// for a sign-in this browser started, and never reaches the log as lines of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_idp_error_shows_no_text_and_forges_no_log_lines() {
    let stack = AuthConfig::new().capture_output().start().await;
    let browser = stack.browser();
    let words = "Your account is locked, call 555-0100";
    let mut url = browser.url("/callback");
    url.query_pairs_mut()
        .append_pair("error", "access_denied\r\nFORGED error line")
        .append_pair(
            "error_description",
            &format!("{words}\n2026-01-01T00:00:00Z INFO forged"),
        )
        .append_pair("state", "not-a-login-of-this-browser");
    let reply = browser.get_html(url.as_str()).await;
    assert_refused(&stack, &browser, &reply, "a crafted ?error=").await;
    assert!(!reply.body.contains("555-0100"), "{}", reply.describe());

    // A sign-in this browser started: the IdP's words are shown (escaped).
    let pending = stack.begin_login(&browser, None).await;
    let mut url = browser.url("/callback");
    url.query_pairs_mut()
        .append_pair("error", "access_denied")
        .append_pair("error_description", words)
        .append_pair("state", &pending.state);
    let reply = browser.get_html(url.as_str()).await;
    assert!(reply.body.contains("555-0100"), "{}", reply.describe());

    let output = stack.output();
    assert!(output.contains("FORGED"), "the error is logged: {output}");
    for line in output.lines() {
        assert!(
            !line.starts_with("FORGED") && !line.starts_with("2026-01-01T00:00:00Z INFO forged"),
            "a line of the client's making: {line:?}"
        );
    }
}

// ---------------------------------------------------------------- who may sign in

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_email_is_403() {
    let stack = AuthConfig::new()
        .allowed_emails(&["someone@else.test"])
        .start()
        .await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    let reply = browser.get_html(callback.as_str()).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.describe());
    assert_refused(&stack, &browser, &reply, "an email not in allowed_emails").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_domain_is_403() {
    let stack = AuthConfig::new()
        .allowed_domains(&["else.test"])
        .start()
        .await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, None).await;
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    let reply = browser.get_html(callback.as_str()).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.describe());
    assert_refused(&stack, &browser, &reply, "an email outside allowed_domains").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_email_and_domain_let_the_user_in() {
    for config in [
        AuthConfig::new().allowed_emails(&["someone@else.test", DEMO_EMAIL]),
        AuthConfig::new().allowed_domains(&["example.test"]),
    ] {
        let stack = config.start().await;
        let browser = stack.browser();
        stack.login(&browser, None).await;
        stack.assert_signed_in(&browser).await;
    }
}

/// Allow-lists hold for sessions too, not just for sign-ins: a reload that drops someone ends
/// their session at once, rather than when it expires hours later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_drops_a_user_from_the_lists_ends_their_session() {
    let (mut stack, browser, _) =
        signed_in(AuthConfig::new().allowed_domains(&["example.test"])).await;
    stack.assert_signed_in(&browser).await;

    stack.config.allowed_domains = vec!["else.test".to_string()];
    stack.reload_with(&stack.upstreams(), false);
    eventually_async(
        "the reloaded lists to end the session",
        Duration::from_secs(10),
        || async {
            (browser.get_json("/api/me").await.status == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
    stack
        .assert_guest(&browser, "dropped from allowed_domains")
        .await;
    assert!(stack.session_checks("not_allowed").await >= 1.0);

    // Allowed again: the same cookie works again (nothing about it was wrong).
    stack.config.allowed_domains = vec!["example.test".to_string()];
    stack.reload_with(&stack.upstreams(), false);
    eventually_async(
        "the session to be admitted again",
        Duration::from_secs(10),
        || async { (browser.get_json("/api/me").await.status == StatusCode::OK).then_some(()) },
    )
    .await;
}

// ---------------------------------------------------------------- abandoned logins

/// Every `/login` leaves a login cookie for ten minutes; a browser that starts many without
/// finishing them keeps only the latest few, so its `Cookie` header never grows too large
/// for its next request (which would be a 431 on every page, `/login` included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_logins_keep_only_the_latest_few_login_cookies() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    for _ in 0..12 {
        stack.begin_login(&browser, None).await;
    }
    let held: Vec<String> = browser
        .cookies()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| is_login_cookie(name))
        .collect();
    assert_eq!(held.len(), 4, "login cookies held: {held:?}");
    // The latest one still completes.
    let pending = stack.begin_login(&browser, None).await;
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    let reply = browser.get_html(callback.as_str()).await;
    assert_eq!(reply.status, StatusCode::FOUND, "{}", reply.describe());
    stack.assert_signed_in(&browser).await;
}

// ---------------------------------------------------------------- open redirects

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_redirect_forms_of_rd_end_at_home() {
    let stack = AuthConfig::new().start().await;
    let home = stack.url("/");
    let origin = Url::parse(&home).unwrap();

    // Control: a same-origin path is honoured.
    let browser = stack.browser();
    let reply = stack.login(&browser, Some("/deep/page?x=1")).await;
    assert_eq!(
        reply.redirect_target().as_str(),
        stack.url("/deep/page?x=1")
    );

    // (rd, must it be exactly `/`?) — every form must at least stay on this origin.
    let forms: &[(&str, bool)] = &[
        ("//evil.com", true),
        ("/\\evil.com", true),
        ("https://evil.com", true),
        ("/%2f%2fevil.com", true),
        ("/%5cevil.com", true),
        ("javascript:alert(1)", true),
        ("\\\\evil.com", true),
        ("///evil.com", true),
        ("/\\/evil.com", true),
        ("/\t/evil.com", true),
        ("/%09/evil.com", true),
        ("http:evil.com", true),
        ("HTTPS://evil.com", true),
        ("%2f%2fevil.com", true),
        ("/%2F%2Fevil.com", true),
        ("evil.com", true),
        ("data:text/html,<script>alert(1)</script>", true),
        ("/.//evil.com", false),
        ("/%2e/%2fevil.com", false),
    ];
    let mut failures = Vec::new();
    for (rd, strict) in forms {
        let browser = stack.browser();
        let pending = stack.begin_login(&browser, Some(rd)).await;
        let callback = stack.authorize_at_idp(&pending.authorize_url).await;
        let reply = browser.get_html(callback.as_str()).await;
        if reply.status != StatusCode::FOUND {
            failures.push(format!("rd={rd:?}: callback {}", reply.describe()));
            continue;
        }
        let location = reply.location().unwrap_or_default();
        // Resolve as a browser would (WHATWG URL parsing: backslashes, tabs…).
        let target = origin.join(&location);
        let off_site = match &target {
            Ok(target) => target.origin() != origin.origin(),
            Err(_) => true,
        };
        if off_site {
            failures.push(format!(
                "rd={rd:?}: OPEN REDIRECT, Location {location:?} → {target:?}"
            ));
        } else if *strict && target.as_ref().map(|t| t.as_str()) != Ok(home.as_str()) {
            failures.push(format!(
                "rd={rd:?}: Location {location:?} stays on-site but is not /"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "rd values that did not end at /:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------- identity headers

const SPOOFED: &[(&str, &str)] = &[
    ("X-Forwarded-User", "admin"),
    ("x-forwarded-user", "root"),
    ("X-Forwarded-Email", "admin@evil.test"),
    ("X-FORWARDED-EMAIL", "root@evil.test"),
    ("X-Custodia-Identity", "forged.assertion.token"),
    // CGI-style servers read `_` as `-`.
    ("X_Forwarded_User", "underscore"),
    ("Remote-User", "admin"),
];

/// Identity headers that must never arrive from the client (names as the echo server shows
/// them, lower-cased).
const CLIENT_ONLY: &[&str] = &["x_forwarded_user", "remote-user"];
/// The headers the proxy sets itself with a session, and only then.
const PROXY_SET: &[&str] = &[
    "x-forwarded-user",
    "x-forwarded-email",
    "x-custodia-identity",
];

/// A correctly signed assertion for someone else: what a client with a stolen key or a replayed
/// header would send. The proxy must drop it all the same.
fn forged_assertion() -> String {
    let identity = custodia_identity::Identity {
        sub: "auth0|attacker".to_string(),
        email: Some("attacker@evil.test".to_string()),
        name: Some("Attacker".to_string()),
        picture: None,
    };
    custodia_identity::sign_assertion(&identity, ASSERTION_KEY.as_bytes(), now_unix(), 300)
}

fn spoofed_headers(assertion: &str) -> Vec<(&str, &str)> {
    let mut headers = SPOOFED.to_vec();
    headers.push(("x-custodia-identity", assertion));
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_without_a_session_never_reach_upstream() {
    let stack = AuthConfig::new().upstream(Upstream::Echo).start().await;
    let assertion = forged_assertion();
    let mut headers = spoofed_headers(&assertion);
    headers.push(("Accept", ACCEPT_JSON));
    for path in ["/", "/public/page"] {
        let reply = raw_request(stack.addr, &format!("GET {path} HTTP/1.1"), &headers);
        assert_eq!(
            reply.status, 200,
            "{path} is forwarded (optional): {}",
            reply.body
        );
        let seen = reply.json()["headers"].clone();
        for name in PROXY_SET.iter().chain(CLIENT_ONLY) {
            assert!(
                seen.get(name).is_none(),
                "{path}: client-sent {name} reached the upstream: {seen}"
            );
        }
    }
    // A required route refuses before anything is forwarded.
    let reply = raw_request(stack.addr, "GET /api/me HTTP/1.1", &headers);
    assert_eq!(
        reply.status, 401,
        "spoofed headers are no session: {}",
        reply.body
    );

    // And a real worker behind the proxy shows the guest page.
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let mut with_html = spoofed_headers(&assertion);
    with_html.push(("accept", ACCEPT_HTML));
    let home = browser.get_with("/", &with_html).await;
    assert!(
        home.body.contains(support::edge_auth::GUEST_GREETING),
        "a forged assertion does not sign anyone in: {}",
        home.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_with_a_session_are_replaced() {
    let (_stack, browser, _cookies) = signed_in(AuthConfig::new().upstream(Upstream::Echo)).await;
    let assertion = forged_assertion();
    let mut headers = spoofed_headers(&assertion);
    headers.push(("accept", ACCEPT_JSON));
    for path in ["/", "/api/me"] {
        let reply = browser.get_with(path, &headers).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.describe());
        let seen = reply.json()["headers"].clone();
        assert_eq!(
            seen["x-forwarded-user"], DEMO_SUB,
            "{path}: exactly the proxy's value: {seen}"
        );
        assert_eq!(seen["x-forwarded-email"], DEMO_EMAIL, "{path}: {seen}");
        let token = seen["x-custodia-identity"].as_str().unwrap_or_default();
        assert!(!token.contains(','), "{path}: one assertion only: {seen}");
        let identity =
            custodia_identity::verify_assertion(token, ASSERTION_KEY.as_bytes(), now_unix())
                .unwrap_or_else(|e| panic!("{path}: the proxy's assertion verifies: {e}: {seen}"));
        assert_eq!(identity.sub, DEMO_SUB, "{path}");
        for name in CLIENT_ONLY {
            assert!(seen.get(name).is_none(), "{path}: {name} arrived: {seen}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_get_no_identity_even_with_a_session() {
    let (_stack, browser, _cookies) = signed_in(AuthConfig::new().upstream(Upstream::Echo)).await;
    let assertion = forged_assertion();
    let mut headers = spoofed_headers(&assertion);
    headers.push(("accept", ACCEPT_JSON));
    let reply = browser.get_with("/public/page", &headers).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.describe());
    let seen = reply.json()["headers"].clone();
    for name in PROXY_SET.iter().chain(CLIENT_ONLY) {
        assert!(
            seen.get(name).is_none(),
            "a public route gets no identity, spoofed or real: {name} arrived: {seen}"
        );
    }
    let cookie = seen["cookie"].as_str().unwrap_or("");
    assert!(
        !cookie.contains("custodia_session"),
        "the session cookie is not forwarded on public routes either: {cookie:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_cannot_smuggle_or_strip_identity_headers() {
    let (stack, browser, _cookies) = signed_in(AuthConfig::new().upstream(Upstream::Echo)).await;
    let cookie = browser.cookie_header().unwrap();
    let connection = "close, X-Forwarded-User, X-Forwarded-Email, X-Custodia-Identity";

    // With a session: the proxy's own values arrive, the client's do not.
    let reply = raw_request(
        stack.addr,
        "GET /api/me HTTP/1.1",
        &[
            ("Connection", connection),
            ("X-Forwarded-User", "evil"),
            ("X-Forwarded-Email", "evil@evil.test"),
            ("Cookie", &cookie),
            ("Accept", ACCEPT_JSON),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = reply.json()["headers"].clone();
    assert_eq!(seen["x-forwarded-user"], DEMO_SUB, "{seen}");
    assert_eq!(seen["x-forwarded-email"], DEMO_EMAIL, "{seen}");
    let token = seen["x-custodia-identity"].as_str().unwrap_or_default();
    custodia_identity::verify_assertion(token, ASSERTION_KEY.as_bytes(), now_unix())
        .unwrap_or_else(|e| {
            panic!("the proxy's assertion survives a Connection list: {e}: {seen}")
        });

    // Without a session: nothing of the kind arrives.
    let assertion = forged_assertion();
    let reply = raw_request(
        stack.addr,
        "GET / HTTP/1.1",
        &[
            ("Connection", connection),
            ("X-Forwarded-User", "evil"),
            ("X-Custodia-Identity", &assertion),
            ("Accept", ACCEPT_JSON),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = reply.json()["headers"].clone();
    for name in [
        "x-forwarded-user",
        "x-forwarded-email",
        "x-custodia-identity",
    ] {
        assert!(
            seen.get(name).is_none(),
            "{name} reached the upstream: {seen}"
        );
    }
}

// ---------------------------------------------------------------- policy bypass

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_cannot_bypass_a_required_route() {
    // The echo upstream answers 200 to anything: a 200 here means the proxy forwarded.
    let stack = AuthConfig::new().upstream(Upstream::Echo).start().await;
    let absolute = format!("http://{}/api/me", stack.addr);
    // (request target, must the answer be the 401 of a required route?) Every target must at
    // least not be forwarded; the listed tricks must be recognised as /api/me and get the 401.
    let targets = [
        ("/api/me", true),
        ("/public/../api/me", true),
        ("/%61pi/me", true),
        ("//api/me", true),
        ("/api/./me", true),
        ("/api%2fme", true),
        ("/api%2Fme", true),
        ("/./api/me", true),
        ("/public/%2e%2e/api/me", true),
        ("/public/%2E%2E/api/me", true),
        ("/%2e%2e/api/me", true),
        ("///api/me", true),
        ("/api//me", true),
        ("/public/./../api/me", true),
        ("/public/..%2fapi/me", false),
        ("/%2fapi/me", false),
        ("/API/me", false),
        (absolute.as_str(), false),
    ];
    let mut failures = Vec::new();
    for (target, want_401) in targets {
        let reply = raw_request(
            stack.addr,
            &format!("GET {target} HTTP/1.1"),
            &[("Accept", ACCEPT_JSON)],
        );
        let forwarded = serde_json::from_str::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v["path"].as_str().map(str::to_string));
        if forwarded.is_some() || (want_401 && reply.status != 401) {
            failures.push(format!(
                "GET {target}: {} (upstream saw path {forwarded:?}) body: {}",
                reply.status,
                reply.body.chars().take(200).collect::<String>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "required route reached without a session:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------- forwarding headers

/// `/login` and the callback with a hostile Host / X-Forwarded-Host / -Proto: the redirect URI
/// and every redirect still come from public_url.
async fn forwarded_host_is_ignored_for_redirects(stack: &AuthStack) {
    let hostile = [
        ("host", "evil.example"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("accept", ACCEPT_HTML),
    ];
    let browser = stack.browser();
    let login = browser.get_with("/login?rd=/next", &hostile).await;
    assert_eq!(login.status, StatusCode::FOUND, "{}", login.describe());
    let authorize = login.redirect_target();
    assert_eq!(
        query_param(&authorize, "redirect_uri"),
        Some(stack.callback_url()),
        "redirect_uri comes from public_url: {authorize}"
    );
    assert!(!authorize.as_str().contains("evil.example"), "{authorize}");
    for cookie in login.set_cookies() {
        if is_login_cookie(&cookie.name) {
            assert!(
                !cookie.has("Secure") && !cookie.name.starts_with("__Host-"),
                "an http public_url keeps http cookies whatever X-Forwarded-Proto says: {}",
                cookie.raw
            );
        }
    }
    let callback = stack.authorize_at_idp(&authorize).await;
    let reply = browser.get_with(callback.as_str(), &hostile).await;
    assert_eq!(reply.status, StatusCode::FOUND, "{}", reply.describe());
    let location = reply.location().unwrap_or_default();
    assert!(
        !location.contains("evil.example"),
        "callback redirect: {location}"
    );
    assert_eq!(reply.redirect_target().as_str(), stack.url("/next"));

    let required = browser.get_with("/api/me", &hostile).await;
    let anonymous = stack.browser();
    let required_anonymous = anonymous.get_with("/api/me", &hostile).await;
    assert_eq!(required.status, StatusCode::OK, "{}", required.describe());
    assert_eq!(
        required_anonymous.status,
        StatusCode::FOUND,
        "{}",
        required_anonymous.describe()
    );
    let location = required_anonymous.location().unwrap_or_default();
    assert!(
        !location.contains("evil.example"),
        "login redirect for a required route: {location}"
    );

    let logout = browser.get_with("/logout", &hostile).await;
    let end_session = logout.redirect_target();
    assert_eq!(
        query_param(&end_session, "post_logout_redirect_uri"),
        Some(stack.url("/")),
        "{end_session}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_x_forwarded_host_does_not_change_redirects() {
    // The test client (127.0.0.1) is not a trusted proxy here.
    let stack = AuthConfig::new()
        .trusted_proxies(&["10.0.0.0/8"])
        .start()
        .await;
    forwarded_host_is_ignored_for_redirects(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_a_trusted_x_forwarded_host_does_not_change_redirects() {
    let stack = AuthConfig::new()
        .trusted_proxies(&["127.0.0.1/32"])
        .start()
        .await;
    forwarded_host_is_ignored_for_redirects(&stack).await;
}

// ---------------------------------------------------------------- workers' keys

/// A worker that cannot verify the proxy's identity assertions (another key, or none) is taken
/// out of the pool by the health checks, and the log says why: before, it passed them, and
/// signed-in users it served saw the guest page or a 401, at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_verify_the_proxys_assertions_is_unhealthy() {
    let (stack, browser, _cookies) = signed_in(AuthConfig::new().capture_output()).await;
    let good = stack.workers[0].addr;
    let other_key = support::custodia::Worker::start_with_env(
        "w-other-key",
        &[(
            "CUSTODIA_ASSERTION_KEY",
            "another-assertion-key-fedcba9876543210fedcba98",
        )],
    );
    let no_key = support::custodia::Worker::start_with_env("w-no-key", &[]);
    // A worker on the key that comes next, still accepting the proxy's: healthy.
    let rotating = support::custodia::Worker::start_with_env(
        "w-rotating",
        &[
            (
                "CUSTODIA_ASSERTION_KEY",
                "next-assertion-key-0123456789abcdef0123456789",
            ),
            ("CUSTODIA_ASSERTION_KEY_PREVIOUS", ASSERTION_KEY),
        ],
    );
    stack.reload_with(
        &[
            (good, 1),
            (other_key.addr, 1),
            (no_key.addr, 1),
            (rotating.addr, 1),
        ],
        false,
    );

    let proxy = stack.proxy();
    eventually_async(
        "the workers without the proxy's key out of the pool",
        Duration::from_secs(20),
        || async {
            let state = |addr: std::net::SocketAddr| async move {
                proxy
                    .backend_metric("custodia_upstream_healthy", addr)
                    .await
            };
            let states = (
                state(good).await,
                state(other_key.addr).await,
                state(no_key.addr).await,
                state(rotating.addr).await,
            );
            (states == (Some(1.0), Some(0.0), Some(0.0), Some(1.0))).then_some(())
        },
    )
    .await;
    // Every signed-in request is served as the user, none as a guest.
    for _ in 0..8 {
        stack.assert_signed_in(&browser).await;
    }
    let logged = stack.output();
    assert!(
        logged.contains(&other_key.addr.to_string()) && logged.contains("is not the proxy's"),
        "the proxy's log says which worker and why: {logged}"
    );
    assert!(logged.contains("no identity assertion key"), "{logged}");

    // With only workers that refuse it, the site still serves (as guests): the proxy stays
    // ready, degraded, and says why, rather than failing every readiness probe at once.
    stack.reload_with(&[(other_key.addr, 1)], false);
    let readyz = eventually_async("/readyz says degraded", Duration::from_secs(20), || async {
        let reply = reqwest::get(proxy.admin_url("/readyz")).await.ok()?;
        let status = reply.status();
        let body = reply.text().await.ok()?;
        body.contains("degraded").then_some((status, body))
    })
    .await;
    assert_eq!(readyz.0, StatusCode::OK, "{}", readyz.1);
    assert!(
        readyz.1.contains(&other_key.addr.to_string()),
        "{}",
        readyz.1
    );
    let guest = browser.get_html("/").await;
    assert_eq!(guest.status, StatusCode::OK, "{}", guest.describe());
}
