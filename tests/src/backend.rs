//! The servers behind sluice, all on loopback: a generic [`Backend`] that runs a handler per
//! connection, the common handlers (echo, tagged echo, sink, server-speaks-first, reset
//! mid-stream, streamer), and a [`Blackhole`] that never answers a SYN.
//!
//! Invariants: every accepted socket has [`IO_TIMEOUT`] set, so a handler thread ends by
//! itself; dropping a `Backend` stops its accept thread; handlers report through
//! [`Reports`], which a test waits on with a timeout.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::client::{abort, drain, set_timeouts, Drained, IO_TIMEOUT};
use crate::payload::{Digest, Payload};

/// Accept backlog of backend listeners: room for a thousand connects arriving at once.
const BACKLOG: i32 = 1024;
/// Stack of each connection thread; handlers keep their buffers on the heap.
const STACK: usize = 256 * 1024;

/// What handlers tell the test, in arrival order.
#[derive(Debug)]
pub struct Reports<T> {
    inner: Arc<(Mutex<Vec<T>>, Condvar)>,
}

impl<T> Clone for Reports<T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<T> Default for Reports<T> {
    fn default() -> Self {
        Self { inner: Arc::new((Mutex::new(Vec::new()), Condvar::new())) }
    }
}

impl<T: Clone> Reports<T> {
    pub fn push(&self, report: T) {
        let (list, changed) = &*self.inner;
        list.lock().expect("reports lock").push(report);
        changed.notify_all();
    }

    /// Waits until at least `n` reports have arrived or `timeout` has passed; returns what
    /// has arrived.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<T> {
        let (list, changed) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut guard = list.lock().expect("reports lock");
        while guard.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            guard = changed.wait_timeout(guard, left).expect("reports lock").0;
        }
        guard.clone()
    }

    /// The first report, waiting up to `timeout` for it.
    pub fn first(&self, timeout: Duration) -> Option<T> {
        self.wait_for(1, timeout).into_iter().next()
    }
}

/// Connections a [`Backend::holds`] keeps open.
#[derive(Debug, Clone, Default)]
pub struct Held(Arc<Mutex<Vec<TcpStream>>>);

impl Held {
    /// Connections held now.
    pub fn len(&self) -> usize {
        self.0.lock().expect("held lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every held connection.
    pub fn clear(&self) {
        self.0.lock().expect("held lock").clear();
    }
}

/// A loopback server that runs `handler` on its own thread for every accepted connection.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    /// The listening socket (a second handle), shut down to wake the accept loop.
    listener: Option<TcpListener>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Listens on 127.0.0.1 (a port the kernel picks) and serves every connection with
    /// `handler`.
    pub fn spawn<F>(handler: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Backend::spawn_on((Ipv4Addr::LOCALHOST, 0).into(), handler)
    }

    /// Like [`Backend::spawn`], on the given address (port 0: one the kernel picks).
    pub fn spawn_on<F>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = listen(addr, BACKLOG);
        let addr = listener.local_addr().expect("backend local_addr");
        let waker = listener.try_clone().ok();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::Builder::new()
                .name(format!("backend-{}", addr.port()))
                .spawn(move || accept_loop(&listener, &stop, &accepted, &handler))
                .expect("spawn backend accept thread")
        };
        Backend { addr, listener: waker, stop, accepted, thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Writes back every byte it reads; at the client's EOF, shuts down its own side.
    pub fn echo() -> Backend {
        Backend::spawn(|mut stream| {
            let mut reader = match stream.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            if io::copy(&mut reader, &mut stream).is_ok() {
                let _ = stream.shutdown(Shutdown::Write);
            }
        })
    }

    /// Writes `tag` as soon as it accepts, then echoes like [`Backend::echo`]: the first byte
    /// a client reads says which backend served it.
    pub fn tagged_echo(tag: u8) -> Backend {
        Backend::tagged_echo_on((Ipv4Addr::LOCALHOST, 0).into(), tag)
    }

    /// [`Backend::tagged_echo`] on the given address.
    pub fn tagged_echo_on(addr: SocketAddr, tag: u8) -> Backend {
        Backend::spawn_on(addr, move |mut stream| {
            let mut reader = match stream.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            if stream.write_all(&[tag]).is_err() {
                return;
            }
            if io::copy(&mut reader, &mut stream).is_ok() {
                let _ = stream.shutdown(Shutdown::Write);
            }
        })
    }

    /// Keeps every connection open, unread, with no thread left per connection, until
    /// [`Held::clear`] or the drop of both. For thousands of idle sessions.
    pub fn holds() -> (Backend, Held) {
        let held = Held::default();
        let keep = held.clone();
        let backend = Backend::spawn(move |stream| keep.0.lock().expect("held lock").push(stream));
        (backend, held)
    }

    /// Reads each connection to its end and reports count and SHA-256, then closes (FIN).
    pub fn sink() -> (Backend, Reports<Drained>) {
        let reports = Reports::default();
        let tx = reports.clone();
        let backend = Backend::spawn(move |mut stream| {
            let drained = drain(&mut stream);
            tx.push(drained);
        });
        (backend, reports)
    }

    /// Reads each connection to its end, reports every byte it received, then closes (FIN).
    pub fn recorder() -> (Backend, Reports<Vec<u8>>) {
        let reports = Reports::default();
        let tx = reports.clone();
        let backend = Backend::spawn(move |mut stream| {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            tx.push(bytes);
        });
        (backend, reports)
    }

    /// Writes `greeting` as soon as it accepts, before reading anything; then reads the
    /// connection to its end, reports it, and closes (FIN).
    pub fn speaks_first(greeting: Vec<u8>) -> (Backend, Reports<Drained>) {
        let reports = Reports::default();
        let tx = reports.clone();
        let backend = Backend::spawn(move |mut stream| {
            if stream.write_all(&greeting).is_err() {
                return;
            }
            tx.push(drain(&mut stream));
        });
        (backend, reports)
    }

    /// Writes `len` bytes of payload `seed`, then closes abortively (SO_LINGER 0, an RST)
    /// and reports the instant just before the close.
    pub fn resets_after(seed: u64, len: u64) -> (Backend, Reports<Instant>) {
        let reports = Reports::default();
        let tx = reports.clone();
        let backend = Backend::spawn(move |mut stream| {
            if Payload::new(seed, len).write_to(&mut stream, |_| {}).is_err() {
                return;
            }
            tx.push(Instant::now());
            abort(stream);
        });
        (backend, reports)
    }

    /// Streams `len` bytes of payload `seed`, counting progress in `written`, then closes
    /// (FIN) and reports the SHA-256 of what it sent.
    pub fn streams(seed: u64, len: u64, written: Arc<AtomicU64>) -> (Backend, Reports<Digest>) {
        let reports = Reports::default();
        let tx = reports.clone();
        let backend = Backend::spawn(move |mut stream| {
            let progress = |n| written.store(n, Ordering::Relaxed);
            if let Ok(digest) = Payload::new(seed, len).write_to(&mut stream, progress) {
                tx.push(digest);
            }
        });
        (backend, reports)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept: shutting a listening socket down makes accept() fail at
        // once (Linux), wherever the test stands, even outside the backend's network
        // namespace; a connection is the fallback.
        let woken = self
            .listener
            .take()
            .is_some_and(|l| socket2::SockRef::from(&l).shutdown(Shutdown::Both).is_ok());
        if !woken {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop<F>(
    listener: &TcpListener,
    stop: &AtomicBool,
    accepted: &AtomicUsize,
    handler: &Arc<F>,
) where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of fds or a connection reset before accept: try again shortly.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        set_timeouts(&stream, IO_TIMEOUT);
        let handler = handler.clone();
        let spawned = std::thread::Builder::new()
            .name("backend-conn".into())
            .stack_size(STACK)
            .spawn(move || handler(stream));
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A TCP listener on 127.0.0.1 with a kernel-chosen port and the given backlog.
fn listen(addr: SocketAddr, backlog: i32) -> TcpListener {
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let _ = socket.set_reuse_address(true);
    socket.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.listen(backlog).expect("listen");
    socket.into()
}

/// A backend that never completes a handshake: its listener's accept queue is full and never
/// drained, so the kernel drops every further SYN and a connect to it times out.
///
/// [`Blackhole::new`] proves it: it fills the queue until a probe connect times out.
#[derive(Debug)]
pub struct Blackhole {
    addr: SocketAddr,
    _listener: Socket,
    _queued: Vec<Socket>,
}

/// How long a probe waits for a handshake before the queue counts as full.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Probes before giving up: a backlog of 0 admits one connection, so two suffice.
const PROBES: usize = 8;

impl Blackhole {
    pub fn new() -> Blackhole {
        let listener =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        let any: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        listener.bind(&any.into()).expect("bind 127.0.0.1:0");
        listener.listen(0).expect("listen(0)");
        let addr = listener.local_addr().ok().and_then(|a| a.as_socket()).expect("local_addr");
        let mut queued = Vec::new();
        for _ in 0..PROBES {
            let probe =
                Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            match probe.connect_timeout(&SockAddr::from(addr), PROBE_TIMEOUT) {
                Ok(()) => queued.push(probe),
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) =>
                {
                    return Blackhole { addr, _listener: listener, _queued: queued };
                }
                Err(e) => panic!("blackhole probe to {addr} failed: {e}"),
            }
        }
        panic!("blackhole {addr}: {PROBES} connects completed; the kernel never dropped a SYN");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Default for Blackhole {
    fn default() -> Self {
        Self::new()
    }
}
