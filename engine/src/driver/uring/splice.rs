//! Experiment, built only with the `ring-splice` feature: the splice relay's two splices
//! (socket → pipe, pipe → socket) as `IORING_OP_SPLICE` ring operations instead of inline
//! splice(2) calls, to measure them against both (see README, Relay).
//!
//! The kernel never completes a ring splice in line: it hands each one to an io-wq worker
//! thread (with or without IOSQE_ASYNC, which `SLUICE_RING_SPLICE_ASYNC` sets), so every
//! splice costs a thread hop. Readiness still comes from ring polls, and the splices do not
//! wait (SPLICE_F_NONBLOCK): an io-wq thread is never parked on an idle socket.
//!
//! Invariants: a lane has at most one splice in flight; a pipe that a splice may still use
//! is closed with its session, never pooled ([`super::Uring`]'s `lane_in_flight`).

use super::ops::{self, bit, InFlight, Op};
use super::Uring;
use crate::driver::conn::{Conn, Pools};
use crate::driver::host::Host;
use crate::driver::slots::SlotId;
use crate::session::{IoError, Readout, Written};
use crate::side::{Direction, Side};

impl Uring {
    /// Queues a splice of up to `max` bytes from the source of `dir` into its lane's pipe.
    pub(super) fn splice_in(
        &mut self,
        id: SlotId,
        conn: &mut Conn<InFlight>,
        dir: Direction,
        max: usize,
        pools: &mut Pools,
    ) -> Option<Result<Readout, IoError>> {
        if conn.carrier(dir).pipe.is_none() {
            match pools.pipes.take() {
                Ok(pipe) => conn.carrier(dir).pipe = Some(pipe),
                Err(_) => return Some(Err(IoError::Local)),
            }
        }
        let want = max.min(pools.pipes.size()).min(u32::MAX as usize) as u32;
        conn.extra.lane(dir).want = want;
        let side = dir.source();
        let (Some((src, _)), Some(pipe)) = (conn.ends(dir), conn.lanes[dir as usize].pipe.as_ref())
        else {
            return Some(Err(IoError::Reset));
        };
        let data = ops::pack(Op::SpliceIn, side, id.gen, id.index);
        let entry = ops::splice(src, pipe.write_end(), want, false, self.splice_async, data);
        conn.extra.ops |= bit(Op::SpliceIn, side);
        ops::push(&mut self.ring, &entry);
        None
    }

    /// Queues a splice of the `held` bytes of the lane of `dir` from its pipe onwards.
    pub(super) fn splice_out(
        &mut self,
        id: SlotId,
        conn: &mut Conn<InFlight>,
        dir: Direction,
        held: usize,
        fin: bool,
    ) -> Option<Result<Written, IoError>> {
        let side = dir.source().other();
        let (Some((_, dst)), Some(pipe)) = (conn.ends(dir), conn.lanes[dir as usize].pipe.as_ref())
        else {
            return Some(Err(IoError::Reset));
        };
        let len = held.min(u32::MAX as usize) as u32;
        let data = ops::pack(Op::SpliceOut, side, id.gen, id.index);
        let entry = ops::splice(pipe.read_end(), dst, len, fin, self.splice_async, data);
        conn.extra.ops |= bit(Op::SpliceOut, side);
        ops::push(&mut self.ring, &entry);
        None
    }

    /// Whether a splice of the lane of `dir` is still in flight.
    pub(super) fn splicing(conn: &Conn<InFlight>, dir: Direction) -> bool {
        let mask = bit(Op::SpliceIn, dir.source()) | bit(Op::SpliceOut, dir.source().other());
        conn.extra.ops & mask != 0
    }
}

/// What a failed splice's errno means to the core.
fn splice_error(errno: i32) -> IoError {
    match errno {
        libc::EAGAIN => IoError::WouldBlock,
        libc::ENOMEM | libc::ENOBUFS => IoError::Local,
        _ => IoError::Reset,
    }
}

impl Host<Uring> {
    /// A splice into a lane's pipe completed.
    pub(super) fn on_splice_in(&mut self, id: SlotId, side: Side, result: i32) {
        let dir = Direction::from_source(side);
        let Some(conn) = self.conns.get_mut(id) else { return };
        let want = conn.extra.lane(dir).want as usize;
        let outcome = match result {
            0 => Ok(Readout { bytes: 0, eof: true, drained: false }),
            n if n > 0 => {
                let n = n as usize;
                if let (Some(tap), Some(pipe)) =
                    (conn.tap.as_mut(), conn.lanes[dir as usize].pipe.as_ref())
                {
                    tap.teed(dir, pipe, n);
                }
                Ok(Readout { bytes: n, eof: false, drained: n < want })
            }
            n => Err(splice_error(-n)),
        };
        self.read_done(id, dir, outcome);
    }

    /// A splice out of a lane's pipe completed.
    pub(super) fn on_splice_out(&mut self, id: SlotId, side: Side, result: i32) {
        let dir = Direction::from_source(side.other());
        let outcome = match result {
            0 => Err(IoError::Reset),
            n if n > 0 => Ok(Written { bytes: n as usize, blocked: false }),
            n if -n == libc::EAGAIN => Ok(Written { bytes: 0, blocked: true }),
            n => Err(splice_error(-n)),
        };
        self.written(id, dir, outcome);
    }
}
