//! The epoll driver: one mio `Poll` per worker, edge-triggered, over the worker's listeners
//! and both sockets of every session. Used where io_uring is unavailable or
//! `driver = "epoll"`. It is a [`Reactor`] of the shared [`Host`]: readiness of every socket
//! is always reported (so the core's requests for readiness need nothing), a connect is a
//! non-blocking `connect(2)` whose outcome the backend's first readiness brings, and a
//! listener is accepted on while its readiness lasts, a budget per turn.
//!
//! Each turn: wait for readiness (bounded by the host's next timer), hand the events to
//! the sessions, accept on ready listeners, then the host's end of turn (sessions that
//! yielded, pauses, timers, records).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::SockRef;

use super::conn::Conn;
use super::host::{Host, Parked, Reactor};
use super::inline::{connect_error, is_resource_exhaustion};
use super::slots::SlotId;
use crate::counters::WorkerStats;
use crate::session::ConnectError;
use crate::side::Side;
use crate::sys;
use crate::worker::WorkerContext;

/// Connections accepted per listener per turn before other work gets its turn.
const ACCEPT_BUDGET: usize = 64;

const WAKE: Token = Token(usize::MAX);
/// Listener tokens have the top bit set; session tokens never do.
const LISTENER_BIT: usize = 1 << 63;
/// Bits of a slot's generation a session token carries (a stale event for a reused slot is
/// recognised and dropped).
const GEN_MASK: u32 = (1 << 30) - 1;

/// The token of one socket of session `id`: its generation, slot and side.
fn session_token(id: SlotId, side: Side) -> Token {
    let gen = ((id.gen & GEN_MASK) as usize) << 33;
    Token(gen | (id.index as usize) << 1 | (side == Side::Backend) as usize)
}

/// The slot index, generation bits and side a session token names.
fn session_of(token: usize) -> (u32, u32, Side) {
    let side = if token & 1 == 1 { Side::Backend } else { Side::Client };
    ((token >> 1) as u32, (token >> 33) as u32 & GEN_MASK, side)
}

struct Listener {
    socket: TcpListener,
    addr: SocketAddr,
}

/// The epoll half of a worker: its poller and listeners.
pub(crate) struct Epoll {
    poll: Poll,
    /// Indexed by token; a removed listener leaves `None` so indices stay stable.
    listeners: Vec<Option<Listener>>,
    /// Listeners to accept on before the turn ends (ready, resumed, or with their budget
    /// used up).
    accepting: Vec<usize>,
    /// The list of the last turn, emptied, kept so that turns allocate nothing.
    accepted: Vec<usize>,
}

impl Epoll {
    pub(crate) fn new(ctx: &mut WorkerContext) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&ctx.wake.as_raw_fd()), WAKE, Interest::READABLE)?;
        let mut epoll =
            Epoll { poll, listeners: Vec::new(), accepting: Vec::new(), accepted: Vec::new() };
        for listener in std::mem::take(&mut ctx.listeners) {
            epoll.add_listener(listener)?;
        }
        Ok(epoll)
    }
}

impl Reactor for Epoll {
    type Extra = ();
    const EDGE: bool = true;

    fn watch(&mut self, id: SlotId, conn: &mut Conn<()>, side: Side) -> io::Result<()> {
        let Some(fd) = conn.socket(side) else { return Ok(()) };
        let interest = Interest::READABLE | Interest::WRITABLE;
        self.poll.registry().register(
            &mut SourceFd(&fd.as_raw_fd()),
            session_token(id, side),
            interest,
        )
    }

    fn await_ready(&mut self, _: SlotId, _: &mut Conn<()>, _: Side, _: bool) {
        // Edge-triggered readiness of both sockets is always reported.
    }

    fn connect(
        &mut self,
        id: SlotId,
        conn: &mut Conn<()>,
        addr: SocketAddr,
    ) -> Result<(), ConnectError> {
        let Some(backend) = conn.backend.as_ref() else { return Err(ConnectError::NoSocket) };
        match SockRef::from(backend).connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.raw_os_error().map_or(ConnectError::Refused, connect_error)),
        }
        // The backend's first readiness brings the connect's outcome.
        self.watch(id, conn, Side::Backend).map_err(|e| match is_resource_exhaustion(&e) {
            true => ConnectError::NoSocket,
            false => ConnectError::Refused,
        })
    }

    fn abort_connect(&mut self, _: SlotId, _: &mut Conn<()>) -> bool {
        // Closing the socket ends the connect; nothing else refers to it.
        true
    }

    fn release(&mut self, _: SlotId, _: &mut Conn<()>) -> bool {
        // Closing the fds (when the session is freed) takes them out of the poll.
        true
    }

    fn listener_addr(&self, index: usize) -> Option<SocketAddr> {
        self.listeners.get(index)?.as_ref().map(|l| l.addr)
    }

    fn accept_on(&mut self, index: usize) {
        if !self.accepting.contains(&index) {
            self.accepting.push(index);
        }
    }

    fn stop_accepting(&mut self, _: usize) {
        // A paused listener is simply not accepted on: edge-triggered, it raises no event
        // for the connections already queued, so pausing costs nothing.
    }

    fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    fn accept_now(&mut self, index: usize) -> io::Result<(OwnedFd, SocketAddr)> {
        let Some(Some(listener)) = self.listeners.get(index) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        let (stream, peer) = listener.socket.accept()?;
        Ok((OwnedFd::from(stream), peer))
    }

    fn add_listener(&mut self, listener: std::net::TcpListener) -> io::Result<usize> {
        let addr = listener.local_addr()?;
        let mut socket = TcpListener::from_std(listener);
        let index = self.listeners.len();
        self.poll.registry().register(
            &mut socket,
            Token(LISTENER_BIT | index),
            Interest::READABLE,
        )?;
        self.listeners.push(Some(Listener { socket, addr }));
        Ok(index)
    }

    fn retire(&mut self, _: usize) -> bool {
        true
    }

    fn close_listener(&mut self, index: usize) {
        if let Some(mut l) = self.listeners.get_mut(index).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
    }

    fn close_listeners(&mut self) {
        for index in 0..self.listeners.len() {
            self.close_listener(index);
        }
    }
}

impl Host<Epoll> {
    /// The worker's loop, until it has drained.
    pub(crate) fn run_loop(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            match self.reactor.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKE => self.obey(),
                    Token(t) if t & LISTENER_BIT != 0 => self.try_accept(t & !LISTENER_BIT),
                    Token(t) => {
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        let writable =
                            event.is_writable() || event.is_write_closed() || event.is_error();
                        self.on_session(t, readable, writable, event.is_read_closed());
                    }
                }
            }
            let spare = std::mem::take(&mut self.reactor.accepted);
            let mut ready = std::mem::replace(&mut self.reactor.accepting, spare);
            for index in ready.drain(..) {
                self.accept(index);
            }
            self.reactor.accepted = ready;
            if self.end_turn() {
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if self.has_pending() || !self.reactor.accepting.is_empty() {
            return Some(Duration::ZERO);
        }
        // Round up so the loop never wakes a hair early and spins.
        let next = self.wake_at()?;
        Some(next.saturating_duration_since(Instant::now()) + Duration::from_micros(999))
    }

    fn on_session(&mut self, token: usize, readable: bool, writable: bool, hangup: bool) {
        let (index, gen, side) = session_of(token);
        let Some((id, conn)) = self.conns.at_mut(index) else { return };
        if id.gen & GEN_MASK != gen {
            return;
        }
        if side == Side::Backend && conn.session.is_connecting() {
            match check_connect(conn) {
                Some(outcome) => self.connected(id, outcome),
                None => return,
            }
        }
        if readable {
            self.ready(id, side, false, hangup);
        }
        if writable {
            self.ready(id, side, true, false);
        }
        self.run(id);
    }

    /// Accepts on a listener, up to a budget, while the session caps have room.
    fn accept(&mut self, index: usize) {
        for _ in 0..ACCEPT_BUDGET {
            if self.draining.is_some()
                || self.full.is_paused(index)
                || self.backoff.is_paused(index)
            {
                return;
            }
            if !self.has_room(index) {
                return self.pause_full(index);
            }
            let Some(bound) = self.reactor.listener_addr(index) else { return };
            match self.reactor.accept_now(index) {
                Ok((fd, peer)) => {
                    if let Err(parked) = self.admit(Parked { fd, index, bound, peer: Some(peer) }) {
                        return self.park(parked);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    WorkerStats::add(&self.ctx.stats.accept_errors, 1);
                    if is_resource_exhaustion(&e) {
                        return self.pause_backoff(index, &e);
                    }
                }
            }
        }
        self.reactor.accept_on(index);
    }
}

/// The outcome of a connect that the backend's readiness reports, or `None` while it is
/// still under way. A connected socket relays even with an error pending (the relay then
/// forwards the data and the error); only an unconnected one is asked why.
fn check_connect(conn: &Conn<()>) -> Option<Result<(), ConnectError>> {
    let backend = conn.backend.as_ref()?.as_fd();
    match sys::peer_addr(backend) {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
            match sys::take_socket_error(backend) {
                Ok(None) => None,
                Ok(Some(e)) => {
                    Some(Err(e.raw_os_error().map_or(ConnectError::Refused, connect_error)))
                }
                Err(_) => Some(Err(ConnectError::Refused)),
            }
        }
        Err(_) => Some(Err(ConnectError::Refused)),
    }
}
