//! One session as a driver holds it: the session core, the two sockets, what each lane
//! carries (a relay buffer or a pipe, borrowed from the worker's pools only while bytes are
//! in flight), its capture tap, and the driver's own per-session state.
//!
//! Invariants: the bytes a lane's buffer or pipe holds are the bytes the core counts as
//! `held` for that lane; a pipe that still holds bytes is never given back to the pool (it
//! is closed with its session).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use super::buffers::{Buffer, BufferPool};
use super::pipes::PipePool;
use crate::capture::Tap;
use crate::session::Session;
use crate::side::{Direction, Side};
use crate::sys::Pipe;
use crate::worker::Relay;

/// Where lanes borrow from, and which relay the worker uses.
#[derive(Debug)]
pub(crate) struct Pools {
    pub relay: Relay,
    pub pipes: PipePool,
    pub buffers: BufferPool,
}

impl Pools {
    /// The pools of a worker, sized by its configuration.
    pub fn for_worker(ctx: &crate::worker::WorkerContext) -> Self {
        Self {
            relay: ctx.relay,
            pipes: PipePool::new(ctx.pipe_size, ctx.stats.clone()),
            buffers: BufferPool::new(ctx.buffer_size),
        }
    }
}

/// What one lane carries: the copy relay's buffer or the splice relay's pipe.
#[derive(Debug, Default)]
pub(crate) struct Carrier {
    pub buffer: Buffer,
    pub pipe: Option<Pipe>,
    /// `relay = "auto"`: the lane proved to carry a bulk stream and splices from now on
    /// (kept when its buffer or pipe goes back to the pool).
    pub spliced: bool,
}

impl Carrier {
    /// Gives the buffer and the pipe back; a pipe holding `held` bytes is closed instead.
    pub fn release(&mut self, held: usize, pools: &mut Pools) {
        if let Some(pipe) = self.pipe.take() {
            pools.pipes.give(pipe, held);
        }
        self.buffer.release(&mut pools.buffers);
    }
}

/// One session on a driver.
#[derive(Debug)]
pub(crate) struct Conn<X> {
    pub session: Session,
    pub client: OwnedFd,
    pub backend: Option<OwnedFd>,
    pub lanes: [Carrier; 2],
    /// The session's capture, boxed: most sessions have none and stay small.
    pub tap: Option<Box<Tap>>,
    /// The index of the listener it was accepted on.
    pub listener: usize,
    /// The deadline for which a timer entry exists.
    pub armed: Option<Instant>,
    /// The driver's own state of this session.
    pub extra: X,
}

impl<X: Default> Conn<X> {
    pub fn new(session: Session, client: OwnedFd, listener: usize) -> Self {
        Self {
            session,
            client,
            backend: None,
            lanes: Default::default(),
            tap: None,
            listener,
            armed: None,
            extra: X::default(),
        }
    }
}

impl<X> Conn<X> {
    /// The socket of `side` (the backend's, once there is one).
    pub fn socket(&self, side: Side) -> Option<BorrowedFd<'_>> {
        match side {
            Side::Client => Some(self.client.as_fd()),
            Side::Backend => self.backend.as_ref().map(|b| b.as_fd()),
        }
    }

    /// The socket `dir` reads from and the one it writes to.
    pub fn ends(&self, dir: Direction) -> Option<(BorrowedFd<'_>, BorrowedFd<'_>)> {
        let source = dir.source();
        Some((self.socket(source)?, self.socket(source.other())?))
    }

    pub fn carrier(&mut self, dir: Direction) -> &mut Carrier {
        &mut self.lanes[dir as usize]
    }
}
