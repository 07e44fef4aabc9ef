//! Child processes and loopback ports for tests: every process is killed by its guard, every
//! wait has a deadline.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound then released). Tests of one binary run in parallel and the
/// kernel may hand a just-released port out again, so a port is never returned twice by one
/// test process: two tests can then not end up talking to each other's servers.
pub fn free_addr() -> SocketAddr {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&addr.port()) {
            seen.push(addr.port());
            return addr;
        }
    }
    panic!("no fresh loopback port after 1000 tries");
}

/// The wall clock's unix second, as the proxy's once-a-second log budgets count them.
pub fn unix_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// Kills (SIGKILL) and reaps the child when dropped.
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> ChildGuard {
        command.stdin(Stdio::null());
        if std::env::var_os("CUSTODIA_TEST_QUIET").is_some() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        ChildGuard::start(name, command)
    }

    /// [`ChildGuard::spawn`] with stdout and stderr going to `output`'s files (whatever
    /// `CUSTODIA_TEST_QUIET` says), for tests that read what the process printed.
    pub fn spawn_captured(
        name: &str,
        command: &mut Command,
        output: &CapturedOutput,
    ) -> ChildGuard {
        let file = |ext: &str| {
            std::fs::File::create(output.dir.path().join(format!("{}.{ext}", output.name)))
                .unwrap_or_else(|e| panic!("cannot create the output file of {name}: {e}"))
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file("out")))
            .stderr(Stdio::from(file("err")));
        ChildGuard::start(name, command)
    }

    fn start(name: &str, command: &mut Command) -> ChildGuard {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildGuard {
            name: name.to_string(),
            child,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal (SIGTERM, SIGINT, SIGKILL…).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Wait for the process to exit, at most `patience`; its exit code (None: killed by signal).
    pub fn wait_exit(&mut self, patience: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How many file descriptors the process has open now (entries of `/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap_or_else(|e| panic!("cannot list the fds of {}: {e}", self.name))
            .count()
    }

    /// The TCP sockets (IPv4) the process has open, from `/proc/PID/fd` and `/proc/net/tcp`.
    pub fn tcp_sockets(&self) -> Vec<TcpSocket> {
        let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap_or_else(|e| panic!("cannot list the fds of {}: {e}", self.name))
            .filter_map(|entry| {
                let target = std::fs::read_link(entry.ok()?.path()).ok()?;
                let target = target.to_str()?;
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect();
        let table = std::fs::read_to_string(format!("/proc/{}/net/tcp", self.pid()))
            .unwrap_or_else(|e| panic!("cannot read the TCP table of {}: {e}", self.name));
        table
            .lines()
            .skip(1)
            .filter_map(TcpSocket::parse)
            .filter(|(inode, _)| inodes.contains(inode))
            .map(|(_, socket)| socket)
            .collect()
    }

    /// The process's resident set size in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("cannot read the status of {}: {e}", self.name));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in the status of {}", self.name))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line of `/proc/net/tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's name of the state: ESTABLISHED, CLOSE_WAIT, LISTEN, …
    pub state: &'static str,
}

impl TcpSocket {
    /// (inode, socket) from a `/proc/net/tcp` line.
    fn parse(line: &str) -> Option<(u64, TcpSocket)> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let addr = |field: &str| -> Option<SocketAddr> {
            let (ip, port) = field.split_once(':')?;
            // The address is the in-memory (network order) u32 printed as a host-order hex.
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(SocketAddr::from((ip.to_ne_bytes(), port)))
        };
        let state = match *fields.get(3)? {
            "01" => "ESTABLISHED",
            "02" => "SYN_SENT",
            "03" => "SYN_RECV",
            "04" => "FIN_WAIT1",
            "05" => "FIN_WAIT2",
            "06" => "TIME_WAIT",
            "07" => "CLOSE",
            "08" => "CLOSE_WAIT",
            "09" => "LAST_ACK",
            "0A" => "LISTEN",
            "0B" => "CLOSING",
            _ => "UNKNOWN",
        };
        let socket = TcpSocket {
            local: addr(fields.get(1)?)?,
            remote: addr(fields.get(2)?)?,
            state,
        };
        Some((fields.get(9)?.parse().ok()?, socket))
    }
}

/// Block until something accepts TCP connections on `addr`, or panic after `patience`.
pub fn wait_for_port(addr: SocketAddr, patience: Duration, guard: &mut ChildGuard) {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = guard.child.try_wait() {
            panic!(
                "{} exited ({status}) before listening on {addr}",
                guard.name
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "{} did not listen on {addr} within {patience:?}",
        guard.name
    );
}

/// True once nothing accepts on `addr` any more.
pub fn port_closed(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
}

/// Poll `check` until it returns Some, or panic with `what` after `patience`.
pub fn eventually<T>(what: &str, patience: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {patience:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A unique scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "custodia-test-{tag}-{}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Files (`NAME.out`, `NAME.err`) a child's output goes to with [`ChildGuard::spawn_captured`];
/// removed on drop.
pub struct CapturedOutput {
    name: String,
    dir: TempDir,
}

impl CapturedOutput {
    pub fn new(name: &str) -> CapturedOutput {
        CapturedOutput {
            name: name.to_string(),
            dir: TempDir::new(&format!("output-{name}")),
        }
    }

    /// Everything printed so far: stdout, then stderr.
    pub fn read(&self) -> String {
        ["out", "err"]
            .iter()
            .map(|ext| {
                std::fs::read_to_string(self.dir.path().join(format!("{}.{ext}", self.name)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn fastrand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// Async [`eventually`]: awaits `check` until it returns Some, or panics with `what` after
/// `patience`. For checks that make async requests (reqwest) inside a tokio test.
pub async fn eventually_async<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {patience:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
