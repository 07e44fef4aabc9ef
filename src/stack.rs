//! The local stack: one app worker per configured backend, then the proxy, all on loopback, each
//! a child process of this binary; stopped together on Ctrl-C / SIGTERM or when one of them dies.
//! When `[auth]` names no identity provider (and the environment names none), the development
//! identity provider runs in this process on loopback and the proxy is pointed at it through the
//! environment, exactly as it would be pointed at Auth0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use custodia_proxy::config::env::{Env, ProcessEnv};
use tokio::process::{Child, Command};

use crate::dev_idp::{self, DemoUser, DevIdpSettings};

/// Why the stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{0}")]
    Config(#[from] custodia_proxy::config::ConfigError),
    #[error("backend {0} is not a loopback IP address: the local stack only starts workers on 127.0.0.1/::1")]
    NotLoopback(String),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not start listening on {addr} within {secs} s{hint}")]
    NotReady {
        what: String,
        addr: SocketAddr,
        secs: u64,
        hint: String,
    },
    #[error(
        "{addr} ({what}) is taken: {source} (another custodia, or another program, listens there)"
    )]
    PortTaken {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot locate this executable: {0}")]
    SelfExe(std::io::Error),
    #[error("cannot read {path}: {reason}")]
    Peek { path: String, reason: String },
    #[error("development identity provider: {0}")]
    DevIdp(String),
}

/// A started child with a name for messages; killed if still running when dropped.
struct Process {
    name: String,
    child: Child,
}

impl Process {
    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on a pid we spawned and still own; no memory is touched.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Where things run, for the banner.
pub struct StackPlan {
    pub config_path: PathBuf,
    pub workers: Vec<SocketAddr>,
    pub listen: Vec<SocketAddr>,
    /// Environment given to the proxy (secrets and issuer of the development IdP).
    pub proxy_env: HashMap<String, String>,
    /// Environment given to the workers (the identity assertion key).
    pub worker_env: HashMap<String, String>,
    /// The development IdP to run, already bound.
    pub dev_idp: Option<(std::net::TcpListener, DevIdpSettings)>,
}

/// The process environment (and `.env`) under the values the stack sets for its children.
struct Layered<'a> {
    overrides: &'a HashMap<String, String>,
    base: ProcessEnv,
}

impl Env for Layered<'_> {
    fn get(&self, name: &str) -> Option<String> {
        self.overrides
            .get(name)
            .cloned()
            .or_else(|| self.base.get(name))
    }
}

fn random_hex(bytes: usize) -> Result<String, StackError> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf)
        .map_err(|e| StackError::DevIdp(format!("no randomness: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Does the file have `[auth]` without an issuer, and the environment none either?
fn needs_dev_idp(config_path: &Path) -> Result<Option<Option<String>>, StackError> {
    let text = std::fs::read_to_string(config_path).map_err(|e| StackError::Peek {
        path: config_path.display().to_string(),
        reason: e.to_string(),
    })?;
    // Syntax errors surface later with full detail from the proxy's own validation.
    let Ok(value) = text.parse::<toml::Table>() else {
        return Ok(None);
    };
    let Some(auth) = value.get("auth").and_then(|a| a.as_table()) else {
        return Ok(None);
    };
    let env = ProcessEnv::with_dotenv();
    if auth.contains_key("issuer")
        || env.get("CUSTODIA_AUTH_ISSUER").is_some()
        || env.get("AUTH0_DOMAIN").is_some()
    {
        return Ok(None);
    }
    let client_id = auth
        .get("client_id")
        .and_then(|c| c.as_str())
        .map(str::to_string);
    Ok(Some(client_id))
}

/// Work out what to start from the proxy config.
pub fn plan(config_path: &Path) -> Result<StackPlan, StackError> {
    let mut proxy_env = HashMap::new();
    let mut dev_listener = None;
    if let Some(client_id) = needs_dev_idp(config_path)? {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| StackError::DevIdp(format!("cannot bind 127.0.0.1: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StackError::DevIdp(e.to_string()))?;
        let base = ProcessEnv::with_dotenv();
        proxy_env.insert("CUSTODIA_AUTH_ISSUER".into(), format!("http://{addr}"));
        if client_id.is_none() {
            proxy_env.insert("AUTH0_CLIENT_ID".into(), "custodia-local".into());
        }
        proxy_env.insert("AUTH0_CLIENT_SECRET".into(), random_hex(32)?);
        if base.get("APP_SECRET_KEY").is_none() {
            // Sessions of a development run end with it.
            proxy_env.insert("APP_SECRET_KEY".into(), random_hex(32)?);
        }
        dev_listener = Some(listener);
    }
    let env = Layered {
        overrides: &proxy_env,
        base: ProcessEnv::with_dotenv(),
    };
    let config = custodia_proxy::config::load_with_env(config_path, &env)?;
    let mut workers = Vec::new();
    for target in &config.upstream.backends {
        let ip: std::net::IpAddr = target
            .host
            .parse()
            .map_err(|_| StackError::NotLoopback(target.to_string()))?;
        if !ip.is_loopback() {
            return Err(StackError::NotLoopback(target.to_string()));
        }
        workers.push(SocketAddr::new(ip, target.port));
    }
    let mut worker_env = HashMap::new();
    let mut dev_idp = None;
    if let Some(auth) = &config.auth {
        // Workers verify what the proxy signs: hand them the key the proxy resolved.
        worker_env.insert(
            "CUSTODIA_ASSERTION_KEY".into(),
            auth.assertion_key.0.clone(),
        );
        proxy_env.insert(
            "CUSTODIA_ASSERTION_KEY".into(),
            auth.assertion_key.0.clone(),
        );
        if let Some(listener) = dev_listener {
            let settings = DevIdpSettings {
                issuer: auth.issuer.clone(),
                client_id: auth.client_id.clone(),
                client_secret: auth.client_secret.0.clone(),
                redirect_uris: vec![auth.redirect_uri()],
                post_logout_redirect_uris: vec![
                    format!("{}/", auth.public_url),
                    auth.public_url.clone(),
                ],
                user: DemoUser::default(),
                signing_key: None,
            };
            dev_idp = Some((listener, settings));
        }
    }
    Ok(StackPlan {
        config_path: config_path.to_path_buf(),
        workers,
        listen: config.server.listen.clone(),
        proxy_env,
        worker_env,
        dev_idp,
    })
}

/// Start everything, wait for a stop signal or a dead child, stop everything. Returns the exit
/// status for the process.
pub async fn run(mut plan: StackPlan) -> Result<i32, StackError> {
    // Handlers first: a Ctrl-C during startup must still stop the children cleanly.
    let mut stop = StopSignals::install()?;
    // A port another program holds would answer the readiness checks below as if ours did.
    check_ports_are_free(&plan)?;
    let exe = std::env::current_exe().map_err(StackError::SelfExe)?;
    let mut processes = Vec::new();

    let (idp_stop, idp_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut idp_task = None;
    let mut dev_idp_running = false;
    if let Some((listener, settings)) = plan.dev_idp.take() {
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .map_err(|e| StackError::DevIdp(e.to_string()))?;
        // dev_idp::serve prints its own "development only" banner with the demo login.
        dev_idp_running = true;
        idp_task = Some(tokio::spawn(dev_idp::serve(
            listener,
            settings,
            async move {
                let _ = idp_stopped.await;
            },
        )));
    }

    for (i, addr) in plan.workers.iter().enumerate() {
        let name = format!("worker-{}", i + 1);
        let mut command = Command::new(&exe);
        command.args(["app", "--listen", &addr.to_string(), "--worker-id", &name]);
        command.envs(&plan.worker_env);
        processes.push(spawn(&name, command)?);
    }
    for (addr, process) in plan.workers.iter().zip(processes.iter_mut()) {
        wait_listening(process, *addr).await?;
    }

    let mut command = Command::new(&exe);
    command.arg("proxy").arg("--config").arg(&plan.config_path);
    command.envs(&plan.proxy_env);
    let mut proxy = spawn("custodia-proxy", command)?;
    for addr in &plan.listen {
        wait_listening(&mut proxy, *addr).await?;
    }
    processes.push(proxy);

    print_banner(&plan, dev_idp_running);

    let status = wait_for_stop(&mut stop, &mut processes).await;
    shutdown(processes).await;
    let _ = idp_stop.send(());
    if let Some(task) = idp_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    eprintln!("custodia: stopped");
    Ok(status)
}

/// The workers' and the proxy's addresses, each bound once and let go: taken ones fail the start
/// before anything is spawned.
fn check_ports_are_free(plan: &StackPlan) -> Result<(), StackError> {
    let workers = plan
        .workers
        .iter()
        .enumerate()
        .map(|(i, addr)| (format!("worker-{}", i + 1), *addr));
    let proxy = plan
        .listen
        .iter()
        .map(|addr| ("custodia-proxy".to_string(), *addr));
    for (what, addr) in workers.chain(proxy) {
        std::net::TcpListener::bind(addr).map_err(|source| StackError::PortTaken {
            what,
            addr,
            source,
        })?;
    }
    Ok(())
}

fn spawn(name: &str, mut command: Command) -> Result<Process, StackError> {
    // If this supervisor dies without cleaning up (SIGKILL), the kernel stops the children too.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|source| StackError::Spawn {
        what: name.to_string(),
        source,
    })?;
    Ok(Process {
        name: name.to_string(),
        child,
    })
}

async fn wait_listening(process: &mut Process, addr: SocketAddr) -> Result<(), StackError> {
    const PATIENCE: Duration = Duration::from_secs(20);
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = process.child.try_wait() {
            return Err(StackError::NotReady {
                what: process.name.clone(),
                addr,
                secs: PATIENCE.as_secs(),
                hint: format!(": it exited with {status} (is the port already in use?)"),
            });
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(StackError::NotReady {
        what: process.name.clone(),
        addr,
        secs: PATIENCE.as_secs(),
        hint: String::new(),
    })
}

fn print_banner(plan: &StackPlan, dev_idp: bool) {
    let listen = plan
        .listen
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "custodia: local stack is up (config {})",
        plan.config_path.display()
    );
    println!("  proxy       {listen}   <- open this");
    for (i, addr) in plan.workers.iter().enumerate() {
        println!("  worker-{}    http://{addr}", i + 1);
    }
    println!(
        "  try         curl {}/api/hello",
        listen.split(", ").next().unwrap_or("")
    );
    if dev_idp {
        println!(
            "  login       {}/login (development identity provider, see below)",
            listen.split(", ").next().unwrap_or("")
        );
    }
    println!("  stop        Ctrl-C");
}

/// SIGINT (Ctrl-C) and SIGTERM, caught from the moment the stack starts.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals, StackError> {
        use tokio::signal::unix::{signal, SignalKind};
        let watch = |kind| {
            signal(kind).map_err(|source| StackError::Spawn {
                what: "the signal handlers".into(),
                source,
            })
        };
        Ok(StopSignals {
            interrupt: watch(SignalKind::interrupt())?,
            terminate: watch(SignalKind::terminate())?,
        })
    }
}

/// Wait for Ctrl-C, SIGTERM, or any child exiting; the exit status to report.
/// Until Ctrl-C or SIGTERM (0), or until the proxy or the last worker has exited (1). A worker
/// that dies is left dead, as in production: the proxy's health checks take it out and the
/// others serve (which is what the local stack is for trying).
async fn wait_for_stop(stop: &mut StopSignals, processes: &mut [Process]) -> i32 {
    let mut reported = vec![false; processes.len()];
    loop {
        tokio::select! {
            _ = stop.interrupt.recv() => return 0,
            _ = stop.terminate.recv() => return 0,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                for (p, reported) in processes.iter_mut().zip(reported.iter_mut()) {
                    if *reported {
                        continue;
                    }
                    if let Ok(Some(status)) = p.child.try_wait() {
                        *reported = true;
                        if p.name == "custodia-proxy" {
                            eprintln!("custodia: {} exited ({status}); stopping the stack", p.name);
                            return 1;
                        }
                        eprintln!(
                            "custodia: {} exited ({status}); the proxy serves from the other workers",
                            p.name
                        );
                    }
                }
                let workers_left = processes
                    .iter()
                    .zip(&reported)
                    .any(|(p, reported)| p.name != "custodia-proxy" && !reported);
                if !workers_left {
                    eprintln!("custodia: every worker has exited; stopping the stack");
                    return 1;
                }
            }
        }
    }
}

/// Proxy first (fast shutdown: it holds no state), then the workers (graceful), then force.
async fn shutdown(mut processes: Vec<Process>) {
    for p in processes.iter().rev() {
        let signal = if p.name == "custodia-proxy" {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        p.signal(signal);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in processes.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, p.child.wait()).await.is_err() {
            eprintln!("custodia: {} did not stop in time; killing it", p.name);
            let _ = p.child.kill().await;
        }
    }
}
