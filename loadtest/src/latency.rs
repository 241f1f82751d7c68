//! Latency histograms (HDR, microseconds) and their summaries.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded exactly: one hour. Larger values are clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// An HDR histogram of latencies in microseconds, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static bounds are valid"))
    }
}

impl Latency {
    pub fn record_micros(&mut self, micros: u64) {
        self.0.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        self.0.add(&other.0).expect("histograms share their bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> Summary {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        Summary {
            count: self.0.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.0.max() as f64 / 1000.0,
            mean_ms: self.0.mean() / 1000.0,
        }
    }
}

/// The percentiles a report shows, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Latency::default();
        for ms in 1..=1000u64 {
            h.record_micros(ms * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        // 3 significant digits: within 0.1 %.
        assert!((s.p50_ms - 500.0).abs() <= 0.5, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() <= 1.0, "{s:?}");
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let mut fast = Latency::default();
        let mut slow = Latency::default();
        let mut all = Latency::default();
        for i in 0..900u64 {
            fast.record_micros(100 + i);
            all.record_micros(100 + i);
        }
        for i in 0..100u64 {
            slow.record_micros(50_000 + i * 10);
            all.record_micros(50_000 + i * 10);
        }
        let mut merged = Latency::default();
        merged.merge(&fast);
        merged.merge(&slow);
        assert_eq!(merged.summary(), all.summary());
        assert_eq!(merged.count(), 1000);
        // The slow tail decides the p99 of the merged histogram.
        assert!(merged.summary().p99_ms > 50.0);
        assert!(fast.summary().p99_ms < 1.1);
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = Latency::default();
        h.record_micros(0);
        h.record_micros(u64::MAX);
        assert_eq!(h.count(), 2);
        assert!(h.summary().max_ms >= 3_600_000.0 * 0.999);
    }
}
