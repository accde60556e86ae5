//! Socket options the relay needs that std does not offer: SO_REUSEPORT listeners,
//! SO_LINGER 0 (abortive close, so a reset is forwarded as a reset) and SO_ERROR.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Accept backlog for every listener (the kernel caps it at net.core.somaxconn).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Opens a non-blocking, close-on-exec TCP listener with SO_REUSEADDR and SO_REUSEPORT, so
/// that each worker can hold its own listener on the same address and the kernel spreads
/// new connections between them. IPv6 listeners are IPv6-only.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY: relayed segments leave at once, without a
    // setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Makes the next close() of `fd` abortive: the peer receives an RST instead of a FIN.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    with_socket(fd, |s| s.set_linger(Some(std::time::Duration::ZERO)))
}

/// Reads and clears the pending error of a socket (SO_ERROR), e.g. the result of a
/// non-blocking connect.
pub fn take_socket_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    with_socket(fd, |s| s.take_error())
}

/// Sends a FIN: no more data will be written to `fd` (the read side stays open).
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    with_socket(fd, |s| s.shutdown(std::net::Shutdown::Write))
}

/// Turns off Nagle's algorithm, so relayed segments leave at once.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    with_socket(fd, |s| s.set_tcp_nodelay(true))
}

/// The peer address of a connected socket.
pub fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    with_socket(fd, |s| s.peer_addr())?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet socket"))
}

/// A new non-blocking, close-on-exec TCP socket for connecting to `addr`.
pub fn tcp_socket_for(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
}

fn with_socket<T>(fd: RawFd, f: impl FnOnce(&Socket) -> io::Result<T>) -> io::Result<T> {
    // SAFETY: the caller owns `fd` and keeps it open for this call; ManuallyDrop ensures
    // this temporary view never closes it.
    let socket = std::mem::ManuallyDrop::new(unsafe { Socket::from_raw_fd(fd) });
    f(&socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
