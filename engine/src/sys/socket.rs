//! Socket options the relay needs that std does not offer: SO_REUSEPORT listeners,
//! SO_LINGER 0 (abortive close, so a reset is forwarded as a reset) and SO_ERROR.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use super::syscall;

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

/// Segments the socket has received so far (TCP_INFO `tcpi_segs_in`, Linux 4.2+): how many
/// packets a stream took, for checking that the relay does not split what could go as one.
pub fn segments_in(fd: RawFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data, all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // `info` and `len` live on the stack for the duration of the call and `len` is their
    // size; the kernel writes at most `len` bytes. The caller owns `fd`.
    syscall!(getsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        (&mut info as *mut libc::tcp_info).cast(),
        &mut len,
    ))?;
    Ok(info.tcpi_segs_in)
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

    /// Segments the receiver of 64 bytes and an end of stream gets, sent with `then`.
    fn segments_for_64_bytes_and_fin(then: crate::sys::Then) -> u32 {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let listener = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let mut receiver = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (sender, _) = listener.accept().unwrap();
        let before = segments_in(receiver.as_raw_fd()).unwrap();
        assert_eq!(crate::sys::send(sender.as_raw_fd(), &[1; 64], then).unwrap(), 64);
        shutdown_write(sender.as_raw_fd()).unwrap();
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).unwrap();
        assert_eq!(got, [1; 64]);
        segments_in(receiver.as_raw_fd()).unwrap() - before
    }

    #[test]
    fn bytes_sent_before_a_fin_leave_with_it_in_one_segment() {
        use crate::sys::Then;
        assert_eq!(segments_for_64_bytes_and_fin(Then::Wait), 2, "at once, then the FIN");
        assert_eq!(segments_for_64_bytes_and_fin(Then::Fin), 1, "held for the FIN");
    }
}
