//! Many distinct sources without a socket each: every source is an address of
//! 127.128.0.0/9 and the port of one of a few wildcard-bound sockets; a request leaves from
//! its source address through IP_PKTINFO, and its reply (the echo returns the payload,
//! which names the source) comes back to that socket. Used for flow churn (each source
//! sends one request and waits for its reply: every request makes a new flow) and for
//! idle flows (the same, then the flows are left idle in the forwarder).
//!
//! Invariants: no source is used twice in one process (a process-wide counter hands out
//! source numbers), so every request opens a new flow; at most `in_flight` requests wait at
//! once; one unanswered for [`LOSS_TIMEOUT`] is counted lost and replaced by the next.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::socket::{sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags, SockaddrIn};
use serde::Serialize;

use crate::error::{io_context, BenchError, Result};
use crate::report::Report;
use crate::scenario::Target;
use crate::stats::{latency_figures, latency_histogram, per_second};
use crate::timeline;

/// A request unanswered this long is counted lost.
pub const LOSS_TIMEOUT: Duration = Duration::from_millis(500);
/// The whole run may take at most this long.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Sockets the sources share (each source is an address and one of their ports).
const SOCKETS: usize = 4;
/// First source address: 127.128.0.0 (a forwarder's own shared sources may use 127.64/10).
const FIRST_SOURCE: u32 = 0x7f80_0000;
/// Addresses in 127.128.0.0/9, less its broadcast address.
const SOURCE_ADDRESSES: u64 = (1 << 23) - 2;
/// Bytes of every request: the source number and the send time follow a marker.
pub const REQUEST_SIZE: usize = 64;

/// Source numbers handed out so far in this process.
static NEXT_SOURCE: AtomicU64 = AtomicU64::new(1);

/// Parameters of a run of many sources.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SourcesParams {
    /// Distinct sources, each sending one request.
    pub sources: usize,
    /// Requests waiting for their replies at once.
    pub in_flight: usize,
}

/// What a run of many sources met.
#[derive(Debug)]
pub struct SourcesRun {
    pub answered: u64,
    pub lost: u64,
    pub seconds: f64,
    pub histogram: Histogram<u64>,
}

/// Source `n`: an address of 127.128.0.0/9 and which socket's port.
fn source(n: u64) -> (Ipv4Addr, usize) {
    let address = n / SOCKETS as u64 % SOURCE_ADDRESSES + 1;
    (Ipv4Addr::from(FIRST_SOURCE + address as u32), (n % SOCKETS as u64) as usize)
}

/// One request in flight.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    sent: Instant,
}

/// Sends one request from each of `params.sources` new sources to `target`, keeping
/// `params.in_flight` waiting, until every one is answered or lost.
pub fn run(params: &SourcesParams, target: SocketAddr) -> Result<SourcesRun> {
    let SocketAddr::V4(target) = target else {
        return Err(BenchError::Usage("many sources need an IPv4 target".into()));
    };
    let sockets = (0..SOCKETS).map(|_| wildcard_socket()).collect::<Result<Vec<_>>>()?;
    let mut poll = Poll::new().map_err(io_context("poll"))?;
    for (i, s) in sockets.iter().enumerate() {
        let fd = s.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), Token(i), Interest::READABLE)
            .map_err(io_context("poll"))?;
    }
    let first = NEXT_SOURCE.fetch_add(params.sources as u64, Ordering::Relaxed);
    let end = first + params.sources as u64;
    let mut next = first;
    let mut waiting: std::collections::HashMap<u64, Waiting> = std::collections::HashMap::new();
    let mut histogram = latency_histogram();
    let (mut answered, mut lost) = (0u64, 0u64);
    let began = Instant::now();
    let mut events = Events::with_capacity(256);
    let mut buf = [0u8; 2048];
    let mut last_print = Instant::now();
    while next < end || !waiting.is_empty() {
        if timeline::interrupted() {
            return Err(BenchError::Interrupted);
        }
        if began.elapsed() > RUN_LIMIT {
            lost += waiting.len() as u64 + (end - next);
            break;
        }
        while waiting.len() < params.in_flight.max(1) && next < end {
            send_request(&sockets, next, target)?;
            waiting.insert(next, Waiting { sent: Instant::now() });
            next += 1;
        }
        let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        for event in events.iter() {
            let socket = &sockets[event.token().0];
            while let Ok(n) = socket.recv(&mut buf) {
                let Some(number) = request_source(&buf[..n]) else { continue };
                if let Some(w) = waiting.remove(&number) {
                    answered += 1;
                    let ns = w.sent.elapsed().as_nanos().try_into().unwrap_or(u64::MAX);
                    histogram.saturating_record(ns);
                }
            }
        }
        let now = Instant::now();
        let before = waiting.len();
        waiting.retain(|_, w| now.duration_since(w.sent) < LOSS_TIMEOUT);
        lost += (before - waiting.len()) as u64;
        if last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!("[udp-sources] {}/{} sources, {lost} lost", next - first, params.sources);
            last_print = Instant::now();
        }
    }
    Ok(SourcesRun { answered, lost, seconds: began.elapsed().as_secs_f64(), histogram })
}

/// A UDP socket on 0.0.0.0 and an ephemeral port, sending with chosen source addresses.
fn wildcard_socket() -> Result<UdpSocket> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(io_context("binding source socket"))?;
    s.set_nonblocking(true).map_err(io_context("source socket"))?;
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4 << 20)
        .map_err(io_context("source socket buffer"))?;
    setsockopt(&s, sockopt::Ipv4PacketInfo, &true).map_err(|e| io_context("pktinfo")(e.into()))?;
    Ok(s)
}

fn send_request(sockets: &[UdpSocket], number: u64, target: SocketAddrV4) -> Result<()> {
    let (from, socket) = source(number);
    let mut payload = [0u8; REQUEST_SIZE];
    payload[..8].copy_from_slice(b"sources:");
    payload[8..16].copy_from_slice(&number.to_be_bytes());
    let info = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr { s_addr: u32::from(from).to_be() },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let to = SockaddrIn::from(target);
    let iov = [std::io::IoSlice::new(&payload)];
    let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
    // A full buffer drops the request: it is counted lost after LOSS_TIMEOUT.
    let _ = sendmsg(sockets[socket].as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&to));
    Ok(())
}

/// The source number a request (or its echo) names.
fn request_source(payload: &[u8]) -> Option<u64> {
    let body = payload.strip_prefix(b"sources:")?;
    Some(u64::from_be_bytes(body.get(..8)?.try_into().ok()?))
}

/// Flow churn: `params.sources` new flows, one request each; new flows per second, latency
/// of a new flow's first round trip, and losses.
pub fn churn(params: &SourcesParams, target: &Target) -> Result<Report> {
    let run = run(params, target.addr)?;
    let mut report = Report::new("udp-churn", target.label.clone(), params)?;
    report.figure("new_flows_per_s", per_second(run.answered, run.seconds));
    report.figure("answered", run.answered as f64);
    report.figure("lost", run.lost as f64);
    report.figure("seconds", run.seconds);
    for (name, value) in latency_figures(&run.histogram) {
        report.figure(name, value);
    }
    report.attach_histogram(run.histogram);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_distinct_addresses_spread_over_the_sockets() {
        let a = source(1);
        let b = source(2);
        let c = source(1 + SOCKETS as u64);
        assert_ne!(a, b);
        assert_eq!(a.0, b.0, "consecutive sources share an address on different sockets");
        assert_ne!(a.0, c.0);
        assert_eq!(a.1, c.1);
        assert!(a.0.octets()[0] == 127 && a.0.octets()[1] >= 128);
        let mut payload = [0u8; REQUEST_SIZE];
        payload[..8].copy_from_slice(b"sources:");
        payload[8..16].copy_from_slice(&77u64.to_be_bytes());
        assert_eq!(request_source(&payload), Some(77));
        assert_eq!(request_source(b"other"), None);
    }

    #[test]
    fn every_source_is_answered_by_an_echo() {
        let echo = crate::scenario::udp::UdpEcho::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let run = run(&SourcesParams { sources: 300, in_flight: 16 }, echo.addr()).unwrap();
        assert_eq!((run.answered, run.lost), (300, 0));
    }
}
