//! The `custodia-proxy` binary's command line: `--check` on good and bad files, usage errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_custodia-proxy"))
        .args(args)
        .output()
        .expect("run custodia-proxy")
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/custodia.toml")
}

fn with_file(name: &str, text: &str, f: impl FnOnce(&Path)) {
    let dir = std::env::temp_dir().join(format!("custodia-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    f(&path);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_accepts_the_shipped_config_and_prints_a_summary() {
    let out = proxy(&["--config", shipped_config().to_str().unwrap(), "--check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("least_conn over 3 backend(s)"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:9001"), "{stdout}");
}

#[test]
fn bad_configs_exit_1_naming_the_key_and_line() {
    let cases = [
        ("duration", "[upstream]\nbackends = [\"127.0.0.1:1\"]\nread_timeout = \"forever\"\n", "upstream.read_timeout", ":3"),
        ("unknown", "[upstream]\nbackends = [\"127.0.0.1:1\"]\n[server]\nlisten = \"127.0.0.1:1\"\nworkers = 4\n", "workers", ":5"),
        ("empty", "[upstream]\nbackends = []\n", "upstream.backends", ":2"),
        ("address", "[upstream]\nbackends = [\"127.0.0.1\"]\n", "upstream.backends", ":2"),
        ("type", "[server]\nthreads = \"many\"\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n", "server.threads", ":2"),
    ];
    for (name, text, key, line) in cases {
        with_file(name, text, |path| {
            for args in [vec!["--check"], vec![]] {
                let mut all = vec!["--config", path.to_str().unwrap()];
                all.extend(args.iter().copied());
                let out = proxy(&all);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
                assert!(stderr.contains(key), "{name}: key {key} named in: {stderr}");
                assert!(
                    stderr.contains(&format!("{}{line}", path.display())),
                    "{name}: line in: {stderr}"
                );
                assert!(!stderr.contains("panicked"), "{name}: {stderr}");
            }
        });
    }
}

#[test]
fn a_missing_file_or_flag_is_a_clear_error() {
    let out = proxy(&["--config", "/nonexistent/custodia.toml", "--check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
    let out = proxy(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config FILE is required"));
    let out = proxy(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}
