//! Validation of one `[[service]]`: its name, listen addresses, backends or pool, PROXY
//! protocol sources, protocol and timeouts, and its rules, bandwidth, limits and capture
//! (validated by their own rooms).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use sluice_engine::acl::Action;
use sluice_engine::record::Protocol;
use sluice_engine::socket_options::{
    Keepalive, SideOptions, DEFAULT_BACKLOG, DEFAULT_KEEPALIVE_COUNT, DEFAULT_KEEPALIVE_IDLE,
    DEFAULT_KEEPALIVE_INTERVAL, MAX_BACKLOG, MAX_KEEPALIVE_COUNT, MAX_KEEPALIVE_SECS,
    MAX_USER_TIMEOUT, MIN_BACKLOG,
};
use sluice_engine::tables::{self, Listen, SniUnreadable, Timeouts, UdpUpstream};
use sluice_engine::udp::sources::SourcePool;
use toml::Spanned;

use super::rules::parse_net;
use super::shaping::BandwidthKeys;
use super::{text, Names, Validator};
use crate::admin::AdminAddr;
use crate::config::defaults::MAX_LISTEN_RANGE;
use crate::config::schema::{KeepaliveSection, ServiceSection};
use crate::config::spec::{PoolSpec, ServiceSpec};

impl Validator<'_> {
    pub(super) fn service(
        &mut self,
        i: usize,
        raw: &ServiceSection,
        admin: Option<&AdminAddr>,
        pools: &[PoolSpec],
        listens: &mut HashSet<(Protocol, SocketAddr)>,
    ) -> ServiceSpec {
        let key = |k: &str| format!("service[{i}].{k}");
        let name = raw.name.get_ref().trim().to_string();
        if let Err(m) = text::name(&name) {
            self.error(raw.name.span(), &key("name"), m);
        }
        let (protocol, udp_idle_timeout) = self.protocol(raw, &key);
        let listen = self.listen(raw, protocol, listens, &key);
        let (backends, pool) = match (&raw.backends, &raw.pool) {
            (Some(b), None) => (self.backends(b, &key("backends"), admin), None),
            (None, Some(p)) => {
                let found = pools.iter().position(|x| &x.name == p.get_ref());
                if found.is_none() {
                    self.error(
                        p.span(),
                        &key("pool"),
                        format!("no [[pool]] named {:?}", p.get_ref()),
                    );
                }
                (Vec::new(), found)
            }
            (Some(_), Some(p)) => {
                self.error(p.span(), &key("pool"), "give either backends or pool, not both");
                (Vec::new(), None)
            }
            (None, None) => {
                let message = "a service needs backends or a pool";
                self.error(raw.name.span(), &key("backends"), message);
                (Vec::new(), None)
            }
        };
        let accept_proxy = raw.accept_proxy.as_ref().map(|a| {
            if a.from.get_ref().is_empty() {
                let message = "list the trusted sources of PROXY headers";
                self.error(a.from.span(), &key("accept_proxy.from"), message);
            }
            self.list(a.from.get_ref(), &key("accept_proxy.from"), parse_net)
        });
        let udp_upstream = self.udp_upstream(raw, protocol, &key);
        let mut timeouts = Timeouts::default();
        for (field, slot, value) in [
            ("connect_timeout", &mut timeouts.connect, &raw.connect_timeout),
            ("idle_timeout", &mut timeouts.idle, &raw.idle_timeout),
            ("fin_timeout", &mut timeouts.fin, &raw.fin_timeout),
            ("sni_timeout", &mut timeouts.sni, &raw.sni_timeout),
            ("proxy_timeout", &mut timeouts.proxy, &raw.proxy_timeout),
        ] {
            if let Some(d) = value.as_ref().and_then(|d| self.duration(d, &key(field))) {
                *slot = d;
            }
        }
        let fleet = self.fleet_size(raw.limits.as_ref(), &format!("service[{i}]"));
        let (rules, rule_bandwidth) =
            self.rules(&key("rule"), &format!("{name}.rule"), &raw.rules, pools, fleet);
        let keys = BandwidthKeys {
            both: raw.bandwidth.as_ref(),
            up: raw.bandwidth_up.as_ref(),
            down: raw.bandwidth_down.as_ref(),
        };
        let bandwidth = self.bandwidth(keys, &format!("service[{i}]"), fleet);
        let limits = self.limits(raw.limits.as_ref(), &format!("service[{i}]"), fleet);
        timeouts.max_duration = limits.max_duration;
        let default = match raw.default.as_ref().map(|d| (d.get_ref().as_str(), d.span())) {
            None | Some(("allow", _)) => Action::Allow { pool: None },
            Some(("deny", _)) => Action::Deny { reset: false },
            Some(("reject", _)) => Action::Deny { reset: true },
            Some((other, span)) => {
                let message = format!("unknown default {other:?}; expected \"allow\", \"deny\" (close) or \"reject\" (reset)");
                self.error(span, &key("default"), message);
                Action::Allow { pool: None }
            }
        };
        let capture = raw.capture.as_ref().and_then(|c| self.capture(c, &key("capture")));
        let max_sessions = self
            .max_sessions(&raw.max_sessions, &key("max_sessions"))
            .map(|n| n.div_ceil(u64::from(fleet)));
        let sni_unreadable = raw.sni_unreadable.as_ref().and_then(|u| match u.get_ref().as_str() {
            "deny" => Some(SniUnreadable::Deny),
            "without_name" => Some(SniUnreadable::WithoutName),
            other => {
                let message = format!(
                    "unknown sni_unreadable {other:?}; expected \"deny\" or \"without_name\""
                );
                self.error(u.span(), &key("sni_unreadable"), message);
                None
            }
        });
        let (client_socket, backend_socket, backlog) = self.socket_options(raw, protocol, &key);
        ServiceSpec {
            client_socket,
            backend_socket,
            backlog,
            name,
            listen,
            backends,
            pool,
            accept_proxy,
            timeouts,
            protocol,
            udp_idle_timeout,
            udp_upstream,
            rules,
            default,
            rule_bandwidth,
            bandwidth,
            limits,
            capture,
            max_sessions,
            sni_unreadable,
        }
    }

    /// `listen`: each entry an address, a port range (one listener a port, at most
    /// [`MAX_LISTEN_RANGE`]) or a table with the interface to bind to, which must exist on
    /// this host (unless names are not resolved: then nothing is looked up). An address
    /// belongs to one service of a protocol.
    fn listen(
        &mut self,
        raw: &ServiceSection,
        protocol: Protocol,
        listens: &mut HashSet<(Protocol, SocketAddr)>,
        key: &dyn Fn(&str) -> String,
    ) -> Vec<Listen> {
        if raw.listen.get_ref().is_empty() {
            self.error(raw.listen.span(), &key("listen"), "at least one address is required");
        }
        let mut out = Vec::new();
        for entry in raw.listen.get_ref() {
            let span = entry.span();
            let addrs = match parse_listen(entry.get_ref().addr()) {
                Ok(addrs) => addrs,
                Err(message) => {
                    self.error(span, &key("listen"), message);
                    continue;
                }
            };
            let interface = entry.get_ref().interface();
            if let Some(name) = interface {
                if let Err(message) = self.interface(name) {
                    self.error(span.clone(), &key("listen.interface"), message);
                    continue;
                }
            }
            for addr in addrs {
                if !listens.insert((protocol, addr)) {
                    let message = format!("{addr} is already a listen address of another service");
                    self.error(span.clone(), &key("listen"), message);
                    continue;
                }
                out.push(Listen { addr, interface: interface.map(Into::into) });
            }
        }
        out
    }

    /// A network interface to bind a listener to: a valid name that exists on this host.
    fn interface(&self, name: &str) -> Result<(), String> {
        let valid = !name.is_empty()
            && name.len() < IFNAMSIZ
            && !name.contains(['/', ':'])
            && !name.chars().any(char::is_whitespace)
            && name != "."
            && name != "..";
        if !valid {
            return Err(format!(
                "{name:?} is not an interface name (1 to {} characters, no '/', ':' or spaces)",
                IFNAMSIZ - 1
            ));
        }
        if self.names == Names::Offline {
            return Ok(());
        }
        nix::net::if_::if_nametoindex(name)
            .map(drop)
            .map_err(|_| format!("no network interface named {name:?} on this host"))
    }

    /// The TCP options of each side and the listen backlog (TCP services only).
    fn socket_options(
        &mut self,
        raw: &ServiceSection,
        protocol: Protocol,
        key: &dyn Fn(&str) -> String,
    ) -> (SideOptions, SideOptions, u32) {
        let mut backlog = DEFAULT_BACKLOG;
        if protocol == Protocol::Udp {
            let spans = [
                raw.backlog.as_ref().map(|v| ("backlog", v.span())),
                raw.client_keepalive.as_ref().map(|v| ("client_keepalive", v.span())),
                raw.backend_keepalive.as_ref().map(|v| ("backend_keepalive", v.span())),
                raw.client_user_timeout.as_ref().map(|v| ("client_user_timeout", v.span())),
                raw.backend_user_timeout.as_ref().map(|v| ("backend_user_timeout", v.span())),
            ];
            for (field, span) in spans.into_iter().flatten() {
                self.error(span, &key(field), "applies to TCP services only");
            }
            return (SideOptions::default(), SideOptions::default(), backlog);
        }
        if let Some(n) = &raw.backlog {
            match u32::try_from(*n.get_ref()) {
                Ok(v @ MIN_BACKLOG..=MAX_BACKLOG) => backlog = v,
                _ => {
                    let message = format!(
                        "expected a number of queued connections from {MIN_BACKLOG} to {MAX_BACKLOG}"
                    );
                    self.error(n.span(), &key("backlog"), message);
                }
            }
        }
        let client = SideOptions {
            keepalive: raw
                .client_keepalive
                .as_ref()
                .and_then(|k| self.keepalive(k, &key("client_keepalive"))),
            user_timeout: raw
                .client_user_timeout
                .as_ref()
                .and_then(|d| self.user_timeout(d, &key("client_user_timeout"))),
        };
        let backend = SideOptions {
            keepalive: raw
                .backend_keepalive
                .as_ref()
                .and_then(|k| self.keepalive(k, &key("backend_keepalive"))),
            user_timeout: raw
                .backend_user_timeout
                .as_ref()
                .and_then(|d| self.user_timeout(d, &key("backend_user_timeout"))),
        };
        (client, backend, backlog)
    }

    /// A keepalive block: whole seconds within the kernel's bounds, a probe count within
    /// its bound; what is left out takes its default.
    fn keepalive(&mut self, raw: &Spanned<KeepaliveSection>, key: &str) -> Option<Keepalive> {
        let block = raw.get_ref();
        let mut seconds = |value: &Option<Spanned<String>>, field: &str, default: Duration| {
            let Some(value) = value else { return Some(default) };
            let key = format!("{key}.{field}");
            let d = self.duration(value, &key)?;
            if d.subsec_nanos() != 0 || d.as_secs() > MAX_KEEPALIVE_SECS {
                let message = format!(
                    "expected whole seconds from 1s to {MAX_KEEPALIVE_SECS}s (the kernel counts keepalive time in seconds)"
                );
                self.error(value.span(), &key, message);
                return None;
            }
            Some(d)
        };
        let idle = seconds(&block.idle, "idle", DEFAULT_KEEPALIVE_IDLE);
        let interval = seconds(&block.interval, "interval", DEFAULT_KEEPALIVE_INTERVAL);
        let count = match &block.count {
            None => Some(DEFAULT_KEEPALIVE_COUNT),
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(c @ 1..=MAX_KEEPALIVE_COUNT) => Some(c),
                _ => {
                    let message =
                        format!("expected a number of probes from 1 to {MAX_KEEPALIVE_COUNT}");
                    self.error(n.span(), &format!("{key}.count"), message);
                    None
                }
            },
        };
        Some(Keepalive { idle: idle?, interval: interval?, count: count? })
    }

    /// A TCP_USER_TIMEOUT: at least 1 ms, at most [`MAX_USER_TIMEOUT`].
    fn user_timeout(&mut self, value: &Spanned<String>, key: &str) -> Option<Duration> {
        let d = self.duration(value, key)?;
        if d < Duration::from_millis(1) || d > MAX_USER_TIMEOUT {
            self.error(value.span(), key, "expected a duration from 1ms to 24 days");
            return None;
        }
        Some(d)
    }

    /// `udp_upstream` and `udp_source`: shared sockets need one source prefix (at most one of
    /// each family); either key on a TCP service, or a source without sharing, is an error.
    fn udp_upstream(
        &mut self,
        raw: &ServiceSection,
        protocol: Protocol,
        key: &dyn Fn(&str) -> String,
    ) -> UdpUpstream {
        let mode = raw.udp_upstream.as_ref().map(|m| (m.get_ref().as_str(), m.span()));
        if protocol == Protocol::Tcp {
            let spans = [
                mode.map(|m| ("udp_upstream", m.1)),
                raw.udp_source.as_ref().map(|s| ("udp_source", s.span())),
            ];
            for (field, span) in spans.into_iter().flatten() {
                self.error(span, &key(field), "applies to protocol = \"udp\" services only");
            }
            return UdpUpstream::Connected;
        }
        let shared = match mode {
            None | Some(("connected", _)) => false,
            Some(("shared", _)) => true,
            Some((other, span)) => {
                let message =
                    format!("unknown udp_upstream {other:?}; expected \"connected\" or \"shared\"");
                self.error(span, &key("udp_upstream"), message);
                return UdpUpstream::Connected;
            }
        };
        let Some(list) = &raw.udp_source else {
            if let (true, Some((_, span))) = (shared, mode) {
                let message = "shared sockets need udp_source: the local prefix (IPv4, IPv6 or one of each) flows take their source addresses from";
                self.error(span, &key("udp_upstream"), message);
            }
            return UdpUpstream::Connected;
        };
        if !shared {
            let message = "applies to udp_upstream = \"shared\" only";
            self.error(list.span(), &key("udp_source"), message);
            return UdpUpstream::Connected;
        }
        let sources = self.list(list.get_ref(), &key("udp_source"), parse_net);
        let families = |v4: bool| sources.iter().filter(|n| n.network().is_ipv4() == v4).count();
        if sources.is_empty() || families(true) > 1 || families(false) > 1 {
            let message = "give one prefix, or one IPv4 and one IPv6 prefix";
            self.error(list.span(), &key("udp_source"), message);
        }
        UdpUpstream::Shared { sources }
    }

    /// Each `udp_source` prefix lends a worker's flows to one backend their addresses: it
    /// must hold more usable addresses than `max_flows`.
    pub(super) fn udp_sources_fit(
        &mut self,
        i: usize,
        raw: &ServiceSection,
        spec: &ServiceSpec,
        max_flows: usize,
    ) {
        let (UdpUpstream::Shared { sources }, Some(list)) = (&spec.udp_upstream, &raw.udp_source)
        else {
            return;
        };
        for net in sources {
            let usable = SourcePool::capacity(*net);
            if usable <= max_flows as u64 {
                let message = format!(
                    "{net} holds {usable} usable addresses; each worker may need max_flows + 1 = {} of them (a shorter prefix, or a lower engine.max_flows)",
                    max_flows + 1
                );
                self.error(list.span(), &format!("service[{i}].udp_source"), message);
            }
        }
    }

    /// `protocol` and the keys that apply to one protocol only.
    fn protocol(
        &mut self,
        raw: &ServiceSection,
        key: &dyn Fn(&str) -> String,
    ) -> (Protocol, Duration) {
        let protocol = match raw.protocol.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
            None | Some(("tcp", _)) => Protocol::Tcp,
            Some(("udp", _)) => Protocol::Udp,
            Some((other, span)) => {
                let message = format!("unknown protocol {other:?}; expected \"tcp\" or \"udp\"");
                self.error(span, &key("protocol"), message);
                Protocol::Tcp
            }
        };
        let mut idle = tables::DEFAULT_UDP_IDLE_TIMEOUT;
        match (protocol, &raw.udp_idle_timeout) {
            (Protocol::Udp, Some(d)) => {
                idle = self.duration(d, &key("udp_idle_timeout")).unwrap_or(idle);
            }
            (Protocol::Tcp, Some(d)) => {
                self.error(
                    d.span(),
                    &key("udp_idle_timeout"),
                    "applies to protocol = \"udp\" services only",
                );
            }
            _ => {}
        }
        if protocol == Protocol::Udp {
            for (field, value) in [
                ("connect_timeout", &raw.connect_timeout),
                ("idle_timeout", &raw.idle_timeout),
                ("fin_timeout", &raw.fin_timeout),
                ("sni_timeout", &raw.sni_timeout),
            ] {
                if let Some(v) = value {
                    let message = "applies to TCP services only (UDP flows use udp_idle_timeout)";
                    self.error(v.span(), &key(field), message);
                }
            }
        }
        (protocol, idle)
    }
}

/// Interface names are shorter than this many bytes (the kernel's IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Listen addresses: `ip:port`, or `ip:first-last` for one listener on each port of the
/// range (at most [`MAX_LISTEN_RANGE`] ports); see [`parse_listen_addr`] for each.
pub(super) fn parse_listen(text: &str) -> Result<Vec<SocketAddr>, String> {
    let Some((host, ports)) = text.rsplit_once(':').filter(|(_, p)| p.contains('-')) else {
        return parse_listen_addr(text).map(|a| vec![a]);
    };
    let bad = || {
        format!(
            "{text:?} is not a port range such as \"0.0.0.0:8000-8099\" (first port, then a last port not below it)"
        )
    };
    let (first, last) = ports.split_once('-').ok_or_else(bad)?;
    let (first, last): (u16, u16) =
        (first.trim().parse().map_err(|_| bad())?, last.trim().parse().map_err(|_| bad())?);
    if first > last {
        return Err(bad());
    }
    let count = usize::from(last - first) + 1;
    if count > MAX_LISTEN_RANGE {
        return Err(format!(
            "{text:?} spans {count} ports; a range may span at most {MAX_LISTEN_RANGE} (each port is a listener on every worker)"
        ));
    }
    let first = parse_listen_addr(&format!("{host}:{first}"))?;
    Ok((0..count).map(|i| SocketAddr::new(first.ip(), first.port() + i as u16)).collect())
}

/// A listen address: `ip:port` with a port other than 0 (each worker would bind a port of
/// its own, unlogged, and serve nothing) and not an IPv4-mapped IPv6 address (IPv6
/// listeners are v6-only, so the kernel refuses to bind one: listen on the IPv4 address).
fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        format!("{text:?} is not an address:port such as \"127.0.0.1:8080\" or \"[::1]:8080\"")
    })?;
    if addr.port() == 0 {
        return Err(format!("{text:?}: port 0 is not a listen port; give the port to listen on"));
    }
    if let SocketAddr::V6(v6) = addr {
        if let Some(v4) = v6.ip().to_ipv4_mapped() {
            return Err(format!(
                "{text:?} is an IPv4-mapped IPv6 address, which an IPv6-only listener cannot bind; write \"{v4}:{}\"",
                addr.port()
            ));
        }
    }
    Ok(addr)
}
