//! The root binary's local stack: starts workers and the proxy from a config, serves through the
//! proxy, and stops everything on Ctrl-C (SIGINT).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::custodia::{client, custodia_bin, STARTUP};
use support::process::{free_addr, port_closed, wait_for_port, ChildGuard, TempDir};

/// The shipped config with free ports and private pid/socket paths, written into `dir`.
fn stack_config(
    dir: &TempDir,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    workers: &[std::net::SocketAddr; 3],
) -> std::path::PathBuf {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/custodia.toml"))
            .expect("shipped config");
    let config = shipped
        .replace("127.0.0.1:8080", &listen.to_string())
        .replace("127.0.0.1:9090", &admin.to_string())
        .replace("127.0.0.1:9001", &workers[0].to_string())
        .replace("127.0.0.1:9002", &workers[1].to_string())
        .replace("127.0.0.1:9003", &workers[2].to_string())
        .replace(
            "/tmp/custodia-proxy.pid",
            &dir.path().join("p.pid").display().to_string(),
        )
        .replace(
            "/tmp/custodia-proxy-upgrade.sock",
            &dir.path().join("u.sock").display().to_string(),
        );
    let path = dir.path().join("custodia.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The pid of the process whose command line has `needle` (the worker on an address).
fn pid_with_arg(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.contains(&needle.as_bytes()).then_some(pid)
        })
}

/// A local stack on free ports: its directory, public and admin addresses, workers, process.
struct Stack {
    _dir: TempDir,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    workers: [std::net::SocketAddr; 3],
    process: ChildGuard,
}

fn start_stack(tag: &str) -> Stack {
    let dir = TempDir::new(tag);
    let (listen, admin) = (free_addr(), free_addr());
    let workers = [free_addr(), free_addr(), free_addr()];
    let path = stack_config(&dir, listen, admin, &workers);
    let mut process = ChildGuard::spawn(
        "custodia (local stack)",
        Command::new(custodia_bin()).arg("--config").arg(&path),
    );
    wait_for_port(listen, STARTUP, &mut process);
    Stack {
        _dir: dir,
        listen,
        admin,
        workers,
        process,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_serves_through_the_proxy_and_stops_on_ctrl_c() {
    let Stack {
        listen,
        admin,
        workers,
        process: mut stack,
        ..
    } = start_stack("stack");

    let home = client()
        .get(format!("http://{listen}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(home.status(), 200);
    assert!(home.text().await.unwrap().contains("Guest"));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..9 {
        let hello: serde_json::Value = client()
            .get(format!("http://{listen}/api/hello"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        seen.insert(hello["worker"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 3, "all three workers answer: {seen:?}");

    stack.signal(libc::SIGINT);
    let code = stack
        .wait_exit(Duration::from_secs(20))
        .expect("the stack stops");
    assert_eq!(code, Some(0));
    for addr in [listen, admin].iter().chain(workers.iter()) {
        assert!(port_closed(*addr), "{addr} is closed after shutdown");
    }
}

/// A worker that dies is a worker down, not the end of the stack: the others go on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_leaves_the_others_serving() {
    let Stack {
        listen,
        workers,
        process: mut stack,
        ..
    } = start_stack("stack-dead-worker");
    let second = pid_with_arg(&workers[1].to_string()).expect("worker-2's process");
    // SAFETY: kill(2) on a pid this test's stack started.
    unsafe { libc::kill(second, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(stack.is_running(), "the stack runs on");
    for _ in 0..9 {
        let hello = client()
            .get(format!("http://{listen}/api/hello"))
            .send()
            .await
            .unwrap();
        assert_eq!(hello.status(), 200, "served by the other workers");
    }
    stack.signal(libc::SIGINT);
    assert_eq!(stack.wait_exit(Duration::from_secs(20)), Some(Some(0)));
}

/// A port another program holds stops the start with a message naming it, before anything is
/// started (its listener would have answered the stack's readiness check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_stops_the_start_and_says_which() {
    let dir = TempDir::new("stack-taken");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let path = stack_config(
        &dir,
        free_addr(),
        free_addr(),
        &[free_addr(), taken, free_addr()],
    );
    let out = Command::new(custodia_bin())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{taken} (worker-2) is taken")),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("local stack is up"));
}

/// `custodia --version` and `--help`, as `custodia-proxy` and `custodia-app` have them; output
/// to a reader that has gone (`custodia --help | head -1`) is no panic.
#[test]
fn the_root_binary_has_help_and_version() {
    let out = Command::new(custodia_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout, format!("custodia {}\n", env!("CARGO_PKG_VERSION")));
    for flag in ["--help", "--version"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(custodia_bin())
            .arg(flag)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{flag}: {stderr}");
        assert!(stderr.is_empty(), "{flag}: {stderr}");
    }
}
