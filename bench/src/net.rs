//! Sockets as the benchmark uses them: loopback-only addresses, listeners with a deep
//! backlog, connects with a deadline, and nonblocking reads and writes that report
//! "would block" as `None` instead of an error.
//!
//! Invariant: no function here accepts or produces an address outside loopback, except
//! addresses of the veth topology's private network once this process has created that
//! topology (they exist only inside its own network namespaces); traffic never leaves the
//! machine. Command-line addresses are loopback only.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{BenchError, Result};
use crate::topology::in_veth_network;

/// Accept backlog of every in-process listener; matches the usual `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;
/// How long one client connect may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once the veth topology's namespaces exist.
static VETH_NETWORK_UP: AtomicBool = AtomicBool::new(false);

/// Lets sockets use the veth topology's private network from now on: call once its
/// namespaces exist.
pub fn allow_veth_network() {
    VETH_NETWORK_UP.store(true, Ordering::Relaxed);
}

/// Rejects any address outside 127.0.0.0/8 and ::1, but for the veth topology's private
/// network once it is up.
pub fn require_local(addr: SocketAddr) -> Result<SocketAddr> {
    let veth = VETH_NETWORK_UP.load(Ordering::Relaxed) && in_veth_network(addr.ip());
    if addr.ip().is_loopback() || veth {
        return Ok(addr);
    }
    Err(BenchError::NotLoopback(addr))
}

/// Parses a socket address for the command line and insists it is loopback.
pub fn parse_loopback(text: &str) -> std::result::Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|e| format!("{text}: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(BenchError::NotLoopback(addr).to_string());
    }
    Ok(addr)
}

/// A nonblocking listener with `SO_REUSEADDR` and a deep backlog.
pub fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let addr = require_local(addr)?;
    open_listener(addr).map_err(|source| BenchError::Listen { addr, source })
}

fn open_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A blocking connect bounded by [`CONNECT_TIMEOUT`], with `TCP_NODELAY` set.
pub fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let addr = require_local(addr)?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|source| BenchError::Connect { addr, source })?;
    stream.set_nodelay(true).map_err(|source| BenchError::Connect { addr, source })?;
    Ok(stream)
}

/// Connects and hands the stream over to mio, nonblocking.
pub fn connect_nonblocking(addr: SocketAddr) -> Result<mio::net::TcpStream> {
    let stream = connect(addr)?;
    stream.set_nonblocking(true).map_err(|source| BenchError::Connect { addr, source })?;
    Ok(mio::net::TcpStream::from_std(stream))
}

/// Reads once; `Ok(None)` means "would block", `Ok(Some(0))` means end of stream.
pub fn read_some(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match reader.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes once; `Ok(None)` means "would block".
pub fn write_some(writer: &mut impl Write, buf: &[u8]) -> io::Result<Option<usize>> {
    loop {
        match writer.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_pass() {
        assert!(parse_loopback("127.0.0.1:80").is_ok());
        assert!(parse_loopback("127.3.2.1:80").is_ok());
        assert!(parse_loopback("[::1]:80").is_ok());
        assert!(parse_loopback("10.0.0.1:80").is_err());
        assert!(parse_loopback("192.168.1.1:80").is_err());
        assert!(parse_loopback("[2001:db8::1]:80").is_err());
        assert!(parse_loopback("0.0.0.0:80").is_err());
        assert!(parse_loopback("localhost").is_err());
        assert!(parse_loopback("10.250.1.2:80").is_err(), "never from the command line");
    }

    #[test]
    fn veth_addresses_pass_only_once_the_topology_is_up() {
        // Tests share this process: only the order within this test is relied on.
        let veth: SocketAddr = "10.250.1.2:80".parse().unwrap();
        if !VETH_NETWORK_UP.load(Ordering::Relaxed) {
            assert!(require_local(veth).is_err());
        }
        allow_veth_network();
        assert!(require_local(veth).is_ok());
        assert!(require_local("10.251.1.2:80".parse().unwrap()).is_err());
        assert!(require_local("192.168.1.1:80".parse().unwrap()).is_err());
    }

    #[test]
    fn nonblocking_read_reports_would_block_as_none() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = connect(addr).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(read_some(&mut client, &mut buf).unwrap(), None);
    }
}
