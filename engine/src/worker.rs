//! What a worker is given and what it obeys: the contract between the engine, which starts
//! one worker per core, and the driver loop each worker runs (and its UDP loop). Plain data
//! and channels; the loops themselves live in `driver` and `udp`.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use nix::sys::signal::Signal;

use crate::admission::SessionCap;
use crate::counters::WorkerStats;
use crate::events::EventSink;
use crate::record::LiveSession;
use crate::sys::EventFd;
use crate::tables::Tables;

/// How a worker moves payload from one socket to the other.
///
/// The default is measured, not assumed: see the README's Performance section and
/// bench/results. splice(2) keeps payload out of user space; the copy relay reads it into a
/// user-space buffer and sends it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Relay {
    /// splice(2) through a pipe: payload never enters user space.
    Splice,
    /// Through a bounded user-space buffer: on io_uring, ring receives into provided
    /// buffers and ring sends; on epoll, read(2)/send(2). Cheaper per small message.
    Copy,
    /// `copy` until a direction proves to carry a bulk stream (a read fills a whole large
    /// ring buffer on io_uring, a whole first buffer on epoll), `splice` for that direction
    /// from then on: small messages at copy's cost, bulk streams and their stalled peers at
    /// splice's (what HAProxy's `option splice-auto` does). The default: see the README's
    /// Relay section for the figures that chose it.
    #[default]
    Auto,
}

impl std::str::FromStr for Relay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "splice" => Ok(Relay::Splice),
            "copy" => Ok(Relay::Copy),
            "auto" => Ok(Relay::Auto),
            other => {
                Err(format!("unknown relay {other:?}; expected \"auto\", \"splice\" or \"copy\""))
            }
        }
    }
}

/// Signals handled by the control thread, blocked in every worker.
pub const CONTROL_SIGNALS: [Signal; 5] =
    [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1, Signal::SIGUSR2];

/// A request from the control thread to a worker.
#[derive(Debug)]
pub enum Command {
    /// Stop accepting, let sessions finish until `deadline`, cut the rest, then exit.
    Drain { deadline: Instant },
    /// Stop accepting on these addresses: admit what is already in their accept queues
    /// (decided by the tables in force), close them, then report on `done`.
    RemoveListeners { addrs: Vec<SocketAddr>, done: Sender<usize> },
    /// Start accepting on these listeners (already bound and listening).
    AddListeners { listeners: Vec<TcpListener> },
    /// Report up to `limit` live sessions.
    Snapshot { limit: usize, reply: Sender<Vec<LiveSession>> },
    /// Cut the live session `id` (a [`SessionId`] of this worker) abortively, with reason
    /// `admin_kill`; answer whether it was there.
    Kill { id: SessionId, reply: Sender<bool> },
}

/// Names one live session or UDP flow for as long as it lives: its worker, whether it is
/// a UDP flow, and its slot (index and generation) in that worker's table. A later
/// occupant of the same slot has another generation, so a stale id matches nothing.
///
/// As a `u64` (what the admin API shows): worker in bits 54..64, UDP in bit 53, slot index
/// in bits 32..53, generation in bits 0..32. Workers are at most 1024 and a worker holds
/// far fewer than 2^21 sessions (each takes two of the process's fds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub worker: usize,
    pub udp: bool,
    pub index: u32,
    pub generation: u32,
}

impl SessionId {
    const INDEX_BITS: u32 = 21;

    pub fn to_u64(self) -> u64 {
        let index = u64::from(self.index) & ((1 << Self::INDEX_BITS) - 1);
        ((self.worker as u64) << 54)
            | (u64::from(self.udp) << 53)
            | (index << 32)
            | u64::from(self.generation)
    }

    pub fn from_u64(id: u64) -> SessionId {
        SessionId {
            worker: (id >> 54) as usize,
            udp: (id >> 53) & 1 == 1,
            index: ((id >> 32) & ((1 << Self::INDEX_BITS) - 1)) as u32,
            generation: id as u32,
        }
    }
}

/// Everything one worker thread owns.
#[derive(Debug)]
pub struct WorkerContext {
    pub id: usize,
    pub listeners: Vec<TcpListener>,
    pub tables: Arc<ArcSwap<Tables>>,
    pub commands: Receiver<Command>,
    pub wake: Arc<EventFd>,
    pub stats: Arc<WorkerStats>,
    pub events: EventSink,
    pub pipe_size: usize,
    pub buffer_size: usize,
    pub relay: Relay,
    /// Small provided buffers of the io_uring copy relay (a power of two).
    pub ring_buffers: u16,
    /// The engine-wide session cap, shared by every worker.
    pub cap: Arc<SessionCap>,
    /// How the worker reports its setup and waits for the engine's go.
    pub startup: Startup,
}

/// A loop's part in starting the engine (each worker's TCP driver and UDP loop). Every loop
/// sets up (a ring or poller: fds of its own) and reports the outcome; none runs until all
/// have succeeded, so that no setup can fail for fds that other loops' first accepts took,
/// and `Engine::start` returns only an engine whose every loop is up (or the first setup
/// error).
#[derive(Debug, Clone)]
pub struct Startup {
    /// The loop's index: worker `i`'s TCP loop is `i`, its UDP loop `workers + i`.
    pub(crate) id: usize,
    pub(crate) report: Sender<(usize, io::Result<()>)>,
    pub(crate) go: Receiver<bool>,
}

impl Startup {
    /// Reports `setup`; a worker that set up waits for the engine's go and gets its driver
    /// back to run, or `None` when the engine does not start (another worker failed).
    pub fn settle<T>(&self, setup: io::Result<T>) -> Option<T> {
        match setup {
            Ok(driver) => {
                let _ = self.report.send((self.id, Ok(())));
                (self.go.recv() == Ok(true)).then_some(driver)
            }
            Err(e) => {
                let _ = self.report.send((self.id, Err(e)));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_round_trip_and_keep_their_parts_apart() {
        let ids = [
            SessionId { worker: 0, udp: false, index: 0, generation: 0 },
            SessionId { worker: 1023, udp: true, index: (1 << 21) - 1, generation: u32::MAX },
            SessionId { worker: 7, udp: false, index: 12_345, generation: 99 },
        ];
        for id in ids {
            assert_eq!(SessionId::from_u64(id.to_u64()), id);
        }
        let a = SessionId { worker: 1, udp: false, index: 5, generation: 1 };
        let later = SessionId { generation: 2, ..a };
        let udp = SessionId { udp: true, ..a };
        assert_ne!(a.to_u64(), later.to_u64());
        assert_ne!(a.to_u64(), udp.to_u64());
    }
}
