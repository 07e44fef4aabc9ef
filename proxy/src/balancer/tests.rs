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
    for balance in [Balance::LeastConn, Balance::LeastTime, Balance::RoundRobin] {
        let pool = pool(&registry, &[1, 1, 1], balance);
        pool.members()[0].slot.mark_failed();
        let counts = shares(&pool, 30);
        assert_eq!(counts[0], 0, "{balance:?}");
        let only = pool.pick(&[addr(9002)]).unwrap();
        assert_eq!(only.slot().addr, addr(9001), "{balance:?}");
        assert!(
            matches!(
                pool.pick(&[addr(9001), addr(9002)]),
                Err(NoBackend::AllTried)
            ),
            "{balance:?}: the healthy ones were tried"
        );
        // restore for the next balance mode (same registry, same slots)
        pool.members()[0].slot.observe_health(true, 1, 1);
    }
}

#[test]
fn when_every_backend_is_out_of_rotation_they_are_all_tried() {
    let registry = SlotRegistry::new();
    for balance in [Balance::LeastConn, Balance::LeastTime, Balance::RoundRobin] {
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
            matches!(
                pool.pick(&[addr(9000), addr(9001)]),
                Err(NoBackend::AllDown)
            ),
            "{balance:?}: all out, all tried"
        );
        // One healthy backend: only it is chosen again.
        pool.members()[1].slot.observe_health(true, 1, 1);
        assert_eq!(shares(&pool, 10), vec![0, 10], "{balance:?}");
        assert!(
            matches!(pool.pick(&[addr(9001)]), Err(NoBackend::AllTried)),
            "{balance:?}: the healthy one was tried"
        );
        pool.members()[0].slot.observe_health(true, 1, 1);
    }
}

/// Records a response time for the backend at `port`, as the proxy does when headers arrive.
fn observe(pool: &Pool, port: u16, millis: u64, now: u64) {
    let member = pool.members().iter().find(|m| m.slot.addr == addr(port));
    member
        .expect("backend in the pool")
        .slot
        .latency()
        .observe(std::time::Duration::from_millis(millis), now);
}

/// A least_time pick at a given instant (the pool's own pick reads the clock), leased.
fn pick_at(pool: &Pool, now: u64) -> Lease {
    let member = least_time::pick(pool.members(), |m| m.slot.is_healthy(), now).expect("a backend");
    Lease::take(&member.slot, member.weight)
}

fn held_on(leases: &[Lease], port: u16) -> usize {
    leases
        .iter()
        .filter(|l| l.slot().addr == addr(port))
        .count()
}

const T: u64 = 5_000_000_000;

#[test]
fn least_time_keeps_requests_off_a_slow_backend_that_least_conn_would_load_equally() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 1, 1], Balance::LeastTime);
    observe(&pool, 9000, 1, T);
    observe(&pool, 9001, 1, T);
    observe(&pool, 9002, 20, T);
    // 30 requests at once: least_conn would hold 10 on each. A 20 ms backend is no slower a
    // choice only once each 1 ms one holds 19 (1 ms × 20 in line = 20 ms × 1).
    let mut leases: Vec<Lease> = (0..30).map(|_| pick_at(&pool, T)).collect();
    let on = |leases: &[Lease]| {
        (
            held_on(leases, 9000),
            held_on(leases, 9001),
            held_on(leases, 9002),
        )
    };
    assert_eq!(on(&leases), (15, 15, 0));
    leases.extend((0..12).map(|_| pick_at(&pool, T)));
    let (a, b, slow) = on(&leases);
    assert_eq!(slow, 1, "42 in flight: the slow backend takes one");
    assert_eq!((a.min(b), a.max(b)), (20, 21));
}

#[test]
fn least_time_weighs_the_expected_wait_by_weight() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 2], Balance::LeastTime);
    observe(&pool, 9000, 4, T);
    observe(&pool, 9001, 4, T);
    let leases: Vec<Lease> = (0..9).map(|_| pick_at(&pool, T)).collect();
    assert_eq!(
        held_on(&leases, 9001),
        6,
        "equal response times: 9 requests split 3:6 for weights 1:2"
    );
}

#[test]
fn least_time_without_response_times_is_least_conn() {
    let registry = SlotRegistry::new();
    let equal = pool(&registry, &[1, 1, 1], Balance::LeastTime);
    assert_eq!(shares(&equal, 300), vec![100, 100, 100]);
    let registry = SlotRegistry::new();
    let weighted = pool(&registry, &[1, 3], Balance::LeastTime);
    let leases: Vec<Lease> = (0..8).map(|_| weighted.pick(&[]).unwrap()).collect();
    assert_eq!(
        held_on(&leases, 9001),
        6,
        "8 concurrent requests split 2:6 for weights 1:3"
    );
}

#[test]
fn least_time_tries_a_backend_it_has_not_timed_yet() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 1], Balance::LeastTime);
    observe(&pool, 9000, 1, T);
    let _busy = pool.pick(&[addr(9001)]).unwrap();
    // Costed at the quickest known time, the new backend wins over 1 ms × 2 in line.
    assert_eq!(pick_at(&pool, T).slot().addr, addr(9001));
}

#[test]
fn least_time_tries_a_slow_backend_again_once_its_estimate_has_decayed() {
    let registry = SlotRegistry::new();
    let pool = pool(&registry, &[1, 1, 1], Balance::LeastTime);
    let fast_at = |now| {
        observe(&pool, 9000, 1, now);
        observe(&pool, 9001, 1, now);
    };
    observe(&pool, 9002, 20, T);
    fast_at(T);
    let chosen =
        |now| least_time::pick(pool.members(), |m| m.slot.is_healthy(), now).map(|m| m.slot.addr);
    assert_ne!(chosen(T), Some(addr(9002)));
    // A minute on, the fast ones still answer in 1 ms; the slow one has not been asked since,
    // and 20 ms × e^-6 ≈ 50 µs: it gets the next request, and shows whether it recovered.
    let later = T + 60 * 1_000_000_000;
    fast_at(later);
    assert_eq!(chosen(later), Some(addr(9002)));
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
fn a_check_under_way_when_a_request_fails_to_connect_does_not_bring_the_backend_back() {
    let registry = SlotRegistry::new();
    let slot = registry.slot(addr(1));
    // The check connects and is answered; meanwhile a request finds the backend gone.
    let check = slot.begin_check();
    assert!(slot.mark_failed());
    assert_eq!(
        slot.observe_check(check, true, 1, 1),
        None,
        "an answer older than the failure must not undo it"
    );
    assert!(!slot.is_healthy());
    assert!(
        !slot.passed_last_check(),
        "/readyz must not count it either"
    );
    assert_eq!(
        slot.health_checks(),
        (1, 0),
        "the check still counts as passed"
    );
    // The next check, begun after the failure, is believed.
    let check = slot.begin_check();
    assert_eq!(slot.observe_check(check, true, 1, 1), Some(true));
    assert!(slot.passed_last_check());
    // A failure seen by a check under way is always believed.
    let check = slot.begin_check();
    slot.mark_failed();
    assert!(slot.observe_health(true, 1, 1).is_some());
    assert_eq!(slot.observe_check(check, false, 1, 1), Some(false));
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

#[test]
fn a_backends_failures_are_logged_once_a_second_with_the_count_left_out() {
    let log = super::FailureLog::default();
    let unlogged = |count, over_secs| Some(super::Unlogged { count, over_secs });
    assert_eq!(log.admit(1_000), unlogged(0, 0), "the first is logged");
    for _ in 0..3 {
        assert_eq!(log.admit(1_000), None, "the same second: not logged");
    }
    assert_eq!(
        log.admit(1_001),
        unlogged(3, 1),
        "the next second says how many were left out"
    );
    assert_eq!(log.admit(1_001), None);
    assert_eq!(
        log.admit(1_013),
        unlogged(1, 12),
        "a count written long after its failures says over how long they were left out"
    );
}

/// Found by the chaos run: a health check bringing a backend back while every other one was
/// out could land between two looks at the pool, the first finding no healthy backend and the
/// second one: the request got a 503 with a worker up. Each pick decides from one look.
#[test]
fn a_backend_coming_back_during_a_pick_never_leaves_the_pick_empty_handed() {
    for balance in [Balance::LeastConn, Balance::LeastTime, Balance::RoundRobin] {
        let registry = SlotRegistry::new();
        let pool = pool(&registry, &[1, 1, 1], balance);
        for member in pool.members() {
            member.slot.mark_failed();
        }
        let flipping = pool.members()[2].slot.clone();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let empty = std::thread::scope(|scope| {
            scope.spawn(|| {
                // Back and out again, as health checks and failed connects do, as fast as can be.
                while !stop.load(Ordering::Relaxed) {
                    flipping.observe_health(true, 1, 1);
                    flipping.mark_failed();
                }
            });
            let empty = (0..300_000).filter(|_| pool.pick(&[]).is_err()).count();
            stop.store(true, Ordering::Relaxed);
            empty
        });
        assert_eq!(empty, 0, "{balance:?}: picks that found no backend");
    }
}

#[test]
fn the_status_without_a_backend_says_whether_the_pool_is_down_or_the_request_tried_them_all() {
    assert_eq!(NoBackend::AllDown.status(false).0, 503);
    assert_eq!(NoBackend::AllDown.status(true).0, 503);
    assert_eq!(NoBackend::AllTried.status(false).0, 502);
    assert_eq!(
        NoBackend::AllTried.status(true).0,
        504,
        "the last try timed out"
    );
}
