//! Firewall rules: an ordered list of [`Rule`]s, first match wins, compiled into a [`RuleSet`]
//! whose verdict cost does not grow with the number of network rules.
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

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};

const MINUTES_PER_DAY: u16 = 24 * 60;
const SECONDS_PER_DAY: i64 = 24 * 60 * 60;
const DAY_NAMES: [&str; 7] =
    ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

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
            && criterion(&self.time, &self.not_time, |w| w.contains_at(clock.local(&w.zone)))
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

/// What the listener the client reached must be: its address, its port, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerMatch {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl ListenerMatch {
    /// Parses `"127.0.0.1:8080"`, `"[::1]:8080"`, `":8080"`, `"127.0.0.1"` or `"::1"`.
    pub fn parse(text: &str) -> Result<ListenerMatch, String> {
        let t = text.trim();
        let fail = |why: &str| format!("invalid listener {text:?}: {why}");
        if let Ok(addr) = t.parse::<SocketAddr>() {
            let port = nonzero_port(addr.port()).map_err(|e| fail(&e))?;
            return Ok(ListenerMatch { ip: Some(addr.ip().to_canonical()), port: Some(port) });
        }
        let bare = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(t);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(ListenerMatch { ip: Some(ip.to_canonical()), port: None });
        }
        let Some(port) = t.strip_prefix(':') else {
            return Err(fail("expected ADDRESS:PORT, [V6]:PORT, :PORT or ADDRESS"));
        };
        let port = port.parse::<u16>().map_err(|_| fail("port must be 1..=65535"))?;
        Ok(ListenerMatch { ip: None, port: Some(nonzero_port(port).map_err(|e| fail(&e))?) })
    }

    /// Whether `listener` (the local address of the accepted socket) is the one described.
    pub fn matches(&self, listener: SocketAddr) -> bool {
        self.ip.is_none_or(|ip| ip.to_canonical() == listener.ip().to_canonical())
            && self.port.is_none_or(|port| port == listener.port())
    }
}

fn nonzero_port(port: u16) -> Result<u16, String> {
    if port == 0 {
        return Err("port must be 1..=65535".to_string());
    }
    Ok(port)
}

/// Parses a client port range: `"1024-65535"` or a single port `"22"`.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let fail = |why: &str| format!("invalid port range {text:?}: {why}");
    let port = |s: &str| s.trim().parse::<u16>().map_err(|_| fail("ports are 0..=65535"));
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (port(low)?, port(high)?),
        None => (port(text)?, port(text)?),
    };
    if low > high {
        return Err(fail("the first port is above the second"));
    }
    Ok(low..=high)
}

/// A TLS server name pattern. Names compare ASCII case-insensitively, ignoring one trailing dot
/// of the queried name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// Exactly this name (lowercase, no trailing dot, as [`NamePattern::parse`] stores it).
    Exact(String),
    /// `*.example.com`, stored as `"example.com"`: any name that ends in `.example.com` with at
    /// least one label before it, such as `a.example.com` or `a.b.example.com`, but not
    /// `example.com` itself.
    Wildcard(String),
}

impl NamePattern {
    /// Parses `"example.com"` or `"*.example.com"`; a `*` is allowed only as the whole first
    /// label.
    pub fn parse(text: &str) -> Result<NamePattern, String> {
        let t = text.trim();
        let t = t.strip_suffix('.').unwrap_or(t).to_ascii_lowercase();
        let fail = |why: &str| format!("invalid server name {text:?}: {why}");
        let (wildcard, name) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, t),
        };
        check_hostname(&name).map_err(|e| fail(&e))?;
        Ok(if wildcard { NamePattern::Wildcard(name) } else { NamePattern::Exact(name) })
    }

    /// Whether `name` (as sent by the client) fits the pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
        match self {
            NamePattern::Exact(exact) => name.eq_ignore_ascii_case(exact.as_bytes()),
            NamePattern::Wildcard(parent) => {
                let parent = parent.as_bytes();
                let Some(dot) = name.len().checked_sub(parent.len() + 1) else { return false };
                dot > 0 && name[dot] == b'.' && name[dot + 1..].eq_ignore_ascii_case(parent)
            }
        }
    }
}

/// Letters, digits, `-` and `_`; labels of 1 to 63 bytes; at most 253 bytes in all.
fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a name has 1 to 253 characters".to_string());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label has 1 to 63 characters".to_string());
        }
        let valid = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if !label.bytes().all(valid) {
            return Err("only letters, digits, '-' and '_' (and '*.' in front)".to_string());
        }
    }
    Ok(())
}

/// Days of the week and a span of minutes, in a zone.
///
/// The window opens at `start` on each chosen day and closes at `end`. When `end <= start` it
/// crosses midnight: the part after midnight falls on the next date but belongs to the day the
/// window opened, so `Fri 22:00-06:00` covers Friday 22:00 to Saturday 06:00. `start == end`
/// is a full 24 hours from `start`. `end` is exclusive; `24:00` is the end of the day.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    days: u8,
    start: u16,
    end: u16,
    zone: Zone,
}

impl TimeWindow {
    /// The day mask with every day set (bit 0 is Monday, bit 6 Sunday).
    pub const ALL_DAYS: u8 = 0x7f;

    /// `days`: bit 0 is Monday .. bit 6 Sunday; `start` in 0..1440 and `end` in 0..=1440 are
    /// minutes of the day.
    pub fn new(days: u8, start: u16, end: u16, zone: Zone) -> Result<TimeWindow, String> {
        if days == 0 || days > Self::ALL_DAYS {
            return Err(format!("invalid day mask {days:#x}"));
        }
        if start >= MINUTES_PER_DAY || end > MINUTES_PER_DAY {
            return Err(format!("invalid minutes {start}-{end}: start < 1440, end <= 1440"));
        }
        Ok(TimeWindow { days, start, end, zone })
    }

    /// Parses `"Mon-Fri 08:00-18:00"`, `"Sat,Sun 10:00-14:00"`, `"22:00-06:00"` (every day) or
    /// `"Mon 00:00-24:00"`. Day names are English, three letters or whole, any case; a day
    /// range may wrap (`Fri-Mon`).
    pub fn parse(text: &str, zone: &Zone) -> Result<TimeWindow, String> {
        let fail = |why: String| format!("invalid time window {text:?}: {why}");
        let t = text.trim();
        let (days, span) = match t.rsplit_once(char::is_whitespace) {
            Some((days, span)) => (parse_days(days).map_err(fail)?, span),
            None => (Self::ALL_DAYS, t),
        };
        let Some((start, end)) = span.split_once('-') else {
            return Err(fail("expected [DAYS] HH:MM-HH:MM, e.g. Mon-Fri 08:00-18:00".into()));
        };
        let start = parse_clock(start, false).map_err(fail)?;
        let end = parse_clock(end, true).map_err(fail)?;
        TimeWindow::new(days, start, end, zone.clone())
    }

    /// The day mask: bit 0 is Monday .. bit 6 Sunday.
    pub fn days(&self) -> u8 {
        self.days
    }

    /// Minute of the day the window opens.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// Minute of the day the window closes (exclusive); at or before `start` it is the next day.
    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// Whether the instant `now` (unix seconds) falls inside the window.
    pub fn contains(&self, now: i64) -> bool {
        self.contains_at(self.zone.local_time(now))
    }

    /// Whether the local (weekday, minute of day) falls inside the window.
    fn contains_at(&self, (weekday, minute): (u8, u16)) -> bool {
        let on = |day: u8| self.days & (1 << day) != 0;
        if self.end > self.start {
            return on(weekday) && self.start <= minute && minute < self.end;
        }
        let yesterday = (weekday + 6) % 7;
        (on(weekday) && minute >= self.start) || (on(yesterday) && minute < self.end)
    }
}

/// `"Mon-Fri"`, `"Sat,Sun"`, `"Mon,Wed-Fri"` into a day mask.
fn parse_days(text: &str) -> Result<u8, String> {
    let mut mask = 0u8;
    for item in text.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (parse_day(first)?, parse_day(last)?),
            None => (parse_day(item)?, parse_day(item)?),
        };
        let mut day = first;
        mask |= 1 << day;
        while day != last {
            day = (day + 1) % 7;
            mask |= 1 << day;
        }
    }
    Ok(mask)
}

/// A day name, 0 for Monday.
fn parse_day(text: &str) -> Result<u8, String> {
    let name = text.trim().to_ascii_lowercase();
    let hit = |full: &&str| name == *full || (name.len() == 3 && full.starts_with(&name));
    match DAY_NAMES.iter().position(hit) {
        Some(day) => Ok(day as u8),
        None => Err(format!("unknown day {:?} (Mon, Tue, Wed, Thu, Fri, Sat, Sun)", text.trim())),
    }
}

/// `"HH:MM"` into a minute of the day; `"24:00"` only as an end.
fn parse_clock(text: &str, is_end: bool) -> Result<u16, String> {
    let fail = || format!("invalid time {text:?}: expected HH:MM from 00:00 to 24:00");
    let (h, m) = text.split_once(':').ok_or_else(fail)?;
    let digits = |s: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 1..=2) || !digits(m, 2..=2) {
        return Err(fail());
    }
    let (h, m) = (h.parse::<u16>().map_err(|_| fail())?, m.parse::<u16>().map_err(|_| fail())?);
    let minute = h * 60 + m;
    match (h, m) {
        (24, 0) if is_end => Ok(minute),
        (0..=23, 0..=59) => Ok(minute),
        _ => Err(fail()),
    }
}

/// A time zone: converts unix seconds to the local weekday and minute of the day. Cheap to
/// clone; clones share the parsed zone.
#[derive(Clone)]
pub struct Zone(Arc<ZoneData>);

struct ZoneData {
    name: String,
    /// `None` is UTC.
    tz: Option<tz::TimeZone>,
}

impl Zone {
    /// Coordinated Universal Time.
    pub fn utc() -> Zone {
        Zone(Arc::new(ZoneData { name: "UTC".to_string(), tz: None }))
    }

    /// A zone from the bytes of a TZif file.
    pub fn from_tzif(name: &str, bytes: &[u8]) -> Result<Zone, String> {
        tz::TimeZone::from_tz_data(bytes)
            .map(|zone| Zone::from_tz(name, zone))
            .map_err(|e| format!("time zone {name:?}: invalid TZif data: {e}"))
    }

    fn from_tz(name: &str, tz: tz::TimeZone) -> Zone {
        Zone(Arc::new(ZoneData { name: name.to_string(), tz: Some(tz) }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Seconds east of UTC at the instant `now`; 0 if the zone data does not cover it.
    pub fn offset(&self, now: i64) -> i32 {
        let Some(tz) = &self.0.tz else { return 0 };
        tz.find_local_time_type(now).map_or(0, |t| t.ut_offset())
    }

    /// The local (weekday, minute of day) at the instant `now` (unix seconds); weekday 0 is
    /// Monday.
    pub fn local_time(&self, now: i64) -> (u8, u16) {
        let local = now.saturating_add(i64::from(self.offset(now)));
        let weekday = (local.div_euclid(SECONDS_PER_DAY) + 3).rem_euclid(7);
        let minute = local.rem_euclid(SECONDS_PER_DAY) / 60;
        (weekday as u8, minute as u16)
    }

    fn same(&self, other: &Zone) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zone({})", self.0.name)
    }
}

/// The local time of one query, converted at most once per zone in a row.
struct Clock<'r> {
    now: i64,
    last: Option<(&'r Zone, (u8, u16))>,
}

impl<'r> Clock<'r> {
    fn new(now: i64) -> Clock<'r> {
        Clock { now, last: None }
    }

    fn local(&mut self, zone: &'r Zone) -> (u8, u16) {
        if let Some((last, local)) = self.last {
            if last.same(zone) {
                return local;
            }
        }
        let local = zone.local_time(self.now);
        self.last = Some((zone, local));
        local
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
}

const NO_NODE: u32 = u32::MAX;
const V4_ROOT: u32 = 0;
const V6_ROOT: u32 = 1;

/// A trie node: a prefix (left-aligned in 128 bits; IPv4 uses the top 32), its two children
/// and its range in [`PrefixTrie::rules`].
#[derive(Debug, Clone, Copy)]
struct Node {
    key: [u64; 2],
    children: [u32; 2],
    first_rule: u32,
    rule_count: u32,
    len: u8,
}

impl Node {
    fn new(key: u128, len: u8) -> Node {
        let key = [(key >> 64) as u64, key as u64];
        Node { key, children: [NO_NODE; 2], first_rule: 0, rule_count: 0, len }
    }

    fn key(&self) -> u128 {
        (u128::from(self.key[0]) << 64) | u128::from(self.key[1])
    }
}

/// Path-compressed binary tries over `from` prefixes, one root per family, in one arena.
#[derive(Debug, Clone)]
struct PrefixTrie {
    nodes: Vec<Node>,
    /// Rule indices, grouped by node, each group in rule order.
    rules: Vec<u32>,
}

impl PrefixTrie {
    /// Calls `visit` with the rule list of every node whose prefix contains `client`, from the
    /// shortest prefix to the longest.
    fn walk(&self, client: IpAddr, mut visit: impl FnMut(&[u32])) {
        let (mut at, key, max) = match client {
            IpAddr::V4(a) => (V4_ROOT, u128::from(u32::from(a)) << 96, 32),
            IpAddr::V6(a) => (V6_ROOT, u128::from(a), 128),
        };
        loop {
            let node = &self.nodes[at as usize];
            if node.rule_count > 0 {
                let first = node.first_rule as usize;
                visit(&self.rules[first..first + node.rule_count as usize]);
            }
            if node.len >= max {
                return;
            }
            let child = node.children[bit(key, node.len)];
            if child == NO_NODE {
                return;
            }
            let next = &self.nodes[child as usize];
            if mask(key, next.len) != next.key() {
                return;
            }
            at = child;
        }
    }
}

/// Builds a [`PrefixTrie`]: nodes first, then the (node, rule) pairs grouped by node.
struct TrieBuilder {
    nodes: Vec<Node>,
    pairs: Vec<(u32, u32)>,
}

impl TrieBuilder {
    fn new() -> TrieBuilder {
        TrieBuilder { nodes: vec![Node::new(0, 0), Node::new(0, 0)], pairs: Vec::new() }
    }

    fn insert(&mut self, net: IpNet, rule: u32) {
        let node = match net {
            IpNet::V4(n) => {
                let key = u128::from(u32::from(n.network())) << 96;
                self.node_for(V4_ROOT, key, n.prefix_len())
            }
            IpNet::V6(n) => self.node_for(V6_ROOT, u128::from(n.network()), n.prefix_len()),
        };
        self.pairs.push((node, rule));
    }

    /// The node holding exactly the prefix (`key`, `len`), created if needed.
    fn node_for(&mut self, root: u32, key: u128, len: u8) -> u32 {
        let key = mask(key, len);
        let mut at = root;
        loop {
            let here = self.nodes[at as usize];
            if here.len == len {
                return at;
            }
            let side = bit(key, here.len);
            let child = here.children[side];
            if child == NO_NODE {
                return self.attach(at, side, key, len);
            }
            let next = self.nodes[child as usize];
            let common = ((key ^ next.key()).leading_zeros() as u8).min(next.len).min(len);
            if common == next.len {
                at = child;
                continue;
            }
            // `key` leaves `next`'s path at `common`: a fork node takes `next`'s place.
            let fork = self.attach(at, side, mask(key, common), common);
            self.nodes[fork as usize].children[bit(next.key(), common)] = child;
            if common == len {
                return fork;
            }
            return self.attach(fork, bit(key, common), key, len);
        }
    }

    /// A new node for (`key`, `len`) as child `side` of `parent`.
    fn attach(&mut self, parent: u32, side: usize, key: u128, len: u8) -> u32 {
        let id = u32::try_from(self.nodes.len()).expect("trie arena exceeds u32 indices");
        self.nodes.push(Node::new(key, len));
        self.nodes[parent as usize].children[side] = id;
        id
    }

    fn finish(mut self) -> PrefixTrie {
        self.pairs.sort_unstable();
        self.pairs.dedup();
        let mut rules = Vec::with_capacity(self.pairs.len());
        for &(node, rule) in &self.pairs {
            let node = &mut self.nodes[node as usize];
            if node.rule_count == 0 {
                node.first_rule = rules.len() as u32;
            }
            node.rule_count += 1;
            rules.push(rule);
        }
        self.nodes.shrink_to_fit();
        PrefixTrie { nodes: self.nodes, rules }
    }
}

/// Bit `i` of `key`, counting from the most significant.
fn bit(key: u128, i: u8) -> usize {
    ((key >> (127 - u32::from(i))) & 1) as usize
}

/// The first `len` bits of `key`, the rest zero.
fn mask(key: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        _ => key & (u128::MAX << (128 - u32::from(len))),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use proptest::test_runner::Config;

    use super::*;

    /// A zone of the machine's tz database (the control crate reads it for real configs).
    fn named_zone(name: &str) -> Result<Zone, String> {
        let bytes = std::fs::read(format!("/usr/share/zoneinfo/{name}"))
            .map_err(|e| format!("time zone {name:?} not installed: {e}"))?;
        Zone::from_tzif(name, &bytes)
    }

    /// 2024-01-01 00:00:00 UTC, a Monday.
    const MONDAY: i64 = 1_704_067_200;

    /// Unix seconds at `day` days after [`MONDAY`] (0 = Monday), `h:m` UTC.
    fn at(day: i64, h: i64, m: i64) -> i64 {
        MONDAY + day * SECONDS_PER_DAY + h * 3600 + m * 60
    }

    fn query(client: &str) -> Query<'static> {
        Query {
            client: client.parse().unwrap(),
            listener: "127.0.0.1:443".parse().unwrap(),
            now: at(0, 12, 0),
            sni: None,
        }
    }

    fn allow(name: &str) -> Rule {
        Rule::new(name, Action::Allow { pool: None })
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn window(text: &str) -> TimeWindow {
        TimeWindow::parse(text, &Zone::utc()).unwrap()
    }

    /// Both evaluations, which must agree.
    fn decide(rules: &[Rule], q: &Query) -> Option<usize> {
        let compiled = RuleSet::compile(rules.to_vec()).decide(q);
        assert_eq!(compiled, decide_linear(rules, q), "compiled and linear disagree on {q:?}");
        compiled
    }

    fn hits(rule: &Rule, q: &Query) -> bool {
        decide(std::slice::from_ref(rule), q) == Some(0)
    }

    #[test]
    fn no_rules_no_verdict_and_empty_rule_matches_all() {
        assert_eq!(decide(&[], &query("10.0.0.1:1000")), None);
        assert!(RuleSet::compile(Vec::new()).is_empty());
        assert!(hits(&allow("all"), &query("10.0.0.1:1000")));
        assert!(hits(&allow("all"), &query("[2001:db8::1]:1000")));
    }

    #[test]
    fn from_and_not_from() {
        let rule = Rule { from: nets(&["10.0.0.0/8", "2001:db8::/32"]), ..allow("r") };
        assert!(hits(&rule, &query("10.1.2.3:1000")));
        assert!(hits(&rule, &query("[2001:db8::5]:1000")));
        assert!(!hits(&rule, &query("11.0.0.1:1000")));
        assert!(!hits(&rule, &query("[2001:db9::5]:1000")));
        let rule = Rule { not_from: nets(&["10.0.0.0/8", "192.0.2.7/32"]), ..allow("r") };
        assert!(!hits(&rule, &query("10.1.2.3:1000")));
        assert!(!hits(&rule, &query("192.0.2.7:1000")));
        assert!(hits(&rule, &query("192.0.2.8:1000")));
        let both = Rule { from: nets(&["10.0.0.0/8"]), not_from: nets(&["10.9.0.0/16"]), ..rule };
        assert!(hits(&both, &query("10.8.0.1:1000")));
        assert!(!hits(&both, &query("10.9.0.1:1000")));
    }

    #[test]
    fn mapped_v6_client_matches_v4_networks() {
        let rule = Rule { from: nets(&["192.0.2.0/24"]), ..allow("r") };
        assert!(hits(&rule, &query("[::ffff:192.0.2.9]:1000")));
        assert!(!hits(&rule, &query("[::ffff:192.0.3.9]:1000")));
        let not = Rule { not_from: nets(&["192.0.2.0/24"]), ..allow("r") };
        assert!(!hits(&not, &query("[::ffff:192.0.2.9]:1000")));
        // A v6 network written in the mapped range is the IPv4 network it maps.
        let mapped = Rule { from: nets(&["::ffff:192.0.2.0/120"]), ..allow("r") };
        assert!(hits(&mapped, &query("192.0.2.200:1000")));
        assert!(hits(&mapped, &query("[::ffff:192.0.2.200]:1000")));
        assert!(!hits(&mapped, &query("192.0.3.1:1000")));
    }

    #[test]
    fn client_ports() {
        let rule = Rule { from_port: vec![1024..=2047, 4000..=4000], ..allow("r") };
        assert!(hits(&rule, &query("10.0.0.1:1024")));
        assert!(hits(&rule, &query("10.0.0.1:4000")));
        assert!(!hits(&rule, &query("10.0.0.1:2048")));
        let rule = Rule { not_from_port: vec![parse_port_range("0-1023").unwrap()], ..allow("r") };
        assert!(!hits(&rule, &query("10.0.0.1:22")));
        assert!(!hits(&rule, &query("10.0.0.1:1023")));
        assert!(hits(&rule, &query("10.0.0.1:1024")));
    }

    #[test]
    fn listener_address_and_port() {
        let to = |t: &str| ListenerMatch::parse(t).unwrap();
        let mut q = query("10.0.0.1:1000");
        q.listener = "127.0.0.1:8080".parse().unwrap();
        for yes in ["127.0.0.1:8080", ":8080", "127.0.0.1", "::ffff:127.0.0.1"] {
            assert!(hits(&Rule { to: vec![to(yes)], ..allow("r") }, &q), "{yes}");
            assert!(!hits(&Rule { not_to: vec![to(yes)], ..allow("r") }, &q), "{yes}");
        }
        for no in ["127.0.0.2:8080", ":8081", "127.0.0.1:80", "::1", "[::1]:8080"] {
            assert!(!hits(&Rule { to: vec![to(no)], ..allow("r") }, &q), "{no}");
            assert!(hits(&Rule { not_to: vec![to(no)], ..allow("r") }, &q), "{no}");
        }
        q.listener = "[::ffff:127.0.0.1]:8080".parse().unwrap();
        assert!(hits(&Rule { to: vec![to("127.0.0.1:8080")], ..allow("r") }, &q));
        q.listener = "[::1]:8080".parse().unwrap();
        assert!(hits(&Rule { to: vec![to("[::1]:8080")], ..allow("r") }, &q));
        assert!(hits(&Rule { to: vec![to("::1")], ..allow("r") }, &q));
    }

    #[test]
    fn listener_parse() {
        let p = ListenerMatch::parse;
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(p("127.0.0.1:8080"), Ok(ListenerMatch { ip: Some(v4), port: Some(8080) }));
        assert_eq!(p(":8080"), Ok(ListenerMatch { ip: None, port: Some(8080) }));
        assert_eq!(p("127.0.0.1"), Ok(ListenerMatch { ip: Some(v4), port: None }));
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(p("::1"), Ok(ListenerMatch { ip: Some(v6), port: None }));
        assert_eq!(p("[::1]"), Ok(ListenerMatch { ip: Some(v6), port: None }));
        assert_eq!(p("[::1]:8080"), Ok(ListenerMatch { ip: Some(v6), port: Some(8080) }));
        for bad in ["", ":", ":0", "127.0.0.1:0", ":70000", "host:80", "1.2.3:4", "[::1]:"] {
            let err = p(bad).unwrap_err();
            assert!(err.contains("invalid listener"), "{bad}: {err}");
        }
    }

    #[test]
    fn port_range_parse() {
        assert_eq!(parse_port_range("22"), Ok(22..=22));
        assert_eq!(parse_port_range("1024-65535"), Ok(1024..=65535));
        assert_eq!(parse_port_range(" 80 - 81 "), Ok(80..=81));
        for bad in ["", "-", "1-", "a", "65536", "10-9", "1-2-3"] {
            assert!(parse_port_range(bad).unwrap_err().contains("invalid port range"), "{bad}");
        }
    }

    #[test]
    fn window_crossing_midnight() {
        let w = window("22:00-06:00");
        assert!(w.contains(at(2, 23, 30)));
        assert!(w.contains(at(2, 5, 59)));
        assert!(!w.contains(at(2, 6, 0)));
        assert!(w.contains(at(2, 22, 0)));
        assert!(!w.contains(at(2, 21, 59)));
        // After midnight belongs to the day the window opened.
        let fri = window("Fri 22:00-06:00");
        assert!(fri.contains(at(4, 23, 0)));
        assert!(fri.contains(at(5, 5, 59)), "Saturday early morning is Friday's night");
        assert!(!fri.contains(at(4, 5, 0)), "Friday early morning is Thursday's night");
        assert!(!fri.contains(at(5, 23, 0)));
        // Sunday night runs into Monday morning across the week boundary.
        let sun = window("Sun 23:00-01:00");
        assert!(sun.contains(at(7, 0, 30)));
        assert!(sun.contains(at(0, 0, 30)));
        assert!(!sun.contains(at(1, 0, 30)));
    }

    #[test]
    fn window_days() {
        let work = window("Mon-Fri 08:00-18:00");
        assert_eq!(work.days(), 0b001_1111);
        assert!(work.contains(at(0, 8, 0)));
        assert!(work.contains(at(4, 17, 59)));
        assert!(!work.contains(at(4, 18, 0)));
        assert!(!work.contains(at(5, 12, 0)));
        let weekend = window("Sat,Sun 10:00-14:00");
        assert_eq!(weekend.days(), 0b110_0000);
        assert!(weekend.contains(at(6, 10, 0)));
        assert!(!weekend.contains(at(6, 14, 0)));
        assert!(!weekend.contains(at(3, 11, 0)));
        assert_eq!(window("fri-MON 00:00-01:00").days(), 0b111_0001);
        assert_eq!(window("Mon, Wed-Thu 00:00-01:00").days(), 0b000_1101);
        assert_eq!(window("sunday 00:00-01:00").days(), 0b100_0000);
        let monday = window("Mon 00:00-24:00");
        assert!(monday.contains(at(0, 0, 0)) && monday.contains(at(0, 23, 59)));
        assert!(!monday.contains(at(1, 0, 0)) && !monday.contains(at(6, 23, 59)));
        let every = window("08:00-08:00");
        assert!(every.contains(at(3, 7, 59)) && every.contains(at(3, 8, 0)));
    }

    #[test]
    fn window_parse_errors() {
        for bad in [
            "",
            "08:00",
            "Mon",
            "Mon-Fri",
            "Mox 08:00-09:00",
            "Mon-Fri 8-18",
            "24:00-06:00",
            "08:00-24:01",
            "08:60-09:00",
            "8:0-9:00",
            "-1:00-02:00",
            "Mon,,Tue 08:00-09:00",
        ] {
            let err = TimeWindow::parse(bad, &Zone::utc()).unwrap_err();
            assert!(err.contains("invalid time window"), "{bad}: {err}");
        }
        assert!(TimeWindow::new(0, 0, 10, Zone::utc()).is_err());
        assert!(TimeWindow::new(1, 1440, 10, Zone::utc()).is_err());
    }

    #[test]
    fn time_and_not_time() {
        let mut q = query("10.0.0.1:1000");
        let rule = Rule { time: vec![window("Sat,Sun 00:00-24:00")], ..allow("r") };
        q.now = at(5, 12, 0);
        assert!(hits(&rule, &q));
        q.now = at(4, 12, 0);
        assert!(!hits(&rule, &q));
        let rule = Rule { not_time: vec![window("Mon-Fri 08:00-18:00")], ..allow("r") };
        assert!(!hits(&rule, &q));
        q.now = at(4, 20, 0);
        assert!(hits(&rule, &q));
    }

    #[test]
    fn zone_utc_and_errors() {
        assert_eq!(Zone::utc().local_time(MONDAY), (0, 0));
        assert_eq!(Zone::utc().local_time(at(6, 23, 59)), (6, 23 * 60 + 59));
        assert_eq!(Zone::utc().local_time(0), (3, 0), "1970-01-01 was a Thursday");
        assert_eq!(Zone::utc().local_time(-60), (2, 1439));
        assert!(Zone::from_tzif("junk", b"not a tzif file").is_err());
    }

    /// Europe/Paris from tzdata, or `None` (with a note) where it is not installed.
    fn paris() -> Option<Zone> {
        match named_zone("Europe/Paris") {
            Ok(zone) => Some(zone),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    #[test]
    fn zone_named_follows_daylight_saving() {
        let Some(paris) = paris() else { return };
        assert_eq!(paris.offset(MONDAY), 3600);
        // 2024-07-01 10:00 UTC, a Monday: 12:00 in Paris.
        let july = 1_719_828_000;
        assert_eq!(paris.offset(july), 7200);
        assert_eq!(paris.local_time(july), (0, 12 * 60));
        // 2024-01-07 23:30 UTC is Monday 00:30 in Paris.
        assert_eq!(paris.local_time(at(6, 23, 30)), (0, 30));
        let w = TimeWindow::parse("Mon 00:00-01:00", &paris).unwrap();
        assert!(w.contains(at(6, 23, 30)));
        assert!(!w.contains(at(0, 0, 30)));
    }

    #[test]
    fn sni_and_not_sni() {
        let p = |t: &str| NamePattern::parse(t).unwrap();
        let rule = Rule { sni: vec![p("api.example.com"), p("*.example.org")], ..allow("r") };
        let mut q = query("10.0.0.1:1000");
        assert!(!hits(&rule, &q), "no SNI: sni does not match");
        for yes in ["api.example.com", "API.Example.COM.", "a.example.org", "a.b.example.org"] {
            q.sni = Some(yes);
            assert!(hits(&rule, &q), "{yes}");
        }
        for no in ["example.org", "xapi.example.com", "aexample.org", "example.org.evil", ""] {
            q.sni = Some(no);
            assert!(!hits(&rule, &q), "{no}");
        }
        let not = Rule { not_sni: vec![p("*.example.org")], ..allow("r") };
        q.sni = None;
        assert!(hits(&not, &q), "no SNI: not_sni holds");
        q.sni = Some("x.example.org");
        assert!(!hits(&not, &q));
        q.sni = Some("example.org");
        assert!(hits(&not, &q));
        assert!(RuleSet::compile(vec![allow("a"), not]).needs_sni());
        assert!(!RuleSet::compile(vec![allow("a")]).needs_sni());
    }

    #[test]
    fn name_pattern_parse() {
        let p = NamePattern::parse;
        assert_eq!(p("Example.COM."), Ok(NamePattern::Exact("example.com".into())));
        assert_eq!(p("*.Example.com"), Ok(NamePattern::Wildcard("example.com".into())));
        assert_eq!(p("*.local"), Ok(NamePattern::Wildcard("local".into())));
        for bad in ["", "*", "*.", "a.*.com", "*example.com", "a..b", "a b.com", ".a.com"] {
            assert!(p(bad).unwrap_err().contains("invalid server name"), "{bad}");
        }
        assert!(p(&"a".repeat(64)).is_err());
    }

    #[test]
    fn first_match_wins() {
        let deny = |name: &str| Rule::new(name, Action::Deny { reset: true });
        let rules = vec![
            Rule { from: nets(&["10.1.0.0/16"]), from_port: vec![1..=10], ..deny("ports") },
            Rule { from: nets(&["10.0.0.0/8"]), ..allow("ten") },
            Rule { from: nets(&["10.1.2.3/32"]), ..deny("host, shadowed") },
            Rule { from: nets(&["10.1.2.0/24", "10.1.2.3/32"]), ..allow("twice") },
            deny("default"),
        ];
        assert_eq!(decide(&rules, &query("10.1.2.3:5")), Some(0));
        assert_eq!(decide(&rules, &query("10.1.2.3:5000")), Some(1));
        assert_eq!(decide(&rules, &query("11.1.2.3:5")), Some(4));
        assert_eq!(decide(&rules[2..], &query("10.1.2.3:5")), Some(0));
        assert_eq!(decide(&rules[3..], &query("10.1.2.3:5")), Some(0));
        assert_eq!(decide(&rules[3..], &query("10.1.3.3:5")), Some(1));
        let set = RuleSet::compile(rules);
        assert_eq!(set.len(), 5);
        assert_eq!(&*set.rule(4).name, "default");
        assert_eq!(set.rule(0).action, Action::Deny { reset: true });
    }

    #[test]
    fn nested_and_split_prefixes() {
        // Inserted long-first so the trie must split existing edges.
        let list = ["10.1.2.3/32", "10.1.2.0/24", "10.1.3.0/24", "10.0.0.0/8", "0.0.0.0/0"];
        let rules: Vec<Rule> = list.iter().map(|n| Rule { from: nets(&[n]), ..allow(n) }).collect();
        assert_eq!(decide(&rules, &query("10.1.2.3:1")), Some(0));
        assert_eq!(decide(&rules, &query("10.1.2.4:1")), Some(1));
        assert_eq!(decide(&rules, &query("10.1.3.4:1")), Some(2));
        assert_eq!(decide(&rules, &query("10.2.3.4:1")), Some(3));
        assert_eq!(decide(&rules, &query("11.2.3.4:1")), Some(4));
        assert_eq!(decide(&rules, &query("[::1]:1")), None);
        let v6 = ["2001:db8::1/128", "2001:db8::/64", "2001:db8:0:1::/64", "::/0"];
        let rules: Vec<Rule> = v6.iter().map(|n| Rule { from: nets(&[n]), ..allow(n) }).collect();
        assert_eq!(decide(&rules, &query("[2001:db8::1]:1")), Some(0));
        assert_eq!(decide(&rules, &query("[2001:db8::2]:1")), Some(1));
        assert_eq!(decide(&rules, &query("[2001:db8:0:1::2]:1")), Some(2));
        assert_eq!(decide(&rules, &query("[fe80::1]:1")), Some(3));
        assert_eq!(decide(&rules, &query("10.0.0.1:1")), None);
    }

    #[test]
    fn trie_has_at_most_two_nodes_per_prefix() {
        // Every insertion adds at most a leaf and a fork: memory is linear in the prefixes.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let rules: Vec<Rule> = (0..20_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let net = match i % 5 {
                    0 => IpNet::V6(
                        ipnet::Ipv6Net::new(
                            Ipv6Addr::from(u128::from(x) << 64),
                            16 + (x % 49) as u8,
                        )
                        .unwrap(),
                    ),
                    _ => IpNet::V4(
                        Ipv4Net::new(Ipv4Addr::from(x as u32), 8 + (x % 25) as u8).unwrap(),
                    ),
                };
                Rule { from: vec![net], ..allow("r") }
            })
            .collect();
        let set = RuleSet::compile(rules);
        assert!(set.trie.nodes.len() <= 2 * 20_000 + 2, "{} nodes", set.trie.nodes.len());
        assert_eq!(set.trie.rules.len(), 20_000);
        assert!(std::mem::size_of::<Node>() <= 40);
    }

    // Property: the compiled matcher agrees with the linear reference.

    fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
        let last = prop::sample::select(vec![0u8, 1, 2, 3, 64, 127, 128, 255]);
        (0u8..2, 0u8..4, last).prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d))
    }

    fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
        let last = prop::sample::select(vec![0u16, 1, 2, 0x80, 0xffff]);
        (0u16..2, 0u16..3, last)
            .prop_map(|(a, b, h)| Ipv6Addr::new(0x2001, 0xdb8, a, b, 0, 0, 0, h))
    }

    fn network() -> impl Strategy<Value = IpNet> {
        let v4_len = prop::sample::select(vec![0u8, 8, 15, 16, 22, 23, 24, 25, 30, 31, 32]);
        let v6_len = prop::sample::select(vec![0u8, 32, 47, 48, 63, 64, 96, 120, 127, 128]);
        prop_oneof![
            4 => (v4_addr(), v4_len.clone())
                .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a, l).unwrap())),
            3 => (v6_addr(), v6_len).prop_map(|(a, l)| IpNet::V6(ipnet::Ipv6Net::new(a, l).unwrap())),
            1 => (v4_addr(), v4_len).prop_map(|(a, l)| {
                IpNet::V6(ipnet::Ipv6Net::new(a.to_ipv6_mapped(), 96 + l).unwrap())
            }),
        ]
    }

    fn client() -> impl Strategy<Value = SocketAddr> {
        let ip = prop_oneof![
            4 => v4_addr().prop_map(IpAddr::V4),
            1 => v4_addr().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
            3 => v6_addr().prop_map(IpAddr::V6),
        ];
        (ip, 1000u16..1008).prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    const LISTENERS: [&str; 6] =
        ["127.0.0.1:80", "127.0.0.1:443", "127.0.0.2:80", "[::1]:443", "[::1]:80", "[::2]:443"];
    const NAMES: [&str; 6] = [
        "example.com",
        "a.example.com",
        "A.Example.COM.",
        "x.b.example.com",
        "other.org",
        "b.example.com",
    ];

    fn listener_match() -> impl Strategy<Value = ListenerMatch> {
        let ip = prop::option::of(prop::sample::select(vec!["127.0.0.1", "127.0.0.2", "::1"]));
        let port = prop::option::of(prop::sample::select(vec![80u16, 443]));
        (ip, port).prop_map(|(ip, port)| ListenerMatch { ip: ip.map(|i| i.parse().unwrap()), port })
    }

    fn name_pattern() -> impl Strategy<Value = NamePattern> {
        let text =
            ["example.com", "*.example.com", "a.example.com", "*.b.example.com", "other.org"];
        prop::sample::select(text.to_vec()).prop_map(|t| NamePattern::parse(t).unwrap())
    }

    fn time_window(zones: Vec<Zone>) -> impl Strategy<Value = TimeWindow> {
        let start = prop_oneof![0u16..1440, Just(0), Just(22 * 60)];
        let end = prop_oneof![0u16..=1440, Just(1440), Just(6 * 60)];
        (1u8..=0x7f, start, end, prop::sample::select(zones))
            .prop_map(|(days, start, end, zone)| TimeWindow::new(days, start, end, zone).unwrap())
    }

    /// Mostly empty, sometimes one to three entries.
    fn some<T: Clone + std::fmt::Debug>(
        s: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = Vec<T>> {
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(s, 1..4)]
    }

    fn ports() -> impl Strategy<Value = RangeInclusive<u16>> {
        (1000u16..1008, 0u16..4).prop_map(|(low, span)| low..=low + span)
    }

    fn rule(zones: Vec<Zone>) -> impl Strategy<Value = Rule> {
        let from = prop_oneof![1 => Just(Vec::new()), 3 => prop::collection::vec(network(), 1..4)];
        let ips = (from, some(network()), some(ports()), some(ports()));
        let to = (some(listener_match()), some(listener_match()));
        let time = (some(time_window(zones.clone())), some(time_window(zones)));
        let sni = (some(name_pattern()), some(name_pattern()));
        (ips, to, time, sni).prop_map(|((from, not_from, fp, nfp), (to, nto), (t, nt), (s, ns))| {
            Rule {
                from,
                not_from,
                from_port: fp,
                not_from_port: nfp,
                to,
                not_to: nto,
                time: t,
                not_time: nt,
                sni: s,
                not_sni: ns,
                ..allow("random")
            }
        })
    }

    fn random_query() -> impl Strategy<Value = Query<'static>> {
        let listener = prop::sample::select(LISTENERS.to_vec());
        let sni = prop::option::of(prop::sample::select(NAMES.to_vec()));
        (client(), listener, 0i64..8 * SECONDS_PER_DAY, sni).prop_map(|(client, l, t, sni)| Query {
            client,
            listener: l.parse().unwrap(),
            now: MONDAY + t,
            sni,
        })
    }

    fn zones() -> Vec<Zone> {
        // Two distinct UTC zones exercise the per-query zone cache.
        let mut zones = vec![Zone::utc(), Zone::utc()];
        zones.extend(named_zone("Europe/Paris").ok());
        zones
    }

    proptest! {
        #![proptest_config(Config { cases: 4000, failure_persistence: None, ..Config::default() })]

        #[test]
        fn compiled_agrees_with_linear(
            rules in prop::collection::vec(rule(zones()), 0..40),
            queries in prop::collection::vec(random_query(), 1..8),
        ) {
            let set = RuleSet::compile(rules.clone());
            for q in &queries {
                prop_assert_eq!(set.decide(q), decide_linear(&rules, q), "query {:?}", q);
            }
        }
    }
}
