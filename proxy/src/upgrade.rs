//! The hand-over of the listening sockets from a running proxy to a new one (`--upgrade`).
//!
//! Pingora's hand-over is two steps an operator had to time by hand: start the new process,
//! which waits about 5 s on `server.upgrade_sock`, then send SIGQUIT to the old one, which
//! sends its sockets there and shuts down — whether anyone took them or not. Too late, or
//! with no new process, and nothing was left serving. Now:
//! - the new process sends the SIGQUIT itself, as soon as it is listening on the socket
//!   ([`ask_for_the_listeners`]);
//! - a running proxy given SIGQUIT with nobody listening on the socket says so and goes on
//!   serving ([`Signals`]), where it used to shut down;
//! - once it hands over, its connections hear of it at once: answers say `Connection: close`
//!   and idle keep-alive connections close, during the 5 s Pingora keeps the old process
//!   serving, not only at its end (when busy connections were reset under their next request).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::limits::ShutdownSignal as ThreadShutdown;

/// How long the new process waits to be listening before it gives up asking (Pingora waits
/// about 5 s for the sockets once it listens).
const LISTENING_WITHIN: Duration = Duration::from_secs(10);

/// Whether a process is listening on the Unix socket at `path` (from `/proc/net/unix`, which
/// lists live sockets only: a file left by an earlier upgrade does not count). Connecting to
/// find out would take the one connection the waiting process accepts.
/// `None` when `/proc/net/unix` cannot be read.
pub fn someone_listens_on(path: &Path) -> Option<bool> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    Some(listening_in(&table, path))
}

/// [`someone_listens_on`] over the text of `/proc/net/unix`.
fn listening_in(table: &str, path: &Path) -> bool {
    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 is __SO_ACCEPTCON.
    const ACCEPTS: u32 = 0x0001_0000;
    table.lines().skip(1).any(|line| {
        let listening = line
            .split_whitespace()
            .nth(3)
            .and_then(|flags| u32::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & ACCEPTS != 0);
        listening && socket_path(line).is_some_and(|p| Path::new(p) == path)
    })
}

/// The path of a `/proc/net/unix` line: all that follows its seven other fields (a path may
/// hold spaces).
fn socket_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..7 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    let path = rest.trim_start();
    (!path.is_empty()).then_some(path)
}

/// Why `upgrade_sock` cannot serve for a hand-over, checked at every start before Pingora
/// touches the path: an `--upgrade` unlinks whatever is there and binds a socket, and panics
/// when it cannot (its directory missing). A normal start checks too, so the proxy that will
/// be upgraded from one day does not run on a path the upgrade cannot use.
pub fn check_upgrade_sock(path: &Path) -> Result<(), String> {
    // A relative path's directory is the working directory.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "its directory {} does not exist; create it, or name a path in a directory \
                 that exists",
                dir.display()
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot look at its directory {}: {e}",
                dir.display()
            ))
        }
    }
    // Not followed: a link, even to a socket, is not what the upgrade may remove.
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            let kind = meta.file_type();
            if kind.is_socket() {
                return Ok(());
            }
            let what = if kind.is_file() {
                "a regular file"
            } else if kind.is_dir() {
                "a directory"
            } else if kind.is_symlink() {
                "a symbolic link"
            } else {
                "not a socket"
            };
            Err(format!(
                "it exists and is {what}, not a Unix socket; an upgrade would delete it: name \
                 a path of its own"
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot look at it: {e}")),
    }
}

/// In the new process, before Pingora waits for the sockets: once it listens on
/// `upgrade_sock`, send SIGQUIT to `old`. A thread, as Pingora's wait blocks this one.
pub fn ask_for_the_listeners(old: i32, upgrade_sock: PathBuf) {
    let asked = std::thread::Builder::new()
        .name("upgrade".into())
        .spawn(move || {
            let deadline = Instant::now() + LISTENING_WITHIN;
            // Without /proc to tell, the socket's file (Pingora removes a stale one first).
            while !someone_listens_on(&upgrade_sock).unwrap_or_else(|| upgrade_sock.exists()) {
                if Instant::now() > deadline {
                    tracing::error!(
                        upgrade_sock = %upgrade_sock.display(),
                        "not listening on upgrade_sock after {LISTENING_WITHIN:?}; process {old} \
                         was not asked to hand its listeners over"
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // SAFETY: kill(2) has no memory effects; SIGQUIT asks the old proxy to hand over.
            if unsafe { libc::kill(old, libc::SIGQUIT) } == 0 {
                tracing::info!(
                    pid = old,
                    "asked the running proxy to hand its listeners over"
                );
            } else {
                tracing::error!(
                    pid = old,
                    error = %std::io::Error::last_os_error(),
                    "cannot ask the running proxy to hand its listeners over"
                );
            }
        });
    if let Err(e) = asked {
        tracing::error!(error = %e, "cannot start the upgrade thread");
    }
}

/// Pingora's signals (SIGQUIT upgrade, SIGTERM drain, SIGINT stop), except that a SIGQUIT with
/// no new process listening on `upgrade_sock` is refused: the proxy goes on serving.
pub struct Signals {
    upgrade_sock: PathBuf,
    /// Each proxy thread's view of shutdown, told as soon as a hand-over begins.
    threads: Vec<Arc<ThreadShutdown>>,
}

impl Signals {
    pub fn new(upgrade_sock: PathBuf, threads: Vec<Arc<ThreadShutdown>>) -> Signals {
        Signals {
            upgrade_sock,
            threads,
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut terminate), Ok(mut interrupt)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot watch signals; stopping");
            return ShutdownSignal::GracefulTerminate;
        };
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    // Without /proc to tell, as Pingora does: hand over.
                    if someone_listens_on(&self.upgrade_sock).unwrap_or(true) {
                        for thread in &self.threads {
                            thread.announce_hand_over();
                        }
                        return ShutdownSignal::GracefulUpgrade;
                    }
                    tracing::error!(
                        upgrade_sock = %self.upgrade_sock.display(),
                        "SIGQUIT, but no new process is waiting on upgrade_sock to take the \
                         listeners (start one with --upgrade; it asks by itself): serving on"
                    );
                }
                _ = terminate.recv() => return ShutdownSignal::GracefulTerminate,
                _ = interrupt.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TABLE: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 21234 /tmp/custodia-proxy-upgrade.sock
0000000000000000: 00000002 00000000 00000000 0001 03 21235 /tmp/other.sock
0000000000000000: 00000003 00000000 00000000 0001 03 21236
0000000000000000: 00000002 00000000 00010000 0001 01  1237 /run/my proxy/upgrade.sock
";

    #[test]
    fn a_listening_socket_is_found_by_its_path() {
        assert!(listening_in(
            TABLE,
            Path::new("/tmp/custodia-proxy-upgrade.sock")
        ));
        // Connected, not listening; and absent.
        assert!(!listening_in(TABLE, Path::new("/tmp/other.sock")));
        assert!(!listening_in(TABLE, Path::new("/tmp/none.sock")));
        // A path with a space, after a padded inode.
        assert!(listening_in(TABLE, Path::new("/run/my proxy/upgrade.sock")));
        assert!(!listening_in(TABLE, Path::new("/run/my")));
    }

    #[test]
    fn an_upgrade_sock_that_an_upgrade_would_break_or_delete_is_refused() {
        let dir = std::env::temp_dir().join(format!("custodia-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Free, or a socket left by an earlier upgrade: usable.
        let sock = dir.join("upgrade.sock");
        assert_eq!(check_upgrade_sock(&sock), Ok(()));
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert_eq!(check_upgrade_sock(&sock), Ok(()));
        assert_eq!(check_upgrade_sock(Path::new("relative.sock")), Ok(()));

        let missing = check_upgrade_sock(&dir.join("absent/upgrade.sock")).unwrap_err();
        assert!(
            missing.contains(&format!("{} does not exist", dir.join("absent").display())),
            "{missing}"
        );
        let file = dir.join("precious.txt");
        std::fs::write(&file, "keep me").unwrap();
        let message = check_upgrade_sock(&file).unwrap_err();
        assert!(
            message.contains("is a regular file, not a Unix socket"),
            "{message}"
        );
        let message = check_upgrade_sock(&file.join("upgrade.sock")).unwrap_err();
        assert!(message.contains("is not a directory"), "{message}");
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let message = check_upgrade_sock(&link).unwrap_err();
        assert!(message.contains("a symbolic link"), "{message}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_live_listener_is_seen_and_a_stale_file_is_not() {
        let dir = std::env::temp_dir().join(format!("custodia-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("upgrade.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(someone_listens_on(&path), Some(true));
        drop(listener);
        assert!(path.exists(), "the file stays behind");
        assert_eq!(someone_listens_on(&path), Some(false));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
