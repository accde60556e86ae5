//! One-way bulk datagrams (syslog- or QUIC-like): senders blast datagrams of one size at
//! the target, a sink counts what arrives. The figure is what the sink received per second
//! in the measured window (the forwarder's delivered rate); the difference to what left
//! the senders is loss. Senders use sendmmsg(2) (32 datagrams a call) on connected
//! sockets, one thread for all; the sink uses recvmmsg(2) on its own thread and counts
//! datagrams and bytes with atomics read by the meter.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use serde::Serialize;

use crate::error::{io_context, BenchError, Result};
use crate::report::Report;
use crate::scenario::{join_load, spawn_load, Target, TimingParams};
use crate::stats::{gbit_per_s, per_second};
use crate::timeline::{drive, Meter, RunControl};

/// Datagrams a sender passes to one sendmmsg(2).
const SEND_BATCH: usize = 32;
/// Datagrams the sink takes with one recvmmsg(2).
const SINK_BATCH: usize = 64;
/// Kernel receive buffer the sink asks for.
const SINK_BUFFER: usize = 4 << 20;

/// Parameters of a bulk run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BulkParams {
    /// Bytes per datagram.
    pub size: usize,
    /// Sending sockets (flows).
    pub senders: usize,
    #[serde(flatten)]
    pub timing: TimingParams,
}

/// A UDP server that counts what it receives, on its own thread, until dropped.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    datagrams: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn start(listen: SocketAddr) -> Result<Sink> {
        let socket = UdpSocket::bind(listen)
            .map_err(|source| BenchError::Listen { addr: listen, source })?;
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(SINK_BUFFER)
            .map_err(io_context("udp sink buffer"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50))).map_err(io_context("udp sink"))?;
        let addr = socket.local_addr().map_err(io_context("udp sink"))?;
        let (datagrams, bytes, stop) =
            (Arc::default(), Arc::default(), Arc::<AtomicBool>::default());
        let counters = (Arc::clone(&datagrams), Arc::clone(&bytes), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("udp-sink".into())
            .spawn(move || sink_loop(&socket, &counters.0, &counters.1, &counters.2))
            .map_err(io_context("spawning udp sink"))?;
        Ok(Sink { addr, datagrams, bytes, stop, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams and bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        (self.datagrams.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sink_loop(socket: &UdpSocket, datagrams: &AtomicU64, bytes: &AtomicU64, stop: &AtomicBool) {
    let mut buffers = vec![[0u8; 2048]; SINK_BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(SINK_BATCH, None);
    while !stop.load(Ordering::Relaxed) {
        // A blocking wait for the first datagram (bounded by the read timeout), then the rest
        // of what is queued without waiting.
        let mut peek = [0u8; 1];
        if socket.peek(&mut peek).is_err() {
            continue;
        }
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            buffers.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
        let received = recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        );
        let Ok(results) = received else { continue };
        let (mut n, mut total) = (0, 0);
        for r in results {
            n += 1;
            total += r.bytes as u64;
        }
        datagrams.fetch_add(n, Ordering::Relaxed);
        bytes.fetch_add(total, Ordering::Relaxed);
    }
}

/// Runs the scenario: senders to `target`, counted at `sink`.
pub fn run(params: &BulkParams, target: &Target, sink: &Sink) -> Result<Report> {
    if params.size == 0 || params.size > 1472 {
        return Err(BenchError::Usage("--bulk-size must be 1..=1472 bytes".into()));
    }
    let mut sockets = Vec::with_capacity(params.senders);
    for _ in 0..params.senders.max(1) {
        let s = UdpSocket::bind("127.0.0.1:0").map_err(io_context("binding udp sender"))?;
        s.connect(target.addr)
            .map_err(|source| BenchError::Connect { addr: target.addr, source })?;
        s.set_nonblocking(true).map_err(io_context("udp sender"))?;
        sockets.push(s);
    }
    let control = RunControl::new();
    let sent = Arc::new(AtomicU64::new(0));
    let size = params.size;
    let (loop_control, loop_sent) = (Arc::clone(&control), Arc::clone(&sent));
    let handle = spawn_load("udp-bulk".into(), move || {
        send_loop(&sockets, size, &loop_control, &loop_sent);
        Ok(())
    })?;
    let counters = || {
        let (d, b) = sink.received();
        vec![sent.load(Ordering::Relaxed), d, b]
    };
    let describe = |before: &[u64], now: &[u64], seconds: f64| {
        format!("{:.0} datagrams/s received", per_second(now[1] - before[1], seconds))
    };
    let meter =
        Meter { label: "udp-bulk", counters: &counters, describe: &describe, proxy: target.pid };
    let window = drive(&control, params.timing.into(), &meter);
    join_load(handle)?;
    let window = window?;
    let seconds = window.seconds();
    let (sent, received, bytes) = (window.delta(0), window.delta(1), window.delta(2));
    let mut report = Report::new("udp-bulk", target.label.clone(), params)?;
    report.figure("datagrams_per_s", per_second(received, seconds));
    report.figure("gbit_s", gbit_per_s(bytes, seconds));
    report.figure("sent_per_s", per_second(sent, seconds));
    let loss = if sent == 0 { 0.0 } else { 1.0 - received.min(sent) as f64 / sent as f64 };
    report.figure("loss_percent", 100.0 * loss);
    report.figure("seconds", seconds);
    Ok(report)
}

/// Sends batches from each socket in turn until stopped; a full socket buffer skips a turn.
fn send_loop(sockets: &[UdpSocket], size: usize, control: &RunControl, sent: &AtomicU64) {
    let payload = vec![0x5au8; size];
    let slices: Vec<[IoSlice<'_>; 1]> = (0..SEND_BATCH).map(|_| [IoSlice::new(&payload)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = vec![None; SEND_BATCH];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(SEND_BATCH, None);
    while !control.stopped() {
        let mut any = false;
        for s in sockets {
            let result =
                sendmmsg(s.as_raw_fd(), &mut headers, &slices, &addrs, [], MsgFlags::empty());
            if let Ok(results) = result {
                let n = results.count() as u64;
                any |= n > 0;
                sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        if !any {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
