//! The certified OIDC provider for tests: runs `tests/oidc-provider/server.mjs` (npm
//! `oidc-provider`, Auth0-shaped) on a free loopback port, and logs in through its form without a
//! browser.
//!
//! ```ignore
//! let idp = OidcProvider::start("http://127.0.0.1:8080/callback").await;
//! // … point the code under test at idp.issuer(), get an authorize URL from it …
//! let callback = login_as_demo(&authorize_url, "http://127.0.0.1:8080/callback").await;
//! ```
//!
//! Needs `node` (≥ 18; `NODE=/path/to/node` to choose) and, the first time, `npm` (`NPM=…`):
//! when `tests/oidc-provider/node_modules` is missing it runs `npm ci` there. Failures panic with
//! the reason — the tests never skip silently.

// Test support: a failed step panics with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::redirect::Policy;
use reqwest::{StatusCode, Url};

use super::process::{free_addr, ChildGuard, TempDir};

/// The demo account the harness knows (see `server.mjs`).
pub const DEMO_USERNAME: &str = "demo";
pub const DEMO_PASSWORD: &str = "custodia-demo";
pub const DEMO_SUB: &str = "auth0|custodia-demo";
pub const DEMO_EMAIL: &str = "demo@example.test";

/// How long the provider may take to answer discovery after being spawned.
const STARTUP: Duration = Duration::from_secs(20);
/// Redirect hops a login may take before the driver gives up.
const MAX_HOPS: usize = 12;

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
        }
    }
}

/// A client registered statically with the provider.
#[derive(Debug, Clone)]
pub struct TestClient {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub auth_method: AuthMethod,
}

impl TestClient {
    /// `custodia-basic` / `custodia-basic-secret`, authenticating with HTTP Basic.
    pub fn basic(redirect_uri: &str) -> TestClient {
        TestClient::new(
            "custodia-basic",
            "custodia-basic-secret",
            redirect_uri,
            AuthMethod::ClientSecretBasic,
        )
    }

    /// `custodia-post` / `custodia-post-secret`, authenticating with form fields.
    pub fn post(redirect_uri: &str) -> TestClient {
        TestClient::new(
            "custodia-post",
            "custodia-post-secret",
            redirect_uri,
            AuthMethod::ClientSecretPost,
        )
    }

    /// A client whose post-logout redirect is the origin of `redirect_uri` (`…/`).
    pub fn new(
        client_id: &str,
        client_secret: &str,
        redirect_uri: &str,
        auth_method: AuthMethod,
    ) -> TestClient {
        let origin = Url::parse(redirect_uri)
            .map(|url| url.join("/").expect("origin").to_string())
            .unwrap_or_else(|e| panic!("redirect_uri {redirect_uri}: {e}"));
        TestClient {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            redirect_uris: vec![redirect_uri.to_string()],
            post_logout_redirect_uris: vec![origin],
            auth_method,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": self.redirect_uris,
            "post_logout_redirect_uris": self.post_logout_redirect_uris,
            "token_endpoint_auth_method": self.auth_method.as_str(),
        })
    }
}

/// A running `oidc-provider`; the process is killed when this is dropped.
pub struct OidcProvider {
    // First field: dropped (killed) first, before `dir` is removed.
    process: Option<ChildGuard>,
    /// The loopback port it listens on (kept across [`OidcProvider::rotate_key`]).
    pub port: u16,
    /// The registered clients.
    pub clients: Vec<TestClient>,
    kid: String,
    /// The private JWKS file the current process signs with.
    jwks: PathBuf,
    dir: TempDir,
    log: PathBuf,
    generation: u32,
}

impl OidcProvider {
    /// Starts the provider with two clients redirecting to `redirect_uri`:
    /// [`TestClient::basic`] and [`TestClient::post`].
    pub async fn start(redirect_uri: &str) -> OidcProvider {
        OidcProvider::start_with_clients(vec![
            TestClient::basic(redirect_uri),
            TestClient::post(redirect_uri),
        ])
        .await
    }

    /// Starts the provider with these clients, a fresh signing key and a free port.
    pub async fn start_with_clients(clients: Vec<TestClient>) -> OidcProvider {
        OidcProvider::start_with_clients_on(free_addr().port(), clients).await
    }

    /// Starts the provider on a given loopback port (e.g. one a relying party was already
    /// pointed at while nothing listened there).
    pub async fn start_with_clients_on(port: u16, clients: Vec<TestClient>) -> OidcProvider {
        ensure_installed();
        let dir = TempDir::new("oidc-provider");
        let clients_file = dir.path().join("clients.json");
        let clients_json =
            serde_json::Value::Array(clients.iter().map(TestClient::to_json).collect());
        std::fs::write(&clients_file, clients_json.to_string()).expect("write clients.json");
        let mut provider = OidcProvider {
            port,
            clients,
            kid: String::new(),
            jwks: PathBuf::new(),
            log: dir.path().join("provider-0.log"),
            dir,
            generation: 0,
            process: None,
        };
        provider.launch(true).await;
        provider
    }

    /// The issuer, Auth0-style with a trailing slash: `http://127.0.0.1:PORT/`.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// `path` (with or without a leading slash) under the issuer.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.issuer(), path.trim_start_matches('/'))
    }

    /// The `kid` of the current signing key (the only key in its JWKS).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The client registered with `client_id`.
    pub fn client(&self, client_id: &str) -> &TestClient {
        self.clients
            .iter()
            .find(|client| client.client_id == client_id)
            .unwrap_or_else(|| panic!("no client {client_id}"))
    }

    /// Restarts the provider on the same port with a new signing key (an IdP key rotation) and
    /// returns the new `kid`. Its sessions, codes and tokens are gone afterwards.
    pub async fn rotate_key(&mut self) -> String {
        self.relaunch(true).await;
        self.kid.clone()
    }

    /// Restarts the provider on the same port with the same signing key (a crash or a deploy
    /// of the IdP). Its sessions, codes and tokens are gone afterwards.
    pub async fn restart(&mut self) {
        self.relaunch(false).await;
    }

    async fn relaunch(&mut self, new_key: bool) {
        self.process = None; // kill and reap the old process
        self.generation += 1;
        self.log = self
            .dir
            .path()
            .join(format!("provider-{}.log", self.generation));
        self.launch(new_key).await;
    }

    /// Kills the provider (an IdP outage); the port stays reserved in [`OidcProvider::port`].
    /// [`OidcProvider::restart`] or [`OidcProvider::rotate_key`] starts it again.
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// What the provider printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every token endpoint response so far (`access_token`, `id_token`, … or an `error`), in
    /// order: the tokens a relying party must never show in its output.
    pub fn token_responses(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("tokens.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("token response is not JSON ({e}): {line}"))
            })
            .collect()
    }

    async fn launch(&mut self, new_key: bool) {
        if new_key {
            self.jwks = self
                .dir
                .path()
                .join(format!("jwks-{}.json", self.generation));
            self.kid = generate_key(&self.jwks);
        }
        let log = std::fs::File::create(&self.log).expect("create provider log");
        let mut command = Command::new(node());
        command
            .arg("server.mjs")
            .current_dir(harness_dir())
            .env("PORT", self.port.to_string())
            .env("ISSUER", self.issuer())
            .env("JWKS_FILE", &self.jwks)
            .env("CLIENTS_FILE", self.dir.path().join("clients.json"))
            .env("DEMO_PASSWORD", DEMO_PASSWORD)
            .env("TOKEN_LOG", self.dir.path().join("tokens.log"))
            .env_remove("CLIENTS_JSON")
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        self.process = Some(ChildGuard::spawn("oidc-provider", &mut command));
        self.wait_ready().await;
    }

    /// Polls discovery until it answers 200 or the deadline passes; panics with the provider's
    /// output if it exits or never gets ready.
    async fn wait_ready(&mut self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("reqwest client");
        let discovery = self.url("/.well-known/openid-configuration");
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(process) = self.process.as_mut() {
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!(
                        "oidc-provider exited ({status}) before it was ready:\n{}",
                        self.output()
                    );
                }
            }
            if let Ok(response) = http.get(&discovery).send().await {
                if response.status() == StatusCode::OK {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "oidc-provider did not answer {discovery} within {STARTUP:?}:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `tests/oidc-provider` in this checkout.
pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("oidc-provider")
}

/// The node executable: `$NODE`, or `node` on the PATH.
fn node() -> String {
    std::env::var("NODE").unwrap_or_else(|_| "node".to_string())
}

/// Runs `npm ci` in the harness directory unless its `node_modules` is already there. Once per
/// test binary; panics with npm's output if it fails.
fn ensure_installed() {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _serialised = INSTALL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = harness_dir();
    if dir.join("node_modules/oidc-provider/package.json").exists() {
        return;
    }
    match Command::new(node()).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => panic!(
            "the oidc-provider harness needs Node.js (>= 18): `{}` did not run; install it or set NODE",
            node()
        ),
    }
    let npm = std::env::var("NPM").unwrap_or_else(|_| "npm".to_string());
    let output = Command::new(&npm)
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{npm} ci` in {}: {e}", dir.display()));
    if !output.status.success() {
        panic!(
            "`{npm} ci` failed in {} ({}):\n{}\n{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Writes a fresh RSA private JWKS to `path` with `gen-key.mjs`; returns its `kid`.
fn generate_key(path: &Path) -> String {
    let output = Command::new(node())
        .arg("gen-key.mjs")
        .arg(path)
        .current_dir(harness_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{} gen-key.mjs`: {e}", node()));
    assert!(
        output.status.success(),
        "gen-key.mjs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("kid is UTF-8")
        .trim()
        .to_string()
}

/// Why a scripted login did not reach the callback.
#[derive(Debug)]
pub enum LoginError {
    /// The provider showed its form again after the credentials were submitted (wrong password).
    Refused { status: StatusCode, body: String },
    /// Anything else: a page without a form, too many hops, a transport error.
    Unexpected(String),
}

/// Logs in as the demo user; panics if that fails. Returns the callback URL (with `code`, `state`).
pub async fn login_as_demo(authorize_url: &str, callback_prefix: &str) -> String {
    login(authorize_url, callback_prefix, DEMO_USERNAME, DEMO_PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("demo login via {authorize_url} failed: {e:?}"))
}

/// A browser-less login: follows redirects from `authorize_url` with a fresh cookie jar, fills
/// the first HTML form it meets with `username` / `password` (keeping its hidden fields),
/// submits it, and follows on until a redirect points at `callback_prefix`. Returns that
/// redirect's URL without requesting it, so nothing needs to listen at the callback.
///
/// Works with any provider whose login page is one plain form (this harness, the dev IdP).
pub async fn login(
    authorize_url: &str,
    callback_prefix: &str,
    username: &str,
    password: &str,
) -> Result<String, LoginError> {
    let browser = form_client();
    let unexpected = |what: String| LoginError::Unexpected(what);
    let mut url =
        Url::parse(authorize_url).map_err(|e| unexpected(format!("{authorize_url}: {e}")))?;
    let mut form: Option<Vec<(String, String)>> = None;
    let mut submitted = false;
    for _ in 0..MAX_HOPS {
        let request = match form.take() {
            Some(fields) => browser.post(url.clone()).form(&fields),
            None => browser.get(url.clone()),
        };
        let response = request
            .send()
            .await
            .map_err(|e| unexpected(format!("{url}: {e}")))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .ok_or_else(|| unexpected(format!("{status} from {url} without Location")))?;
            let next = url
                .join(location)
                .map_err(|e| unexpected(format!("bad Location {location}: {e}")))?;
            if next.as_str().starts_with(callback_prefix) {
                return Ok(next.to_string());
            }
            url = next;
            continue;
        }
        let body = response.text().await.unwrap_or_default();
        let Some(page) = HtmlForm::parse(&body) else {
            return Err(unexpected(format!(
                "{status} from {url} has no form:\n{body}"
            )));
        };
        if submitted {
            return Err(LoginError::Refused { status, body });
        }
        url = url
            .join(&page.action)
            .map_err(|e| unexpected(format!("bad form action {}: {e}", page.action)))?;
        let mut fields = page.hidden;
        fields.push(("username".to_string(), username.to_string()));
        fields.push(("password".to_string(), password.to_string()));
        form = Some(fields);
        submitted = true;
    }
    Err(unexpected(format!(
        "no redirect to {callback_prefix} within {MAX_HOPS} hops"
    )))
}

/// A client that keeps cookies and follows no redirect: each hop of a login is the caller's.
fn form_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// Completes an RP-initiated logout the way a browser would: GETs `end_session_url` (the
/// provider checks `id_token_hint`, `client_id` and `post_logout_redirect_uri` here and shows a
/// confirmation form with a hidden `xsrf`), submits the form with `logout=yes`, and returns the
/// URL the provider then redirects to (the relying party's post-logout page).
pub async fn confirm_logout(end_session_url: &str) -> Result<String, LoginError> {
    let browser = form_client();
    let unexpected = |what: String| LoginError::Unexpected(what);
    let url =
        Url::parse(end_session_url).map_err(|e| unexpected(format!("{end_session_url}: {e}")))?;
    let response = browser
        .get(url.clone())
        .send()
        .await
        .map_err(|e| unexpected(format!("{url}: {e}")))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let form = HtmlForm::parse(&body)
        .filter(|_| status == StatusCode::OK)
        .ok_or_else(|| unexpected(format!("{status} from {url} (no logout form):\n{body}")))?;
    let action = url
        .join(&form.action)
        .map_err(|e| unexpected(format!("bad form action {}: {e}", form.action)))?;
    let mut fields = form.hidden;
    // With an IdP session the page asks (the "Yes" button is outside the form); without one
    // it is an auto-submitting form that already carries `logout=yes`.
    if !fields.iter().any(|(name, _)| name == "logout") {
        fields.push(("logout".to_string(), "yes".to_string()));
    }
    let response = browser
        .post(action.clone())
        .form(&fields)
        .send()
        .await
        .map_err(|e| unexpected(format!("{action}: {e}")))?;
    let status = response.status();
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    match location {
        Some(location) if status.is_redirection() => action
            .join(&location)
            .map(|next| next.to_string())
            .map_err(|e| unexpected(format!("bad Location {location}: {e}"))),
        _ => Err(unexpected(format!(
            "{status} from {action} without a redirect:\n{}",
            response.text().await.unwrap_or_default()
        ))),
    }
}

/// The parts of a login form the driver needs.
struct HtmlForm {
    action: String,
    hidden: Vec<(String, String)>,
}

impl HtmlForm {
    /// The first `<form>` of `html`: its action (empty: the page itself) and hidden inputs.
    fn parse(html: &str) -> Option<HtmlForm> {
        let start = html.find("<form")?;
        let end = html[start..]
            .find("</form>")
            .map_or(html.len(), |at| start + at);
        let form = &html[start..end];
        let tag_end = form.find('>')?;
        let action = attribute(&form[..tag_end], "action").unwrap_or_default();
        let hidden = form
            .match_indices("<input")
            .filter_map(|(at, _)| {
                let tag = &form[at..at + form[at..].find('>')?];
                if !attribute(tag, "type").is_some_and(|t| t.eq_ignore_ascii_case("hidden")) {
                    return None;
                }
                Some((
                    attribute(tag, "name")?,
                    attribute(tag, "value").unwrap_or_default(),
                ))
            })
            .collect();
        Some(HtmlForm { action, hidden })
    }
}

/// The double-quoted value of `name="…"` in one tag, with HTML entities decoded.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let value = &tag[start..start + tag[start..].find('"')?];
    Some(
        value
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}
