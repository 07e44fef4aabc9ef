//! The local stack: one app worker per configured backend, then the proxy, all on loopback, each
//! a child process of this binary; stopped together on Ctrl-C / SIGTERM or when one of them dies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

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
    #[error("cannot locate this executable: {0}")]
    SelfExe(std::io::Error),
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
}

/// Work out what to start from the proxy config.
pub fn plan(config_path: &Path) -> Result<StackPlan, StackError> {
    let config = custodia_proxy::config::load(config_path)?;
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
    Ok(StackPlan {
        config_path: config_path.to_path_buf(),
        workers,
        listen: config.server.listen.clone(),
    })
}

/// Start everything, wait for a stop signal or a dead child, stop everything. Returns the exit
/// status for the process.
pub async fn run(plan: StackPlan) -> Result<i32, StackError> {
    // Handlers first: a Ctrl-C during startup must still stop the children cleanly.
    let mut stop = StopSignals::install()?;
    let exe = std::env::current_exe().map_err(StackError::SelfExe)?;
    let mut processes = Vec::new();

    for (i, addr) in plan.workers.iter().enumerate() {
        let name = format!("worker-{}", i + 1);
        let mut command = Command::new(&exe);
        command.args(["app", "--listen", &addr.to_string(), "--worker-id", &name]);
        processes.push(spawn(&name, command)?);
    }
    for (addr, process) in plan.workers.iter().zip(processes.iter_mut()) {
        wait_listening(process, *addr).await?;
    }

    let mut command = Command::new(&exe);
    command.arg("proxy").arg("--config").arg(&plan.config_path);
    let mut proxy = spawn("custodia-proxy", command)?;
    for addr in &plan.listen {
        wait_listening(&mut proxy, *addr).await?;
    }
    processes.push(proxy);

    print_banner(&plan);

    let status = wait_for_stop(&mut stop, &mut processes).await;
    shutdown(processes).await;
    eprintln!("custodia: stopped");
    Ok(status)
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

fn print_banner(plan: &StackPlan) {
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
async fn wait_for_stop(stop: &mut StopSignals, processes: &mut [Process]) -> i32 {
    loop {
        tokio::select! {
            _ = stop.interrupt.recv() => return 0,
            _ = stop.terminate.recv() => return 0,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                for p in processes.iter_mut() {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        eprintln!("custodia: {} exited ({status}); stopping the stack", p.name);
                        return 1;
                    }
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
