//! One session on the uring driver: its two sockets, one lane per direction (a borrowed
//! pipe and how many bytes it holds), the operations it has on the ring, and the pump that
//! moves bytes socket -> pipe -> socket with splice(2).
//!
//! The ring tells the worker when a socket is ready (PollAdd); the worker then splices at
//! once, inline, with non-blocking fds: payload never enters user space and no kernel
//! worker thread is involved (IORING_OP_SPLICE would always run on io-wq).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::ops::Inflight;
use super::pipes::PipePool;
use crate::session::{CloseReason, Direction, Session, Side};
use crate::sys::{self, Pipe};
use crate::worker::Admission;

/// Splice rounds per pump call before yielding to other sessions.
const PUMP_ROUNDS: usize = 16;

/// A direction's borrowed pipe and the bytes in it.
#[derive(Debug, Default)]
pub(super) struct Lane {
    pipe: Option<Pipe>,
    buffered: usize,
}

impl Lane {
    fn release(&mut self, pool: &mut PipePool) {
        if let Some(pipe) = self.pipe.take() {
            pool.give(pipe, self.buffered);
        }
        self.buffered = 0;
    }
}

/// What a pump call needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pump {
    /// Wait until the source is readable.
    WaitIn,
    /// Wait until the destination is writable.
    WaitOut,
    Done,
    Budget,
    Reset(Side),
    /// The worker could not get a pipe (out of fds).
    NoPipe,
}

/// One session on the uring driver.
#[derive(Debug)]
pub(super) struct Conn {
    pub admission: Admission,
    pub session: Session,
    pub client: OwnedFd,
    pub backend: Option<OwnedFd>,
    /// The address a connect operation reads from; owned here until its completion.
    pub connect_addr: Option<Box<socket2::SockAddr>>,
    pub last_failure: CloseReason,
    pub armed: Option<Instant>,
    pub inflight: Inflight,
    /// Set once the session is decided closed; it is finalised when `inflight` is zero.
    pub closing: Option<CloseReason>,
    up: Lane,
    down: Lane,
}

impl Conn {
    pub fn new(admission: Admission, client: OwnedFd, now: Instant) -> Self {
        Self {
            admission,
            session: Session::new(now),
            client,
            backend: None,
            connect_addr: None,
            last_failure: CloseReason::NoBackend,
            armed: None,
            inflight: 0,
            closing: None,
            up: Lane::default(),
            down: Lane::default(),
        }
    }

    /// The fd a direction reads from and the one it writes to.
    pub fn ends(&self, dir: Direction) -> Option<(RawFd, RawFd)> {
        let backend = self.backend.as_ref()?.as_raw_fd();
        let client = self.client.as_raw_fd();
        Some(match dir {
            Direction::Up => (client, backend),
            Direction::Down => (backend, client),
        })
    }

    /// Moves bytes in `dir` until a socket would block, the direction finishes or fails,
    /// or the budget is used.
    pub fn pump(&mut self, dir: Direction, pool: &mut PipePool, now: Instant) -> Pump {
        let Some((src, dst)) = self.ends(dir) else { return Pump::WaitIn };
        let lane = match dir {
            Direction::Up => &mut self.up,
            Direction::Down => &mut self.down,
        };
        let (src_side, dst_side) = (dir.source(), dir.source().other());
        for _ in 0..PUMP_ROUNDS {
            if let Some(pipe) = &lane.pipe {
                while lane.buffered > 0 {
                    match sys::splice(pipe.read_fd(), dst, lane.buffered) {
                        Ok(n) => {
                            lane.buffered -= n;
                            self.session.moved(dir, n, now);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pump::WaitOut,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Pump::Reset(dst_side),
                    }
                }
            }
            let flow = *self.session.flow(dir);
            if flow.eof {
                lane.release(pool);
                if !flow.shut {
                    if sys::shutdown_write(dst).is_err() {
                        return Pump::Reset(dst_side);
                    }
                    self.session.shut(dir, now);
                }
                return Pump::Done;
            }
            let pipe = match lane.pipe.take() {
                Some(p) => p,
                None => match pool.take() {
                    Ok(p) => p,
                    Err(_) => return Pump::NoPipe,
                },
            };
            let result = sys::splice(src, pipe.write_fd(), pool_capacity(pool));
            lane.pipe = Some(pipe);
            match result {
                Ok(0) => self.session.source_eof(dir, now),
                Ok(n) => lane.buffered = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    lane.release(pool);
                    return Pump::WaitIn;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Pump::Reset(src_side),
            }
        }
        Pump::Budget
    }

    /// Gives back empty pipes (a pipe with bytes is closed) and arms SO_LINGER 0 when the
    /// close must reach the peers as a reset.
    pub fn prepare_close(&mut self, reason: CloseReason, pool: &mut PipePool) {
        self.up.release(pool);
        self.down.release(pool);
        if reason.aborts() {
            let _ = sys::set_linger_zero(self.client.as_raw_fd());
            if let Some(b) = &self.backend {
                let _ = sys::set_linger_zero(b.as_raw_fd());
            }
        }
    }
}

fn pool_capacity(pool: &PipePool) -> usize {
    pool.size()
}
