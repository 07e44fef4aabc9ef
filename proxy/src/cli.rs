//! The command line: `custodia-proxy --config FILE [--check | --upgrade]`.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config;
use crate::server::{self, StartOptions};

const USAGE: &str = "\
usage: custodia-proxy --config FILE [--check] [--upgrade]

  --config FILE   the TOML configuration (see config/README.md)
  --check         validate FILE, print a summary and exit (0 valid, 1 invalid)
  --upgrade       take the listening sockets over from a running custodia-proxy
                  (start this, then send SIGQUIT to the old process)
  --help          this text
  --version       the version

signals: SIGTERM drains within server.grace_period, SIGINT stops at once,
         SIGQUIT hands the listeners to a process started with --upgrade";

#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    config: Option<PathBuf>,
    check: bool,
    upgrade: bool,
    help: bool,
    version: bool,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut parsed = Args::default();
    let mut args = args.into_iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        match text.as_str() {
            "--config" | "-c" => {
                let value = args.next().ok_or("--config needs a file path")?;
                parsed.config = Some(PathBuf::from(value));
            }
            "--check" | "-t" => parsed.check = true,
            "--upgrade" | "-u" => parsed.upgrade = true,
            "--help" | "-h" => parsed.help = true,
            "--version" | "-V" => parsed.version = true,
            _ => match text.strip_prefix("--config=") {
                Some(path) if !path.is_empty() => parsed.config = Some(PathBuf::from(path)),
                _ => return Err(format!("unknown argument `{text}`")),
            },
        }
    }
    if parsed.check && parsed.upgrade {
        return Err("--check and --upgrade cannot be combined".into());
    }
    Ok(parsed)
}

/// Run the binary; returns the process exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("custodia-proxy: {message}\n\n{USAGE}");
            return 2;
        }
    };
    let Args {
        config,
        check,
        upgrade,
        help,
        version,
    } = args;
    if help {
        println!("{USAGE}");
        return 0;
    }
    if version {
        println!("custodia-proxy {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    let Some(path) = config else {
        eprintln!("custodia-proxy: --config FILE is required\n\n{USAGE}");
        return 2;
    };
    let config = match config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("custodia-proxy: invalid configuration: {e}");
            return 1;
        }
    };
    if check {
        print!("{}", config::summary(&config));
        return 0;
    }
    crate::logging::init();
    match server::run(config, StartOptions { upgrade }) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("custodia-proxy cannot start: {e}");
            eprintln!("custodia-proxy: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(
            std::iter::once("custodia-proxy")
                .chain(list.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn parses_the_documented_flags() {
        let a = args(&["--config", "x.toml", "--check"]).unwrap();
        assert_eq!(a.config, Some(PathBuf::from("x.toml")));
        assert!(a.check);
        assert!(args(&["--config=y.toml", "--upgrade"]).unwrap().upgrade);
        assert!(args(&["--bogus"]).is_err());
        assert!(args(&["--config"]).is_err());
        assert!(args(&["--config", "a", "--check", "--upgrade"]).is_err());
    }
}
