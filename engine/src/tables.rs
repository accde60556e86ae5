//! Compiled, immutable tables: what the control thread publishes and workers read.
//!
//! A worker loads the current `Arc<Tables>` once per accepted connection; the session keeps
//! that `Arc` for its whole life, so a reload changes new sessions only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::acl::{Action, Query, RuleSet};
use crate::balance::Pool;
use crate::capture::CapturePolicy;
use crate::events::{RecordPolicy, ServiceCounters};
use crate::limits::{LimitSpec, LimitState};
use crate::shape::Bandwidth;

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

/// The transport a service forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Connections, relayed byte for byte by the worker's driver.
    #[default]
    Tcp,
    /// Datagrams, relayed per flow (client address:port) by the worker's UDP loop.
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}
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

/// One forwarding service: where it listens, who may reach it, and where it sends
/// connections.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub listen: Vec<SocketAddr>,
    /// TCP (the default) or UDP; a UDP and a TCP service may share an address:port.
    pub protocol: Protocol,
    /// UDP services: a flow idle this long is closed.
    pub udp_idle_timeout: Duration,
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
}

impl Service {
    /// A service that allows every client to its pool.
    pub fn new(name: &str, listen: Vec<SocketAddr>, pool: Pool, timeouts: Timeouts) -> Self {
        Self {
            name: name.into(),
            listen,
            protocol: Protocol::Tcp,
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
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
                .flat_map(|(i, s)| s.listen.iter().map(move |&a| (a, i)))
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
        }
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

    /// Every TCP listen address, in service order.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.addrs_of(Protocol::Tcp)
    }

    /// Every UDP listen address, in service order.
    pub fn udp_listen_addrs(&self) -> Vec<SocketAddr> {
        self.addrs_of(Protocol::Udp)
    }

    fn addrs_of(&self, protocol: Protocol) -> Vec<SocketAddr> {
        let services = self.services.iter().filter(|s| s.protocol == protocol);
        services.flat_map(|s| s.listen.iter().copied()).collect()
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
