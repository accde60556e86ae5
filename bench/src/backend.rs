//! In-process loopback backends: bulk sink/source, echo, fixed reply, and hold.
//!
//! Each [`Backend`] is one listener and one thread running a mio loop; dropping the handle
//! stops the thread and closes every connection. The measuring side reads [`BackendStats`]:
//! accepted and open counts for all kinds, and per-connection byte counters for bulk
//! connections, in accept order, so a scenario can pick out the connections it opened.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::error::{io_context, BenchError, Result};
use crate::net;
use crate::session::{
    BulkSession, EchoSession, HoldSession, Pump, ReplySession, StreamCounters, CHUNK,
};
use crate::slots::Slots;
use crate::timeline;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_SESSION: usize = 2;
const EVENTS: usize = 1024;

/// What a backend does with each accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Reads and discards everything; also sends an endless stream if `send`.
    Bulk { send: bool },
    /// Echoes every byte back.
    Echo,
    /// Reads `request` bytes, writes `reply` bytes, closes first.
    Reply { request: usize, reply: usize },
    /// Holds the connection open until the peer closes it.
    Hold,
}

impl Behaviour {
    fn name(self) -> &'static str {
        match self {
            Behaviour::Bulk { .. } => "bulk",
            Behaviour::Echo => "echo",
            Behaviour::Reply { .. } => "reply",
            Behaviour::Hold => "hold",
        }
    }
}

/// Counters a backend keeps for the measuring side.
#[derive(Debug, Default)]
pub struct BackendStats {
    accepted: AtomicU64,
    open: AtomicU64,
    accept_errors: AtomicU64,
    streams: Mutex<Vec<Arc<StreamCounters>>>,
}

impl BackendStats {
    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections currently open.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Failed accepts (for example, out of file descriptors).
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }

    /// Number of bulk connections accepted so far.
    pub fn stream_count(&self) -> usize {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Counters of the bulk connections accepted from position `first` on.
    pub fn streams_from(&self, first: usize) -> Vec<Arc<StreamCounters>> {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.get(first..).map(<[_]>::to_vec).unwrap_or_default()
    }

    fn register_stream(&self) -> Arc<StreamCounters> {
        let counters = Arc::new(StreamCounters::default());
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::clone(&counters));
        counters
    }

    /// Waits until at least `count` connections have been accepted, or `limit` passes.
    pub fn wait_accepted(&self, count: u64, limit: Duration) -> Result<()> {
        let began = Instant::now();
        while self.accepted() < count {
            if began.elapsed() >= limit {
                return Err(BenchError::Incomplete {
                    reached: self.accepted(),
                    wanted: count,
                    waited: limit,
                });
            }
            timeline::pause(Duration::from_millis(2))?;
        }
        Ok(())
    }
}

/// A running backend; dropping it stops its thread and closes its connections.
pub struct Backend {
    addr: SocketAddr,
    behaviour: Behaviour,
    stats: Arc<BackendStats>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Backend {
    /// Binds `listen` (port 0 picks a free port) and starts serving.
    pub fn start(listen: SocketAddr, behaviour: Behaviour) -> Result<Backend> {
        let listener = TcpListener::from_std(net::listen(listen)?);
        let addr = listener.local_addr().map_err(io_context("backend local address"))?;
        let poll = Poll::new().map_err(io_context("backend poll"))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_context("backend waker"))?);
        let stats = Arc::new(BackendStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server {
            poll,
            listener,
            behaviour,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            sessions: Slots::default(),
            again: Vec::new(),
            scratch: vec![0; CHUNK],
            payload: vec![0x5a; CHUNK],
        };
        let thread = thread::Builder::new()
            .name(format!("backend-{}", behaviour.name()))
            .spawn(move || server.run())
            .map_err(io_context("spawning backend thread"))?;
        Ok(Backend { addr, behaviour, stats, stop, waker, thread: Some(thread) })
    }

    /// The address the backend listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the backend does with connections.
    pub fn behaviour(&self) -> Behaviour {
        self.behaviour
    }

    /// Live counters.
    pub fn stats(&self) -> &BackendStats {
        &self.stats
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    eprintln!("backend {} on {} failed: {e}", self.behaviour.name(), self.addr)
                }
                Err(_) => eprintln!("backend {} on {} panicked", self.behaviour.name(), self.addr),
            }
        }
    }
}

enum ServerSession {
    Bulk(BulkSession),
    Echo(EchoSession),
    Reply(ReplySession),
    Hold(HoldSession),
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    behaviour: Behaviour,
    stats: Arc<BackendStats>,
    stop: Arc<AtomicBool>,
    sessions: Slots<ServerSession>,
    again: Vec<usize>,
    scratch: Vec<u8>,
    payload: Vec<u8>,
}

impl Server {
    fn run(mut self) -> io::Result<()> {
        self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE)?;
        let mut events = Events::with_capacity(EVENTS);
        while !self.stop.load(Ordering::Relaxed) {
            let timeout = if self.again.is_empty() { None } else { Some(Duration::ZERO) };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let retry = std::mem::take(&mut self.again);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    Token(token) => self.pump(token - FIRST_SESSION),
                }
            }
            for index in retry {
                self.pump(index);
            }
        }
        Ok(())
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let index = self.sessions.next_index();
        let interest = match self.behaviour {
            Behaviour::Hold => Interest::READABLE,
            _ => Interest::READABLE | Interest::WRITABLE,
        };
        let token = Token(index + FIRST_SESSION);
        if self.poll.registry().register(&mut stream, token, interest).is_err() {
            self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let session = self.session_for(stream);
        self.sessions.insert(session);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
    }

    fn session_for(&self, stream: TcpStream) -> ServerSession {
        match self.behaviour {
            Behaviour::Bulk { send } => {
                ServerSession::Bulk(BulkSession::new(stream, send, self.stats.register_stream()))
            }
            Behaviour::Echo => ServerSession::Echo(EchoSession::new(stream)),
            Behaviour::Reply { request, reply } => {
                ServerSession::Reply(ReplySession::new(stream, request, reply))
            }
            Behaviour::Hold => ServerSession::Hold(HoldSession::new(stream)),
        }
    }

    fn pump(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else { return };
        let outcome = match session {
            ServerSession::Bulk(s) => s.pump(&mut self.scratch, &self.payload),
            ServerSession::Echo(s) => s.pump(),
            ServerSession::Reply(s) => s.pump(&mut self.scratch, &self.payload),
            ServerSession::Hold(s) => s.pump(&mut self.scratch),
        };
        match outcome {
            Pump::Idle => {}
            Pump::Again => self.again.push(index),
            Pump::Closed => self.close(index),
        }
    }

    fn close(&mut self, index: usize) {
        let Some(mut session) = self.sessions.remove(index) else { return };
        let stream = match &mut session {
            ServerSession::Bulk(s) => s.stream_mut(),
            ServerSession::Echo(s) => s.stream_mut(),
            ServerSession::Reply(s) => s.stream_mut(),
            ServerSession::Hold(s) => s.stream_mut(),
        };
        let _ = self.poll.registry().deregister(stream);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn echo_returns_what_was_sent() {
        let backend = Backend::start(local(), Behaviour::Echo).unwrap();
        let mut client = net::connect(backend.addr()).unwrap();
        let request: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let writer = {
            let mut client = client.try_clone().unwrap();
            let request = request.clone();
            thread::spawn(move || client.write_all(&request).unwrap())
        };
        let mut reply = vec![0; request.len()];
        client.read_exact(&mut reply).unwrap();
        writer.join().unwrap();
        assert_eq!(reply, request);
        assert_eq!(backend.stats().accepted(), 1);
    }

    #[test]
    fn reply_sends_fixed_size_then_end_of_stream() {
        let behaviour = Behaviour::Reply { request: 10, reply: 33 };
        let backend = Backend::start(local(), behaviour).unwrap();
        let mut client = net::connect(backend.addr()).unwrap();
        client.write_all(&[1; 10]).unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply.len(), 33);
    }

    #[test]
    fn hold_counts_open_connections_and_notices_close() {
        let backend = Backend::start(local(), Behaviour::Hold).unwrap();
        let clients: Vec<_> = (0..5).map(|_| net::connect(backend.addr()).unwrap()).collect();
        backend.stats().wait_accepted(5, Duration::from_secs(5)).unwrap();
        assert_eq!(backend.stats().open(), 5);
        drop(clients);
        let began = Instant::now();
        while backend.stats().open() > 0 && began.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(backend.stats().open(), 0);
    }

    #[test]
    fn bulk_sink_counts_bytes_per_connection() {
        let backend = Backend::start(local(), Behaviour::Bulk { send: false }).unwrap();
        let mut client = net::connect(backend.addr()).unwrap();
        client.write_all(&[7; 300_000]).unwrap();
        drop(client);
        let began = Instant::now();
        loop {
            let streams = backend.stats().streams_from(0);
            let got = streams.first().map_or(0, |s| s.received.load(Ordering::Relaxed));
            if got == 300_000 {
                break;
            }
            assert!(began.elapsed() < Duration::from_secs(5), "sink saw {got} bytes");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(backend.stats().streams_from(1).is_empty());
    }
}
