//! Connection rate: a new TCP connection per request.
//!
//! Each of C slots loops: nonblocking connect, send a SIZE-byte request, read the SIZE-byte
//! reply and then end of stream, close. Latency runs from the connect call to end of stream.
//! The backend closes first (see [`crate::session::ReplySession`]), so TIME_WAIT stays on
//! the server side; the client closes only after reading end of stream and never holds
//! TIME_WAIT, so ephemeral ports on 127.0.0.1 do not run out however long the run.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};
use serde::Serialize;

use crate::cpu::CONNECTIONS_PER_UNIT;
use crate::error::{BenchError, Result};
use crate::net::{read_some, require_local, write_some};
use crate::report::Report;
use crate::scenario::rr::merge;
use crate::scenario::{spawn_load, Target, TimingParams};
use crate::stats::{latency_figures, latency_histogram, per_second};
use crate::timeline::{drive, Meter, RunControl};

/// An attempt older than this is abandoned and counted as a timeout.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(5);
/// Pause before a slot retries after a failed attempt, so a dead target is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Largest request and reply.
pub const MAX_SIZE: usize = 64 * 1024;
const POLL_TICK: Duration = Duration::from_millis(10);

/// Parameters of a connection-rate run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConnectParams {
    pub concurrency: usize,
    pub size: usize,
    pub threads: usize,
    #[serde(flatten)]
    pub timing: TimingParams,
}

#[derive(Debug, Default)]
struct Tally {
    completed: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
}

enum Stage {
    Connecting,
    Sending { sent: usize },
    Receiving { received: usize },
}

/// What became of an attempt after pumping it.
enum Outcome {
    Pending,
    Done,
    Failed,
}

struct Attempt {
    stream: TcpStream,
    started: Instant,
    stage: Stage,
}

impl Attempt {
    fn pump(&mut self, request: &[u8], scratch: &mut [u8]) -> Outcome {
        self.step(request, scratch).unwrap_or(Outcome::Failed)
    }

    fn step(&mut self, request: &[u8], scratch: &mut [u8]) -> io::Result<Outcome> {
        loop {
            match &mut self.stage {
                Stage::Connecting => {
                    if let Some(e) = self.stream.take_error()? {
                        return Err(e);
                    }
                    match self.stream.peer_addr() {
                        Ok(_) => self.stage = Stage::Sending { sent: 0 },
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                            return Ok(Outcome::Pending)
                        }
                        Err(e) => return Err(e),
                    }
                }
                Stage::Sending { sent } => match write_some(&mut self.stream, &request[*sent..])? {
                    None => return Ok(Outcome::Pending),
                    Some(n) if *sent + n == request.len() => {
                        self.stage = Stage::Receiving { received: 0 }
                    }
                    Some(n) => *sent += n,
                },
                Stage::Receiving { received } => match read_some(&mut self.stream, scratch)? {
                    None => return Ok(Outcome::Pending),
                    Some(0) if *received == request.len() => return Ok(Outcome::Done),
                    Some(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Some(n) => *received += n,
                },
            }
        }
    }
}

/// One of C concurrent request loops.
struct Slot {
    attempt: Option<Attempt>,
    retry_at: Option<Instant>,
}

struct Client<'a> {
    target: SocketAddr,
    request: Vec<u8>,
    scratch: Vec<u8>,
    slots: Vec<Slot>,
    histogram: Histogram<u64>,
    control: &'a RunControl,
    tally: &'a Tally,
}

impl Client<'_> {
    fn begin(&mut self, registry: &Registry, index: usize) {
        let slot = &mut self.slots[index];
        slot.retry_at = None;
        let started = Instant::now();
        let opened = TcpStream::connect(self.target).and_then(|mut stream| {
            let _ = stream.set_nodelay(true);
            registry.register(
                &mut stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match opened {
            Ok(stream) => {
                slot.attempt = Some(Attempt { stream, started, stage: Stage::Connecting })
            }
            Err(_) => self.fail(index, false),
        }
    }

    fn fail(&mut self, index: usize, timed_out: bool) {
        let counter = if timed_out { &self.tally.timed_out } else { &self.tally.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        self.slots[index].attempt = None;
        self.slots[index].retry_at = Some(Instant::now() + RETRY_PAUSE);
    }

    fn on_event(&mut self, registry: &Registry, index: usize) {
        let Some(attempt) = self.slots[index].attempt.as_mut() else { return };
        match attempt.pump(&self.request, &mut self.scratch) {
            Outcome::Pending => {}
            Outcome::Failed => self.fail(index, false),
            Outcome::Done => {
                let latency = attempt.started.elapsed();
                self.slots[index].attempt = None;
                self.record(latency);
                self.begin(registry, index);
            }
        }
    }

    fn record(&mut self, latency: Duration) {
        self.tally.completed.fetch_add(1, Ordering::Relaxed);
        if self.control.measuring() {
            self.histogram.saturating_record(latency.as_nanos().try_into().unwrap_or(u64::MAX));
        }
    }

    /// Restarts slots due for a retry and abandons attempts past their limit.
    fn sweep(&mut self, registry: &Registry) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.retry_at.is_some_and(|at| at <= now) {
                self.begin(registry, index);
            } else if slot.attempt.as_ref().is_some_and(|a| now - a.started > ATTEMPT_LIMIT) {
                self.fail(index, true);
            }
        }
    }

    fn run(mut self) -> io::Result<Histogram<u64>> {
        let mut poll = Poll::new()?;
        for index in 0..self.slots.len() {
            self.begin(poll.registry(), index);
        }
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        while !self.control.stopped() {
            if let Err(e) = poll.poll(&mut events, Some(POLL_TICK)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                self.on_event(poll.registry(), event.token().0);
            }
            if last_sweep.elapsed() >= POLL_TICK {
                self.sweep(poll.registry());
                last_sweep = Instant::now();
            }
        }
        Ok(self.histogram)
    }
}

/// Runs the scenario against a fixed-reply service at `target`.
pub fn run(params: &ConnectParams, target: &Target) -> Result<Report> {
    validate(params)?;
    let addr = require_local(target.addr)?;
    let control = RunControl::new();
    let threads = params.threads.clamp(1, params.concurrency);
    let mut tallies = Vec::new();
    let mut handles = Vec::new();
    for i in 0..threads {
        let slots = params.concurrency / threads + usize::from(i < params.concurrency % threads);
        let tally = Arc::new(Tally::default());
        tallies.push(Arc::clone(&tally));
        let control = Arc::clone(&control);
        let size = params.size;
        handles.push(spawn_load(format!("connect-{i}"), move || {
            let client = Client {
                target: addr,
                request: vec![0x43; size],
                scratch: vec![0; size.max(4096)],
                slots: (0..slots).map(|_| Slot { attempt: None, retry_at: None }).collect(),
                histogram: latency_histogram(),
                control: &control,
                tally: &tally,
            };
            client.run()
        })?);
    }
    let counters = || {
        let sum = |f: fn(&Tally) -> &AtomicU64| {
            tallies.iter().map(|t| f(t).load(Ordering::Relaxed)).sum()
        };
        vec![sum(|t| &t.completed), sum(|t| &t.failed), sum(|t| &t.timed_out)]
    };
    let describe = |before: &[u64], now: &[u64], seconds: f64| {
        format!(
            "{:.0} conn/s, {} failed",
            per_second(now[0] - before[0], seconds),
            now[1] - before[1]
        )
    };
    let meter =
        Meter { label: "connect", counters: &counters, describe: &describe, proxy: target.pid };
    let window = drive(&control, params.timing.into(), &meter);
    let histogram = merge(handles)?;
    let window = window?;
    let mut report = Report::new("connect", target.label.clone(), params)?;
    report.figure("connections_per_s", per_second(window.delta(0), window.seconds()));
    report.figure("connections", window.delta(0) as f64);
    report.figure("failed", window.delta(1) as f64);
    report.figure("timed_out", window.delta(2) as f64);
    report.figure("seconds", window.seconds());
    window.cpu.add_to(&mut report);
    let connections = window.delta(0) as f64;
    window.cpu.add_cost(
        &mut report,
        "cpu_s_per_10k_connections",
        connections,
        CONNECTIONS_PER_UNIT,
    );
    for (name, value) in latency_figures(&histogram) {
        report.figure(name, value);
    }
    report.attach_histogram(histogram);
    Ok(report)
}

fn validate(params: &ConnectParams) -> Result<()> {
    if params.size == 0 || params.size > MAX_SIZE {
        return Err(BenchError::Usage(format!("--size must be 1..={MAX_SIZE} bytes")));
    }
    if params.concurrency == 0 {
        return Err(BenchError::Usage("--concurrency must be at least 1".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Behaviour};

    fn params(concurrency: usize) -> ConnectParams {
        ConnectParams {
            concurrency,
            size: 32,
            threads: 1,
            timing: TimingParams {
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(200),
            },
        }
    }

    #[test]
    fn connections_complete_without_failures() {
        let behaviour = Behaviour::Reply { request: 32, reply: 32 };
        let backend = Backend::start("127.0.0.1:0".parse().unwrap(), behaviour).unwrap();
        let report = run(&params(4), &Target::direct(backend.addr())).unwrap();
        assert!(report.get("connections_per_s").unwrap() > 0.0);
        assert_eq!(report.get("failed"), Some(0.0));
        assert!(report.get("latency_us_p99").is_some());
    }

    #[test]
    fn short_reply_counts_as_failure() {
        let behaviour = Behaviour::Reply { request: 32, reply: 8 };
        let backend = Backend::start("127.0.0.1:0".parse().unwrap(), behaviour).unwrap();
        let report = run(&params(2), &Target::direct(backend.addr())).unwrap();
        assert_eq!(report.get("connections"), Some(0.0));
        assert!(report.get("failed").unwrap() > 0.0);
    }
}
