//! The running proxy a command (`--reload`) talks to: its pid, from the pid file, and the
//! environment it will read the config file with when it reloads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::env::parse_dotenv;

/// Where the pid file is, as `text` (a config file) says, before anything else in it is
/// checked: `None` when it is not TOML at all, or `server.pid_file` is there but no path (not
/// a string, or empty): never the default in its place, which may be another proxy's.
pub fn pid_file_named_in(text: &str) -> Option<PathBuf> {
    let table: toml::Table = text.parse().ok()?;
    let named = match table.get("server") {
        None => None,
        Some(server) => match server.as_table()?.get("pid_file") {
            None => None,
            Some(file) => Some(file.as_str().filter(|f| !f.trim().is_empty())?),
        },
    };
    Some(PathBuf::from(
        named.unwrap_or(crate::config::file::DEFAULT_PID_FILE),
    ))
}

/// The pid in `pid_file`, of a process that exists; or why not.
pub fn running_pid(pid_file: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(pid_file).map_err(|e| {
        format!(
            "no running custodia-proxy: cannot read the pid file {} ({e})",
            pid_file.display()
        )
    })?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| format!("the pid file {} holds no pid", pid_file.display()))?;
    // SAFETY: kill(2) has no memory effects; signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    if !alive {
        return Err(format!(
            "no running custodia-proxy: process {pid} (from {}) does not exist",
            pid_file.display()
        ));
    }
    // A pid file left by a proxy that is gone may name a process that took its number since:
    // signalling that one would reload nothing and could kill it (SIGHUP ends a process that
    // does not handle it, a custodia-app worker among them).
    let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !command_line_is_a_proxy(&command_line) {
        let name = command_name(pid).unwrap_or_else(|| "unknown".to_string());
        return Err(format!(
            "no running custodia-proxy: process {pid} (from {}) is `{name}`, not a proxy \
             serving a config file; the pid file is stale",
            pid_file.display()
        ));
    }
    Ok(pid)
}

/// Whether process `pid` is a proxy serving a config file now (see
/// [`command_line_is_a_proxy`]); false when it does not exist or is a zombie.
pub fn serves(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|command_line| command_line_is_a_proxy(&command_line))
}

/// Whether `pid` is the parent of this process, or its parent's, and so on up to init.
pub fn is_an_ancestor(pid: i32) -> bool {
    let mut current = std::os::unix::process::parent_id() as i32;
    // Bounded: a chain read while processes come and go could loop.
    for _ in 0..256 {
        if current == pid {
            return true;
        }
        match parent_of(current) {
            Some(parent) if parent > 0 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

/// The parent of process `pid`, from `/proc/PID/stat` (the fourth field; the second, the
/// command name in parentheses, may hold spaces and parentheses itself).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The command name of process `pid` (`/proc/PID/comm`), if it can be read.
fn command_name(pid: i32) -> Option<String> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim_end().to_string())
}

/// Whether a command line (`/proc/PID/cmdline`: arguments ended by NULs) is a serving proxy's:
/// started with `--config` (a proxy always is; a worker never), not one of the commands that
/// only check or signal, and, for the all-in-one `custodia`, its `proxy` program (the local
/// stack takes `--config` too, and a SIGHUP would end it). Any other program name passes, so
/// a proxy binary renamed by its packager is still found.
fn command_line_is_a_proxy(command_line: &[u8]) -> bool {
    let args: Vec<&[u8]> = command_line
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .collect();
    let Some((program, rest)) = args.split_first() else {
        return false;
    };
    let program_name = program.rsplit(|&b| b == b'/').next().unwrap_or(program);
    if program_name == b"custodia" && rest.first() != Some(&b"proxy".as_slice()) {
        return false;
    }
    let has_config = rest
        .iter()
        .any(|arg| *arg == b"--config" || *arg == b"-c" || arg.starts_with(b"--config="));
    let only_checks_or_signals = rest.iter().any(|arg| {
        matches!(
            *arg,
            b"--check" | b"-t" | b"--reload" | b"-r" | b"--help" | b"-h" | b"--version" | b"-V"
        ) || arg.starts_with(b"--probe")
    });
    has_config && !only_checks_or_signals
}

/// The config file process `pid` was started with (`--config FILE` on its command line,
/// resolved against its working directory): the file a reload makes it read again. `None`
/// when that cannot be read.
pub fn config_file_of(pid: i32) -> Option<PathBuf> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc.join("cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let named = args
        .iter()
        .enumerate()
        .find_map(|(i, arg)| match arg.as_str() {
            "--config" | "-c" => args.get(i + 1).cloned(),
            _ => arg.strip_prefix("--config=").map(str::to_string),
        })?;
    let named = PathBuf::from(named);
    let path = if named.is_absolute() {
        named
    } else {
        proc.join("cwd").join(named)
    };
    std::fs::canonicalize(path).ok()
}

/// What process `pid` reads its config with: its own environment variables over the `.env`
/// in its working directory (as [`crate::config::env::ProcessEnv`] does in it). `None` when
/// this user may not read them; the caller then checks with its own.
pub fn environment_of(pid: i32) -> Option<HashMap<String, String>> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let variables = std::fs::read(proc.join("environ")).ok()?;
    let mut env = std::fs::read_to_string(proc.join("cwd/.env"))
        .map(|text| parse_dotenv(&text))
        .unwrap_or_default();
    for entry in variables.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        if let Some((name, value)) = entry.split_once('=') {
            env.insert(name.to_string(), value.to_string());
        }
    }
    Some(env)
}

/// Ask process `pid` to reload.
pub fn send_sighup(pid: i32) -> Result<(), String> {
    // SAFETY: kill(2) has no memory effects; SIGHUP asks custodia-proxy to reload.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_is_read_from_the_file_or_defaulted() {
        assert_eq!(
            pid_file_named_in("[server]\npid_file = \"/run/x.pid\"\n[upstream]\nbogus = 1\n"),
            Some(PathBuf::from("/run/x.pid"))
        );
        assert_eq!(
            pid_file_named_in("[upstream]\nbackends = []\n"),
            Some(PathBuf::from(crate::config::file::DEFAULT_PID_FILE))
        );
        assert_eq!(pid_file_named_in("not [toml"), None);
        // Named, but no path: not the default pid file in its place (another proxy's).
        assert_eq!(pid_file_named_in("[server]\npid_file = 5\n"), None);
        assert_eq!(pid_file_named_in("[server]\npid_file = \"\"\n"), None);
        assert_eq!(pid_file_named_in("server = 5\n"), None);
    }

    #[test]
    fn only_a_serving_proxy_s_command_line_is_a_proxy() {
        // Arguments separated by spaces, as /proc/PID/cmdline separates them by NULs.
        let is_proxy = |line: &str| command_line_is_a_proxy(line.replace(' ', "\0").as_bytes());
        assert!(is_proxy("/usr/bin/custodia-proxy --config /etc/c.toml"));
        assert!(is_proxy("custodia-proxy --config=/etc/c.toml --upgrade"));
        assert!(is_proxy("target/release/custodia proxy -c c.toml"));
        assert!(is_proxy("/opt/edge --config c.toml"), "renamed");
        // Workers, the local stack, and the commands that check or signal and exit.
        assert!(!is_proxy("custodia-app --listen 127.0.0.1:9001"));
        assert!(!is_proxy("/x/custodia app --listen 127.0.0.1:9001"));
        assert!(!is_proxy("/x/custodia run --config c.toml"));
        assert!(!is_proxy("/x/custodia --config c.toml"));
        assert!(!is_proxy("custodia-proxy --config c.toml --check"));
        assert!(!is_proxy("custodia-proxy --config c.toml --reload"));
        assert!(!is_proxy("custodia-proxy"));
        assert!(!is_proxy(""));
    }

    #[test]
    fn a_pid_file_naming_another_program_is_stale() {
        /// What `running_pid` says of a pid file naming `program args…` (`name` once exec'd).
        fn verdict(program: &str, args: &[&str], name: &str) -> Result<i32, String> {
            let mut other = std::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let dir = std::env::temp_dir().join(format!(
                "custodia-stale-pid-{}-{}",
                std::process::id(),
                other.id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let pid_file = dir.join("proxy.pid");
            std::fs::write(&pid_file, format!("{}\n", other.id())).unwrap();
            // Until its exec, the child still bears this test thread's name.
            for _ in 0..500 {
                if command_name(other.id() as i32).as_deref() == Some(name) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let verdict = running_pid(&pid_file);
            let _ = other.kill();
            let _ = other.wait();
            let _ = std::fs::remove_dir_all(&dir);
            verdict
        }
        let message = verdict("sleep", &["30"], "sleep").unwrap_err();
        assert!(
            message.contains("`sleep`") && message.contains("stale"),
            "{message}"
        );
        // A worker that took the pid: named custodia-app, but no proxy (a SIGHUP ends it).
        let dir = std::env::temp_dir().join(format!("custodia-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let worker = dir.join("custodia-app");
        std::fs::copy("/bin/sleep", &worker).unwrap();
        let message = verdict(worker.to_str().unwrap(), &["30"], "custodia-app").unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            message.contains("`custodia-app`") && message.contains("stale"),
            "{message}"
        );
        // A proxy binary renamed by its packager is still started with --config.
        let renamed = verdict(
            "bash",
            // A builtin wait: no child process to outlive the kill.
            &["-c", "read -r _", "proxy", "--config", "x.toml"],
            "bash",
        );
        assert!(renamed.is_ok(), "{renamed:?}");
    }

    #[test]
    fn a_process_environment_is_read_over_its_dotenv() {
        let env = environment_of(std::process::id() as i32).unwrap();
        assert_eq!(
            env.get("PATH").cloned(),
            std::env::var("PATH").ok(),
            "this process's own variables"
        );
    }

    #[test]
    fn reload_without_a_running_process_says_so() {
        let missing = std::env::temp_dir().join("custodia-no-such-pid-file.pid");
        let message = running_pid(&missing).unwrap_err();
        assert!(message.contains("no running custodia-proxy"), "{message}");
        let dir =
            std::env::temp_dir().join(format!("custodia-running-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stale = dir.join("stale.pid");
        // Pid numbers wrap well below i32::MAX on Linux: this one cannot exist.
        std::fs::write(&stale, "2147483646\n").unwrap();
        let message = running_pid(&stale).unwrap_err();
        assert!(message.contains("does not exist"), "{message}");
        std::fs::write(&stale, "garbage").unwrap();
        assert!(running_pid(&stale).unwrap_err().contains("holds no pid"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
