//! Per-client rate limit of the login endpoints (`/login`, `/callback`): a sliding one-minute
//! window estimated with `pingora-limits` (a count-min sketch, so memory stays fixed however
//! many addresses are seen; a collision can only make a client look busier, never freer).

use std::net::IpAddr;
use std::time::Duration;

use pingora_limits::rate::{Rate, RateComponents};

use crate::request_head::RequestHead;

const WINDOW: Duration = Duration::from_secs(60);
/// Sketch size: 3 × 16384 counters per half-window (~0.8 MB in all).
const HASHES: usize = 3;
const SLOTS: usize = 16384;

/// Login requests per client address; survives reloads (the limit itself is read per request).
pub struct LoginRate {
    rate: Rate,
}

impl Default for LoginRate {
    fn default() -> Self {
        LoginRate::new()
    }
}

impl LoginRate {
    pub fn new() -> LoginRate {
        LoginRate {
            rate: Rate::new_with_estimator_config(WINDOW, HASHES, SLOTS),
        }
    }

    /// Count one request from `client`. `Err(retry_after_secs)` when it is over
    /// `per_minute` requests in the last minute (the request counts even when refused, so a
    /// client that keeps hammering stays refused).
    pub fn check(&self, client: IpAddr, per_minute: u32) -> Result<(), u64> {
        let client = client.to_canonical();
        self.rate.observe(&client, 1);
        let limit = f64::from(per_minute);
        self.rate.rate_with(&client, |c: RateComponents| {
            let elapsed = c.current_interval_fraction;
            let (prev, curr) = (c.prev_samples as f64, c.curr_samples as f64);
            if prev * (1.0 - elapsed) + curr <= limit {
                return Ok(());
            }
            Err(retry_after(prev, curr, elapsed, limit - 1.0))
        })
    }
}

/// The 429 for a client over the login rate of `[limits]`, counting this request; None when
/// it may go on. The client is the real one behind trusted proxies (everyone behind the ngrok
/// agent would otherwise share one budget); an untrusted peer's `X-Forwarded-For` is ignored.
pub fn over_limit(
    rate: &LoginRate,
    session: &pingora_proxy::Session,
    trusted: &crate::auth::trusted::TrustedProxies,
    per_minute: u32,
) -> Option<crate::auth::flow::AuthResponse> {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())?;
    let forwarded = session
        .req_header()
        .list_str(&crate::headers::X_FORWARDED_FOR_NAME);
    let retry_after = rate
        .check(trusted.client_ip(peer, forwarded.as_deref()), per_minute)
        .err()?;
    crate::metrics::rejections().login_rate.inc();
    Some(crate::auth::flow::AuthResponse {
        status: 429,
        headers: vec![("retry-after", retry_after.to_string())],
        page: Some(crate::auth::flow::Page {
            title: "Too many sign-in attempts",
            detail: format!(
                "Too many sign-in requests from your address. Try again in {retry_after} seconds."
            ),
        }),
    })
}

/// Seconds until the sliding count falls to `target` if the client sends nothing more.
fn retry_after(prev: f64, curr: f64, elapsed: f64, target: f64) -> u64 {
    let window = WINDOW.as_secs_f64();
    let rest_of_window = 1.0 - elapsed;
    let fraction = if curr <= target {
        // Within this window, as the previous window's share fades out.
        if prev > 0.0 {
            (rest_of_window - (target - curr) / prev).max(0.0)
        } else {
            0.0
        }
    } else {
        // In the next window, as this window's share fades out.
        rest_of_window + (1.0 - target.max(0.0) / curr)
    };
    (fraction * window).ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_over_the_limit_is_refused_and_others_are_not() {
        let rate = LoginRate::new();
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        for _ in 0..5 {
            assert!(rate.check(a, 5).is_ok());
        }
        let retry = rate.check(a, 5).unwrap_err();
        assert!((1..=120).contains(&retry), "retry after {retry}s");
        assert!(
            rate.check(b, 5).is_ok(),
            "another client has its own budget"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_share_the_ipv4_budget() {
        let rate = LoginRate::new();
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert!(rate.check(v4, 1).is_ok());
        assert!(rate.check(mapped, 1).is_err());
    }

    #[test]
    fn retry_after_is_at_least_a_second_and_at_most_two_windows() {
        assert_eq!(retry_after(0.0, 100.0, 0.0, 9.0), 115);
        assert_eq!(retry_after(40.0, 0.0, 0.5, 10.0), 15);
        assert!(retry_after(10.0, 9.0, 0.999, 9.0) >= 1);
    }
}
