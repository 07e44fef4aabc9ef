//! Tests of selection, leases and health bookkeeping, without a network.

use std::net::SocketAddr;

use super::*;
use crate::config::Balance;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn pool(registry: &SlotRegistry, weights: &[u32], balance: Balance) -> Pool {
    let members = weights
        .iter()
        .enumerate()
        .map(|(i, w)| Member {
            slot: registry.slot(addr(9000 + i as u16)),
            weight: *w,
        })
        .collect();
    Pool::new(members, balance)
}

fn shares(pool: &Pool, picks: usize) -> Vec<usize> {
    let mut counts = vec![0; pool.members().len()];
    for _ in 0..picks {
        let lease = pool.pick(&[]).unwrap();
        let i = pool
            .members()
            .iter()
            .position(|m| m.slot.addr == lease.slot().addr)
            .unwrap();
        counts[i] += 1;
    }
    counts
}

#[test]
fn least_conn_picks_the_least_loaded_backend() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 1, 1], Balance::LeastConn);
    let _busy_a = pool.pick(&[]).unwrap();
    let _busy_b = pool.pick(&[]).unwrap();
    let held: Vec<SocketAddr> = [&_busy_a, &_busy_b].iter().map(|l| l.slot().addr).collect();
    assert_ne!(held[0], held[1], "the second pick avoids the busy backend");
    let third = pool.pick(&[]).unwrap();
    assert!(
        !held.contains(&third.slot().addr),
        "the idle backend is chosen"
    );
}

#[test]
fn least_conn_load_is_relative_to_weight() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 3], Balance::LeastConn);
    // Hold leases: the weight-3 backend should carry three times as many at once.
    let leases: Vec<Lease> = (0..8).map(|_| pool.pick(&[]).unwrap()).collect();
    let heavy = leases
        .iter()
        .filter(|l| l.slot().addr == addr(9001))
        .count();
    assert_eq!(heavy, 6, "8 concurrent requests split 2:6 for weights 1:3");
}

#[test]
fn sequential_ties_are_shared_by_weight_not_list_position() {
    let registry = SlotRegistry::new();
    let equal = pool(&registry, &[1, 1, 1], Balance::LeastConn);
    assert_eq!(shares(&equal, 300), vec![100, 100, 100]);
    let registry = SlotRegistry::new();
    let weighted = pool(&registry, &[1, 2], Balance::LeastConn);
    assert_eq!(shares(&weighted, 300), vec![100, 200]);
}

#[test]
fn leases_release_exactly_once() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 1], Balance::LeastConn);
    let a = pool.pick(&[]).unwrap();
    let b = pool.pick(&[]).unwrap();
    let total = |p: &Pool| {
        p.members()
            .iter()
            .map(|m| m.slot.in_flight())
            .sum::<usize>()
    };
    assert_eq!(total(&pool), 2);
    drop(a);
    assert_eq!(total(&pool), 1);
    drop(b);
    assert_eq!(total(&pool), 0);

    // Released early (the worker's answer is complete), then dropped: counted off once.
    let mut c = pool.pick(&[]).unwrap();
    let _d = pool.pick(&[]).unwrap();
    c.release();
    c.release();
    assert_eq!(total(&pool), 1);
    assert_eq!(
        c.slot().in_flight(),
        0,
        "the released backend is free again"
    );
    drop(c);
    assert_eq!(total(&pool), 1);
}

#[test]
fn unhealthy_and_excluded_backends_get_nothing() {
    let registry = SlotRegistry::new();
    for balance in [Balance::LeastConn, Balance::RoundRobin] {
        let pool = pool(&registry, &[1, 1, 1], balance);
        pool.members()[0].slot.mark_failed();
        let counts = shares(&pool, 30);
        assert_eq!(counts[0], 0, "{balance:?}");
        let only = pool.pick(&[addr(9002)]).unwrap();
        assert_eq!(only.slot().addr, addr(9001), "{balance:?}");
        assert!(
            pool.pick(&[addr(9001), addr(9002)]).is_none(),
            "{balance:?}"
        );
        // restore for the next balance mode (same registry, same slots)
        pool.members()[0].slot.observe_health(true, 1, 1);
    }
}

#[test]
fn when_every_backend_is_out_of_rotation_they_are_all_tried() {
    let registry = SlotRegistry::new();
    for balance in [Balance::LeastConn, Balance::RoundRobin] {
        let pool = pool(&registry, &[1, 1], balance);
        for member in pool.members() {
            member.slot.mark_failed();
        }
        assert_eq!(pool.healthy_count(), 0);
        // A worker that is back is reached at once, not after `healthy_after` checks.
        let first = pool
            .pick(&[])
            .expect("a backend while all are down")
            .slot()
            .addr;
        let other = pool.pick(&[first]).expect("the other one on retry");
        assert_ne!(other.slot().addr, first, "{balance:?}");
        assert!(
            pool.pick(&[addr(9000), addr(9001)]).is_none(),
            "{balance:?}"
        );
        // One healthy backend: only it is chosen again.
        pool.members()[1].slot.observe_health(true, 1, 1);
        assert_eq!(shares(&pool, 10), vec![0, 10], "{balance:?}");
        assert!(pool.pick(&[addr(9001)]).is_none(), "{balance:?}");
        pool.members()[0].slot.observe_health(true, 1, 1);
    }
}

#[test]
fn round_robin_follows_weights() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 2], Balance::RoundRobin);
    assert_eq!(shares(&pool, 300), vec![100, 200]);
    let registry = SlotRegistry::new();
    let pool = self::pool(&registry, &[2, 4, 6], Balance::RoundRobin);
    assert_eq!(shares(&pool, 600), vec![100, 200, 300]);
}

#[test]
fn health_flips_only_after_consecutive_results() {
    let registry = SlotRegistry::new();
    let slot = registry.slot(addr(1));
    assert!(slot.is_healthy());
    assert_eq!(slot.observe_health(false, 2, 3), None);
    assert_eq!(slot.observe_health(false, 2, 3), None);
    assert_eq!(
        slot.observe_health(true, 2, 3),
        None,
        "a success resets the streak"
    );
    assert_eq!(slot.observe_health(false, 2, 3), None);
    assert_eq!(slot.observe_health(false, 2, 3), None);
    assert_eq!(slot.observe_health(false, 2, 3), Some(false));
    assert_eq!(slot.observe_health(true, 2, 3), None);
    assert_eq!(slot.observe_health(true, 2, 3), Some(true));
}

#[test]
fn slots_and_their_counters_survive_a_rebuilt_pool() {
    let registry = SlotRegistry::new();
    let first = pool(&registry, &[1, 1], Balance::LeastConn);
    let lease = first.pick(&[]).unwrap();
    let busy = lease.slot().addr;
    let second = pool(&registry, &[1, 1, 1], Balance::RoundRobin);
    let same = second
        .members()
        .iter()
        .find(|m| m.slot.addr == busy)
        .unwrap();
    assert_eq!(
        same.slot.in_flight(),
        1,
        "the in-flight count followed the rebuild"
    );
    drop(first);
    drop(lease);
    assert_eq!(same.slot.in_flight(), 0);
}

#[test]
fn a_new_backend_does_not_get_a_burst_of_catch_up_traffic() {
    let registry = SlotRegistry::new();
    let old = pool(&registry, &[1, 1], Balance::LeastConn);
    let _ = shares(&old, 1000);
    let grown = pool(&registry, &[1, 1, 1], Balance::LeastConn);
    let counts = shares(&grown, 30);
    assert!(counts[2] <= 11, "new backend took {counts:?}");
}
