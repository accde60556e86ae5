//! The file's schema: what TOML deserializes into before any validation. Every table is
//! `deny_unknown_fields`, so an unknown key is an error at its line; values that validation
//! reports by position are `Spanned`. Nothing here judges a value beyond its TOML type.

use serde::Deserialize;
use toml::Spanned;

use super::units::parse_size;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) engine: EngineSection,
    pub(super) admin: Option<super::validate::admin::AdminSection>,
    pub(super) records: Option<RecordsSection>,
    #[serde(default, rename = "log")]
    pub(super) logs: Vec<LogSection>,
    #[serde(default, rename = "firewall")]
    pub(super) firewall: Vec<RuleSection>,
    #[serde(default, rename = "pool")]
    pub(super) pools: Vec<PoolSection>,
    #[serde(default, rename = "service")]
    pub(super) services: Vec<ServiceSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PoolSection {
    pub(super) name: Spanned<String>,
    pub(super) backends: Option<Spanned<Vec<Spanned<BackendEntry>>>>,
    pub(super) algorithm: Option<Spanned<String>>,
    pub(super) dns: Option<Spanned<String>>,
    pub(super) srv: Option<Spanned<String>>,
    pub(super) resolver: Option<Spanned<String>>,
    pub(super) dns_interval: Option<Spanned<String>>,
    pub(super) send_proxy: Option<Spanned<String>>,
    pub(super) source: Option<Spanned<String>>,
    pub(super) eject_after: Option<Spanned<i64>>,
    pub(super) eject_for: Option<Spanned<String>>,
    pub(super) health: Option<HealthSection>,
}

/// A backend written as `"host:port"` or as a table with its weight, cap and role.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum BackendEntry {
    Addr(String),
    Table(BackendTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackendTable {
    pub(super) addr: String,
    pub(super) weight: Option<i64>,
    pub(super) max_sessions: Option<i64>,
    pub(super) backup: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthSection {
    pub(super) interval: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) rise: Option<Spanned<i64>>,
    pub(super) fall: Option<Spanned<i64>>,
    pub(super) send: Option<String>,
    pub(super) expect: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AcceptProxySection {
    pub(super) from: Spanned<Vec<Spanned<String>>>,
}

/// One firewall rule, global (`[[firewall]]`) or a service's (`[[service.rule]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleSection {
    pub(super) name: Option<Spanned<String>>,
    pub(super) action: Spanned<String>,
    pub(super) reset: Option<Spanned<bool>>,
    pub(super) drop: Option<Spanned<String>>,
    pub(super) pool: Option<Spanned<String>>,
    pub(super) timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) from: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) not_from: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) from_port: Vec<Spanned<PortRange>>,
    #[serde(default)]
    pub(super) not_from_port: Vec<Spanned<PortRange>>,
    #[serde(default)]
    pub(super) to: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) not_to: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) time: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) not_time: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) sni: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) not_sni: Vec<Spanned<String>>,
    pub(super) bandwidth: Option<Spanned<BandwidthSection>>,
    pub(super) bandwidth_up: Option<Spanned<BandwidthSection>>,
    pub(super) bandwidth_down: Option<Spanned<BandwidthSection>>,
    pub(super) capture: Option<Spanned<CaptureSection>>,
}

/// `capture = { dir = "...", max_file = "100 MB", max_total = "10 GB", snaplen = 65535 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CaptureSection {
    pub(super) dir: Spanned<String>,
    pub(super) max_file: Option<Spanned<Size>>,
    pub(super) max_total: Option<Spanned<Size>>,
    pub(super) snaplen: Option<Spanned<i64>>,
}

/// A port range written as a number (`22`) or text (`"1024-65535"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum PortRange {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecordsSection {
    pub(super) open: Option<bool>,
    pub(super) interim: Option<Spanned<String>>,
    pub(super) instance: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogSection {
    pub(super) name: Option<Spanned<String>>,
    #[serde(rename = "type")]
    pub(super) kind: Spanned<String>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) address: Option<Spanned<String>>,
    pub(super) facility: Option<Spanned<String>>,
    pub(super) tag: Option<Spanned<String>>,
    pub(super) format: Option<Spanned<String>>,
    pub(super) template: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) kinds: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) verdicts: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) services: Vec<String>,
    #[serde(default)]
    pub(super) reasons: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EngineSection {
    pub(super) workers: Option<Spanned<Workers>>,
    pub(super) pin: Option<bool>,
    pub(super) driver: Option<Spanned<String>>,
    pub(super) pipe_size: Option<Spanned<Size>>,
    pub(super) buffer_size: Option<Spanned<Size>>,
    pub(super) relay: Option<Spanned<String>>,
    pub(super) shutdown_timeout: Option<Spanned<String>>,
    pub(super) max_flows: Option<Spanned<i64>>,
    pub(super) udp_max_datagram: Option<Spanned<Size>>,
    pub(super) max_sessions: Option<Spanned<i64>>,
    pub(super) ring_buffers: Option<Spanned<i64>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) max_open_files: Option<Spanned<i64>>,
    pub(super) pid_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Workers {
    Count(i64),
    Named(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Size {
    Bytes(i64),
    Text(String),
}

impl Size {
    /// The size in bytes: a number as given, or text such as "64 KiB" (see [`parse_size`]).
    pub(super) fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => u64::try_from(*n).map_err(|_| "must not be negative".to_string()),
            Size::Text(t) => parse_size(t),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    pub(super) name: Spanned<String>,
    pub(super) listen: Spanned<Vec<Spanned<ListenEntry>>>,
    pub(super) backends: Option<Spanned<Vec<Spanned<BackendEntry>>>>,
    pub(super) pool: Option<Spanned<String>>,
    pub(super) accept_proxy: Option<AcceptProxySection>,
    pub(super) proxy_timeout: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) fin_timeout: Option<Spanned<String>>,
    pub(super) sni_timeout: Option<Spanned<String>>,
    pub(super) sni_unreadable: Option<Spanned<String>>,
    pub(super) protocol: Option<Spanned<String>>,
    pub(super) udp_idle_timeout: Option<Spanned<String>>,
    pub(super) udp_upstream: Option<Spanned<String>>,
    pub(super) udp_source: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) default: Option<Spanned<String>>,
    pub(super) bandwidth: Option<Spanned<BandwidthSection>>,
    pub(super) bandwidth_up: Option<Spanned<BandwidthSection>>,
    pub(super) bandwidth_down: Option<Spanned<BandwidthSection>>,
    pub(super) limits: Option<LimitsSection>,
    pub(super) capture: Option<Spanned<CaptureSection>>,
    pub(super) max_sessions: Option<Spanned<i64>>,
    pub(super) backlog: Option<Spanned<i64>>,
    pub(super) client_keepalive: Option<Spanned<KeepaliveSection>>,
    pub(super) backend_keepalive: Option<Spanned<KeepaliveSection>>,
    pub(super) client_user_timeout: Option<Spanned<String>>,
    pub(super) backend_user_timeout: Option<Spanned<String>>,
    #[serde(default, rename = "rule")]
    pub(super) rules: Vec<RuleSection>,
}

/// A listener written as `"ip:port"` (or `"ip:first-last"`, a port range) or as a table
/// that also names the network interface it is bound to.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum ListenEntry {
    Addr(String),
    Table(ListenTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenTable {
    pub(super) addr: String,
    pub(super) interface: Option<String>,
}

impl ListenEntry {
    /// The address (or port range) written.
    pub(super) fn addr(&self) -> &str {
        match self {
            ListenEntry::Addr(a) => a,
            ListenEntry::Table(t) => &t.addr,
        }
    }

    /// The interface named, if any.
    pub(super) fn interface(&self) -> Option<&str> {
        match self {
            ListenEntry::Addr(_) => None,
            ListenEntry::Table(t) => t.interface.as_deref(),
        }
    }
}

/// `client_keepalive` / `backend_keepalive = { idle = "60s", interval = "10s", count = 6 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeepaliveSection {
    pub(super) idle: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) count: Option<Spanned<i64>>,
}

/// A `bandwidth` block: rates of one direction, or of each direction separately.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::config) struct BandwidthSection {
    pub(in crate::config) per_connection: Option<Spanned<String>>,
    pub(in crate::config) per_client: Option<Spanned<String>>,
    pub(in crate::config) total: Option<Spanned<String>>,
    pub(in crate::config) burst: Option<Spanned<Size>>,
}

/// A `limits` block of a service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::config) struct LimitsSection {
    pub(in crate::config) per_client: Option<Spanned<i64>>,
    pub(in crate::config) per_network: Option<Spanned<i64>>,
    pub(in crate::config) network: Option<Spanned<i64>>,
    pub(in crate::config) network_v6: Option<Spanned<i64>>,
    pub(in crate::config) rate_per_client: Option<Spanned<String>>,
    pub(in crate::config) rate_burst: Option<Spanned<i64>>,
    pub(in crate::config) max_bytes: Option<Spanned<Size>>,
    pub(in crate::config) max_duration: Option<Spanned<String>>,
    pub(in crate::config) refuse: Option<Spanned<String>>,
    pub(in crate::config) fleet_size: Option<Spanned<i64>>,
}
