//! A real headless Chromium for tests, driven over W3C WebDriver by `chromedriver`.
//!
//! ```ignore
//! let browser = WebDriver::start().await;           // chromedriver + a fresh profile
//! browser.goto("http://127.0.0.1:8080/").await;
//! browser.find(By::LinkText("Login")).await.click().await;
//! browser.wait_for_text("Sign in", PATIENCE).await;
//! std::fs::write("shot.png", browser.screenshot_png().await)?;
//! browser.quit().await;                              // or just drop it
//! ```
//!
//! Binaries: `$CHROMEDRIVER` or `/usr/bin/chromedriver`, `$CHROMIUM` or `/usr/bin/chromium`. If
//! either is missing, [`WebDriver::start`] panics with the `apt-get` line that installs them: the
//! browser tests fail rather than skip. chromedriver runs in its own process group, so the
//! browser processes it starts are killed with it when the driver is dropped.

// Test support: a failed step panics with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::process::{free_addr, wait_for_port, ChildGuard, TempDir};

/// The W3C key under which an element reference is returned.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long chromedriver and a browser session may take to start.
const STARTUP: Duration = Duration::from_secs(60);
/// Default patience for finding elements.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub const INSTALL_HINT: &str = "sudo apt-get install -y chromium chromium-driver";

/// How to find an element.
#[derive(Debug, Clone, Copy)]
pub enum By<'a> {
    Css(&'a str),
    LinkText(&'a str),
}

impl By<'_> {
    fn to_json(self) -> Value {
        match self {
            By::Css(selector) => json!({"using": "css selector", "value": selector}),
            By::LinkText(text) => json!({"using": "link text", "value": text}),
        }
    }
}

/// A WebDriver session on a headless Chromium; deleted (browser closed) and chromedriver
/// killed when dropped.
pub struct WebDriver {
    http: reqwest::Client,
    base: String,
    driver_addr: SocketAddr,
    session: Option<String>,
    // Field order is drop order after `Drop::drop`: the driver process, then the profile.
    driver: ChildGuard,
    _profile: TempDir,
}

/// An element of the current page.
pub struct Element<'a> {
    driver: &'a WebDriver,
    id: String,
}

fn binary(var: &str, default: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.exists(),
        "{what} not found at {} (set {var} to its path). Install it with:\n    {INSTALL_HINT}",
        path.display()
    );
    path
}

impl WebDriver {
    /// Starts chromedriver on a free loopback port and opens a headless Chromium session with a
    /// fresh profile directory.
    pub async fn start() -> WebDriver {
        let chromedriver = binary("CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver");
        let chromium = binary("CHROMIUM", "/usr/bin/chromium", "Chromium");
        let profile = TempDir::new("chromium-profile");
        let driver_addr = free_addr();
        let mut command = Command::new(&chromedriver);
        command
            .arg(format!("--port={}", driver_addr.port()))
            .arg("--allowed-ips=127.0.0.1")
            .arg("--log-level=WARNING")
            // Its own process group: the browser it spawns can be killed with it.
            .process_group(0);
        let mut driver = ChildGuard::spawn("chromedriver", &mut command);
        wait_for_port(driver_addr, STARTUP, &mut driver);
        let http = reqwest::Client::builder()
            .timeout(STARTUP)
            .no_proxy()
            .build()
            .expect("reqwest client");
        let mut webdriver = WebDriver {
            http,
            base: format!("http://{driver_addr}"),
            driver_addr,
            session: None,
            driver,
            _profile: profile,
        };
        webdriver.wait_driver_ready().await;
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--no-first-run".to_string(),
            "--no-default-browser-check".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--window-size=1024,768".to_string(),
            format!("--user-data-dir={}", webdriver._profile.path().display()),
        ];
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "goog:chromeOptions": {
                        "binary": chromium.display().to_string(),
                        "args": args,
                    }
                }
            }
        });
        let created = webdriver
            .command("POST", "/session", Some(capabilities))
            .await;
        let session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {created}"))
            .to_string();
        webdriver.session = Some(session);
        webdriver
            .session_command(
                "POST",
                "/timeouts",
                Some(json!({"implicit": 0, "pageLoad": 30_000, "script": 10_000})),
            )
            .await;
        webdriver
    }

    async fn wait_driver_ready(&self) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(response) = self.http.get(format!("{}/status", self.base)).send().await {
                if let Ok(body) = response.json::<Value>().await {
                    if body["value"]["ready"] == true {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready within {STARTUP:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a WebDriver command; returns its `value`, panicking with the error on failure.
    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        match self.try_command(method, path, body).await {
            Ok(value) => value,
            Err(error) => panic!("WebDriver {method} {path}: {error}"),
        }
    }

    /// Sends a WebDriver command; `Err` holds the W3C error (`no such element: …`).
    async fn try_command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| format!("{url}: {e}"))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| format!("{status}: {e}: {text}"))?;
        let value = json.get("value").cloned().unwrap_or(Value::Null);
        if !status.is_success() || value.get("error").is_some_and(|e| !e.is_null()) {
            return Err(format!(
                "{status} {}: {}",
                value["error"].as_str().unwrap_or("error"),
                value["message"].as_str().unwrap_or(&text)
            ));
        }
        Ok(value)
    }

    fn session_path(&self, path: &str) -> String {
        let session = self.session.as_deref().expect("a session");
        format!("/session/{session}{path}")
    }

    async fn session_command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.command(method, &self.session_path(path), body).await
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.session_command("POST", "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn current_url(&self) -> String {
        self.session_command("GET", "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The current page's DOM as HTML.
    pub async fn source(&self) -> String {
        self.session_command("GET", "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn title(&self) -> String {
        self.session_command("GET", "/title", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The first element matching `by`, waiting up to [`PATIENCE`] for it to appear.
    pub async fn find(&self, by: By<'_>) -> Element<'_> {
        self.find_within(by, PATIENCE).await
    }

    pub async fn find_within(&self, by: By<'_>, patience: Duration) -> Element<'_> {
        let deadline = Instant::now() + patience;
        let path = self.session_path("/element");
        loop {
            match self.try_command("POST", &path, Some(by.to_json())).await {
                Ok(value) => {
                    let id = value[ELEMENT_KEY]
                        .as_str()
                        .unwrap_or_else(|| panic!("no element reference in {value}"))
                        .to_string();
                    return Element { driver: self, id };
                }
                Err(error) if Instant::now() < deadline && error.contains("no such element") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!(
                    "element {by:?} not found within {patience:?} on {}: {error}\n{}",
                    self.current_url().await,
                    self.source().await
                ),
            }
        }
    }

    /// Whether an element matching `by` is on the page right now.
    pub async fn exists(&self, by: By<'_>) -> bool {
        let path = self.session_path("/element");
        self.try_command("POST", &path, Some(by.to_json()))
            .await
            .is_ok()
    }

    /// Waits until the page source contains `text`; returns the source. Panics with the URL
    /// and page after `patience`.
    pub async fn wait_for_text(&self, text: &str, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let source = self.source().await;
            if source.contains(text) {
                return source;
            }
            if Instant::now() > deadline {
                panic!(
                    "{text:?} did not appear within {patience:?}; at {}:\n{source}",
                    self.current_url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG screenshot of the viewport.
    pub async fn screenshot_png(&self) -> Vec<u8> {
        let encoded = self.session_command("GET", "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .expect("screenshot is base64")
    }

    /// Cookie names the browser holds for the current page (HttpOnly ones included).
    pub async fn cookie_names(&self) -> Vec<String> {
        self.session_command("GET", "/cookie", None)
            .await
            .as_array()
            .map(|cookies| {
                cookies
                    .iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends the session (closes the browser); chromedriver is killed when this is dropped.
    pub async fn quit(mut self) {
        if let Some(session) = self.session.take() {
            let _ = self
                .try_command("DELETE", &format!("/session/{session}"), None)
                .await;
        }
    }
}

impl Element<'_> {
    pub async fn click(&self) {
        self.driver
            .session_command(
                "POST",
                &format!("/element/{}/click", self.id),
                Some(json!({})),
            )
            .await;
    }

    pub async fn clear(&self) {
        self.driver
            .session_command(
                "POST",
                &format!("/element/{}/clear", self.id),
                Some(json!({})),
            )
            .await;
    }

    /// Types `text` into the element.
    pub async fn send_keys(&self, text: &str) {
        self.driver
            .session_command(
                "POST",
                &format!("/element/{}/value", self.id),
                Some(json!({"text": text})),
            )
            .await;
    }

    pub async fn text(&self) -> String {
        self.driver
            .session_command("GET", &format!("/element/{}/text", self.id), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        // Close the browser politely (a blocking request: no async in Drop), then kill the
        // whole process group chromedriver leads, browser included. ChildGuard reaps it.
        if let Some(session) = self.session.take() {
            delete_session_blocking(self.driver_addr, &session);
        }
        // SAFETY: kill(2) on the process group of a child we spawned with process_group(0).
        unsafe {
            libc::kill(-self.driver.pid(), libc::SIGKILL);
        }
    }
}

fn delete_session_blocking(addr: SocketAddr, session: &str) {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        let mut answer = [0u8; 512];
        let _ = stream.read(&mut answer);
    }
}
