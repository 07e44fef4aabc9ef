//! Custodia app worker: the seed's home page and JSON greeting API on hyper 1, behind custodia-proxy.
//!
//! A worker answers `GET /`, `/api/hello`, `/api/me` and `/healthz` (see [`routes`]). It trusts
//! who the user is only through the HS256 assertion the proxy signs ([`identity`]), never through
//! plain `X-Forwarded-*` headers. Run it with [`run_cli`] (what the binary does), in-process with
//! [`serve`], or call [`handle`] directly without a socket.
//!
//! ```text
//! CUSTODIA_ASSERTION_KEY=$(openssl rand -hex 32) custodia-app --listen 127.0.0.1:5001
//! curl -s 127.0.0.1:5001/api/hello     # greeting JSON with "worker"
//! curl -s 127.0.0.1:5001/api/me        # 401 unless the proxy vouched for the user
//! ```

pub mod cli;
pub mod page;
pub use custodia_probe as probe;
pub mod routes;
pub mod server;

pub use cli::run_cli;
pub use custodia_identity as identity;
pub use custodia_identity::{sign_assertion, verify_assertion, AssertionError, Identity};
pub use routes::{handle, AppSettings, AppState};
pub use server::{serve, serve_state};
