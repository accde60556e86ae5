//! Unit parsing, one grammar each for the whole project (the config and sluice-bench):
//!
//! - durations, by `humantime`: `"500ms"`, `"3s"`, `"1.5s"`, `"10m"`, `"1h 30m"`, `"2d"`,
//!   `"1w"` (units ns, us, ms, s, m or min, h, d, w; `M` is a month and `y` a year);
//! - sizes, by `bytesize`: `"65536"`, `"64 KiB"`, `"1.5 MiB"`, `"100 KB"` (KiB, MiB, GiB,
//!   TiB are powers of 1024, KB, MB, GB, TB of 1000; unit letters in any case);
//! - bandwidths: a size per second (`"10 MB/s"`) or bits per second (`"80 Mbit/s"`), exact:
//!   `"12 bit/s"` is 1.5 B/s;
//! - session rates: `"20/s"`, `"90/m"` (1.5 per second), `"30/h"`, exact.
//!
//! Pure functions of their text. They reject what does not parse, and a size or count too
//! large for 64 bits; range checks (at least 1, at most the documented bound) belong to
//! validation.

use std::time::Duration;

/// Parses a duration such as "500ms", "3s", "1.5s", "10m", "1h 30m" or "2d".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "{text:?} is not a duration such as \"500ms\", \"3s\", \"1.5s\", \"10m\", \"1h 30m\" or \"2d\" ({e})"
        )
    })
}

/// Parses a size such as "65536", "64 KiB", "1.5 MiB" or "100 KB" into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size such as \"65536\", \"64 KiB\" or \"1 MiB\"");
    let size: bytesize::ByteSize = text.trim().parse().map_err(|_| bad())?;
    // bytesize saturates what does not fit in 64 bits: refuse it instead.
    if size.as_u64() == u64::MAX {
        return Err(format!("{text:?} is too large a size"));
    }
    Ok(size.as_u64())
}

/// A count per period, as bandwidths and session rates are written: exact, not rounded to a
/// whole number per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerPeriod {
    pub count: u64,
    pub period: Duration,
}

impl PerPeriod {
    /// The count per second, as a float (for messages and bounds).
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.period.as_secs_f64()
    }
}

/// Parses a bandwidth such as "10 MB/s", "512 KiB/s" or "80 Mbit/s" into bytes per period.
pub fn parse_bandwidth(text: &str) -> Result<PerPeriod, String> {
    let bad = || {
        format!("{text:?} is not a bandwidth such as \"10 MB/s\", \"512 KiB/s\" or \"80 Mbit/s\"")
    };
    let body = text.trim().strip_suffix("/s").ok_or_else(bad)?.trim();
    let bits = [("Gbit", 1_000_000_000), ("Mbit", 1_000_000), ("kbit", 1_000), ("Kbit", 1_000)]
        .into_iter()
        .chain([("bit", 1)])
        .find_map(|(unit, scale)| Some((body.strip_suffix(unit)?.trim(), scale)));
    let per = match bits {
        // Bits per second: exact as bits per 8 seconds.
        Some((number, scale)) => {
            let n: u64 = number.parse().map_err(|_| bad())?;
            let count = n.checked_mul(scale).ok_or_else(bad)?;
            PerPeriod { count, period: Duration::from_secs(8) }
        }
        None => PerPeriod {
            count: parse_size(body).map_err(|_| bad())?,
            period: Duration::from_secs(1),
        },
    };
    if per.count == 0 {
        return Err(format!("{text:?}: a bandwidth must be greater than zero"));
    }
    Ok(per)
}

/// Parses a session rate such as "20/s", "90/m" or "30/h": sessions per second, minute or
/// hour, kept exact.
pub fn parse_session_rate(text: &str) -> Result<PerPeriod, String> {
    let bad = || format!("{text:?} is not a rate such as \"20/s\", \"90/m\" or \"30/h\"");
    let (number, per) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u64 = number.trim().parse().map_err(|_| bad())?;
    let period = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(format!("{text:?}: a rate must be greater than zero"));
    }
    Ok(PerPeriod { count, period })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_documented_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 3 weeks "), Ok(Duration::from_secs(3 * 7 * 86_400)));
        for bad in ["", "3", "s", "-1s", "1e3s", "3 fortnights", "1.s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration("99999999999999999999d").is_err(), "overflow is an error");
    }

    #[test]
    fn sizes_distinguish_binary_and_decimal_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64 KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1.5 MiB"), Ok(3 << 19));
        assert_eq!(parse_size("100 KB"), Ok(100_000));
        assert_eq!(parse_size("100 kb"), Ok(100_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999 GiB").is_err());
    }

    #[test]
    fn bandwidths_take_bytes_and_bits_exactly() {
        let bytes = |count| Ok(PerPeriod { count, period: Duration::from_secs(1) });
        let bits = |count| Ok(PerPeriod { count, period: Duration::from_secs(8) });
        assert_eq!(parse_bandwidth("10 MB/s"), bytes(10_000_000));
        assert_eq!(parse_bandwidth("64 KB/s"), bytes(64_000));
        assert_eq!(parse_bandwidth("512 KiB/s"), bytes(524_288));
        assert_eq!(parse_bandwidth("1 GB/s"), bytes(1_000_000_000));
        assert_eq!(parse_bandwidth("80 Mbit/s"), bits(80_000_000));
        assert_eq!(parse_bandwidth("12 bit/s").map(|p| p.per_second()), Ok(1.5));
        assert_eq!(parse_bandwidth("1000/s"), bytes(1000));
        assert!(parse_bandwidth("10 MB").is_err());
        assert!(parse_bandwidth("0 MB/s").is_err());
        assert!(parse_bandwidth("fast/s").is_err());
    }

    #[test]
    fn session_rates_are_exact_per_second_minute_or_hour() {
        let per = |count, secs| Ok(PerPeriod { count, period: Duration::from_secs(secs) });
        assert_eq!(parse_session_rate("20/s"), per(20, 1));
        assert_eq!(parse_session_rate("600/m"), per(600, 60));
        assert_eq!(parse_session_rate("90/m").map(|p| p.per_second()), Ok(1.5));
        assert_eq!(parse_session_rate("30/m").map(|p| p.per_second()), Ok(0.5));
        assert_eq!(parse_session_rate("30/h"), per(30, 3600));
        assert!(parse_session_rate("0/s").is_err());
        assert!(parse_session_rate("20").is_err());
    }
}
