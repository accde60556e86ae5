//! Bulk throughput: N long-lived streams pushing data as fast as they can.
//!
//! Bytes are counted where they arrive: at the in-process backend for uploads, at the
//! client for downloads, so the figure is what actually crossed the proxy. With an
//! external backend upload bytes can only be counted as sent by the client; the report
//! says so in `counted_at`.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::backend::{Backend, Behaviour};
use crate::cpu::BYTES_PER_GB;
use crate::error::{BenchError, Result};
use crate::net;
use crate::report::Report;
use crate::scenario::{join_load, spawn_load, Target, TimingParams};
use crate::session::{BulkSession, Pump, StreamCounters, CHUNK};
use crate::stats::gbit_per_s;
use crate::timeline::{drive, Meter, RunControl};

/// How long to wait for the backend to accept every stream.
const ACCEPT_LIMIT: Duration = Duration::from_secs(5);
/// Longest a client loop sleeps before checking for the stop signal.
const POLL_TICK: Duration = Duration::from_millis(50);

/// Which way the bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to backend.
    Upload,
    /// Backend to client.
    Download,
    /// Both at once on every stream.
    Both,
}

impl Direction {
    /// True when clients send.
    pub fn client_sends(self) -> bool {
        matches!(self, Direction::Upload | Direction::Both)
    }

    /// True when the backend sends.
    pub fn backend_sends(self) -> bool {
        matches!(self, Direction::Download | Direction::Both)
    }

    /// The backend behaviour this direction needs.
    pub fn backend(self) -> Behaviour {
        Behaviour::Bulk { send: self.backend_sends() }
    }
}

/// Parameters of a throughput run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ThroughputParams {
    pub streams: usize,
    pub direction: Direction,
    #[serde(flatten)]
    pub timing: TimingParams,
}

/// One counted flow: which stream, which way, where counted.
struct Flow {
    upload: bool,
    counters: Arc<StreamCounters>,
    field: Field,
}

#[derive(Clone, Copy)]
enum Field {
    Received,
    Sent,
}

impl Flow {
    fn bytes(&self) -> u64 {
        match self.field {
            Field::Received => self.counters.received.load(Ordering::Relaxed),
            Field::Sent => self.counters.sent.load(Ordering::Relaxed),
        }
    }
}

/// Runs the scenario; `backend` is the in-process sink/source, or `None` if external.
pub fn run(
    params: &ThroughputParams,
    target: &Target,
    backend: Option<&Backend>,
) -> Result<Report> {
    if params.streams == 0 {
        return Err(BenchError::Usage("--streams must be at least 1".into()));
    }
    check_backend(params.direction, backend)?;
    let first = backend.map_or(0, |b| b.stats().stream_count());
    let accepted = backend.map_or(0, |b| b.stats().accepted());
    let mut sessions = Vec::with_capacity(params.streams);
    let mut client_counters = Vec::with_capacity(params.streams);
    for _ in 0..params.streams {
        let counters = Arc::new(StreamCounters::default());
        let stream = net::connect_nonblocking(target.addr)?;
        sessions.push(BulkSession::new(
            stream,
            params.direction.client_sends(),
            Arc::clone(&counters),
        ));
        client_counters.push(counters);
    }
    let backend_counters = match backend {
        Some(b) => {
            b.stats().wait_accepted(accepted + params.streams as u64, ACCEPT_LIMIT)?;
            Some(b.stats().streams_from(first))
        }
        None => None,
    };
    let flows = flows(params.direction, &client_counters, backend_counters.as_deref());
    measure(params, target, sessions, &flows, backend_counters.is_some())
}

fn check_backend(direction: Direction, backend: Option<&Backend>) -> Result<()> {
    match backend.map(Backend::behaviour) {
        None => Ok(()),
        Some(b) if b == direction.backend() => Ok(()),
        Some(other) => Err(BenchError::Usage(format!(
            "backend behaves as {other:?}, direction {direction:?} needs {:?}",
            direction.backend()
        ))),
    }
}

fn flows(
    direction: Direction,
    client: &[Arc<StreamCounters>],
    backend: Option<&[Arc<StreamCounters>]>,
) -> Vec<Flow> {
    let mut flows = Vec::new();
    if direction.client_sends() {
        match backend {
            Some(sink) => flows.extend(sink.iter().map(|c| flow(true, c, Field::Received))),
            None => flows.extend(client.iter().map(|c| flow(true, c, Field::Sent))),
        }
    }
    if direction.backend_sends() {
        flows.extend(client.iter().map(|c| flow(false, c, Field::Received)));
    }
    flows
}

fn flow(upload: bool, counters: &Arc<StreamCounters>, field: Field) -> Flow {
    Flow { upload, counters: Arc::clone(counters), field }
}

fn measure(
    params: &ThroughputParams,
    target: &Target,
    sessions: Vec<BulkSession>,
    flows: &[Flow],
    counted_at_sink: bool,
) -> Result<Report> {
    let control = RunControl::new();
    let loop_control = Arc::clone(&control);
    let handle = spawn_load("bulk-client".into(), move || client_loop(sessions, &loop_control))?;
    let counters = || flows.iter().map(Flow::bytes).collect::<Vec<u64>>();
    let describe = |before: &[u64], now: &[u64], seconds: f64| {
        let bytes: u64 = now.iter().zip(before).map(|(n, b)| n - b).sum();
        format!("{:.2} Gbit/s", gbit_per_s(bytes, seconds))
    };
    let meter =
        Meter { label: "throughput", counters: &counters, describe: &describe, proxy: target.pid };
    let window = drive(&control, params.timing.into(), &meter);
    let closed_early = join_load(handle)?;
    let window = window?;
    let mut report = Report::new("throughput", target.label.clone(), params)?;
    let seconds = window.seconds();
    let deltas = window.deltas();
    report.per_stream_gbit_s = deltas.iter().map(|&b| gbit_per_s(b, seconds)).collect();
    let total: u64 = deltas.iter().sum();
    report.figure("gbit_s_total", gbit_per_s(total, seconds));
    report.figure("bytes_total", total as f64);
    report.figure("seconds", seconds);
    report.figure("streams_closed_early", closed_early as f64);
    window.cpu.add_to(&mut report);
    window.cpu.add_cost(&mut report, "cpu_s_per_gb", total as f64, BYTES_PER_GB);
    add_direction_figures(&mut report, params.direction, flows, &deltas, seconds);
    add_spread_figures(&mut report);
    report.parameters["counted_at"] =
        if counted_at_sink { "receiver" } else { "client send (external backend)" }.into();
    Ok(report)
}

fn add_direction_figures(
    report: &mut Report,
    direction: Direction,
    flows: &[Flow],
    deltas: &[u64],
    seconds: f64,
) {
    if direction != Direction::Both {
        return;
    }
    let sum = |upload: bool| -> u64 {
        flows.iter().zip(deltas).filter(|(f, _)| f.upload == upload).map(|(_, &d)| d).sum()
    };
    report.figure("gbit_s_upload", gbit_per_s(sum(true), seconds));
    report.figure("gbit_s_download", gbit_per_s(sum(false), seconds));
}

fn add_spread_figures(report: &mut Report) {
    let rates = report.per_stream_gbit_s.clone();
    if rates.is_empty() {
        return;
    }
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    report.figure("gbit_s_stream_min", min);
    report.figure("gbit_s_stream_max", max);
    report.figure("gbit_s_stream_mean", rates.iter().sum::<f64>() / rates.len() as f64);
}

/// Pumps every stream until stopped; returns how many streams the peer closed early.
fn client_loop(mut sessions: Vec<BulkSession>, control: &RunControl) -> io::Result<usize> {
    let mut poll = Poll::new()?;
    for (i, session) in sessions.iter_mut().enumerate() {
        poll.registry().register(
            session.stream_mut(),
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
    }
    let mut open: Vec<bool> = vec![true; sessions.len()];
    let mut again: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(256);
    let mut scratch = vec![0; CHUNK];
    let payload = vec![0xa5; CHUNK];
    while !control.stopped() {
        let timeout = if again.is_empty() { POLL_TICK } else { Duration::ZERO };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut ready: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        ready.append(&mut again);
        for index in ready {
            if !open[index] {
                continue;
            }
            match sessions[index].pump(&mut scratch, &payload) {
                Pump::Idle => {}
                Pump::Again => again.push(index),
                Pump::Closed => {
                    open[index] = false;
                    let _ = poll.registry().deregister(sessions[index].stream_mut());
                }
            }
        }
        again.sort_unstable();
        again.dedup();
    }
    Ok(open.iter().filter(|o| !**o).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_decides_who_sends() {
        assert!(Direction::Upload.client_sends() && !Direction::Upload.backend_sends());
        assert!(!Direction::Download.client_sends() && Direction::Download.backend_sends());
        assert!(Direction::Both.client_sends() && Direction::Both.backend_sends());
    }

    #[test]
    fn upload_is_counted_at_the_sink_when_there_is_one() {
        let client = vec![Arc::new(StreamCounters::default())];
        let sink = vec![Arc::new(StreamCounters::default())];
        sink[0].received.store(7, Ordering::Relaxed);
        client[0].sent.store(99, Ordering::Relaxed);
        let counted = flows(Direction::Upload, &client, Some(&sink));
        assert_eq!(counted.iter().map(Flow::bytes).collect::<Vec<_>>(), vec![7]);
        let external = flows(Direction::Upload, &client, None);
        assert_eq!(external.iter().map(Flow::bytes).collect::<Vec<_>>(), vec![99]);
        let both = flows(Direction::Both, &client, Some(&sink));
        assert_eq!(both.len(), 2);
        assert!(both[0].upload && !both[1].upload);
    }

    #[test]
    fn short_direct_run_moves_bytes() {
        let backend =
            Backend::start("127.0.0.1:0".parse().unwrap(), Direction::Upload.backend()).unwrap();
        let params = ThroughputParams {
            streams: 2,
            direction: Direction::Upload,
            timing: TimingParams {
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(200),
            },
        };
        let report = run(&params, &Target::direct(backend.addr()), Some(&backend)).unwrap();
        assert!(report.get("gbit_s_total").unwrap() > 0.0);
        assert_eq!(report.per_stream_gbit_s.len(), 2);
        assert_eq!(report.get("streams_closed_early"), Some(0.0));
    }
}
