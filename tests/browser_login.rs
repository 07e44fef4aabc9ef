//! A real browser through the local stack: headless Chromium, driven over WebDriver by
//! chromedriver, opens the home page as a guest, signs in on the development IdP's form, sees
//! its name, logs out and is a guest again. The signed-in page is saved as
//! `target/test-artifacts/signed-in.png`.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (or `$CHROMIUM` / `$CHROMEDRIVER`):
//! `sudo apt-get install -y chromium chromium-driver`. Without them the test fails, it does not
//! skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::browser::{By, WebDriver};
use support::edge_auth::{GUEST_GREETING, SIGNED_IN_GREETING};
use support::stack::LocalStack;

/// Logins cross three servers and a few redirects; allow for a slow machine.
const PATIENCE: Duration = Duration::from_secs(30);
const DEV_USERNAME: &str = "demo";
const DEV_PASSWORD: &str = "custodia-demo";

fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_out_through_the_local_stack() {
    let stack = LocalStack::start_shipped();
    stack.wait_ready(PATIENCE).await;
    let browser = WebDriver::start().await;
    let origin = stack.url("");

    // A guest first.
    browser.goto(&stack.url("/")).await;
    browser.wait_for_text(GUEST_GREETING, PATIENCE).await;

    // Login → the development IdP's form.
    browser.find(By::LinkText("Login")).await.click().await;
    let username = browser
        .find_within(By::Css("input[name=username]"), PATIENCE)
        .await;
    let at_idp = browser.current_url().await;
    assert!(
        !at_idp.starts_with(&origin),
        "the login form is served by the IdP, not the proxy: {at_idp}"
    );
    let form = browser.source().await;
    assert!(
        form.contains(DEV_USERNAME) && form.contains(DEV_PASSWORD),
        "the dev IdP shows the demo credentials on its form:\n{form}"
    );
    username.clear().await;
    username.send_keys(DEV_USERNAME).await;
    let password = browser.find(By::Css("input[name=password]")).await;
    password.send_keys(DEV_PASSWORD).await;
    browser
        .find(By::Css("button[type=submit][value=login]"))
        .await
        .click()
        .await;

    // Back home, signed in.
    browser.wait_for_text(SIGNED_IN_GREETING, PATIENCE).await;
    let home = browser.current_url().await;
    assert!(
        home.starts_with(&origin),
        "the login ends on the proxy's origin: {home}"
    );
    let cookies = browser.cookie_names().await;
    assert!(
        cookies.iter().any(|c| c.contains("custodia_session")),
        "the browser holds the session cookie: {cookies:?}"
    );
    let png = browser.screenshot_png().await;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is a PNG"
    );
    let shot = artifacts_dir().join("signed-in.png");
    std::fs::write(&shot, &png).expect("write the screenshot");
    eprintln!("screenshot of the signed-in page: {}", shot.display());

    // Logout → (the IdP's end-session, which may ask to confirm) → home as a guest.
    browser.find(By::LinkText("Logout")).await.click().await;
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut confirmed = false;
    loop {
        let url = browser.current_url().await;
        let source = browser.source().await;
        if url.starts_with(&origin) && source.contains(GUEST_GREETING) {
            break;
        }
        if !url.starts_with(&origin)
            && !confirmed
            && browser.exists(By::Css("button[type=submit]")).await
        {
            browser
                .find(By::Css("button[type=submit]"))
                .await
                .click()
                .await;
            confirmed = true;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not back to the guest page within {PATIENCE:?} after Logout; at {url}:\n{source}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cookies = browser.cookie_names().await;
    assert!(
        !cookies.iter().any(|c| c.contains("custodia_session")),
        "the session cookie is gone after logout: {cookies:?}"
    );
    // A reload stays a guest (no session left anywhere).
    browser.goto(&stack.url("/")).await;
    let page = browser.wait_for_text(GUEST_GREETING, PATIENCE).await;
    assert!(!page.contains(SIGNED_IN_GREETING));
    browser.quit().await;
}
