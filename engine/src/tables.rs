//! Compiled, immutable tables: what the control thread publishes and workers read.
//!
//! A worker loads the current `Arc<Tables>` once per accepted connection; the session keeps
//! that `Arc` for its whole life, so a reload changes new sessions only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balance::Pool;
use crate::events::{RecordPolicy, ServiceCounters};

/// Time allowed for a backend connect before the next backend is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A session with no byte moving in either direction for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// After one direction has closed (half-close), the session is closed after this long
/// without traffic.
pub const DEFAULT_FIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The timeouts of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub idle: Duration,
    pub fin: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
            fin: DEFAULT_FIN_TIMEOUT,
        }
    }
}

/// One forwarding service: where it listens and where it sends connections.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub listen: Vec<SocketAddr>,
    pub pool: Pool,
    pub timeouts: Timeouts,
    /// Shared with the admin API; carried over by name when tables are rebuilt.
    pub counters: Arc<ServiceCounters>,
}

/// Everything a worker needs to decide a new connection, in one immutable value.
#[derive(Debug)]
pub struct Tables {
    /// Increases with every publication; recorded on each session.
    pub version: u64,
    services: Vec<Service>,
    by_listener: HashMap<SocketAddr, usize>,
    /// Which records workers produce besides close records.
    pub records: RecordPolicy,
}

impl Tables {
    /// Builds tables from services. Listen addresses must be unique across services (the
    /// control crate validates this and reports it with file and line).
    pub fn new(version: u64, services: Vec<Service>) -> Self {
        let by_listener = services
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.listen.iter().map(move |&a| (a, i)))
            .collect();
        Self { version, services, by_listener, records: RecordPolicy::default() }
    }

    /// The same tables with a record policy.
    pub fn with_records(mut self, records: RecordPolicy) -> Self {
        self.records = records;
        self
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The service that owns a listener address, by index.
    pub fn service_for(&self, listener: SocketAddr) -> Option<usize> {
        self.by_listener.get(&listener).copied()
    }

    /// The service with this name.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| &*s.name == name)
    }

    /// Every listen address, in service order.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.services.iter().flat_map(|s| s.listen.iter().copied()).collect()
    }
}
