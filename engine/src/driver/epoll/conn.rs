//! One session on the epoll driver: its two sockets, a bounded buffer per direction, and
//! the pump that moves bytes from a source to a destination with backpressure.
//!
//! Invariants: a direction reads from its source only when its buffer is empty, so at most
//! one buffer (`pipe_size` bytes) is held per direction, and none while the direction is
//! idle; the end of stream is forwarded (shutdown for writing) only after the buffer has
//! been written out.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::net::TcpStream;

use crate::driver;
use crate::driver::buffers::{Buffer, BufferPool};
use crate::session::{CloseReason, Direction, Session, Side};
use crate::sys::{self, Then};
use crate::worker::{Admission, Stall};

/// Reads per pump call before yielding to other sessions (bounds one turn's work).
const PUMP_ROUNDS: usize = 16;

/// Outcome of one pump call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pump {
    /// Waiting for the source to become readable or the destination writable.
    Idle,
    /// End of stream forwarded; the direction has nothing left to do.
    Done,
    /// Stopped after its share of work; call again next turn.
    Budget,
    /// A peer reset the connection (or the socket failed).
    Reset(Side),
    /// The shaper holds the direction back until the session's deadline.
    Throttled,
    /// The session's byte cap is reached.
    Capped,
}

/// One session on the epoll driver.
#[derive(Debug)]
pub(super) struct Conn {
    pub admission: Admission,
    pub session: Session,
    pub client: TcpStream,
    pub backend: Option<TcpStream>,
    /// Why the latest connect attempt failed, reported if no attempt succeeds.
    pub last_failure: CloseReason,
    /// The deadline for which a timer entry exists.
    pub armed: Option<Instant>,
    up: Buffer,
    down: Buffer,
}

impl Conn {
    pub fn new(admission: Admission, client: TcpStream, now: Instant) -> Self {
        Self {
            admission,
            session: Session::new(now),
            client,
            backend: None,
            last_failure: CloseReason::NoBackend,
            armed: None,
            up: Buffer::default(),
            down: Buffer::default(),
        }
    }

    /// Moves bytes in `dir` until it would block, finishes, fails, or uses its budget.
    pub fn pump(&mut self, dir: Direction, pool: &mut BufferPool, now: Instant) -> Pump {
        let Some(backend) = self.backend.as_mut() else { return Pump::Idle };
        let (src, dst, buf) = match dir {
            Direction::Up => (&mut self.client, backend, &mut self.up),
            Direction::Down => (backend, &mut self.client, &mut self.down),
        };
        let (src_side, dst_side) = (dir.source(), dir.source().other());
        let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
        // The source was read until it would block: what is left is to send, then wait.
        let mut drained = false;
        for _ in 0..PUMP_ROUNDS {
            let flow = *self.session.flow(dir);
            let then = if flow.eof { Then::Fin } else { Then::Wait };
            while !buf.pending().is_empty() {
                match sys::send(dst_fd, buf.pending(), then) {
                    Ok(n) if n > 0 => {
                        if let Some(tap) = self.admission.tap.as_mut() {
                            tap.copied(dir, &buf.pending()[..n]);
                        }
                        buf.consume(n);
                        self.session.moved(dir, n, now);
                    }
                    Ok(_) => return Pump::Reset(dst_side),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pump::Idle,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Pump::Reset(dst_side),
                }
            }
            buf.release(pool);
            if flow.eof {
                if !flow.shut {
                    if dst.shutdown(Shutdown::Write).is_err() {
                        return Pump::Reset(dst_side);
                    }
                    self.session.shut(dir, now);
                    if let Some(tap) = self.admission.tap.as_mut() {
                        tap.fin(dir);
                    }
                }
                return Pump::Done;
            }
            if drained {
                return Pump::Idle;
            }
            let space = buf.space(pool);
            let allowed = match self.admission.allowance(&mut self.session, dir, now, space.len()) {
                Ok(n) => n,
                Err(stall) => {
                    buf.release(pool);
                    return stalled(stall);
                }
            };
            // Edge-triggered: a short read is followed by another until the socket would
            // block, before the bytes are sent, so that an end of stream right behind them
            // is known in time for its FIN to leave with them.
            let read = driver::read_burst(src_fd, &mut space[..allowed], true);
            self.admission.used(dir, read.as_ref().map_or(0, |&(n, _)| n), now);
            match read {
                Ok((0, _)) => {
                    buf.release(pool);
                    self.session.source_eof(dir, now);
                }
                Ok((n, ended)) => {
                    buf.filled(n);
                    drained = n < allowed && !ended;
                    if ended {
                        self.session.source_eof(dir, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    buf.release(pool);
                    return Pump::Idle;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.release(pool),
                Err(_) => return Pump::Reset(src_side),
            }
        }
        Pump::Budget
    }

    /// Gives back both buffers and, if the close must be abortive, arms SO_LINGER 0 on
    /// both sockets so their peers see a reset. Dropping the conn then closes the fds.
    pub fn prepare_close(&mut self, reason: CloseReason, pool: &mut BufferPool) {
        self.up.release(pool);
        self.down.release(pool);
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
