//! Arithmetic on measurements: latency percentiles from histograms, rates, medians over
//! rounds, ratios between contenders, and how figures are printed.
//!
//! Latencies are recorded in nanoseconds and reported in microseconds. Pure functions only.

use hdrhistogram::Histogram;

/// Largest latency a histogram can hold: one minute, in nanoseconds.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// Significant decimal digits kept by latency histograms.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Percentiles reported for every latency scenario, with their figure-name suffixes.
pub const PERCENTILES: [(f64, &str); 4] =
    [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p999")];

/// An empty latency histogram (nanoseconds, 1 ns to 60 s, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Named latency figures in microseconds: `latency_us_p50` ... `latency_us_max`, `_mean`.
pub fn latency_figures(histogram: &Histogram<u64>) -> Vec<(String, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let mut figures: Vec<(String, f64)> = PERCENTILES
        .iter()
        .map(|&(p, name)| (format!("latency_us_{name}"), micros(histogram.value_at_percentile(p))))
        .collect();
    figures.push(("latency_us_max".into(), micros(histogram.max())));
    figures.push(("latency_us_mean".into(), histogram.mean() / 1_000.0));
    figures
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1_000.0
}

/// Cumulative fractions at which a latency CDF is sampled: even steps to 0.9, then
/// ever finer steps into the tail, ending at 1.
pub fn cdf_fractions() -> Vec<f64> {
    let mut fractions: Vec<f64> = (0..=18).map(|i| f64::from(i) * 0.05).collect();
    for decade in 1..=4 {
        let tail = 10f64.powi(-decade);
        let step = tail / 10.0;
        for i in 1..=9 {
            fractions.push(1.0 - tail + f64::from(i) * step);
        }
    }
    fractions.push(1.0);
    fractions
}

/// Points `[latency_us, cumulative_fraction]` of the histogram's CDF.
pub fn cdf_points(histogram: &Histogram<u64>) -> Vec<[f64; 2]> {
    if histogram.is_empty() {
        return Vec::new();
    }
    cdf_fractions().into_iter().map(|f| [micros(histogram.value_at_quantile(f)), f]).collect()
}

/// Bits per second over `seconds`, in Gbit/s.
pub fn gbit_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / seconds / 1e9
}

/// Events per second.
pub fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    count as f64 / seconds
}

/// Median of finite values; `None` when there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        return Some(sorted[mid]);
    }
    Some((sorted[mid - 1] + sorted[mid]) / 2.0)
}

/// `numerator / denominator`, or `None` when the denominator is not a positive number.
pub fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    if !numerator.is_finite() || !denominator.is_finite() || denominator <= 0.0 {
        return None;
    }
    Some(numerator / denominator)
}

/// A figure with about four significant digits, no exponent.
pub fn format_figure(value: f64) -> String {
    let magnitude = value.abs();
    match magnitude {
        m if !m.is_finite() => "n/a".into(),
        m if value.fract() == 0.0 && m < 1e15 => format!("{value:.0}"),
        m if m >= 1000.0 => format!("{value:.0}"),
        m if m >= 100.0 => format!("{value:.1}"),
        m if m >= 10.0 => format!("{value:.2}"),
        _ => format!("{value:.3}"),
    }
}

/// A ratio as `1.23x`.
pub fn format_ratio(value: f64) -> String {
    format!("{value:.2}x")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_histogram() {
        let mut histogram = latency_histogram();
        for us in 1..=1000u64 {
            histogram.record(us * 1_000).unwrap();
        }
        let figures: std::collections::HashMap<_, _> =
            latency_figures(&histogram).into_iter().collect();
        let close = |name: &str, want: f64| {
            let got = figures[name];
            assert!((got - want).abs() <= want * 0.002, "{name}: got {got}, want {want}");
        };
        close("latency_us_p50", 500.0);
        close("latency_us_p90", 900.0);
        close("latency_us_p99", 990.0);
        close("latency_us_p999", 999.0);
        close("latency_us_max", 1000.0);
        close("latency_us_mean", 500.5);
    }

    #[test]
    fn empty_histogram_has_no_figures() {
        assert!(latency_figures(&latency_histogram()).is_empty());
        assert!(cdf_points(&latency_histogram()).is_empty());
    }

    #[test]
    fn cdf_is_monotonic_and_ends_at_one() {
        let fractions = cdf_fractions();
        assert!(fractions.windows(2).all(|w| w[0] < w[1]), "{fractions:?}");
        assert_eq!(fractions.first(), Some(&0.0));
        assert_eq!(fractions.last(), Some(&1.0));
        assert!(fractions.iter().any(|f| (f - 0.999).abs() < 1e-9));

        let mut histogram = latency_histogram();
        for ns in [5_000, 7_000, 9_000, 400_000] {
            histogram.record(ns).unwrap();
        }
        let points = cdf_points(&histogram);
        assert!(points.windows(2).all(|w| w[0][0] <= w[1][0]));
        assert!((points.last().unwrap()[0] - 400.0).abs() < 1.0);
    }

    #[test]
    fn rates() {
        assert_eq!(gbit_per_s(1_250_000_000, 1.0), 10.0);
        assert_eq!(gbit_per_s(1_250_000_000, 2.0), 5.0);
        assert_eq!(gbit_per_s(5, 0.0), 0.0);
        assert_eq!(per_second(300, 1.5), 200.0);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratio_refuses_non_positive_denominators() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(3.0, -1.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    #[test]
    fn figures_keep_about_four_digits() {
        assert_eq!(format_figure(123456.7), "123457");
        assert_eq!(format_figure(123.456), "123.5");
        assert_eq!(format_figure(12.3456), "12.35");
        assert_eq!(format_figure(1.23456), "1.235");
        assert_eq!(format_figure(-0.5), "-0.500");
        assert_eq!(format_figure(3.0), "3");
        assert_eq!(format_figure(0.0), "0");
        assert_eq!(format_figure(f64::NAN), "n/a");
        assert_eq!(format_ratio(1.234), "1.23x");
    }
}
