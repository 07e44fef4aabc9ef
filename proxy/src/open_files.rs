//! The open-file limit (`RLIMIT_NOFILE`) the connection cap needs.
//!
//! Every client connection is a file descriptor, and so is the upstream connection its
//! request goes out on. A common soft limit is 1024: below `[limits] max_connections` (4096 by
//! default), accepting then fails with "Too many open files" and new clients wait unanswered
//! where the cap promises them a `503`. As nginx (`worker_rlimit_nofile`) and Go's runtime do,
//! the proxy raises its soft limit at start, up to the hard limit, which only the operator can
//! raise; when even that is too low, it says so once, with the numbers.

use crate::config::ProxyConfig;
use crate::limits::MAX_ADMIN_CONNECTIONS;

/// Descriptors each worker thread holds besides its connections: its event loop's (epoll,
/// eventfd, timers), and room for upstream connections idle in its keep-alive pools after
/// their clients left (those still connected are counted with their clients).
const PER_THREAD: u64 = 32;

/// Descriptors the process holds whatever the load: standard streams, the access log, DNS
/// lookups and the identity provider's connections, the upgrade socket, and clients past the
/// cap while they are answered `503` (about a second each).
const RESERVE: u64 = 256;

/// The open files `config` needs at most: two per client connection (its socket and its
/// upstream connection), each worker's listening sockets and [`PER_THREAD`], the admin
/// listener and its connections, a health check connection per backend, and [`RESERVE`].
pub fn needed(config: &ProxyConfig) -> u64 {
    let clients = 2 * config.limits.max_connections as u64;
    let threads = config.server.threads.max(1) as u64;
    let workers = threads * (config.server.listen.len() as u64 + PER_THREAD);
    let admin = if config.admin.is_some() {
        1 + MAX_ADMIN_CONNECTIONS as u64
    } else {
        0
    };
    clients + workers + admin + config.upstream.backends.len() as u64 + RESERVE
}

/// What [`raise_to`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The soft limit was high enough already.
    Enough,
    /// The soft limit was raised from `from` to `to`.
    Raised { from: u64, to: u64 },
    /// The limit (after raising the soft one as far as it goes) is below what is needed.
    TooLow { limit: u64, needed: u64 },
}

/// Raise the soft open-file limit to what `config` needs, as far as the hard limit allows,
/// and log what the operator should know: a raise (info), a limit still too low (warning).
pub fn ensure(config: &ProxyConfig) {
    let needed = needed(config);
    match raise_to(needed) {
        Ok(Outcome::Enough) => {}
        Ok(Outcome::Raised { from, to }) => tracing::info!(
            from,
            to,
            "raised the open-file limit (RLIMIT_NOFILE) from {from} to {to} for \
             limits.max_connections = {}",
            config.limits.max_connections
        ),
        Ok(Outcome::TooLow { limit, needed }) => {
            let fits = clients_within(config, limit);
            let lower = if fits > 0 {
                format!(
                    ", or lower limits.max_connections to {fits} in {}",
                    config.source.display()
                )
            } else {
                String::new()
            };
            tracing::warn!(
                limit,
                needed,
                "the open-file limit (RLIMIT_NOFILE) is {limit} and the hard limit keeps it \
                 there, but limits.max_connections = {} needs about {needed} (two per client: \
                 its socket and its upstream connection, plus listeners, logs and health \
                 checks): past about {fits} clients, new ones may wait unanswered while the \
                 log fills with \"Too many open files\", instead of getting the 503 the cap \
                 promises. Raise the hard limit to {needed} or more (systemd LimitNOFILE=, \
                 docker --ulimit nofile=, ulimit -Hn){lower}",
                config.limits.max_connections,
            );
        }
        Err(e) => tracing::warn!(
            error = %e,
            needed,
            "cannot read or raise the open-file limit (RLIMIT_NOFILE); limits.max_connections = \
             {} needs about {needed} open files",
            config.limits.max_connections
        ),
    }
}

/// The clients `limit` open files serve at two each, after what [`needed`] reserves.
fn clients_within(config: &ProxyConfig, limit: u64) -> u64 {
    let overhead = needed(config) - 2 * config.limits.max_connections as u64;
    limit.saturating_sub(overhead) / 2
}

/// Raise the soft limit to `needed`, or as near as the hard limit (and the kernel's
/// `fs.nr_open`, which caps an unlimited hard limit) allow. Never lowers it.
fn raise_to(needed: u64) -> std::io::Result<Outcome> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft = limit.rlim_cur;
    if soft == libc::RLIM_INFINITY || soft >= needed {
        return Ok(Outcome::Enough);
    }
    let mut hard = limit.rlim_max;
    if let Some(kernel) = nr_open() {
        hard = hard.min(kernel);
    }
    let target = needed.min(hard);
    if target > soft {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the one struct it is given; raising the soft limit up to the
        // hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if target < needed {
        return Ok(Outcome::TooLow {
            limit: target.max(soft),
            needed,
        });
    }
    Ok(Outcome::Raised {
        from: soft,
        to: target,
    })
}

/// The most open files the kernel allows a process (`fs.nr_open`), if it can be read.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_client_counts_twice_and_the_rest_is_reserved() {
        let text = "[server]\nthreads = 2\n[upstream]\nbackends = [\"127.0.0.1:1\"]\n\
                    [admin]\nlisten = \"127.0.0.1:9090\"\n";
        let config = crate::config::parse(text, std::path::Path::new("t.toml")).unwrap();
        assert_eq!(config.limits.max_connections, 4096);
        // 8192 for the clients, 2 × (1 + 32) for the workers, 65 for the admin listener,
        // 1 health check, 256 reserved.
        assert_eq!(needed(&config), 8192 + 66 + 65 + 1 + 256);
        assert_eq!(clients_within(&config, needed(&config)), 4096);
        assert_eq!(clients_within(&config, 1024), (1024 - 388) / 2);
        assert_eq!(clients_within(&config, 100), 0);
    }
}
