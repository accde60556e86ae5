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
use sluice_engine::balance::{Backend, Pool};
use sluice_engine::events::{BackendState, RecordKind, RecordPolicy, ServiceCounters, Verdict};
use sluice_engine::session::CloseReason;
use sluice_engine::tables::{self, NamedPool, Rules, Service, Tables, Timeouts};
use sluice_engine::{DriverChoice, EngineConfig};
use toml::Spanned;

use crate::admin::{AdminAddr, DEFAULT_ADMIN_LISTEN};
use crate::records::{Template, DEFAULT_TEMPLATE};
use crate::sinks::{self, Filter, Format, SinkSpec, SyslogAddr, Target};
use crate::zones;

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
    backends: Spanned<Vec<Spanned<String>>>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: Spanned<String>,
    listen: Spanned<Vec<Spanned<String>>>,
    backends: Spanned<Vec<Spanned<String>>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    fin_timeout: Option<Spanned<String>>,
    sni_timeout: Option<Spanned<String>>,
    default: Option<Spanned<String>>,
    max_sessions: Option<Spanned<i64>>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSection>,
}

/// A validated service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub backends: Vec<SocketAddr>,
    pub timeouts: Timeouts,
    /// The service's own rules, in order.
    pub rules: Vec<Rule>,
    /// The action when no rule matches.
    pub default: Action,
    /// Most sessions at once; `None`: no cap of its own.
    pub max_sessions: Option<u64>,
}

/// A validated named pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub backends: Vec<SocketAddr>,
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
    /// Named pools that rules can send sessions to.
    pub pools: Vec<PoolSpec>,
    pub services: Vec<ServiceSpec>,
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
        let mut v = Validator { file, text, errors: Vec::new(), names };
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
                let backends = s
                    .backends
                    .iter()
                    .map(|&addr| Backend { addr, state: registry.backend(&s.name, addr) })
                    .collect();
                let mut service =
                    Service::new(&s.name, s.listen.clone(), Pool::new(backends), s.timeouts);
                service.rules = registry.rules(&s.name, &s.rules);
                service.default = s.default;
                service.default_hits = registry.hits(&s.name, DEFAULT_RULE);
                service.counters = registry.service(&s.name);
                service.max_sessions = s.max_sessions;
                service
            })
            .collect();
        let pools = self
            .pools
            .iter()
            .map(|p| {
                let scope = format!("pool:{}", p.name);
                let backends = p
                    .backends
                    .iter()
                    .map(|&addr| Backend { addr, state: registry.backend(&scope, addr) })
                    .collect();
                NamedPool { name: Arc::from(p.name.as_str()), pool: Pool::new(backends) }
            })
            .collect();
        let firewall = registry.rules(FIREWALL_SCOPE, &self.firewall);
        Tables::new(version, services).with_records(self.records).with_firewall(firewall, pools)
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
}

impl Registry {
    fn hits(&mut self, scope: &str, rule: &str) -> Arc<AtomicU64> {
        self.hits.entry((scope.to_string(), rule.to_string())).or_default().clone()
    }

    /// Compiles rules, with the counters their names had before.
    fn rules(&mut self, scope: &str, rules: &[Rule]) -> Rules {
        let hits = rules.iter().map(|r| self.hits(scope, &r.name)).collect();
        Rules { set: RuleSet::compile(rules.to_vec()), hits }
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
        let names: HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        self.services.retain(|name, _| names.contains(name.as_str()));
        self.backends.retain(|(name, addr), _| {
            config.services.iter().any(|s| &s.name == name && s.backends.contains(addr))
                || config
                    .pools
                    .iter()
                    .any(|p| *name == format!("pool:{}", p.name) && p.backends.contains(addr))
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
        let firewall = self.rules("firewall", "firewall", &raw.firewall, &pools);
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
                if !listens.insert(*addr) {
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
            pools,
            services,
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
                Template::parse(text)
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
        engine
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
        let parsed = match value.get_ref() {
            Size::Bytes(n) => u64::try_from(*n).map_err(|_| "must not be negative".to_string()),
            Size::Text(t) => parse_size(t),
        };
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
            if p.backends.get_ref().is_empty() {
                let message = "at least one backend is required";
                self.error(p.backends.span(), &format!("{key}.backends"), message);
            }
            let backends = self.backends(p.backends.get_ref(), &format!("{key}.backends"), admin);
            pools.push(PoolSpec { name, backends });
        }
        pools
    }

    fn backends(
        &mut self,
        raw: &[Spanned<String>],
        key: &str,
        admin: Option<&AdminAddr>,
    ) -> Vec<SocketAddr> {
        raw.iter()
            .flat_map(|b| match resolve(b.get_ref(), admin, self.names) {
                Ok(addrs) => addrs,
                Err(message) => {
                    self.error(b.span(), key, message);
                    Vec::new()
                }
            })
            .collect()
    }

    /// An ordered rule list; `prefix` names keys in errors, `scope` names rules without a
    /// `name` (`firewall.0`, `web.rule.2`).
    fn rules(
        &mut self,
        prefix: &str,
        scope: &str,
        raw: &[RuleSection],
        pools: &[PoolSpec],
    ) -> Vec<Rule> {
        let mut names = HashSet::new();
        let mut rules = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let key = format!("{prefix}[{i}]");
            let Some(rule) = self.rule(&key, &format!("{scope}.{i}"), r, pools) else { continue };
            if !names.insert(rule.name.clone()) {
                let span = r.name.as_ref().map_or(r.action.span(), |n| n.span());
                let message = format!("duplicate rule name {:?}", rule.name);
                self.error(span, &format!("{key}.name"), message);
            }
            rules.push(rule);
        }
        rules
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
        if raw.backends.get_ref().is_empty() {
            self.error(raw.backends.span(), &key("backends"), "at least one backend is required");
        }
        let backends = self.backends(raw.backends.get_ref(), &key("backends"), admin);
        let mut timeouts = Timeouts::default();
        for (field, slot, value) in [
            ("connect_timeout", &mut timeouts.connect, &raw.connect_timeout),
            ("idle_timeout", &mut timeouts.idle, &raw.idle_timeout),
            ("fin_timeout", &mut timeouts.fin, &raw.fin_timeout),
            ("sni_timeout", &mut timeouts.sni, &raw.sni_timeout),
        ] {
            if let Some(d) = value.as_ref().and_then(|d| self.duration(d, &key(field))) {
                *slot = d;
            }
        }
        let rules = self.rules(&key("rule"), &format!("{name}.rule"), &raw.rules, pools);
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
        let max_sessions = self.max_sessions(&raw.max_sessions, &key("max_sessions"));
        ServiceSpec { name, listen, backends, timeouts, rules, default, max_sessions }
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
        "connect_timeout={:?} idle_timeout={:?} fin_timeout={:?} shutdown_timeout={:?} relay=copy buffer_size={} pipe_size={}",
        tables::DEFAULT_CONNECT_TIMEOUT,
        tables::DEFAULT_IDLE_TIMEOUT,
        tables::DEFAULT_FIN_TIMEOUT,
        DEFAULT_SHUTDOWN_TIMEOUT,
        sluice_engine::worker::DEFAULT_BUFFER_SIZE,
        sluice_engine::worker::DEFAULT_PIPE_SIZE
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
        assert_eq!(c.services[0].backends, vec!["127.0.0.1:9900".parse().unwrap()]);
        assert!(Config::parse("t", MINIMAL).unwrap().admin.is_none());
        let e = errors(&MINIMAL.replace("\"127.0.0.1:8000\"", "\"admin\""));
        assert_eq!(e[0].key, "service[0].backends");
        let e = errors(&format!("[admin]\nlisten = \"nowhere\"\n{MINIMAL}"));
        assert_eq!((e[0].line, e[0].key.as_str()), (2, "admin.listen"));
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
        assert_eq!(c.services[0].backends, vec!["127.0.0.1:8000".parse().unwrap()]);
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
}
