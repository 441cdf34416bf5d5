//! Latency summaries: the few order statistics the benchmark prints.
//!
//! Why nearest-rank percentiles over the full sorted sample: a few thousand samples fit in
//! memory, and nearest-rank always reports a latency that was actually observed, which is what
//! a reader comparing "p99 of enqueue" with "p99 of a raw fsync" expects.

use std::time::Duration;

/// Order statistics of one series of measured operations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// Slowest sample.
    pub max: Duration,
    /// Arithmetic mean.
    pub mean: Duration,
}

/// Nearest-rank percentile `p` (0–100) of an ascending slice; zero for an empty one.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises samples (in any order).
pub fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    let mean = if samples.is_empty() {
        Duration::ZERO
    } else {
        total / samples.len() as u32
    };
    Summary {
        count: samples.len(),
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        max: samples.last().copied().unwrap_or_default(),
        mean,
    }
}

/// Milliseconds with three decimals, the unit every figure is printed in.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// `a / b` as a plain ratio; `inf` when `b` is zero.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::INFINITY
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles_pick_observed_samples() {
        let s = ms_list(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&s, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn summary_sorts_its_input() {
        let s = summarize(ms_list(&[9, 1, 5, 3, 7]));
        assert_eq!(s.count, 5);
        assert_eq!(s.p50, Duration::from_millis(5));
        assert_eq!(s.max, Duration::from_millis(9));
        assert_eq!(s.mean, Duration::from_millis(5));
    }

    #[test]
    fn ratio_of_zero_is_infinite_not_a_panic() {
        assert!(ratio(Duration::from_secs(1), Duration::ZERO).is_infinite());
        assert!((ratio(Duration::from_secs(3), Duration::from_secs(2)) - 1.5).abs() < 1e-9);
    }
}
