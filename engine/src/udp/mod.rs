//! UDP forwarding: one loop per worker, on its own thread pinned to the worker's CPU.
//!
//! Each loop owns an SO_REUSEPORT UDP socket per UDP listen address (the kernel hashes a
//! client's 4-tuple to one of them, so a client stays with one worker) and a bounded
//! [`flows::FlowTable`] keyed by (listener, client address:port). The first datagram of a
//! client is decided by the firewall (`Tables::judge`); an allowed one gets a flow to a
//! backend the pool picks, and its replies go back to the client from the listener's
//! socket. A flow goes up on its own connected socket (`udp_upstream = "connected"`), or on
//! an unconnected socket that the worker's flows to that backend share, from a source
//! address of its own ([`sources`]; `"shared"`: no fd a flow). Datagrams move in batches:
//! recvmmsg(2) on every socket, sendmmsg(2) up and down, runs of a flow's equal datagrams as
//! one segmented send (UDP GSO), joined receives where the sender segmented (UDP GRO).
//!
//! Invariants: a flow keeps the tables it started with; the table holds at most
//! `max_flows` flows (a new flow evicts the least recently used, counted); a flow idle for
//! its service's `udp_idle_timeout` is closed; each closed flow yields one record; denied,
//! oversized and unroutable datagrams are dropped and counted, never kept. The loop runs
//! on mio (epoll) whatever the TCP driver is, so it never touches the TCP drivers' loops;
//! [`Part`] is the same loop for a driver to run inside its own (docs/UDP.md).

pub mod flows;
mod relay;
pub mod sources;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};

use crate::counters::WorkerStats;
use crate::events::EventSink;
use crate::record::LiveSession;
use crate::sys::EventFd;
use crate::tables::Tables;
use crate::worker::{SessionId, Startup};

/// Most UDP flows one worker holds; a new flow beyond it evicts the least recently used.
/// A connected flow holds one socket (fd), so with connected services this times the
/// worker count must stay well under the process's fd limit; shared flows hold none.
pub const DEFAULT_MAX_FLOWS: usize = 4096;
/// Largest datagram relayed, in bytes (the largest UDP payload over IPv4); larger or
/// truncated datagrams are dropped and counted as oversized.
pub const DEFAULT_MAX_DATAGRAM: usize = 65507;
/// Datagrams received with one recvmmsg(2), and most replies gathered before they leave.
pub const RECV_BATCH: usize = 64;
/// Kernel receive buffer asked for each listener and shared upstream socket (the kernel caps
/// it at net.core.rmem_max), so a burst waits instead of being dropped.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;
/// Receive batches per socket per loop turn, so one busy socket cannot starve the rest.
pub const BATCHES_PER_TURN: usize = 4;

/// A request from the engine to a worker's UDP loop.
#[derive(Debug)]
pub enum UdpCommand {
    /// Close every flow (reason `shutdown`) and every socket, then exit.
    Drain,
    /// Stop serving these addresses: close their flows (reason `shutdown`) and sockets,
    /// then report how many sockets closed on `done`.
    RemoveListeners { addrs: Vec<SocketAddr>, done: Sender<usize> },
    /// Start serving these sockets (already bound).
    AddListeners { sockets: Vec<UdpSocket> },
    /// Report up to `limit` live flows (most recently used first).
    Snapshot { limit: usize, reply: Sender<Vec<LiveSession>> },
    /// Close the flow `id` (reason `admin_kill`); answer whether it was there.
    Kill { id: SessionId, reply: Sender<bool> },
}

/// Everything one worker's UDP loop owns.
#[derive(Debug)]
pub struct UdpContext {
    pub id: usize,
    pub sockets: Vec<UdpSocket>,
    pub tables: Arc<ArcSwap<Tables>>,
    pub commands: Receiver<UdpCommand>,
    pub wake: Arc<EventFd>,
    pub stats: Arc<WorkerStats>,
    pub events: EventSink,
    pub max_flows: usize,
    pub max_datagram: usize,
    /// How the loop reports its setup and waits for the engine's go.
    pub startup: Startup,
}

/// Runs one worker's UDP loop until it is drained, once it is set up (its poller and
/// sockets) and the engine has given its go.
pub fn run(ctx: UdpContext) -> io::Result<()> {
    let (id, startup) = (ctx.id, ctx.startup.clone());
    let udp = relay::UdpLoop::new(ctx)
        .inspect_err(|e| log::error!("udp worker {id}: cannot set up its poll: {e}"));
    let Some(udp) = startup.settle(udp) else { return Ok(()) };
    udp.run().inspect_err(|e| log::error!("udp worker {id}: poll failed: {e}"))
}

/// One worker's UDP loop run inside another loop (a TCP driver's) instead of on a thread
/// of its own: the host registers [`fd`](Part::fd) for readability and calls
/// [`turn`](Part::turn) when it is readable or [`timeout`](Part::timeout) has passed.
/// `run` is this same loop on its own thread.
pub struct Part {
    udp: relay::UdpLoop,
    events: mio::Events,
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part").field("fd", &self.udp.fd()).finish()
    }
}

impl Part {
    /// Sets the loop up (its poller and sockets); the caller reports it through its own
    /// [`Startup`].
    pub fn new(ctx: UdpContext) -> io::Result<Part> {
        Ok(Part { udp: relay::UdpLoop::new(ctx)?, events: mio::Events::with_capacity(256) })
    }

    /// Readable when a turn has work.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.udp.fd()
    }

    /// How long the host may wait before the next turn (`None`: until `fd` is readable).
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.udp.timeout(std::time::Instant::now())
    }

    /// Does the work that is ready, without waiting; `false` once the loop was told to
    /// drain (its flows and sockets are then closed and the part is done).
    pub fn turn(&mut self) -> io::Result<bool> {
        self.udp.turn(&mut self.events, Some(std::time::Duration::ZERO))?;
        if self.udp.draining() {
            self.udp.close_all(std::time::Instant::now());
            return Ok(false);
        }
        Ok(true)
    }
}
