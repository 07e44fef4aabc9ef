//! Figures that each thread counts on its own cache line; a scrape sums the lines.
//!
//! A request is counted about a dozen times (requests, duration, bytes, session result, backend
//! response time). On one shared atomic each add pulls the cache line from the core that added
//! last: with two proxy threads that is a transfer of 100-odd cycles per add, more than the rest
//! of the add. Here a thread's adds stay in its own line, as nginx's workers keep their own
//! figures. Threads beyond the number of lines share one, which stays exact (the adds are
//! atomic) and is only slower.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::proto;

/// One figure set per line pair: x86 prefetches cache lines two by two, so 128 bytes keeps a
/// thread's line from dragging its neighbour's along.
#[repr(align(128))]
struct Line<T>(T);

/// Figure sets, one per thread (up to the number of lines).
pub struct Sharded<T> {
    lines: Box<[Line<T>]>,
}

/// Lines per figure set: the machine's cores rounded up to a power of two, at least 4.
fn line_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get())
            .next_power_of_two()
            .clamp(4, 64)
    })
}

/// This thread's line: threads are numbered in the order they first count something.
fn line_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static LINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % line_count();
    }
    // A thread counting while it exits (its thread-locals gone) uses the first line.
    LINE.try_with(|line| *line).unwrap_or(0)
}

impl<T> Sharded<T> {
    pub fn new(init: impl Fn() -> T) -> Sharded<T> {
        Sharded {
            lines: (0..line_count()).map(|_| Line(init())).collect(),
        }
    }

    /// The calling thread's figures.
    #[inline]
    pub fn local(&self) -> &T {
        let index = line_of_this_thread() % self.lines.len();
        &self.lines[index].0
    }

    /// Every thread's figures, for a scrape.
    pub fn lines(&self) -> impl Iterator<Item = &T> {
        self.lines.iter().map(|line| &line.0)
    }

    /// The sum over the threads of one counter (wrapping, so that a gauge counted up on one
    /// thread and down on another sums right).
    pub fn total(&self, counter: impl Fn(&T) -> &AtomicU64) -> u64 {
        self.lines()
            .map(|t| counter(t).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// Adds `n` to a counter of the calling thread's line.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// `N` zeroed counters.
pub fn zeroed<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// Upper bounds of the latency buckets, in nanoseconds: sub-millisecond loopback answers up to
/// the 30 s read timeout.
const BUCKET_NANOS: [u64; 15] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// One thread's share of a latency histogram: a count per bucket (the last one past the
/// largest bound) and the sum of the observations.
pub struct LatencyCounts {
    buckets: [AtomicU64; BUCKET_NANOS.len() + 1],
    /// Nanoseconds; wraps after 584 years of summed latency.
    sum_nanos: AtomicU64,
}

impl Default for LatencyCounts {
    fn default() -> Self {
        LatencyCounts {
            buckets: zeroed(),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl LatencyCounts {
    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(BUCKET_NANOS.len());
        if let Some(count) = self.buckets.get(bucket) {
            add(count, 1);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// A latency histogram counted per thread.
pub struct LatencyHistogram(Sharded<LatencyCounts>);

impl LatencyHistogram {
    pub fn new() -> LatencyHistogram {
        LatencyHistogram(Sharded::new(LatencyCounts::default))
    }

    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        self.0.local().observe(elapsed);
    }

    pub fn snapshot(&self) -> proto::Histogram {
        latency_histogram(self.0.lines())
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let observed = self.snapshot().get_sample_count();
        f.debug_struct("LatencyHistogram")
            .field("observed", &observed)
            .finish()
    }
}

/// The histogram of every thread's counts. The total is the sum of the buckets as read, so it
/// always equals the `+Inf` bucket, as Prometheus requires, even while requests are counted.
pub fn latency_histogram<'a>(shares: impl Iterator<Item = &'a LatencyCounts>) -> proto::Histogram {
    let mut counts = [0u64; BUCKET_NANOS.len() + 1];
    let mut sum_nanos = 0u64;
    for share in shares {
        for (total, count) in counts.iter_mut().zip(&share.buckets) {
            *total = total.wrapping_add(count.load(Ordering::Relaxed));
        }
        sum_nanos = sum_nanos.wrapping_add(share.sum_nanos.load(Ordering::Relaxed));
    }
    let mut cumulative = 0u64;
    let buckets = BUCKET_NANOS
        .iter()
        .zip(counts)
        .map(|(&bound, count)| {
            cumulative = cumulative.wrapping_add(count);
            let mut bucket = proto::Bucket::default();
            bucket.set_upper_bound(bound as f64 / 1e9);
            bucket.set_cumulative_count(cumulative);
            bucket
        })
        .collect();
    let mut histogram = proto::Histogram::default();
    histogram.set_bucket(buckets);
    histogram.set_sample_count(counts.iter().fold(0, |a, &c| a.wrapping_add(c)));
    histogram.set_sample_sum(sum_nanos as f64 / 1e9);
    histogram
}

/// The pieces of a scraped family, for collectors that build their own.
pub mod family {
    use prometheus::core::Desc;
    use prometheus::proto::{self, MetricFamily, MetricType};

    /// A descriptor of constant text: valid by construction.
    pub fn desc(name: &str, help: &str, labels: &[&str]) -> Desc {
        Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect(),
            Default::default(),
        )
        .unwrap_or_else(|e| unreachable!("constant metric descriptor: {e}"))
    }

    pub fn of(desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
        let mut family = MetricFamily::default();
        family.set_name(desc.fq_name.clone());
        family.set_help(desc.help.clone());
        family.set_field_type(kind);
        family.set_metric(metrics);
        family
    }

    /// Labels sorted by name, as the crate's own metrics print them.
    fn labelled(labels: &[(&str, &str)]) -> proto::Metric {
        let mut pairs: Vec<proto::LabelPair> = labels
            .iter()
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name((*name).to_owned());
                pair.set_value((*value).to_owned());
                pair
            })
            .collect();
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        proto::Metric::from_label(pairs)
    }

    pub fn counter(labels: &[(&str, &str)], value: u64) -> proto::Metric {
        let mut counter = proto::Counter::default();
        counter.set_value(value as f64);
        let mut metric = labelled(labels);
        metric.set_counter(counter);
        metric
    }

    pub fn gauge(labels: &[(&str, &str)], value: f64) -> proto::Metric {
        let mut gauge = proto::Gauge::default();
        gauge.set_value(value);
        let mut metric = labelled(labels);
        metric.set_gauge(gauge);
        metric
    }

    pub fn histogram(labels: &[(&str, &str)], histogram: proto::Histogram) -> proto::Metric {
        let mut metric = labelled(labels);
        metric.set_histogram(histogram);
        metric
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_sum_exactly() {
        let figures = std::sync::Arc::new(Sharded::new(zeroed::<2>));
        let threads: Vec<_> = (0..9)
            .map(|_| {
                let figures = figures.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        add(&figures.local()[0], 1);
                        // A gauge up on one thread, down on the next: the sum still nets out.
                        figures.local()[1].fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for _ in 0..9 * 10_000 {
            add(&figures.local()[1], 1);
        }
        for thread in threads {
            thread.join().expect("counting thread");
        }
        assert_eq!(figures.total(|t| &t[0]), 90_000);
        assert_eq!(figures.total(|t| &t[1]), 0);
    }

    #[test]
    fn each_line_has_a_line_pair_of_its_own() {
        let figures = Sharded::new(zeroed::<1>);
        let addresses: Vec<usize> = figures.lines().map(|t| t as *const _ as usize).collect();
        assert!(addresses.len() >= 4);
        for pair in addresses.windows(2) {
            assert!(pair[1] - pair[0] >= 128, "lines closer than a line pair");
        }
        let mine = figures.local() as *const _ as usize;
        assert!(addresses.contains(&mine));
    }

    #[test]
    fn latency_lands_in_the_first_bucket_that_holds_it() {
        let shares = [LatencyCounts::default(), LatencyCounts::default()];
        shares[0].observe(Duration::from_micros(500)); // on the bound: le="0.0005"
        shares[1].observe(Duration::from_micros(501));
        shares[1].observe(Duration::from_secs(7));
        shares[0].observe(Duration::from_secs(31)); // past every bound: only in +Inf
        let h = latency_histogram(shares.iter());
        let cumulative: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        assert_eq!(cumulative[0], (0.0005, 1));
        assert_eq!(cumulative[1], (0.001, 2));
        assert_eq!(cumulative[12], (5.0, 2));
        assert_eq!(cumulative[13], (10.0, 3));
        assert_eq!(cumulative[14], (30.0, 3));
        assert_eq!(h.get_sample_count(), 4);
        assert!((h.get_sample_sum() - 38.001001).abs() < 1e-9);
    }
}
