//! The root binary's local stack: starts workers and the proxy from a config, serves through the
//! proxy, and stops everything on Ctrl-C (SIGINT).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::custodia::{client, custodia_bin, STARTUP};
use support::process::{free_addr, port_closed, wait_for_port, ChildGuard, TempDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_serves_through_the_proxy_and_stops_on_ctrl_c() {
    let dir = TempDir::new("stack");
    let (listen, admin) = (free_addr(), free_addr());
    let workers = [free_addr(), free_addr(), free_addr()];
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/custodia.toml"))
            .expect("shipped config");
    // The shipped file, with free ports and private pid/socket paths.
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

    let mut stack = ChildGuard::spawn(
        "custodia (local stack)",
        Command::new(custodia_bin()).arg("--config").arg(&path),
    );
    wait_for_port(listen, STARTUP, &mut stack);

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
