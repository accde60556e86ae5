//! Compiled, immutable tables: what the control thread publishes and workers read.
//!
//! A worker loads the current `Arc<Tables>` once per accepted connection; the session keeps
//! that `Arc` for its whole life, so a reload changes new sessions only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::accounting::AccountSpec;
use crate::acl::silent::{self, Instruction};
use crate::acl::{Action, Query, RuleSet};
use crate::balance::Pool;
use crate::capture::CapturePolicy;
use crate::counters::ServiceCounters;
use crate::limits::{LimitSpec, LimitState};
use crate::record::{Protocol, RecordPolicy};
use crate::shape::Bandwidth;
use crate::socket_options::{SideOptions, DEFAULT_BACKLOG};

/// Time allowed for a backend connect before the next backend is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A session with no byte moving in either direction for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// After one direction has closed (half-close), the session is closed after this long
/// without traffic.
pub const DEFAULT_FIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a session waits for the client's TLS ClientHello when the firewall matches on
/// SNI; after that it is decided as having none.
pub const DEFAULT_SNI_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a session on a listener that accepts PROXY protocol waits for the header;
/// after that it is closed as `proxy_error`.
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(3);
/// A UDP flow with no datagram in either direction for this long is closed.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A service has no session cap of its own unless configured: the engine-wide cap (and
/// the process's fd limit) bound it.
pub const DEFAULT_SERVICE_MAX_SESSIONS: Option<u64> = None;

/// The timeouts of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub idle: Duration,
    pub fin: Duration,
    pub sni: Duration,
    /// How long a session may last at most (a session limit); then it is cut.
    pub max_duration: Option<Duration>,
    pub proxy: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
            fin: DEFAULT_FIN_TIMEOUT,
            sni: DEFAULT_SNI_TIMEOUT,
            max_duration: None,
            proxy: DEFAULT_PROXY_TIMEOUT,
        }
    }
}

/// An ordered, compiled rule list with a verdict counter per rule.
#[derive(Debug)]
pub struct Rules {
    pub set: RuleSet,
    /// Verdicts per rule, by rule index; shared with the admin API and kept across reloads.
    pub hits: Vec<Arc<AtomicU64>>,
    /// The bandwidth block of each rule that has one, by rule index (a missing entry is
    /// none).
    pub bandwidth: Vec<Option<Arc<Bandwidth>>>,
}

impl Default for Rules {
    fn default() -> Self {
        Self { set: RuleSet::compile(Vec::new()), hits: Vec::new(), bandwidth: Vec::new() }
    }
}

impl Rules {
    /// Rules with fresh counters.
    pub fn new(set: RuleSet) -> Self {
        let hits = (0..set.len()).map(|_| Arc::default()).collect();
        Self { set, hits, bandwidth: Vec::new() }
    }

    /// The decision of rule `i`.
    fn decision(&self, i: usize) -> Decision {
        let rule = self.set.rule(i);
        Decision {
            action: rule.action,
            rule: Some(rule.name.clone()),
            bandwidth: self.bandwidth.get(i).cloned().flatten(),
            capture: rule.capture,
        }
    }

    /// The first matching rule, counted.
    fn decide(&self, q: &Query<'_>) -> Option<usize> {
        let i = self.set.decide(q)?;
        if let Some(h) = self.hits.get(i) {
            h.fetch_add(1, Ordering::Relaxed);
        }
        Some(i)
    }
}

/// What the firewall decided for one session.
#[derive(Debug, Clone)]
pub struct Decision {
    pub action: Action,
    /// The rule that decided; `None` for the service's default action.
    pub rule: Option<Arc<str>>,
    /// The deciding rule's bandwidth block, if it has one.
    pub bandwidth: Option<Arc<Bandwidth>>,
    /// The capture of an allowed session (the rule's, else the service's), by index into
    /// [`Tables::captures`].
    pub capture: Option<usize>,
}

/// A named pool of backends that firewall rules can send sessions to.
#[derive(Debug)]
pub struct NamedPool {
    pub name: Arc<str>,
    pub pool: Pool,
}

/// How the flows of a UDP service reach its backends (docs/UDP.md).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UdpUpstream {
    /// Each flow has its own socket connected to its backend: one fd a flow.
    #[default]
    Connected,
    /// The flows of a worker to one backend share one unconnected socket; each flow sends
    /// from its own address of these prefixes (at most one of each family), by which its
    /// replies are told apart. No fd a flow.
    Shared { sources: Vec<ipnet::IpNet> },
}

impl UdpUpstream {
    /// The prefix a shared flow to `backend` takes its source address from.
    pub fn source_for(&self, backend: SocketAddr) -> Option<ipnet::IpNet> {
        let UdpUpstream::Shared { sources } = self else { return None };
        sources.iter().copied().find(|n| n.network().is_ipv4() == backend.is_ipv4())
    }
}

/// One listening socket a service asks for: its address and, optionally, the network
/// interface it is bound to (SO_BINDTODEVICE: connections and datagrams that arrive on other
/// interfaces never reach it). Both make its identity across reloads and upgrades: a listener
/// whose interface changes is a new listener, bound afresh, and the old one is closed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Listen {
    pub addr: SocketAddr,
    pub interface: Option<Arc<str>>,
}

impl Listen {
    /// A listener on `addr`, on every interface.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, interface: None }
    }

    /// A listener on `addr` that only `interface` reaches.
    pub fn on(addr: SocketAddr, interface: &str) -> Self {
        Self { addr, interface: Some(interface.into()) }
    }
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr)
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.interface {
            Some(i) => write!(f, "{} on {i}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// One forwarding service: where it listens, who may reach it, and where it sends
/// connections.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// Its listeners; an address belongs to one service of a protocol.
    pub listen: Vec<Listen>,
    /// TCP (the default) or UDP; a UDP and a TCP service may share an address:port.
    pub protocol: Protocol,
    /// UDP services: a flow idle this long is closed.
    pub udp_idle_timeout: Duration,
    /// UDP services: how flows reach backends (a socket each, or sockets they share).
    pub udp_upstream: UdpUpstream,
    /// The backends of sessions that no rule sends elsewhere.
    pub pool: Pool,
    pub timeouts: Timeouts,
    /// The service's own rules, after the global firewall.
    pub rules: Rules,
    /// The action when no rule matches.
    pub default: Action,
    /// Sessions decided by the default action.
    pub default_hits: Arc<AtomicU64>,
    /// Shared with the admin API; carried over by name when tables are rebuilt.
    pub counters: Arc<ServiceCounters>,
    /// Session limits per client, per network, per time.
    pub limits: LimitSpec,
    /// Their shared counters; carried over by name like `counters`.
    pub limit_state: Arc<LimitState>,
    /// The service's bandwidth block, if it has one.
    pub bandwidth: Option<Arc<Bandwidth>>,
    /// Clients must open with a PROXY protocol header, and may connect only from these
    /// networks (trusted load balancers); `None`: no header is expected.
    pub accept_proxy: Option<Vec<ipnet::IpNet>>,
    /// Capture of sessions no rule captures: an index into [`Tables::captures`].
    pub capture: Option<usize>,
    /// Most sessions of this service at once, across workers; `None`: no cap. At the cap
    /// its listeners stop accepting (connections wait in the kernel's backlog).
    pub max_sessions: Option<u64>,
    /// What a session whose ClientHello cannot be read gets, when its rules read server
    /// names; `None`: [`SniUnreadable::Deny`] if a rule denies by name, else
    /// [`SniUnreadable::WithoutName`].
    pub sni_unreadable: Option<SniUnreadable>,
    /// TCP options of client sockets (set on the listeners, which accepted sockets inherit).
    pub client_socket: SideOptions,
    /// TCP options of backend sockets.
    pub backend_socket: SideOptions,
    /// Accept backlog of each of its TCP listeners.
    pub backlog: u32,
}

/// What a session gets whose TLS server name its rules need but cannot have: a hello
/// larger than [`crate::sni::MAX_CLIENT_HELLO`], one not whole by the SNI timeout (or no
/// bytes by then), or one whose name is not a host name. A client controls all three, so
/// judging it as if it had sent no name lets it past a rule that denies its real name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniUnreadable {
    /// Denied (closed without a byte), recorded with the rule [`SNI_UNREADABLE_RULE`].
    Deny,
    /// Judged by the rules as a session without a server name.
    WithoutName,
}

/// The rule a record names for a session denied by [`SniUnreadable::Deny`].
pub const SNI_UNREADABLE_RULE: &str = "sni_unreadable";

impl Service {
    /// A service that allows every client to its pool.
    pub fn new(name: &str, listen: Vec<SocketAddr>, pool: Pool, timeouts: Timeouts) -> Self {
        Self {
            name: name.into(),
            listen: listen.into_iter().map(Listen::new).collect(),
            protocol: Protocol::Tcp,
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            udp_upstream: UdpUpstream::Connected,
            pool,
            timeouts,
            rules: Rules::default(),
            default: Action::Allow { pool: None },
            default_hits: Arc::default(),
            counters: Arc::default(),
            limits: LimitSpec::default(),
            limit_state: Arc::default(),
            bandwidth: None,
            accept_proxy: None,
            capture: None,
            max_sessions: DEFAULT_SERVICE_MAX_SESSIONS,
            sni_unreadable: None,
            client_socket: SideOptions::default(),
            backend_socket: SideOptions::default(),
            backlog: DEFAULT_BACKLOG,
        }
    }
}

/// Everything a worker needs to decide a new connection, in one immutable value.
#[derive(Debug)]
pub struct Tables {
    /// Increases with every publication; recorded on each session.
    pub version: u64,
    services: Vec<Service>,
    by_listener: HashMap<SocketAddr, usize>,
    /// Listen addresses of UDP services.
    by_udp_listener: HashMap<SocketAddr, usize>,
    /// Which records workers produce besides close records.
    pub records: RecordPolicy,
    /// Global rules, evaluated before each service's own.
    pub firewall: Rules,
    /// Named pools, by index (as [`Action::Allow`] names them).
    pub pools: Vec<NamedPool>,
    /// Capture configurations, by index (as rules and services name them).
    pub captures: Vec<Arc<CapturePolicy>>,
    /// Per-client accounting of TCP sessions; `None`: off (no admin API to show it).
    pub accounting: Option<AccountSpec>,
    /// [`SNI_UNREADABLE_RULE`], made once so that a denial allocates nothing.
    sni_unreadable_rule: Arc<str>,
}

impl Tables {
    /// Builds tables from services. Listen addresses must be unique across services of one
    /// protocol (the control crate validates this and reports it with file and line).
    pub fn new(version: u64, services: Vec<Service>) -> Self {
        let index = |protocol: Protocol| {
            services
                .iter()
                .enumerate()
                .filter(|(_, s)| s.protocol == protocol)
                .flat_map(|(i, s)| s.listen.iter().map(move |l| (l.addr, i)))
                .collect()
        };
        let by_listener = index(Protocol::Tcp);
        let by_udp_listener = index(Protocol::Udp);
        Self {
            version,
            services,
            by_listener,
            by_udp_listener,
            records: RecordPolicy::default(),
            firewall: Rules::default(),
            pools: Vec::new(),
            captures: Vec::new(),
            accounting: None,
            sni_unreadable_rule: SNI_UNREADABLE_RULE.into(),
        }
    }

    /// The same tables with per-client accounting (`None`: off). Every service's limit
    /// state keys its accounted networks by the spec's prefixes.
    pub fn with_accounting(mut self, accounting: Option<AccountSpec>) -> Self {
        if let Some(a) = &accounting {
            for s in &self.services {
                s.limit_state.set_account_prefixes(a.network_v4, a.network_v6);
            }
        }
        self.accounting = accounting;
        self
    }

    /// The same tables with capture configurations.
    pub fn with_captures(mut self, captures: Vec<Arc<CapturePolicy>>) -> Self {
        self.captures = captures;
        self
    }

    /// The same tables with a global firewall and named pools.
    pub fn with_firewall(mut self, firewall: Rules, pools: Vec<NamedPool>) -> Self {
        self.firewall = firewall;
        self.pools = pools;
        self
    }

    /// Whether deciding a session of `service` needs the client's TLS server name.
    pub fn needs_sni(&self, service: usize) -> bool {
        self.firewall.set.needs_sni() || self.services[service].rules.set.needs_sni()
    }

    /// What a session of `service` gets when its ClientHello cannot be read.
    pub fn sni_unreadable(&self, service: usize) -> SniUnreadable {
        let s = &self.services[service];
        s.sni_unreadable.unwrap_or(
            if self.firewall.set.denies_by_sni() || s.rules.set.denies_by_sni() {
                SniUnreadable::Deny
            } else {
                SniUnreadable::WithoutName
            },
        )
    }

    /// The decision for a session denied by [`SniUnreadable::Deny`].
    pub fn sni_unreadable_denial(&self) -> Decision {
        Decision {
            action: Action::Deny { reset: false },
            rule: Some(self.sni_unreadable_rule.clone()),
            bandwidth: None,
            capture: None,
        }
    }

    /// The silent-drop socket filter of a listener of `service` (IPv6 or not), if one has
    /// anything to drop. None on a listener that accepts PROXY headers: its packets come
    /// from the load balancers, not the clients the rules name. A program too long for the
    /// kernel (validation refuses those) is left out, and logged.
    pub fn silent_filter(&self, service: usize, ipv6: bool) -> Option<Vec<Instruction>> {
        let s = &self.services[service];
        if s.accept_proxy.is_some() {
            return None;
        }
        let rules = (0..self.firewall.set.len()).map(|i| self.firewall.set.rule(i));
        let own = (0..s.rules.set.len()).map(|i| s.rules.set.rule(i));
        silent::program(rules.chain(own), ipv6)
            .map_err(|e| log::warn!("service {}: no silent-drop filter: {e}", s.name))
            .ok()
            .flatten()
    }

    /// The firewall's decision: the global rules, then the service's, then its default.
    pub fn judge(&self, service: usize, q: &Query<'_>) -> Decision {
        let s = &self.services[service];
        let decided = |rules: &Rules, i: usize| Decision {
            capture: rules.set.rule(i).capture.or(s.capture),
            ..rules.decision(i)
        };
        if let Some(i) = self.firewall.decide(q) {
            return decided(&self.firewall, i);
        }
        if let Some(i) = s.rules.decide(q) {
            return decided(&s.rules, i);
        }
        s.default_hits.fetch_add(1, Ordering::Relaxed);
        Decision { action: s.default, rule: None, bandwidth: None, capture: s.capture }
    }

    /// The pool a decision sends a new session or flow of `service` to: the rule's named
    /// pool, or the service's own.
    pub fn pool_for(&self, service: usize, decision: &Decision) -> &Pool {
        let own = &self.services[service].pool;
        match decision.action {
            Action::Allow { pool: Some(i) } => self.pools.get(i).map_or(own, |p| &p.pool),
            _ => own,
        }
    }

    /// The same tables with a record policy.
    pub fn with_records(mut self, records: RecordPolicy) -> Self {
        self.records = records;
        self
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The TCP service that owns a listener address, by index.
    pub fn service_for(&self, listener: SocketAddr) -> Option<usize> {
        self.by_listener.get(&listener).copied()
    }

    /// The UDP service that owns a listen address, by index.
    pub fn udp_service_for(&self, listener: SocketAddr) -> Option<usize> {
        self.by_udp_listener.get(&listener).copied()
    }

    /// The service with this name.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| &*s.name == name)
    }

    /// Every TCP listener, in service order.
    pub fn listeners(&self) -> Vec<Listen> {
        self.listeners_of(Protocol::Tcp)
    }

    /// Every UDP listener, in service order.
    pub fn udp_listeners(&self) -> Vec<Listen> {
        self.listeners_of(Protocol::Udp)
    }

    /// Every TCP listen address, in service order.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners().into_iter().map(|l| l.addr).collect()
    }

    /// Every UDP listen address, in service order.
    pub fn udp_listen_addrs(&self) -> Vec<SocketAddr> {
        self.udp_listeners().into_iter().map(|l| l.addr).collect()
    }

    fn listeners_of(&self, protocol: Protocol) -> Vec<Listen> {
        let services = self.services.iter().filter(|s| s.protocol == protocol);
        services.flat_map(|s| s.listen.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Rule;
    use crate::balance::Backend;

    fn query(client: &str) -> Query<'static> {
        Query {
            client: client.parse().unwrap(),
            listener: "127.0.0.1:80".parse().unwrap(),
            now: 0,
            sni: None,
        }
    }

    #[test]
    fn global_rules_come_first_then_the_service_then_its_default() {
        let pool = || Pool::new(vec![Backend::new("127.0.0.1:1".parse().unwrap())]);
        let mut web =
            Service::new("web", vec!["127.0.0.1:80".parse().unwrap()], pool(), Timeouts::default());
        let mut office = Rule::new("office", Action::Allow { pool: Some(0) });
        office.from = vec!["127.0.0.2/32".parse().unwrap()];
        web.rules = Rules::new(RuleSet::compile(vec![office]));
        web.default = Action::Deny { reset: false };
        let mut block = Rule::new("block", Action::Deny { reset: true });
        block.from = vec!["127.0.0.3/32".parse().unwrap()];
        let named = vec![NamedPool { name: "office".into(), pool: pool() }];
        let t = Tables::new(1, vec![web])
            .with_firewall(Rules::new(RuleSet::compile(vec![block])), named);
        let d = t.judge(0, &query("127.0.0.3:5"));
        assert_eq!((d.action, d.rule.as_deref()), (Action::Deny { reset: true }, Some("block")));
        let d = t.judge(0, &query("127.0.0.2:5"));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Allow { pool: Some(0) }, Some("office"))
        );
        let d = t.judge(0, &query("127.0.0.9:5"));
        assert_eq!((d.action, d.rule), (Action::Deny { reset: false }, None));
        assert!(d.bandwidth.is_none());
        assert_eq!(t.firewall.hits[0].load(Ordering::Relaxed), 1);
        assert_eq!(t.services()[0].rules.hits[0].load(Ordering::Relaxed), 1);
        assert_eq!(t.services()[0].default_hits.load(Ordering::Relaxed), 1);
        assert!(!t.needs_sni(0));
    }
}
