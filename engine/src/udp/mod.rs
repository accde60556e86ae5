//! UDP forwarding: one loop per worker, on its own thread pinned to the worker's CPU.
//!
//! Each loop owns an SO_REUSEPORT UDP socket per UDP listen address (the kernel hashes a
//! client's 4-tuple to one of them, so a client stays with one worker) and a bounded
//! [`flows::FlowTable`] keyed by (listener, client address:port). The first datagram of a
//! client is decided by the firewall (`Tables::judge`); an allowed one gets a flow with its
//! own UDP socket connected to a backend the pool picks, and its replies go back to the
//! client from the listener's socket. Datagrams move in batches: recvmmsg(2) on every
//! socket, sendmmsg(2) up a flow's socket and down a listener's socket.
//!
//! Invariants: a flow keeps the tables it started with; the table holds at most
//! `max_flows` flows (a new flow evicts the least recently used, counted); a flow idle for
//! its service's `udp_idle_timeout` is closed; each closed flow yields one record; denied,
//! oversized and unroutable datagrams are dropped and counted, never kept. The loop runs
//! on mio (epoll) whatever the TCP driver is, so it never touches the TCP drivers' loops.

pub mod flows;
mod relay;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};

use crate::events::{EventSink, WorkerStats};
use crate::sys::EventFd;
use crate::tables::Tables;
use crate::worker::{LiveSession, Startup};

/// Most UDP flows one worker holds; a new flow beyond it evicts the least recently used.
/// Each flow holds one socket (fd), so this times the worker count must stay well under
/// the process's fd limit.
pub const DEFAULT_MAX_FLOWS: usize = 4096;
/// Largest datagram relayed, in bytes (the largest UDP payload over IPv4); larger or
/// truncated datagrams are dropped and counted as oversized.
pub const DEFAULT_MAX_DATAGRAM: usize = 65507;
/// Datagrams received with one recvmmsg(2).
pub const RECV_BATCH: usize = 32;
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
