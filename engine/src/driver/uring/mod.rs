//! The io_uring driver: one ring per worker (SINGLE_ISSUER + DEFER_TASKRUN where the kernel
//! has them, COOP_TASKRUN otherwise) for multishot accept, asynchronous connect, readiness
//! (one-shot PollAdd, level-triggered), cancellation, wake-ups and timed waits. It is a
//! [`Reactor`] of the shared [`Host`]; payload moves by the host's inline I/O once a poll
//! completes. No epoll on this path.
//!
//! Each turn: submit what was queued and wait for at least one completion (bounded by the
//! host's next timer), hand the completions to their sessions and listeners, then the
//! host's end of turn. See docs/LIFECYCLE.md for the life of a session on this driver.

mod ops;
mod relay;
mod ring;
#[cfg(feature = "ring-splice")]
mod splice;

pub use self::relay::DEFAULT_RING_BUFFERS;
pub use self::ring::probe;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, types, IoUring};

use self::ops::{bit, InFlight, Op, Tag, GEN_MASK, SESSION_OPS};
use self::relay::RingIo;
use super::conn::{Conn, Pools};
use super::host::{Host, Parked, Reactor};
use super::inline::{self, connect_error, is_resource_exhaustion};
use super::slots::SlotId;
use crate::counters::WorkerStats;
use crate::session::{ConnectError, IoError, Phase, Readout, Written};
use crate::side::{Direction, Side};
use crate::worker::{Relay, WorkerContext};

/// Completions copied off the ring and handled at a time: a few KiB that stay warm, where
/// room for the whole completion queue would be touched a little deeper by every burst.
const REAP_BATCH: usize = 256;
/// How long the worker waits when the kernel refused a submission for want of fds or
/// memory, before it submits again.
const SUBMIT_BACKOFF: Duration = Duration::from_millis(10);
/// Spare connect addresses kept at most: more than a worker has connects in flight at once
/// under any sane load, and only a few KiB.
const MAX_SPARE_ADDRS: usize = 256;

struct Listener {
    socket: Option<TcpListener>,
    addr: SocketAddr,
    armed: bool,
    /// Being removed by a reload: closed once its accept is off the ring.
    retiring: bool,
}

/// The io_uring half of a worker: its ring, listeners and spare connect addresses.
pub(crate) struct Uring {
    /// Dropped first (fields drop in order): the kernel lets go of every buffer and fd the
    /// ring's operations named before they are freed.
    ring: IoUring,
    /// The copy relay's buffers, when the relay runs on the ring (`relay = "copy"`).
    io: Option<RingIo>,
    listeners: Vec<Listener>,
    /// Boxed addresses for connects, kept for reuse: a connect's address must stay put until
    /// its completion, and a fresh box per session would churn the allocator.
    #[allow(clippy::vec_box)]
    spare_addrs: Vec<Box<socket2::SockAddr>>,
    /// The kernel closes sockets as ring operations (`IORING_OP_CLOSE`, probed).
    ring_close: bool,
    /// Closes queued since the last submission.
    closes_queued: bool,
    /// Experiment: ring splices go straight to io-wq (IOSQE_ASYNC).
    #[cfg(feature = "ring-splice")]
    splice_async: bool,
}

impl Uring {
    pub(crate) fn new(ctx: &mut WorkerContext) -> io::Result<Self> {
        let (ring, _) = ring::build_ring()?;
        let io = match ctx.relay {
            Relay::Copy | Relay::Auto => match RingIo::new(&ring, ctx.ring_buffers) {
                Ok(io) => Some(io),
                Err(e) => {
                    let id = ctx.id;
                    log::warn!("worker {id}: no provided buffers ({e}); the copy relay reads and writes inline after readiness (with relay = \"auto\", bulk lanes still splice)");
                    None
                }
            },
            Relay::Splice => None,
        };
        let ring_close = ring::supports(&ring, io_uring::opcode::Close::CODE);
        let mut uring = Uring {
            ring,
            io,
            listeners: Vec::new(),
            spare_addrs: Vec::new(),
            ring_close,
            closes_queued: false,
            #[cfg(feature = "ring-splice")]
            splice_async: std::env::var_os("SLUICE_RING_SPLICE_ASYNC").is_some(),
        };
        for listener in std::mem::take(&mut ctx.listeners) {
            uring.add_listener(listener)?;
        }
        let wake =
            ops::poll(ctx.wake.as_fd(), libc::POLLIN, ops::pack(Op::Wake, Side::Client, 0, 0));
        ops::push(&mut uring.ring, &wake);
        Ok(uring)
    }

    /// Queues a poll for `side` of session `id`, unless one is on the ring already.
    fn poll(&mut self, id: SlotId, conn: &mut Conn<InFlight>, side: Side, op: Op) {
        let bit = bit(op, side);
        if conn.extra.ops & bit != 0 {
            return;
        }
        let Some(fd) = conn.socket(side) else { return };
        let events = match op {
            Op::PollOut => libc::POLLOUT,
            _ => libc::POLLIN | libc::POLLRDHUP,
        };
        let entry = ops::poll(fd, events, ops::pack(op, side, id.gen, id.index));
        conn.extra.ops |= bit;
        ops::push(&mut self.ring, &entry);
    }

    fn cancel_accept(&mut self, index: usize) {
        if self.listeners[index].armed {
            let target = ops::pack(Op::Accept, Side::Client, 0, index as u32);
            ops::push(&mut self.ring, &ops::cancel(target));
        }
    }
}

impl Reactor for Uring {
    type Extra = InFlight;
    const EDGE: bool = false;

    fn watch(&mut self, _: SlotId, _: &mut Conn<InFlight>, _: Side) -> io::Result<()> {
        // Polls are queued when the core asks for readiness.
        Ok(())
    }

    fn await_ready(&mut self, id: SlotId, conn: &mut Conn<InFlight>, side: Side, output: bool) {
        let relaying = conn.session.phase() == Phase::Relaying;
        let dir = Direction::from_source(side);
        if self.io.is_some() && !output && relaying && !self.reads_inline(conn, dir) {
            // On the ring's data path a receive waits for bytes by itself.
            return conn.session.on_readable(side);
        }
        self.poll(id, conn, side, if output { Op::PollOut } else { Op::PollIn });
    }

    fn read(
        &mut self,
        id: SlotId,
        conn: &mut Conn<InFlight>,
        dir: Direction,
        max: usize,
        read_on: bool,
        pools: &mut Pools,
    ) -> Option<Result<Readout, IoError>> {
        #[cfg(feature = "ring-splice")]
        if pools.relay == Relay::Splice {
            return self.splice_in(id, conn, dir, max, pools);
        }
        if self.io.is_none() {
            return Some(inline::read(conn, dir, max, read_on, pools));
        }
        if self.reads_inline(conn, dir) {
            if conn.extra.lane(dir).streaming && pools.relay == Relay::Auto {
                // `auto`: a lane that filled a large ring buffer carries a bulk stream,
                // spliced from now on (its ring buffer was all sent before this read).
                conn.carrier(dir).spliced = true;
            }
            if !conn.extra.lane(dir).streaming {
                // Many peers stopped reading and hold every ring buffer: this lane's bytes
                // wait in a small pool buffer (64 KiB), however bulky its stream.
                conn.carrier(dir).buffer.stay_small();
            }
            return Some(inline::read(conn, dir, max, read_on, pools));
        }
        self.recv(id, conn, dir, max);
        None
    }

    fn write(
        &mut self,
        id: SlotId,
        conn: &mut Conn<InFlight>,
        dir: Direction,
        held: usize,
        fin: bool,
        pools: &mut Pools,
    ) -> Option<Result<Written, IoError>> {
        #[cfg(feature = "ring-splice")]
        if pools.relay == Relay::Splice {
            return self.splice_out(id, conn, dir, held, fin);
        }
        if self.io.is_none() || conn.extra.lane(dir).held.is_none() {
            // Bytes read inline wait in the lane's pool buffer: they are written inline.
            return Some(inline::write(conn, dir, held, fin, pools));
        }
        self.send(id, conn, dir, held, fin)
    }

    fn connect(
        &mut self,
        id: SlotId,
        conn: &mut Conn<InFlight>,
        addr: SocketAddr,
    ) -> Result<(), ConnectError> {
        let target = match self.spare_addrs.pop() {
            Some(mut target) => {
                *target = socket2::SockAddr::from(addr);
                target
            }
            None => Box::new(socket2::SockAddr::from(addr)),
        };
        conn.extra.connect_addr = Some(target);
        let user_data = ops::pack(Op::Connect, Side::Backend, id.gen, id.index);
        let backend = conn.backend.as_ref().ok_or(ConnectError::NoSocket)?;
        let entry =
            ops::connect(backend.as_fd(), &conn.extra, user_data).ok_or(ConnectError::NoSocket)?;
        conn.extra.ops |= bit(Op::Connect, Side::Backend);
        ops::push(&mut self.ring, &entry);
        Ok(())
    }

    fn abort_connect(&mut self, id: SlotId, conn: &mut Conn<InFlight>) -> bool {
        if conn.extra.ops & bit(Op::Connect, Side::Backend) == 0 {
            return true;
        }
        // The connect's completion (-ECANCELED, or its success just before) reports it.
        let target = ops::pack(Op::Connect, Side::Backend, id.gen, id.index);
        ops::push(&mut self.ring, &ops::cancel(target));
        false
    }

    fn release(&mut self, id: SlotId, conn: &mut Conn<InFlight>) -> bool {
        self.let_go(conn);
        for (op, side) in SESSION_OPS {
            if conn.extra.ops & bit(op, side) != 0 {
                let target = ops::pack(op, side, id.gen, id.index);
                ops::push(&mut self.ring, &ops::cancel(target));
            }
        }
        conn.extra.ops == 0
    }

    #[cfg(feature = "ring-splice")]
    fn lane_in_flight(&self, conn: &Conn<InFlight>, dir: Direction) -> bool {
        Uring::splicing(conn, dir)
    }

    fn close(&mut self, fd: OwnedFd) {
        if self.ring_close {
            // Leaves with the loop turn's other submissions: no system call of its own.
            ops::push(&mut self.ring, &ops::close(fd));
            self.closes_queued = true;
        }
    }

    fn flush_closes(&mut self) -> bool {
        if !std::mem::take(&mut self.closes_queued) {
            return false;
        }
        // A socket's close completes in line: its fd is free when this returns.
        self.ring.submit().is_ok()
    }

    fn listener_addr(&self, index: usize) -> Option<SocketAddr> {
        let listener = self.listeners.get(index)?;
        listener.socket.is_some().then_some(listener.addr)
    }

    fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    fn accept_on(&mut self, index: usize) {
        let listener = &mut self.listeners[index];
        let Some(socket) = &listener.socket else { return };
        if listener.armed || listener.retiring {
            return;
        }
        let entry = ops::accept_multi(socket.as_fd(), index as u32);
        listener.armed = true;
        ops::push(&mut self.ring, &entry);
    }

    fn stop_accepting(&mut self, index: usize) {
        // Connections the accept completes meanwhile are parked by the host.
        self.cancel_accept(index);
    }

    fn accept_now(&mut self, index: usize) -> io::Result<(OwnedFd, SocketAddr)> {
        let socket = self.listeners.get(index).and_then(|l| l.socket.as_ref());
        let (stream, peer) = socket.ok_or(io::ErrorKind::NotFound)?.accept()?;
        stream.set_nonblocking(true)?;
        Ok((stream.into(), peer))
    }

    fn add_listener(&mut self, socket: TcpListener) -> io::Result<usize> {
        let addr = socket.local_addr()?;
        self.listeners.push(Listener { socket: Some(socket), addr, armed: false, retiring: false });
        Ok(self.listeners.len() - 1)
    }

    fn retire(&mut self, index: usize) -> bool {
        let listener = &mut self.listeners[index];
        listener.retiring = true;
        if !listener.armed {
            return true;
        }
        // Its accept's last completion (-ECANCELED) comes first.
        self.cancel_accept(index);
        false
    }

    fn close_listener(&mut self, index: usize) {
        self.listeners[index].socket = None;
    }

    fn close_listeners(&mut self) {
        for index in 0..self.listeners.len() {
            if self.listeners[index].armed {
                self.cancel_accept(index);
            } else {
                self.listeners[index].socket = None;
            }
        }
    }
}

impl Host<Uring> {
    /// The worker's loop, until it has drained.
    pub(crate) fn run_loop(mut self) -> io::Result<()> {
        let mut batch = Vec::with_capacity(REAP_BATCH);
        loop {
            self.submit_and_wait()?;
            self.now = Instant::now();
            self.reap(&mut batch);
            if self.end_turn() {
                // Dropping the ring first cancels whatever is left on it; only then are the
                // fds those operations named closed (listeners, sessions).
                let Host { reactor, conns, .. } = self;
                drop(reactor);
                drop(conns);
                return Ok(());
            }
        }
    }

    /// Submits what was queued and waits for a completion, at most until the next timer.
    fn submit_and_wait(&mut self) -> io::Result<()> {
        let timeout = match self.has_pending() {
            true => Some(Duration::ZERO),
            // Round up so the loop never wakes a hair early and spins.
            false => self.wake_at().map(|next| {
                next.saturating_duration_since(Instant::now()) + Duration::from_micros(200)
            }),
        };
        self.reactor.closes_queued = false;
        let ring = &mut self.reactor.ring;
        let result = match timeout {
            Some(d) if d.is_zero() => ring.submit(),
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
            None => ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
            // Out of fds or memory, the kernel may fail the submission itself (the entries
            // stay queued for the next call). Not fatal: pause briefly instead of spinning.
            Err(e) if is_resource_exhaustion(&e) => {
                WorkerStats::add(&self.ctx.stats.accept_backoffs, 1);
                std::thread::sleep(SUBMIT_BACKOFF);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Handles the completions on the ring, a batch at a time.
    fn reap(&mut self, batch: &mut Vec<(u64, i32, u32)>) {
        loop {
            let cq = self.reactor.ring.completion().take(REAP_BATCH);
            batch.extend(cq.map(|c| (c.user_data(), c.result(), c.flags())));
            let full = batch.len() == REAP_BATCH;
            for (user_data, result, flags) in batch.drain(..) {
                let Some(tag) = ops::unpack(user_data) else { continue };
                match tag.op {
                    Op::Accept => self.on_accept(tag.index as usize, result, flags),
                    Op::Wake => self.on_wake(),
                    Op::Cancel | Op::Close => {}
                    _ => self.on_session_op(tag, result, flags),
                }
            }
            if !full {
                break;
            }
        }
    }

    fn on_session_op(&mut self, tag: Tag, result: i32, flags: u32) {
        let Some((id, conn)) = self.conns.at_mut(tag.index) else { return };
        if id.gen & GEN_MASK != tag.gen {
            return;
        }
        conn.extra.ops &= !bit(tag.op, tag.side);
        if tag.op == Op::Connect {
            if let Some(target) = conn.extra.connect_addr.take() {
                if self.reactor.spare_addrs.len() < MAX_SPARE_ADDRS {
                    self.reactor.spare_addrs.push(target);
                }
            }
        }
        if conn.session.is_closed() {
            match tag.op {
                Op::Recv => self.on_recv(id, tag.side, result, flags),
                Op::Send => self.on_send(id, tag.side, result),
                _ => {}
            }
            if let Some(conn) = self.conns.get_mut(id).filter(|c| c.extra.ops == 0) {
                self.reactor.let_go(conn);
                self.free(id);
            }
            return;
        }
        match tag.op {
            Op::Recv => self.on_recv(id, tag.side, result, flags),
            Op::Send => self.on_send(id, tag.side, result),
            #[cfg(feature = "ring-splice")]
            Op::SpliceIn => self.on_splice_in(id, tag.side, result),
            #[cfg(feature = "ring-splice")]
            Op::SpliceOut => self.on_splice_out(id, tag.side, result),
            Op::Connect if result == 0 => self.connected(id, Ok(())),
            Op::Connect => self.connected(id, Err(connect_error(-result))),
            Op::PollOut => {
                self.ready(id, tag.side, true, false);
                self.run(id);
            }
            _ => {
                // A poll's result is its revents: the peer's FIN has arrived (and no error).
                let hangup = result > 0
                    && result & libc::POLLRDHUP as i32 != 0
                    && result & libc::POLLERR as i32 == 0;
                self.ready(id, tag.side, false, hangup);
                self.run(id);
            }
        }
    }

    fn on_accept(&mut self, index: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let listener = &mut self.reactor.listeners[index];
        if !more {
            listener.armed = false;
        }
        let (bound, retiring) = (listener.addr, listener.retiring);
        match ops::accepted(result) {
            Some(fd) if self.draining.is_none() => {
                if let Err(parked) = self.admit(Parked { fd, index, bound, peer: None }) {
                    self.park(parked);
                }
            }
            Some(_) => {}
            None => {
                let error = io::Error::from_raw_os_error(-result);
                if -result != libc::ECANCELED {
                    WorkerStats::add(&self.ctx.stats.accept_errors, 1);
                }
                if is_resource_exhaustion(&error) && !more && !retiring {
                    return self.pause_backoff(index, &error);
                }
            }
        }
        if more {
            return;
        }
        if self.draining.is_some() {
            self.reactor.listeners[index].socket = None;
        } else if retiring {
            self.retired(index);
        } else {
            self.try_accept(index);
        }
    }

    fn on_wake(&mut self) {
        self.obey();
        let wake =
            ops::poll(self.ctx.wake.as_fd(), libc::POLLIN, ops::pack(Op::Wake, Side::Client, 0, 0));
        ops::push(&mut self.reactor.ring, &wake);
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Queued closes happen now (a socket's close completes in line), not never.
        let _ = self.ring.submit();
        // The buffers' memory goes with `io`, after the ring: tell the kernel first.
        if let Some(io) = &self.io {
            for group in io.groups() {
                let _ = self.ring.submitter().unregister_buf_ring(group);
            }
        }
    }
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").field("listeners", &self.listeners.len()).finish()
    }
}
