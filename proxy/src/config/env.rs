//! Settings that come from the environment (secrets never live in the TOML file), and the
//! `.env` file of the working directory, read the way the seed's python-dotenv did.

use std::collections::HashMap;
use std::path::Path;

/// Where environment values come from; tests pass a map, the binary the process environment.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment, with `.env` values underneath (real variables win).
#[derive(Debug, Default)]
pub struct ProcessEnv {
    dotenv: HashMap<String, String>,
}

impl ProcessEnv {
    /// Reads `.env` in the working directory if there is one.
    pub fn with_dotenv() -> ProcessEnv {
        let dotenv = std::fs::read_to_string(Path::new(".env"))
            .map(|text| parse_dotenv(&text))
            .unwrap_or_default();
        ProcessEnv { dotenv }
    }
}

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .or_else(|| self.dotenv.get(name).cloned())
            .filter(|v| !v.is_empty())
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned().filter(|v| !v.is_empty())
    }
}

/// `KEY=VALUE` lines; `#` comments; optional `export `; single or double quotes.
pub fn parse_dotenv(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let mut value = value.trim();
        if let Some(unquoted) = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        {
            value = unquoted;
        } else if let Some((before, _comment)) = value.split_once(" #") {
            value = before.trim_end();
        }
        if !key.is_empty() {
            out.insert(key.to_string(), value.to_string());
        }
    }
    out
}

/// A secret value: compared and cloned like a string, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_seed_env_file() {
        let env = parse_dotenv(
            "# Auth0\nAUTH0_DOMAIN=tenant.eu.auth0.com\nexport AUTH0_CLIENT_ID=\"abc\"\n\
             AUTH0_CLIENT_SECRET='s3cret'\nAPP_SECRET_KEY=0123 # generated\nBROKEN LINE\n",
        );
        assert_eq!(env["AUTH0_DOMAIN"], "tenant.eu.auth0.com");
        assert_eq!(env["AUTH0_CLIENT_ID"], "abc");
        assert_eq!(env["AUTH0_CLIENT_SECRET"], "s3cret");
        assert_eq!(env["APP_SECRET_KEY"], "0123");
        assert_eq!(env.len(), 4);
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(
            format!("{:?}", Secret("hunter2".into())),
            "Secret(<redacted>)"
        );
    }
}
