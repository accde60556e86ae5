//! The validated configuration: what validation produces and the control thread keeps.
//! Every value here is in range and every reference (a pool named by a rule or service, a
//! capture by index) points at an entry that exists.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::acl::{Action, Rule};
use sluice_engine::balance::{self, Algorithm, Ejection, HealthCheck};
use sluice_engine::capture::CaptureSpec;
use sluice_engine::limits::LimitSpec;
use sluice_engine::proxy;
use sluice_engine::record::Protocol;
use sluice_engine::record::RecordPolicy;
use sluice_engine::shape::BandwidthSpec;
use sluice_engine::socket_options::SideOptions;
use sluice_engine::tables::{Listen, SniUnreadable, Timeouts};
use sluice_engine::EngineConfig;

use super::error::ConfigError;
use crate::admin::AdminSpec;
use crate::sinks::SinkSpec;

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
    /// Its listeners (a port range is one listener a port).
    pub listen: Vec<Listen>,
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
    /// UDP services: a socket a flow, or sockets shared with source addresses.
    pub udp_upstream: sluice_engine::tables::UdpUpstream,
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
    /// What a session whose ClientHello cannot be read gets; `None`: as its rules imply.
    pub sni_unreadable: Option<SniUnreadable>,
    /// TCP options of client and backend sockets.
    pub client_socket: SideOptions,
    pub backend_socket: SideOptions,
    /// Accept backlog of each listener.
    pub backlog: u32,
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
    /// Where backend connections come from (`source`); `None`: the kernel picks.
    pub source: Option<sluice_engine::socket_options::Source>,
    pub health: Option<HealthCheck>,
    /// Where the backends come from when they are discovered through DNS.
    pub dns: Option<DnsSpec>,
}

impl PoolSpec {
    /// The registry scope of the pool's backend states.
    pub fn scope(&self) -> String {
        format!("pool:{}", self.name)
    }
}

/// How a pool's backends are discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSpec {
    pub query: crate::dns::Query,
    /// The DNS server asked; `None`: the first nameserver of /etc/resolv.conf.
    pub resolver: Option<SocketAddr>,
    pub interval: Duration,
}

/// How the process itself runs: its user, its fd limit, its pid file (`[engine]` keys that
/// the engine never sees). They take effect at start; a reload that changes them says so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSpec {
    /// `engine.user` (and `group`): the user to become once every listener is bound.
    pub run_as: Option<crate::privileges::RunAs>,
    /// `engine.max_open_files`: the soft fd limit to set; `None`: the hard limit.
    pub max_open_files: Option<u64>,
    /// `engine.pid_file`; `None`: named after the config file in the runtime directory.
    pub pid_file: Option<std::path::PathBuf>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: String,
    pub engine: EngineConfig,
    pub process: ProcessSpec,
    pub shutdown_timeout: Duration,
    /// The admin API: where it listens, its tokens and limits; `None` without an
    /// `[admin]` section.
    pub admin: Option<AdminSpec>,
    /// What is valid but probably not meant (`FILE:LINE:COL: key: warning: ...`): printed
    /// by `check` and logged by `run`.
    pub warnings: Vec<ConfigError>,
    /// Which records workers make besides close records.
    pub records: RecordPolicy,
    /// `records.instance`: names this process in every record (default: the host name).
    pub instance: Arc<str>,
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
