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
use crate::driver;
use crate::driver::buffers::{Buffer, BufferPool};
use crate::session::{CloseReason, Direction, Session, Side};
use crate::sys::{self, Pipe, Then};
use crate::worker::{Admission, Relay, Stall};

/// Splice rounds per pump call before yielding to other sessions.
const PUMP_ROUNDS: usize = 16;

/// A direction's borrowed pipe and the bytes in it (splice relay), or its borrowed
/// buffer (copy relay).
#[derive(Debug, Default)]
pub(super) struct Lane {
    pipe: Option<Pipe>,
    buffered: usize,
    buffer: Buffer,
    /// The source has signalled its end of stream (a poll saw POLLRDHUP): a short read is
    /// followed by one that reaches the end, so that the last bytes leave with the FIN.
    ended: bool,
}

impl Lane {
    fn release(&mut self, relay: &mut RelayPools) {
        if let Some(pipe) = self.pipe.take() {
            relay.pipes.give(pipe, self.buffered);
        }
        self.buffered = 0;
        self.buffer.release(&mut relay.buffers);
    }
}

/// Where lanes borrow from, and which relay this worker uses.
#[derive(Debug)]
pub(super) struct RelayPools {
    pub relay: Relay,
    pub pipes: PipePool,
    pub buffers: BufferPool,
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
    /// The shaper holds the direction back until the session's deadline (no poll armed).
    Throttled,
    /// The session's byte cap is reached.
    Capped,
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
    pub fn pump(&mut self, dir: Direction, pools: &mut RelayPools, now: Instant) -> Pump {
        let Some(ends) = self.ends(dir) else { return Pump::WaitIn };
        match pools.relay {
            Relay::Splice => self.pump_splice(dir, ends, pools, now),
            Relay::Copy => self.pump_copy(dir, ends, pools, now),
        }
    }

    fn lane(&mut self, dir: Direction) -> &mut Lane {
        lane_of(&mut self.up, &mut self.down, dir)
    }

    /// Notes that the source of `dir` has ended its stream (its poll reported POLLRDHUP).
    pub fn source_ended(&mut self, dir: Direction) {
        self.lane(dir).ended = true;
    }

    /// What follows the bytes sent in `dir` now: the FIN, once the source has ended.
    fn then(&self, dir: Direction) -> Then {
        if self.session.flow(dir).eof {
            Then::Fin
        } else {
            Then::Wait
        }
    }

    /// Forwards the end of stream once the lane is empty; `Some` when the direction is done
    /// (or failed).
    fn finish_if_eof(
        &mut self,
        dir: Direction,
        dst: RawFd,
        pools: &mut RelayPools,
        now: Instant,
    ) -> Option<Pump> {
        let flow = *self.session.flow(dir);
        if !flow.eof {
            return None;
        }
        self.lane(dir).release(pools);
        if !flow.shut {
            if sys::shutdown_write(dst).is_err() {
                return Some(Pump::Reset(dir.source().other()));
            }
            self.session.shut(dir, now);
            if let Some(tap) = self.admission.tap.as_mut() {
                tap.fin(dir);
            }
        }
        Some(Pump::Done)
    }

    fn pump_splice(
        &mut self,
        dir: Direction,
        (src, dst): (RawFd, RawFd),
        pools: &mut RelayPools,
        now: Instant,
    ) -> Pump {
        let (src_side, dst_side) = (dir.source(), dir.source().other());
        let mut drained = false;
        for _ in 0..PUMP_ROUNDS {
            let then = self.then(dir);
            let lane = lane_of(&mut self.up, &mut self.down, dir);
            if let Some(pipe) = &lane.pipe {
                while lane.buffered > 0 {
                    match sys::splice(pipe.read_fd(), dst, lane.buffered, then) {
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
            if let Some(done) = self.finish_if_eof(dir, dst, pools, now) {
                return done;
            }
            let lane = lane_of(&mut self.up, &mut self.down, dir);
            if drained {
                // The last fill came up short: the source was empty. The poll is level-
                // triggered, so anything that arrived since completes it at once.
                lane.release(pools);
                return Pump::WaitIn;
            }
            // The pipe is empty here: fill it as far as the source and the shaper allow, so
            // that the send is one large write rather than several small ones.
            let allowed =
                match self.admission.allowance(&mut self.session, dir, now, pools.pipes.size()) {
                    Ok(n) => n,
                    Err(stall) => {
                        lane.release(pools);
                        return stalled(stall);
                    }
                };
            let pipe = match lane.pipe.take() {
                Some(p) => p,
                None => match pools.pipes.take() {
                    Ok(p) => p,
                    Err(_) => {
                        self.admission.used(dir, 0, now);
                        return Pump::NoPipe;
                    }
                },
            };
            let mut outcome = Ok(());
            while lane.buffered < allowed {
                let want = allowed - lane.buffered;
                match sys::splice(src, pipe.write_fd(), want, Then::Wait) {
                    Ok(0) => {
                        self.session.source_eof(dir, now);
                        break;
                    }
                    // The source has ended: read on to its end of stream.
                    Ok(n) if n < want && lane.ended => lane.buffered += n,
                    Ok(n) if n < want => {
                        lane.buffered += n;
                        drained = true;
                        break;
                    }
                    Ok(n) => lane.buffered += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            self.admission.used(dir, lane.buffered, now);
            lane.pipe = Some(pipe);
            match outcome {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if lane.buffered == 0 {
                        lane.release(pools);
                        return Pump::WaitIn;
                    }
                }
                Err(_) => return Pump::Reset(src_side),
            }
            if let (Some(tap), Some(pipe)) = (self.admission.tap.as_mut(), &lane.pipe) {
                // The pipe held nothing before this fill: tee copies exactly its bytes,
                // before they are spliced on.
                tap.teed(dir, pipe, lane.buffered);
            }
        }
        Pump::Budget
    }

    fn pump_copy(
        &mut self,
        dir: Direction,
        (src, dst): (RawFd, RawFd),
        pools: &mut RelayPools,
        now: Instant,
    ) -> Pump {
        let (src_side, dst_side) = (dir.source(), dir.source().other());
        let mut drained = false;
        for _ in 0..PUMP_ROUNDS {
            let then = self.then(dir);
            let lane = lane_of(&mut self.up, &mut self.down, dir);
            while !lane.buffer.pending().is_empty() {
                match sys::send(dst, lane.buffer.pending(), then) {
                    Ok(n) if n > 0 => {
                        if let Some(tap) = self.admission.tap.as_mut() {
                            tap.copied(dir, &lane.buffer.pending()[..n]);
                        }
                        lane.buffer.consume(n);
                        self.session.moved(dir, n, now);
                    }
                    Ok(_) => return Pump::Reset(dst_side),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pump::WaitOut,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Pump::Reset(dst_side),
                }
            }
            lane.buffer.release(&mut pools.buffers);
            if let Some(done) = self.finish_if_eof(dir, dst, pools, now) {
                return done;
            }
            if drained {
                // A short read: the source was empty (see pump_splice).
                return Pump::WaitIn;
            }
            let lane = lane_of(&mut self.up, &mut self.down, dir);
            let space = lane.buffer.space(&mut pools.buffers);
            let want = match self.admission.allowance(&mut self.session, dir, now, space.len()) {
                Ok(n) => n,
                Err(stall) => {
                    lane.buffer.release(&mut pools.buffers);
                    return stalled(stall);
                }
            };
            let read = driver::read_burst(src, &mut space[..want], lane.ended);
            self.admission.used(dir, read.as_ref().map_or(0, |&(n, _)| n), now);
            match read {
                Ok((0, _)) => {
                    lane.buffer.release(&mut pools.buffers);
                    self.session.source_eof(dir, now);
                }
                Ok((n, ended)) => {
                    drained = n < want && !ended;
                    lane.buffer.filled(n);
                    if ended {
                        self.session.source_eof(dir, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    lane.buffer.release(&mut pools.buffers);
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
    pub fn prepare_close(&mut self, reason: CloseReason, pools: &mut RelayPools) {
        self.up.release(pools);
        self.down.release(pools);
        if reason.aborts() || self.admission.deny_resets() {
            let _ = sys::set_linger_zero(self.client.as_raw_fd());
            if let Some(b) = &self.backend {
                let _ = sys::set_linger_zero(b.as_raw_fd());
            }
        }
    }
}

fn stalled(stall: Stall) -> Pump {
    match stall {
        Stall::Throttled => Pump::Throttled,
        Stall::Capped => Pump::Capped,
    }
}

/// The lane of `dir`, borrowed from the two lane fields alone (so that the session can be
/// updated while it is held).
fn lane_of<'a>(up: &'a mut Lane, down: &'a mut Lane, dir: Direction) -> &'a mut Lane {
    match dir {
        Direction::Up => up,
        Direction::Down => down,
    }
}
