//! Reading wrk's report: requests, duration, p50/p99 and errors. Kept apart from running wrk
//! so that `tests/bench_wrk_report.rs` can test it without the bench.

/// What one measured wrk run said.
#[derive(Debug, PartialEq)]
pub struct WrkRun {
    pub requests: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout).
    pub errors: u64,
    pub non_2xx: u64,
}

/// Reads wrk 4's report (`--latency`).
pub fn parse(text: &str) -> Result<WrkRun, String> {
    let mut requests = None;
    let mut seconds = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = 0;
    let mut non_2xx = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "205123 requests in 5.00s, 45.03MB read"
            [n, "requests", "in", took, ..] => {
                requests = n.parse().ok();
                seconds = duration_ms(took.trim_end_matches(',')).map(|ms| ms / 1000.0);
            }
            ["50%", value] => p50 = duration_ms(value),
            ["99%", value] => p99 = duration_ms(value),
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", rest @ ..] => {
                errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            // "Non-2xx or 3xx responses: 12"
            ["Non-2xx", "or", "3xx", "responses:", n] => non_2xx = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    let missing = |what: &str| format!("wrk's report has no {what}:\n{text}");
    Ok(WrkRun {
        requests: requests.ok_or_else(|| missing("request count"))?,
        seconds: seconds.ok_or_else(|| missing("duration"))?,
        p50_ms: p50.ok_or_else(|| missing("50% latency"))?,
        p99_ms: p99.ok_or_else(|| missing("99% latency"))?,
        errors,
        non_2xx,
    })
}

/// "711.00us", "1.06ms", "5.00s", "1.02m" in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 5s test @ http://127.0.0.1:8131/api/hello
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   785.21us  345.12us   9.87ms   85.84%
    Req/Sec    41.23k     2.01k   44.96k    78.00%
  Latency Distribution
     50%  711.00us
     75%  845.00us
     90%    1.06ms
     99%    2.14ms
  205123 requests in 5.00s, 45.03MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec:  41019.62
Transfer/sec:      9.01MB
";

    #[test]
    fn reads_counts_latency_in_any_unit_and_errors() {
        assert_eq!(
            parse(REPORT).unwrap(),
            WrkRun {
                requests: 205_123,
                seconds: 5.0,
                p50_ms: 0.711,
                p99_ms: 2.14,
                errors: 3,
                non_2xx: 12,
            }
        );
        let slow = REPORT
            .replace("99%    2.14ms", "99%    1.50s")
            .replace("in 5.00s,", "in 1.00m,");
        let run = parse(&slow).unwrap();
        assert_eq!((run.p99_ms, run.seconds), (1500.0, 60.0));
    }

    #[test]
    fn a_clean_run_has_no_error_lines() {
        let clean: String = REPORT
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .map(|l| format!("{l}\n"))
            .collect();
        let run = parse(&clean).unwrap();
        assert_eq!((run.errors, run.non_2xx, run.requests), (0, 0, 205_123));
    }

    #[test]
    fn a_report_without_a_figure_is_an_error_not_a_zero() {
        for (cut, missing) in [
            ("     99%    2.14ms\n", "99% latency"),
            ("     50%  711.00us\n", "50% latency"),
            (
                "  205123 requests in 5.00s, 45.03MB read\n",
                "request count",
            ),
        ] {
            let error = parse(&REPORT.replace(cut, "")).unwrap_err();
            assert!(error.contains(missing), "{error}");
        }
        assert!(parse(&REPORT.replace("2.14ms", "2.14fortnights")).is_err());
    }
}
