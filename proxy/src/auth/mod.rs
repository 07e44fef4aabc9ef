//! Edge authentication, the pure parts: no network, no Pingora `Session`, all unit-tested.
//!
//! ```text
//!  APP_SECRET_KEY (+ previous) ──▶ keys ──▶ seal ──┬──▶ session      (the signed-in user, every request)
//!                                                   ├──▶ login_state  (state/nonce/PKCE, /login → /callback)
//!                                                   └──▶ logout_hint  (the ID token, sent only to /logout)
//!  cookies           names, attributes, chunking, Cookie parsing, stripping ours before upstream
//!  redirect          `rd` → a safe same-origin path, or nothing
//!  policy            normalised path → public | optional | required
//!  trusted           whose X-Forwarded-For/-Proto/-Host we believe
//!  identity_headers  client identity headers and our cookies removed before upstream
//! ```
//!
//! The OIDC client and the /login, /callback, /logout endpoints build on these; the edge calls
//! `policy` → `cookies::read_session` → `session::open_session` on every request, through
//! `session_cache`, which remembers the cookies it opened lately (per thread).

pub mod cookies;
pub mod flow;
pub mod identity_headers;
pub mod keys;
pub mod login_state;
pub mod logout_hint;
pub mod oidc;
pub mod policy;
pub mod redirect;
pub mod seal;
pub mod session;
pub mod session_cache;
pub mod trusted;

pub use cookies::{cookie_text, read_cookie, strip_custodia_cookies, CookieError, CookieSettings};
pub use identity_headers::{remove_custodia_cookies, strip_client_identity, STRIPPED_HEADERS};
pub use keys::{KeyError, SecretKeys};
pub use login_state::{
    open_login_state, seal_login_state, LoginState, LoginStateError, LOGIN_STATE_TTL,
};
pub use logout_hint::{open_logout_hint, seal_logout_hint};
pub use policy::{normalise_path, PathError, Policy, RouteError, RouteTable};
pub use redirect::safe_return_target;
pub use seal::{seal, unseal, Purpose, SealError};
pub use session::{open_session, seal_session, Session, SessionError};
pub use session_cache::{ForwardedIdentity, SessionCache, Verified};
pub use trusted::{TrustedProxies, TrustedProxyError};
