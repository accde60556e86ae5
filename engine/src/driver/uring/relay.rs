//! The copy relay as ring operations: a lane's read is an `IORING_OP_RECV` into a buffer
//! the kernel picks from the worker's provided-buffer rings when bytes arrive, its write an
//! `IORING_OP_SEND` of that buffer. No readiness poll and no inline system call on the path
//! of a byte; the submissions of a loop turn leave in one `io_uring_enter`. A shutdown is
//! the one inline call: the kernel never completes `IORING_OP_SHUTDOWN` in line but hands
//! it to an io-wq worker thread, a thread and a wake-up for what shutdown(2) does at once.
//!
//! Invariants: a session waiting for bytes holds no buffer (the kernel picks one only when
//! a receive completes); a lane holds at most one buffer (the core reads only when it holds
//! nothing), so a stalled peer pins one buffer per direction; a buffer goes back to its ring
//! when its last byte is sent, or when its session is gone and no operation uses it. A lane
//! whose receive found every buffer taken (many stalled peers) is not stalled with them: it
//! reads inline after a readiness poll, into a buffer of the worker's pool, as the epoll
//! driver does, until the rings have buffers again. Buffers come in two sizes: a lane starts
//! with small ones and moves to large ones once a receive fills a small one. A lane whose
//! receive fills a large one carries a bulk stream: it moves inline after readiness from
//! then on, into pool buffers that grow to `buffer_size` as on epoll. One ring buffer in
//! flight a direction, each chunk a receive completion and then a send completion, cost a
//! bulk stream 1.67x the CPU per GB of inline reads and sends (0.74x the rate; measured in
//! bench/results/2026-12-06), while small messages keep every system call off their path.
//! With `relay = "auto"` (the default) such a lane splices instead of copying inline.

use std::io;

use io_uring::cqueue;

use super::ops::bufring::BufRing;
use super::ops::{self, bit, Held, InFlight, Op};
use super::Uring;
use crate::counters::WorkerStats;
use crate::driver::conn::Conn;
use crate::driver::host::Host;
use crate::driver::slots::SlotId;
use crate::session::{IoError, Readout, Written};
use crate::side::{Direction, Side};

/// Bytes of each small buffer: a request, a reply, a segment or two.
pub const SMALL_RING_BUFFER: u32 = 16 * 1024;
/// Bytes of each large buffer, for lanes that move a bulk stream.
pub const LARGE_RING_BUFFER: u32 = 256 * 1024;
/// Small buffers per worker unless configured (`engine.ring_buffers`): 8 MiB a worker.
pub const DEFAULT_RING_BUFFERS: u16 = 512;
/// Large buffers per small ones.
const LARGE_PER_SMALL: u16 = 16;

const SMALL: u8 = 0;
const LARGE: u8 = 1;

/// A worker's provided buffers.
#[derive(Debug)]
pub(crate) struct RingIo {
    rings: [BufRing; 2],
}

impl RingIo {
    /// Registers `count` small buffers (a power of two) and a sixteenth as many large ones
    /// (at least 8) with `ring`.
    pub fn new(ring: &io_uring::IoUring, count: u16) -> io::Result<RingIo> {
        let small = BufRing::new(ring, 0, count, SMALL_RING_BUFFER)?;
        let large_count = (count / LARGE_PER_SMALL).max(8).next_power_of_two();
        let large = BufRing::new(ring, 1, large_count, LARGE_RING_BUFFER)?;
        Ok(RingIo { rings: [small, large] })
    }

    /// The group ids registered, to unregister them.
    pub fn groups(&self) -> [u16; 2] {
        [self.rings[0].group(), self.rings[1].group()]
    }

    fn give(&mut self, held: Held) {
        self.rings[usize::from(held.ring)].give(held.bid);
    }

    /// Whether the small ring has a buffer for a receive now.
    fn has_small(&self) -> bool {
        let small = &self.rings[usize::from(SMALL)];
        small.out() < small.count()
    }
}

impl Uring {
    /// Whether lane `dir` reads inline now: it carries a bulk stream, or the rings were
    /// empty at its last receive and have not had a small buffer back since.
    pub(super) fn reads_inline(&self, conn: &mut Conn<InFlight>, dir: Direction) -> bool {
        let lane = conn.extra.lane(dir);
        if lane.inline && self.io.as_ref().is_some_and(RingIo::has_small) {
            lane.inline = false;
        }
        lane.inline || lane.streaming
    }

    /// Queues the receive of lane `dir` (at most `max` bytes).
    pub(super) fn recv(
        &mut self,
        id: SlotId,
        conn: &mut Conn<InFlight>,
        dir: Direction,
        max: usize,
    ) {
        let Some(io) = self.io.as_ref() else { return };
        let ring = if conn.extra.lane(dir).bulk { LARGE } else { SMALL };
        let buffers = &io.rings[usize::from(ring)];
        let len = (max.min(buffers.size() as usize)) as u32;
        let lane = conn.extra.lane(dir);
        lane.recv_ring = ring;
        lane.want = len;
        let Some((src, _)) = conn.ends(dir) else { return };
        let side = dir.source();
        let entry =
            ops::recv(src, buffers.group(), len, ops::pack(Op::Recv, side, id.gen, id.index));
        conn.extra.ops |= bit(Op::Recv, side);
        ops::push(&mut self.ring, &entry);
    }

    /// Queues a receive that does not wait into the rest of the buffer lane `dir` holds.
    fn recv_more(&mut self, id: SlotId, conn: &mut Conn<InFlight>, dir: Direction) {
        let Some(io) = self.io.as_mut() else { return };
        let lane = conn.extra.lane(dir);
        let Some(held) = lane.held else { return };
        let room = lane.want - held.len;
        let Some((src, _)) = conn.ends(dir) else { return };
        let buffers = &mut io.rings[usize::from(held.ring)];
        let buf = buffers.ptr_mut(held.bid, held.start + held.len);
        let side = dir.source();
        let entry = ops::recv_now(src, buf, room, ops::pack(Op::Recv, side, id.gen, id.index));
        conn.extra.lane(dir).continuing = true;
        conn.extra.ops |= bit(Op::Recv, side);
        ops::push(&mut self.ring, &entry);
    }

    /// Queues the send of what lane `dir` holds (at most `held` bytes); `fin`: the
    /// destination is shut down next.
    pub(super) fn send(
        &mut self,
        id: SlotId,
        conn: &mut Conn<InFlight>,
        dir: Direction,
        held: usize,
        fin: bool,
    ) -> Option<Result<Written, IoError>> {
        let io = self.io.as_ref()?;
        let Some(h) = conn.extra.lane(dir).held else { return Some(Err(IoError::Reset)) };
        let Some((_, dst)) = conn.ends(dir) else { return Some(Err(IoError::Reset)) };
        let side = dir.source().other();
        let buf = io.rings[usize::from(h.ring)].ptr(h.bid, h.start);
        let len = h.len.min(held as u32);
        let entry = ops::send(dst, buf, len, fin, ops::pack(Op::Send, side, id.gen, id.index));
        conn.extra.ops |= bit(Op::Send, side);
        ops::push(&mut self.ring, &entry);
        None
    }

    /// A closed session lets go of the buffers no operation of its uses any more.
    pub(super) fn let_go(&mut self, conn: &mut Conn<InFlight>) {
        let Some(io) = self.io.as_mut() else { return };
        for dir in [Direction::Up, Direction::Down] {
            let sending = conn.extra.ops & bit(Op::Send, dir.source().other()) != 0;
            let lane = conn.extra.lane(dir);
            if let (Some(held), false) = (lane.held, sending) {
                io.give(held);
                lane.held = None;
            }
        }
    }
}

impl Host<Uring> {
    /// A receive's completion: the bytes a lane now holds, its end of stream, or why not.
    pub(super) fn on_recv(&mut self, id: SlotId, side: Side, result: i32, flags: u32) {
        let dir = Direction::from_source(side);
        let Some(conn) = self.conns.get_mut(id) else { return };
        let Some(io) = self.reactor.io.as_mut() else { return };
        let ring = conn.extra.lane(dir).recv_ring;
        let buffers = &mut io.rings[usize::from(ring)];
        let taken = cqueue::buffer_select(flags).map(|bid| {
            buffers.taken(bid);
            Held { ring, bid, start: 0, len: result.max(0) as u32 }
        });
        if conn.session.is_closed() {
            if let Some(held) = taken {
                io.give(held);
            }
            return;
        }
        if std::mem::take(&mut conn.extra.lane(dir).continuing) {
            return self.on_recv_more(id, dir, result);
        }
        let outcome = match (result, taken) {
            (n, Some(held)) if n > 0 => {
                let lane = conn.extra.lane(dir);
                if ring == SMALL && held.len == SMALL_RING_BUFFER {
                    lane.bulk = true;
                }
                if ring == LARGE && held.len == LARGE_RING_BUFFER {
                    lane.streaming = true;
                }
                lane.held = Some(held);
                if held.len < lane.want && cqueue::sock_nonempty(flags) {
                    // Short, yet the socket still holds something: more bytes, or the end
                    // of stream that came with these (a pending FIN keeps the queue
                    // non-empty). A receive that does not wait takes it now, so that the
                    // FIN can leave with these bytes. An empty socket costs nothing more.
                    return self.reactor.recv_more(id, conn, dir);
                }
                Ok(Readout { bytes: held.len as usize, eof: false, drained: false })
            }
            (0, taken) => {
                if let Some(held) = taken {
                    io.give(held);
                }
                Ok(Readout { bytes: 0, eof: true, drained: false })
            }
            (n, _) if -n == libc::ENOBUFS && ring == LARGE => {
                // The large buffers are all out: this receive takes a small one.
                conn.extra.lane(dir).bulk = false;
                let max = LARGE_RING_BUFFER as usize;
                self.reactor.recv(id, conn, dir, max);
                return;
            }
            (n, _) if -n == libc::ENOBUFS => {
                // Every buffer is out: this lane reads inline once its source is readable.
                conn.extra.lane(dir).inline = true;
                WorkerStats::add(&self.ctx.stats.ring_fallbacks, 1);
                Err(IoError::WouldBlock)
            }
            (n, _) if -n == libc::ENOMEM => Err(IoError::Local),
            _ => Err(IoError::Reset),
        };
        self.read_done(id, dir, outcome);
    }

    /// The completion of a receive that continued a short one: more bytes, the end of
    /// stream, or nothing now.
    fn on_recv_more(&mut self, id: SlotId, dir: Direction, result: i32) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let lane = conn.extra.lane(dir);
        let Some(mut held) = lane.held else { return };
        let eof = result == 0;
        if result > 0 {
            held.len += result as u32;
            lane.held = Some(held);
        }
        let outcome = Readout { bytes: held.len as usize, eof, drained: false };
        self.read_done(id, dir, Ok(outcome));
    }

    /// A send's completion: the bytes the destination took, or why not.
    pub(super) fn on_send(&mut self, id: SlotId, side: Side, result: i32) {
        let dir = Direction::from_source(side.other());
        let Some(conn) = self.conns.get_mut(id) else { return };
        let Some(io) = self.reactor.io.as_mut() else { return };
        let lane = conn.extra.lane(dir);
        let Some(mut held) = lane.held else { return };
        if conn.session.is_closed() {
            io.give(held);
            lane.held = None;
            return;
        }
        let outcome = match result {
            n if n > 0 => {
                let sent = (n as u32).min(held.len);
                if let Some(tap) = conn.tap.as_mut() {
                    tap.copied(
                        dir,
                        io.rings[usize::from(held.ring)].bytes(held.bid, held.start, sent),
                    );
                }
                held.start += sent;
                held.len -= sent;
                let lane = conn.extra.lane(dir);
                lane.held = Some(held);
                if held.len == 0 {
                    io.give(held);
                    lane.held = None;
                }
                Ok(Written { bytes: sent as usize, blocked: false })
            }
            n if -n == libc::EAGAIN => Ok(Written { bytes: 0, blocked: true }),
            n if -n == libc::ENOMEM => Err(IoError::Local),
            _ => Err(IoError::Reset),
        };
        self.written(id, dir, outcome);
    }
}
