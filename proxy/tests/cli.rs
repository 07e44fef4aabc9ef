//! The `custodia-proxy` binary's command line: `--check` on good and bad files, usage errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn proxy(args: &[&str]) -> Output {
    proxy_env(args, &[])
}

fn proxy_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_custodia-proxy"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        command.env(k, v);
    }
    // No stray .env from the developer's checkout.
    command.current_dir(std::env::temp_dir());
    command.output().expect("run custodia-proxy")
}

/// What the local stack hands the proxy when no real IdP is configured.
const STACK_ENV: &[(&str, &str)] = &[
    ("CUSTODIA_AUTH_ISSUER", "http://127.0.0.1:9400"),
    ("AUTH0_CLIENT_ID", "custodia-local"),
    ("AUTH0_CLIENT_SECRET", "local-client-secret"),
    ("APP_SECRET_KEY", "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d"),
];

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

/// A scratch directory for `tag` and, in it, `proxy.toml`: a config that serves on `listen`
/// and `admin` (its pid file and upgrade socket in the directory too).
fn serving_config_file(
    tag: &str,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("custodia-cli-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        serving_config(dir.to_str().unwrap(), listen, admin),
    )
    .unwrap();
    (dir, config)
}

#[test]
fn check_accepts_the_shipped_config_and_prints_a_summary() {
    let out = proxy_env(
        &["--config", shipped_config().to_str().unwrap(), "--check"],
        STACK_ENV,
    );
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
    assert!(stdout.contains("auth            on"), "{stdout}");
    assert!(stdout.contains("/api/hello"), "{stdout}");
    assert!(
        !stdout.contains("local-client-secret"),
        "secrets are never printed: {stdout}"
    );
    assert!(
        !stdout.contains("5f0c7a1d9e2b4c6f8a0d"),
        "secrets are never printed: {stdout}"
    );
}

#[test]
fn auth_without_its_secrets_is_an_error_never_auth_off() {
    let shipped = shipped_config();
    let config = shipped.to_str().unwrap();
    let out = proxy(&["--config", config, "--check"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("auth.issuer") && stderr.contains("AUTH0_DOMAIN"),
        "{stderr}"
    );

    let without_secret: Vec<_> = STACK_ENV
        .iter()
        .copied()
        .filter(|(k, _)| *k != "AUTH0_CLIENT_SECRET")
        .collect();
    let out = proxy_env(&["--config", config, "--check"], &without_secret);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH0_CLIENT_SECRET"));

    let mut weak: Vec<_> = STACK_ENV
        .iter()
        .copied()
        .filter(|(k, _)| *k != "APP_SECRET_KEY")
        .collect();
    weak.push(("APP_SECRET_KEY", "short"));
    let out = proxy_env(&["--config", config, "--check"], &weak);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("APP_SECRET_KEY") && stderr.contains("openssl rand -hex 32"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("short\""),
        "the secret itself is not echoed: {stderr}"
    );
}

#[test]
fn the_seed_env_file_works_unchanged() {
    let dir = std::env::temp_dir().join(format!("custodia-cli-dotenv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".env"),
        "AUTH0_DOMAIN=tenant.eu.auth0.com\nAUTH0_CLIENT_ID=abc123\nAUTH0_CLIENT_SECRET=s3cret\n\
         APP_SECRET_KEY=9f2c4e7a1b3d5f6081a2c3e4f5061728394a5b6c7d8e9f00\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_custodia-proxy"))
        .args(["--config", shipped_config().to_str().unwrap(), "--check"])
        .env_clear()
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("issuer https://tenant.eu.auth0.com/"),
        "{stdout}"
    );
    assert!(stdout.contains("abc123"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
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

/// Kills the process when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn start(config: &Path) -> Running {
        Running::start_with_log(config, "warn")
    }

    /// [`Running::start`] with `RUST_LOG=rust_log`.
    fn start_with_log(config: &Path, rust_log: &str) -> Running {
        Running::spawn(Running::command(config, rust_log, &[]))
    }

    /// The command [`Running::start`] runs, with `args` after `--config FILE`.
    fn command(config: &Path, rust_log: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_custodia-proxy"));
        command
            .args(["--config", config.to_str().unwrap()])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", rust_log)
            .current_dir(std::env::temp_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    }

    fn spawn(mut command: Command) -> Running {
        Running(command.spawn().expect("start custodia-proxy"))
    }

    /// Waits (bounded) until it accepts connections on `addr`.
    fn wait_listening(&mut self, addr: std::net::SocketAddr) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "never listened");
            assert!(self.0.try_wait().unwrap().is_none(), "it exited");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Kills it and returns what it wrote on stderr.
    fn stop(mut self) -> String {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
        }
        stderr
    }

    /// The exit code and stderr, if it exits within `patience`.
    fn exits_within(mut self, patience: std::time::Duration) -> Option<(Option<i32>, String)> {
        let deadline = std::time::Instant::now() + patience;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.0.stderr.take() {
                    std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
                }
                return Some((status.code(), stderr));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

/// A free loopback port (bound, then released), never one handed out before in this process:
/// the kernel may give a just-released port again, and a test that takes several (two proxies'
/// listen and admin addresses) would then start one proxy on another's address.
fn free_port() -> std::net::SocketAddr {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&addr.port()) {
            seen.push(addr.port());
            return addr;
        }
    }
    panic!("no fresh loopback port after 1000 tries");
}

/// A plain load balancer on `listen` with its admin listener on `admin`.
fn serving_config(dir: &str, listen: std::net::SocketAddr, admin: std::net::SocketAddr) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\nthreads = 2\npid_file = \"{dir}/proxy.pid\"\n\
         upgrade_sock = \"{dir}/upgrade.sock\"\n[admin]\nlisten = \"{admin}\"\n\
         [upstream]\nbackends = [\"127.0.0.1:1\"]\n"
    )
}

/// Starts a proxy on `config` and returns its stderr once it has exited with 1.
fn refused_to_start(config: &Path) -> String {
    let (code, stderr) = Running::start(config)
        .exits_within(std::time::Duration::from_secs(20))
        .expect("the proxy exits");
    assert_eq!(code, Some(1), "{stderr}");
    stderr
}

/// A taken address stops the start at once with exit 1 and says which: never a process that
/// stays up, writes its pid file and reports ready while serving nothing.
#[test]
fn a_taken_listen_address_is_a_clear_error_at_start() {
    let dir = std::env::temp_dir().join(format!("custodia-cli-{}-taken", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    for (listen, admin, key) in [
        (taken, free_port(), "server.listen"),
        (free_port(), taken, "admin.listen"),
    ] {
        let config = dir.join("taken.toml");
        std::fs::write(
            &config,
            serving_config(dir.to_str().unwrap(), listen, admin),
        )
        .unwrap();
        let stderr = refused_to_start(&config);
        assert!(
            stderr.contains(&format!("cannot listen on {taken} ({key})")),
            "{stderr}"
        );
        // Said once (not also as a log event), with the hint that applies: a taken admin
        // port with free public ones is no running proxy of this file to upgrade from.
        assert_eq!(stderr.matches("cannot listen on").count(), 1, "{stderr}");
        assert_eq!(
            stderr.contains("--upgrade"),
            key == "server.listen",
            "{stderr}"
        );
        assert!(!dir.join("proxy.pid").exists(), "no pid file");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--upgrade` with no running proxy to take over from says so at once.
#[test]
fn an_upgrade_with_nothing_to_take_over_from_says_so() {
    let (dir, config) = serving_config_file("upgrade", free_port(), free_port());
    let out = proxy(&["--config", config.to_str().unwrap(), "--upgrade"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot --upgrade: no running custodia-proxy"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second instance on a running one's addresses is refused (its sockets are SO_REUSEPORT,
/// so the kernel alone would let it take a share of the first one's clients).
#[test]
fn a_second_instance_on_the_same_addresses_is_refused() {
    let (listen, admin) = (free_port(), free_port());
    let (dir, config) = serving_config_file("second", listen, admin);
    let mut first = Running::start(&config);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first never listened"
        );
        assert!(first.0.try_wait().unwrap().is_none(), "the first exited");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let stderr = refused_to_start(&config);
    assert!(
        stderr.contains(&format!("cannot listen on {listen}")),
        "{stderr}"
    );
    assert!(first.0.try_wait().unwrap().is_none(), "the first runs on");
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An invalid `RUST_LOG` stops the start, as an invalid `[log] level` does: no falling back to
/// `info`, nor (for a word such as `warning`) to logging nothing at all.
#[test]
fn an_invalid_rust_log_stops_the_start_and_is_named() {
    let (dir, config) = serving_config_file("rust-log", free_port(), free_port());
    for bad in ["warning", "debug["] {
        let (code, stderr) = Running::start_with_log(&config, bad)
            .exits_within(std::time::Duration::from_secs(20))
            .unwrap_or_else(|| panic!("RUST_LOG={bad}: the proxy started"));
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.starts_with(&format!("custodia-proxy: invalid RUST_LOG `{bad}`: ")),
            "RUST_LOG={bad}: {stderr}"
        );
        assert!(!dir.join("proxy.pid").exists(), "no pid file");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--check` judges the level the start would use: an invalid `RUST_LOG` fails it, as it
/// fails the start, and one that mutes the access log is said to.
#[test]
fn check_judges_rust_log_as_the_start_does() {
    let config = "[upstream]\nbackends = [\"127.0.0.1:9001\"]\n";
    let dir = std::env::temp_dir().join(format!("custodia-cli-{}-check-log", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    let bad = proxy_env(&["--config", path, "--check"], &[("RUST_LOG", "warning")]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("invalid RUST_LOG `warning`"), "{stderr}");
    let muted = proxy_env(&["--config", path, "--check"], &[("RUST_LOG", "warn")]);
    assert_eq!(muted.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&muted.stdout);
    assert!(stdout.contains("muted by level `warn`"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--reload` reports the config file's own problem, not "no running custodia-proxy" (nor
/// the default pid file's, when the file's `pid_file` is no path).
#[test]
fn reload_names_the_config_files_problem_first() {
    let dir = std::env::temp_dir().join(format!("custodia-cli-{}-reload", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("absent.toml");
    for (path, words) in [(&missing, "No such file"), (&dir, "Is a directory")] {
        let out = proxy(&["--config", path.to_str().unwrap(), "--reload"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("cannot read config file {}", path.display()))
                && stderr.contains(words)
                && !stderr.contains("pid file"),
            "{stderr}"
        );
    }
    for (value, words) in [("5", "invalid type"), ("\"\"", "an empty path")] {
        with_file(
            "pid",
            &format!("[server]\npid_file = {value}\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n"),
            |path| {
                for flag in ["--reload", "--check"] {
                    let out = proxy(&["--config", path.to_str().unwrap(), flag]);
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
                    assert!(
                        stderr.contains(":2: key `server.pid_file`: ")
                            && stderr.contains(words)
                            && !stderr.contains("no running"),
                        "{flag} pid_file = {value}: {stderr}"
                    );
                }
            },
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Output to a reader that has gone (`custodia-proxy --help | head -1`) ends the command
/// quietly, not with a panic about a broken pipe.
#[test]
fn a_closed_stdout_is_no_panic() {
    with_file(
        "epipe",
        "[upstream]\nbackends = [\"127.0.0.1:1\"]\n",
        |path| {
            for args in [
                vec!["--help"],
                vec!["--version"],
                vec!["--config", path.to_str().unwrap(), "--check"],
            ] {
                let (reader, writer) = std::io::pipe().unwrap();
                drop(reader);
                let out = Command::new(env!("CARGO_BIN_EXE_custodia-proxy"))
                    .args(&args)
                    .env_clear()
                    .current_dir(std::env::temp_dir())
                    .stdout(writer)
                    .stderr(std::process::Stdio::piped())
                    .output()
                    .unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
                assert!(stderr.is_empty(), "{args:?}: {stderr}");
            }
        },
    );
}

/// Runs `--config CONFIG ARGS…` to its end (bounded) and returns its exit code and stderr.
fn run_to_the_end(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    Running::spawn(Running::command(config, "warn", args))
        .exits_within(std::time::Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{args:?}: still running after 20 s"))
}

/// `server.upgrade_sock` that an `--upgrade` could not bind (too long, or in a directory that
/// does not exist), or that names a file it would delete, is refused at `--check` or at the
/// start, never a panic, and never touched: Pingora unlinks the path and binds a socket there.
#[test]
fn an_upgrade_sock_an_upgrade_cannot_use_is_refused_and_left_alone() {
    let (listen, admin) = (free_port(), free_port());
    let (dir, config) = serving_config_file("upgrade-sock", listen, admin);
    let mut old = Running::start(&config);
    old.wait_listening(listen);
    let good = std::fs::read_to_string(&config).unwrap();
    let with_sock = |sock: &str| {
        let bad = config.with_file_name("bad.toml");
        let sock_line = format!("upgrade_sock = \"{}/upgrade.sock\"", dir.display());
        assert!(good.contains(&sock_line));
        std::fs::write(
            &bad,
            good.replace(&sock_line, &format!("upgrade_sock = \"{sock}\"")),
        )
        .unwrap();
        bad
    };

    // Too long for a Unix socket: --check says so (and the start the same).
    let long = format!("{}/{}.sock", dir.display(), "s".repeat(120));
    let bad = with_sock(&long);
    for args in [&["--check"][..], &["--upgrade"]] {
        let (code, stderr) = run_to_the_end(&bad, args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("key `server.upgrade_sock`")
                && stderr.contains("too long for a Unix socket")
                && stderr.contains("at most 107 bytes"),
            "{args:?}: {stderr}"
        );
    }

    let precious = dir.join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let missing = dir.join("absent");
    for (sock, words) in [
        (
            missing.join("upgrade.sock"),
            format!("its directory {} does not exist", missing.display()),
        ),
        (
            precious.clone(),
            "it exists and is a regular file, not a Unix socket; an upgrade would delete it"
                .to_string(),
        ),
    ] {
        let bad = with_sock(sock.to_str().unwrap());
        for args in [&["--upgrade"][..], &[]] {
            let (code, stderr) = run_to_the_end(&bad, args);
            assert_eq!(code, Some(1), "{args:?} {}: {stderr}", sock.display());
            assert!(
                stderr.contains(&format!(
                    "cannot use server.upgrade_sock {}: ",
                    sock.display()
                )) && stderr.contains(&words)
                    && !stderr.contains("panicked"),
                "{args:?} {}: {stderr}",
                sock.display()
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    // The running proxy was not asked to hand over: it serves on.
    assert!(old.0.try_wait().unwrap().is_none(), "the old proxy exited");
    assert!(std::net::TcpStream::connect(listen).is_ok());
    drop(old);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `server.pid_file` that is no pid file (the config file itself, mistyped) is neither
/// overwritten nor removed, and a second proxy does not take a serving one's pid file (which
/// left `--reload` of the first saying no proxy runs, and deleted the file at its exit).
#[test]
fn a_pid_file_that_is_not_this_proxys_is_left_alone() {
    let (dir, config) = serving_config_file("pid-file", free_port(), free_port());
    let text = std::fs::read_to_string(&config).unwrap();
    let pid_line = format!("pid_file = \"{}/proxy.pid\"", dir.display());
    assert!(text.contains(&pid_line));
    let own_file = text.replace(&pid_line, &format!("pid_file = \"{}\"", config.display()));
    std::fs::write(&config, &own_file).unwrap();
    let stderr = refused_to_start(&config);
    assert!(
        stderr.contains(&format!(
            "cannot use server.pid_file {}: it exists and holds something other than a pid",
            config.display()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), own_file);

    // Two proxies on different addresses, one pid file.
    std::fs::write(&config, &text).unwrap();
    let listen = free_port();
    let first_config = dir.join("first.toml");
    std::fs::write(
        &first_config,
        serving_config(dir.to_str().unwrap(), listen, free_port()),
    )
    .unwrap();
    let mut first = Running::start(&first_config);
    first.wait_listening(listen);
    let pid_file = dir.join("proxy.pid");
    let first_pid = first.0.id().to_string();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        first_pid
    );
    let stderr = refused_to_start(&config);
    assert!(
        stderr.contains(&format!(
            "cannot use server.pid_file {}: process {first_pid} already serves with this pid \
             file; use --upgrade to take over, or give this one its own server.pid_file",
            pid_file.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        first_pid
    );
    let (code, stderr) = run_to_the_end(&first_config, &["--reload"]);
    assert_eq!(code, Some(0), "{stderr}");
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the proxy binary with its open-file limit set to `soft` (and `hard`, if given).
fn with_open_files(config: &Path, soft: u64, hard: Option<u64>) -> Running {
    use std::os::unix::process::CommandExt;
    let mut command = Running::command(config, "warn", &[]);
    // SAFETY: between fork and exec the closure only calls getrlimit and setrlimit, which
    // are async-signal-safe, on a struct on its own stack.
    unsafe {
        command.pre_exec(move || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = soft;
            limit.rlim_max = hard.unwrap_or(limit.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Running::spawn(command)
}

/// `(soft, hard)` "Max open files" of process `pid`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// `GET path` on `addr` over HTTP/1.0: the whole answer.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// With a soft open-file limit below what `max_connections` needs (1024 is common; 256 here,
/// for a cap of 300), the proxy raises it at start: clients up to the cap are all taken in,
/// and the next one gets the cap's 503, not an accept that fails with "Too many open files".
#[test]
fn the_open_file_limit_is_raised_for_max_connections() {
    let (listen, admin) = (free_port(), free_port());
    let (dir, config) = serving_config_file("open-files", listen, admin);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("threads = 2", "threads = 1");
    std::fs::write(&config, format!("{text}[limits]\nmax_connections = 300\n")).unwrap();
    let mut proxy = with_open_files(&config, 256, None);
    proxy.wait_listening(listen);
    let (soft, _) = open_file_limits(proxy.0.id());
    assert!(soft >= 600, "soft open-file limit {soft}");

    let clients: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(listen).unwrap())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metrics = http_get(admin, "/metrics");
        let open = metrics
            .lines()
            .find_map(|l| l.strip_prefix("custodia_connections_open "))
            .map(|v| v.trim().to_string());
        if open.as_deref() == Some("300") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy took in {open:?} of 300 clients (None: its admin listener did not answer)"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let over = http_get(listen, "/");
    assert!(
        over.starts_with("HTTP/1.1 503") && over.contains("retry-after: 1"),
        "{over}"
    );
    drop(clients);
    let stderr = proxy.stop();
    assert!(!stderr.contains("Too many open files"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// When the hard limit is too low as well, the start says so once, with the numbers and what
/// to do, and serves on.
#[test]
fn a_hard_open_file_limit_too_low_is_a_warning_at_start() {
    let (listen, admin) = (free_port(), free_port());
    let (dir, config) = serving_config_file("hard-limit", listen, admin);
    let mut proxy = with_open_files(&config, 256, Some(1024));
    proxy.wait_listening(listen);
    assert_eq!(
        open_file_limits(proxy.0.id()),
        (1024, 1024),
        "raised to the hard limit"
    );
    let stderr = proxy.stop();
    assert_eq!(stderr.matches("open-file limit").count(), 1, "{stderr}");
    for words in [
        "the open-file limit (RLIMIT_NOFILE) is 1024",
        "limits.max_connections = 4096 needs about",
        "LimitNOFILE",
        "ulimit -Hn",
        &config.display().to_string(),
    ] {
        assert!(stderr.contains(words), "{words}: {stderr}");
    }
    let lower = stderr
        .split("or lower limits.max_connections to ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(lower.is_some_and(|n| n > 0 && n < 512), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
