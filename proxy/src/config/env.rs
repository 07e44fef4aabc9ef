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
    /// Reads `.env` in the working directory if there is one; one that cannot be read, or is
    /// not UTF-8, is an error (ignored, its secrets would be reported missing instead).
    pub fn load_dotenv() -> Result<ProcessEnv, DotenvError> {
        match std::fs::read(Path::new(".env")) {
            Ok(bytes) => Ok(ProcessEnv {
                dotenv: parse_dotenv(dotenv_text(&bytes)?),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProcessEnv::default()),
            Err(e) => Err(DotenvError {
                line: None,
                message: format!("cannot read it: {e}"),
            }),
        }
    }

    /// [`ProcessEnv::load_dotenv`] for callers that only look ahead (the local stack's plan):
    /// without `.env` when it is unreadable, as the proxy that then starts reports.
    pub fn with_dotenv() -> ProcessEnv {
        ProcessEnv::load_dotenv().unwrap_or_default()
    }
}

/// Why `.env` could not be used.
#[derive(Debug)]
pub struct DotenvError {
    pub line: Option<usize>,
    pub message: String,
}

fn dotenv_text(bytes: &[u8]) -> Result<&str, DotenvError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        DotenvError {
            line: Some(valid.iter().filter(|&&b| b == b'\n').count() + 1),
            message: "not UTF-8 (save it as UTF-8)".to_string(),
        }
    })
}

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        // Empty is unset, in the process environment too: Compose passes `${VAR}` of an unset
        // variable as an empty one, which must not hide the value `.env` gives.
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
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
        let value = unquoted(value.trim());
        if !key.is_empty() {
            out.insert(key.to_string(), value.to_string());
        }
    }
    out
}

/// A value as written after `=`: inside its quotes when quoted (`"a b" # note` is `a b`),
/// else up to a ` #` comment.
fn unquoted(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote) {
            if let Some((inside, after)) = inner.split_once(quote) {
                let after = after.trim_start();
                if after.is_empty() || after.starts_with('#') {
                    return inside;
                }
            }
            return value;
        }
    }
    match value.split_once(" #") {
        Some((before, _comment)) => before.trim_end(),
        None => value,
    }
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
    fn quoted_values_end_at_their_quote_and_comments_are_not_values() {
        let env = parse_dotenv(
            "AUTH0_CLIENT_ID=\"cid\" # the SPA's\nA='x # y'  # note\nB=\"un\"closed\nC=plain # note\n",
        );
        assert_eq!(env["AUTH0_CLIENT_ID"], "cid");
        assert_eq!(env["A"], "x # y");
        assert_eq!(
            env["B"], "\"un\"closed",
            "not a quoted value: kept as written"
        );
        assert_eq!(env["C"], "plain");
    }

    #[test]
    fn a_dotenv_that_is_not_utf8_is_an_error_with_its_line() {
        let error = dotenv_text(b"A=1\n# caf\xe9\nB=2\n").unwrap_err();
        assert_eq!(error.line, Some(2));
        assert!(error.message.contains("UTF-8"), "{}", error.message);
        assert_eq!(dotenv_text(b"A=caf\xc3\xa9\n").unwrap(), "A=café\n");
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(
            format!("{:?}", Secret("hunter2".into())),
            "Secret(<redacted>)"
        );
    }
}
