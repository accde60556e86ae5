//! The epoll driver: one mio `Poll` per worker, edge-triggered, over the worker's listeners
//! and its sessions' sockets. Used where io_uring is unavailable or `driver = "epoll"`.
//!
//! Each turn: wait for readiness (bounded by the next timer), handle events, continue the
//! work that was cut short by a budget, then expire timers. Timers are a heap with one live
//! entry per session; a session's deadline moves lazily (checked when its entry pops).

mod conn;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use self::conn::{Conn, Pump};
use super::buffers::BufferPool;
use super::is_connect_failure;
use super::peek::{self, Peeked, Start};
use super::schedule::{AcceptBackoff, Deadlines, FullPause};
use super::slots::{SlotId, Slots};
use crate::events::{RecordKind, WorkerStats};
use crate::session::{CloseReason, Direction, Due, Phase, Side};
use crate::worker::{self, Admission, Command, LiveSession, Refusal, WorkerContext};

/// Connections accepted per listener per turn before other work gets its turn.
const ACCEPT_BUDGET: usize = 64;
/// How often sessions are scanned for due interim records.
const REPORT_SCAN: Duration = Duration::from_secs(1);

const WAKE: Token = Token(usize::MAX);
const LISTENER_BASE: usize = 1 << 40;

fn session_token(id: SlotId, side: Side) -> Token {
    Token(((id.index as usize) << 1) | (side == Side::Backend) as usize)
}

/// Readiness to act on for one token.
#[derive(Debug, Clone, Copy)]
struct Ready {
    token: Token,
    readable: bool,
    writable: bool,
}

struct Listener {
    socket: TcpListener,
    addr: SocketAddr,
}

/// A connection accepted while a session cap was full (another worker took the last place
/// between the check and the accept): it waits here, unread, as it would in the backlog.
struct Parked {
    stream: TcpStream,
    client: SocketAddr,
    listener: SocketAddr,
    index: usize,
}

pub(crate) fn run(ctx: WorkerContext) -> io::Result<()> {
    let (id, startup) = (ctx.id, ctx.startup.clone());
    let worker = EpollWorker::new(ctx)
        .inspect_err(|e| log::error!("worker {id}: cannot set up its poll: {e}"));
    let Some(worker) = startup.settle(worker) else { return Ok(()) };
    worker.run().inspect_err(|e| log::error!("worker {id}: poll failed: {e}"))
}

struct EpollWorker {
    ctx: WorkerContext,
    poll: Poll,
    /// Indexed by token; a removed listener leaves `None` so indices stay stable.
    listeners: Vec<Option<Listener>>,
    conns: Slots<Conn>,
    deadlines: Deadlines,
    pending: Vec<Ready>,
    backoff: AcceptBackoff,
    full: FullPause,
    parked: std::collections::VecDeque<Parked>,
    pool: BufferPool,
    /// Where ClientHellos are peeked at.
    scratch: Box<[u8]>,
    draining: Option<Instant>,
    /// When sessions are next scanned for due interim records.
    next_report_scan: Instant,
    now: Instant,
}

impl EpollWorker {
    fn new(mut ctx: WorkerContext) -> io::Result<Self> {
        let poll = Poll::new()?;
        let registry = poll.registry();
        registry.register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&*ctx.wake)),
            WAKE,
            Interest::READABLE,
        )?;
        let mut listeners = Vec::new();
        for (i, std_listener) in std::mem::take(&mut ctx.listeners).into_iter().enumerate() {
            let addr = std_listener.local_addr()?;
            let mut socket = TcpListener::from_std(std_listener);
            registry.register(&mut socket, Token(LISTENER_BASE + i), Interest::READABLE)?;
            listeners.push(Some(Listener { socket, addr }));
        }
        let pool = BufferPool::new(ctx.buffer_size);
        Ok(Self {
            ctx,
            poll,
            listeners,
            conns: Slots::default(),
            deadlines: Deadlines::default(),
            pending: Vec::new(),
            backoff: AcceptBackoff::default(),
            full: FullPause::default(),
            parked: Default::default(),
            pool,
            scratch: peek::scratch(),
            draining: None,
            next_report_scan: Instant::now() + REPORT_SCAN,
            now: Instant::now(),
        })
    }

    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.now = Instant::now();
            for event in events.iter() {
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                let writable = event.is_writable() || event.is_write_closed() || event.is_error();
                self.dispatch(Ready { token: event.token(), readable, writable });
            }
            for ready in std::mem::take(&mut self.pending) {
                self.dispatch(ready);
            }
            self.resume_paused();
            self.resume_full();
            self.expire_timers();
            self.report_interim();
            self.ctx.events.flush_if_due(self.now);
            if self.drained() {
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        let next = [
            self.deadlines.next(),
            self.backoff.next(),
            self.full.next(),
            self.draining,
            Some(self.next_report_scan),
            self.ctx.events.flush_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        // Round up so the loop never wakes a hair early and spins.
        let wait = next.saturating_duration_since(Instant::now());
        Some(wait + Duration::from_micros(999))
    }

    fn dispatch(&mut self, ready: Ready) {
        match ready.token {
            WAKE => self.on_wake(),
            Token(t) if t >= LISTENER_BASE => self.accept(t - LISTENER_BASE),
            Token(t) => self.on_session(t, ready),
        }
    }

    fn on_wake(&mut self) {
        self.ctx.wake.drain();
        while let Ok(command) = self.ctx.commands.try_recv() {
            match command {
                Command::Drain { deadline } => self.start_drain(deadline),
                Command::RemoveListeners { addrs, done } => {
                    for index in 0..self.listeners.len() {
                        if self.listeners[index].as_ref().is_some_and(|l| addrs.contains(&l.addr)) {
                            self.retire_listener(index);
                        }
                    }
                    let _ = done.send(self.ctx.id);
                }
                Command::Snapshot { limit, reply } => {
                    let _ = reply.send(self.snapshot(limit));
                }
                Command::AddListeners { listeners } => {
                    for listener in listeners {
                        self.add_listener(listener);
                    }
                }
            }
        }
    }

    fn add_listener(&mut self, listener: std::net::TcpListener) {
        let Ok(addr) = listener.local_addr() else { return };
        let mut socket = TcpListener::from_std(listener);
        let token = Token(LISTENER_BASE + self.listeners.len());
        if let Err(e) = self.poll.registry().register(&mut socket, token, Interest::READABLE) {
            log::error!("worker {}: cannot watch new listener {addr}: {e}", self.ctx.id);
            return;
        }
        self.listeners.push(Some(Listener { socket, addr }));
        // Connections may have queued between bind and registration.
        self.accept(self.listeners.len() - 1);
    }

    /// Admits the connections already queued on a listener, then closes it.
    fn retire_listener(&mut self, index: usize) {
        while let Some(listener) = &self.listeners[index] {
            match listener.socket.accept() {
                Ok((stream, client)) => {
                    let addr = listener.addr;
                    if let Err(parked) =
                        self.admit(Parked { stream, client, listener: addr, index })
                    {
                        self.parked.push_back(parked);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if let Some(mut l) = self.listeners[index].take() {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
        self.backoff.forget(index);
        self.full.forget(index);
    }

    fn start_drain(&mut self, deadline: Instant) {
        for mut l in self.listeners.drain(..).flatten() {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
        self.backoff.clear();
        self.full.clear();
        self.parked.clear();
        self.draining = Some(deadline);
    }

    /// Whether the worker has finished draining; cuts what is left at the deadline.
    fn drained(&mut self) -> bool {
        let Some(deadline) = self.draining else { return false };
        if self.now >= deadline {
            for id in self.conns.ids() {
                self.close(id, CloseReason::Shutdown);
            }
        }
        self.conns.is_empty()
    }

    /// Accepts on a listener, up to a budget, while the session caps have room. A paused
    /// listener is left alone: its connections wait in the kernel's backlog, and being
    /// edge-triggered it raises no event until a new one arrives.
    fn accept(&mut self, index: usize) {
        if self.backoff.is_paused(index) || self.full.is_paused(index) {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            let Some(Some(listener)) = self.listeners.get(index) else { return };
            let addr = listener.addr;
            if !worker::has_room(&self.ctx.tables.load(), &self.ctx.cap, addr) {
                return self.pause_full(index);
            }
            match listener.socket.accept() {
                Ok((stream, client)) => {
                    if let Err(parked) =
                        self.admit(Parked { stream, client, listener: addr, index })
                    {
                        self.parked.push_back(parked);
                        return self.pause_full(index);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_resource_exhaustion(&e) => {
                    WorkerStats::add(&self.ctx.stats.accept_errors, 1);
                    self.pause_accept(index, &e);
                    return;
                }
                Err(_) => WorkerStats::add(&self.ctx.stats.accept_errors, 1),
            }
        }
        self.pending.push(Ready {
            token: Token(LISTENER_BASE + index),
            readable: true,
            writable: false,
        });
    }

    fn listener_index(&self, addr: SocketAddr) -> Option<usize> {
        self.listeners.iter().position(|l| l.as_ref().is_some_and(|l| l.addr == addr))
    }

    fn pause_accept(&mut self, index: usize, error: &io::Error) {
        let Some(Some(listener)) = self.listeners.get(index) else { return };
        if self.backoff.pause(self.ctx.id, index, listener.addr, error, self.now) {
            WorkerStats::add(&self.ctx.stats.accept_backoffs, 1);
        }
    }

    fn resume_paused(&mut self) {
        for index in self.backoff.due(self.now) {
            self.accept(index);
        }
    }

    /// Stops accepting on listener `index` until a session cap has room again.
    fn pause_full(&mut self, index: usize) {
        if self.full.pause(index, self.now) {
            WorkerStats::add(&self.ctx.stats.accept_paused_full, 1);
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
            let Some(Some(listener)) = self.listeners.get(index) else { continue };
            let waiting = self.parked.iter().any(|p| p.index == index);
            if waiting || !worker::has_room(&self.ctx.tables.load(), &self.ctx.cap, listener.addr) {
                self.full.pause(index, self.now);
            } else {
                self.accept(index);
            }
        }
    }

    /// Admits an accepted connection; gives it back when a session cap is full.
    fn admit(&mut self, parked: Parked) -> Result<(), Parked> {
        let Parked { stream, client, listener, index } = parked;
        match Admission::decide(&self.ctx.tables, &self.ctx.cap, listener, client) {
            Ok(admission) => self.start(admission, stream),
            Err(Refusal::NoService) => {}
            Err(Refusal::Full) => return Err(Parked { stream, client, listener, index }),
        }
        Ok(())
    }

    fn start(&mut self, admission: Admission, stream: TcpStream) {
        WorkerStats::add(&self.ctx.stats.accepted, 1);
        WorkerStats::add(&self.ctx.stats.active, 1);
        let id = self.conns.insert(Conn::new(admission, stream, self.now));
        let conn = self.conns.get_mut(id).expect("just inserted");
        let token = session_token(id, Side::Client);
        if self
            .poll
            .registry()
            .register(&mut conn.client, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.close(id, CloseReason::LocalError);
            return;
        }
        match peek::start(&conn.admission, &mut conn.session, self.now) {
            Start::Decide => self.decide(id, None),
            // The client's readiness event (edge-triggered) will bring its first bytes.
            Start::Peek => self.rearm(id),
            Start::Reject => self.close(id, CloseReason::ProxyError),
        }
    }

    /// Peeks at the client's PROXY header and ClientHello; decides once they are read.
    fn peek(&mut self, id: SlotId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let fd = conn.client.as_raw_fd();
        match peek::peek_client(
            &mut conn.admission,
            &mut conn.session,
            fd,
            &mut self.scratch,
            self.now,
        ) {
            Peeked::Decide(sni) => self.decide(id, sni.as_deref()),
            Peeked::Wait | Peeked::NotReady => self.rearm(id),
            Peeked::Reset => self.close(id, CloseReason::ClientRst),
            Peeked::Reject => self.close(id, CloseReason::ProxyError),
        }
    }

    /// Asks the firewall; an allowed session starts connecting, a denied one is closed.
    fn decide(&mut self, id: SlotId, sni: Option<&str>) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let client = conn.client.as_raw_fd();
        if let Err(reason) =
            peek::decide(&mut conn.admission, &mut conn.session, client, sni, self.now)
        {
            return self.close(id, reason);
        }
        self.connect(id);
    }

    /// Starts the next connect attempt, walking the pool past backends that fail at once.
    fn connect(&mut self, id: SlotId) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        loop {
            let Phase::Connecting { attempt, .. } = conn.session.phase else { return };
            let Some(addr) = conn.admission.begin_attempt(attempt) else {
                let reason = conn.last_failure;
                self.close(id, reason);
                return;
            };
            match TcpStream::connect(addr) {
                Ok(mut stream) => {
                    let token = session_token(id, Side::Backend);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if self.poll.registry().register(&mut stream, token, interest).is_err() {
                        self.close(id, CloseReason::LocalError);
                        return;
                    }
                    conn.backend = Some(stream);
                    self.rearm(id);
                    return;
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    // Out of fds for the backend: close this client, and let the next
                    // ones wait in the backlog rather than be accepted only to be closed.
                    WorkerStats::add(&self.ctx.stats.backend_socket_errors, 1);
                    let listener = conn.admission.listener;
                    self.close(id, CloseReason::NoSocket);
                    if let Some(index) = self.listener_index(listener) {
                        self.pause_accept(index, &e);
                    }
                    return;
                }
                Err(_) => {
                    WorkerStats::add(&self.ctx.stats.connect_errors, 1);
                    conn.admission.attempt_failed();
                    conn.last_failure = CloseReason::ConnectRefused;
                    conn.session.retry_connect(now);
                }
            }
        }
    }

    /// The current connect attempt failed: drop its socket and try the next backend.
    fn connect_failed(&mut self, id: SlotId, reason: CloseReason) {
        WorkerStats::add(&self.ctx.stats.connect_errors, 1);
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        conn.admission.attempt_failed();
        if let Some(mut stream) = conn.backend.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.last_failure = reason;
        conn.session.retry_connect(now);
        self.connect(id);
    }

    fn on_session(&mut self, token: usize, ready: Ready) {
        let side = if token & 1 == 1 { Side::Backend } else { Side::Client };
        let Some((id, conn)) = self.conns.at_mut((token >> 1) as u32) else { return };
        match conn.session.phase {
            Phase::Peeking { .. } if side == Side::Client && ready.readable => {
                return self.peek(id)
            }
            Phase::Peeking { .. } => return,
            Phase::Connecting { .. } if side == Side::Backend => return self.check_connect(id),
            Phase::Connecting { .. } => return,
            Phase::Relaying => {}
        }
        let mut dirs = [None, None];
        if ready.readable {
            dirs[0] = Some(Direction::from_source(side));
        }
        if ready.writable {
            dirs[1] = Some(Direction::from_source(side.other()));
        }
        self.pump(id, dirs.into_iter().flatten());
    }

    fn check_connect(&mut self, id: SlotId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let Some(stream) = conn.backend.as_ref() else { return };
        // A connected socket relays, even with an error pending: the relay then forwards
        // the data and the error. Only an unconnected socket is asked why.
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => match stream.take_error() {
                Ok(None) => return,
                Ok(Some(e)) if !e.raw_os_error().is_some_and(is_connect_failure) => {
                    // It was accepted, then reset before this event was handled.
                    return self.close(id, CloseReason::BackendRst);
                }
                Ok(Some(_)) | Err(_) => {
                    return self.connect_failed(id, CloseReason::ConnectRefused)
                }
            },
            Err(_) => return self.connect_failed(id, CloseReason::ConnectRefused),
        }
        let _ = stream.set_nodelay(true);
        if let Err(reason) = peek::send_proxy_header(&conn.admission, stream.as_raw_fd()) {
            return self.close(id, reason);
        }
        if let Phase::Connecting { since, .. } = conn.session.phase {
            conn.admission.connected(self.now.saturating_duration_since(since));
        }
        conn.session.connected(self.now);
        if conn.admission.tables.records.open {
            let record =
                conn.admission.record(RecordKind::Open, self.ctx.id, &conn.session, self.now);
            self.ctx.events.send(record);
        }
        self.pump(id, [Direction::Up, Direction::Down].into_iter());
    }

    fn pump(&mut self, id: SlotId, dirs: impl Iterator<Item = Direction>) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else { return };
        let mut again = false;
        for dir in dirs {
            match conn.pump(dir, &mut self.pool, now) {
                Pump::Idle | Pump::Done | Pump::Throttled => {}
                Pump::Capped => return self.close(id, CloseReason::ByteCap),
                Pump::Budget => again = true,
                Pump::Reset(side) => return self.close(id, CloseReason::reset_by(side)),
            }
        }
        if conn.session.is_finished() {
            let reason = conn.session.finish_reason();
            return self.close(id, reason);
        }
        if again {
            let token = session_token(id, Side::Client);
            self.pending.push(Ready { token, readable: true, writable: true });
            let token = session_token(id, Side::Backend);
            self.pending.push(Ready { token, readable: true, writable: true });
        }
        self.rearm(id);
    }

    /// Makes sure a timer entry exists at or before the session's deadline.
    fn rearm(&mut self, id: SlotId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        let timeouts = conn.admission.service().timeouts;
        let (deadline, _) = conn.session.deadline(&timeouts);
        self.deadlines.arm(id, &mut conn.armed, deadline);
    }

    fn expire_timers(&mut self) {
        while let Some((at, id)) = self.deadlines.pop_due(self.now) {
            let Some(conn) = self.conns.get_mut(id) else { continue };
            if conn.armed != Some(at) {
                continue;
            }
            let timeouts = conn.admission.service().timeouts;
            let (deadline, due) = conn.session.deadline(&timeouts);
            if deadline > self.now {
                self.deadlines.set(id, &mut conn.armed, deadline);
                continue;
            }
            conn.armed = None;
            match due {
                Due::DecideWithoutSni => self.decide(id, None),
                Due::NextBackend => self.connect_failed(id, CloseReason::ConnectTimeout),
                Due::Close(reason) => self.close(id, reason),
                Due::Resume => {
                    conn.session.resume(self.now);
                    self.pump(id, [Direction::Up, Direction::Down].into_iter());
                }
            }
        }
    }

    /// Sends an interim record for every long-lived session whose interval has passed.
    fn report_interim(&mut self) {
        if self.now < self.next_report_scan {
            return;
        }
        self.next_report_scan = self.now + REPORT_SCAN;
        let (worker, now) = (self.ctx.id, self.now);
        for id in self.conns.ids() {
            let Some(c) = self.conns.get_mut(id) else { continue };
            let Some(every) = c.admission.tables.records.interim else { continue };
            if c.session.take_interim(every, now) {
                let record = c.admission.record(RecordKind::Interim, worker, &c.session, now);
                self.ctx.events.send(record);
            }
        }
    }

    fn snapshot(&mut self, limit: usize) -> Vec<LiveSession> {
        let (worker, now) = (self.ctx.id, Instant::now());
        let mut out = Vec::new();
        for id in self.conns.ids().into_iter().take(limit) {
            if let Some(c) = self.conns.get_mut(id) {
                out.push(c.admission.live(worker, &c.session, now));
            }
        }
        out
    }

    fn close(&mut self, id: SlotId, reason: CloseReason) {
        let Some(mut conn) = self.conns.remove(id) else { return };
        self.deadlines.remove(id);
        conn.prepare_close(reason, &mut self.pool);
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut conn.client);
        if let Some(b) = conn.backend.as_mut() {
            let _ = registry.deregister(b);
        }
        let stats = &self.ctx.stats;
        stats.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        WorkerStats::add(&stats.closed, 1);
        WorkerStats::add(&stats.bytes_up, conn.session.up.bytes);
        WorkerStats::add(&stats.bytes_down, conn.session.down.bytes);
        let record = conn.admission.finish(self.ctx.id, &conn.session, reason, self.now);
        self.ctx.events.send(record);
        self.full.poke(self.now);
    }
}

/// Errors that mean the process is out of fds or memory: back off instead of spinning.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
