//! Configuration text through what `--check` runs (parse, validate, summary): `Ok` or `Err`,
//! never a panic. Seed the corpus with `config/custodia.toml` (see README.md).
#![no_main]

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use custodia_proxy::config::{parse_with_env, summary};
use libfuzzer_sys::fuzz_target;

fn env() -> &'static HashMap<String, String> {
    static ENV: OnceLock<HashMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        [
            ("APP_SECRET_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f"),
            ("AUTH0_CLIENT_SECRET", "fuzz-client-secret"),
            ("AUTH0_CLIENT_ID", "fuzz-client"),
            ("CUSTODIA_AUTH_ISSUER", "http://127.0.0.1:1/"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    })
}

fuzz_target!(|text: &str| {
    if let Ok(config) = parse_with_env(text, Path::new("fuzz.toml"), env()) {
        let _ = summary(&config);
    }
});
