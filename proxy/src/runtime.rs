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
    /// 1 for the first config, +1 per successful reload.
    pub generation: u64,
}

pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

/// Why a validated config could not be turned into a runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
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
    /// and the identity provider connection of `previous` when it is the same IdP.
    pub fn build(
        config: ProxyConfig,
        registry: &SlotRegistry,
        generation: u64,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, RuntimeError> {
        let mut members = Vec::new();
        for target in &config.upstream.backends {
            for addr in resolve(target)? {
                if members.iter().any(|m: &Member| m.slot.addr == addr) {
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
        })
    }
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
