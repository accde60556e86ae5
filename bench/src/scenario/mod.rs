//! The load scenarios: bulk throughput, request/response, connection rate, idle
//! footprint (TCP, also run by `compare`), and UDP request/response (`udp`, which runs its
//! own direct-versus-sluice comparison).
//!
//! Every scenario connects to a [`Target`] (a proxy, or the backend itself for "direct")
//! and returns a [`crate::report::Report`]. Load runs on a few threads with mio loops so
//! that on a small machine most cores stay with the proxy under test; the calling thread
//! keeps time through [`crate::timeline::drive`].

pub mod connect;
pub mod idle;
pub mod rr;
pub mod throughput;
pub mod udp;

use std::net::SocketAddr;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::error::{io_context, BenchError, Result};

/// The scenarios by name, as `compare --scenarios` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Throughput,
    Rr,
    Connect,
    Idle,
}

impl Scenario {
    /// Every scenario, in the order a comparison runs them.
    pub const ALL: [Scenario; 4] =
        [Scenario::Throughput, Scenario::Rr, Scenario::Connect, Scenario::Idle];

    /// Name used in reports and file names.
    pub const fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Rr => "rr",
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
        }
    }

    /// Prefix of this scenario's placeholders in peer templates (`RR_LISTEN`, ...).
    pub fn placeholder(self) -> &'static str {
        match self {
            Scenario::Throughput => "THROUGHPUT",
            Scenario::Rr => "RR",
            Scenario::Connect => "CONNECT",
            Scenario::Idle => "IDLE",
        }
    }
}

/// Where clients connect, how to name it in reports, and whose CPU time to read.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub label: String,
    /// The proxy process (root of its tree) whose CPU time each measured window reads.
    pub pid: Option<u32>,
}

impl Target {
    /// Clients talk straight to the backend, no proxy in between.
    pub fn direct(backend: SocketAddr) -> Self {
        Self { addr: backend, label: format!("direct ({backend})"), pid: None }
    }

    /// Clients talk to a proxy listening on `addr`.
    pub fn proxy(addr: SocketAddr) -> Self {
        Self { addr, label: addr.to_string(), pid: None }
    }
}

/// Serializes a duration as fractional seconds.
pub fn as_seconds<S: Serializer>(
    value: &Duration,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

/// Warm-up and measured durations, as scenario parameters.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TimingParams {
    #[serde(rename = "warmup_s", serialize_with = "as_seconds")]
    pub warmup: Duration,
    #[serde(rename = "duration_s", serialize_with = "as_seconds")]
    pub duration: Duration,
}

impl From<TimingParams> for crate::timeline::Timing {
    fn from(t: TimingParams) -> Self {
        Self { warmup: t.warmup, duration: t.duration }
    }
}

/// Starts a named load thread.
pub fn spawn_load<T: Send + 'static>(
    name: String,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<JoinHandle<std::io::Result<T>>> {
    thread::Builder::new().name(name).spawn(work).map_err(io_context("spawning load thread"))
}

/// Waits for a load thread and turns its failure into a [`BenchError`].
pub fn join_load<T>(handle: JoinHandle<std::io::Result<T>>) -> Result<T> {
    let name = handle.thread().name().unwrap_or("load").to_string();
    match handle.join() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(BenchError::Thread { thread: name, detail: e.to_string() }),
        Err(_) => Err(BenchError::Thread { thread: name, detail: "panicked".into() }),
    }
}

/// Splits `items` round-robin into at most `groups` non-empty groups.
pub fn spread<T>(items: Vec<T>, groups: usize) -> Vec<Vec<T>> {
    let groups = groups.clamp(1, items.len().max(1));
    let mut out: Vec<Vec<T>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        out[i % groups].push(item);
    }
    out.retain(|g| !g.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_balances_and_never_yields_empty_groups() {
        let groups = spread((0..7).collect(), 3);
        assert_eq!(groups, vec![vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
        assert_eq!(spread(vec![1, 2], 8), vec![vec![1], vec![2]]);
        assert!(spread(Vec::<u8>::new(), 2).is_empty());
        assert_eq!(spread(vec![1, 2, 3], 0), vec![vec![1, 2, 3]]);
    }

    #[test]
    fn timing_serializes_in_seconds() {
        let timing =
            TimingParams { warmup: Duration::from_millis(250), duration: Duration::from_secs(5) };
        let value = serde_json::to_value(timing).unwrap();
        assert_eq!(value["warmup_s"], 0.25);
        assert_eq!(value["duration_s"], 5.0);
    }
}
