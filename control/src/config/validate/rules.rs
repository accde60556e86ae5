//! Validation of firewall rules (`[[firewall]]` and `[[service.rule]]`): actions, client
//! networks and ports, listeners, SNI names, time windows in their time zone, and each
//! rule's bandwidth and capture; and of capture blocks (equal ones share one index).

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use sluice_engine::acl::{self, Action, ListenerMatch, NamePattern, Rule, TimeWindow};
use sluice_engine::capture::CaptureSpec;
use sluice_engine::shape::BandwidthSpec;
use toml::Spanned;

use super::shaping::BandwidthKeys;
use super::{text, Validator};
use crate::config::defaults::{MAX_BYTES, MAX_SNAPLEN, MIN_CAPTURE_SIZE, MIN_SNAPLEN};
use crate::config::schema::{CaptureSection, PortRange, RuleSection, Size};
use crate::config::spec::PoolSpec;
use crate::zones;

impl Validator<'_> {
    /// A capture configuration, by index among the distinct ones (equal ones share one).
    pub(super) fn capture(&mut self, raw: &Spanned<CaptureSection>, key: &str) -> Option<usize> {
        let before = self.errors.len();
        let c = raw.get_ref();
        let dir = c.dir.get_ref().trim();
        if dir.is_empty() {
            self.error(c.dir.span(), &format!("{key}.dir"), "must name a directory");
        } else if let Err(m) = text::printable(dir) {
            self.error(c.dir.span(), &format!("{key}.dir"), m);
        }
        let mut spec = CaptureSpec::new(PathBuf::from(dir));
        if let Some(n) = self.capture_size(&c.max_file, &format!("{key}.max_file")) {
            spec.max_file = n;
        }
        if let Some(n) = self.capture_size(&c.max_total, &format!("{key}.max_total")) {
            spec.max_total = n;
        }
        if let Some(s) = &c.snaplen {
            match *s.get_ref() {
                n @ MIN_SNAPLEN..=MAX_SNAPLEN => spec.snaplen = n as u32,
                _ => {
                    let message = format!("must be between {MIN_SNAPLEN} and {MAX_SNAPLEN} bytes");
                    self.error(s.span(), &format!("{key}.snaplen"), message);
                }
            }
        }
        if spec.max_total < spec.max_file {
            let span = c.max_total.as_ref().map_or(raw.span(), |t| t.span());
            let message = format!(
                "max_total ({} bytes) must be at least max_file ({} bytes)",
                spec.max_total, spec.max_file
            );
            self.error(span, &format!("{key}.max_total"), message);
        }
        if self.errors.len() != before {
            return None;
        }
        Some(self.captures.iter().position(|c| *c == spec).unwrap_or_else(|| {
            self.captures.push(spec);
            self.captures.len() - 1
        }))
    }

    fn capture_size(&mut self, value: &Option<Spanned<Size>>, key: &str) -> Option<u64> {
        let value = value.as_ref()?;
        let parsed = value.get_ref().bytes();
        match parsed {
            Ok(n) if (MIN_CAPTURE_SIZE..=MAX_BYTES).contains(&n) => Some(n),
            Ok(_) => {
                let message = format!("must be between {MIN_CAPTURE_SIZE} and {MAX_BYTES} bytes");
                self.error(value.span(), key, message);
                None
            }
            Err(message) => {
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// An ordered rule list; `prefix` names keys in errors, `scope` names rules without a
    /// `name` (`firewall.0`, `web.rule.2`).
    pub(super) fn rules(
        &mut self,
        prefix: &str,
        scope: &str,
        raw: &[RuleSection],
        pools: &[PoolSpec],
        fleet: u32,
    ) -> (Vec<Rule>, Vec<BandwidthSpec>) {
        let mut names = HashSet::new();
        let mut rules = Vec::new();
        let mut bandwidth = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let key = format!("{prefix}[{i}]");
            let keys = BandwidthKeys {
                both: r.bandwidth.as_ref(),
                up: r.bandwidth_up.as_ref(),
                down: r.bandwidth_down.as_ref(),
            };
            let spec = self.bandwidth(keys, &key, fleet);
            let Some(rule) = self.rule(&key, &format!("{scope}.{i}"), r, pools) else { continue };
            if !spec.is_empty() && !matches!(rule.action, Action::Allow { .. }) {
                self.error(
                    r.action.span(),
                    &format!("{key}.bandwidth"),
                    "bandwidth applies to allow rules only",
                );
            }
            bandwidth.push(spec);
            if !names.insert(rule.name.clone()) {
                let span = r.name.as_ref().map_or(r.action.span(), |n| n.span());
                let message = format!("duplicate rule name {:?}", rule.name);
                self.error(span, &format!("{key}.name"), message);
            }
            rules.push(rule);
        }
        (rules, bandwidth)
    }

    fn rule(
        &mut self,
        key: &str,
        default_name: &str,
        raw: &RuleSection,
        pools: &[PoolSpec],
    ) -> Option<Rule> {
        let before = self.errors.len();
        let k = |f: &str| format!("{key}.{f}");
        let action = self.action(raw, &k, pools);
        let name = raw.name.as_ref().map_or(default_name, |n| n.get_ref().as_str());
        if let Some(n) = &raw.name {
            if let Err(m) = text::name(n.get_ref()) {
                self.error(n.span(), &k("name"), m);
            }
        }
        let mut rule = Rule::new(name, action);
        rule.from = self.list(&raw.from, &k("from"), parse_net);
        rule.not_from = self.list(&raw.not_from, &k("not_from"), parse_net);
        rule.from_port = self.ports(&raw.from_port, &k("from_port"));
        rule.not_from_port = self.ports(&raw.not_from_port, &k("not_from_port"));
        rule.to = self.list(&raw.to, &k("to"), ListenerMatch::parse);
        rule.not_to = self.list(&raw.not_to, &k("not_to"), ListenerMatch::parse);
        rule.sni = self.list(&raw.sni, &k("sni"), NamePattern::parse);
        rule.not_sni = self.list(&raw.not_sni, &k("not_sni"), NamePattern::parse);
        if let Some(c) = &raw.capture {
            if matches!(action, Action::Deny { .. }) {
                self.error(c.span(), &k("capture"), "a deny rule relays nothing to capture");
            }
            rule.capture = self.capture(c, &k("capture"));
        }
        if !raw.time.is_empty() || !raw.not_time.is_empty() {
            let zone = match &raw.timezone {
                Some(z) => {
                    zones::named(z.get_ref()).map_err(|m| self.error(z.span(), &k("timezone"), m))
                }
                None => {
                    zones::local().map_err(|m| self.error(raw.action.span(), &k("timezone"), m))
                }
            };
            if let Ok(zone) = zone {
                rule.time = self.list(&raw.time, &k("time"), |t| TimeWindow::parse(t, &zone));
                rule.not_time =
                    self.list(&raw.not_time, &k("not_time"), |t| TimeWindow::parse(t, &zone));
            }
        }
        self.silent(raw, &mut rule, &k);
        (self.errors.len() == before).then_some(rule)
    }

    /// `drop = "silent"`: a deny by source network only (the listeners' socket filter sees
    /// nothing else: no port, listener, time or name, and no reset, which needs a handshake).
    fn silent(&mut self, raw: &RuleSection, rule: &mut Rule, k: &dyn Fn(&str) -> String) {
        let Some(drop) = &raw.drop else { return };
        if drop.get_ref() != "silent" {
            let message = format!("unknown drop {:?}; expected \"silent\"", drop.get_ref());
            self.error(drop.span(), &k("drop"), message);
            return;
        }
        let problem = if !matches!(rule.action, Action::Deny { reset: false }) {
            Some("drop = \"silent\" applies to deny rules without reset")
        } else if !acl::silent::is_source_only(rule) {
            Some("drop = \"silent\" needs `from` and no other criterion (not_from, ports, to, time, sni): the socket filter sees only the source address, before the handshake")
        } else {
            None
        };
        match problem {
            Some(message) => self.error(drop.span(), &k("drop"), message),
            None => rule.silent = true,
        }
    }

    fn action(
        &mut self,
        raw: &RuleSection,
        k: &dyn Fn(&str) -> String,
        pools: &[PoolSpec],
    ) -> Action {
        let reset = raw.reset.as_ref().map(|r| (*r.get_ref(), r.span()));
        match raw.action.get_ref().as_str() {
            "allow" => {
                if let Some((_, span)) = reset {
                    self.error(span, &k("reset"), "reset applies to deny rules only");
                }
                let pool = raw.pool.as_ref().and_then(|p| {
                    let found = pools.iter().position(|x| &x.name == p.get_ref());
                    if found.is_none() {
                        self.error(
                            p.span(),
                            &k("pool"),
                            format!("no [[pool]] named {:?}", p.get_ref()),
                        );
                    }
                    found
                });
                Action::Allow { pool }
            }
            "deny" => {
                if let Some(p) = &raw.pool {
                    self.error(p.span(), &k("pool"), "a deny rule sends nothing to a pool");
                }
                Action::Deny { reset: reset.is_some_and(|(r, _)| r) }
            }
            other => {
                let message = format!("unknown action {other:?}; expected \"allow\" or \"deny\"");
                self.error(raw.action.span(), &k("action"), message);
                Action::Deny { reset: false }
            }
        }
    }

    fn ports(&mut self, items: &[Spanned<PortRange>], key: &str) -> Vec<RangeInclusive<u16>> {
        items
            .iter()
            .filter_map(|item| {
                let parsed = match item.get_ref() {
                    PortRange::Number(n) => u16::try_from(*n)
                        .map(|p| p..=p)
                        .map_err(|_| format!("{n} is not a port (0-65535)")),
                    PortRange::Text(t) => acl::parse_port_range(t),
                };
                parsed.map_err(|m| self.error(item.span(), key, m)).ok()
            })
            .collect()
    }
}

/// Parses a client network: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub(super) fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let t = text.trim();
    if let Ok(net) = t.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from).map_err(|_| {
        format!("{text:?} is not a network such as \"10.0.0.0/8\", \"2001:db8::/32\" or an address")
    })
}
