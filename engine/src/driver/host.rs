//! What both drivers share: a worker's table of sessions and the loop that carries out
//! their cores' actions ([`Host::run`]), their deadlines, the admission of accepted
//! connections (with the session caps and the pauses after running out of fds), interim
//! records, snapshots and the drain. A driver adds only its [`Reactor`]: how it learns
//! that a socket is ready, how it connects, how it accepts and stops watching a session.
//!
//! Invariants: a session's actions are carried out in the order its core gives them, each
//! outcome reported before the next action is asked for; a closed session is freed only
//! when its reactor says nothing of it is in flight (its fds are closed then, never while an
//! operation names them); a paused listener is never accepted on.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime};

use super::conn::{Conn, Pools};
use super::inline;
use super::schedule::{AcceptBackoff, Deadlines, FullPause};
use super::slots::{SlotId, Slots};
use crate::admission::{self, Refusal};
use crate::capture::Tap;
use crate::counters::WorkerStats;
use crate::record::{CloseReason, LiveSession, RecordKind};
use crate::session::{Action, ConnectError, IoError, Readout, Session, Written};
use crate::side::{Direction, Side};
use crate::sys;
use crate::worker::{Command, SessionId, WorkerContext};

/// How often sessions are scanned for due interim records.
const REPORT_SCAN: Duration = Duration::from_secs(1);

/// What a driver does for the shared host.
pub(crate) trait Reactor {
    /// The driver's own state of each session.
    type Extra: Default + std::fmt::Debug;
    /// Readiness is edge-triggered and always reported for both sockets of a session: a
    /// read goes on until its socket would block, and requests for readiness need nothing.
    const EDGE: bool;

    /// Starts watching the socket of `side` of session `id` (just accepted or created).
    fn watch(&mut self, id: SlotId, conn: &mut Conn<Self::Extra>, side: Side) -> io::Result<()>;
    /// Makes sure `on_readable` (or with `output`, `on_writable`) of `side` will be
    /// reported once that socket is ready.
    fn await_ready(&mut self, id: SlotId, conn: &mut Conn<Self::Extra>, side: Side, output: bool);
    /// Connects the session's new backend socket to `addr`; `Ok` once the connect is under
    /// way (its outcome is reported later).
    fn connect(
        &mut self,
        id: SlotId,
        conn: &mut Conn<Self::Extra>,
        addr: SocketAddr,
    ) -> Result<(), ConnectError>;
    /// Gives up the connect in flight; true when it is over at once (its socket may go),
    /// false when its completion will still report it.
    fn abort_connect(&mut self, id: SlotId, conn: &mut Conn<Self::Extra>) -> bool;
    /// The session has closed: stop watching it. True when nothing of it is in flight, so
    /// it may be freed (and its fds closed) now.
    fn release(&mut self, id: SlotId, conn: &mut Conn<Self::Extra>) -> bool;
    /// The address listener `index` is bound to, while it is open.
    fn listener_addr(&self, index: usize) -> Option<SocketAddr>;
    /// Listener indices in use (some may be closed).
    fn listener_count(&self) -> usize;
    /// Starts accepting on listener `index` (it has room and is not paused).
    fn accept_on(&mut self, index: usize);
    /// Stops accepting on listener `index` for now (connections wait in its backlog).
    fn stop_accepting(&mut self, index: usize);
    /// Accepts one connection on listener `index` at once, without blocking: its fd
    /// (non-blocking, close-on-exec) and its peer.
    fn accept_now(&mut self, index: usize) -> io::Result<(OwnedFd, SocketAddr)>;
    /// Takes a new listener (bound and listening); its index.
    fn add_listener(&mut self, listener: TcpListener) -> io::Result<usize>;
    /// Listener `index` is to be removed: true when its queue may be drained and it closed
    /// now, false when it must first stop accepting (the driver then calls
    /// [`Host::retired`] once it has).
    fn retire(&mut self, index: usize) -> bool;
    /// Closes listener `index` (its queue was drained).
    fn close_listener(&mut self, index: usize);
    /// The worker drains: every listener stops accepting and closes.
    fn close_listeners(&mut self);

    /// Whether an operation of the lane of `dir` is still with the kernel, using its pipe
    /// (which must then not be pooled). By default, never.
    fn lane_in_flight(&self, _: &Conn<Self::Extra>, _: Direction) -> bool {
        false
    }

    /// Carries out the closes queued so far, at once; whether there were any. By default,
    /// closes are never queued.
    fn flush_closes(&mut self) -> bool {
        false
    }

    /// Closes a freed session's socket. By default, inline (its drop).
    fn close(&mut self, fd: OwnedFd) {
        drop(fd);
    }

    /// Carries out [`Action::Read`]: `Some` outcome when done at once, `None` when the
    /// driver reports it later ([`Host::read_done`]). By default, inline.
    fn read(
        &mut self,
        _: SlotId,
        conn: &mut Conn<Self::Extra>,
        dir: Direction,
        max: usize,
        read_on: bool,
        pools: &mut Pools,
    ) -> Option<Result<Readout, IoError>> {
        Some(inline::read(conn, dir, max, read_on || Self::EDGE, pools))
    }

    /// Carries out [`Action::Write`] of the `held` bytes of lane `dir`: `Some` outcome when
    /// done at once, `None` when reported later ([`Host::written`]). By default, inline.
    fn write(
        &mut self,
        _: SlotId,
        conn: &mut Conn<Self::Extra>,
        dir: Direction,
        held: usize,
        fin: bool,
        pools: &mut Pools,
    ) -> Option<Result<Written, IoError>> {
        Some(inline::write(conn, dir, held, fin, pools))
    }
}

/// A connection accepted while a session cap was full: it waits here, unread, as it would
/// in the backlog, until a place frees up.
#[derive(Debug)]
pub(crate) struct Parked {
    pub fd: OwnedFd,
    /// The listener it was accepted on, and the address that listener is bound to.
    pub index: usize,
    pub bound: SocketAddr,
    pub peer: Option<SocketAddr>,
}

/// One worker's sessions on a driver.
pub(crate) struct Host<R: Reactor> {
    pub ctx: WorkerContext,
    pub reactor: R,
    pub conns: Slots<Conn<R::Extra>>,
    deadlines: Deadlines,
    /// Sessions that used their share of a turn, continued on the next.
    pending: Vec<SlotId>,
    /// The list of the last turn, emptied, kept so that turns allocate nothing.
    continued: Vec<SlotId>,
    pools: Pools,
    /// Where the client's opening bytes are peeked at.
    scratch: Box<[u8]>,
    pub backoff: AcceptBackoff,
    pub full: FullPause,
    parked: VecDeque<Parked>,
    pub draining: Option<Instant>,
    /// A reload waiting for this worker to close listeners: who to tell, and how many are
    /// left.
    removal: Option<(crossbeam_channel::Sender<usize>, usize)>,
    next_report_scan: Instant,
    pub now: Instant,
}

/// Runs a worker on a driver: sets its reactor up with `setup` (`what` names it in
/// messages), reports the outcome to the engine, waits for its go, starts accepting and
/// runs `run_loop` until the worker has drained.
pub(crate) fn run<R: Reactor>(
    mut ctx: WorkerContext,
    setup: impl FnOnce(&mut WorkerContext) -> io::Result<R>,
    what: &str,
    run_loop: fn(Host<R>) -> io::Result<()>,
) -> io::Result<()> {
    let (id, startup) = (ctx.id, ctx.startup.clone());
    let host = setup(&mut ctx)
        .inspect_err(|e| log::error!("worker {id}: cannot set up its {what}: {e}"))
        .map(|reactor| {
            let pools = Pools::for_worker(&ctx);
            Host::new(ctx, reactor, pools)
        });
    let Some(mut host) = startup.settle(host) else { return Ok(()) };
    for index in 0..host.reactor.listener_count() {
        host.try_accept(index);
    }
    run_loop(host).inspect_err(|e| log::error!("worker {id}: {what} failed: {e}"))
}

impl<R: Reactor> Host<R> {
    pub fn new(ctx: WorkerContext, reactor: R, pools: Pools) -> Self {
        let now = Instant::now();
        Self {
            ctx,
            reactor,
            conns: Slots::default(),
            deadlines: Deadlines::default(),
            pending: Vec::new(),
            continued: Vec::new(),
            pools,
            scratch: vec![0; crate::proxy::MAX_HEADER.max(crate::sni::MAX_CLIENT_HELLO)]
                .into_boxed_slice(),
            backoff: AcceptBackoff::default(),
            full: FullPause::default(),
            parked: VecDeque::new(),
            draining: None,
            removal: None,
            next_report_scan: now + REPORT_SCAN,
            now,
        }
    }

    /// Whether sessions wait to continue: the driver must not block.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// When the driver must wake up if no event comes first.
    pub fn wake_at(&self) -> Option<Instant> {
        [
            self.deadlines.next(),
            self.backoff.next(),
            self.full.next(),
            self.draining,
            Some(self.next_report_scan),
            self.ctx.events.flush_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The work of a loop turn after its events: sessions that yielded, pauses that end,
    /// timers, interim records, records due to leave. True once the worker has drained.
    pub fn end_turn(&mut self) -> bool {
        let spare = std::mem::take(&mut self.continued);
        let mut yielded = std::mem::replace(&mut self.pending, spare);
        for id in yielded.drain(..) {
            self.run(id);
        }
        self.continued = yielded;
        self.resume_paused();
        self.resume_full();
        self.expire_timers();
        self.report_interim();
        self.ctx.events.flush_if_due(self.now);
        self.drained()
    }

    // ---- sessions ----

    /// Carries out session `id`'s actions until its core waits for an event.
    pub fn run(&mut self, id: SlotId) {
        let now = self.now;
        loop {
            let Some(conn) = self.conns.get_mut(id) else { return };
            let Some(action) = conn.session.next_action(now) else { break };
            match action {
                Action::AwaitReadable(side) => self.reactor.await_ready(id, conn, side, false),
                Action::AwaitWritable(side) => self.reactor.await_ready(id, conn, side, true),
                Action::Peek { max } => {
                    let max = max.min(self.scratch.len());
                    let scratch = &mut self.scratch[..max];
                    match inline::peek(conn.client.as_fd(), scratch) {
                        Ok(n) => conn.session.on_peeked(Ok(&scratch[..n]), now),
                        Err(e) => conn.session.on_peeked(Err(e), now),
                    }
                }
                Action::Lowat(bytes) => {
                    // A failure only means an earlier wake-up and another peek.
                    let _ = sys::set_rcvlowat(conn.client.as_fd(), bytes);
                }
                Action::Consume(n) => {
                    let consumed = inline::consume(conn.client.as_fd(), &mut self.scratch, n);
                    conn.session.on_consumed(consumed, now);
                }
                Action::Connect => self.connect(id),
                Action::AbortConnect => {
                    if self.reactor.abort_connect(id, conn) {
                        conn.backend = None;
                        conn.session.on_connected(Err(ConnectError::TimedOut), now);
                    }
                }
                Action::SendPreamble => {
                    let sent = match (conn.session.preamble(), &conn.backend) {
                        (Some(header), Some(b)) => {
                            inline::send_preamble(b.as_fd(), header.as_bytes())
                        }
                        _ => Ok(()),
                    };
                    conn.session.on_preamble_sent(sent);
                }
                Action::Read { dir, max, to_end } => {
                    let read = self.reactor.read(id, conn, dir, max, to_end, &mut self.pools);
                    if let Some(read) = read {
                        conn.session.on_read(dir, read, now);
                    }
                }
                Action::Probe(dir) => {
                    let probed = inline::probe(conn, dir);
                    conn.session.on_probed(dir, probed, now);
                }
                Action::Write { dir, fin } => {
                    let held = conn.session.lane(dir).held;
                    let written = self.reactor.write(id, conn, dir, held, fin, &mut self.pools);
                    if let Some(written) = written {
                        conn.session.on_written(dir, written, now);
                    }
                }
                Action::Shutdown(dir) => {
                    // Inline on every driver: io_uring hands a ring shutdown to an io-wq
                    // thread instead of completing it in line.
                    let shut = inline::shutdown(conn, dir);
                    conn.session.on_shutdown(dir, shut, now);
                }
                Action::Release(dir) => {
                    let held = conn.session.lane(dir).held;
                    conn.carrier(dir).release(held, &mut self.pools);
                }
                Action::CaptureOpen => {
                    let session = &conn.session;
                    if let (Some((policy, service)), Some(backend)) =
                        (session.capture(), session.backend_addr())
                    {
                        let mut tap = Box::new(Tap::new(policy.clone(), service.clone()));
                        tap.open(session.client(), backend);
                        conn.tap = Some(tap);
                    }
                }
                Action::CaptureFin(dir) => {
                    if let Some(tap) = conn.tap.as_mut() {
                        tap.fin(dir);
                    }
                }
                Action::EmitOpen => {
                    let record = conn.session.record(RecordKind::Open, now);
                    self.ctx.events.send(record);
                }
                Action::Yield => {
                    self.pending.push(id);
                    break;
                }
                Action::Close { reason, abort } => return self.finish(id, reason, abort),
            }
        }
        self.rearm(id);
    }

    /// Opens the backend socket of session `id` and has the reactor connect it.
    fn connect(&mut self, id: SlotId) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        let Some(addr) = conn.session.backend_addr() else { return };
        let how = conn.session.backend_socket().unwrap_or_default();
        let mut socket = sys::tcp_socket_for(addr, &how);
        if socket.as_ref().is_err_and(inline::is_resource_exhaustion) && self.reactor.flush_closes()
        {
            // Closes the reactor had queued give their fds back first.
            socket = sys::tcp_socket_for(addr, &how);
        }
        let Some(conn) = self.conns.get_mut(id) else { return };
        let outcome = match socket {
            Ok(socket) => {
                conn.backend = Some(socket.into());
                self.reactor.connect(id, conn, addr)
            }
            Err(e) if inline::is_resource_exhaustion(&e) => {
                // Out of fds for the backend: this client is closed, and the next ones wait
                // in the backlog rather than be accepted only to be closed.
                let listener = conn.listener;
                conn.session.on_connected(Err(ConnectError::NoSocket), now);
                self.pause_backoff(listener, &e);
                return;
            }
            Err(_) => Err(ConnectError::Refused),
        };
        if let (Err(e), Some(conn)) = (outcome, self.conns.get_mut(id)) {
            conn.backend = None;
            conn.session.on_connected(Err(e), now);
        }
    }

    /// The outcome of session `id`'s connect, as its reactor saw it.
    pub fn connected(&mut self, id: SlotId, outcome: Result<(), ConnectError>) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        if outcome.is_err() {
            conn.backend = None;
        }
        conn.session.on_connected(outcome, now);
        self.run(id);
    }

    /// The outcome of a read the driver carried out on its own.
    pub fn read_done(&mut self, id: SlotId, dir: Direction, outcome: Result<Readout, IoError>) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        conn.session.on_read(dir, outcome, now);
        self.run(id);
    }

    /// The outcome of a write the driver carried out on its own.
    pub fn written(&mut self, id: SlotId, dir: Direction, outcome: Result<Written, IoError>) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        conn.session.on_written(dir, outcome, now);
        self.run(id);
    }

    /// `side` of session `id` is ready (readable, or with `output` writable); `hangup`: its
    /// peer has sent its end of stream.
    pub fn ready(&mut self, id: SlotId, side: Side, output: bool, hangup: bool) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        if hangup {
            conn.session.on_hangup(side);
        }
        if output {
            conn.session.on_writable(side);
        } else {
            conn.session.on_readable(side);
        }
    }

    /// Closes session `id`: returns its buffers and pipes, arms SO_LINGER 0 when the close
    /// must reach the peers as a reset, sends its record, ends its capture, and frees it
    /// once nothing of it is in flight.
    fn finish(&mut self, id: SlotId, reason: CloseReason, abort: bool) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        for (i, dir) in
            [crate::side::Direction::Up, crate::side::Direction::Down].into_iter().enumerate()
        {
            let held = conn.session.lane(dir).held;
            // A pipe still in use by the kernel is closed (as if it held bytes), not pooled.
            let held = if self.reactor.lane_in_flight(conn, dir) { usize::MAX } else { held };
            conn.lanes[i].release(held, &mut self.pools);
        }
        if abort {
            let _ = sys::set_linger_zero(conn.client.as_fd());
            if let Some(b) = &conn.backend {
                let _ = sys::set_linger_zero(b.as_fd());
            }
        }
        self.ctx.events.send(conn.session.final_record(now));
        if let Some(tap) = conn.tap.take() {
            (*tap).close(reason);
        }
        self.full.poke(now);
        if self.reactor.release(id, conn) {
            self.free(id);
        }
    }

    /// Forgets a closed session whose last operation is over; its sockets close.
    pub fn free(&mut self, id: SlotId) {
        self.deadlines.remove(id);
        if let Some(conn) = self.conns.remove(id) {
            self.reactor.close(conn.client);
            if let Some(backend) = conn.backend {
                self.reactor.close(backend);
            }
        }
    }

    /// Makes sure a timer entry exists at or before the session's deadline.
    fn rearm(&mut self, id: SlotId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        if conn.session.is_closed() {
            return;
        }
        self.deadlines.arm(id, &mut conn.armed, conn.session.deadline_at());
    }

    fn expire_timers(&mut self) {
        while let Some((at, id)) = self.deadlines.pop_due(self.now) {
            let Some(conn) = self.conns.get_mut(id) else { continue };
            if conn.armed != Some(at) || conn.session.is_closed() {
                continue;
            }
            let deadline = conn.session.deadline_at();
            if deadline > self.now {
                self.deadlines.set(id, &mut conn.armed, deadline);
                continue;
            }
            conn.armed = None;
            conn.session.on_timer(self.now);
            self.run(id);
        }
    }

    /// Sends an interim record for every long-lived session whose interval has passed, and
    /// adds long sessions' bytes to their clients' accounting totals.
    fn report_interim(&mut self) {
        if self.now < self.next_report_scan {
            return;
        }
        self.next_report_scan = self.now + REPORT_SCAN;
        let now = self.now;
        for id in self.conns.ids() {
            let Some(conn) = self.conns.get_mut(id) else { continue };
            conn.session.account_interim(now);
            if conn.session.take_interim(now) {
                let record = conn.session.record(RecordKind::Interim, now);
                self.ctx.events.send(record);
            }
        }
    }

    /// Up to `limit` live sessions, as the admin API shows them.
    fn snapshot(&mut self, limit: usize) -> Vec<LiveSession> {
        let now = Instant::now();
        let mut out = Vec::new();
        for id in self.conns.ids() {
            if out.len() >= limit {
                break;
            }
            let worker = self.ctx.id;
            match self.conns.get_mut(id) {
                Some(conn) if !conn.session.is_closed() => {
                    let name =
                        SessionId { worker, udp: false, index: id.index, generation: id.gen };
                    out.push(conn.session.live(name.to_u64(), now));
                }
                _ => {}
            }
        }
        out
    }

    // ---- accepting ----

    /// Admits a connection accepted on listener `index`, bound to `bound` (`peer`: its
    /// address, when the accept gave it); gives it back when a session cap is full.
    pub fn admit(&mut self, parked: Parked) -> Result<(), Parked> {
        let Parked { fd, index, bound, peer } = parked;
        let peer = match peer.map_or_else(|| sys::peer_addr(fd.as_fd()), Ok) {
            Ok(peer) => peer,
            Err(_) => {
                // The client reset before it could be admitted: nobody to decide, record
                // or serve.
                WorkerStats::add(&self.ctx.stats.accepted_reset, 1);
                return Ok(());
            }
        };
        // On a wildcard listener, the address the client reached decides `to` rules and
        // is recorded.
        let local = match bound.ip().is_unspecified() {
            true => sys::local_addr(fd.as_fd()).unwrap_or(bound),
            false => bound,
        };
        match admission::admit(&self.ctx.tables, &self.ctx.cap, bound) {
            Ok(admitted) => {
                let (stats, worker) = (self.ctx.stats.clone(), self.ctx.id);
                let session =
                    Session::new(admitted, peer, local, worker, stats, self.now, SystemTime::now());
                let id = self.conns.insert(Conn::new(session, fd, index));
                let conn = self.conns.get_mut(id).expect("just inserted");
                if self.reactor.watch(id, conn, Side::Client).is_err() {
                    conn.session.cut(CloseReason::LocalError);
                }
                self.run(id);
                Ok(())
            }
            Err(Refusal::NoService) => Ok(()),
            Err(Refusal::Full) => Err(Parked { fd, index, bound, peer: Some(peer) }),
        }
    }

    /// Whether a new session on listener `index` fits under the caps now.
    pub fn has_room(&self, index: usize) -> bool {
        let Some(addr) = self.reactor.listener_addr(index) else { return false };
        admission::has_room(&self.ctx.tables.load(), &self.ctx.cap, addr)
    }

    /// Accepts on listener `index` unless it is paused; pauses it when a cap is full.
    pub fn try_accept(&mut self, index: usize) {
        if self.draining.is_some() || self.full.is_paused(index) || self.backoff.is_paused(index) {
            return;
        }
        if !self.has_room(index) {
            return self.pause_full(index);
        }
        self.reactor.accept_on(index);
    }

    /// A connection accepted when a cap had just filled: it waits, and the listener pauses.
    pub fn park(&mut self, parked: Parked) {
        let index = parked.index;
        self.parked.push_back(parked);
        self.pause_full(index);
    }

    /// Pauses listener `index` after the process ran out of fds or memory (see
    /// [`AcceptBackoff`]).
    pub fn pause_backoff(&mut self, index: usize, error: &io::Error) {
        let Some(addr) = self.reactor.listener_addr(index) else { return };
        if self.backoff.pause(self.ctx.id, index, addr, error, self.now) {
            WorkerStats::add(&self.ctx.stats.accept_backoffs, 1);
            self.reactor.stop_accepting(index);
        }
    }

    /// Stops accepting on listener `index` until a session cap has room again.
    pub fn pause_full(&mut self, index: usize) {
        if self.full.pause(index, self.now) {
            WorkerStats::add(&self.ctx.stats.accept_paused_full, 1);
            self.reactor.stop_accepting(index);
        }
    }

    fn resume_paused(&mut self) {
        for index in self.backoff.due(self.now) {
            self.try_accept(index);
        }
    }

    /// Admits parked connections, then resumes the listeners whose caps have room again.
    fn resume_full(&mut self) {
        let due = self.full.due(self.now);
        if due.is_empty() {
            return;
        }
        while let Some(parked) = self.parked.pop_front() {
            if let Err(parked) = self.admit(parked) {
                self.parked.push_front(parked);
                break;
            }
        }
        for index in due {
            let waiting = self.parked.iter().any(|p| p.index == index);
            if waiting || !self.has_room(index) {
                self.full.pause(index, self.now);
            } else {
                self.try_accept(index);
            }
        }
    }

    /// Forgets the pauses of a listener that is being closed.
    pub fn forget_listener(&mut self, index: usize) {
        self.backoff.forget(index);
        self.full.forget(index);
    }

    // ---- commands and the drain ----

    /// Carries out the control thread's commands.
    pub fn obey(&mut self) {
        self.ctx.wake.drain();
        while let Ok(command) = self.ctx.commands.try_recv() {
            match command {
                Command::Drain { deadline } => {
                    self.draining = Some(deadline);
                    self.backoff.clear();
                    self.full.clear();
                    self.parked.clear();
                    self.reactor.close_listeners();
                }
                Command::RemoveListeners { addrs, done } => self.remove_listeners(&addrs, done),
                Command::AddListeners { listeners } => {
                    for listener in listeners {
                        match self.reactor.add_listener(listener) {
                            // Connections may have queued between bind and this moment.
                            Ok(index) => self.try_accept(index),
                            Err(e) => {
                                log::error!(
                                    "worker {}: cannot take a new listener: {e}",
                                    self.ctx.id
                                )
                            }
                        }
                    }
                }
                Command::Snapshot { limit, reply } => {
                    let _ = reply.send(self.snapshot(limit));
                }
                Command::Kill { id, reply } => {
                    let _ = reply.send(self.kill(SlotId { index: id.index, gen: id.generation }));
                }
            }
        }
    }

    /// Cuts session `id` (the admin API asks); false when it is not there or already closed.
    fn kill(&mut self, id: SlotId) -> bool {
        match self.conns.get_mut(id) {
            Some(conn) if !conn.session.is_closed() => {
                conn.session.kill();
                self.run(id);
                true
            }
            _ => false,
        }
    }

    /// Retires the listeners bound to `addrs` and tells `done` once every one is closed.
    fn remove_listeners(&mut self, addrs: &[SocketAddr], done: crossbeam_channel::Sender<usize>) {
        let mut waiting = 0;
        for index in 0..self.reactor.listener_count() {
            if !self.reactor.listener_addr(index).is_some_and(|a| addrs.contains(&a)) {
                continue;
            }
            if self.reactor.retire(index) {
                self.retire_listener(index);
            } else {
                waiting += 1;
            }
        }
        match waiting {
            0 => drop(done.send(self.ctx.id)),
            _ => self.removal = Some((done, waiting)),
        }
    }

    /// A retiring listener has stopped accepting: it is drained and closed.
    pub fn retired(&mut self, index: usize) {
        self.retire_listener(index);
        if let Some((done, left)) = self.removal.take() {
            match left {
                0 | 1 => drop(done.send(self.ctx.id)),
                _ => self.removal = Some((done, left - 1)),
            }
        }
    }

    /// Admits the connections already queued on a retiring listener (decided by the tables
    /// in force), then closes it.
    fn retire_listener(&mut self, index: usize) {
        self.forget_listener(index);
        let Some(bound) = self.reactor.listener_addr(index) else { return };
        loop {
            match self.reactor.accept_now(index) {
                Ok((fd, peer)) => {
                    if let Err(parked) = self.admit(Parked { fd, index, bound, peer: Some(peer) }) {
                        self.parked.push_back(parked);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.reactor.close_listener(index);
    }

    /// Whether the worker has finished draining; at the deadline, cuts what is left.
    fn drained(&mut self) -> bool {
        let Some(deadline) = self.draining else { return false };
        if self.now >= deadline {
            for id in self.conns.ids() {
                let Some(conn) = self.conns.get_mut(id) else { continue };
                conn.session.stop();
                self.run(id);
            }
        }
        self.conns.is_empty()
    }
}
