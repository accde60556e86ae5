//! Validation of the `bandwidth`, `bandwidth_up`, `bandwidth_down` and `limits` blocks of
//! services and rules; errors name file, line and key like the rest of the config. Their
//! rate syntax is parsed in [`crate::config::units`].
//!
//! A service's `limits.fleet_size = N` says N instances share its limits: what is shared
//! by many sessions (per-client and per-network counts, the per-client rate and its burst,
//! per-client and total bandwidth and their bursts, the service's `max_sessions`) is
//! divided by N, counts rounded up and never below 1, rates exactly (N times the period);
//! what belongs to one session (`per_connection` bandwidth, `max_bytes`, `max_duration`)
//! is not, since a session lives on one instance.

use std::time::Duration;

use sluice_engine::limits::{LimitSpec, DEFAULT_NETWORK_V4, DEFAULT_NETWORK_V6};
use sluice_engine::shape::{BandwidthSpec, Rate};
use toml::Spanned;

use super::Validator;
use crate::config::defaults::{
    DEFAULT_RATE_BURST, MAX_BANDWIDTH, MAX_BYTES, MAX_FLEET_SIZE, MAX_SESSION_RATE,
};
use crate::config::schema::{BandwidthSection, LimitsSection, Size};
use crate::config::units::{parse_bandwidth, parse_session_rate};

/// The three bandwidth keys of a service or rule.
pub(super) struct BandwidthKeys<'a> {
    pub both: Option<&'a Spanned<BandwidthSection>>,
    pub up: Option<&'a Spanned<BandwidthSection>>,
    pub down: Option<&'a Spanned<BandwidthSection>>,
}

impl Validator<'_> {
    /// Compiles a service's or rule's bandwidth keys (`key` is its key prefix). A
    /// direction's own block replaces `bandwidth` for that direction. `per_client` and
    /// `total` (and their burst) are shared by `fleet` instances, each taking its share.
    pub(super) fn bandwidth(
        &mut self,
        raw: BandwidthKeys<'_>,
        key: &str,
        fleet: u32,
    ) -> BandwidthSpec {
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
            let mut rate = |field: &Option<Spanned<String>>, f: &str, share: u32| {
                let value = field.as_ref()?;
                match parse_bandwidth(value.get_ref()) {
                    Ok(per) if per.per_second() > MAX_BANDWIDTH as f64 => {
                        let message = format!("must be at most {MAX_BANDWIDTH} B/s (1 PiB/s)");
                        self.error(value.span(), &k(f), message);
                        None
                    }
                    Ok(per) => {
                        let rate = Rate::bandwidth_per(per.count, fleet_period(per.period, share));
                        let burst = burst.map(|b| b.div_ceil(u64::from(share)));
                        Some(burst.map_or(rate, |b| rate.with_burst(b)))
                    }
                    Err(m) => {
                        self.error(value.span(), &k(f), m);
                        None
                    }
                }
            };
            let per_connection = rate(&b.per_connection, "per_connection", 1);
            let per_client = rate(&b.per_client, "per_client", fleet);
            let total = rate(&b.total, "total", fleet);
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

    /// A service's `limits.fleet_size`: the instances that share its limits (1 when not
    /// given).
    pub(super) fn fleet_size(&mut self, raw: Option<&LimitsSection>, key: &str) -> u32 {
        let Some(value) = raw.and_then(|r| r.fleet_size.as_ref()) else { return 1 };
        match u32::try_from(*value.get_ref()) {
            Ok(n) if (1..=MAX_FLEET_SIZE).contains(&n) => n,
            _ => {
                let message = format!("must be a number of instances from 1 to {MAX_FLEET_SIZE}");
                self.error(value.span(), &format!("{key}.limits.fleet_size"), message);
                1
            }
        }
    }

    /// Compiles a service's `limits` block; counts and rates are this instance's share of
    /// `fleet`.
    pub(super) fn limits(
        &mut self,
        raw: Option<&LimitsSection>,
        key: &str,
        fleet: u32,
    ) -> LimitSpec {
        let mut spec = LimitSpec {
            network_v4: DEFAULT_NETWORK_V4,
            network_v6: DEFAULT_NETWORK_V6,
            ..LimitSpec::default()
        };
        let Some(raw) = raw else { return spec };
        let k = |f: &str| format!("{key}.limits.{f}");
        let share = |n: u32| n.div_ceil(fleet);
        spec.per_client =
            raw.per_client.as_ref().and_then(|n| self.count(n, &k("per_client"))).map(share);
        spec.per_network =
            raw.per_network.as_ref().and_then(|n| self.count(n, &k("per_network"))).map(share);
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
                Ok(per) if per.per_second() > MAX_SESSION_RATE as f64 => {
                    let message = format!("must be at most {MAX_SESSION_RATE} per second");
                    self.error(r.span(), &k("rate_per_client"), message);
                }
                Ok(per) => {
                    let burst = burst.unwrap_or(DEFAULT_RATE_BURST).div_ceil(u64::from(fleet));
                    let period = fleet_period(per.period, fleet);
                    spec.client_rate = Some(Rate::new(per.count, period, burst));
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
            Ok(n) if n > MAX_BYTES => {
                self.error(value.span(), key, format!("must be at most {MAX_BYTES} bytes (1 PiB)"));
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

/// The period of one instance's share of a rate shared by `fleet` instances: the same
/// count in `fleet` times the time, which divides the rate exactly.
fn fleet_period(period: Duration, fleet: u32) -> Duration {
    period.checked_mul(fleet).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use sluice_engine::shape::Rate;
    use std::time::Duration;

    use crate::config::defaults::DEFAULT_RATE_BURST;

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
        let r = |per_sec| Some(Rate::per_second(per_sec, 256_000));
        assert_eq!(web.bandwidth.per_connection, [r(10_000_000), r(10_000_000)]);
        assert_eq!(web.bandwidth.total, [r(1_000_000_000), r(1_000_000_000)]);
        assert_eq!(web.bandwidth.per_client, [None, Some(Rate::bandwidth(10_000_000))]);
        let l = web.limits;
        assert_eq!(
            (l.per_client, l.per_network, l.network_v4, l.network_v6),
            (Some(10), Some(100), 16, 64)
        );
        assert_eq!(l.client_rate, Some(Rate::per_second(20, DEFAULT_RATE_BURST)));
        assert_eq!((l.max_bytes, l.reset), (Some(1_000_000_000), true));
        assert_eq!(web.timeouts.max_duration, Some(Duration::from_secs(3600)));
        assert_eq!(web.rule_bandwidth[0].total, [Some(Rate::bandwidth(1_000_000)), None]);
    }

    #[test]
    fn session_rates_and_bit_rates_are_exact() {
        let limits = |rate: &str| {
            let text = format!("{WEB}limits = {{ rate_per_client = {rate:?} }}\n");
            Config::parse("test.toml", &text).map(|c| c.services[0].limits.client_rate)
        };
        let minute = Duration::from_secs(60);
        assert_eq!(limits("90/m").unwrap(), Some(Rate::new(3, Duration::from_secs(2), 1)));
        assert_eq!(limits("30/m").unwrap(), Some(Rate::new(30, minute, 1)), "0.5 per second");
        let text = format!("{WEB}bandwidth = {{ per_connection = \"12 bit/s\" }}\n");
        let c = Config::parse("test.toml", &text).unwrap();
        let rate = c.services[0].bandwidth.per_connection[0].unwrap();
        assert_eq!(rate.units_in(Duration::from_secs(2)), 3, "1.5 B/s");
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
        for bad in ["0", "1025", "-2"] {
            let e = errors(&format!("{WEB}limits = {{ fleet_size = {bad} }}\n"));
            let e: Vec<_> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
            assert_eq!(e, [(5, "service[0].limits.fleet_size")], "fleet_size = {bad}");
        }
    }

    /// `fleet_size = 4`: what many sessions share is divided by 4 (counts rounded up,
    /// rates exactly, default bursts recomputed from the divided rate); what belongs to one
    /// session is not.
    #[test]
    fn fleet_size_divides_shared_limits_and_rates_only() {
        let limits = "limits = { per_client = 10, per_network = 100, rate_per_client = \"20/s\", \
                      rate_burst = 6, max_bytes = \"1 GB\", max_duration = \"1h\", FLEET }";
        let text = format!(
            "{WEB}max_sessions = 1001\n{limits}\n\
             bandwidth = {{ per_connection = \"10 MB/s\", per_client = \"4 MB/s\", total = \"1 GB/s\" }}\n\
             bandwidth_down = {{ total = \"100 MB/s\", burst = \"1 MB\" }}\n\
             [[service.rule]]\naction = \"allow\"\nbandwidth_up = {{ total = \"8 MB/s\" }}\n"
        );
        let one = Config::parse("test.toml", &text.replace(", FLEET", "")).unwrap();
        let four = Config::parse("test.toml", &text.replace("FLEET", "fleet_size = 4")).unwrap();
        let (one, four) = (&one.services[0], &four.services[0]);
        let (l1, l4) = (one.limits, four.limits);
        assert_eq!((l1.per_client, l1.per_network), (Some(10), Some(100)));
        assert_eq!((l4.per_client, l4.per_network), (Some(3), Some(25)));
        assert_eq!(l1.client_rate, Some(Rate::per_second(20, 6)));
        assert_eq!(l4.client_rate, Some(Rate::per_second(5, 2)));
        assert_eq!((l4.max_bytes, l4.max_duration), (l1.max_bytes, l1.max_duration));
        assert_eq!((one.max_sessions, four.max_sessions), (Some(1001), Some(251)));
        let b = &four.bandwidth;
        assert_eq!(b.per_connection, one.bandwidth.per_connection, "one session's own");
        assert_eq!(b.per_client, [Some(Rate::bandwidth(1_000_000)); 2]);
        assert_eq!(b.total[0], Some(Rate::bandwidth(250_000_000)));
        assert_eq!(b.total[1], Some(Rate::bandwidth(25_000_000).with_burst(250_000)));
        assert_eq!(four.rule_bandwidth[0].total[0], Some(Rate::bandwidth(2_000_000)));
        // A rate that does not divide evenly is still exact: 20/s over 3 is 20 per 3 s.
        let three = Config::parse("test.toml", &text.replace("FLEET", "fleet_size = 3")).unwrap();
        let rate = three.services[0].limits.client_rate.unwrap();
        assert_eq!(rate.units_in(Duration::from_secs(3)), 20);
        assert_eq!(three.services[0].limits.per_client, Some(4), "10 / 3 rounded up");
    }
}
