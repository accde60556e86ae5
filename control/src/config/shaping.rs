//! The `bandwidth`, `bandwidth_up`, `bandwidth_down` and `limits` blocks of services and
//! rules: their TOML form, validation (errors name file, line and key like the rest of the
//! config) and the rate syntax ("10 MB/s", "80 Mbit/s", "20/s").

use std::time::Duration;

use serde::Deserialize;
use sluice_engine::limits::{LimitSpec, DEFAULT_NETWORK_V4, DEFAULT_NETWORK_V6};
use sluice_engine::shape::{BandwidthSpec, Rate};
use toml::Spanned;

use super::{parse_size, Size, Validator};

/// A `bandwidth` block: rates of one direction, or of each direction separately.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BandwidthSection {
    per_connection: Option<Spanned<String>>,
    per_client: Option<Spanned<String>>,
    total: Option<Spanned<String>>,
    burst: Option<Spanned<Size>>,
}

/// A `limits` block of a service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsSection {
    per_client: Option<Spanned<i64>>,
    per_network: Option<Spanned<i64>>,
    network: Option<Spanned<i64>>,
    network_v6: Option<Spanned<i64>>,
    rate_per_client: Option<Spanned<String>>,
    rate_burst: Option<Spanned<i64>>,
    max_bytes: Option<Spanned<Size>>,
    max_duration: Option<Spanned<String>>,
    refuse: Option<Spanned<String>>,
}

/// The three bandwidth keys of a service or rule.
pub(super) struct BandwidthKeys<'a> {
    pub both: Option<&'a Spanned<BandwidthSection>>,
    pub up: Option<&'a Spanned<BandwidthSection>>,
    pub down: Option<&'a Spanned<BandwidthSection>>,
}

/// New sessions per client per second allowed at once when `rate_burst` is not given.
pub const DEFAULT_RATE_BURST: u64 = 1;

impl Validator<'_> {
    /// Compiles a service's or rule's bandwidth keys (`key` is its key prefix). A
    /// direction's own block replaces `bandwidth` for that direction.
    pub(super) fn bandwidth(&mut self, raw: BandwidthKeys<'_>, key: &str) -> BandwidthSpec {
        let mut spec = BandwidthSpec::default();
        let blocks = [
            (raw.both, "bandwidth", [0, 1].as_slice()),
            (raw.up, "bandwidth_up", &[0]),
            (raw.down, "bandwidth_down", &[1]),
        ];
        for (block, name, dirs) in blocks {
            let Some(spanned) = block else { continue };
            let b = spanned.get_ref();
            let k = |f: &str| format!("{key}.{name}.{f}");
            let burst = b.burst.as_ref().and_then(|s| self.byte_count(s, &k("burst")));
            let mut rate = |field: &Option<Spanned<String>>, f: &str| {
                let value = field.as_ref()?;
                match parse_bandwidth(value.get_ref()) {
                    Ok(per_sec) => {
                        let default = Rate::bandwidth(per_sec);
                        Some(Rate { per_sec, burst: burst.unwrap_or(default.burst) })
                    }
                    Err(m) => {
                        self.error(value.span(), &k(f), m);
                        None
                    }
                }
            };
            let per_connection = rate(&b.per_connection, "per_connection");
            let per_client = rate(&b.per_client, "per_client");
            let total = rate(&b.total, "total");
            for &d in dirs {
                spec.per_connection[d] = per_connection.or(spec.per_connection[d]);
                spec.per_client[d] = per_client.or(spec.per_client[d]);
                spec.total[d] = total.or(spec.total[d]);
            }
            if b.per_connection.is_none() && b.per_client.is_none() && b.total.is_none() {
                let message = "names no rate; expected per_connection, per_client or total";
                self.error(spanned.span(), &format!("{key}.{name}"), message);
            }
        }
        spec
    }

    /// Compiles a service's `limits` block.
    pub(super) fn limits(&mut self, raw: Option<&LimitsSection>, key: &str) -> LimitSpec {
        let mut spec = LimitSpec {
            network_v4: DEFAULT_NETWORK_V4,
            network_v6: DEFAULT_NETWORK_V6,
            ..LimitSpec::default()
        };
        let Some(raw) = raw else { return spec };
        let k = |f: &str| format!("{key}.limits.{f}");
        spec.per_client = raw.per_client.as_ref().and_then(|n| self.count(n, &k("per_client")));
        spec.per_network = raw.per_network.as_ref().and_then(|n| self.count(n, &k("per_network")));
        if let Some(p) = &raw.network {
            spec.network_v4 = self.prefix(p, 32, &k("network")).unwrap_or(DEFAULT_NETWORK_V4);
        }
        if let Some(p) = &raw.network_v6 {
            spec.network_v6 = self.prefix(p, 128, &k("network_v6")).unwrap_or(DEFAULT_NETWORK_V6);
        }
        let burst = match &raw.rate_burst {
            Some(n) => self.count(n, &k("rate_burst")).map(u64::from),
            None => Some(DEFAULT_RATE_BURST),
        };
        if let Some(r) = &raw.rate_per_client {
            match parse_session_rate(r.get_ref()) {
                Ok(per_sec) => {
                    let burst = burst.unwrap_or(DEFAULT_RATE_BURST);
                    spec.client_rate = Some(Rate { per_sec, burst });
                }
                Err(m) => self.error(r.span(), &k("rate_per_client"), m),
            }
        } else if let Some(b) = &raw.rate_burst {
            self.error(b.span(), &k("rate_burst"), "applies only with rate_per_client");
        }
        spec.max_bytes = raw.max_bytes.as_ref().and_then(|s| self.byte_count(s, &k("max_bytes")));
        spec.max_duration =
            raw.max_duration.as_ref().and_then(|d| self.duration(d, &k("max_duration")));
        if let Some(r) = &raw.refuse {
            match r.get_ref().as_str() {
                "close" => spec.reset = false,
                "reset" => spec.reset = true,
                other => {
                    let message =
                        format!("unknown refusal {other:?}; expected \"close\" or \"reset\"");
                    self.error(r.span(), &k("refuse"), message);
                }
            }
        }
        spec
    }

    fn count(&mut self, value: &Spanned<i64>, key: &str) -> Option<u32> {
        match u32::try_from(*value.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.error(
                    value.span(),
                    key,
                    format!("must be a whole number from 1 to {}", u32::MAX),
                );
                None
            }
        }
    }

    fn prefix(&mut self, value: &Spanned<i64>, max: u8, key: &str) -> Option<u8> {
        match u8::try_from(*value.get_ref()) {
            Ok(n) if n <= max => Some(n),
            _ => {
                self.error(value.span(), key, format!("must be a prefix length from 0 to {max}"));
                None
            }
        }
    }

    fn byte_count(&mut self, value: &Spanned<Size>, key: &str) -> Option<u64> {
        let parsed = value.get_ref().bytes();
        match parsed {
            Ok(0) => {
                self.error(value.span(), key, "must be greater than zero");
                None
            }
            Ok(n) => Some(n),
            Err(m) => {
                self.error(value.span(), key, m);
                None
            }
        }
    }
}

/// Parses a bandwidth such as "10 MB/s", "512 KiB/s" or "80 Mbit/s" into bytes per second.
pub fn parse_bandwidth(text: &str) -> Result<u64, String> {
    let bad = || {
        format!("{text:?} is not a bandwidth such as \"10 MB/s\", \"512 KiB/s\" or \"80 Mbit/s\"")
    };
    let t = text.trim();
    let body = t.strip_suffix("/s").ok_or_else(bad)?.trim();
    let split = body.find(|c: char| !c.is_ascii_digit()).unwrap_or(body.len());
    let (number, unit) = body.split_at(split);
    let bits =
        |scale: u64| number.parse::<u64>().ok().and_then(|n| n.checked_mul(scale)).map(|b| b / 8);
    let per_sec = match unit.trim() {
        "bit" => bits(1),
        "kbit" | "Kbit" => bits(1_000),
        "Mbit" => bits(1_000_000),
        "Gbit" => bits(1_000_000_000),
        _ => parse_size(body).ok(),
    };
    match per_sec {
        Some(0) => Err(format!("{text:?}: a bandwidth must be greater than zero")),
        Some(n) => Ok(n),
        None => Err(bad()),
    }
}

/// Parses a session rate such as "20/s" or "600/m" into sessions per second (at least 1).
pub fn parse_session_rate(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a rate such as \"20/s\" or \"600/m\"");
    let (number, per) = text.trim().split_once('/').ok_or_else(bad)?;
    let n: u64 = number.trim().parse().map_err(|_| bad())?;
    let window = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        _ => return Err(bad()),
    };
    let per_sec = n / window.as_secs();
    if per_sec == 0 {
        return Err(format!("{text:?}: sessions per second must come to at least 1"));
    }
    Ok(per_sec)
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    const WEB: &str = "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:8000\"]\n";

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::parse("test.toml", text).expect_err("config should be rejected").0
    }

    #[test]
    fn bandwidth_blocks_compile_per_direction() {
        let text = format!(
            "{WEB}bandwidth = {{ per_connection = \"10 MB/s\", total = \"1 GB/s\", burst = \"256 KB\" }}\n\
             bandwidth_down = {{ per_client = \"80 Mbit/s\" }}\n\
             limits = {{ per_client = 10, per_network = 100, network = 16, rate_per_client = \"20/s\", max_bytes = \"1 GB\", max_duration = \"1h\", refuse = \"reset\" }}\n\
             [[service.rule]]\naction = \"allow\"\nfrom = [\"10.0.0.0/8\"]\nbandwidth_up = {{ total = \"1 MB/s\" }}\n"
        );
        let config = Config::parse("test.toml", &text).unwrap();
        let web = &config.services[0];
        let r = |per_sec| Some(Rate { per_sec, burst: 256_000 });
        assert_eq!(web.bandwidth.per_connection, [r(10_000_000), r(10_000_000)]);
        assert_eq!(web.bandwidth.total, [r(1_000_000_000), r(1_000_000_000)]);
        assert_eq!(web.bandwidth.per_client, [None, Some(Rate::bandwidth(10_000_000))]);
        let l = web.limits;
        assert_eq!(
            (l.per_client, l.per_network, l.network_v4, l.network_v6),
            (Some(10), Some(100), 16, 64)
        );
        assert_eq!(l.client_rate, Some(Rate { per_sec: 20, burst: DEFAULT_RATE_BURST }));
        assert_eq!((l.max_bytes, l.reset), (Some(1_000_000_000), true));
        assert_eq!(web.timeouts.max_duration, Some(Duration::from_secs(3600)));
        assert_eq!(web.rule_bandwidth[0].total, [Some(Rate::bandwidth(1_000_000)), None]);
    }

    #[test]
    fn bad_shaping_and_limits_name_line_and_key() {
        let text = format!(
            "{WEB}bandwidth = {{ per_connection = \"fast\" }}\n\
             limits = {{ per_client = 0, network = 40, refuse = \"maybe\" }}\n\
             [[service.rule]]\naction = \"deny\"\nbandwidth = {{ total = \"1 MB/s\" }}\n"
        );
        let e = errors(&text);
        let found = |key: &str, line: usize| e.iter().any(|e| e.key == key && e.line == line);
        assert!(found("service[0].bandwidth.per_connection", 5), "{e:?}");
        assert!(found("service[0].limits.per_client", 6), "{e:?}");
        assert!(found("service[0].limits.network", 6), "{e:?}");
        assert!(found("service[0].limits.refuse", 6), "{e:?}");
        assert!(found("service[0].rule[0].bandwidth", 8), "{e:?}");
        assert_eq!(e.len(), 5, "{e:?}");
        let e = errors(&format!("{WEB}bandwidth_up = {{ burst = \"1 MB\" }}\n"));
        assert_eq!((e[0].line, e[0].key.as_str()), (5, "service[0].bandwidth_up"), "{e:?}");
        let e = errors(&format!("{WEB}limits = {{ per_clients = 3 }}\n"));
        assert_eq!((e[0].line, e[0].message.contains("unknown field")), (5, true), "{e:?}");
    }

    #[test]
    fn bandwidths_take_bytes_and_bits() {
        assert_eq!(parse_bandwidth("10 MB/s"), Ok(10_000_000));
        assert_eq!(parse_bandwidth("64 KB/s"), Ok(64_000));
        assert_eq!(parse_bandwidth("512 KiB/s"), Ok(524_288));
        assert_eq!(parse_bandwidth("1 GB/s"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("80 Mbit/s"), Ok(10_000_000));
        assert_eq!(parse_bandwidth("1000/s"), Ok(1000));
        assert!(parse_bandwidth("10 MB").is_err());
        assert!(parse_bandwidth("0 MB/s").is_err());
        assert!(parse_bandwidth("fast/s").is_err());
    }

    #[test]
    fn session_rates_are_per_second_or_minute() {
        assert_eq!(parse_session_rate("20/s"), Ok(20));
        assert_eq!(parse_session_rate("600/m"), Ok(10));
        assert!(parse_session_rate("30/m").is_err());
        assert!(parse_session_rate("20").is_err());
    }
}
