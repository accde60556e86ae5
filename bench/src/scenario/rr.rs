//! Request/response over persistent connections against an echo backend.
//!
//! Each connection writes SIZE bytes, reads SIZE bytes back, and records the time from the
//! first byte written to the last byte read in a histogram; then it sends the next request
//! at once (closed loop: at most one request in flight per connection, so latency under
//! overload shows up as fewer requests per second, not as a longer queue).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::cpu::REQUESTS_PER_UNIT;
use crate::error::{BenchError, Result};
use crate::net::{self, read_some, write_some};
use crate::report::Report;
use crate::scenario::{join_load, spawn_load, spread, Target, TimingParams};
use crate::session::Pump;
use crate::stats::{latency_figures, latency_histogram, per_second};
use crate::timeline::{drive, Meter, RunControl};

/// Requests one connection may complete per turn before yielding.
const BUDGET: usize = 8;
/// Largest request accepted on the command line.
pub const MAX_SIZE: usize = 16 * 1024 * 1024;
const SCRATCH: usize = 64 * 1024;
const POLL_TICK: Duration = Duration::from_millis(50);

/// Parameters of a request/response run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RrParams {
    pub size: usize,
    pub concurrency: usize,
    pub threads: usize,
    #[serde(flatten)]
    pub timing: TimingParams,
}

/// Counters one load thread shares with the clock.
#[derive(Debug, Default)]
struct Tally {
    completed: AtomicU64,
    lost: AtomicU64,
}

/// Counts every completed request; times only those inside the measured window.
struct Recorder<'a> {
    histogram: Histogram<u64>,
    control: &'a RunControl,
    completed: &'a AtomicU64,
}

impl Recorder<'_> {
    fn done(&mut self, latency: Duration) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        if self.control.measuring() {
            self.histogram.saturating_record(latency.as_nanos().try_into().unwrap_or(u64::MAX));
        }
    }
}

/// One persistent connection with at most one request in flight.
struct RrSession {
    stream: TcpStream,
    sent: usize,
    received: usize,
    started: Instant,
}

impl RrSession {
    /// Sends and receives as far as possible; hands each completed latency to `recorder`.
    fn pump(&mut self, request: &[u8], scratch: &mut [u8], recorder: &mut Recorder<'_>) -> Pump {
        for _ in 0..BUDGET {
            if self.send(request).is_err() {
                return Pump::Closed;
            }
            match self.receive(request.len(), scratch) {
                Err(_) => return Pump::Closed,
                Ok(false) => return Pump::Idle,
                Ok(true) => {
                    recorder.done(self.started.elapsed());
                    (self.sent, self.received, self.started) = (0, 0, Instant::now());
                }
            }
        }
        Pump::Again
    }

    fn send(&mut self, request: &[u8]) -> io::Result<()> {
        while self.sent < request.len() {
            match write_some(&mut self.stream, &request[self.sent..])? {
                Some(n) => self.sent += n,
                None => break,
            }
        }
        Ok(())
    }

    /// True once the whole reply is in.
    fn receive(&mut self, size: usize, scratch: &mut [u8]) -> io::Result<bool> {
        while self.received < size {
            let want = (size - self.received).min(scratch.len());
            match read_some(&mut self.stream, &mut scratch[..want])? {
                Some(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some(n) => self.received += n,
                None => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// Runs the scenario against an echo service at `target`.
pub fn run(params: &RrParams, target: &Target) -> Result<Report> {
    validate(params)?;
    let mut streams = Vec::with_capacity(params.concurrency);
    for _ in 0..params.concurrency {
        streams.push(net::connect_nonblocking(target.addr)?);
    }
    let control = RunControl::new();
    let mut tallies = Vec::new();
    let mut handles = Vec::new();
    for (i, group) in spread(streams, params.threads).into_iter().enumerate() {
        let tally = Arc::new(Tally::default());
        tallies.push(Arc::clone(&tally));
        let control = Arc::clone(&control);
        let size = params.size;
        handles.push(spawn_load(format!("rr-{i}"), move || {
            client_loop(group, size, &control, &tally)
        })?);
    }
    let counters = || {
        let sum = |f: fn(&Tally) -> &AtomicU64| {
            tallies.iter().map(|t| f(t).load(Ordering::Relaxed)).sum()
        };
        vec![sum(|t| &t.completed), sum(|t| &t.lost)]
    };
    let describe = |before: &[u64], now: &[u64], seconds: f64| {
        format!("{:.0} req/s", per_second(now[0] - before[0], seconds))
    };
    let meter = Meter { label: "rr", counters: &counters, describe: &describe, proxy: target.pid };
    let window = drive(&control, params.timing.into(), &meter);
    let histogram = merge(handles)?;
    let window = window?;
    let mut report = Report::new("rr", target.label.clone(), params)?;
    report.figure("requests_per_s", per_second(window.delta(0), window.seconds()));
    report.figure("requests", window.delta(0) as f64);
    report.figure("connections_lost", window.end[1] as f64);
    report.figure("seconds", window.seconds());
    window.cpu.add_to(&mut report);
    let requests = window.delta(0) as f64;
    window.cpu.add_cost(&mut report, "cpu_s_per_100k_requests", requests, REQUESTS_PER_UNIT);
    for (name, value) in latency_figures(&histogram) {
        report.figure(name, value);
    }
    report.attach_histogram(histogram);
    Ok(report)
}

fn validate(params: &RrParams) -> Result<()> {
    if params.size == 0 || params.size > MAX_SIZE {
        return Err(BenchError::Usage(format!("--size must be 1..={MAX_SIZE} bytes")));
    }
    if params.concurrency == 0 {
        return Err(BenchError::Usage("--concurrency must be at least 1".into()));
    }
    Ok(())
}

/// Joins the load threads and merges their histograms.
pub fn merge(
    handles: Vec<std::thread::JoinHandle<io::Result<Histogram<u64>>>>,
) -> Result<Histogram<u64>> {
    let mut total = latency_histogram();
    let mut first_error = None;
    for handle in handles {
        match join_load(handle) {
            Ok(h) => total.add(&h).expect("histograms share bounds"),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    first_error.map_or(Ok(total), Err)
}

fn client_loop(
    streams: Vec<TcpStream>,
    size: usize,
    control: &RunControl,
    tally: &Tally,
) -> io::Result<Histogram<u64>> {
    let mut poll = Poll::new()?;
    let now = Instant::now();
    let mut sessions: Vec<Option<RrSession>> = Vec::with_capacity(streams.len());
    for (i, mut stream) in streams.into_iter().enumerate() {
        poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        sessions.push(Some(RrSession { stream, sent: 0, received: 0, started: now }));
    }
    let request = vec![0x42; size];
    let mut scratch = vec![0; SCRATCH];
    let mut recorder =
        Recorder { histogram: latency_histogram(), control, completed: &tally.completed };
    let mut events = Events::with_capacity(256);
    let mut again: Vec<usize> = Vec::new();
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
            let Some(session) = sessions[index].as_mut() else { continue };
            match session.pump(&request, &mut scratch, &mut recorder) {
                Pump::Idle => {}
                Pump::Again => again.push(index),
                Pump::Closed => {
                    sessions[index] = None;
                    tally.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        again.sort_unstable();
        again.dedup();
    }
    Ok(recorder.histogram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Behaviour};

    #[test]
    fn echo_round_trips_are_counted_and_timed() {
        let backend = Backend::start("127.0.0.1:0".parse().unwrap(), Behaviour::Echo).unwrap();
        let params = RrParams {
            size: 3000,
            concurrency: 4,
            threads: 2,
            timing: TimingParams {
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(200),
            },
        };
        let report = run(&params, &Target::direct(backend.addr())).unwrap();
        assert!(report.get("requests_per_s").unwrap() > 0.0);
        assert_eq!(report.get("connections_lost"), Some(0.0));
        let p50 = report.get("latency_us_p50").unwrap();
        let p99 = report.get("latency_us_p99").unwrap();
        assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} p99 {p99}");
        assert!(!report.latency_cdf_us.is_empty());
    }

    #[test]
    fn zero_size_is_refused() {
        let params = RrParams {
            size: 0,
            concurrency: 1,
            threads: 1,
            timing: TimingParams { warmup: Duration::ZERO, duration: Duration::ZERO },
        };
        assert!(validate(&params).is_err());
    }
}
