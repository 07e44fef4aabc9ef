//! An edge-authentication stack for tests, and the login dance through it.
//!
//! [`AuthStack`] runs the certified IdP (npm `oidc-provider`, see [`super::oidc_provider`]), the
//! upstream — real `custodia app` workers (one by default) that verify identity assertions, or the
//! [`EchoServer`] that shows what the proxy forwarded — and a proxy with an `[auth]` section whose
//! `public_url` is the proxy's own loopback address. [`AuthConfig`] chooses the knobs.
//!
//! ```ignore
//! let stack = AuthConfig::new().client(AuthMethod::ClientSecretPost).start().await;
//! let browser = stack.browser();                          // CookieClient for the proxy's origin
//! let reply = stack.login(&browser, Some("/api/me")).await; // /login → IdP form → /callback
//! stack.assert_signed_in(&browser).await;
//! ```

// Test support: a failed step panics with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::{StatusCode, Url};

use super::custodia::{upstream_section, Proxy, Worker};
use super::echo::EchoServer;
use super::http::{form_encode, query_param, CookieClient, Reply, SetCookie};
use super::oidc_provider::{
    login_as_demo, AuthMethod, OidcProvider, TestClient, DEMO_EMAIL, DEMO_SUB,
};
use super::process::{eventually, eventually_async, free_addr, port_closed};

/// The key proxy and worker share for identity assertions (`CUSTODIA_ASSERTION_KEY`).
pub const ASSERTION_KEY: &str = "custodia-test-assertion-key-0123456789abcdef";
/// The session sealing key (`APP_SECRET_KEY`), 32 bytes as `openssl rand -hex 32` prints them.
pub const APP_SECRET_KEY: &str = "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f8a1c3e5f7b9d0a2c";
/// Another session key, for rotation and wrong-key tests.
pub const OTHER_APP_SECRET_KEY: &str =
    "c3a1e5f7b9d0a2c45f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f";
/// The demo user's display name at the IdP harness.
pub const DEMO_NAME: &str = "Demo User";
/// What the worker's home page says to the signed-in demo user.
pub const SIGNED_IN_GREETING: &str = "Welcome to this space... Demo User!";
/// What the worker's home page says without a verified identity.
pub const GUEST_GREETING: &str = "Welcome.... Guest!!!";

/// How long the proxy may take to load the IdP metadata after starting.
const READY: Duration = Duration::from_secs(30);

/// True for the session cookie and its chunks (`custodia_session`, `custodia_session.0`, …,
/// and the `__Host-` forms used over https).
pub fn is_session_cookie(name: &str) -> bool {
    let name = name.strip_prefix("__Host-").unwrap_or(name);
    name == "custodia_session" || name.starts_with("custodia_session.")
}

/// True for a per-login state cookie (`custodia_login_<id>`).
pub fn is_login_cookie(name: &str) -> bool {
    let name = name.strip_prefix("__Host-").unwrap_or(name);
    name.starts_with("custodia_login_")
}

/// What the proxy forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// `custodia app` workers started with [`ASSERTION_KEY`] ([`AuthConfig::workers`] of them).
    Worker,
    /// The [`EchoServer`]: every response is the request it received, as JSON.
    Echo,
}

/// Whether the IdP is running when the proxy starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdpAtStart {
    Running,
    /// The issuer names a free port where nothing listens; [`AuthStack::start_idp`] starts the
    /// provider there later.
    Down,
}

/// The knobs of an [`AuthStack`]; `AuthConfig::new()` is the documented example config with the
/// `client_secret_basic` client.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Which registered client the proxy is (`custodia-basic` or `custodia-post`).
    pub client: AuthMethod,
    /// `[auth] client_auth`; `None` leaves it out (the proxy follows discovery).
    pub client_auth: Option<AuthMethod>,
    pub session_ttl: String,
    pub allowed_emails: Vec<String>,
    pub allowed_domains: Vec<String>,
    /// `None` leaves `trusted_proxies` out (the default: loopback).
    pub trusted_proxies: Option<Vec<String>>,
    pub default_policy: String,
    /// `[[route]]` (prefix, policy) pairs.
    pub routes: Vec<(String, String)>,
    pub upstream: Upstream,
    pub app_secret_key: String,
    pub app_secret_key_previous: Option<String>,
    pub idp_at_start: IdpAtStart,
    /// `public_url` is `https://127.0.0.1:PORT` (as behind a TLS-terminating tunnel) while the
    /// tests still talk plain http to the proxy.
    pub public_https: bool,
    /// How many workers with [`Upstream::Worker`] (`w-auth`, `w-auth-2`, …).
    pub workers: usize,
    /// `[log] access_log`; off for load tests, whose access log would flood the output.
    pub access_log: bool,
    /// The proxy's `RUST_LOG` (default `info`).
    pub proxy_log: String,
    /// Keep the proxy's and the worker's output for [`AuthStack::output`].
    pub capture_output: bool,
    /// `RUST_LOG` for the proxy and the worker; `None`: `info` for the proxy, `warn` for the
    /// worker.
    pub rust_log: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            client: AuthMethod::ClientSecretBasic,
            client_auth: Some(AuthMethod::ClientSecretBasic),
            session_ttl: "8h".to_string(),
            allowed_emails: Vec::new(),
            allowed_domains: Vec::new(),
            trusted_proxies: Some(vec!["127.0.0.1/32".to_string()]),
            default_policy: "required".to_string(),
            routes: vec![
                ("/".to_string(), "optional".to_string()),
                ("/public/".to_string(), "public".to_string()),
                ("/api/".to_string(), "required".to_string()),
            ],
            upstream: Upstream::Worker,
            app_secret_key: APP_SECRET_KEY.to_string(),
            app_secret_key_previous: None,
            idp_at_start: IdpAtStart::Running,
            public_https: false,
            workers: 1,
            access_log: true,
            proxy_log: "info".to_string(),
            capture_output: false,
            rust_log: None,
        }
    }
}

impl AuthConfig {
    pub fn new() -> AuthConfig {
        AuthConfig::default()
    }

    /// Use this registered client, and say so in `client_auth`.
    pub fn client(mut self, method: AuthMethod) -> Self {
        self.client = method;
        self.client_auth = Some(method);
        self
    }

    /// Leave `client_auth` out of the file.
    pub fn client_auth_from_discovery(mut self) -> Self {
        self.client_auth = None;
        self
    }

    pub fn session_ttl(mut self, ttl: &str) -> Self {
        self.session_ttl = ttl.to_string();
        self
    }

    pub fn allowed_emails(mut self, emails: &[&str]) -> Self {
        self.allowed_emails = emails.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn allowed_domains(mut self, domains: &[&str]) -> Self {
        self.allowed_domains = domains.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn trusted_proxies(mut self, cidrs: &[&str]) -> Self {
        self.trusted_proxies = Some(cidrs.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstream = upstream;
        self
    }

    /// An `https://` public URL (cookies get `Secure` and the `__Host-` prefix).
    pub fn public_https(mut self) -> Self {
        self.public_https = true;
        self
    }

    /// Keep what the proxy and the worker print, for [`AuthStack::output`].
    pub fn capture_output(mut self) -> Self {
        self.capture_output = true;
        self
    }

    /// `RUST_LOG` for both the proxy and the worker.
    pub fn rust_log(mut self, directives: &str) -> Self {
        self.rust_log = Some(directives.to_string());
        self
    }

    pub fn idp_down_at_start(mut self) -> Self {
        self.idp_at_start = IdpAtStart::Down;
        self
    }

    /// Balance over `n` workers (with [`Upstream::Worker`]).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    pub fn without_access_log(mut self) -> Self {
        self.access_log = false;
        self
    }

    /// The proxy's `RUST_LOG` directives.
    pub fn proxy_log(mut self, directives: &str) -> Self {
        self.proxy_log = directives.to_string();
        self
    }

    pub async fn start(self) -> AuthStack {
        AuthStack::start(self).await
    }

    fn client_id(&self) -> &'static str {
        match self.client {
            AuthMethod::ClientSecretBasic => "custodia-basic",
            AuthMethod::ClientSecretPost => "custodia-post",
        }
    }

    fn client_secret(&self) -> &'static str {
        match self.client {
            AuthMethod::ClientSecretBasic => "custodia-basic-secret",
            AuthMethod::ClientSecretPost => "custodia-post-secret",
        }
    }

    /// `[auth]` and `[[route]]` TOML for an issuer and public URL.
    pub fn auth_toml(&self, issuer: &str, public_url: &str) -> String {
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", quoted.join(", "))
        };
        let mut toml = format!(
            "[auth]\nissuer = {issuer:?}\nclient_id = {client_id:?}\npublic_url = {public_url:?}\n\
             scopes = [\"openid\", \"profile\", \"email\"]\nsession_ttl = {ttl:?}\n\
             allowed_emails = {emails}\nallowed_domains = {domains}\ndefault_policy = {policy:?}\n",
            client_id = self.client_id(),
            ttl = self.session_ttl,
            emails = list(&self.allowed_emails),
            domains = list(&self.allowed_domains),
            policy = self.default_policy,
        );
        if let Some(proxies) = &self.trusted_proxies {
            toml.push_str(&format!("trusted_proxies = {}\n", list(proxies)));
        }
        if let Some(method) = self.client_auth {
            toml.push_str(&format!("client_auth = {:?}\n", method.as_str()));
        }
        if !self.access_log {
            toml.push_str("\n[log]\naccess_log = false\n");
        }
        for (prefix, policy) in &self.routes {
            toml.push_str(&format!(
                "\n[[route]]\nprefix = {prefix:?}\npolicy = {policy:?}\n"
            ));
        }
        toml
    }
}

/// A login started at the proxy and not yet finished.
#[derive(Debug)]
pub struct PendingLogin {
    /// Where `/login` redirected: the IdP's authorize endpoint with all parameters.
    pub authorize_url: Url,
    pub state: String,
    pub nonce: String,
    /// The `custodia_login_*` cookies this `/login` set, (name, value).
    pub login_cookies: Vec<(String, String)>,
    /// The `/login` response.
    pub reply: Reply,
}

/// IdP + upstream + proxy with `[auth]`; everything is stopped when dropped.
pub struct AuthStack {
    // Declaration order is drop order: the proxy goes first.
    proxy: Option<Proxy>,
    /// The workers with [`Upstream::Worker`], in config order.
    pub workers: Vec<Worker>,
    pub echo: Option<EchoServer>,
    idp: Option<OidcProvider>,
    pub config: AuthConfig,
    /// The proxy's public listener (kept across [`AuthStack::restart_proxy`]).
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT` (or `https://…` with [`AuthConfig::public_https`]), no trailing
    /// slash.
    pub public_url: String,
    idp_port: u16,
}

impl AuthStack {
    pub async fn start(config: AuthConfig) -> AuthStack {
        let addr = free_addr();
        let scheme = if config.public_https { "https" } else { "http" };
        let public_url = format!("{scheme}://{addr}");
        let (idp, idp_port) = match config.idp_at_start {
            IdpAtStart::Running => {
                let idp = OidcProvider::start(&format!("{public_url}/callback")).await;
                let port = idp.port;
                (Some(idp), port)
            }
            IdpAtStart::Down => (None, free_addr().port()),
        };
        let (workers, echo) = match config.upstream {
            Upstream::Worker => {
                let rust_log = config.rust_log.as_deref().unwrap_or("warn");
                let env = [
                    ("CUSTODIA_ASSERTION_KEY", ASSERTION_KEY),
                    ("RUST_LOG", rust_log),
                ];
                let workers = (1..=config.workers)
                    .map(|n| {
                        let id = if n == 1 {
                            "w-auth".to_string()
                        } else {
                            format!("w-auth-{n}")
                        };
                        if config.capture_output {
                            Worker::start_capturing(&id, &env)
                        } else {
                            Worker::start_with_env(&id, &env)
                        }
                    })
                    .collect();
                (workers, None)
            }
            Upstream::Echo => (Vec::new(), Some(EchoServer::start())),
        };
        let mut stack = AuthStack {
            proxy: None,
            workers,
            echo,
            idp,
            config,
            addr,
            public_url,
            idp_port,
        };
        stack.launch_proxy();
        if stack.idp.is_some() {
            stack.wait_ready().await;
        }
        stack
    }

    /// Every upstream with weight 1: the workers, or the echo server.
    pub fn upstreams(&self) -> Vec<(SocketAddr, u32)> {
        match &self.echo {
            Some(echo) => vec![(echo.addr, 1)],
            None => self.workers.iter().map(|w| (w.addr, 1)).collect(),
        }
    }

    /// The issuer URL the proxy is configured with (`http://127.0.0.1:PORT/`).
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}/", self.idp_port)
    }

    /// `path` under the issuer.
    pub fn idp_url(&self, path: &str) -> String {
        format!("{}{}", self.issuer(), path.trim_start_matches('/'))
    }

    /// The proxy's config file sections (everything but `[server]` / `[admin]`).
    pub fn sections(&self) -> String {
        self.sections_for(&self.upstreams())
    }

    /// The config file sections with another backend list (for reloads).
    pub fn sections_for(&self, backends: &[(SocketAddr, u32)]) -> String {
        // These tests run dozens of logins a minute from one loopback client; the login rate
        // limit has its own tests (tests/abuse_limits.rs) and must not interfere here.
        format!(
            "{}\n[limits]\nlogin_rate_per_minute = 10000\n\n{}",
            upstream_section("least_conn", backends),
            self.config.auth_toml(&self.issuer(), &self.public_url)
        )
    }

    /// The environment the proxy runs with: its secrets and `RUST_LOG`.
    pub fn proxy_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (
                "AUTH0_CLIENT_SECRET",
                self.config.client_secret().to_string(),
            ),
            ("APP_SECRET_KEY", self.config.app_secret_key.clone()),
            ("CUSTODIA_ASSERTION_KEY", ASSERTION_KEY.to_string()),
            (
                "RUST_LOG",
                self.config
                    .rust_log
                    .clone()
                    .unwrap_or_else(|| self.config.proxy_log.clone()),
            ),
        ];
        if let Some(previous) = &self.config.app_secret_key_previous {
            env.push(("APP_SECRET_KEY_PREVIOUS", previous.clone()));
        }
        env
    }

    fn launch_proxy(&mut self) {
        let sections = self.sections();
        let env = self.proxy_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.proxy = Some(if self.config.capture_output {
            Proxy::start_at_capturing(self.addr, &sections, &env)
        } else {
            Proxy::start_at(self.addr, &sections, &env)
        });
    }

    /// What the proxy and the worker printed so far (needs [`AuthConfig::capture_output`]).
    pub fn output(&self) -> String {
        let mut all = self.proxy().output();
        for worker in &self.workers {
            all.push('\n');
            all.push_str(&worker.output());
        }
        all
    }

    /// Rewrites the proxy's config with `backends` and reloads it, by SIGHUP or by
    /// `custodia proxy --reload` (which must succeed).
    pub fn reload_with(&self, backends: &[(SocketAddr, u32)], by_command: bool) {
        let proxy = self.proxy();
        proxy.rewrite(&self.sections_for(backends));
        if by_command {
            let env = self.proxy_env();
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let out = proxy.reload_command(&env);
            assert!(
                out.status.success(),
                "custodia proxy --reload: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            proxy.sighup();
        }
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("the proxy is running")
    }

    pub fn proxy_mut(&mut self) -> &mut Proxy {
        self.proxy.as_mut().expect("the proxy is running")
    }

    /// Stops the proxy, lets `change` edit the config, and starts it again on the same port
    /// (sessions live in cookies, so they survive if the keys allow).
    pub async fn restart_proxy(&mut self, change: impl FnOnce(&mut AuthConfig)) {
        self.proxy = None;
        let addr = self.addr;
        eventually(
            "the old proxy's port to close",
            Duration::from_secs(10),
            || port_closed(addr).then_some(()),
        );
        change(&mut self.config);
        self.launch_proxy();
        if self.idp.is_some() {
            self.wait_ready().await;
        }
    }

    /// Waits until the admin `/readyz` answers 200 (IdP metadata loaded, a backend healthy).
    pub async fn wait_ready(&self) {
        let url = self.proxy().admin_url("/readyz");
        let http = plain_client();
        eventually_async("the proxy's /readyz to answer 200", READY, || {
            let request = http.get(&url).send();
            async move {
                let response = request.await.ok()?;
                (response.status() == StatusCode::OK).then_some(())
            }
        })
        .await;
    }

    /// The admin `/readyz` status right now.
    pub async fn readyz(&self) -> StatusCode {
        plain_client()
            .get(self.proxy().admin_url("/readyz"))
            .send()
            .await
            .expect("GET /readyz")
            .status()
    }

    pub fn idp(&self) -> &OidcProvider {
        self.idp.as_ref().expect("the IdP was started")
    }

    pub fn idp_mut(&mut self) -> &mut OidcProvider {
        self.idp.as_mut().expect("the IdP was started")
    }

    /// Starts the IdP on another port and reloads the proxy with it as its issuer (an operator
    /// fixing a wrong issuer).
    #[allow(dead_code)]
    pub async fn start_idp_elsewhere_and_reload(&mut self) {
        self.idp_port = free_addr().port();
        self.start_idp().await;
        self.reload_with(&self.upstreams(), false);
    }

    /// Starts the IdP on the issuer's port (after [`AuthConfig::idp_down_at_start`]).
    pub async fn start_idp(&mut self) {
        let callback = format!("{}/callback", self.public_url);
        self.idp = Some(
            OidcProvider::start_with_clients_on(
                self.idp_port,
                vec![TestClient::basic(&callback), TestClient::post(&callback)],
            )
            .await,
        );
    }

    /// A new browser-like client for the proxy (always plain http to its listener), with an
    /// empty jar.
    pub fn browser(&self) -> CookieClient {
        CookieClient::new(&format!("http://{}", self.addr))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.public_url)
    }

    /// `public_url + "/callback"`, the registered redirect URI.
    pub fn callback_url(&self) -> String {
        format!("{}/callback", self.public_url)
    }

    /// `GET /login[?rd=…]` as a browser; asserts the redirect to the IdP's authorize endpoint.
    pub async fn begin_login(&self, browser: &CookieClient, rd: Option<&str>) -> PendingLogin {
        let path = match rd {
            Some(rd) => format!("/login?rd={}", form_encode(rd)),
            None => "/login".to_string(),
        };
        let reply = browser.get_html(&path).await;
        assert_eq!(
            reply.status,
            StatusCode::FOUND,
            "GET {path} redirects to the IdP: {}",
            reply.describe()
        );
        let authorize_url = reply.redirect_target();
        let authorize_endpoint = self.idp_url("authorize");
        assert!(
            authorize_url.as_str().starts_with(&authorize_endpoint),
            "GET {path} redirects to {authorize_endpoint}, not {authorize_url}"
        );
        let state = query_param(&authorize_url, "state")
            .unwrap_or_else(|| panic!("no state in {authorize_url}"));
        let nonce = query_param(&authorize_url, "nonce")
            .unwrap_or_else(|| panic!("no nonce in {authorize_url}"));
        let login_cookies: Vec<(String, String)> = reply
            .set_cookies()
            .into_iter()
            .filter(|c| is_login_cookie(&c.name) && !c.is_removal())
            .map(|c| (c.name, c.value))
            .collect();
        assert!(
            !login_cookies.is_empty(),
            "GET {path} sets a custodia_login_* cookie; Set-Cookie: {:?}",
            reply
                .set_cookies()
                .iter()
                .map(|c| c.raw.clone())
                .collect::<Vec<_>>()
        );
        PendingLogin {
            authorize_url,
            state,
            nonce,
            login_cookies,
            reply,
        }
    }

    /// Signs in at the IdP as the demo user; returns the callback URL it sends the browser to
    /// (not yet requested).
    /// With an https public URL the callback is rewritten to http: the test talks to the
    /// proxy's listener directly, where a tunnel would have terminated TLS.
    pub async fn authorize_at_idp(&self, authorize_url: &Url) -> Url {
        let callback = login_as_demo(authorize_url.as_str(), &self.callback_url()).await;
        let mut callback = Url::parse(&callback).expect("callback URL");
        if callback.scheme() == "https" {
            callback.set_scheme("http").expect("http scheme");
        }
        callback
    }

    /// The whole login: `/login?rd=…` → IdP form → `GET /callback`. Asserts the callback
    /// redirects and sets a session cookie; returns the callback's response.
    pub async fn login(&self, browser: &CookieClient, rd: Option<&str>) -> Reply {
        let pending = self.begin_login(browser, rd).await;
        let callback = self.authorize_at_idp(&pending.authorize_url).await;
        let reply = browser.get_html(callback.as_str()).await;
        assert_eq!(
            reply.status,
            StatusCode::FOUND,
            "the callback redirects after a good login: {}",
            reply.describe()
        );
        assert!(
            !session_set_cookies(&reply).is_empty(),
            "the callback sets the session cookie; Set-Cookie: {:?}",
            reply
                .set_cookies()
                .iter()
                .map(|c| c.raw.clone())
                .collect::<Vec<_>>()
        );
        reply
    }

    /// `/api/me` is 200 with the demo identity and `/` greets the demo user.
    pub async fn assert_signed_in(&self, browser: &CookieClient) {
        let me = browser.get_json("/api/me").await;
        assert_eq!(
            me.status,
            StatusCode::OK,
            "/api/me with a session: {}",
            me.describe()
        );
        let me = me.json();
        assert_eq!(me["sub"], DEMO_SUB, "/api/me: {me}");
        assert_eq!(me["email"], DEMO_EMAIL, "/api/me: {me}");
        assert_eq!(me["name"], DEMO_NAME, "/api/me: {me}");
        let home = browser.get_html("/").await;
        assert_eq!(
            home.status,
            StatusCode::OK,
            "/ with a session: {}",
            home.describe()
        );
        assert!(
            home.body.contains(SIGNED_IN_GREETING),
            "/ greets the user: {}",
            home.describe()
        );
        assert!(
            home.body.contains("href=\"/logout\""),
            "/ offers Logout: {}",
            home.describe()
        );
    }

    /// `/api/me` is 401 and `/` is the guest page (`context` explains why, for messages).
    pub async fn assert_guest(&self, browser: &CookieClient, context: &str) {
        let me = browser.get_json("/api/me").await;
        assert_eq!(
            me.status,
            StatusCode::UNAUTHORIZED,
            "{context}: /api/me is 401: {}",
            me.describe()
        );
        let home = browser.get_html("/").await;
        assert_eq!(
            home.status,
            StatusCode::OK,
            "{context}: / is the guest page: {}",
            home.describe()
        );
        assert!(
            home.body.contains(GUEST_GREETING) && !home.body.contains(SIGNED_IN_GREETING),
            "{context}: / shows Guest: {}",
            home.describe()
        );
    }
}

impl AuthStack {
    /// `custodia_auth_session_checks_total{result="…"}` (valid, absent, expired, invalid).
    pub async fn session_checks(&self, result: &str) -> f64 {
        let wanted = format!("result=\"{result}\"");
        self.proxy()
            .metric("custodia_auth_session_checks_total")
            .await
            .into_iter()
            .filter(|(labels, _)| labels.contains(&wanted))
            .map(|(_, value)| value)
            .sum()
    }

    /// The sum of every sample of a metric (0 when absent).
    pub async fn metric_total(&self, name: &str) -> f64 {
        self.proxy()
            .metric(name)
            .await
            .into_iter()
            .map(|(_, value)| value)
            .sum()
    }
}

/// The `Set-Cookie`s of `reply` that set (not delete) a session cookie or chunk.
pub fn session_set_cookies(reply: &Reply) -> Vec<SetCookie> {
    reply
        .set_cookies()
        .into_iter()
        .filter(|c| is_session_cookie(&c.name) && !c.is_removal())
        .collect()
}

/// The session cookies (name, value) in `browser`'s jar.
pub fn session_cookies(browser: &CookieClient) -> Vec<(String, String)> {
    browser
        .cookies()
        .into_iter()
        .filter(|(name, _)| is_session_cookie(name))
        .collect()
}

fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .expect("reqwest client")
}
