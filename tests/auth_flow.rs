//! Edge authentication end to end, against the certified npm `oidc-provider`: login through the
//! proxy with both client authentication methods, the signed-in home page and `/api/me`, logout
//! at the IdP, parallel logins, the identity the upstream receives, IdP key rotation and IdP
//! outages. Negative cases are in `auth_negative.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{StatusCode, Url};

use support::edge_auth::{
    is_login_cookie, is_session_cookie, session_cookies, session_set_cookies, AuthConfig, Upstream,
    ASSERTION_KEY, DEMO_NAME, GUEST_GREETING,
};
use support::http::{query_param, CookieClient};
use support::oidc_provider::{confirm_logout, AuthMethod, DEMO_EMAIL, DEMO_SUB};
use support::process::eventually_async;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Login, signed-in views, logout at the IdP and back, with one client authentication method.
async fn full_login_and_logout(method: AuthMethod) {
    let stack = AuthConfig::new().client(method).start().await;
    let browser = stack.browser();
    stack.assert_guest(&browser, "before login").await;

    // /login: PKCE S256, state and nonce; a login-state cookie.
    let pending = stack.begin_login(&browser, None).await;
    let authorize = &pending.authorize_url;
    let param = |name: &str| query_param(authorize, name);
    assert_eq!(
        param("response_type").as_deref(),
        Some("code"),
        "{authorize}"
    );
    assert_eq!(
        param("client_id").as_deref(),
        Some(match method {
            AuthMethod::ClientSecretBasic => "custodia-basic",
            AuthMethod::ClientSecretPost => "custodia-post",
        }),
        "{authorize}"
    );
    assert_eq!(
        param("redirect_uri"),
        Some(stack.callback_url()),
        "{authorize}"
    );
    let scope = param("scope").unwrap_or_default();
    for wanted in ["openid", "profile", "email"] {
        assert!(
            scope.split(' ').any(|s| s == wanted),
            "scope has {wanted}: {scope}"
        );
    }
    assert_eq!(
        param("code_challenge_method").as_deref(),
        Some("S256"),
        "{authorize}"
    );
    assert_eq!(
        param("code_challenge").map(|c| c.len()),
        Some(43),
        "a base64url SHA-256 challenge: {authorize}"
    );
    assert!(
        pending.state.len() >= 16,
        "state has entropy: {}",
        pending.state
    );
    assert!(
        pending.nonce.len() >= 16,
        "nonce has entropy: {}",
        pending.nonce
    );
    for cookie in pending.reply.set_cookies() {
        if is_login_cookie(&cookie.name) {
            assert!(
                cookie.has("HttpOnly"),
                "login cookie is HttpOnly: {}",
                cookie.raw
            );
            assert!(!cookie.has("Secure"), "no Secure over http: {}", cookie.raw);
        }
    }

    // The IdP's form, then the callback: a session cookie and a redirect home.
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    assert_eq!(query_param(&callback, "state"), Some(pending.state.clone()));
    let reply = browser.get_html(callback.as_str()).await;
    assert_eq!(reply.status, StatusCode::FOUND, "{}", reply.describe());
    assert_eq!(
        reply.redirect_target().as_str(),
        stack.url("/"),
        "no rd: back to /"
    );
    let set = session_set_cookies(&reply);
    assert!(
        !set.is_empty(),
        "a session cookie is set: {}",
        reply.describe()
    );
    for cookie in &set {
        assert!(cookie.has("HttpOnly"), "HttpOnly: {}", cookie.raw);
        assert_eq!(
            cookie
                .attribute("SameSite")
                .flatten()
                .map(str::to_ascii_lowercase),
            Some("lax".to_string()),
            "SameSite=Lax: {}",
            cookie.raw
        );
        assert_eq!(
            cookie.attribute("Path"),
            Some(Some("/")),
            "Path=/: {}",
            cookie.raw
        );
        assert!(!cookie.has("Secure"), "no Secure over http: {}", cookie.raw);
        assert!(
            !cookie.name.starts_with("__Host-"),
            "no __Host- prefix without Secure: {}",
            cookie.raw
        );
        assert!(
            !cookie.value.contains(DEMO_EMAIL) && !cookie.value.contains("demo%40"),
            "the session is sealed, not readable: {}",
            cookie.raw
        );
    }
    // The ID token for logout's id_token_hint rides in its own sealed cookie that browsers send
    // only to /logout, so the session checked on every request stays small.
    let hint = reply
        .set_cookies()
        .into_iter()
        .find(|c| c.name == "custodia_logout")
        .unwrap_or_else(|| panic!("a logout hint cookie is set: {}", reply.describe()));
    assert_eq!(
        hint.attribute("Path"),
        Some(Some("/logout")),
        "{}",
        hint.raw
    );
    assert!(hint.has("HttpOnly"), "{}", hint.raw);
    // A JWT's segments start with `eyJ` (base64 of `{"`); a sealed value is ciphertext, where
    // `eyJ` may turn up anywhere by chance (~0.6% per login), at a segment's start almost never.
    assert!(
        !hint
            .value
            .split('.')
            .any(|segment| segment.starts_with("eyJ")),
        "the ID token is sealed: {}",
        hint.raw
    );
    let session_value_len: usize = set.iter().map(|c| c.value.len()).sum();
    assert!(
        session_value_len < 1024,
        "the session cookie carries no ID token ({session_value_len} bytes)"
    );

    stack.assert_signed_in(&browser).await;
    let home = browser.get_html("/").await;
    assert!(
        home.body
            .contains("src=\"https://example.test/avatar/demo.png\""),
        "the signed-in page shows the IdP's picture: {}",
        home.describe()
    );

    // Logout: cookie cleared, redirect to the IdP's end_session_endpoint with id_token_hint.
    let logout = browser.get_html("/logout").await;
    assert_eq!(logout.status, StatusCode::FOUND, "{}", logout.describe());
    let removed: Vec<_> = logout
        .set_cookies()
        .into_iter()
        .filter(|c| is_session_cookie(&c.name))
        .collect();
    assert!(
        !removed.is_empty() && removed.iter().all(|c| c.is_removal()),
        "logout deletes the session cookie(s): {:?}",
        logout.set_cookies()
    );
    assert!(
        session_cookies(&browser).is_empty(),
        "no session cookie left in the jar: {:?}",
        browser.cookie_names()
    );
    assert!(
        logout
            .set_cookies()
            .iter()
            .any(|c| c.name == "custodia_logout" && c.is_removal()),
        "logout deletes the logout hint: {:?}",
        logout.set_cookies()
    );
    let end_session = logout.redirect_target();
    assert!(
        end_session
            .as_str()
            .starts_with(&stack.idp_url("oidc/logout")),
        "logout goes to the IdP's end_session_endpoint: {end_session}"
    );
    let hint = query_param(&end_session, "id_token_hint")
        .unwrap_or_else(|| panic!("id_token_hint in {end_session}"));
    assert_eq!(hint.split('.').count(), 3, "id_token_hint is a JWT: {hint}");
    assert_eq!(
        query_param(&end_session, "post_logout_redirect_uri"),
        Some(stack.url("/")),
        "{end_session}"
    );
    // The IdP accepts the request (hint, client, registered return URI) and sends us back.
    let back = confirm_logout(end_session.as_str())
        .await
        .unwrap_or_else(|e| panic!("the IdP refused the logout request {end_session}: {e:?}"));
    let back = Url::parse(&back).unwrap();
    assert_eq!(
        format!("{}://{}{}", back.scheme(), back.authority(), back.path()),
        stack.url("/"),
        "the IdP returns to public_url/"
    );

    stack.assert_guest(&browser, "after logout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_logout_with_client_secret_basic() {
    full_login_and_logout(AuthMethod::ClientSecretBasic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_logout_with_client_secret_post() {
    full_login_and_logout(AuthMethod::ClientSecretPost).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_defaults_to_what_discovery_advertises() {
    let stack = AuthConfig::new()
        .client(AuthMethod::ClientSecretBasic)
        .client_auth_from_discovery()
        .start()
        .await;
    let browser = stack.browser();
    stack.login(&browser, None).await;
    stack.assert_signed_in(&browser).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_route_sends_browsers_to_login_and_back() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();

    // An API client gets a 401 JSON answer…
    let api = browser.get_json("/api/me").await;
    assert_eq!(api.status, StatusCode::UNAUTHORIZED, "{}", api.describe());
    assert!(
        api.content_type().starts_with("application/json"),
        "401 is JSON for non-browsers: {}",
        api.describe()
    );
    api.json();

    // …a browser is sent to /login with the page it wanted.
    let page = browser.get_html("/api/me?view=full").await;
    assert_eq!(page.status, StatusCode::FOUND, "{}", page.describe());
    let login = page.redirect_target();
    assert_eq!(
        format!("{}://{}{}", login.scheme(), login.authority(), login.path()),
        stack.url("/login"),
        "required + browser → /login: {login}"
    );
    let rd = query_param(&login, "rd").unwrap_or_else(|| panic!("rd in {login}"));
    assert!(rd.starts_with("/api/me"), "rd is the original path: {rd}");

    // Following it signs in and lands on that page.
    let reply = stack.login(&browser, Some(&rd)).await;
    assert_eq!(
        reply.redirect_target().as_str(),
        stack.url(&rd),
        "the callback returns to rd"
    );
    let me = browser.get_json(reply.redirect_target().as_str()).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.describe());
    assert_eq!(me.json()["sub"], DEMO_SUB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_logging_in_at_once_both_succeed() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    // Both tabs start a login before either comes back.
    let first = stack.begin_login(&browser, Some("/first")).await;
    let second = stack.begin_login(&browser, Some("/second")).await;
    assert_ne!(first.state, second.state);
    assert_ne!(first.nonce, second.nonce);
    assert_ne!(
        first.login_cookies, second.login_cookies,
        "each login has its own state cookie"
    );
    let first_callback = stack.authorize_at_idp(&first.authorize_url).await;
    let second_callback = stack.authorize_at_idp(&second.authorize_url).await;

    // The second tab finishes first; then the first one.
    let reply = browser.get_html(second_callback.as_str()).await;
    assert_eq!(
        reply.status,
        StatusCode::FOUND,
        "second tab: {}",
        reply.describe()
    );
    assert_eq!(reply.redirect_target().as_str(), stack.url("/second"));
    assert!(
        !session_set_cookies(&reply).is_empty(),
        "{}",
        reply.describe()
    );

    let reply = browser.get_html(first_callback.as_str()).await;
    assert_eq!(
        reply.status,
        StatusCode::FOUND,
        "first tab: {}",
        reply.describe()
    );
    assert_eq!(reply.redirect_target().as_str(), stack.url("/first"));
    assert!(
        !session_set_cookies(&reply).is_empty(),
        "{}",
        reply.describe()
    );

    stack.assert_signed_in(&browser).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gets_a_signed_identity_and_no_auth_cookies() {
    let stack = AuthConfig::new().upstream(Upstream::Echo).start().await;
    let browser = stack.browser();
    browser.set_cookie("theme", "dark");
    stack.login(&browser, None).await;
    browser.set_cookie("lang", "en");

    let echoed = browser.get_json("/api/anything").await;
    assert_eq!(echoed.status, StatusCode::OK, "{}", echoed.describe());
    let headers = echoed.json()["headers"].clone();
    assert_eq!(headers["x-forwarded-user"], DEMO_SUB, "{headers}");
    assert_eq!(headers["x-forwarded-email"], DEMO_EMAIL, "{headers}");
    let token = headers["x-custodia-identity"]
        .as_str()
        .unwrap_or_else(|| panic!("an identity assertion is forwarded: {headers}"));
    let identity = custodia_identity::verify_assertion(token, ASSERTION_KEY.as_bytes(), now_unix())
        .unwrap_or_else(|e| panic!("the assertion verifies with the shared key: {e}"));
    assert_eq!(identity.sub, DEMO_SUB);
    assert_eq!(identity.email.as_deref(), Some(DEMO_EMAIL));
    assert_eq!(identity.name.as_deref(), Some(DEMO_NAME));
    let cookie = headers["cookie"].as_str().unwrap_or("");
    assert!(
        cookie.contains("theme=dark") && cookie.contains("lang=en"),
        "other cookies are forwarded: {cookie:?}"
    );
    assert!(
        !cookie.contains("custodia_session") && !cookie.contains("custodia_login_"),
        "session and login cookies are not forwarded: {cookie:?}"
    );

    // Without a session: anonymous, and still no identity headers.
    let anonymous = CookieClient::new(&stack.public_url);
    let echoed = anonymous.get_json("/").await;
    let headers = echoed.json()["headers"].clone();
    for name in [
        "x-forwarded-user",
        "x-forwarded-email",
        "x-custodia-identity",
    ] {
        assert!(
            headers.get(name).is_none(),
            "no {name} for a guest: {headers}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_key_rotation_keeps_sessions_and_new_logins_verify() {
    let mut stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    stack.login(&browser, None).await;
    let old_kid = stack.idp().kid().to_string();

    let new_kid = stack.idp_mut().rotate_key().await;
    assert_ne!(old_kid, new_kid);

    // The session is checked at the edge without the IdP: still valid.
    stack.assert_signed_in(&browser).await;

    // A new login gets an ID token signed with a kid the proxy has not seen: it re-fetches
    // the JWKS and accepts it.
    let refreshes_before = stack
        .metric_total("custodia_auth_jwks_refreshes_total")
        .await;
    let fresh = stack.browser();
    stack.login(&fresh, None).await;
    stack.assert_signed_in(&fresh).await;
    assert!(
        stack
            .metric_total("custodia_auth_jwks_refreshes_total")
            .await
            > refreshes_before,
        "the new kid made the proxy re-fetch the JWKS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_down_at_start_login_is_a_503_page_and_not_ready() {
    let stack = AuthConfig::new().idp_down_at_start().start().await;
    let browser = stack.browser();

    let login = browser.get_html("/login").await;
    assert_eq!(
        login.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/login without IdP metadata: {}",
        login.describe()
    );
    assert!(
        login.content_type().starts_with("text/html"),
        "a page for the browser: {}",
        login.describe()
    );
    assert!(
        login
            .set_cookies()
            .iter()
            .all(|c| !is_login_cookie(&c.name)),
        "no login state is started: {:?}",
        login.set_cookies()
    );
    assert_eq!(
        stack.readyz().await,
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz is 503 until the IdP metadata is loaded"
    );

    // Public and optional routes still serve guests; required ones refuse.
    let home = browser.get_html("/").await;
    assert_eq!(home.status, StatusCode::OK, "{}", home.describe());
    assert!(home.body.contains(GUEST_GREETING), "{}", home.describe());
    let me = browser.get_json("/api/me").await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "{}", me.describe());
    assert!(
        stack.metric_total("custodia_auth_idp_errors_total").await >= 1.0,
        "failed discovery is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_retried_until_the_idp_comes_up() {
    let mut stack = AuthConfig::new().idp_down_at_start().start().await;
    assert_eq!(stack.readyz().await, StatusCode::SERVICE_UNAVAILABLE);
    stack.start_idp().await;
    let browser = stack.browser();
    // The proxy retries discovery on its own; allow for a backoff.
    let url = stack.url("/login");
    eventually_async(
        "/login to redirect to the IdP once it is up",
        Duration::from_secs(60),
        || {
            let request = browser.get_html(&url);
            async move { (request.await.status == StatusCode::FOUND).then_some(()) }
        },
    )
    .await;
    stack.wait_ready().await;
    browser.clear_cookies();
    stack.login(&browser, None).await;
    stack.assert_signed_in(&browser).await;
}

/// An operator fixing a wrong issuer by a reload gets a ready proxy at once, not after the
/// discovery back-off the wrong one had grown (up to 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fixes_the_issuer_is_discovered_at_once() {
    let mut stack = AuthConfig::new().idp_down_at_start().start().await;
    // Failures at about 0, 0.5, 1.5, 3.5, 7.5 and 15.5 s: the next try would be 16 s later,
    // far from the bound below even on a loaded machine.
    let failures = || async { stack.metric_total("custodia_auth_idp_errors_total").await };
    eventually_async(
        "six failed discoveries",
        Duration::from_secs(40),
        || async { (failures().await >= 6.0).then_some(()) },
    )
    .await;
    stack.start_idp_elsewhere_and_reload().await;
    let reloaded = std::time::Instant::now();
    stack.wait_ready().await;
    assert!(
        reloaded.elapsed() < Duration::from_secs(8),
        "ready {:?} after the reload",
        reloaded.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_down_after_start_existing_sessions_keep_working() {
    let mut stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    stack.login(&browser, None).await;

    stack.idp_mut().stop();
    let discovery = reqwest::Client::new()
        .get(stack.idp_url(".well-known/openid-configuration"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(discovery.is_err(), "the IdP is down");

    stack.assert_signed_in(&browser).await;
    // The metadata is already loaded: /login still sends browsers to the IdP (which will fail
    // there), it does not answer 5xx itself.
    let other = stack.browser();
    let login = other.get_html("/login").await;
    assert_eq!(login.status, StatusCode::FOUND, "{}", login.describe());
    assert!(
        login
            .redirect_target()
            .as_str()
            .starts_with(&stack.idp_url("authorize")),
        "{}",
        login.describe()
    );
}

/// The proxy's own answers (login redirects and the edge's 401, on both request paths) carry
/// the security headers a browser needs (no sniffing, no framing, no `Referer` leaking `rd=` or
/// a code), and over https HSTS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_answers_carry_security_headers() {
    for https in [false, true] {
        let config = AuthConfig::new();
        let stack = if https { config.public_https() } else { config }
            .start()
            .await;
        let browser = stack.browser();
        // /api/me without a session: answered by the fast path; /login by Pingora's.
        let answers = [
            browser.get_html("/api/me").await,
            browser.get_json("/api/me").await,
            browser.get_html("/login?rd=/api/me").await,
        ];
        for reply in &answers {
            let seen = format!("https = {https}: {}", reply.describe());
            assert!(
                reply.status == StatusCode::FOUND || reply.status == StatusCode::UNAUTHORIZED,
                "{seen}"
            );
            assert_eq!(
                reply.header("x-content-type-options"),
                Some("nosniff"),
                "{seen}"
            );
            assert_eq!(reply.header("x-frame-options"), Some("DENY"), "{seen}");
            assert_eq!(
                reply.header("referrer-policy"),
                Some("no-referrer"),
                "{seen}"
            );
            let hsts = reply.header("strict-transport-security");
            assert_eq!(hsts, https.then_some("max-age=31536000"), "{seen}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_public_url_uses_host_prefixed_secure_cookies() {
    let stack = AuthConfig::new().public_https().start().await;
    let browser = stack.browser();
    let pending = stack.begin_login(&browser, Some("/next")).await;
    assert_eq!(
        query_param(&pending.authorize_url, "redirect_uri"),
        Some(format!("https://{}/callback", stack.addr)),
        "redirect_uri comes from the https public_url"
    );
    for cookie in pending.reply.set_cookies() {
        if is_login_cookie(&cookie.name) {
            assert!(
                cookie.name.starts_with("__Host-")
                    && cookie.has("Secure")
                    && cookie.attribute("Path") == Some(Some("/"))
                    && !cookie.has("Domain"),
                "an https login cookie is __Host-, Secure, Path=/, host-only: {}",
                cookie.raw
            );
        }
    }
    let callback = stack.authorize_at_idp(&pending.authorize_url).await;
    let reply = browser.get_html(callback.as_str()).await;
    assert_eq!(reply.status, StatusCode::FOUND, "{}", reply.describe());
    let location = reply.location().unwrap_or_default();
    assert!(
        location == "/next" || location == format!("{}/next", stack.public_url),
        "back to rd on the public origin: {}",
        reply.describe()
    );
    let set = session_set_cookies(&reply);
    assert!(!set.is_empty(), "{}", reply.describe());
    for cookie in &set {
        assert!(
            cookie.name.starts_with("__Host-custodia_session"),
            "__Host- prefix over https: {}",
            cookie.raw
        );
        assert!(cookie.has("Secure"), "Secure: {}", cookie.raw);
        assert!(cookie.has("HttpOnly"), "HttpOnly: {}", cookie.raw);
        assert_eq!(cookie.attribute("Path"), Some(Some("/")), "{}", cookie.raw);
        assert!(!cookie.has("Domain"), "host-only: {}", cookie.raw);
    }
    stack.assert_signed_in(&browser).await;

    let logout = browser.get_html("/logout").await;
    let end_session = logout.redirect_target();
    assert_eq!(
        query_param(&end_session, "post_logout_redirect_uri"),
        Some(format!("https://{}/", stack.addr)),
        "{end_session}"
    );
    let deleted: Vec<_> = logout
        .set_cookies()
        .into_iter()
        .filter(|c| is_session_cookie(&c.name))
        .collect();
    assert!(
        !deleted.is_empty()
            && deleted
                .iter()
                .all(|c| c.is_removal() && c.name.starts_with("__Host-") && c.has("Secure")),
        "the deleting Set-Cookie has the same name and attributes: {deleted:?}"
    );
    stack.assert_guest(&browser, "after logout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_without_a_session_is_a_harmless_redirect() {
    let stack = AuthConfig::new().start().await;
    let browser = stack.browser();
    let logout = browser.get_html("/logout").await;
    assert!(
        logout.status.is_redirection(),
        "/logout without a session still redirects: {}",
        logout.describe()
    );
    let target = logout.redirect_target();
    assert!(
        target.as_str().starts_with(&stack.public_url)
            || target.as_str().starts_with(&stack.idp_url("oidc/logout")),
        "to us or to the IdP, nowhere else: {target}"
    );
    stack
        .assert_guest(&browser, "after a logout without a session")
        .await;
}
