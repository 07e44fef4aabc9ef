//! The end-to-end bench's reading of wrk's report (`benches/end_to_end/wrk_report.rs`), tested
//! here because the bench binary has no test harness.

#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "../benches/end_to_end/wrk_report.rs"]
mod wrk_report;
