#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The deployment files agree with each other and with what the binaries read, and the
//! scale-out claim holds: a session made through one proxy replica is honoured by another.
//!
//! - `Dockerfile.proxy` / `Dockerfile.app`: the ports they expose, the config path, the health
//!   probes and the entry points match `config/compose.toml` and the CLIs.
//! - `compose.yaml`: services, ports (admin never public), DNS name of the workers, health-based
//!   start order, the ngrok target, Prometheus' scrape target, and `.env.example` covering every
//!   variable it uses.
//! - `config/compose.toml` and the Kubernetes ConfigMap pass `custodia proxy --check` with the
//!   values of `.env.example`.
//! - `deploy/kubernetes`: every document well-formed, ports/paths/names consistent with the
//!   ConfigMap's TOML and the images.
//! - `--probe`: the health check the images use, run for real.
//! - Two proxies × three workers on loopback: log in through proxy A, proxy B honours the cookie.
//!
//! The schema checks proper (Compose v2 `config -q`, hadolint, kubernetes-validate, promtool) run
//! in `scripts/test`.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::redirect::Policy;
use reqwest::{StatusCode, Url};
use serde_yaml::Value;

use custodia::dev_idp::{self, DemoUser, DevIdpSettings};
use custodia_proxy::config::{self as proxy_config, ProxyConfig};
use support::custodia::{clear_secret_env, custodia_bin, Proxy, Worker};
use support::oidc_provider::login_as_demo;
use support::process::{eventually_async, free_addr, TempDir};

// ---------------------------------------------------------------------------------------------
// Reading the files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `.env.example` as KEY → VALUE; commented-out assignments (`# KEY=`) are listed with `None`.
fn env_example() -> BTreeMap<String, Option<String>> {
    let mut vars = BTreeMap::new();
    for line in read(".env.example").lines() {
        let line = line.trim();
        let (commented, assignment) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        let Some((key, value)) = assignment.split_once('=') else {
            continue;
        };
        let is_name = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !is_name {
            continue;
        }
        vars.insert(
            key.to_string(),
            (!commented).then(|| value.trim().to_string()),
        );
    }
    vars
}

/// The values `.env.example` sets (what `docker compose --env-file .env.example` would use).
fn env_example_values() -> HashMap<String, String> {
    env_example()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
}

/// One instruction of a Dockerfile: keyword (upper case) and its arguments, with line
/// continuations joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
    stage: usize,
}

struct Dockerfile {
    name: String,
    instructions: Vec<Instruction>,
}

impl Dockerfile {
    fn read(name: &str) -> Dockerfile {
        let text = read(name);
        let mut instructions = Vec::new();
        let mut pending = String::new();
        let mut stage = 0;
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    pending.push_str(part);
                    pending.push(' ');
                }
                None => {
                    pending.push_str(trimmed);
                    let full = std::mem::take(&mut pending);
                    let (keyword, args) =
                        full.split_once(char::is_whitespace).unwrap_or((&full, ""));
                    let keyword = keyword.to_ascii_uppercase();
                    if keyword == "FROM" {
                        stage += 1;
                    }
                    instructions.push(Instruction {
                        keyword,
                        args: args.trim().to_string(),
                        stage,
                    });
                }
            }
        }
        Dockerfile {
            name: name.to_string(),
            instructions,
        }
    }

    fn all(&self, keyword: &str) -> Vec<&Instruction> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .collect()
    }

    /// Instructions of the last (runtime) stage.
    fn runtime(&self, keyword: &str) -> Vec<&Instruction> {
        let last = self.instructions.last().map_or(0, |i| i.stage);
        self.all(keyword)
            .into_iter()
            .filter(|i| i.stage == last)
            .collect()
    }

    fn one_runtime(&self, keyword: &str) -> &str {
        let found = self.runtime(keyword);
        assert_eq!(
            found.len(),
            1,
            "{}: one {keyword} in the runtime stage",
            self.name
        );
        &found[0].args
    }

    /// An exec-form (JSON array) instruction of the runtime stage.
    fn exec_form(&self, keyword: &str) -> Vec<String> {
        let args = self.one_runtime(keyword);
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("{}: {keyword} {args} is not exec form: {e}", self.name))
    }

    fn healthcheck(&self) -> Vec<String> {
        let args = self.one_runtime("HEALTHCHECK");
        let (_, command) = args
            .split_once("CMD ")
            .unwrap_or_else(|| panic!("{}: HEALTHCHECK without CMD", self.name));
        serde_json::from_str(command.trim())
            .unwrap_or_else(|e| panic!("{}: HEALTHCHECK CMD must be exec form: {e}", self.name))
    }

    fn exposed(&self) -> BTreeSet<u16> {
        self.runtime("EXPOSE")
            .iter()
            .flat_map(|i| i.args.split_whitespace())
            .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
            .collect()
    }

    /// COPY sources → destination, every stage.
    fn copies(&self) -> Vec<(Vec<String>, String)> {
        self.all("COPY")
            .iter()
            .map(|i| {
                let mut words: Vec<String> = i
                    .args
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .map(str::to_string)
                    .collect();
                let dest = words.pop().unwrap();
                (words, dest)
            })
            .collect()
    }

    fn label(&self, name: &str) -> Option<String> {
        let needle = format!("{name}=\"");
        self.runtime("LABEL").iter().find_map(|i| {
            let start = i.args.find(&needle)? + needle.len();
            let end = i.args[start..].find('"')? + start;
            Some(i.args[start..end].to_string())
        })
    }

    fn arg_default(&self, name: &str) -> Option<String> {
        self.all("ARG").iter().find_map(|i| {
            let (key, value) = i.args.split_once('=')?;
            (key == name).then(|| value.to_string())
        })
    }
}

/// All YAML documents of a file, merge keys (`<<: *anchor`) applied.
fn yaml_documents(path: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"));
            value.apply_merge().unwrap();
            value
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut documents = yaml_documents(path);
    assert_eq!(documents.len(), 1, "{path}: one YAML document");
    documents.remove(0)
}

fn get<'a>(value: &'a Value, path: &str) -> &'a Value {
    let mut current = value;
    for key in path.split('.') {
        current = match key.parse::<usize>() {
            Ok(index) => current.get(index),
            Err(_) => current.get(key),
        }
        .unwrap_or_else(|| panic!("no `{path}` (at `{key}`) in {value:?}"));
    }
    current
}

fn text<'a>(value: &'a Value, path: &str) -> &'a str {
    get(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("not a string: {other:?}"),
            })
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        other => panic!("not a list: {other:?}"),
    }
}

/// The value after `flag` in a command line.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("{flag} without a value in {args:?}"))
}

/// `.env.example`'s values as an operator fills it in: the Auth0 application's values in place
/// of its `your-…` placeholders and a generated `APP_SECRET_KEY` (the proxy refuses each
/// placeholder: [`the_env_examples_placeholders_are_refused`]).
fn deployment_env() -> HashMap<String, String> {
    let mut env = auth0_filled_in();
    env.insert(
        "APP_SECRET_KEY".to_string(),
        "5f0c7a1d9e2b4c6f8a0d1e3f5a7c9b1d2e4f6a8c0b2d4e6f8a1c3e5f7b9d0a2c".to_string(),
    );
    env
}

/// `.env.example` with the Auth0 application's values filled in, its `APP_SECRET_KEY` not.
fn auth0_filled_in() -> HashMap<String, String> {
    let mut env = env_example_values();
    for (name, value) in [
        ("AUTH0_DOMAIN", "custodia-demo.eu.auth0.com"),
        ("AUTH0_CLIENT_ID", "x1RkDq7mZ0pV4cHs9LwEeYt2"),
        ("AUTH0_CLIENT_SECRET", "kT3o9Q-wz1VbN8mA5yUe7iXc0RgLdH2f"),
    ] {
        assert!(
            env.get(name).is_some_and(|v| v.starts_with("your-")),
            ".env.example's {name} is a `your-…` placeholder"
        );
        env.insert(name.to_string(), value.to_string());
    }
    env
}

/// A proxy config file validated exactly as the binary does, with [`deployment_env`].
fn proxy_config_from(text: &str, label: &str) -> ProxyConfig {
    proxy_config::parse_with_env(text, Path::new(label), &deployment_env())
        .unwrap_or_else(|e| panic!("{label} is invalid with .env.example's values: {e}"))
}

/// Copying `.env.example` without filling it in must not start a proxy: not one whose logins
/// all fail at Auth0, nor one whose session cookies anyone with the repository can forge.
#[test]
fn the_env_examples_placeholders_are_refused() {
    let check = |env: &HashMap<String, String>| {
        proxy_config::parse_with_env(&compose_toml_text(), Path::new("config/compose.toml"), env)
            .unwrap_err()
            .to_string()
    };
    let as_shipped = check(&env_example_values());
    assert!(as_shipped.contains("placeholder"), "{as_shipped}");
    let key_left = check(&auth0_filled_in());
    assert!(
        key_left.contains("APP_SECRET_KEY is still the example's placeholder")
            && key_left.contains("openssl rand -hex 32"),
        "{key_left}"
    );
    for name in ["AUTH0_CLIENT_ID", "AUTH0_CLIENT_SECRET"] {
        let mut env = deployment_env();
        env.insert(name.to_string(), env_example_values()[name].clone());
        let error = check(&env);
        assert!(
            error.contains(&format!("{name} is still .env.example's placeholder")),
            "{error}"
        );
    }
}

/// Starting the stack without setting `public_url` (README step 3) stops the proxy with the
/// reason, instead of a healthy stack whose every login fails at Auth0.
#[test]
fn the_shipped_public_url_placeholder_is_refused() {
    let error = proxy_config::parse_with_env(
        &read("config/compose.toml"),
        Path::new("config/compose.toml"),
        &deployment_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("auth.public_url") && error.contains("NGROK_DOMAIN"),
        "{error}"
    );
}

/// config/compose.toml as an operator fills it in: `public_url` set to their NGROK_DOMAIN (the
/// file ships a placeholder the proxy refuses).
fn compose_toml_text() -> String {
    let shipped = read("config/compose.toml");
    assert!(
        shipped.contains(PUBLIC_URL_PLACEHOLDER),
        "config/compose.toml ships the placeholder the README tells operators to replace"
    );
    let domain = env_example_values()["NGROK_DOMAIN"].clone();
    shipped.replace(PUBLIC_URL_PLACEHOLDER, &format!("https://{domain}"))
}

const PUBLIC_URL_PLACEHOLDER: &str = "https://YOUR-DOMAIN.ngrok-free.app";

fn compose_toml() -> ProxyConfig {
    proxy_config_from(&compose_toml_text(), "config/compose.toml")
}

fn admin_port(config: &ProxyConfig) -> u16 {
    config
        .admin
        .as_ref()
        .expect("an [admin] listener")
        .listen
        .port()
}

fn public_port(config: &ProxyConfig) -> u16 {
    assert_eq!(config.server.listen.len(), 1, "one public listener");
    config.server.listen[0].port()
}

/// The proxy config path inside the container (`--config` of the image's CMD).
fn image_config_path() -> String {
    flag_value(
        &Dockerfile::read("Dockerfile.proxy").exec_form("CMD"),
        "--config",
    )
    .to_string()
}

fn probe_url(command: &[String]) -> Url {
    Url::parse(flag_value(command, "--probe")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Images

#[test]
fn the_dockerfiles_build_what_the_binaries_and_the_config_expect() {
    let config = compose_toml();
    let cargo: toml::Table = read("Cargo.toml").parse().unwrap();
    let version = cargo["workspace"]["package"]["version"].as_str().unwrap();
    let members: Vec<&str> = cargo["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    // Explicit targets (`[[bench]]`, `[[bin]]`, …) cargo wants to find even when building
    // another package: the dependency layer must stub them.
    let mut explicit_targets = Vec::new();
    for dir in std::iter::once(".").chain(members.iter().copied()) {
        let manifest: toml::Table = read(&format!("{dir}/Cargo.toml")).parse().unwrap();
        for (section, default_dir) in [
            ("bench", "benches"),
            ("test", "tests"),
            ("example", "examples"),
            ("bin", "src/bin"),
        ] {
            for target in manifest
                .get(section)
                .and_then(|t| t.as_array())
                .into_iter()
                .flatten()
            {
                let path = match target.get("path").and_then(|p| p.as_str()) {
                    Some(path) => path.to_string(),
                    None => format!("{default_dir}/{}.rs", target["name"].as_str().unwrap()),
                };
                explicit_targets.push(
                    Path::new(dir)
                        .join(path)
                        .to_string_lossy()
                        .trim_start_matches("./")
                        .to_string(),
                );
            }
        }
        assert!(
            !root().join(dir).join("build.rs").exists(),
            "{dir}/build.rs: the Dockerfiles do not copy build scripts yet"
        );
    }
    let dockerignore = read(".dockerignore");

    for (file, package, binary) in [
        (
            "Dockerfile.proxy",
            "custodia-proxy",
            "/usr/local/bin/custodia-proxy",
        ),
        (
            "Dockerfile.app",
            "custodia-app",
            "/usr/local/bin/custodia-app",
        ),
    ] {
        let docker = Dockerfile::read(file);
        // Multi-stage, pinned bookworm-based images.
        let froms = docker.all("FROM");
        assert!(froms.len() >= 2, "{file}: a build and a runtime stage");
        for from in &froms {
            let image = from.args.split_whitespace().next().unwrap();
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest" && !tag.contains('/'),
                "{file}: base image {image} is pinned to a tag"
            );
        }
        assert!(froms[0].args.starts_with("rust:") && froms[0].args.contains("bookworm"));
        assert!(froms.last().unwrap().args.contains("debian12"));

        // The dependency layer: every workspace manifest and the lock, stubs for every target
        // cargo insists on, and a --locked build of the package before the sources arrive.
        let copies = docker.copies();
        let copied: Vec<&str> = copies
            .iter()
            .flat_map(|(sources, _)| sources.iter().map(String::as_str))
            .collect();
        for manifest in std::iter::once("Cargo.toml".to_string())
            .chain(members.iter().map(|m| format!("{m}/Cargo.toml")))
        {
            assert!(
                copied.contains(&manifest.as_str()),
                "{file} copies {manifest}"
            );
        }
        assert!(copied.contains(&"Cargo.lock"), "{file} copies Cargo.lock");
        let runs: Vec<&str> = docker.all("RUN").iter().map(|i| i.args.as_str()).collect();
        let build = format!("cargo build --release --locked -p {package}");
        assert_eq!(
            runs.iter().filter(|r| r.contains(&build)).count(),
            2,
            "{file}: `{build}` once for the dependency layer, once for the sources"
        );
        let stub_run = runs.iter().find(|r| r.contains(&build)).unwrap();
        for target in &explicit_targets {
            assert!(stub_run.contains(target.as_str()), "{file} stubs {target}");
        }
        let stub_build = docker
            .instructions
            .iter()
            .position(|i| i.keyword == "RUN" && i.args.contains(&build))
            .unwrap();
        let source_copy = docker
            .instructions
            .iter()
            .position(|i| i.keyword == "COPY" && i.args.contains("/src "))
            .unwrap();
        assert!(
            stub_build < source_copy,
            "{file}: dependencies are built before the sources are copied"
        );
        // Everything the build copies from the context passes .dockerignore's allow-list.
        for source in copied.iter().filter(|s| !s.starts_with('/')) {
            assert!(
                dockerignore
                    .lines()
                    .any(|l| l.trim_end_matches('/') == format!("!{source}")),
                ".dockerignore lets {source} (copied by {file}) into the context"
            );
        }

        // Runtime: non-root, labelled, probing itself with the binary it runs.
        let user = docker.one_runtime("USER");
        let uid: u32 = user.split(':').next().unwrap().parse().unwrap();
        assert!(
            uid != 0,
            "{file}: runs as a numeric non-root user, not {user}"
        );
        assert_eq!(
            docker.label("org.opencontainers.image.title").as_deref(),
            Some(package)
        );
        assert_eq!(docker.arg_default("VERSION").as_deref(), Some(version));
        assert!(docker
            .label("org.opencontainers.image.version")
            .is_some_and(|v| v == "${VERSION}"));
        assert_eq!(
            docker.label("org.opencontainers.image.licenses").as_deref(),
            Some(cargo["workspace"]["package"]["license"].as_str().unwrap())
        );
        assert_eq!(docker.exec_form("ENTRYPOINT"), vec![binary.to_string()]);
        let health = docker.healthcheck();
        assert_eq!(
            health[0], binary,
            "{file}: HEALTHCHECK runs the image's binary"
        );
        assert_eq!(health[1], "--probe");
        assert!(
            copies
                .iter()
                .any(|(sources, dest)| dest == binary
                    && sources.iter().any(|s| s.ends_with(package))),
            "{file} copies the built {package} to {binary}"
        );
    }

    // The proxy image: ports and health check from config/compose.toml, which it ships at the
    // path its CMD reads.
    let proxy = Dockerfile::read("Dockerfile.proxy");
    assert_eq!(
        proxy.exposed(),
        BTreeSet::from([public_port(&config), admin_port(&config)])
    );
    let cmd = proxy.exec_form("CMD");
    assert_eq!(cmd, vec!["--config".to_string(), image_config_path()]);
    assert!(
        proxy
            .copies()
            .iter()
            .any(|(sources, dest)| sources == &["config/compose.toml"]
                && *dest == image_config_path()),
        "Dockerfile.proxy ships config/compose.toml at {}",
        image_config_path()
    );
    let probe = probe_url(&proxy.healthcheck());
    assert_eq!(probe.host_str(), Some("127.0.0.1"));
    assert_eq!(probe.port(), Some(admin_port(&config)));
    assert_eq!(probe.path(), "/readyz");

    // The app image: listens where the proxy's backends point, probes its own /healthz.
    let app = Dockerfile::read("Dockerfile.app");
    let listen: SocketAddr = flag_value(&app.exec_form("CMD"), "--listen")
        .parse()
        .unwrap();
    assert!(
        listen.ip().is_unspecified(),
        "the worker listens on every interface"
    );
    assert_eq!(app.exposed(), BTreeSet::from([listen.port()]));
    for backend in &config.upstream.backends {
        assert_eq!(
            backend.port,
            listen.port(),
            "backend {} → worker port",
            backend.host
        );
    }
    let probe = probe_url(&app.healthcheck());
    assert_eq!(probe.port(), Some(listen.port()));
    assert_eq!(probe.path(), config.upstream.health.path);
}

// ---------------------------------------------------------------------------------------------
// compose.yaml

#[test]
fn compose_wires_proxy_workers_ngrok_and_prometheus_together() {
    let compose = yaml("compose.yaml");
    let config = compose_toml();
    let services = get(&compose, "services").as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["app", "proxy", "ngrok", "prometheus"])
    );
    let proxy_docker = Dockerfile::read("Dockerfile.proxy");
    let app_docker = Dockerfile::read("Dockerfile.app");

    // Every service restarts, and pulled images are pinned.
    for (name, service) in services {
        let name = name.as_str().unwrap();
        assert_eq!(text(service, "restart"), "unless-stopped", "{name}");
        if service.get("build").is_none() {
            let image = text(service, "image");
            let tag = image.rsplit_once(':').map_or("", |(_, t)| t);
            assert!(
                !tag.is_empty() && tag != "latest",
                "{name}: {image} is pinned"
            );
        }
    }

    // The workers: three replicas of the app image, found by the proxy through DNS.
    let app = get(&compose, "services.app");
    assert_eq!(text(app, "build.dockerfile"), "Dockerfile.app");
    assert_eq!(get(app, "deploy.replicas").as_u64(), Some(3));
    assert_eq!(get(app, "read_only").as_bool(), Some(true));
    assert_eq!(strings(get(app, "command")), app_docker.exec_form("CMD"));
    assert_eq!(
        strings(get(app, "healthcheck.test"))[1..].to_vec(),
        app_docker.healthcheck()
    );
    assert!(app.get("ports").is_none(), "workers are not published");
    let worker_port: SocketAddr = flag_value(&strings(get(app, "command")), "--listen")
        .parse()
        .unwrap();
    assert_eq!(config.upstream.backends.len(), 1);
    let backend = &config.upstream.backends[0];
    assert_eq!(
        (backend.host.as_str(), backend.port),
        ("app", worker_port.port()),
        "config/compose.toml's backend is the compose service `app`"
    );

    // The proxy: the image's config path holds config/compose.toml, public port published,
    // admin port on loopback only.
    let proxy = get(&compose, "services.proxy");
    assert_eq!(text(proxy, "build.dockerfile"), "Dockerfile.proxy");
    assert_eq!(
        strings(get(proxy, "command")),
        proxy_docker.exec_form("CMD")
    );
    assert_eq!(
        strings(get(proxy, "healthcheck.test"))[1..].to_vec(),
        proxy_docker.healthcheck()
    );
    assert_eq!(get(proxy, "read_only").as_bool(), Some(true));
    let volumes = strings(get(proxy, "volumes"));
    assert!(
        volumes.contains(&format!("./config/compose.toml:{}:ro", image_config_path())),
        "{volumes:?}"
    );
    let tmpfs = strings(get(proxy, "tmpfs"));
    for path in [&config.server.pid_file, &config.server.upgrade_sock] {
        assert!(
            tmpfs.iter().any(|t| path.starts_with(t)),
            "{} is on a tmpfs ({tmpfs:?}): the root filesystem is read-only",
            path.display()
        );
    }
    let mut published = BTreeMap::new();
    for mapping in strings(get(proxy, "ports")) {
        let parts: Vec<&str> = mapping.split(':').collect();
        assert_eq!(
            parts.len(),
            3,
            "{mapping}: HOST_IP:HOST_PORT:CONTAINER_PORT"
        );
        published.insert(parts[2].parse::<u16>().unwrap(), parts[0].to_string());
    }
    assert!(
        published.contains_key(&public_port(&config)),
        "{published:?}"
    );
    if let Some(host_ip) = published.get(&admin_port(&config)) {
        assert_eq!(
            host_ip, "127.0.0.1",
            "the admin port is published on loopback only"
        );
    }
    assert_eq!(
        text(proxy, "depends_on.app.condition"),
        "service_healthy",
        "the proxy resolves `app` at start: the workers must be up"
    );
    for key in [
        "AUTH0_DOMAIN",
        "AUTH0_CLIENT_ID",
        "AUTH0_CLIENT_SECRET",
        "APP_SECRET_KEY",
    ] {
        assert!(
            get(proxy, "environment").get(key).is_some(),
            "the proxy gets {key}"
        );
    }
    // The workers accept whatever key the proxy may sign assertions with: derived from the
    // secret or a previous one (a rotation), or given.
    for key in [
        "APP_SECRET_KEY",
        "APP_SECRET_KEY_PREVIOUS",
        "CUSTODIA_ASSERTION_KEY",
        "CUSTODIA_ASSERTION_KEY_PREVIOUS",
    ] {
        assert!(
            get(app, "environment").get(key).is_some(),
            "the workers get {key}"
        );
    }
    // RUST_LOG overrides `[log] level`: it must not be set for the operator.
    if let Some(rust_log) = get(proxy, "environment").get("RUST_LOG") {
        assert_eq!(
            rust_log.as_str(),
            Some("${RUST_LOG:-}"),
            "the proxy's RUST_LOG is empty unless .env sets it"
        );
    }

    // ngrok tunnels to the proxy's public port once the proxy is ready.
    let ngrok = get(&compose, "services.ngrok");
    assert!(text(ngrok, "image").starts_with("ngrok/ngrok:"));
    let command = strings(get(ngrok, "command"));
    assert_eq!(command[0], "http");
    assert_eq!(
        command[1],
        format!("http://proxy:{}", public_port(&config)),
        "ngrok's upstream"
    );
    assert!(command.iter().any(|a| a.contains("NGROK_DOMAIN")));
    assert!(get(ngrok, "environment").get("NGROK_AUTHTOKEN").is_some());
    assert_eq!(text(ngrok, "depends_on.proxy.condition"), "service_healthy");
    let networks = |service: &Value| -> BTreeSet<String> {
        strings(get(service, "networks")).into_iter().collect()
    };
    assert!(
        networks(ngrok).is_disjoint(&networks(app)),
        "ngrok cannot reach the workers around the proxy"
    );

    // Prometheus (profile monitoring) scrapes the proxy's admin listener.
    let prometheus = get(&compose, "services.prometheus");
    assert_eq!(strings(get(prometheus, "profiles")), vec!["monitoring"]);
    assert!(strings(get(prometheus, "volumes"))
        .contains(&"./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro".into()));
    let scrape = yaml("deploy/prometheus/prometheus.yml");
    let job = get(&scrape, "scrape_configs.0");
    assert_eq!(text(job, "metrics_path"), "/metrics");
    assert_eq!(
        strings(get(job, "static_configs.0.targets")),
        vec![format!("proxy:{}", admin_port(&config))]
    );
    for mapping in strings(get(prometheus, "ports")) {
        assert!(mapping.starts_with("127.0.0.1:"), "{mapping}");
    }
}

#[test]
fn env_example_lists_every_variable_compose_uses() {
    let compose = read("compose.yaml");
    let mut used = BTreeSet::new();
    for (at, _) in compose.match_indices("${") {
        let name: String = compose[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        used.insert(name);
    }
    // Variables passed through by name (`KEY:` with no value).
    let doc = yaml("compose.yaml");
    for (_, service) in get(&doc, "services").as_mapping().unwrap() {
        if let Some(Value::Mapping(env)) = service.get("environment") {
            for (key, value) in env {
                if value.is_null() {
                    used.insert(key.as_str().unwrap().to_string());
                }
            }
        }
    }
    used.remove("RUST_LOG"); // has a default; documented in the README
    let listed = env_example();
    for name in &used {
        assert!(listed.contains_key(name), ".env.example lists {name}");
    }
    for name in [
        "AUTH0_DOMAIN",
        "AUTH0_CLIENT_ID",
        "AUTH0_CLIENT_SECRET",
        "APP_SECRET_KEY",
        "APP_SECRET_KEY_PREVIOUS",
        "CUSTODIA_ASSERTION_KEY",
        "CUSTODIA_ASSERTION_KEY_PREVIOUS",
        "NGROK_AUTHTOKEN",
        "NGROK_DOMAIN",
    ] {
        assert!(listed.contains_key(name), ".env.example lists {name}");
        assert!(used.contains(name), "compose.yaml uses {name}");
    }
    // Documented with how to make it.
    let example = read(".env.example");
    assert!(example.contains("openssl rand -hex 32"));
    // public_url must be the ngrok domain: the placeholders say the same thing.
    let config = compose_toml();
    let public_url = &config.auth.as_ref().unwrap().public_url;
    assert!(public_url.starts_with("https://") && public_url.ends_with(".ngrok-free.app"));
    assert!(listed["NGROK_DOMAIN"]
        .as_deref()
        .is_some_and(|d| d.ends_with(".ngrok-free.app") && !d.contains("://")));
}

/// `custodia proxy --config FILE --check` in a scratch directory (no `.env` of the checkout),
/// with `env` as the only secrets.
fn check_config(path: &Path, env: &HashMap<String, String>) -> std::process::Output {
    let dir = TempDir::new("deploy-check");
    let mut command = Command::new(custodia_bin());
    command
        .args(["proxy", "--config"])
        .arg(path)
        .arg("--check")
        .current_dir(dir.path());
    clear_secret_env(&mut command);
    command.envs(env);
    command.output().expect("run custodia proxy --check")
}

#[test]
fn the_container_configs_pass_the_proxys_own_check() {
    let env = deployment_env();
    let filled_in = TempDir::new("deploy-compose");
    let compose_toml = filled_in.path().join("compose.toml");
    std::fs::write(&compose_toml, compose_toml_text()).unwrap();
    let out = check_config(&compose_toml, &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--check config/compose.toml: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --check validates without resolving `app` (it only resolves inside the compose network).
    assert!(stdout.contains("app:8000"), "{stdout}");

    // The secrets really come from the environment: without APP_SECRET_KEY it is refused.
    let mut missing = env.clone();
    missing.remove("APP_SECRET_KEY");
    let out = check_config(&compose_toml, &missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("APP_SECRET_KEY"));

    // The Kubernetes ConfigMap's TOML, written out as the pod sees it.
    let dir = TempDir::new("deploy-configmap");
    let (name, toml) = configmap_toml();
    let path = dir.path().join(&name);
    std::fs::write(&path, toml).unwrap();
    let out = check_config(&path, &env);
    assert!(
        out.status.success(),
        "--check the ConfigMap: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

const K8S: &str = "deploy/kubernetes";

fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join(K8S))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

/// Every Kubernetes object in deploy/kubernetes (kustomization.yaml aside), by (kind, name).
fn k8s_objects() -> BTreeMap<(String, String), Value> {
    let mut objects = BTreeMap::new();
    for file in k8s_files() {
        if file == "kustomization.yaml" {
            continue;
        }
        for doc in yaml_documents(&format!("{K8S}/{file}")) {
            let api = text(&doc, "apiVersion");
            let kind = text(&doc, "kind").to_string();
            let name = text(&doc, "metadata.name").to_string();
            assert!(!api.is_empty() && !name.is_empty(), "{file}: {kind}");
            let required = match kind.as_str() {
                "Deployment" => &["spec.selector", "spec.template.spec.containers"][..],
                "Service" => &["spec.ports"][..],
                "PodDisruptionBudget" => &["spec.selector"][..],
                "ConfigMap" => &["data"][..],
                "Secret" => &["stringData"][..],
                "Namespace" => &[][..],
                other => panic!("{file}: unexpected kind {other}"),
            };
            for path in required {
                get(&doc, path);
            }
            assert!(
                objects.insert((kind.clone(), name.clone()), doc).is_none(),
                "{kind}/{name} defined twice"
            );
        }
    }
    objects
}

fn object<'a>(objects: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    objects
        .get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind}/{name} in {K8S}"))
}

/// (file name, TOML) of the proxy's ConfigMap.
fn configmap_toml() -> (String, String) {
    let objects = k8s_objects();
    let data = get(
        object(&objects, "ConfigMap", "custodia-proxy-config"),
        "data",
    )
    .as_mapping()
    .unwrap();
    assert_eq!(data.len(), 1, "one file in the ConfigMap");
    let (key, value) = data.iter().next().unwrap();
    (
        key.as_str().unwrap().to_string(),
        value.as_str().unwrap().to_string(),
    )
}

fn container(deployment: &Value) -> &Value {
    let containers = get(deployment, "spec.template.spec.containers")
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn container_port(container: &Value, name: &str) -> u16 {
    get(container, "ports")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| p.get("containerPort")?.as_u64())
        .unwrap_or_else(|| panic!("no container port {name}")) as u16
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect()
}

#[test]
fn the_kubernetes_manifests_agree_with_the_images_and_the_config() {
    let objects = k8s_objects();
    let (config_name, config_text) = configmap_toml();
    let config = proxy_config_from(&config_text, "ConfigMap custodia-proxy-config");

    // kustomization.yaml applies every manifest but the example Secret.
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    assert_eq!(text(&kustomization, "kind"), "Kustomization");
    let resources: BTreeSet<String> = strings(get(&kustomization, "resources"))
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = k8s_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml" && !f.contains(".example."))
        .collect();
    assert_eq!(resources, expected, "kustomization.yaml resources");
    let namespace = text(&kustomization, "namespace");
    object(&objects, "Namespace", namespace);

    // The proxy: 2+ replicas, ports and probes from the ConfigMap's TOML, mounted where the image
    // reads it, secrets from the Secret, scraped by Prometheus on the admin port.
    let proxy = object(&objects, "Deployment", "custodia-proxy");
    assert!(get(proxy, "spec.replicas").as_u64().unwrap() >= 2);
    let c = container(proxy);
    assert_eq!(container_port(c, "http"), public_port(&config));
    assert_eq!(container_port(c, "admin"), admin_port(&config));
    assert_eq!(text(c, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(text(c, "livenessProbe.httpGet.path"), "/healthz");
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            text(c, &format!("{probe}.httpGet.port")),
            "admin",
            "{probe}"
        );
    }
    assert_eq!(
        strings(get(c, "args")),
        vec!["--config".to_string(), image_config_path()]
    );
    let mount = get(c, "volumeMounts")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| text(m, "name") == "config")
        .unwrap();
    assert_eq!(
        format!("{}/{config_name}", text(mount, "mountPath")),
        image_config_path()
    );
    assert_eq!(text(c, "envFrom.0.secretRef.name"), "custodia-secrets");
    let annotations = labels(get(proxy, "spec.template.metadata.annotations"));
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        admin_port(&config).to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let tmp = get(c, "volumeMounts")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| text(m, "name") == "tmp")
        .map(|m| text(m, "mountPath"))
        .unwrap();
    assert!(config.server.pid_file.starts_with(tmp) && config.server.upgrade_sock.starts_with(tmp));
    let grace = get(proxy, "spec.template.spec.terminationGracePeriodSeconds")
        .as_u64()
        .unwrap();
    assert!(Duration::from_secs(grace) > config.server.grace_period);
    let service = object(&objects, "Service", "custodia-proxy");
    let ports = get(service, "spec.ports").as_sequence().unwrap();
    assert!(
        ports.iter().all(|p| text(p, "targetPort") == "http"),
        "the proxy Service exposes the public port only"
    );

    // The workers: a headless Service named like the backend, on the port the worker listens.
    let app = object(&objects, "Deployment", "custodia-app");
    let c = container(app);
    let listen: SocketAddr = flag_value(&strings(get(c, "args")), "--listen")
        .parse()
        .unwrap();
    assert_eq!(container_port(c, "http"), listen.port());
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            text(c, &format!("{probe}.httpGet.path")),
            config.upstream.health.path
        );
    }
    let headless = object(&objects, "Service", "custodia-app");
    assert_eq!(text(headless, "spec.clusterIP"), "None");
    assert_eq!(config.upstream.backends.len(), 1);
    let backend = &config.upstream.backends[0];
    assert_eq!(
        backend.host, "custodia-app",
        "the backend is the headless Service"
    );
    assert_eq!(
        get(headless, "spec.ports.0.port").as_u64(),
        Some(u64::from(backend.port))
    );
    assert_eq!(backend.port, listen.port());
    let secret_keys: BTreeSet<String> =
        get(object(&objects, "Secret", "custodia-secrets"), "stringData")
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
    let env_keys: BTreeSet<String> = env_example().into_keys().collect();
    assert!(
        secret_keys.is_subset(&env_keys),
        "{secret_keys:?} ⊆ .env.example"
    );
    let mut worker_secrets = BTreeSet::new();
    for env in get(c, "env").as_sequence().unwrap() {
        if let Some(key) = env.get("valueFrom").and_then(|v| v.get("secretKeyRef")) {
            assert!(secret_keys.contains(text(key, "key")));
            worker_secrets.insert(text(key, "key").to_string());
        }
    }
    // The proxy takes the whole Secret; the workers every key it may sign assertions with.
    for key in [
        "APP_SECRET_KEY",
        "APP_SECRET_KEY_PREVIOUS",
        "CUSTODIA_ASSERTION_KEY",
        "CUSTODIA_ASSERTION_KEY_PREVIOUS",
    ] {
        assert!(worker_secrets.contains(key), "the workers get {key}");
    }
    let proxy_env = container(proxy)
        .get("env")
        .and_then(Value::as_sequence)
        .map(|list| list.iter().map(|e| text(e, "name")).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        !proxy_env.contains(&"RUST_LOG"),
        "RUST_LOG would override the ConfigMap's [log] level"
    );

    // Every pod: selected by its Service and PDB, resources requested, non-root as the image.
    let image_uid: u64 = Dockerfile::read("Dockerfile.proxy")
        .one_runtime("USER")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for name in ["custodia-proxy", "custodia-app"] {
        let deployment = object(&objects, "Deployment", name);
        let pod_labels = labels(get(deployment, "spec.template.metadata.labels"));
        let selects = |selector: &Value| {
            labels(selector)
                .iter()
                .all(|(k, v)| pod_labels.get(k) == Some(v))
        };
        assert!(selects(get(deployment, "spec.selector.matchLabels")));
        assert!(selects(get(
            object(&objects, "Service", name),
            "spec.selector"
        )));
        assert!(selects(get(
            object(&objects, "PodDisruptionBudget", name),
            "spec.selector.matchLabels"
        )));
        let c = container(deployment);
        get(c, "resources.requests.cpu");
        get(c, "resources.requests.memory");
        let security = get(deployment, "spec.template.spec.securityContext");
        assert_eq!(get(security, "runAsNonRoot").as_bool(), Some(true));
        assert_eq!(get(security, "runAsUser").as_u64(), Some(image_uid));
        assert_eq!(
            get(c, "securityContext.readOnlyRootFilesystem").as_bool(),
            Some(true)
        );
        assert!(text(c, "image").starts_with(&format!("{name}:")));
    }
}

// ---------------------------------------------------------------------------------------------
// The health probe the images run

fn run_probe(program: &str, url: &str) -> Option<i32> {
    let started = std::time::Instant::now();
    let out = Command::new(custodia_bin())
        .args([program, "--probe", url])
        .output()
        .expect("run --probe");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{program} --probe {url} took {:?}",
        started.elapsed()
    );
    out.status.code()
}

#[test]
fn the_probe_subcommands_tell_healthy_from_not() {
    let worker = Worker::start("probe-w1");
    assert_eq!(
        run_probe("app", &format!("http://{}/healthz", worker.addr)),
        Some(0)
    );
    assert_eq!(
        run_probe("app", &format!("http://{}/nope", worker.addr)),
        Some(1),
        "a 404 is unhealthy"
    );
    let proxy = Proxy::start(&support::custodia::upstream_section(
        "least_conn",
        &[(worker.addr, 1)],
    ));
    assert_eq!(run_probe("proxy", &proxy.admin_url("/healthz")), Some(0));
    assert_eq!(run_probe("proxy", &proxy.admin_url("/readyz")), Some(0));
    let closed = free_addr();
    assert_eq!(
        run_probe("proxy", &format!("http://{closed}/readyz")),
        Some(1)
    );
    assert_eq!(run_probe("app", "not-a-url"), Some(1));
}

// ---------------------------------------------------------------------------------------------
// Scale-out: two proxies × three workers, one session

const SESSION_KEY: &str = "4b1d7e0c9a2f6e3d8c5b0a7f1e4d9c2b6a3f0e7d1c8b5a2f9e6d3c0b7a4f1e8d";
const OTHER_KEY: &str = "9e6d3c0b7a4f1e8d4b1d7e0c9a2f6e3d8c5b0a7f1e4d9c2b6a3f0e7d1c8b5a2f";
const CLIENT_ID: &str = "custodia-deploy";
const CLIENT_SECRET: &str = "custodia-deploy-secret";

/// A browser: one cookie jar for every loopback origin (cookies ignore ports, like a browser's),
/// no automatic redirects.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(Policy::none())
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap()
}

/// config/compose.toml as the proxy on loopback runs it: its own [upstream.health], [auth] and
/// routes, with the loopback workers as backends and `public_url` as the shared origin.
fn compose_sections(workers: &[&Worker], public_url: &str) -> String {
    let mut table: toml::Table = read("config/compose.toml").parse().unwrap();
    table.remove("server");
    table.remove("admin");
    let upstream = table["upstream"].as_table_mut().unwrap();
    upstream.insert(
        "backends".into(),
        toml::Value::Array(
            workers
                .iter()
                .map(|w| toml::Value::String(w.addr.to_string()))
                .collect(),
        ),
    );
    upstream.insert("connect_timeout".into(), "1s".into());
    let health = upstream["health"].as_table_mut().unwrap();
    health.insert("interval".into(), "300ms".into());
    health.insert("timeout".into(), "300ms".into());
    let auth = table["auth"].as_table_mut().unwrap();
    auth.insert("public_url".into(), public_url.into());
    toml::to_string(&table).unwrap()
}

fn start_proxy(addr: SocketAddr, sections: &str, issuer: &str, session_key: &str) -> Proxy {
    Proxy::start_at(
        addr,
        sections,
        &[
            // As compose.yaml passes them (an http issuer needs CUSTODIA_AUTH_ISSUER: AUTH0_DOMAIN
            // always means https).
            ("CUSTODIA_AUTH_ISSUER", issuer),
            ("AUTH0_CLIENT_ID", CLIENT_ID),
            ("AUTH0_CLIENT_SECRET", CLIENT_SECRET),
            ("APP_SECRET_KEY", session_key),
        ],
    )
}

async fn wait_ready(proxy: &Proxy) {
    let http = support::custodia::client();
    let url = proxy.admin_url("/readyz");
    eventually_async(
        "the proxy's /readyz to answer 200",
        Duration::from_secs(30),
        || {
            let request = http.get(&url).send();
            async move { (request.await.ok()?.status() == StatusCode::OK).then_some(()) }
        },
    )
    .await;
}

async fn get_json(browser: &reqwest::Client, url: &str) -> (StatusCode, serde_json::Value) {
    let response = browser
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    let body = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// `/login` on `start`, the IdP form, then `/callback` on `finish` (the load balancer may send
/// the callback to another replica). Returns the callback's response status.
async fn log_in(
    browser: &reqwest::Client,
    start: &Proxy,
    finish: &Proxy,
    public_url: &str,
) -> StatusCode {
    let login = browser
        .get(start.url("/login?rd=/api/me"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(
        login.status(),
        StatusCode::FOUND,
        "/login redirects to the IdP"
    );
    let authorize = login.headers()["location"].to_str().unwrap().to_string();
    let callback_prefix = format!("{public_url}/callback");
    let callback = Url::parse(&login_as_demo(&authorize, &callback_prefix).await).unwrap();
    let mut at_finish = Url::parse(&finish.url(callback.path())).unwrap();
    at_finish.set_query(callback.query());
    let reply = browser
        .get(at_finish)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    let status = reply.status();
    if status == StatusCode::FOUND {
        assert!(
            reply
                .headers()
                .get_all("set-cookie")
                .iter()
                .any(|c| c.to_str().unwrap().contains("custodia_session")),
            "the callback sets the session cookie"
        );
    }
    status
}

struct Idp {
    issuer: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_idp(public_url: &str, user: DemoUser) -> Idp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}/", listener.local_addr().unwrap());
    let settings = DevIdpSettings {
        issuer: issuer.clone(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_uris: vec![format!("{public_url}/callback")],
        post_logout_redirect_uris: vec![format!("{public_url}/")],
        user,
        signing_key: None,
    };
    let task = tokio::spawn(async move {
        if let Err(e) = dev_idp::serve(listener, settings, std::future::pending()).await {
            panic!("dev IdP: {e}");
        }
    });
    Idp { issuer, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_through_proxy_a_is_honoured_by_proxy_b() {
    // Workers as compose runs them: only APP_SECRET_KEY, the assertion key derived from it.
    let workers: Vec<Worker> = (1..=3)
        .map(|i| Worker::start_with_env(&format!("w{i}"), &[("APP_SECRET_KEY", SESSION_KEY)]))
        .collect();
    let worker_refs: Vec<&Worker> = workers.iter().collect();
    let (a_addr, b_addr) = (free_addr(), free_addr());
    // The origin users see (in production the load balancer's or ngrok's); here proxy A's.
    let public_url = format!("http://{a_addr}");
    let user = DemoUser {
        sub: "dev-idp|scale-out".into(),
        email: "scale.out@example.test".into(),
        ..DemoUser::default()
    };
    let idp = start_idp(&public_url, user.clone()).await;
    let sections = compose_sections(&worker_refs, &public_url);
    let proxy_a = start_proxy(a_addr, &sections, &idp.issuer, SESSION_KEY);
    let proxy_b = start_proxy(b_addr, &sections, &idp.issuer, SESSION_KEY);
    wait_ready(&proxy_a).await;
    wait_ready(&proxy_b).await;

    // Signed out, both refuse the API.
    let browser = browser();
    for proxy in [&proxy_a, &proxy_b] {
        let (status, _) = get_json(&browser, &proxy.url("/api/me")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    // Log in through A only.
    assert_eq!(
        log_in(&browser, &proxy_a, &proxy_a, &public_url).await,
        StatusCode::FOUND
    );
    let (status, me) = get_json(&browser, &proxy_a.url("/api/me")).await;
    assert_eq!(status, StatusCode::OK, "A honours its own session: {me}");

    // B has never seen this user and shares no state with A, only APP_SECRET_KEY: it honours the
    // cookie, and so does every worker behind it.
    let mut served_by = BTreeSet::new();
    for _ in 0..9 {
        let (status, me) = get_json(&browser, &proxy_b.url("/api/me")).await;
        assert_eq!(status, StatusCode::OK, "B honours A's session: {me}");
        assert_eq!(me["sub"], user.sub.as_str(), "{me}");
        assert_eq!(me["email"], user.email.as_str(), "{me}");
        served_by.insert(me["worker"].as_str().unwrap().to_string());
    }
    assert_eq!(
        served_by,
        BTreeSet::from(["w1".to_string(), "w2".into(), "w3".into()]),
        "every worker verified B's identity assertion"
    );
    let home = browser
        .get(proxy_b.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(home.contains(&user.name), "B's home page greets the user");

    // The login itself is stateless too: started on A, finished on B.
    let second = self::browser();
    assert_eq!(
        log_in(&second, &proxy_a, &proxy_b, &public_url).await,
        StatusCode::FOUND,
        "B completes a login that A started"
    );
    let (status, me) = get_json(&second, &proxy_a.url("/api/me")).await;
    assert_eq!(status, StatusCode::OK, "{me}");

    // The shared key is what makes it work: a replica with another APP_SECRET_KEY refuses it.
    let proxy_c = start_proxy(free_addr(), &sections, &idp.issuer, OTHER_KEY);
    wait_ready(&proxy_c).await;
    let (status, _) = get_json(&browser, &proxy_c.url("/api/me")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "another key, no session");
    drop(proxy_c);

    drop((proxy_a, proxy_b));
    drop(workers);
}
