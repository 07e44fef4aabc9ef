//! Configuration: the TOML file model ([`file`]), its validation ([`validate`]) into the
//! runtime model ([`model`]) that the request path reads, and the `--check` summary.

mod auth;
pub mod env;
pub mod file;
mod locate;
pub mod model;
mod summary;
pub mod validate;
mod warnings;

use std::path::PathBuf;

pub use model::*;
pub use summary::summary;
pub use validate::{load, load_with_env, parse, parse_with_env};
pub use warnings::risky_settings;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", format_invalid(path, *line, key, message))]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        /// Dotted key path, e.g. `upstream.health.interval`; empty for file-level errors.
        key: String,
        message: String,
    },
}

fn format_invalid(path: &std::path::Path, line: Option<usize>, key: &str, message: &str) -> String {
    let mut out = path.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    if !key.is_empty() {
        out.push_str(&format!(": key `{key}`"));
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

#[cfg(test)]
mod tests;
