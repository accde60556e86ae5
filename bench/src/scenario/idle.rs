//! Idle footprint: what N open, silent connections cost a proxy.
//!
//! Reads the proxy's resident memory and descriptor count (summed over its process tree),
//! opens N connections through it, waits until the in-process backend has accepted all N
//! (so each is established end to end), lets the proxy settle, and reads them again. The
//! difference divided by N is the cost per connection. Our own process holds two
//! descriptors per connection when the backend is in-process, which bounds N by the file
//! limit. The CPU time figures cover the same span, from the first reading to the second:
//! what it cost to accept, connect and then hold the N connections.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::{Backend, Behaviour};
use crate::cpu::{clock_ticks, CpuSample, CpuUse};
use crate::error::{BenchError, Result};
use crate::net;
use crate::procfs::{footprint, Footprint};
use crate::report::Report;
use crate::scenario::{as_seconds, Target};
use crate::timeline;

/// Base time allowed for the backend to see every connection, plus a share per connection.
const ACCEPT_BASE: Duration = Duration::from_secs(5);
const ACCEPT_PER_THOUSAND: Duration = Duration::from_secs(1);
/// Descriptors kept free for everything else the process does.
const SPARE_FDS: u64 = 64;

/// Parameters of an idle run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IdleParams {
    pub connections: usize,
    #[serde(rename = "settle_s", serialize_with = "as_seconds")]
    pub settle: Duration,
    pub pid: Option<u32>,
}

/// Largest N our own descriptor limit allows, given whether the backend is in-process.
pub fn max_connections(fd_limit: u64, in_process_backend: bool) -> u64 {
    let per_connection = if in_process_backend { 2 } else { 1 };
    fd_limit.saturating_sub(SPARE_FDS) / per_connection
}

/// Cost per connection between two footprints.
pub fn per_connection(before: Footprint, after: Footprint, connections: usize) -> (f64, f64) {
    let n = connections.max(1) as f64;
    let kib = (after.rss_kib as f64 - before.rss_kib as f64) / n;
    let fds = (after.fds as f64 - before.fds as f64) / n;
    (kib, fds)
}

/// Runs the scenario; `hold` is the in-process backend, or `None` if external.
pub fn run(params: &IdleParams, target: &Target, hold: Option<&Backend>) -> Result<Report> {
    if let Some(backend) = hold {
        if backend.behaviour() != Behaviour::Hold {
            return Err(BenchError::Usage("idle needs a holding backend".into()));
        }
    }
    let before = params.pid.map(footprint).transpose()?;
    let cpu_before = CpuSample::take();
    let accepted = hold.map_or(0, |b| b.stats().accepted());
    let open_before = hold.map_or(0, |b| b.stats().open());
    let accept_errors = hold.map_or(0, |b| b.stats().accept_errors());
    let began = Instant::now();
    let connections = open_all(target, params.connections)?;
    let setup = began.elapsed();
    if let Some(backend) = hold {
        let limit = ACCEPT_BASE + ACCEPT_PER_THOUSAND * (params.connections / 1000) as u32;
        backend.stats().wait_accepted(accepted + params.connections as u64, limit)?;
    }
    let established = began.elapsed();
    timeline::pause(params.settle)?;
    let after = params.pid.map(footprint).transpose()?;
    let cpu_after = CpuSample::take();
    drop(connections);
    if let Some(backend) = hold {
        wait_closed(backend, open_before);
    }
    let mut report = Report::new("idle", target.label.clone(), params)?;
    report.figure("connections", params.connections as f64);
    report.figure("setup_s", setup.as_secs_f64());
    report.figure("established_s", established.as_secs_f64());
    if let Some(backend) = hold {
        report.figure(
            "backend_accept_errors",
            (backend.stats().accept_errors() - accept_errors) as f64,
        );
    }
    let own = std::process::id();
    CpuUse::between(&cpu_before, &cpu_after, params.pid, own, clock_ticks()).add_to(&mut report);
    if let (Some(before), Some(after)) = (before, after) {
        add_footprint(&mut report, before, after, params.connections);
    }
    Ok(report)
}

fn add_footprint(report: &mut Report, before: Footprint, after: Footprint, connections: usize) {
    let (kib, fds) = per_connection(before, after, connections);
    report.figure("kib_per_connection", kib);
    report.figure("fds_per_connection", fds);
    report.figure("rss_kib_before", before.rss_kib as f64);
    report.figure("rss_kib_after", after.rss_kib as f64);
    report.figure("fds_before", before.fds as f64);
    report.figure("fds_after", after.fds as f64);
    report.figure("processes", after.processes as f64);
}

/// Waits (bounded) until the backend has seen the connections close, so the next
/// measurement starts from the same state.
fn wait_closed(backend: &Backend, open_before: u64) {
    let began = Instant::now();
    while backend.stats().open() > open_before && began.elapsed() < ACCEPT_BASE {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn open_all(target: &Target, count: usize) -> Result<Vec<TcpStream>> {
    let mut connections = Vec::with_capacity(count);
    let mut last_print = Instant::now();
    while connections.len() < count {
        if timeline::interrupted() {
            return Err(BenchError::Interrupted);
        }
        connections.push(net::connect(target.addr)?);
        if last_print.elapsed() >= Duration::from_secs(1) {
            eprintln!("[idle] opened {}/{count}", connections.len());
            last_print = Instant::now();
        }
    }
    Ok(connections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(rss_kib: u64, fds: u64) -> Footprint {
        Footprint { rss_kib, fds, processes: 1 }
    }

    #[test]
    fn cost_is_the_difference_per_connection() {
        let (kib, fds) = per_connection(print(1000, 10), print(3000, 2010), 1000);
        assert_eq!((kib, fds), (2.0, 2.0));
        let (kib, _) = per_connection(print(1000, 10), print(900, 10), 100);
        assert_eq!(kib, -1.0, "a shrinking process must show, not be hidden");
    }

    #[test]
    fn descriptor_budget_counts_both_ends_when_in_process() {
        assert_eq!(max_connections(20_000, true), 9_968);
        assert_eq!(max_connections(20_000, false), 19_936);
        assert_eq!(max_connections(10, true), 0);
    }

    #[test]
    fn own_process_as_proxy_sees_its_own_descriptors() {
        let backend = Backend::start("127.0.0.1:0".parse().unwrap(), Behaviour::Hold).unwrap();
        let params =
            IdleParams { connections: 400, settle: Duration::ZERO, pid: Some(std::process::id()) };
        let report = run(&params, &Target::direct(backend.addr()), Some(&backend)).unwrap();
        // This process holds both ends, so at least two new descriptors per connection;
        // other tests running at the same time may add a few more or close some.
        let fds = report.get("fds_per_connection").unwrap();
        assert!((1.5..=3.0).contains(&fds), "fds per connection {fds}");
    }
}
