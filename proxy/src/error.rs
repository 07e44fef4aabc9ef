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
        hint = match (source.kind(), *key) {
            // The public addresses are checked first: these being free means no proxy of this
            // file runs, so --upgrade has nothing to take over.
            (std::io::ErrorKind::AddrInUse, "admin.listen") => {
                " (another process holds it; the admin listener needs an address of its own)"
            }
            (std::io::ErrorKind::AddrInUse, _) => {
                " (another process holds it: another custodia-proxy? Use --upgrade to take \
                 over from a running one)"
            }
            _ => "",
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
    /// `server.upgrade_sock` that an upgrade could not bind, or would delete.
    #[error("cannot use server.upgrade_sock {}: {problem}", path.display())]
    UpgradeSock { path: PathBuf, problem: String },
    /// `server.pid_file` that is not this process's to write: no pid file, or a serving
    /// proxy's.
    #[error("cannot use server.pid_file {}: {problem}", path.display())]
    PidFileTaken { path: PathBuf, problem: String },
    #[error("cannot write pid file {}: {source}", path.display())]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_hint_is_given_only_where_it_applies() {
        let taken = |key| {
            ProxyError::Listen {
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9090)),
                key,
                source: std::io::ErrorKind::AddrInUse.into(),
            }
            .to_string()
        };
        assert!(taken("server.listen").contains("Use --upgrade"));
        let admin = taken("admin.listen");
        assert!(
            !admin.contains("upgrade") && admin.contains("an address of its own"),
            "{admin}"
        );
    }
}
