//! The live state the request path reads: the validated config and the backend pool built
//! from it, swapped atomically as one snapshot.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::flow::{AuthRuntime, AuthSetupError};
use crate::balancer::{Member, Pool, SlotRegistry};
use crate::config::{BackendTarget, ProxyConfig};

/// One consistent snapshot; a request keeps the one it started with.
#[derive(Debug)]
pub struct Runtime {
    pub config: ProxyConfig,
    pub pool: Pool,
    /// None: auth off (plain load balancer).
    pub auth: Option<AuthRuntime>,
    /// 1 for the first config, +1 per successful reload or discovered change of the pool.
    pub generation: u64,
    /// What each configured backend resolved to (the last good answer of each name).
    pub resolution: Resolution,
}

pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

/// A connection's copy of the running snapshot, refreshed when a reload has swapped in a new
/// one. Checking costs one plain atomic load; a [`ArcSwap::load`] per request wrote to the
/// thread's debt list and fenced, and a clone of the `Arc` moved the one count every thread
/// moves.
pub type HeldRuntime<'a> = arc_swap::Cache<&'a ArcSwap<Runtime>, Arc<Runtime>>;

/// Why a validated config could not be turned into a runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("auth: {0}")]
    Auth(#[from] AuthSetupError),
}

/// A backend name that does not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve backend {target}: {reason}")]
pub struct ResolveError {
    pub target: String,
    pub reason: String,
}

impl Runtime {
    /// Resolve the configured backends and build the pool, reusing live slots from `registry`
    /// and the identity provider connection of `previous` when it is the same IdP. A name that
    /// does not resolve keeps the addresses it had in `previous`, if it was there, and else
    /// waits with none until discovery resolves it: workers often come up after the proxy (a
    /// compose restart, a first Kubernetes deploy), and a service scaled to zero must not
    /// block the rest of a reload.
    pub fn build(
        config: ProxyConfig,
        registry: &SlotRegistry,
        generation: u64,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, RuntimeError> {
        let resolution = Resolution::resolve(
            &config.upstream.backends,
            previous.map(|p| &p.resolution),
            resolve,
        );
        Runtime::assemble(config, resolution, registry, generation, previous)
    }

    /// Build the pool from addresses already resolved (see [`Resolution::resolve`]).
    pub fn assemble(
        config: ProxyConfig,
        resolution: Resolution,
        registry: &SlotRegistry,
        generation: u64,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, RuntimeError> {
        let mut members = Vec::new();
        for (target, resolved) in config.upstream.backends.iter().zip(&resolution.targets) {
            for &addr in &resolved.addrs {
                if members.iter().any(|m: &Member| m.slot.addr == addr) {
                    // `localhost:9001` next to `127.0.0.1:9001`, or two names of one host.
                    tracing::warn!(
                        backend = %target,
                        %addr,
                        "this backend's address is already another backend's: it is balanced \
                         once, with the first one's weight"
                    );
                    continue;
                }
                members.push(Member {
                    slot: registry.slot(addr),
                    weight: target.weight,
                });
            }
        }
        let pool = Pool::new(members, config.upstream.balance);
        let auth = match &config.auth {
            Some(settings) => Some(AuthRuntime::build(
                settings.clone(),
                previous.and_then(|p| p.auth.as_ref()).map(|a| &a.oidc),
            )?),
            None => None,
        };
        Ok(Runtime {
            config,
            pool,
            auth,
            generation,
            resolution,
        })
    }
}

/// The addresses of every configured backend, in configuration order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    pub targets: Vec<ResolvedTarget>,
}

/// One configured `host:port` and the addresses it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    pub host: String,
    pub port: u16,
    /// Sorted, without duplicates.
    pub addrs: Vec<SocketAddr>,
    /// The last lookup failed and these are the addresses of an earlier one.
    pub stale: bool,
}

impl Resolution {
    /// Resolve every target with `lookup`. A failed lookup keeps the last good addresses of the
    /// same `host:port` from `previous` (marked `stale`), or none, with a warning, for a target
    /// that never resolved: a later round may resolve it.
    pub fn resolve(
        targets: &[BackendTarget],
        previous: Option<&Resolution>,
        lookup: impl Fn(&BackendTarget) -> Result<Vec<SocketAddr>, ResolveError>,
    ) -> Resolution {
        let mut resolved = Vec::with_capacity(targets.len());
        for target in targets {
            let entry = match lookup(target) {
                Ok(mut addrs) => {
                    addrs.sort();
                    addrs.dedup();
                    ResolvedTarget {
                        host: target.host.clone(),
                        port: target.port,
                        addrs,
                        stale: false,
                    }
                }
                Err(e) => {
                    let last_good = previous.and_then(|p| p.get(&target.host, target.port));
                    match last_good {
                        Some(last) if last.addrs.is_empty() => ResolvedTarget {
                            stale: true,
                            ..last.clone()
                        },
                        Some(last) => {
                            tracing::warn!(
                                backend = %target,
                                error = %e.reason,
                                kept = last.addrs.len(),
                                "cannot resolve backend; keeping its last good addresses"
                            );
                            ResolvedTarget {
                                stale: true,
                                ..last.clone()
                            }
                        }
                        None => {
                            tracing::warn!(
                                backend = %target,
                                error = %e.reason,
                                "cannot resolve backend yet; it joins the pool once it resolves \
                                 (tried again every upstream.discovery_interval)"
                            );
                            ResolvedTarget {
                                host: target.host.clone(),
                                port: target.port,
                                addrs: Vec::new(),
                                stale: true,
                            }
                        }
                    }
                }
            };
            resolved.push(entry);
        }
        Resolution { targets: resolved }
    }

    /// The targets that have no address yet (they never resolved), as `host:port`.
    pub fn waiting(&self) -> Vec<String> {
        self.targets
            .iter()
            .filter(|t| t.addrs.is_empty())
            .map(|t| format!("{}:{}", t.host, t.port))
            .collect()
    }

    pub fn get(&self, host: &str, port: u16) -> Option<&ResolvedTarget> {
        self.targets
            .iter()
            .find(|t| t.host == host && t.port == port)
    }

    /// The same addresses for the same targets (staleness aside).
    pub fn same_addresses(&self, other: &Resolution) -> bool {
        self.targets.len() == other.targets.len()
            && self
                .targets
                .iter()
                .zip(&other.targets)
                .all(|(a, b)| a.host == b.host && a.port == b.port && a.addrs == b.addrs)
    }
}

/// True when a target is a DNS name rather than an IP literal (it may change over time).
pub fn is_name(target: &BackendTarget) -> bool {
    target.host.parse::<std::net::IpAddr>().is_err()
}
/// Every address of a target: an IP literal as is, a name through the system resolver.
pub fn resolve(target: &BackendTarget) -> Result<Vec<SocketAddr>, ResolveError> {
    if let Ok(ip) = target.host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| ResolveError {
            target: target.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ResolveError {
            target: target.to_string(),
            reason: "the name has no addresses".into(),
        });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> BackendTarget {
        BackendTarget {
            host: host.into(),
            port: 8000,
            weight: 1,
        }
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 8000))
    }

    fn fails(target: &BackendTarget) -> ResolveError {
        ResolveError {
            target: target.to_string(),
            reason: "temporary failure in name resolution".into(),
        }
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_good_set() {
        let targets = [target("app"), target("db")];
        let first = Resolution::resolve(&targets, None, |t| {
            Ok(if t.host == "app" {
                vec![addr(3), addr(1), addr(2), addr(1)]
            } else {
                vec![addr(9)]
            })
        });
        assert_eq!(first.targets[0].addrs, vec![addr(1), addr(2), addr(3)]);
        assert!(!first.targets[0].stale);

        // "app" fails, "db" moves: app keeps its three, db takes the new answer.
        let second = Resolution::resolve(&targets, Some(&first), |t| {
            if t.host == "app" {
                Err(fails(t))
            } else {
                Ok(vec![addr(8)])
            }
        });
        assert_eq!(second.targets[0].addrs, first.targets[0].addrs);
        assert!(second.targets[0].stale);
        assert_eq!(second.targets[1].addrs, vec![addr(8)]);
        assert!(!first.same_addresses(&second));

        // Everything failing changes nothing.
        let third = Resolution::resolve(&targets, Some(&second), |t| Err(fails(t)));
        assert!(third.same_addresses(&second));
    }

    #[test]
    fn a_name_that_does_not_resolve_at_start_waits_and_joins_when_it_does() {
        let targets = [target("app"), target("db")];
        let at_start = Resolution::resolve(&targets, None, |t| {
            if t.host == "app" {
                Err(fails(t))
            } else {
                Ok(vec![addr(9)])
            }
        });
        assert!(at_start.targets[0].addrs.is_empty() && at_start.targets[0].stale);
        assert_eq!(at_start.targets[1].addrs, vec![addr(9)]);
        assert_eq!(at_start.waiting(), vec!["app:8000".to_string()]);
        // Still failing: still waiting, and no change to swap in.
        let again = Resolution::resolve(&targets, Some(&at_start), |t| {
            if t.host == "app" {
                Err(fails(t))
            } else {
                Ok(vec![addr(9)])
            }
        });
        assert!(again.same_addresses(&at_start));
        // Resolved at last: it joins.
        let joined = Resolution::resolve(&targets, Some(&again), |t| {
            Ok(if t.host == "app" {
                vec![addr(1)]
            } else {
                vec![addr(9)]
            })
        });
        assert_eq!(joined.targets[0].addrs, vec![addr(1)]);
        assert!(!joined.same_addresses(&again) && joined.waiting().is_empty());
    }

    /// A reload that adds a name that does not resolve (a service scaled to zero) keeps the
    /// rest of the reload: the name waits.
    #[test]
    fn a_name_added_by_a_reload_that_does_not_resolve_waits() {
        let targets = [target("app"), target("new")];
        let first = Resolution::resolve(&targets[..1], None, |_| Ok(vec![addr(1)]));
        let reloaded = Resolution::resolve(&targets, Some(&first), |t| {
            if t.host == "new" {
                Err(fails(t))
            } else {
                Ok(vec![addr(1)])
            }
        });
        assert_eq!(reloaded.targets[0].addrs, vec![addr(1)]);
        assert_eq!(reloaded.waiting(), vec!["new:8000".to_string()]);
    }

    #[test]
    fn ip_literals_are_not_names() {
        assert!(!is_name(&target("127.0.0.1")));
        assert!(!is_name(&target("::1")));
        assert!(is_name(&target("localhost")));
    }
}
