//! Configuration in stages: TOML text -> [`FileConfig`] (serde, `deny_unknown_fields`, with
//! spans) -> validated [`Config`] -> compiled [`Tables`]. Every error names the file, the
//! line and column, and the key; validation reports every error it finds, not just the
//! first. Every default is a documented `DEFAULT_*` constant.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sluice_engine::acl::{self, Action, ListenerMatch, NamePattern, Rule, RuleSet, TimeWindow};
use sluice_engine::balance::{self, Algorithm, Backend, Ejection, HealthCheck, Pool};
use sluice_engine::capture::{CapturePolicy, CaptureSpec, CaptureStats, Capturer};
use sluice_engine::events::{BackendState, RecordKind, RecordPolicy, ServiceCounters, Verdict};
use sluice_engine::proxy;
use sluice_engine::session::CloseReason;
use sluice_engine::tables::{self, NamedPool, Protocol, Rules, Service, Tables, Timeouts};
use sluice_engine::{DriverChoice, EngineConfig};
use toml::Spanned;

use crate::admin::{AdminAddr, DEFAULT_ADMIN_LISTEN};
use crate::records::{Template, DEFAULT_TEMPLATE, DEFAULT_UDP_TEMPLATE};
use crate::sinks::{self, Filter, Format, SinkSpec, SyslogAddr, Target};
use crate::zones;

mod shaping;
use shaping::{BandwidthKeys, BandwidthSection, LimitsSection};
use sluice_engine::limits::{LimitSpec, LimitState};
use sluice_engine::shape::{Bandwidth, BandwidthSpec};

/// The counter scope of global firewall rules.
pub const FIREWALL_SCOPE: &str = "firewall";
/// The counter name of a service's default action.
pub const DEFAULT_RULE: &str = "(default)";

/// Where a syslog sink sends without an `address`.
pub const DEFAULT_SYSLOG_SOCKET: &str = "/dev/log";
/// Facility of a syslog sink without one: local0.
pub const DEFAULT_SYSLOG_FACILITY: u8 = 16;

/// The configuration `sluice run` uses when no file is given: one service forwarding
/// 127.0.0.1:8080 to a server on 127.0.0.1:8000.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../examples/default.toml");
/// The name shown for the embedded default in messages.
pub const EMBEDDED_NAME: &str = "<embedded default>";

/// How long a graceful stop lets sessions finish before cutting them.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest and largest relay pipe or buffer size accepted.
pub const MIN_PIPE_SIZE: u64 = 4096;
pub const MAX_PIPE_SIZE: u64 = 64 << 20;
/// Most workers accepted.
pub const MAX_WORKERS: i64 = 1024;
/// Largest `engine.max_flows` accepted (per worker; each flow holds one fd).
pub const MAX_FLOWS: i64 = 1 << 20;
/// Smallest and largest `engine.udp_max_datagram` accepted, in bytes.
pub const MIN_UDP_DATAGRAM: u64 = 512;
pub const MAX_UDP_DATAGRAM: u64 = 65535;
/// Smallest `max_file` and `max_total` of a capture.
pub const MIN_CAPTURE_SIZE: u64 = 4096;
/// Accepted range of a capture's `snaplen` (bytes of each frame kept).
pub const MIN_SNAPLEN: i64 = 64;
pub const MAX_SNAPLEN: i64 = 262_144;
/// How long a stop waits for the capture thread to finish its files.
pub const CAPTURE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest session cap accepted (engine or service).
pub const MAX_SESSIONS_CAP: u64 = 1 << 32;

/// One configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}: {}", self.file, self.line, self.column, self.key, self.message)
    }
}

/// Every error found in one file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    engine: EngineSection,
    admin: Option<AdminSection>,
    records: Option<RecordsSection>,
    #[serde(default, rename = "log")]
    logs: Vec<LogSection>,
    #[serde(default, rename = "firewall")]
    firewall: Vec<RuleSection>,
    #[serde(default, rename = "pool")]
    pools: Vec<PoolSection>,
    #[serde(default, rename = "service")]
    services: Vec<ServiceSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    name: Spanned<String>,
    backends: Option<Spanned<Vec<Spanned<BackendEntry>>>>,
    algorithm: Option<Spanned<String>>,
    dns: Option<Spanned<String>>,
    srv: Option<Spanned<String>>,
    resolver: Option<Spanned<String>>,
    dns_interval: Option<Spanned<String>>,
    send_proxy: Option<Spanned<String>>,
    eject_after: Option<Spanned<i64>>,
    eject_for: Option<Spanned<String>>,
    health: Option<HealthSection>,
}

/// A backend written as `"host:port"` or as a table with its weight, cap and role.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BackendEntry {
    Addr(String),
    Table(BackendTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTable {
    addr: String,
    weight: Option<i64>,
    max_sessions: Option<i64>,
    backup: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    send: Option<String>,
    expect: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptProxySection {
    from: Spanned<Vec<Spanned<String>>>,
}

/// One firewall rule, global (`[[firewall]]`) or a service's (`[[service.rule]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSection {
    name: Option<Spanned<String>>,
    action: Spanned<String>,
    reset: Option<Spanned<bool>>,
    pool: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    from: Vec<Spanned<String>>,
    #[serde(default)]
    not_from: Vec<Spanned<String>>,
    #[serde(default)]
    from_port: Vec<Spanned<PortRange>>,
    #[serde(default)]
    not_from_port: Vec<Spanned<PortRange>>,
    #[serde(default)]
    to: Vec<Spanned<String>>,
    #[serde(default)]
    not_to: Vec<Spanned<String>>,
    #[serde(default)]
    time: Vec<Spanned<String>>,
    #[serde(default)]
    not_time: Vec<Spanned<String>>,
    #[serde(default)]
    sni: Vec<Spanned<String>>,
    #[serde(default)]
    not_sni: Vec<Spanned<String>>,
    bandwidth: Option<Spanned<BandwidthSection>>,
    bandwidth_up: Option<Spanned<BandwidthSection>>,
    bandwidth_down: Option<Spanned<BandwidthSection>>,
    capture: Option<Spanned<CaptureSection>>,
}

/// `capture = { dir = "...", max_file = "100 MB", max_total = "10 GB", snaplen = 65535 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureSection {
    dir: Spanned<String>,
    max_file: Option<Spanned<Size>>,
    max_total: Option<Spanned<Size>>,
    snaplen: Option<Spanned<i64>>,
}

/// A port range written as a number (`22`) or text (`"1024-65535"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortRange {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordsSection {
    open: Option<bool>,
    interim: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    path: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    facility: Option<Spanned<String>>,
    tag: Option<String>,
    format: Option<Spanned<String>>,
    template: Option<Spanned<String>>,
    #[serde(default)]
    kinds: Vec<Spanned<String>>,
    #[serde(default)]
    verdicts: Vec<Spanned<String>>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    reasons: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineSection {
    workers: Option<Spanned<Workers>>,
    pin: Option<bool>,
    driver: Option<Spanned<String>>,
    pipe_size: Option<Spanned<Size>>,
    buffer_size: Option<Spanned<Size>>,
    relay: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    max_flows: Option<Spanned<i64>>,
    udp_max_datagram: Option<Spanned<Size>>,
    max_sessions: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Workers {
    Count(i64),
    Named(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(i64),
    Text(String),
}

impl Size {
    /// The size in bytes: a number as given, or text such as "64 KiB" (see [`parse_size`]).
    fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => u64::try_from(*n).map_err(|_| "must not be negative".to_string()),
            Size::Text(t) => parse_size(t),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: Spanned<String>,
    listen: Spanned<Vec<Spanned<String>>>,
    backends: Option<Spanned<Vec<Spanned<BackendEntry>>>>,
    pool: Option<Spanned<String>>,
    accept_proxy: Option<AcceptProxySection>,
    proxy_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    fin_timeout: Option<Spanned<String>>,
    sni_timeout: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    udp_idle_timeout: Option<Spanned<String>>,
    default: Option<Spanned<String>>,
    bandwidth: Option<Spanned<BandwidthSection>>,
    bandwidth_up: Option<Spanned<BandwidthSection>>,
    bandwidth_down: Option<Spanned<BandwidthSection>>,
    limits: Option<LimitsSection>,
    capture: Option<Spanned<CaptureSection>>,
    max_sessions: Option<Spanned<i64>>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSection>,
}

/// A validated backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Most sessions at once (0: no cap).
    pub max_sessions: u64,
    pub backup: bool,
}

impl BackendSpec {
    /// A primary backend of the default weight, without a cap.
    pub fn plain(addr: SocketAddr) -> Self {
        Self { addr, weight: balance::DEFAULT_WEIGHT, max_sessions: 0, backup: false }
    }
}

/// A validated service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    /// Its own round-robin pool (empty when it names a `[[pool]]`).
    pub backends: Vec<BackendSpec>,
    /// The named pool it sends sessions to, by index, instead of `backends`.
    pub pool: Option<usize>,
    /// Trusted sources of PROXY protocol headers, when the listener expects them.
    pub accept_proxy: Option<Vec<ipnet::IpNet>>,
    pub timeouts: Timeouts,
    /// TCP (default) or UDP.
    pub protocol: Protocol,
    /// UDP services: how long an idle flow lives.
    pub udp_idle_timeout: Duration,
    /// The service's own rules, in order.
    pub rules: Vec<Rule>,
    /// The action when no rule matches.
    pub default: Action,
    /// The bandwidth block of each rule, by rule index (empty: none).
    pub rule_bandwidth: Vec<BandwidthSpec>,
    /// The service's own bandwidth block (empty: none).
    pub bandwidth: BandwidthSpec,
    pub limits: LimitSpec,
    /// Capture of sessions no rule captures, by index into [`Config::captures`].
    pub capture: Option<usize>,
    /// Most sessions at once; `None`: no cap of its own.
    pub max_sessions: Option<u64>,
}

/// A validated named pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    /// Its backends: fixed, or the last good set DNS discovery found.
    pub backends: Vec<BackendSpec>,
    pub algorithm: Algorithm,
    pub ejection: Ejection,
    pub send_proxy: Option<proxy::Version>,
    pub health: Option<HealthCheck>,
    /// Where the backends come from when they are discovered through DNS.
    pub dns: Option<DnsSpec>,
}

impl PoolSpec {
    /// The registry scope of the pool's backend states.
    pub fn scope(&self) -> String {
        format!("pool:{}", self.name)
    }

    /// Compiles the pool, with backend states from `registry` under `scope`.
    fn compile(&self, scope: &str, registry: &mut Registry) -> Pool {
        let mut pool = compile_backends(scope, &self.backends, self.algorithm, registry)
            .with_ejection(self.ejection);
        pool.send_proxy = self.send_proxy;
        pool.health = self.health.clone();
        pool
    }
}

/// A pool of `backends` whose states come from `registry` under `scope`.
fn compile_backends(
    scope: &str,
    backends: &[BackendSpec],
    algorithm: Algorithm,
    registry: &mut Registry,
) -> Pool {
    let backends = backends
        .iter()
        .map(|b| Backend {
            weight: b.weight,
            max_sessions: b.max_sessions,
            backup: b.backup,
            ..Backend::with_state(b.addr, registry.backend(scope, b.addr))
        })
        .collect();
    Pool::with_algorithm(backends, algorithm)
}

/// How a pool's backends are discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSpec {
    pub query: crate::dns::Query,
    /// The DNS server asked; `None`: the first nameserver of /etc/resolv.conf.
    pub resolver: Option<SocketAddr>,
    pub interval: Duration,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: String,
    pub engine: EngineConfig,
    pub shutdown_timeout: Duration,
    /// Where the admin API listens; `None` without an `[admin]` section.
    pub admin: Option<AdminAddr>,
    /// Which records workers make besides close records.
    pub records: RecordPolicy,
    /// Connection-log sinks; empty means the process log.
    pub logs: Vec<SinkSpec>,
    /// Global firewall rules, in order, evaluated before each service's own.
    pub firewall: Vec<Rule>,
    /// The bandwidth block of each global rule, by rule index (empty: none).
    pub firewall_bandwidth: Vec<BandwidthSpec>,
    /// Named pools that rules can send sessions to.
    pub pools: Vec<PoolSpec>,
    pub services: Vec<ServiceSpec>,
    /// Distinct capture configurations, as rules and services name them by index.
    pub captures: Vec<CaptureSpec>,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&name, &text),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                file: name,
                line: 0,
                column: 0,
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
            }])),
        }
    }

    /// The file at `path`, or the embedded default when there is none.
    pub fn load_or_default(path: Option<&PathBuf>) -> Result<Config, ConfigErrors> {
        match path {
            Some(p) => Config::load(p),
            None => Config::parse(EMBEDDED_NAME, EMBEDDED_DEFAULT),
        }
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
        Config::parse_with(file, text, Names::Resolve)
    }

    /// Parses and validates TOML text, resolving backend host names as `names` says.
    pub fn parse_with(file: &str, text: &str, names: Names) -> Result<Config, ConfigErrors> {
        let raw: FileConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            ConfigErrors(vec![locate(file, text, span, None, message)])
        })?;
        let mut v = Validator { file, text, errors: Vec::new(), captures: Vec::new(), names };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }

    /// Compiles the services into tables with the given version. Counters and backend
    /// admin states come from `registry`, so they survive reloads for names that stay.
    pub fn tables(&self, version: u64, registry: &mut Registry) -> Tables {
        let services = self
            .services
            .iter()
            .map(|s| {
                let pool = match s.pool.and_then(|i| self.pools.get(i)) {
                    Some(p) => p.compile(&p.scope(), registry),
                    None => compile_backends(&s.name, &s.backends, Algorithm::RoundRobin, registry),
                };
                let mut service = Service::new(&s.name, s.listen.clone(), pool, s.timeouts);
                service.rules = registry.rules(&s.name, &s.rules, &s.rule_bandwidth);
                service.default = s.default;
                service.default_hits = registry.hits(&s.name, DEFAULT_RULE);
                service.counters = registry.service(&s.name);
                service.accept_proxy = s.accept_proxy.clone();
                service.limits = s.limits;
                service.limit_state = registry.limit_state(&s.name);
                service.bandwidth = registry.bandwidth(&s.name, "", s.bandwidth);
                service.protocol = s.protocol;
                service.udp_idle_timeout = s.udp_idle_timeout;
                service.capture = s.capture;
                service.max_sessions = s.max_sessions;
                service
            })
            .collect();
        let pools = self
            .pools
            .iter()
            .map(|p| NamedPool {
                name: Arc::from(p.name.as_str()),
                pool: p.compile(&p.scope(), registry),
            })
            .collect();
        let firewall = registry.rules(FIREWALL_SCOPE, &self.firewall, &self.firewall_bandwidth);
        let captures = registry.captures(&self.captures);
        Tables::new(version, services)
            .with_records(self.records)
            .with_firewall(firewall, pools)
            .with_captures(captures)
    }
}

/// Counters and backend states by service name (and backend address), carried from one
/// compilation of the tables to the next.
#[derive(Debug, Default)]
pub struct Registry {
    services: HashMap<String, Arc<ServiceCounters>>,
    backends: HashMap<(String, SocketAddr), Arc<BackendState>>,
    /// Verdicts per (scope, rule name): scope is "firewall" or a service name.
    hits: HashMap<(String, String), Arc<AtomicU64>>,
    /// Session-limit counters by service name.
    limits: HashMap<String, Arc<LimitState>>,
    /// Bandwidth blocks (their shared buckets) per (scope, rule name; "" for the service's
    /// own), kept while their rates stay the same.
    bandwidth: HashMap<(String, String), Arc<Bandwidth>>,
    /// Capture counters of the process, and its capture thread once a capture is configured.
    capture_stats: Arc<CaptureStats>,
    capturer: Option<Capturer>,
    /// Bytes held by the capture files of each directory, so `max_total` spans reloads.
    capture_used: HashMap<PathBuf, Arc<AtomicU64>>,
}

impl Registry {
    fn hits(&mut self, scope: &str, rule: &str) -> Arc<AtomicU64> {
        self.hits.entry((scope.to_string(), rule.to_string())).or_default().clone()
    }

    /// Compiles rules, with the counters and bandwidth state their names had before.
    fn rules(&mut self, scope: &str, rules: &[Rule], bandwidth: &[BandwidthSpec]) -> Rules {
        let hits = rules.iter().map(|r| self.hits(scope, &r.name)).collect();
        let bandwidth = rules
            .iter()
            .zip(bandwidth)
            .map(|(r, &spec)| self.bandwidth(scope, &r.name, spec))
            .collect();
        Rules { set: RuleSet::compile(rules.to_vec()), hits, bandwidth }
    }

    fn limit_state(&mut self, service: &str) -> Arc<LimitState> {
        self.limits.entry(service.to_string()).or_default().clone()
    }

    /// The bandwidth block of `scope`'s rule `rule`, or `None` for an empty one. A block
    /// whose rates did not change keeps its buckets, so a reload neither refills nor
    /// doubles a shared budget.
    fn bandwidth(
        &mut self,
        scope: &str,
        rule: &str,
        spec: BandwidthSpec,
    ) -> Option<Arc<Bandwidth>> {
        let key = (scope.to_string(), rule.to_string());
        if spec.is_empty() {
            self.bandwidth.remove(&key);
            return None;
        }
        let entry = self.bandwidth.entry(key).or_insert_with(|| Arc::new(Bandwidth::new(spec)));
        if entry.spec != spec {
            *entry = Arc::new(Bandwidth::new(spec));
        }
        Some(entry.clone())
    }

    /// Capture policies for `specs`; the capture thread starts with the first one. Without
    /// a capture thread (it could not start) sessions are relayed uncaptured.
    fn captures(&mut self, specs: &[CaptureSpec]) -> Vec<Arc<CapturePolicy>> {
        if specs.is_empty() {
            return Vec::new();
        }
        if self.capturer.is_none() {
            match Capturer::start(self.capture_stats.clone()) {
                Ok(c) => self.capturer = Some(c),
                Err(e) => {
                    log::error!("cannot start the capture thread: {e}; capture is off");
                    return Vec::new();
                }
            }
        }
        let Some(capturer) = &self.capturer else { return Vec::new() };
        specs
            .iter()
            .map(|spec| {
                let used = self
                    .capture_used
                    .entry(spec.dir.clone())
                    .or_insert_with(|| Arc::new(AtomicU64::new(captured_bytes(&spec.dir))))
                    .clone();
                Arc::new(CapturePolicy::new(spec.clone(), used, capturer.clone()))
            })
            .collect()
    }

    /// Capture counters (zero while nothing is captured).
    pub fn capture_stats(&self) -> Arc<CaptureStats> {
        self.capture_stats.clone()
    }

    /// Finishes every capture file; call once the workers have stopped.
    pub fn stop_capture(&self) {
        if let Some(c) = &self.capturer {
            c.stop(CAPTURE_STOP_TIMEOUT);
        }
    }

    fn service(&mut self, name: &str) -> Arc<ServiceCounters> {
        self.services.entry(name.to_string()).or_default().clone()
    }

    fn backend(&mut self, service: &str, addr: SocketAddr) -> Arc<BackendState> {
        let key = (service.to_string(), addr);
        self.backends.entry(key).or_insert_with(|| Arc::new(BackendState::new(addr))).clone()
    }

    /// Forgets services and backends the configuration no longer has (call once its tables
    /// are in force).
    pub fn retain(&mut self, config: &Config) {
        self.capture_used.retain(|dir, _| config.captures.iter().any(|c| &c.dir == dir));
        let names: HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        self.services.retain(|name, _| names.contains(name.as_str()));
        self.limits.retain(|name, _| names.contains(name.as_str()));
        self.bandwidth
            .retain(|(scope, _), _| scope == FIREWALL_SCOPE || names.contains(scope.as_str()));
        let has = |list: &[BackendSpec], addr: &SocketAddr| list.iter().any(|b| b.addr == *addr);
        self.backends.retain(|(name, addr), _| {
            config.services.iter().any(|s| &s.name == name && has(&s.backends, addr))
                || config.pools.iter().any(|p| *name == p.scope() && has(&p.backends, addr))
        });
        self.hits.retain(|(scope, rule), _| {
            let in_rules = |rules: &[Rule]| rules.iter().any(|r| &*r.name == rule);
            (scope == FIREWALL_SCOPE && in_rules(&config.firewall))
                || config
                    .services
                    .iter()
                    .any(|s| &s.name == scope && (rule == DEFAULT_RULE || in_rules(&s.rules)))
        });
    }
}

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
    /// Distinct capture configurations seen so far.
    captures: Vec<CaptureSpec>,
    names: Names,
}

/// How backend host names are turned into addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// Resolved through the system resolver (DNS), as `run` and `check` do.
    Resolve,
    /// Not resolved: a host name is an error. Parsing then does no I/O at all (for
    /// fuzzing and other untrusted input).
    Offline,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        self.errors.push(locate(self.file, self.text, span, Some(key), message.into()));
    }

    fn config(&mut self, raw: FileConfig) -> Config {
        let engine = self.engine(&raw.engine);
        let shutdown_timeout = raw
            .engine
            .shutdown_timeout
            .as_ref()
            .and_then(|d| self.duration(d, "engine.shutdown_timeout"))
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
        let admin = raw.admin.as_ref().and_then(|a| self.admin(a));
        let records = raw.records.as_ref().map(|r| self.records(r)).unwrap_or_default();
        let logs = raw.logs.iter().enumerate().filter_map(|(i, l)| self.log(i, l)).collect();
        let pools = self.pools(&raw.pools, admin.as_ref());
        let (firewall, firewall_bandwidth) =
            self.rules("firewall", "firewall", &raw.firewall, &pools);
        if raw.services.is_empty() {
            self.error(0..0, "service", "at least one [[service]] is required");
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        let mut services = Vec::new();
        for (i, s) in raw.services.iter().enumerate() {
            let spec = self.service(i, s, admin.as_ref(), &pools);
            if !names.insert(spec.name.clone()) {
                self.error(
                    s.name.span(),
                    &format!("service[{i}].name"),
                    format!("duplicate service name {:?}", spec.name),
                );
            }
            for (j, addr) in spec.listen.iter().enumerate() {
                if !listens.insert((spec.protocol, *addr)) {
                    let span = s.listen.get_ref()[j].span();
                    self.error(
                        span,
                        &format!("service[{i}].listen"),
                        format!("{addr} is already a listen address of another service"),
                    );
                }
            }
            services.push(spec);
        }
        Config {
            source: self.file.to_string(),
            engine,
            shutdown_timeout,
            admin,
            records,
            logs,
            firewall,
            firewall_bandwidth,
            pools,
            services,
            captures: std::mem::take(&mut self.captures),
        }
    }

    /// A capture configuration, by index among the distinct ones (equal ones share one).
    fn capture(&mut self, raw: &Spanned<CaptureSection>, key: &str) -> Option<usize> {
        let before = self.errors.len();
        let c = raw.get_ref();
        let dir = c.dir.get_ref().trim();
        if dir.is_empty() {
            self.error(c.dir.span(), &format!("{key}.dir"), "must name a directory");
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
            Ok(n) if n >= MIN_CAPTURE_SIZE => Some(n),
            Ok(_) => {
                self.error(value.span(), key, format!("must be at least {MIN_CAPTURE_SIZE} bytes"));
                None
            }
            Err(message) => {
                self.error(value.span(), key, message);
                None
            }
        }
    }

    fn records(&mut self, raw: &RecordsSection) -> RecordPolicy {
        let interim = raw.interim.as_ref().and_then(|d| self.duration(d, "records.interim"));
        RecordPolicy { open: raw.open.unwrap_or(false), interim }
    }

    fn log(&mut self, i: usize, raw: &LogSection) -> Option<SinkSpec> {
        let key = |k: &str| format!("log[{i}].{k}");
        let before = self.errors.len();
        let target = match raw.kind.get_ref().as_str() {
            "file" => match &raw.path {
                Some(p) => Some(Target::File(PathBuf::from(p.get_ref()))),
                None => {
                    self.error(raw.kind.span(), &key("path"), "a file sink needs a path");
                    None
                }
            },
            "stdout" => Some(Target::Stdout),
            "syslog" => {
                let addr = match &raw.address {
                    None => Some(SyslogAddr::Unix(DEFAULT_SYSLOG_SOCKET.into())),
                    Some(a) => SyslogAddr::parse(a.get_ref())
                        .map_err(|m| self.error(a.span(), &key("address"), m))
                        .ok(),
                };
                let facility = match &raw.facility {
                    None => Some(DEFAULT_SYSLOG_FACILITY),
                    Some(f) => sinks::facility(f.get_ref())
                        .map_err(|m| self.error(f.span(), &key("facility"), m))
                        .ok(),
                };
                let tag = raw.tag.clone().unwrap_or_else(|| "sluice".into());
                addr.zip(facility).map(|(addr, facility)| Target::Syslog { addr, facility, tag })
            }
            other => {
                self.error(
                    raw.kind.span(),
                    &key("type"),
                    format!(
                        "unknown sink type {other:?}; expected \"file\", \"syslog\" or \"stdout\""
                    ),
                );
                None
            }
        };
        let format = self.log_format(raw, &key);
        let mut filter =
            Filter { services: raw.services.iter().cloned().collect(), ..Filter::default() };
        for k in &raw.kinds {
            match k.get_ref().as_str() {
                "open" => filter.kinds.insert(RecordKind::Open),
                "interim" => filter.kinds.insert(RecordKind::Interim),
                "close" => filter.kinds.insert(RecordKind::Close),
                "deny" => filter.kinds.insert(RecordKind::Deny),
                other => {
                    self.error(
                        k.span(),
                        &key("kinds"),
                        format!(
                            "unknown record kind {other:?}; expected open, interim, close or deny"
                        ),
                    );
                    false
                }
            };
        }
        for v in &raw.verdicts {
            match v.get_ref().as_str() {
                "allow" => filter.verdicts.insert(Verdict::Allow),
                "deny" => filter.verdicts.insert(Verdict::Deny),
                other => {
                    self.error(
                        v.span(),
                        &key("verdicts"),
                        format!("unknown verdict {other:?}; expected allow or deny"),
                    );
                    false
                }
            };
        }
        for r in &raw.reasons {
            if CloseReason::ALL.iter().any(|c| c.as_str() == r.get_ref()) {
                filter.reasons.insert(r.get_ref().clone());
            } else {
                let known: Vec<&str> = CloseReason::ALL.iter().map(|c| c.as_str()).collect();
                self.error(
                    r.span(),
                    &key("reasons"),
                    format!(
                        "unknown close reason {:?}; expected one of {}",
                        r.get_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
        if self.errors.len() > before {
            return None;
        }
        let name = raw.name.clone().unwrap_or_else(|| format!("log{i}"));
        Some(SinkSpec { name, target: target?, format: format?, filter })
    }

    /// JSON lines unless a template is given or `format = "text"`.
    fn log_format(&mut self, raw: &LogSection, key: &dyn Fn(&str) -> String) -> Option<Format> {
        let format = raw.format.as_ref().map(|f| f.get_ref().as_str());
        match (format, &raw.template) {
            (Some("json") | None, None) => Some(Format::Json),
            (Some("json"), Some(t)) => {
                self.error(t.span(), &key("template"), "a template needs format = \"text\"");
                None
            }
            (Some("text") | None, t) => {
                let (text, span) = t
                    .as_ref()
                    .map_or((DEFAULT_TEMPLATE, 0..0), |t| (t.get_ref().as_str(), t.span()));
                let built_in = t.is_none();
                Template::parse(text)
                    .map(|t| match built_in {
                        true => t.with_udp(Template::parse(DEFAULT_UDP_TEMPLATE).expect("valid")),
                        false => t,
                    })
                    .map(Format::Text)
                    .map_err(|m| self.error(span, &key("template"), m))
                    .ok()
            }
            (Some(other), _) => {
                let span = raw.format.as_ref().map_or(0..0, |f| f.span());
                self.error(
                    span,
                    &key("format"),
                    format!("unknown format {other:?}; expected \"json\" or \"text\""),
                );
                None
            }
        }
    }

    fn admin(&mut self, raw: &AdminSection) -> Option<AdminAddr> {
        let Some(listen) = &raw.listen else {
            return AdminAddr::parse(DEFAULT_ADMIN_LISTEN).ok();
        };
        match AdminAddr::parse(listen.get_ref()) {
            Ok(addr) => Some(addr),
            Err(message) => {
                self.error(listen.span(), "admin.listen", message);
                None
            }
        }
    }

    fn engine(&mut self, raw: &EngineSection) -> EngineConfig {
        let mut engine = EngineConfig::default();
        if let Some(w) = &raw.workers {
            match w.get_ref() {
                Workers::Named(s) if s == "auto" => {}
                Workers::Count(n) if (1..=MAX_WORKERS).contains(n) => engine.workers = *n as usize,
                _ => self.error(
                    w.span(),
                    "engine.workers",
                    format!("expected \"auto\" or a number from 1 to {MAX_WORKERS}"),
                ),
            }
        }
        if let Some(pin) = raw.pin {
            engine.pin = pin;
        }
        if let Some(d) = &raw.driver {
            match d.get_ref().parse::<DriverChoice>() {
                Ok(choice) => engine.driver = choice,
                Err(message) => self.error(d.span(), "engine.driver", message),
            }
        }
        if let Some(r) = &raw.relay {
            match r.get_ref().parse() {
                Ok(relay) => engine.relay = relay,
                Err(message) => self.error(r.span(), "engine.relay", message),
            }
        }
        if let Some(size) = self.size(&raw.pipe_size, "engine.pipe_size") {
            engine.pipe_size = size;
        }
        if let Some(size) = self.size(&raw.buffer_size, "engine.buffer_size") {
            engine.buffer_size = size;
        }
        engine.max_sessions = self.max_sessions(&raw.max_sessions, "engine.max_sessions");
        self.udp_engine(raw, &mut engine);
        engine
    }

    /// `engine.max_flows` and `engine.udp_max_datagram`.
    fn udp_engine(&mut self, raw: &EngineSection, engine: &mut EngineConfig) {
        if let Some(n) = &raw.max_flows {
            match usize::try_from(*n.get_ref()) {
                Ok(v) if (1..=MAX_FLOWS).contains(n.get_ref()) => engine.max_flows = v,
                _ => self.error(
                    n.span(),
                    "engine.max_flows",
                    format!("expected a number of flows per worker from 1 to {MAX_FLOWS}"),
                ),
            }
        }
        let Some(value) = &raw.udp_max_datagram else { return };
        let parsed = value.get_ref().bytes();
        match parsed {
            Ok(n) if (MIN_UDP_DATAGRAM..=MAX_UDP_DATAGRAM).contains(&n) => {
                engine.udp_max_datagram = n as usize;
            }
            Ok(_) => self.error(
                value.span(),
                "engine.udp_max_datagram",
                format!("must be between {MIN_UDP_DATAGRAM} and {MAX_UDP_DATAGRAM} bytes"),
            ),
            Err(message) => self.error(value.span(), "engine.udp_max_datagram", message),
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

    /// A session cap: a positive number of sessions; absent means no cap.
    fn max_sessions(&mut self, value: &Option<Spanned<i64>>, key: &str) -> Option<u64> {
        let value = value.as_ref()?;
        match u64::try_from(*value.get_ref()) {
            Ok(n) if (1..=MAX_SESSIONS_CAP).contains(&n) => Some(n),
            _ => {
                let message = format!(
                    "expected a number of sessions from 1 to {MAX_SESSIONS_CAP}; leave it out for no cap"
                );
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// A pipe or buffer size within the accepted range.
    fn size(&mut self, value: &Option<Spanned<Size>>, key: &str) -> Option<usize> {
        let value = value.as_ref()?;
        let parsed = value.get_ref().bytes();
        match parsed {
            Ok(n) if (MIN_PIPE_SIZE..=MAX_PIPE_SIZE).contains(&n) => Some(n as usize),
            Ok(_) => {
                let message = format!("must be between {MIN_PIPE_SIZE} and {MAX_PIPE_SIZE} bytes");
                self.error(value.span(), key, message);
                None
            }
            Err(message) => {
                self.error(value.span(), key, message);
                None
            }
        }
    }

    fn pools(&mut self, raw: &[PoolSection], admin: Option<&AdminAddr>) -> Vec<PoolSpec> {
        let mut names = HashSet::new();
        let mut pools = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let key = format!("pool[{i}]");
            let name = p.name.get_ref().trim().to_string();
            if name.is_empty() || !names.insert(name.clone()) {
                let message = format!("pool names must be unique and not empty ({name:?})");
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
        PoolSpec { name, backends, algorithm, ejection, send_proxy, health, dns }
    }

    /// A value parsed from text, or an error at its position.
    fn parsed<T>(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = value.as_ref()?;
        parse(value.get_ref()).map_err(|m| self.error(value.span(), key, m)).ok()
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
                    Ok(n) if (1..=100).contains(&n) => *slot = n,
                    _ => self.error(v.span(), &k(field), "must be a count from 1 to 100"),
                }
            }
        }
        h.send = raw.send.clone().unwrap_or_default().into_bytes();
        h.expect = raw.expect.clone().unwrap_or_default().into_bytes();
        h
    }

    fn backends(
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

    /// An ordered rule list; `prefix` names keys in errors, `scope` names rules without a
    /// `name` (`firewall.0`, `web.rule.2`).
    fn rules(
        &mut self,
        prefix: &str,
        scope: &str,
        raw: &[RuleSection],
        pools: &[PoolSpec],
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
            let spec = self.bandwidth(keys, &key);
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
        (self.errors.len() == before).then_some(rule)
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

    /// Parses every entry of a list, reporting each bad one at its own position.
    fn list<T>(
        &mut self,
        items: &[Spanned<String>],
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        items
            .iter()
            .filter_map(|item| {
                parse(item.get_ref()).map_err(|m| self.error(item.span(), key, m)).ok()
            })
            .collect()
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

    fn service(
        &mut self,
        i: usize,
        raw: &ServiceSection,
        admin: Option<&AdminAddr>,
        pools: &[PoolSpec],
    ) -> ServiceSpec {
        let key = |k: &str| format!("service[{i}].{k}");
        let name = raw.name.get_ref().trim().to_string();
        if name.is_empty() {
            self.error(raw.name.span(), &key("name"), "must not be empty");
        }
        if raw.listen.get_ref().is_empty() {
            self.error(raw.listen.span(), &key("listen"), "at least one address is required");
        }
        let listen = raw
            .listen
            .get_ref()
            .iter()
            .filter_map(|a| match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error(a.span(), &key("listen"), format!("{:?} is not an address:port such as \"127.0.0.1:8080\" or \"[::1]:8080\"", a.get_ref()));
                    None
                }
            })
            .collect();
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
        let (protocol, udp_idle_timeout) = self.protocol(raw, &key);
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
        let (rules, rule_bandwidth) =
            self.rules(&key("rule"), &format!("{name}.rule"), &raw.rules, pools);
        let keys = BandwidthKeys {
            both: raw.bandwidth.as_ref(),
            up: raw.bandwidth_up.as_ref(),
            down: raw.bandwidth_down.as_ref(),
        };
        let bandwidth = self.bandwidth(keys, &format!("service[{i}]"));
        let limits = self.limits(raw.limits.as_ref(), &format!("service[{i}]"));
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
        let max_sessions = self.max_sessions(&raw.max_sessions, &key("max_sessions"));
        ServiceSpec {
            name,
            listen,
            backends,
            pool,
            accept_proxy,
            timeouts,
            protocol,
            udp_idle_timeout,
            rules,
            default,
            rule_bandwidth,
            bandwidth,
            limits,
            capture,
            max_sessions,
        }
    }

    fn duration(&mut self, value: &Spanned<String>, key: &str) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.error(value.span(), key, "must be greater than zero");
                None
            }
            Err(message) => {
                self.error(value.span(), key, message);
                None
            }
        }
    }
}

/// Bytes already held by capture files (`*.pcapng`) in `dir`: they count against
/// `max_total` from the start.
fn captured_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pcapng"))
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Parses untrusted bytes as a configuration and compiles what validates into tables, with
/// no I/O (host names are not resolved). What the `config` fuzz target and its corpus
/// replay run: any input must return, without a panic, in bounded time and memory.
pub fn check_untrusted(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::parse_with("fuzz.toml", text, Names::Offline) {
        let tables = config.tables(1, &mut Registry::default());
        assert_eq!(tables.services().len(), config.services.len());
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

/// Parses a client network: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let t = text.trim();
    if let Ok(net) = t.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from).map_err(|_| {
        format!("{text:?} is not a network such as \"10.0.0.0/8\", \"2001:db8::/32\" or an address")
    })
}

/// Parses a duration such as "500ms", "3s", "1.5s", "10m", "1h" or "2d".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || {
        format!("{text:?} is not a duration such as \"500ms\", \"3s\", \"10m\", \"1h\" or \"2d\"")
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Parses a size such as "65536", "64 KiB", "1 MiB" or "100 KB" (KiB/MiB/GiB are powers of
/// 1024, KB/MB/GB of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || format!("{text:?} is not a size such as \"65536\", \"64 KiB\" or \"1 MiB\"");
    let value: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    value.checked_mul(scale).ok_or_else(bad)
}

/// Turns a byte span into line and column (1-based) and finds the key it belongs to.
fn locate(
    file: &str,
    text: &str,
    span: Range<usize>,
    key: Option<&str>,
    message: String,
) -> ConfigError {
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let key = key.map(str::to_string).unwrap_or_else(|| key_at(text, start));
    ConfigError { file: file.to_string(), line, column, key, message }
}

/// The dotted key at a byte offset: the table header above it plus the key on its line.
fn key_at(text: &str, offset: usize) -> String {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if line.starts_with('[') {
        return line.trim_matches(|c| c == '[' || c == ']').trim().to_string();
    }
    let local = line.split('=').next().filter(|_| line.contains('=')).map(|k| k.trim().to_string());
    match (header, local) {
        (Some(h), Some(k)) => format!("{h}.{k}"),
        (None, Some(k)) => k,
        (Some(h), None) => h,
        (None, None) => "(document)".to_string(),
    }
}

/// Default values, for `sluice check` and the documentation.
pub fn defaults_summary() -> String {
    format!(
        "connect_timeout={:?} idle_timeout={:?} fin_timeout={:?} shutdown_timeout={:?} relay=copy buffer_size={} pipe_size={} udp_idle_timeout={:?} max_flows={} udp_max_datagram={}",
        tables::DEFAULT_CONNECT_TIMEOUT,
        tables::DEFAULT_IDLE_TIMEOUT,
        tables::DEFAULT_FIN_TIMEOUT,
        DEFAULT_SHUTDOWN_TIMEOUT,
        sluice_engine::worker::DEFAULT_BUFFER_SIZE,
        sluice_engine::worker::DEFAULT_PIPE_SIZE,
        tables::DEFAULT_UDP_IDLE_TIMEOUT,
        sluice_engine::udp::DEFAULT_MAX_FLOWS,
        sluice_engine::udp::DEFAULT_MAX_DATAGRAM
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::parse("test.toml", text).expect_err("config should be rejected").0
    }

    const MINIMAL: &str = "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:8000\"]\n";

    #[test]
    fn durations_take_the_documented_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "3", "s", "3 weeks", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_distinguish_binary_and_decimal_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64 KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("100 KB"), Ok(100_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999999999 GiB").is_err());
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = Config::parse("test.toml", MINIMAL).unwrap();
        let s = &c.services[0];
        assert_eq!(s.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(s.timeouts, Timeouts::default());
        assert_eq!(c.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(c.engine.driver, DriverChoice::Auto);
        assert!(c.engine.pin);
    }

    #[test]
    fn ipv6_and_several_addresses_are_accepted() {
        let text = "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\", \"[::1]:1\"]\nbackends = [\"[::1]:2\", \"localhost:3\"]\n";
        let c = Config::parse("t", text).unwrap();
        assert_eq!(c.services[0].listen.len(), 2);
        assert!(c.services[0].backends.len() >= 2);
    }

    #[test]
    fn session_caps_are_read_for_the_engine_and_each_service() {
        let text = "[engine]\nmax_sessions = 1000\n\n[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\nmax_sessions = 10\n\n[[service]]\nname = \"b\"\nlisten = [\"127.0.0.1:3\"]\nbackends = [\"127.0.0.1:2\"]\n";
        let c = Config::parse("t", text).unwrap();
        assert_eq!(c.engine.max_sessions, Some(1000));
        assert_eq!(c.services[0].max_sessions, Some(10));
        assert_eq!(c.services[1].max_sessions, None, "no cap unless configured");
        let tables = c.tables(1, &mut Registry::default());
        assert_eq!(tables.services()[0].max_sessions, Some(10));
        assert_eq!(Config::parse("t", MINIMAL).unwrap().engine.max_sessions, None);
    }

    #[test]
    fn a_bad_session_cap_names_its_key_and_line() {
        let e = errors(&format!("[engine]\nmax_sessions = 0\n\n{MINIMAL}max_sessions = -5\n"));
        let keys: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(keys, [(2, "engine.max_sessions"), (8, "service[0].max_sessions")], "{e:?}");
        assert!(e[0].message.contains("leave it out for no cap"), "{}", e[0].message);
    }

    #[test]
    fn offline_parsing_rejects_host_names_without_resolving_them() {
        let text =
            "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"localhost:3\"]\n";
        let e = Config::parse_with("t", text, Names::Offline).unwrap_err().0;
        assert_eq!(e[0].key, "service[0].backends");
        assert!(e[0].message.contains("not resolved"), "{}", e[0].message);
        check_untrusted(text.as_bytes());
        check_untrusted(b"\xff\xfe not utf-8");
    }

    #[test]
    fn bad_toml_is_located_by_line_and_column() {
        let e = errors("[engine]\nworkers = 2\npin = \n");
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].file.as_str(), e[0].line), ("test.toml", 3));
        assert!(e[0].to_string().starts_with("test.toml:3:"), "{}", e[0]);
    }

    #[test]
    fn unknown_key_names_the_key_and_its_line() {
        let e = errors(&format!("{MINIMAL}colour = \"blue\"\n"));
        assert_eq!(e[0].line, 5);
        assert_eq!(e[0].key, "service.colour");
        assert!(e[0].message.contains("unknown field"), "{}", e[0].message);
    }

    #[test]
    fn every_validation_error_is_reported_with_its_key() {
        let text = "[engine]\nworkers = 0\ndriver = \"kqueue\"\n\n[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:99999\"]\nbackends = [\"nowhere\"]\nidle_timeout = \"soon\"\n";
        let e = errors(text);
        let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (2, "engine.workers"),
                (3, "engine.driver"),
                (7, "service[0].listen"),
                (8, "service[0].backends"),
                (9, "service[0].idle_timeout"),
            ]
        );
        assert_eq!(e[2].column, 11);
    }

    const UDP: &str = "[engine]\nmax_flows = 100\nudp_max_datagram = \"1 KiB\"\n\n[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:53\"]\nudp_idle_timeout = \"5s\"\n";

    #[test]
    fn udp_services_take_their_keys_and_share_addresses_with_tcp() {
        let c = Config::parse("t", &format!("{UDP}\n{MINIMAL}")).unwrap();
        assert_eq!((c.engine.max_flows, c.engine.udp_max_datagram), (100, 1024));
        let dns = &c.services[0];
        assert_eq!((dns.protocol, dns.udp_idle_timeout), (Protocol::Udp, Duration::from_secs(5)));
        assert_eq!(c.services[1].protocol, Protocol::Tcp);
        assert_eq!(c.services[1].udp_idle_timeout, tables::DEFAULT_UDP_IDLE_TIMEOUT);
        let t = c.tables(1, &mut Registry::default());
        let addr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!((t.udp_service_for(addr), t.service_for(addr)), (Some(0), Some(1)));
        assert_eq!(t.listen_addrs(), vec![addr]);
        assert_eq!(t.udp_listen_addrs(), vec![addr]);
        let d = Config::parse("t", MINIMAL).unwrap();
        assert_eq!(d.engine.max_flows, sluice_engine::udp::DEFAULT_MAX_FLOWS);
        assert_eq!(d.engine.udp_max_datagram, sluice_engine::udp::DEFAULT_MAX_DATAGRAM);
    }

    #[test]
    fn bad_udp_keys_are_reported_with_line_and_key() {
        let text = "[engine]\nmax_flows = 0\nudp_max_datagram = 70000\n\n[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\nfin_timeout = \"1s\"\n\n[[service]]\nname = \"web\"\nprotocol = \"sctp\"\nlisten = [\"127.0.0.1:3\"]\nbackends = [\"127.0.0.1:4\"]\nudp_idle_timeout = \"1s\"\n\n[[service]]\nname = \"dns2\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"127.0.0.1:2\"]\n";
        let e = errors(text);
        let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (2, "engine.max_flows"),
                (3, "engine.udp_max_datagram"),
                (10, "service[0].fin_timeout"),
                (14, "service[1].protocol"),
                (17, "service[1].udp_idle_timeout"),
                (22, "service[2].listen"),
            ]
        );
    }

    #[test]
    fn listen_addresses_are_unique_across_services() {
        let text = format!("{MINIMAL}\n[[service]]\nname = \"web2\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:8001\"]\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].key.as_str()), (8, "service[1].listen"));
    }

    #[test]
    fn admin_section_defaults_to_loopback_and_can_be_a_backend() {
        let text = format!("[admin]\n{MINIMAL}").replace("\"127.0.0.1:8000\"", "\"admin\"");
        let c = Config::parse("t", &text).unwrap();
        assert_eq!(c.admin, Some(AdminAddr::Tcp("127.0.0.1:9900".parse().unwrap())));
        assert_eq!(
            c.services[0].backends,
            vec![BackendSpec::plain("127.0.0.1:9900".parse().unwrap())]
        );
        assert!(Config::parse("t", MINIMAL).unwrap().admin.is_none());
        let e = errors(&MINIMAL.replace("\"127.0.0.1:8000\"", "\"admin\""));
        assert_eq!(e[0].key, "service[0].backends");
        let e = errors(&format!("[admin]\nlisten = \"nowhere\"\n{MINIMAL}"));
        assert_eq!((e[0].line, e[0].key.as_str()), (2, "admin.listen"));
    }

    #[test]
    fn captures_take_defaults_and_are_shared_by_equal_settings() {
        let text = format!(
            "[[firewall]]\naction = \"allow\"\nfrom = [\"10.0.0.0/8\"]\ncapture = {{ dir = \"/var/cap\", max_file = \"1 MB\", max_total = \"1 GB\", snaplen = 128 }}\n\n{MINIMAL}capture = {{ dir = \"/var/cap\" }}\n\n[[service.rule]]\naction = \"allow\"\ncapture = {{ dir = \"/var/cap\" }}\n"
        );
        let c = Config::parse("t.toml", &text).unwrap();
        assert_eq!(c.captures.len(), 2, "equal settings share one capture");
        assert_eq!(c.captures[0].max_file, 1_000_000);
        assert_eq!(c.captures[0].max_total, 1_000_000_000);
        assert_eq!(c.captures[0].snaplen, 128);
        let d = &c.captures[1];
        let defaults = (
            sluice_engine::capture::DEFAULT_MAX_FILE,
            sluice_engine::capture::DEFAULT_MAX_TOTAL,
            sluice_engine::capture::DEFAULT_SNAPLEN,
        );
        assert_eq!((d.max_file, d.max_total, d.snaplen), defaults);
        assert_eq!(c.firewall[0].capture, Some(0));
        assert_eq!(c.services[0].capture, Some(1));
        assert_eq!(c.services[0].rules[0].capture, Some(1));
    }

    #[test]
    fn every_bad_capture_value_is_reported_with_line_and_key() {
        let text = format!(
            "[[firewall]]\naction = \"deny\"\ncapture = {{ dir = \"/c\" }}\n\n{MINIMAL}capture = {{ dir = \"\", max_file = \"2 MB\", max_total = \"1 MB\", snaplen = 10 }}\n\n[[service.rule]]\naction = \"allow\"\ncapture = {{ dir = \"/c\", max_file = \"12 parsecs\" }}\n"
        );
        let e = errors(&text);
        let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert!(found.contains(&(3, "firewall[0].capture")), "{e:?}");
        for key in ["dir", "snaplen", "max_total"] {
            let key = format!("service[0].capture.{key}");
            assert!(found.contains(&(9, key.as_str())), "{key}: {e:?}");
        }
        assert!(found.contains(&(13, "service[0].rule[0].capture.max_file")), "{e:?}");
        let e =
            errors(&format!("{MINIMAL}capture = {{ dir = \"/c\", max_file = \"12 parsecs\" }}\n"));
        assert_eq!((e[0].line, e[0].key.as_str()), (5, "service[0].capture.max_file"));
        let e = errors(&format!("{MINIMAL}capture = {{ dir = \"/c\", size = 1 }}\n"));
        assert_eq!(e[0].line, 5);
        assert!(e[0].message.contains("size"), "{:?}", e[0]);
        let e = errors(&format!("{MINIMAL}capture = {{ dir = \"/c\", max_total = 100 }}\n"));
        assert_eq!(e[0].key, "service[0].capture.max_total");
    }

    #[test]
    fn firewall_rules_compile_with_pools_and_defaults() {
        let text = format!(
            "[[firewall]]\nname = \"block\"\naction = \"deny\"\nreset = true\nfrom = [\"10.0.0.0/8\", \"192.0.2.1\"]\n\n[[pool]]\nname = \"office\"\nbackends = [\"127.0.0.1:9001\"]\n\n{MINIMAL}default = \"reject\"\n\n[[service.rule]]\naction = \"allow\"\npool = \"office\"\nfrom_port = [22, \"1024-2048\"]\nto = [\":8080\"]\nsni = [\"*.example.com\"]\ntime = [\"Mon-Fri 08:00-18:00\"]\ntimezone = \"UTC\"\n"
        );
        let c = Config::parse("t", &text).unwrap();
        assert_eq!(c.firewall.len(), 1);
        assert_eq!(&*c.firewall[0].name, "block");
        assert_eq!(c.firewall[0].action, Action::Deny { reset: true });
        assert_eq!(c.firewall[0].from.len(), 2);
        let s = &c.services[0];
        assert_eq!(s.default, Action::Deny { reset: true });
        assert_eq!(s.rules[0].action, Action::Allow { pool: Some(0) });
        assert_eq!(&*s.rules[0].name, "web.rule.0");
        assert_eq!(s.rules[0].from_port, vec![22..=22, 1024..=2048]);
        let mut registry = Registry::default();
        let t = c.tables(1, &mut registry);
        assert!(t.needs_sni(0));
        assert_eq!(&*t.pools[0].name, "office");
    }

    #[test]
    fn every_bad_firewall_value_is_reported_with_line_and_key() {
        let text = format!(
            "[[firewall]]\naction = \"allow\"\nreset = true\nfrom = [\"10.0.0.0/33\"]\n\n{MINIMAL}default = \"maybe\"\n\n[[service.rule]]\naction = \"allow\"\npool = \"nowhere\"\nfrom_port = [\"9-2\"]\nsni = [\"bad name!\"]\ntime = [\"Someday 10:00-11:00\"]\ntimezone = \"UTC\"\n"
        );
        let e = errors(&text);
        let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (3, "firewall[0].reset"),
                (4, "firewall[0].from"),
                (14, "service[0].rule[0].pool"),
                (15, "service[0].rule[0].from_port"),
                (16, "service[0].rule[0].sni"),
                (17, "service[0].rule[0].time"),
                (10, "service[0].default"),
            ]
        );
        let e = errors(&format!("{MINIMAL}\n[[service.rule]]\naction = \"deny\"\ntime = [\"10:00-11:00\"]\ntimezone = \"Nowhere/Atlantis\"\n"));
        assert_eq!((e[0].line, e[0].key.as_str()), (9, "service[0].rule[0].timezone"));
    }

    #[test]
    fn a_config_without_services_is_rejected() {
        assert!(errors("[engine]\nworkers = 1\n")[0].message.contains("[[service]]"));
    }

    #[test]
    fn the_embedded_default_is_valid_and_forwards_8080_to_8000() {
        let c = Config::load_or_default(None).unwrap();
        assert_eq!(c.services[0].listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(
            c.services[0].backends,
            vec![BackendSpec::plain("127.0.0.1:8000".parse().unwrap())]
        );
    }

    #[test]
    fn tables_map_each_listener_to_its_service() {
        let c = Config::parse("t", MINIMAL).unwrap();
        let mut registry = Registry::default();
        let tables = c.tables(7, &mut registry);
        assert_eq!(tables.version, 7);
        assert_eq!(tables.service_for("127.0.0.1:8080".parse().unwrap()), Some(0));
        assert_eq!(tables.service_for("127.0.0.1:8081".parse().unwrap()), None);
    }

    #[test]
    fn counters_and_backend_states_survive_recompilation_by_name() {
        let c = Config::parse("t", MINIMAL).unwrap();
        let mut registry = Registry::default();
        let first = c.tables(1, &mut registry);
        let second = c.tables(2, &mut registry);
        let (a, b) = (&first.services()[0], &second.services()[0]);
        assert!(Arc::ptr_eq(&a.counters, &b.counters));
        assert!(Arc::ptr_eq(&a.pool.backends()[0].state, &b.pool.backends()[0].state));
        let renamed = Config::parse("t", &MINIMAL.replace("\"web\"", "\"www\"")).unwrap();
        let third = renamed.tables(3, &mut registry);
        registry.retain(&renamed);
        assert!(!Arc::ptr_eq(&a.counters, &third.services()[0].counters));
        assert_eq!(registry.services.len(), 1);
    }

    #[test]
    fn pools_take_algorithms_backend_tables_health_proxy_and_dns() {
        let text = "[[pool]]\nname = \"web\"\nalgorithm = \"weighted\"\nsend_proxy = \"v2\"\neject_after = 5\neject_for = \"30s\"\nbackends = [\"127.0.0.1:9001\", { addr = \"127.0.0.1:9002\", weight = 3, max_sessions = 100 }, { addr = \"127.0.0.1:9003\", backup = true }]\n[pool.health]\ninterval = \"500ms\"\nrise = 1\nfall = 2\nsend = \"PING\\r\\n\"\nexpect = \"PONG\"\n\n[[pool]]\nname = \"found\"\nsrv = \"_web._tcp.example\"\nresolver = \"127.0.0.1:5353\"\ndns_interval = \"5s\"\n\n[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:8080\"]\npool = \"web\"\naccept_proxy = { from = [\"127.0.0.0/8\"] }\nproxy_timeout = \"2s\"\n";
        let c = Config::parse("t", text).unwrap();
        let web = &c.pools[0];
        assert_eq!(web.algorithm, Algorithm::Weighted);
        assert_eq!(web.send_proxy, Some(proxy::Version::V2));
        assert_eq!(web.ejection, Ejection { after: 5, cooldown: Duration::from_secs(30) });
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(
            web.backends,
            vec![
                BackendSpec::plain(addr(9001)),
                BackendSpec { weight: 3, max_sessions: 100, ..BackendSpec::plain(addr(9002)) },
                BackendSpec { backup: true, ..BackendSpec::plain(addr(9003)) },
            ]
        );
        let h = web.health.as_ref().unwrap();
        assert_eq!((h.interval, h.rise, h.fall), (Duration::from_millis(500), 1, 2));
        assert_eq!((h.send.as_slice(), h.expect.as_slice()), (&b"PING\r\n"[..], &b"PONG"[..]));
        let dns = c.pools[1].dns.as_ref().unwrap();
        assert_eq!(dns.query, crate::dns::Query::Srv { name: "_web._tcp.example".into() });
        assert_eq!((dns.resolver, dns.interval), (Some(addr(5353)), Duration::from_secs(5)));
        let s = &c.services[0];
        assert_eq!((s.pool, s.backends.len()), (Some(0), 0));
        assert_eq!(s.accept_proxy, Some(vec!["127.0.0.0/8".parse().unwrap()]));
        assert_eq!(s.timeouts.proxy, Duration::from_secs(2));
        let t = c.tables(1, &mut Registry::default());
        let pool = &t.services()[0].pool;
        assert_eq!((pool.algorithm(), pool.backends().len()), (Algorithm::Weighted, 3));
        assert!(Arc::ptr_eq(&pool.backends()[1].state, &t.pools[0].pool.backends()[1].state));
    }

    #[test]
    fn bad_pool_values_are_reported_with_line_and_key() {
        let text = "[[pool]]\nname = \"web\"\nalgorithm = \"fastest\"\nsend_proxy = \"v3\"\nbackends = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n\n[[pool]]\nname = \"d\"\ndns = \"no-port\"\n\n[[pool]]\nname = \"both\"\ndns = \"a:1\"\nbackends = [\"127.0.0.1:1\"]\n\n[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:8080\"]\npool = \"nowhere\"\naccept_proxy = { from = [\"not-a-net\"] }\n";
        let e = errors(text);
        let found: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (5, "pool[0].backends.weight"),
                (3, "pool[0].algorithm"),
                (4, "pool[0].send_proxy"),
                (9, "pool[1].dns"),
                (14, "pool[2].backends"),
                (19, "service[0].pool"),
                (20, "service[0].accept_proxy.from"),
            ]
        );
    }
}
