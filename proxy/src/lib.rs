//! custodia-proxy: the Custodia edge. Least-connections load balancing over app workers on
//! Pingora, with health checks, failover and nginx-compatible forwarding headers.
//!
//! Layout: [`config`] (file → validated model), [`runtime`] (the live snapshot),
//! [`balancer`] (pool, leases, health), [`edge`] (the request path on Pingora), [`express`]
//! (the fast path plain requests take), [`server`] (process).

pub mod access_log;
pub mod admin;
pub mod allocator;
pub mod auth;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod edge;
pub mod error;
pub mod express;
pub mod headers;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod open_files;
pub mod pages;
pub mod process_exit;
pub use custodia_probe as probe;
pub mod reload;
pub mod request_guard;
pub mod request_head;
pub mod running;
pub mod runtime;
pub mod server;
pub mod upgrade;
pub mod upstream_head;

pub use error::ProxyError;

pub use allocator::Allocator;
