//! The command line: hand-rolled flag parsing, the assertion key, logging, the runtime and signals.
//!
//! ```text
//! custodia-app --listen 127.0.0.1:5001 --worker-id w1 --delay 50
//! curl -s 127.0.0.1:5001/api/hello      # {"message":…,"timestamp":…,"worker":"w1"}
//! curl -s 127.0.0.1:5001/healthz        # ok
//! ```

use std::ffi::{OsStr, OsString};
use std::io::IsTerminal as _;
use std::net::{AddrParseError, SocketAddr};
use std::time::Duration;

use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::identity::MIN_KEY_LEN;
use crate::routes::AppSettings;
use crate::server::serve;

/// Environment variable holding the identity assertion HMAC key (its raw bytes are the key).
pub const ASSERTION_KEY_ENV: &str = "CUSTODIA_ASSERTION_KEY";
/// Earlier values of [`ASSERTION_KEY_ENV`] (comma-separated): assertions signed with them are
/// still accepted while the proxy's change of key rolls out.
pub const ASSERTION_KEY_PREVIOUS_ENV: &str = "CUSTODIA_ASSERTION_KEY_PREVIOUS";
/// When [`ASSERTION_KEY_ENV`] is unset, the assertion key is derived from this (the seed's
/// session secret), exactly as custodia-proxy derives it.
pub const APP_SECRET_KEY_ENV: &str = "APP_SECRET_KEY";
/// Earlier values of [`APP_SECRET_KEY_ENV`] (comma-separated), as custodia-proxy reads them:
/// assertions signed with keys derived from them are still accepted while a rotation rolls out.
pub const APP_SECRET_KEY_PREVIOUS_ENV: &str = "APP_SECRET_KEY_PREVIOUS";

/// Tokio worker threads. A worker is one of several processes (workers, proxy, load generator)
/// sharing a small host, so it gets a small fixed pool rather than one thread per core. Two
/// threads let one worker use both cores of the 2-core benchmark box: measured on loopback with
/// wrk on the same two cores, `/api/hello` ran at ~37k req/s on one thread and ~55k on two, the
/// worker spending ~13 µs of CPU per request (~75k req/s per core, so ~100k+ on two free cores).
/// More threads would only contend with sibling workers and the proxy.
pub const WORKER_THREADS: usize = 2;

/// Exit status for bad arguments or configuration.
pub const EXIT_USAGE: i32 = 2;
/// Exit status for failures after startup checks (cannot bind, runtime error).
pub const EXIT_FAILURE: i32 = 1;

pub const USAGE: &str = "\
Usage: custodia-app --listen ADDR [--worker-id ID] [--delay MS]
       custodia-app --probe URL

Custodia app worker: the home page and JSON greeting API over HTTP/1.1.

Options:
  --listen ADDR     address to listen on, IP:PORT (port 0 picks a free port)
  --worker-id ID    name reported as \"worker\" in JSON answers [default: the bound address;
                    HOSTNAME:PORT when bound to 0.0.0.0 or ::, as in a container]
  --delay MS        fixed delay before every response except /healthz, in milliseconds
                    (or a duration such as 250ms, 1s): simulates a slow worker [default: 0]
  --probe URL       health check (for containers without curl): GET URL over HTTP/1.1,
                    exit 0 on a 200, 1 otherwise, within 3 s; e.g.
                    custodia-app --probe http://127.0.0.1:8000/healthz
  -h, --help        print this help
  -V, --version     print the version

Environment:
  CUSTODIA_ASSERTION_KEY  HMAC-SHA256 key (at least 32 bytes) shared with custodia-proxy to
                          verify X-Custodia-Identity. Generate one with: openssl rand -hex 32
  CUSTODIA_ASSERTION_KEY_PREVIOUS
                          earlier CUSTODIA_ASSERTION_KEY values, comma-separated: while the
                          proxy's change of key rolls out, assertions signed with them still pass
  APP_SECRET_KEY          when CUSTODIA_ASSERTION_KEY is unset, the key is derived from it, as
                          custodia-proxy derives its own (the seed's .env works unchanged);
                          when it is set, the key derived from this is still accepted (moving
                          to a key of your own); with neither set, every request is served as
                          a guest; an empty value counts as unset, as in custodia-proxy
  APP_SECRET_KEY_PREVIOUS earlier APP_SECRET_KEY values, comma-separated: while a key rotation
                          rolls out, assertions signed with keys derived from them still pass
  RUST_LOG                log filter [default: info]; logs go to stderr

Routes: GET / , /api/hello , /api/me , /healthz
";

/// A command line or environment the worker cannot start with. Exit status [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("missing --listen ADDR")]
    MissingListen,
    #[error("{flag} needs a value")]
    MissingValue { flag: &'static str },
    #[error("{flag} given more than once")]
    Repeated { flag: &'static str },
    #[error("unknown argument {arg:?}")]
    UnknownArgument { arg: String },
    #[error("argument {arg:?} is not valid UTF-8")]
    NotUnicode { arg: String },
    #[error("--listen {value:?} is not an IP:PORT address such as 127.0.0.1:5001 ({source})")]
    InvalidListen {
        value: String,
        #[source]
        source: AddrParseError,
    },
    #[error("--delay {value:?} is not milliseconds (e.g. 250) or a duration (e.g. 250ms, 1s)")]
    InvalidDelay { value: String },
    #[error("--worker-id must not be empty")]
    EmptyWorkerId,
    #[error("--probe URL cannot be combined with other flags")]
    ProbeAlone,
    #[error(
        "{ASSERTION_KEY_ENV} is {len} bytes; it must be at least {MIN_KEY_LEN}. \
         Generate one with: openssl rand -hex 32"
    )]
    KeyTooShort { len: usize },
    #[error("{name} is {weakness}. Generate one with: openssl rand -hex 32")]
    WeakKey {
        name: &'static str,
        weakness: custodia_identity::SecretWeakness,
    },
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(RunArgs),
    /// `--probe URL`: one health check, then exit.
    Probe(String),
    Help,
    Version,
}

/// The flags of `custodia-app --listen …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub listen: SocketAddr,
    /// `None`: use the bound address.
    pub worker_id: Option<String>,
    pub delay: Duration,
}

/// Parses the arguments after the program name. `--flag VALUE` and `--flag=VALUE` both work.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, CliError> {
    let mut listen = None;
    let mut worker_id = None;
    let mut delay = None;
    let mut probe = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = utf8(arg)?;
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let (flag, slot): (&'static str, &mut Option<String>) = match flag {
            "-h" | "--help" if inline.is_none() => return Ok(Command::Help),
            "-V" | "--version" if inline.is_none() => return Ok(Command::Version),
            "--listen" => ("--listen", &mut listen),
            "--worker-id" => ("--worker-id", &mut worker_id),
            "--delay" => ("--delay", &mut delay),
            "--probe" => ("--probe", &mut probe),
            _ => return Err(CliError::UnknownArgument { arg }),
        };
        let value = match inline {
            Some(value) => value,
            None => utf8(args.next().ok_or(CliError::MissingValue { flag })?)?,
        };
        if slot.replace(value).is_some() {
            return Err(CliError::Repeated { flag });
        }
    }

    if let Some(url) = probe {
        if listen.is_some() || worker_id.is_some() || delay.is_some() {
            return Err(CliError::ProbeAlone);
        }
        return Ok(Command::Probe(url));
    }
    let listen = listen.ok_or(CliError::MissingListen)?;
    let listen = listen.parse().map_err(|source| CliError::InvalidListen {
        value: listen.clone(),
        source,
    })?;
    if worker_id.as_deref().is_some_and(|id| id.trim().is_empty()) {
        return Err(CliError::EmptyWorkerId);
    }
    let delay = match delay {
        None => Duration::ZERO,
        Some(value) => parse_delay(&value).ok_or(CliError::InvalidDelay { value })?,
    };
    Ok(Command::Run(RunArgs {
        listen,
        worker_id,
        delay,
    }))
}

/// Bare digits are milliseconds; anything else goes through `humantime` ("250ms", "1s").
fn parse_delay(value: &str) -> Option<Duration> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse().ok().map(Duration::from_millis);
    }
    humantime::parse_duration(value).ok()
}

fn utf8(arg: OsString) -> Result<String, CliError> {
    arg.into_string().map_err(|arg| CliError::NotUnicode {
        arg: arg.to_string_lossy().into_owned(),
    })
}

/// The assertion key from the value of [`ASSERTION_KEY_ENV`]: `None` when unset or empty (as
/// custodia-proxy reads it: compose passes an unset variable on as empty), an error when set
/// but shorter than [`MIN_KEY_LEN`] bytes.
pub fn assertion_key(value: Option<&OsStr>) -> Result<Option<Vec<u8>>, CliError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let key = os_bytes(value);
    if key.len() < MIN_KEY_LEN {
        return Err(CliError::KeyTooShort { len: key.len() });
    }
    if let Some(weakness) = custodia_identity::secret_weakness(&key) {
        return Err(CliError::WeakKey {
            name: ASSERTION_KEY_ENV,
            weakness,
        });
    }
    Ok(Some(key))
}

/// The assertion key derived from `APP_SECRET_KEY` (the seed's `.env` has only that), as the
/// proxy derives it; refused when the proxy would refuse the secret.
pub fn derived_assertion_key(secret: Option<&str>) -> Result<Option<Vec<u8>>, CliError> {
    let Some(secret) = secret.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if let Some(weakness) = custodia_identity::secret_weakness(secret.as_bytes()) {
        return Err(CliError::WeakKey {
            name: APP_SECRET_KEY_ENV,
            weakness,
        });
    }
    Ok(Some(
        custodia_identity::derive_assertion_key(secret).into_bytes(),
    ))
}

/// The assertion keys derived from [`APP_SECRET_KEY_PREVIOUS_ENV`]'s comma-separated values,
/// each refused as the proxy refuses it.
pub fn derived_previous_keys(list: Option<&str>) -> Result<Vec<Vec<u8>>, CliError> {
    listed_keys(list, APP_SECRET_KEY_PREVIOUS_ENV, |old| {
        custodia_identity::derive_assertion_key(old).into_bytes()
    })
}

/// The keys of a comma-separated list of secrets (variable `name`), each refused as the proxy
/// refuses a weak secret, turned into keys by `key_of`.
fn listed_keys(
    list: Option<&str>,
    name: &'static str,
    key_of: impl Fn(&str) -> Vec<u8>,
) -> Result<Vec<Vec<u8>>, CliError> {
    let mut keys = Vec::new();
    for old in list.unwrap_or("").split(',').map(str::trim) {
        if old.is_empty() {
            continue;
        }
        if let Some(weakness) = custodia_identity::secret_weakness(old.as_bytes()) {
            return Err(CliError::WeakKey { name, weakness });
        }
        keys.push(key_of(old));
    }
    Ok(keys)
}

/// The worker's assertion key and the earlier ones it still accepts, from the environment
/// (`env` reads a variable). The key: `CUSTODIA_ASSERTION_KEY`, else derived from
/// `APP_SECRET_KEY`, as the proxy chooses its own. Accepted besides: every earlier key a change
/// may still have the proxy sign with — `CUSTODIA_ASSERTION_KEY_PREVIOUS`, the keys derived
/// from `APP_SECRET_KEY_PREVIOUS`, and, with a key of its own, the one derived from
/// `APP_SECRET_KEY` (so moving from the derived key to one of your own, or back, never has the
/// workers refuse the proxy in between).
pub type WorkerKeys = (Option<Vec<u8>>, Vec<Vec<u8>>);

pub fn worker_keys(env: &dyn Fn(&str) -> Option<OsString>) -> Result<WorkerKeys, CliError> {
    let text = |name: &str| env(name).and_then(|v| v.into_string().ok());
    let own = assertion_key(env(ASSERTION_KEY_ENV).as_deref())?;
    let derived = derived_assertion_key(text(APP_SECRET_KEY_ENV).as_deref())?;
    let mut previous = previous_assertion_keys(text(ASSERTION_KEY_PREVIOUS_ENV).as_deref())?;
    previous.extend(derived_previous_keys(
        text(APP_SECRET_KEY_PREVIOUS_ENV).as_deref(),
    )?);
    let key = match own {
        Some(own) => {
            previous.extend(derived);
            Some(own)
        }
        None => derived,
    };
    previous.retain(|old| Some(old) != key.as_ref());
    Ok((key, previous))
}

/// The keys of [`ASSERTION_KEY_PREVIOUS_ENV`]'s comma-separated values, each refused as
/// [`assertion_key`] refuses a key.
pub fn previous_assertion_keys(list: Option<&str>) -> Result<Vec<Vec<u8>>, CliError> {
    listed_keys(list, ASSERTION_KEY_PREVIOUS_ENV, |old| {
        old.as_bytes().to_vec()
    })
}

/// What a worker bound to `bound` calls itself by default: the address, or the host's name
/// with the port when the address is every interface's (in a container, each replica's
/// `0.0.0.0:8000` would name none of them).
fn default_worker_id(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        if let Some(host) = host_name() {
            return format!("{host}:{}", bound.port());
        }
    }
    bound.to_string()
}

/// The kernel's host name (a container's own, in its UTS namespace).
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    let usable = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    usable.then(|| name.to_string())
}

#[cfg(unix)]
fn os_bytes(value: &OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt as _;
    value.as_bytes().to_vec()
}

#[cfg(not(unix))]
fn os_bytes(value: &OsStr) -> Vec<u8> {
    value.to_string_lossy().into_owned().into_bytes()
}

/// Write `text` to stdout; a reader that has gone (`--help | head -1`) is no error
/// (`print!` would panic on the broken pipe).
fn say(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Runs the worker from a full command line (program name first, as `std::env::args_os()`
/// gives it) and returns the process exit status: 0 after a clean shutdown (SIGTERM or
/// Ctrl-C), [`EXIT_USAGE`] for bad arguments or key, [`EXIT_FAILURE`] if it cannot run.
pub fn run_cli(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match parse_args(args.into_iter().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            say(USAGE);
            return 0;
        }
        Ok(Command::Version) => {
            say(&format!("custodia-app {}\n", env!("CARGO_PKG_VERSION")));
            return 0;
        }
        Ok(Command::Probe(url)) => return crate::probe::run_probe("custodia-app", &url),
        Err(error) => return usage_error(&error),
    };
    let keys = worker_keys(&|name| std::env::var_os(name));
    let (assertion_key, previous_assertion_keys) = match keys {
        Ok(keys) => keys,
        Err(error) => return usage_error(&error),
    };
    init_logging();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("custodia-app: error: cannot start the async runtime: {error}");
            return EXIT_FAILURE;
        }
    };
    runtime.block_on(async move {
        // Install signal handlers before anything can observe the worker as started.
        let shutdown = match shutdown_signal() {
            Ok(shutdown) => shutdown,
            Err(error) => {
                eprintln!("custodia-app: error: cannot install signal handlers: {error}");
                return EXIT_FAILURE;
            }
        };
        let listener = match TcpListener::bind(args.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!(
                    "custodia-app: error: cannot listen on {}: {error}",
                    args.listen
                );
                return EXIT_FAILURE;
            }
        };
        let worker_id = match (args.worker_id, listener.local_addr()) {
            (Some(id), _) => id,
            (None, Ok(bound)) => default_worker_id(bound),
            (None, Err(_)) => args.listen.to_string(),
        };
        let settings = AppSettings {
            worker_id,
            delay: args.delay,
            assertion_key,
            previous_assertion_keys,
        };
        match serve(listener, settings, shutdown).await {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("custodia-app: error: {error}");
                EXIT_FAILURE
            }
        }
    })
}

fn usage_error(error: &CliError) -> i32 {
    eprintln!("custodia-app: error: {error}\nTry 'custodia-app --help' for usage.");
    EXIT_USAGE
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Err only if a subscriber is already installed (an embedding process chose its own).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Registers SIGTERM and SIGINT now and returns a future that resolves on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot wait for Ctrl-C; running until killed");
            std::future::pending::<()>().await;
        }
        tracing::info!(signal = "Ctrl-C", "shutdown requested");
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, CliError> {
        parse_args(args.iter().map(OsString::from))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap() {
            Command::Run(run) => run,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn listen_alone_uses_defaults() {
        assert_eq!(
            run_args(&["--listen", "127.0.0.1:5001"]),
            RunArgs {
                listen: "127.0.0.1:5001".parse().unwrap(),
                worker_id: None,
                delay: Duration::ZERO
            }
        );
    }

    #[test]
    fn all_flags_in_both_spellings() {
        let expected = RunArgs {
            listen: "[::1]:0".parse().unwrap(),
            worker_id: Some("w1".into()),
            delay: Duration::from_millis(250),
        };
        assert_eq!(
            run_args(&["--delay", "250", "--worker-id", "w1", "--listen", "[::1]:0"]),
            expected
        );
        assert_eq!(
            run_args(&["--listen=[::1]:0", "--worker-id=w1", "--delay=250ms"]),
            expected
        );
        assert_eq!(
            run_args(&["--listen", "127.0.0.1:1", "--delay", "1s"]).delay,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn probe_is_its_own_mode() {
        let url = "http://127.0.0.1:8000/healthz";
        assert_eq!(
            parse(&["--probe", url]).unwrap(),
            Command::Probe(url.into())
        );
        assert_eq!(
            parse(&[&format!("--probe={url}")]).unwrap(),
            Command::Probe(url.into())
        );
        assert!(matches!(
            parse(&["--probe"]),
            Err(CliError::MissingValue { flag: "--probe" })
        ));
        assert!(matches!(
            parse(&["--listen", "127.0.0.1:1", "--probe", url]),
            Err(CliError::ProbeAlone)
        ));
        assert!(USAGE.contains("--probe URL"));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&["--help"]).unwrap(), Command::Help);
        assert_eq!(parse(&["-h", "--bogus"]).unwrap(), Command::Help);
        assert_eq!(parse(&["--version"]).unwrap(), Command::Version);
        assert_eq!(parse(&["-V"]).unwrap(), Command::Version);
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(matches!(parse(&[]), Err(CliError::MissingListen)));
        assert!(matches!(
            parse(&["--worker-id", "w"]),
            Err(CliError::MissingListen)
        ));
        assert!(matches!(
            parse(&["--listen"]),
            Err(CliError::MissingValue { flag: "--listen" })
        ));
        assert!(matches!(
            parse(&["--listen", "localhost"]),
            Err(CliError::InvalidListen { .. })
        ));
        assert!(matches!(
            parse(&["--listen", "1.2.3.4"]),
            Err(CliError::InvalidListen { .. })
        ));
        assert!(matches!(
            parse(&["--listen", "127.0.0.1:1", "--port", "2"]),
            Err(CliError::UnknownArgument { .. })
        ));
        assert!(matches!(
            parse(&["serve"]),
            Err(CliError::UnknownArgument { .. })
        ));
        assert!(matches!(
            parse(&["--listen", "127.0.0.1:1", "--listen", "127.0.0.1:2"]),
            Err(CliError::Repeated { flag: "--listen" })
        ));
        for bad in ["-5", "soon", "", "1.5"] {
            assert!(
                matches!(
                    parse(&["--listen", "127.0.0.1:1", "--delay", bad]),
                    Err(CliError::InvalidDelay { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse(&["--listen", "127.0.0.1:1", "--worker-id", " "]),
            Err(CliError::EmptyWorkerId)
        ));
    }

    #[test]
    fn errors_read_well() {
        let message = parse(&["--listen", "nope"]).unwrap_err().to_string();
        assert!(
            message.contains("\"nope\"") && message.contains("IP:PORT"),
            "{message}"
        );
        let message = assertion_key(Some(OsStr::new("short")))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("CUSTODIA_ASSERTION_KEY is 5 bytes"),
            "{message}"
        );
        assert!(message.contains("openssl rand -hex 32"), "{message}");
    }

    #[test]
    fn a_worker_accepts_every_key_a_change_may_still_have_the_proxy_sign_with() {
        let secret = "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f8a1c3e5f7b9d0a2c";
        let old_secret = "c3a1e5f7b9d0a2c45f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f";
        let own = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a6978";
        let old_own = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
        let keys = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            worker_keys(&move |name| {
                vars.iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| OsString::from(v))
            })
            .unwrap()
        };
        let derived = |s: &str| custodia_identity::derive_assertion_key(s).into_bytes();

        // Derived only: the secret's key, and the earlier secrets'.
        let (key, previous) = keys(&[
            (APP_SECRET_KEY_ENV, secret),
            (APP_SECRET_KEY_PREVIOUS_ENV, old_secret),
        ]);
        assert_eq!(key, Some(derived(secret)));
        assert_eq!(previous, vec![derived(old_secret)]);

        // A key of its own, next to the secret: the derived one is still accepted (the proxy
        // may still sign with it), and the earlier own keys.
        let (key, previous) = keys(&[
            (ASSERTION_KEY_ENV, own),
            (ASSERTION_KEY_PREVIOUS_ENV, old_own),
            (APP_SECRET_KEY_ENV, secret),
        ]);
        assert_eq!(key, Some(own.as_bytes().to_vec()));
        assert_eq!(previous, vec![old_own.as_bytes().to_vec(), derived(secret)]);

        // Back to the derived key, the own one still accepted.
        let (key, previous) = keys(&[
            (APP_SECRET_KEY_ENV, secret),
            (ASSERTION_KEY_PREVIOUS_ENV, own),
        ]);
        assert_eq!(key, Some(derived(secret)));
        assert_eq!(previous, vec![own.as_bytes().to_vec()]);

        // Nothing: a guest-only worker.
        assert_eq!(keys(&[]), (None, Vec::new()));
    }

    #[test]
    fn previous_assertion_keys_are_a_list_of_strong_keys() {
        let a = "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f8a1c3e5f7b9d0a2c";
        let b = "c3a1e5f7b9d0a2c45f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f";
        assert!(previous_assertion_keys(None).unwrap().is_empty());
        assert!(previous_assertion_keys(Some("")).unwrap().is_empty());
        assert_eq!(
            previous_assertion_keys(Some(&format!(" {a} ,{b},"))).unwrap(),
            vec![a.as_bytes().to_vec(), b.as_bytes().to_vec()]
        );
        let weak = previous_assertion_keys(Some(&format!("{a},short"))).unwrap_err();
        assert!(
            weak.to_string().starts_with(ASSERTION_KEY_PREVIOUS_ENV),
            "{weak}"
        );
    }

    #[test]
    fn assertion_key_is_optional_but_must_be_long_enough() {
        assert_eq!(assertion_key(None).unwrap(), None);
        // Empty is unset, as the proxy reads it: compose passes an unset variable on as empty.
        assert_eq!(assertion_key(Some(OsStr::new(""))).unwrap(), None);
        let short = "x".repeat(MIN_KEY_LEN - 1);
        assert!(matches!(
            assertion_key(Some(OsStr::new(&short))),
            Err(CliError::KeyTooShort { .. })
        ));
        let hex = "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f8a1c3e5f7b9d0a2c";
        assert_eq!(
            assertion_key(Some(OsStr::new(hex))).unwrap(),
            Some(hex.as_bytes().to_vec())
        );
        assert!(matches!(
            assertion_key(Some(OsStr::new(&"ab".repeat(32)))),
            Err(CliError::WeakKey { .. })
        ));
    }

    /// A worker refuses the secrets the proxy refuses: it would otherwise trust assertions
    /// signed with a key derived from a public placeholder.
    #[test]
    fn the_app_secret_key_the_proxy_refuses_is_refused_here_too() {
        assert_eq!(derived_assertion_key(None).unwrap(), None);
        assert_eq!(derived_assertion_key(Some("")).unwrap(), None);
        for weak in [
            "x",
            "change-me-run-openssl-rand-hex-32-and-paste-it-here",
            &"a".repeat(40),
        ] {
            let message = derived_assertion_key(Some(weak)).unwrap_err().to_string();
            assert!(
                message.starts_with("APP_SECRET_KEY is ") && message.contains("openssl rand"),
                "{message}"
            );
        }
        let good = "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d";
        assert_eq!(
            derived_assertion_key(Some(good)).unwrap(),
            Some(custodia_identity::derive_assertion_key(good).into_bytes())
        );
    }

    #[test]
    fn previous_secrets_give_previous_keys_and_weak_ones_are_refused() {
        assert!(derived_previous_keys(None).unwrap().is_empty());
        assert!(derived_previous_keys(Some(" , ")).unwrap().is_empty());
        let (a, b) = (
            "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d",
            "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d",
        );
        assert_eq!(
            derived_previous_keys(Some(&format!("{a}, {b}"))).unwrap(),
            [a, b].map(|s| custodia_identity::derive_assertion_key(s).into_bytes())
        );
        let message = derived_previous_keys(Some(&format!("{a},x")))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("APP_SECRET_KEY_PREVIOUS is "),
            "{message}"
        );
    }

    #[test]
    fn a_worker_on_every_interface_is_named_by_its_host() {
        let specific: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        assert_eq!(default_worker_id(specific), "127.0.0.1:8000");
        let host = host_name().expect("this machine's host name");
        for any in ["0.0.0.0:8000", "[::]:8000"] {
            let any: SocketAddr = any.parse().unwrap();
            assert_eq!(default_worker_id(any), format!("{host}:8000"));
        }
    }
}
