//! Compilation of a validated [`Config`] into the engine's immutable [`Tables`], and the
//! [`Registry`] that carries counters, backend states, shaping buckets and capture totals
//! from one compilation to the next by name (service, rule, pool scope and address).
//!
//! Invariants: compiling does no I/O except for capture (starting the capture thread once,
//! and reading how many bytes a capture directory already holds); a name that stays keeps
//! its counters and state across reloads, a name that goes is forgotten by
//! [`Registry::retain`] once the new tables are in force.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use sluice_engine::accounting::AccountSpec;
use sluice_engine::acl::{Rule, RuleSet};
use sluice_engine::balance::{Algorithm, Backend, Pool};
use sluice_engine::capture::{CapturePolicy, CaptureSpec, CaptureStats, Capturer};
use sluice_engine::counters::{BackendState, ServiceCounters};
use sluice_engine::limits::LimitState;
use sluice_engine::shape::{Bandwidth, BandwidthSpec};
use sluice_engine::tables::{NamedPool, Rules, Service, Tables};

use super::defaults::CAPTURE_STOP_TIMEOUT;
use super::spec::{BackendSpec, Config, PoolSpec};

/// The counter scope of global firewall rules.
pub const FIREWALL_SCOPE: &str = "firewall";
/// The counter name of a service's default action.
pub const DEFAULT_RULE: &str = "(default)";

impl PoolSpec {
    /// Compiles the pool, with backend states from `registry` under `scope`.
    fn compile(&self, scope: &str, registry: &mut Registry) -> Pool {
        let mut pool = compile_backends(scope, &self.backends, self.algorithm, registry)
            .with_ejection(self.ejection);
        pool.send_proxy = self.send_proxy;
        pool.source = self.source;
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

impl Config {
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
                let mut service = Service::new(&s.name, Vec::new(), pool, s.timeouts);
                service.listen = s.listen.clone();
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
                service.udp_upstream = s.udp_upstream.clone();
                service.capture = s.capture;
                service.max_sessions = s.max_sessions;
                service.sni_unreadable = s.sni_unreadable;
                service.client_socket = s.client_socket;
                service.backend_socket = s.backend_socket;
                service.backlog = s.backlog;
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
            .with_accounting(self.accounting())
    }

    /// Per-client accounting: on with an `[admin]` section (to show it) unless
    /// `admin.top_clients = 0`.
    pub fn accounting(&self) -> Option<AccountSpec> {
        self.admin.as_ref().map(|a| a.accounting).filter(|a| a.top > 0)
    }
}

/// Counters and backend states by service name (and backend address), carried from one
/// compilation of the tables to the next.
#[derive(Debug, Default)]
pub struct Registry {
    pub(super) services: HashMap<String, Arc<ServiceCounters>>,
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
