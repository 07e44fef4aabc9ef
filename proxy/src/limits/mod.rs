//! Abuse limits (`[limits]`): open connections and slow clients ([`connection`]; the admin
//! listener's own in [`admin_gate`]), what an idle
//! keep-alive client costs ([`parking`]), login requests per client ([`login_rate`]). Request heads and body sizes: [`crate::request_guard`].

mod admin_gate;
pub mod connection;
pub mod login_rate;
mod parking;
mod shutdown;

pub use admin_gate::{AdminGate, ADMIN_KEEPALIVE, MAX_ADMIN_CONNECTIONS};
pub use connection::{ClientStream, ConnectionGate};
pub use login_rate::LoginRate;
pub use shutdown::ShutdownSignal;
