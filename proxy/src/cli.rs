//! The command line: `custodia-proxy --config FILE [--check | --reload | --upgrade]`, and
//! `custodia-proxy --probe URL` (the container health check, see [`crate::probe`]).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config;
use crate::server::{self, StartOptions};

const USAGE: &str = "\
usage: custodia-proxy --config FILE [--check | --reload | --upgrade]
       custodia-proxy --probe URL

  --config FILE   the TOML configuration (see config/README.md)
  --check         validate FILE, print a summary and exit (0 valid, 1 invalid)
  --reload        validate FILE as the running custodia-proxy (the pid in FILE's
                  server.pid_file) will read it, with that process's environment and
                  .env, then tell it to reload: sends SIGHUP
  --upgrade       take the listening sockets over from the running custodia-proxy
                  (the pid in server.pid_file): this process listens on
                  server.upgrade_sock and sends the old one SIGQUIT itself
  --probe URL     health check (for containers without curl): GET URL over HTTP/1.1,
                  exit 0 on a 200, 1 otherwise, within 3 s; e.g.
                  custodia-proxy --probe http://127.0.0.1:9090/readyz
  --help          this text
  --version       the version

signals: SIGHUP reloads FILE, SIGTERM drains within server.grace_period,
         SIGINT stops at once, SIGQUIT hands the listeners to a process started with --upgrade
         (refused, serving on, when none is waiting)";

#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    config: Option<PathBuf>,
    check: bool,
    reload: bool,
    upgrade: bool,
    probe: Option<String>,
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
            "--reload" | "-r" => parsed.reload = true,
            "--upgrade" | "-u" => parsed.upgrade = true,
            "--probe" => {
                let value = args.next().ok_or("--probe needs a URL")?;
                parsed.probe = Some(value.to_string_lossy().into_owned());
            }
            "--help" | "-h" => parsed.help = true,
            "--version" | "-V" => parsed.version = true,
            _ => match (
                text.strip_prefix("--config="),
                text.strip_prefix("--probe="),
            ) {
                (Some(path), _) if !path.is_empty() => parsed.config = Some(PathBuf::from(path)),
                (_, Some(url)) if !url.is_empty() => parsed.probe = Some(url.to_string()),
                _ => return Err(format!("unknown argument `{text}`")),
            },
        }
    }
    if [parsed.check, parsed.reload, parsed.upgrade]
        .iter()
        .filter(|f| **f)
        .count()
        > 1
    {
        return Err("--check, --reload and --upgrade cannot be combined".into());
    }
    if parsed.probe.is_some()
        && (parsed.config.is_some() || parsed.check || parsed.reload || parsed.upgrade)
    {
        return Err("--probe URL cannot be combined with the other flags".into());
    }
    Ok(parsed)
}

/// Run the binary; returns the process exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(message) => {
            say_err(&format!("custodia-proxy: {message}\n\n{USAGE}"));
            return 2;
        }
    };
    let Args {
        config,
        check,
        reload,
        upgrade,
        probe,
        help,
        version,
    } = args;
    if help {
        say(&format!("{USAGE}\n"));
        return 0;
    }
    if version {
        say(&format!("custodia-proxy {}\n", env!("CARGO_PKG_VERSION")));
        return 0;
    }
    if let Some(url) = probe {
        return crate::probe::run_probe("custodia-proxy", &url);
    }
    let Some(path) = config else {
        say_err(&format!(
            "custodia-proxy: --config FILE is required\n\n{USAGE}"
        ));
        return 2;
    };
    if reload {
        return reload_running(&path);
    }
    let config = match config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            say_err(&format!("custodia-proxy: invalid configuration: {e}"));
            return 1;
        }
    };
    if check {
        // What the start would log at: `RUST_LOG` wins over the file, and an invalid one stops
        // the start, so it fails the check too.
        let mut in_force = config;
        match crate::logging::directives(&in_force.log) {
            Ok(level) => in_force.log.level = level,
            Err(message) => {
                say_err(&format!("custodia-proxy: {message}"));
                return 1;
            }
        }
        say(&config::summary(&in_force));
        return 0;
    }
    if let Err(message) = crate::logging::init(&config.log) {
        say_err(&format!("custodia-proxy: {message}"));
        return 1;
    }
    match server::run(config, StartOptions { upgrade }) {
        Ok(()) => 0,
        Err(e) => {
            // Once, on stderr, whatever the log level or format (not also as a log event).
            say_err(&format!("custodia-proxy: {e}"));
            1
        }
    }
}

/// `--reload`: check `path` as the running proxy will read it (its environment and `.env`, not
/// this shell's: the secrets are often only in the service's), then send it SIGHUP.
fn reload_running(path: &std::path::Path) -> i32 {
    let invalid = |e: config::ConfigError| {
        say_err(&format!("custodia-proxy: invalid configuration: {e}"));
        1
    };
    // The file's own problem first: a file that cannot be read is not "no running proxy".
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(source) => {
            return invalid(config::ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let Some(pid_file) = crate::running::pid_file_named_in(&text) else {
        // Not TOML, or no usable pid_file: the loader says why, with the line.
        return config::load(path).map_or_else(invalid, |_| {
            say_err(&format!(
                "custodia-proxy: cannot reload: {} names no usable server.pid_file",
                path.display()
            ));
            1
        });
    };
    let pid = match crate::running::running_pid(&pid_file) {
        Ok(pid) => pid,
        Err(message) => {
            say_err(&format!("custodia-proxy: cannot reload: {message}"));
            return 1;
        }
    };
    // SIGHUP makes the process read its own file again, whatever this command names.
    if let (Some(running), Ok(asked)) = (
        crate::running::config_file_of(pid),
        std::fs::canonicalize(path),
    ) {
        if running != asked {
            say_err(&format!(
                "custodia-proxy: cannot reload: process {pid} reads {}, not {}; a reload makes it \
                 read its own file again: edit that one, or start a proxy on {} (--upgrade to \
                 take over the listeners)",
                running.display(),
                asked.display(),
                asked.display()
            ));
            return 1;
        }
    }
    let checked = match crate::running::environment_of(pid) {
        Some(env) => config::load_with_env(path, &env),
        None => config::load(path),
    };
    if let Err(e) = checked {
        return invalid(e);
    }
    match crate::running::send_sighup(pid) {
        Ok(()) => {
            say(&format!(
                "custodia-proxy: asked process {pid} to reload {} (its log says whether it did)\n",
                path.display()
            ));
            0
        }
        Err(message) => {
            say_err(&format!("custodia-proxy: cannot reload: {message}"));
            1
        }
    }
}

/// Write `text` to stdout. A reader that has gone (`--help | head -1`) is no error: the
/// command has nothing more to say to it (`println!` would panic on the broken pipe).
pub fn say(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// [`say`] on stderr, with a line end.
pub fn say_err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
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
        assert!(args(&["--config", "a", "--reload"]).unwrap().reload);
        assert!(args(&["--config", "a", "--reload", "--upgrade"]).is_err());
    }

    #[test]
    fn probe_is_its_own_mode() {
        let url = "http://127.0.0.1:9090/readyz";
        assert_eq!(args(&["--probe", url]).unwrap().probe.as_deref(), Some(url));
        assert_eq!(
            args(&[&format!("--probe={url}")]).unwrap().probe.as_deref(),
            Some(url)
        );
        assert!(args(&["--probe"]).is_err());
        assert!(args(&["--probe", url, "--config", "a.toml"]).is_err());
        assert!(args(&["--check", "--probe", url]).is_err());
        assert!(USAGE.contains("--probe URL"));
    }
}
