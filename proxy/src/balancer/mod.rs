//! Backend pool: which workers exist, how busy and how healthy each is, and how one is chosen.
//!
//! Per-backend state ([`BackendSlot`]) lives outside the pool snapshot ([`Pool`]) and is shared
//! through the [`SlotRegistry`], so the in-flight counters and health of a backend survive a
//! rebuilt pool (reload, re-resolution). Choosing a backend hands out a [`Lease`]: the in-flight
//! count goes up once when it is taken and down exactly once when it is dropped — also when the
//! request fails or the client goes away.

pub mod health;
pub mod latency;
mod least_conn;
mod least_time;
mod round_robin;
mod slot;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::Balance;
pub use slot::{
    BackendSlot, CheckStarted, FailureLog, Lease, ResponseFailure, SlotRegistry, Unlogged,
};

/// Why [`Pool::pick`] chose no backend, judged from the reads it chose from (a second look
/// at the health flags could contradict them: the status would not match the cause).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Every backend is out of rotation, and the request has tried each (503).
    AllDown,
    /// Healthy backends exist, but the request has already failed on each (502 or 504).
    AllTried,
}

impl NoBackend {
    /// The request's status and the reason to log: 503 when the pool is down, 504 when the
    /// last try timed out, else 502 (as nginx answers).
    pub fn status(self, last_timed_out: bool) -> (u16, &'static str) {
        match self {
            NoBackend::AllDown => (503, "no healthy backend"),
            NoBackend::AllTried if last_timed_out => {
                (504, "timed out, and no other backend left to retry on")
            }
            NoBackend::AllTried => (502, "failed, and no other backend left to retry on"),
        }
    }
}

/// A backend in the current pool with its configured weight.
#[derive(Debug, Clone)]
pub struct Member {
    pub slot: Arc<BackendSlot>,
    pub weight: u32,
}

/// An immutable snapshot of the pool, swapped whole on reload.
#[derive(Debug)]
pub struct Pool {
    members: Box<[Member]>,
    balance: Balance,
    /// Weighted round-robin sequence of member indexes (round_robin only).
    rr_order: Box<[usize]>,
    rr_cursor: AtomicUsize,
}

impl Pool {
    pub fn new(members: Vec<Member>, balance: Balance) -> Pool {
        let rr_order = round_robin::weighted_order(&members);
        Pool {
            members: members.into_boxed_slice(),
            balance,
            rr_order,
            rr_cursor: AtomicUsize::new(0),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// Number of backends currently considered healthy.
    pub fn healthy_count(&self) -> usize {
        self.members.iter().filter(|m| m.slot.is_healthy()).count()
    }

    /// Choose a healthy backend not in `exclude` and take a lease on it. When every backend is
    /// out of rotation, choose among all of them instead (nginx does so for a lone server,
    /// Envoy calls it panic routing): a worker that is back is used at once rather than after
    /// `healthy_after` health checks, and one still down fails to connect and the request
    /// moves on like any failover.
    ///
    /// "Every backend is out" is judged from the same reads of the health flags the choice
    /// was made from: health checks flip them meanwhile, and a second look could find a
    /// backend back that the first did not, leaving the request with none (a 503 with a
    /// worker up, found by the chaos test).
    pub fn pick(&self, exclude: &[SocketAddr]) -> Result<Lease, NoBackend> {
        // Whether an excluded backend was healthy; when nothing is chosen, whether any was
        // (a healthy one not excluded would have been chosen).
        let mut excluded_in_rotation = false;
        let chosen = self.choose(|member| {
            if exclude.contains(&member.slot.addr) {
                excluded_in_rotation |= member.slot.is_healthy();
                return false;
            }
            member.slot.is_healthy()
        });
        let member = match chosen {
            Some(member) => member,
            None if excluded_in_rotation => return Err(NoBackend::AllTried),
            None => self
                .choose(|member| !exclude.contains(&member.slot.addr))
                .ok_or(NoBackend::AllDown)?,
        };
        Ok(Lease::take(&member.slot, member.weight))
    }

    /// The balance mode's choice among the members `eligible` lets through.
    fn choose(&self, eligible: impl FnMut(&Member) -> bool) -> Option<&Member> {
        match self.balance {
            Balance::LeastConn => least_conn::pick(&self.members, eligible),
            Balance::LeastTime => least_time::pick(&self.members, eligible, latency::now()),
            Balance::RoundRobin => {
                let start = self.rr_cursor.fetch_add(1, Ordering::Relaxed);
                round_robin::pick(&self.members, &self.rr_order, start, eligible)
            }
        }
    }
}

#[cfg(test)]
mod tests;
