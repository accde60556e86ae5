//! UDP request/response: datagrams per second and round-trip latency of many clients
//! against a UDP echo (through a forwarder, or "direct"); the comparison that runs it is
//! `crate::udp`.
//!
//! Each client is its own UDP socket (so its own flow in the forwarder), connected to the
//! target, with one datagram of SIZE bytes in flight (closed loop); the in-process backend
//! echoes it. A round trip is timed from send to reply. A datagram unanswered after
//! [`LOSS_TIMEOUT`] is counted lost and the client sends the next one. `datagrams_per_s`
//! counts what crossed the forwarder (a request and its reply: two per round trip).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::cpu::REQUESTS_PER_UNIT;
use crate::error::{io_context, BenchError, Result};
use crate::report::Report;
use crate::scenario::rr::merge;
use crate::scenario::{spawn_load, spread, Target, TimingParams};
use crate::stats::{latency_figures, latency_histogram, per_second};
use crate::timeline::{drive, Meter, RunControl};

/// A request unanswered this long is counted lost and the next one is sent.
pub const LOSS_TIMEOUT: Duration = Duration::from_millis(200);
/// Largest datagram accepted on the command line (the largest IPv4 UDP payload).
pub const MAX_SIZE: usize = 65507;
const POLL_TICK: Duration = Duration::from_millis(10);

/// Parameters of a UDP request/response run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct UdpParams {
    pub size: usize,
    pub concurrency: usize,
    pub threads: usize,
    #[serde(flatten)]
    pub timing: TimingParams,
}

#[derive(Debug, Default)]
struct Tally {
    completed: AtomicU64,
    lost: AtomicU64,
}

/// An echo server on one UDP socket, on its own thread, until dropped.
#[derive(Debug)]
pub struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(listen: SocketAddr) -> Result<UdpEcho> {
        let socket = UdpSocket::bind(listen)
            .map_err(|source| BenchError::Listen { addr: listen, source })?;
        socket.set_read_timeout(Some(Duration::from_millis(50))).map_err(io_context("udp echo"))?;
        let addr = socket.local_addr().map_err(io_context("udp echo"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("udp-echo".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
            .map_err(io_context("spawning udp echo"))?;
        Ok(UdpEcho { addr, stop, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the scenario against a UDP echo service at `target`.
pub fn run(params: &UdpParams, target: &Target) -> Result<Report> {
    validate(params)?;
    let mut sockets = Vec::with_capacity(params.concurrency);
    for _ in 0..params.concurrency {
        sockets.push(client_socket(target.addr)?);
    }
    let control = RunControl::new();
    let mut tallies = Vec::new();
    let mut handles = Vec::new();
    for (i, group) in spread(sockets, params.threads).into_iter().enumerate() {
        let tally = Arc::new(Tally::default());
        tallies.push(Arc::clone(&tally));
        let control = Arc::clone(&control);
        let size = params.size;
        handles.push(spawn_load(format!("udp-{i}"), move || {
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
        format!("{:.0} round trips/s", per_second(now[0] - before[0], seconds))
    };
    let meter = Meter { label: "udp", counters: &counters, describe: &describe, proxy: target.pid };
    let window = drive(&control, params.timing.into(), &meter);
    let histogram = merge(handles)?;
    let window = window?;
    let mut report = Report::new("udp", target.label.clone(), params)?;
    let round_trips = per_second(window.delta(0), window.seconds());
    report.figure("round_trips_per_s", round_trips);
    report.figure("datagrams_per_s", 2.0 * round_trips);
    report.figure("round_trips", window.delta(0) as f64);
    report.figure("lost", window.delta(1) as f64);
    report.figure("seconds", window.seconds());
    for (name, value) in latency_figures(&histogram) {
        report.figure(name, value);
    }
    window.cpu.add_to(&mut report);
    let datagrams = 2.0 * window.delta(0) as f64;
    window.cpu.add_cost(&mut report, "cpu_s_per_100k_datagrams", datagrams, REQUESTS_PER_UNIT);
    report.attach_histogram(histogram);
    Ok(report)
}

fn validate(params: &UdpParams) -> Result<()> {
    if params.size == 0 || params.size > MAX_SIZE {
        return Err(BenchError::Usage(format!("--size must be 1..={MAX_SIZE} bytes")));
    }
    if params.concurrency == 0 {
        return Err(BenchError::Usage("--concurrency must be at least 1".into()));
    }
    Ok(())
}

fn client_socket(target: SocketAddr) -> Result<mio::net::UdpSocket> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => "127.0.0.1:0".parse().expect("constant address"),
        SocketAddr::V6(_) => "[::1]:0".parse().expect("constant address"),
    };
    let socket = mio::net::UdpSocket::bind(local).map_err(io_context("binding udp client"))?;
    socket.connect(target).map_err(|source| BenchError::Connect { addr: target, source })?;
    Ok(socket)
}

/// One client: its socket and when its request in flight left.
struct Client {
    socket: mio::net::UdpSocket,
    sent: Instant,
}

fn client_loop(
    sockets: Vec<mio::net::UdpSocket>,
    size: usize,
    control: &RunControl,
    tally: &Tally,
) -> io::Result<Histogram<u64>> {
    let mut poll = Poll::new()?;
    let request = vec![0x42u8; size];
    let mut clients = Vec::with_capacity(sockets.len());
    for (i, mut socket) in sockets.into_iter().enumerate() {
        poll.registry().register(&mut socket, Token(i), Interest::READABLE)?;
        let _ = socket.send(&request);
        clients.push(Client { socket, sent: Instant::now() });
    }
    let mut histogram = latency_histogram();
    let mut buf = vec![0u8; 65536];
    let mut events = Events::with_capacity(256);
    while !control.stopped() {
        if let Err(e) = poll.poll(&mut events, Some(POLL_TICK)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            let c = &mut clients[event.token().0];
            while let Ok(n) = c.socket.recv(&mut buf) {
                if n != size {
                    continue;
                }
                tally.completed.fetch_add(1, Ordering::Relaxed);
                if control.measuring() {
                    let ns = c.sent.elapsed().as_nanos().try_into().unwrap_or(u64::MAX);
                    histogram.saturating_record(ns);
                }
                let _ = c.socket.send(&request);
                c.sent = Instant::now();
            }
        }
        resend_lost(&mut clients, &request, tally);
    }
    Ok(histogram)
}

/// Counts requests unanswered for [`LOSS_TIMEOUT`] as lost and sends the next ones.
fn resend_lost(clients: &mut [Client], request: &[u8], tally: &Tally) {
    let now = Instant::now();
    for c in clients.iter_mut().filter(|c| now.duration_since(c.sent) >= LOSS_TIMEOUT) {
        tally.lost.fetch_add(1, Ordering::Relaxed);
        let _ = c.socket.send(request);
        c.sent = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trips_are_counted_and_timed() {
        let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let params = UdpParams {
            size: 100,
            concurrency: 4,
            threads: 2,
            timing: TimingParams {
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(200),
            },
        };
        let report = run(&params, &Target::direct(echo.addr())).unwrap();
        let rate = report.get("round_trips_per_s").unwrap();
        assert!(rate > 0.0);
        assert_eq!(report.get("datagrams_per_s"), Some(2.0 * rate));
        let p50 = report.get("latency_us_p50").unwrap();
        assert!(p50 > 0.0 && p50 <= report.get("latency_us_p99").unwrap());
    }

    #[test]
    fn unanswered_requests_are_counted_lost() {
        // A socket that never answers: every request is lost after LOSS_TIMEOUT.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let params = UdpParams {
            size: 10,
            concurrency: 2,
            threads: 1,
            timing: TimingParams { warmup: Duration::ZERO, duration: Duration::from_millis(500) },
        };
        let report = run(&params, &Target::direct(silent.local_addr().unwrap())).unwrap();
        assert_eq!(report.get("round_trips"), Some(0.0));
        assert!(report.get("lost").unwrap() >= 2.0);
    }
}
