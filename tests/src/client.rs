//! The client side of a test: connecting with bounded timeouts, reading a stream to its end
//! and saying how it ended (clean EOF or reset), closing abortively, and echo exchanges
//! (plain, or tagged by the backend that served them).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::payload::{Digest, Payload, Verifier};
use crate::sluice::SessionKey;

/// Read and write timeout on every test socket: no test blocks forever on a socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `addr` with timeouts set; panics with the address on failure.
pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// Connects to `addr` (giving up after 5 s) with timeouts set. A connection that the proxy
/// accepted and then reset before this call returned fails with ECONNRESET.
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    set_timeouts(&stream, IO_TIMEOUT);
    Ok(stream)
}

/// Connects to `addr` from a local address on `ip` (a kernel-chosen port), with timeouts
/// set; for a client address a test can tell apart, such as 127.0.0.2.
pub fn connect_from(ip: IpAddr, addr: SocketAddr) -> TcpStream {
    let connected = (|| -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
        socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        Ok(socket.into())
    })();
    let stream = connected.unwrap_or_else(|e| panic!("cannot connect from {ip} to {addr}: {e}"));
    set_timeouts(&stream, IO_TIMEOUT);
    stream
}

/// Sets both socket timeouts.
pub fn set_timeouts(stream: &TcpStream, timeout: Duration) {
    stream.set_read_timeout(Some(timeout)).expect("set_read_timeout");
    stream.set_write_timeout(Some(timeout)).expect("set_write_timeout");
}

/// Closes `stream` abortively: SO_LINGER 0, so the peer receives an RST, not a FIN.
pub fn abort(stream: TcpStream) {
    SockRef::from(&stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
    drop(stream);
}

/// How a stream ended for its reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A clean end of stream (FIN).
    Eof,
    /// ECONNRESET: the peer reset the connection.
    Reset,
    /// Nothing arrived within the read timeout.
    TimedOut,
    /// Any other error.
    Error(io::ErrorKind),
}

impl End {
    pub fn of(e: &io::Error) -> End {
        match e.kind() {
            io::ErrorKind::ConnectionReset => End::Reset,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => End::TimedOut,
            kind => End::Error(kind),
        }
    }
}

/// Everything a reader got from a stream until it ended.
#[derive(Debug, Clone)]
pub struct Drained {
    pub bytes: u64,
    pub sha256: Digest,
    pub end: End,
    /// When the end was observed.
    pub at: Instant,
    /// The first bytes received (up to 64 KiB), for content checks.
    pub head: Vec<u8>,
}

/// Bytes of the stream kept in [`Drained::head`].
const HEAD: usize = 64 * 1024;

/// Reads `stream` until EOF, an error, or a read timeout.
pub fn drain(stream: &mut impl Read) -> Drained {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut bytes = 0u64;
    let mut head = Vec::new();
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => {
                hasher.update(&buf[..n]);
                if head.len() < HEAD {
                    let take = n.min(HEAD - head.len());
                    head.extend_from_slice(&buf[..take]);
                }
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break End::of(&e),
        }
    };
    Drained { bytes, sha256: hasher.finalize().into(), end, at: Instant::now(), head }
}

/// Reads exactly `n` bytes; panics with what happened otherwise.
pub fn read_exactly(stream: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).unwrap_or_else(|e| panic!("expected {n} bytes: {e}"));
    buf
}

/// Sends `len` bytes of payload `seed` on `stream` from a second thread, then SHUT_WR, while
/// this thread reads the echo; `Ok` if exactly the payload came back, followed by a clean EOF.
pub fn echo_exchange(stream: TcpStream, seed: u64, len: u64) -> Result<(), String> {
    let mut writer = stream.try_clone().map_err(|e| format!("try_clone: {e}"))?;
    let sender = std::thread::Builder::new()
        .name("echo-writer".into())
        .stack_size(256 * 1024)
        .spawn(move || -> Result<(), String> {
            Payload::new(seed, len)
                .write_to(&mut writer, |_| {})
                .map_err(|e| format!("write: {e}"))?;
            writer.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))
        })
        .map_err(|e| format!("spawn writer: {e}"))?;
    let mut reader = stream;
    let mut verifier = Verifier::new(seed, len);
    let mut buf = vec![0; 64 * 1024];
    let end = loop {
        match reader.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => verifier.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break End::of(&e),
        }
    };
    let sent = sender.join().map_err(|_| "writer panicked".to_string())?;
    sent?;
    if end != End::Eof {
        return Err(format!("echo ended with {end:?} after {} bytes", verifier.received()));
    }
    verifier.finish()
}

/// Connects to an echo service at `addr` and checks a `len`-byte round trip (both
/// directions at once); panics otherwise. Returns the key of its session.
pub fn echo_round_trip(addr: SocketAddr, seed: u64, len: u64) -> SessionKey {
    let stream = connect(addr);
    let client = SessionKey::of(&stream);
    if let Err(e) = echo_exchange(stream, seed, len) {
        panic!("echo round trip of {len} bytes through {addr}: {e}");
    }
    client
}

/// Sends `payload` (small: it is written whole before anything is read) on a stream to a
/// [`crate::Backend::tagged_echo`] service, then SHUT_WR, and reads to EOF; the tag of the
/// backend that answered if exactly the tag and the payload came back.
pub fn tagged_exchange(mut stream: TcpStream, payload: &[u8]) -> Result<u8, String> {
    stream.write_all(payload).map_err(|e| format!("write: {e}"))?;
    stream.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::with_capacity(payload.len() + 1);
    stream.read_to_end(&mut back).map_err(|e| format!("read after {} bytes: {e}", back.len()))?;
    match back.split_first() {
        Some((&tag, echoed)) if echoed == payload => Ok(tag),
        Some((&tag, echoed)) => Err(format!(
            "backend {tag:?} echoed {} bytes that differ from the {} sent",
            echoed.len(),
            payload.len()
        )),
        None => Err("the stream ended with no byte".into()),
    }
}

/// Connects to a tagged echo service at `addr` and exchanges `payload`; panics on any
/// failure. Returns the tag of the backend that served it and the session key.
pub fn tagged_round_trip(addr: SocketAddr, payload: &[u8]) -> (u8, SessionKey) {
    let stream = connect(addr);
    let key = SessionKey::of(&stream);
    let tag = tagged_exchange(stream, payload)
        .unwrap_or_else(|e| panic!("tagged echo through {addr}: {e}"));
    (tag, key)
}

/// What a long-lived stream wrote and got back: bytes and their SHA-256.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamTotals {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// On a stream to an echo service: writes `chunk`-byte pieces of payload `seed` every
/// `step` until `stop`, then SHUT_WR, while reading the echo to its end; returns what was
/// written and what came back.
pub fn echo_until(
    mut stream: TcpStream,
    seed: u64,
    chunk: usize,
    step: Duration,
    stop: &crate::Stop,
) -> (StreamTotals, StreamTotals) {
    let mut writer = stream.try_clone().expect("try_clone");
    std::thread::scope(|scope| {
        let written = scope.spawn(move || {
            let mut hasher = Sha256::new();
            let mut payload = Payload::new(seed, u64::MAX);
            let mut piece = vec![0; chunk];
            let mut bytes = 0u64;
            while !stop.is_set() {
                payload.fill(&mut piece);
                writer.write_all(&piece).expect("long stream write");
                hasher.update(&piece);
                bytes += piece.len() as u64;
                std::thread::sleep(step);
            }
            writer.shutdown(std::net::Shutdown::Write).expect("long stream shutdown");
            StreamTotals { bytes, sha256: hasher.finalize().into() }
        });
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        let mut bytes = 0u64;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("long stream read after {bytes} bytes: {e}"),
            }
        }
        let received = StreamTotals { bytes, sha256: hasher.finalize().into() };
        (written.join().expect("writer"), received)
    })
}
