//! The crate's error type: everything that stops the proxy from starting.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(
        "cannot listen on {addr} ({key}): {source}{hint}",
        hint = if source.kind() == std::io::ErrorKind::AddrInUse {
            " (another process holds it: another custodia-proxy? Use --upgrade to take over \
             from a running one)"
        } else {
            ""
        }
    )]
    Listen {
        addr: std::net::SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
    /// `--upgrade` with nothing to take over from.
    #[error("cannot --upgrade: {0}")]
    Upgrade(String),
    #[error("cannot write pid file {}: {source}", path.display())]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
}
