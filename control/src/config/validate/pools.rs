//! Validation of `[[pool]]` sections and of backend lists (a pool's or a service's own):
//! algorithms, backend tables (weight, cap, backup), passive ejection, active health checks
//! and DNS discovery; and the resolution of backend addresses (`ip:port`, `host:port`,
//! `admin`).

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;

use sluice_engine::balance::{self, Algorithm, Ejection, HealthCheck};
use sluice_engine::socket_options::Source;
use toml::Spanned;

use super::{text, Names, Validator};
use crate::admin::AdminAddr;
use crate::config::defaults::{MAX_HEALTH_COUNT, MIN_HEALTH_COUNT};
use crate::config::schema::{BackendEntry, BackendTable, HealthSection, PoolSection};
use crate::config::spec::{BackendSpec, DnsSpec, PoolSpec};

impl Validator<'_> {
    pub(super) fn pools(
        &mut self,
        raw: &[PoolSection],
        admin: Option<&AdminAddr>,
    ) -> Vec<PoolSpec> {
        let mut names = HashSet::new();
        let mut pools = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let key = format!("pool[{i}]");
            let name = p.name.get_ref().trim().to_string();
            if let Err(m) = text::name(&name) {
                self.error(p.name.span(), &format!("{key}.name"), m);
            } else if !names.insert(name.clone()) {
                let message = format!("pool names must be unique ({name:?})");
                self.error(p.name.span(), &format!("{key}.name"), message);
            }
            pools.push(self.pool(&key, name, p, admin));
        }
        pools
    }

    fn pool(
        &mut self,
        key: &str,
        name: String,
        p: &PoolSection,
        admin: Option<&AdminAddr>,
    ) -> PoolSpec {
        let k = |f: &str| format!("{key}.{f}");
        let dns = self.dns(p, key);
        let discovered = p.dns.is_some() || p.srv.is_some();
        let backends = match (&p.backends, discovered) {
            (Some(b), false) => self.backends(b, &k("backends"), admin),
            (None, false) => {
                let message = "a pool needs backends, dns or srv";
                self.error(p.name.span(), &k("backends"), message);
                Vec::new()
            }
            (Some(b), true) => {
                self.error(b.span(), &k("backends"), "give either backends or dns/srv, not both");
                Vec::new()
            }
            (None, true) => Vec::new(),
        };
        let algorithm = self
            .parsed(&p.algorithm, &k("algorithm"), |t| t.parse::<Algorithm>())
            .unwrap_or_default();
        let send_proxy = self.parsed(&p.send_proxy, &k("send_proxy"), |t| t.parse());
        let source = self.parsed(&p.source, &k("source"), parse_source);
        let mut ejection = Ejection::default();
        if let Some(n) = &p.eject_after {
            match u32::try_from(*n.get_ref()) {
                Ok(n) => ejection.after = n,
                Err(_) => self.error(n.span(), &k("eject_after"), "must be 0 (off) or more"),
            }
        }
        if let Some(d) = p.eject_for.as_ref().and_then(|d| self.duration(d, &k("eject_for"))) {
            ejection.cooldown = d;
        }
        let health = p.health.as_ref().map(|h| self.health(h, &k("health")));
        PoolSpec { name, backends, algorithm, ejection, send_proxy, source, health, dns }
    }

    fn dns(&mut self, p: &PoolSection, key: &str) -> Option<DnsSpec> {
        let k = |f: &str| format!("{key}.{f}");
        let query = match (&p.dns, &p.srv) {
            (Some(_), None) => self.parsed(&p.dns, &k("dns"), crate::dns::Query::host)?,
            (None, Some(_)) => self.parsed(&p.srv, &k("srv"), crate::dns::Query::srv)?,
            (Some(_), Some(srv)) => {
                self.error(srv.span(), &k("srv"), "give either dns or srv, not both");
                return None;
            }
            (None, None) => {
                for (v, f) in [(&p.resolver, "resolver"), (&p.dns_interval, "dns_interval")] {
                    if let Some(v) = v {
                        self.error(v.span(), &k(f), "applies only to a pool with dns or srv");
                    }
                }
                return None;
            }
        };
        let resolver = self.parsed(&p.resolver, &k("resolver"), crate::dns::parse_resolver);
        let interval = p
            .dns_interval
            .as_ref()
            .and_then(|d| self.duration(d, &k("dns_interval")))
            .unwrap_or(crate::dns::DEFAULT_DNS_INTERVAL);
        Some(DnsSpec { query, resolver, interval })
    }

    fn health(&mut self, raw: &HealthSection, key: &str) -> HealthCheck {
        let k = |f: &str| format!("{key}.{f}");
        let mut h = HealthCheck::default();
        if let Some(d) = raw.interval.as_ref().and_then(|d| self.duration(d, &k("interval"))) {
            h.interval = d;
        }
        if let Some(d) = raw.timeout.as_ref().and_then(|d| self.duration(d, &k("timeout"))) {
            h.timeout = d;
        }
        for (value, field, slot) in
            [(&raw.rise, "rise", &mut h.rise), (&raw.fall, "fall", &mut h.fall)]
        {
            if let Some(v) = value {
                match u32::try_from(*v.get_ref()) {
                    Ok(n) if (MIN_HEALTH_COUNT..=MAX_HEALTH_COUNT).contains(&n) => *slot = n,
                    _ => {
                        let message = format!(
                            "must be a count from {MIN_HEALTH_COUNT} to {MAX_HEALTH_COUNT}"
                        );
                        self.error(v.span(), &k(field), message)
                    }
                }
            }
        }
        h.send = raw.send.clone().unwrap_or_default().into_bytes();
        h.expect = raw.expect.clone().unwrap_or_default().into_bytes();
        h
    }

    pub(super) fn backends(
        &mut self,
        raw: &Spanned<Vec<Spanned<BackendEntry>>>,
        key: &str,
        admin: Option<&AdminAddr>,
    ) -> Vec<BackendSpec> {
        if raw.get_ref().is_empty() {
            self.error(raw.span(), key, "at least one backend is required");
        }
        let mut out = Vec::new();
        for b in raw.get_ref() {
            let (text, template) = match b.get_ref() {
                BackendEntry::Addr(t) => {
                    (t, BackendSpec::plain(SocketAddr::from(([0, 0, 0, 0], 0))))
                }
                BackendEntry::Table(t) => match self.backend_table(t, b.span(), key) {
                    Some(spec) => (&t.addr, spec),
                    None => continue,
                },
            };
            self.admin_exposed |= text == "admin";
            match resolve(text, admin, self.names) {
                Ok(addrs) => out
                    .extend(addrs.into_iter().map(|addr| BackendSpec { addr, ..template.clone() })),
                Err(message) => self.error(b.span(), key, message),
            }
        }
        out
    }

    /// The weight, cap and role of a backend table (its address is resolved by the caller).
    fn backend_table(
        &mut self,
        t: &BackendTable,
        span: Range<usize>,
        key: &str,
    ) -> Option<BackendSpec> {
        let mut spec = BackendSpec::plain(SocketAddr::from(([0, 0, 0, 0], 0)));
        if let Some(w) = t.weight {
            match u32::try_from(w) {
                Ok(w) if (1..=balance::MAX_WEIGHT).contains(&w) => spec.weight = w,
                _ => {
                    let message = format!("weight must be from 1 to {}", balance::MAX_WEIGHT);
                    self.error(span, &format!("{key}.weight"), message);
                    return None;
                }
            }
        }
        if let Some(m) = t.max_sessions {
            match u64::try_from(m) {
                Ok(m) if m > 0 => spec.max_sessions = m,
                _ => {
                    self.error(span, &format!("{key}.max_sessions"), "must be 1 or more");
                    return None;
                }
            }
        }
        spec.backup = t.backup.unwrap_or(false);
        Some(spec)
    }
}

/// Resolves a backend written as `ip:port`, `host:port`, or `admin` (the admin API's TCP
/// address, so that a service with firewall rules can front it).
fn resolve(text: &str, admin: Option<&AdminAddr>, names: Names) -> Result<Vec<SocketAddr>, String> {
    if text == "admin" {
        return match admin {
            Some(AdminAddr::Tcp(addr)) => Ok(vec![*addr]),
            Some(AdminAddr::Unix(_)) => {
                Err("backend \"admin\" needs the admin API on a TCP address, not a unix socket"
                    .into())
            }
            None => Err("backend \"admin\" needs an [admin] section".into()),
        };
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if !text.contains(':') {
        return Err(format!("{text:?} has no port; write it as \"host:port\""));
    }
    if names == Names::Offline {
        return Err(format!("{text:?} is a host name, and names are not resolved here"));
    }
    match text.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            if addrs.is_empty() {
                Err(format!("{text:?} resolves to no address"))
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(format!("cannot resolve {text:?}: {e}")),
    }
}

/// A pool's `source`: `"client"` (the client's own address and port, IP_TRANSPARENT) or a
/// local address of this host.
fn parse_source(text: &str) -> Result<Source, String> {
    if text == "client" {
        return Ok(Source::Client);
    }
    text.parse::<std::net::IpAddr>().map(Source::Addr).map_err(|_| {
        format!(
            "{text:?} is neither \"client\" nor an address such as \"10.0.0.5\" or \"2001:db8::5\""
        )
    })
}
