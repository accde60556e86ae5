//! Firewall rules: an ordered list of [`Rule`]s, first match wins, compiled into a [`RuleSet`]
//! whose verdict cost does not grow with the number of network rules. Rooms: this module
//! (rules, queries, the compiled set), [`listener`] (`to`, ports), [`name`] (SNI patterns),
//! [`window`] (time windows and zones), `trie` (the index over `from`), [`silent`] (the
//! socket filter of silent drops).
//!
//! A rule's criteria are all optional; every criterion present must hold (AND), each list is an
//! OR of its entries, and a `not_*` list holds when none of its entries match. A rule with no
//! criteria matches everything.
//!
//! Invariants:
//! - Matching is pure: no I/O, the time of the query is passed in as unix seconds. Only the
//!   [`Zone`] constructors read zone files, once, while the configuration is compiled.
//! - [`RuleSet::decide`] returns exactly what [`decide_linear`] returns for every query; the
//!   property test below checks it on random rule sets.
//! - Client and listener addresses are canonical before matching: an IPv4-mapped IPv6 address
//!   (`::ffff:a.b.c.d`) is the IPv4 address it carries, and a v6 network inside
//!   `::ffff:0:0/96` is the IPv4 network it maps.
//! - A query without SNI (not TLS, or no `server_name`) fails `sni` and passes `not_sni`.
//!
//! The compiled matcher keeps one path-compressed binary trie per address family over the
//! `from` prefixes, in a `Vec` arena with `u32` links. Each node lists, in rule order, the rules
//! whose `from` holds exactly its prefix. A verdict walks the client address down its trie (at
//! most 33 or 129 nodes), then the rules without `from`; in each list it tries candidates in
//! rule order, below the best rule found so far, against their other criteria.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};

mod listener;
mod name;
pub mod silent;
#[cfg(test)]
mod tests;
mod trie;
mod window;

pub use self::listener::{parse_port_range, ListenerMatch};
pub use self::name::NamePattern;
pub use self::window::{TimeWindow, Zone};

use self::trie::{PrefixTrie, TrieBuilder};
use self::window::Clock;

/// What a matching rule does with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Relay to the pool with this index among the service's named pools; `None` is the
    /// service's default pool.
    Allow { pool: Option<usize> },
    /// Close at once without a byte; with `reset`, close with an RST.
    Deny { reset: bool },
}

/// One firewall rule. Every list is optional (empty means "no such criterion").
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub action: Action,
    /// Client networks (v4 and v6; a single address is a /32 or /128).
    pub from: Vec<IpNet>,
    pub not_from: Vec<IpNet>,
    /// Client source ports.
    pub from_port: Vec<RangeInclusive<u16>>,
    pub not_from_port: Vec<RangeInclusive<u16>>,
    /// The listener address and/or port the client reached.
    pub to: Vec<ListenerMatch>,
    pub not_to: Vec<ListenerMatch>,
    pub time: Vec<TimeWindow>,
    pub not_time: Vec<TimeWindow>,
    /// TLS server names, read from the ClientHello.
    pub sni: Vec<NamePattern>,
    pub not_sni: Vec<NamePattern>,
    /// Capture of the sessions this rule allows: an index into the tables' captures.
    pub capture: Option<usize>,
    /// `drop = "silent"`: a deny by `from` only whose sources the listeners' socket filter
    /// drops before the handshake ([`silent`]); what reaches the rule anyway is denied.
    pub silent: bool,
}

impl Rule {
    /// A rule with no criteria: it matches every connection.
    pub fn new(name: &str, action: Action) -> Rule {
        Rule {
            name: Arc::from(name),
            action,
            from: Vec::new(),
            not_from: Vec::new(),
            from_port: Vec::new(),
            not_from_port: Vec::new(),
            to: Vec::new(),
            not_to: Vec::new(),
            time: Vec::new(),
            not_time: Vec::new(),
            sni: Vec::new(),
            not_sni: Vec::new(),
            capture: None,
            silent: false,
        }
    }

    /// Whether every criterion of this rule holds for `q`.
    pub fn matches(&self, q: &Query) -> bool {
        let client = q.client.ip().to_canonical();
        let mut clock = Clock::new(q.now);
        criterion(&self.from, &[], |net| net_contains(net, client))
            && self.holds_except_from(q, &mut clock)
    }

    /// Whether the rule reads the TLS server name.
    pub fn needs_sni(&self) -> bool {
        !self.sni.is_empty() || !self.not_sni.is_empty()
    }

    /// Whether judging a session without its server name could let through one that its
    /// name would have denied: a deny rule on `sni`, or an allow rule on `not_sni` (no name
    /// passes `not_sni`).
    pub fn denies_by_sni(&self) -> bool {
        match self.action {
            Action::Deny { .. } => !self.sni.is_empty(),
            Action::Allow { .. } => !self.not_sni.is_empty(),
        }
    }

    /// Whether the rule has criteria other than `from`.
    fn has_more_than_from(&self) -> bool {
        !(self.not_from.is_empty()
            && self.from_port.is_empty()
            && self.not_from_port.is_empty()
            && self.to.is_empty()
            && self.not_to.is_empty()
            && self.time.is_empty()
            && self.not_time.is_empty()
            && self.sni.is_empty()
            && self.not_sni.is_empty())
    }

    /// Every criterion but the positive `from` list, which the caller has checked.
    fn holds_except_from<'r>(&'r self, q: &Query, clock: &mut Clock<'r>) -> bool {
        let client = q.client.ip().to_canonical();
        let port = q.client.port();
        criterion(&[], &self.not_from, |net| net_contains(net, client))
            && criterion(&self.from_port, &self.not_from_port, |r| r.contains(&port))
            && criterion(&self.to, &self.not_to, |m| m.matches(q.listener))
            && criterion(&self.sni, &self.not_sni, |p| q.sni.is_some_and(|n| p.matches(n)))
            && criterion(&self.time, &self.not_time, |w| w.contains_at(clock.local(w.zone())))
    }
}

/// One criterion: `yes` is empty or one of its entries hits, and none of `no` hits.
fn criterion<'r, T>(yes: &'r [T], no: &'r [T], mut hit: impl FnMut(&'r T) -> bool) -> bool {
    (yes.is_empty() || yes.iter().any(&mut hit)) && !no.iter().any(hit)
}

/// `client` must already be canonical.
fn net_contains(net: &IpNet, client: IpAddr) -> bool {
    canonical_net(*net).contains(&client)
}

/// A v6 network inside `::ffff:0:0/96` becomes the IPv4 network it maps; others are unchanged.
fn canonical_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    let Some(v4) = v6.network().to_ipv4_mapped() else { return net };
    match v6.prefix_len().checked_sub(96) {
        Some(len) => Ipv4Net::new(v4, len).map_or(net, IpNet::V4),
        None => net,
    }
}

/// What a verdict is asked about: one new connection.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub client: SocketAddr,
    /// The local address of the accepted socket.
    pub listener: SocketAddr,
    /// Unix seconds, UTC.
    pub now: i64,
    /// The TLS server name, if the worker read one.
    pub sni: Option<&'a str>,
}

/// The reference evaluation: the index of the first rule whose criteria all hold.
pub fn decide_linear(rules: &[Rule], q: &Query) -> Option<usize> {
    rules.iter().position(|rule| rule.matches(q))
}

/// Rules compiled for fast verdicts; immutable once built.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Per rule: whether it has criteria besides `from` (if not, reaching it is a match).
    checks: Vec<bool>,
    trie: PrefixTrie,
    /// Rules without a `from` criterion, in order.
    unrestricted: Vec<u32>,
    needs_sni: bool,
    denies_by_sni: bool,
}

impl RuleSet {
    /// Compiles `rules`, kept in their order.
    ///
    /// # Panics
    /// With `u32::MAX` rules or more.
    pub fn compile(rules: Vec<Rule>) -> RuleSet {
        assert!(rules.len() < u32::MAX as usize, "too many rules");
        let mut builder = TrieBuilder::new();
        let mut unrestricted = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            if rule.from.is_empty() {
                unrestricted.push(i as u32);
            }
            for net in &rule.from {
                builder.insert(canonical_net(*net), i as u32);
            }
        }
        RuleSet {
            checks: rules.iter().map(Rule::has_more_than_from).collect(),
            needs_sni: rules.iter().any(Rule::needs_sni),
            denies_by_sni: rules.iter().any(Rule::denies_by_sni),
            trie: builder.finish(),
            unrestricted,
            rules,
        }
    }

    /// The index of the first rule whose criteria all hold for `q`, if any.
    pub fn decide(&self, q: &Query) -> Option<usize> {
        let mut clock = Clock::new(q.now);
        let mut best = u32::MAX;
        self.trie.walk(q.client.ip().to_canonical(), |candidates| {
            self.scan(candidates, q, &mut clock, &mut best);
        });
        self.scan(&self.unrestricted, q, &mut clock, &mut best);
        (best != u32::MAX).then_some(best as usize)
    }

    /// Lowers `best` to the first of `candidates` (in rule order) below it whose remaining
    /// criteria hold.
    fn scan<'r>(&'r self, candidates: &[u32], q: &Query, clock: &mut Clock<'r>, best: &mut u32) {
        for &i in candidates {
            if i >= *best {
                return;
            }
            let at = i as usize;
            if !self.checks[at] || self.rules[at].holds_except_from(q, clock) {
                *best = i;
                return;
            }
        }
    }

    pub fn rule(&self, i: usize) -> &Rule {
        &self.rules[i]
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule has `sni` or `not_sni`: the worker must then read the ClientHello.
    pub fn needs_sni(&self) -> bool {
        self.needs_sni
    }

    /// Whether any rule [denies by its server name](Rule::denies_by_sni).
    pub fn denies_by_sni(&self) -> bool {
        self.denies_by_sni
    }
}
