//! Sockets and socket options the relay needs that std does not offer: SO_REUSEPORT
//! listeners, SO_LINGER 0 (abortive close, so a reset is forwarded as a reset), SO_ERROR,
//! the addresses of an accepted socket, TCP_INFO.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sys::socket::sockopt;
use socket2::{Domain, Protocol, SockFilter, SockRef, Socket, TcpKeepalive, Type};

use crate::acl::silent::Instruction;

use crate::socket_options::{BackendBind, BackendSocket, SideOptions};

use super::syscall;

/// Accept backlog of a listener when it is bound; the service's `backlog` is set on it
/// before it accepts (the kernel caps either at net.core.somaxconn).
pub const LISTEN_BACKLOG: i32 = crate::socket_options::DEFAULT_BACKLOG as i32;

/// Opens a non-blocking, close-on-exec TCP listener with SO_REUSEADDR and SO_REUSEPORT, so
/// that each worker can hold its own listener on the same address and the kernel spreads
/// new connections between them. IPv6 listeners are IPv6-only. When an interface is named,
/// the listener is bound to it (SO_BINDTODEVICE, set before the bind: connections that
/// arrive on other interfaces never reach it).
pub fn bind_listener(addr: SocketAddr, interface: Option<&str>) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    bind_device(&socket, interface)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY: relayed segments leave at once, without a
    // setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Binds `socket` to `interface` (SO_BINDTODEVICE); nothing when none is named.
pub(super) fn bind_device(socket: &Socket, interface: Option<&str>) -> io::Result<()> {
    let Some(name) = interface else { return Ok(()) };
    socket
        .bind_device(Some(name.as_bytes()))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind to interface {name:?}: {e}")))
}

/// The interface a socket is bound to (SO_BINDTODEVICE), if any: read from the socket, so
/// a socket handed over by another process is told apart by what it is, not by a label.
pub fn bound_device(fd: BorrowedFd<'_>) -> io::Result<Option<String>> {
    let name = SockRef::from(&fd).device()?;
    Ok(name.map(|n| String::from_utf8_lossy(&n).into_owned()))
}

/// Makes the next close() of `fd` abortive: the peer receives an RST instead of a FIN.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO))
}

/// Reads and clears the pending error of a socket (SO_ERROR), e.g. the result of a
/// non-blocking connect.
pub fn take_socket_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    SockRef::from(&fd).take_error()
}

/// Sends a FIN: no more data will be written to `fd` (the read side stays open).
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).shutdown(std::net::Shutdown::Write)
}

/// The peer address of a connected socket.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    inet(SockRef::from(&fd).peer_addr()?)
}

/// The local address of a socket: for a socket accepted on a wildcard listener, the
/// address the client reached.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    inet(SockRef::from(&fd).local_addr()?)
}

fn inet(addr: socket2::SockAddr) -> io::Result<SocketAddr> {
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet socket"))
}

/// A new non-blocking, close-on-exec TCP socket with TCP_NODELAY (relayed segments leave at
/// once), for connecting to `addr`, with the options and the bind of `how`: a transparent
/// bind sets IP_TRANSPARENT (IPV6_TRANSPARENT) and binds the foreign address; a local one
/// sets IP_BIND_ADDRESS_NO_PORT and binds port 0, so the port is chosen at connect.
pub fn tcp_socket_for(addr: SocketAddr, how: &BackendSocket) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if !how.options.is_default() {
        set_side_options(socket.as_fd(), &how.options)?;
    }
    match how.bind {
        None => {}
        Some(BackendBind::Transparent(from)) => {
            match from {
                SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
            socket.bind(&from.into())?;
        }
        Some(BackendBind::Local(ip)) => {
            nix::sys::socket::setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
    }
    Ok(socket)
}

/// Sets one side's TCP options on a socket, every one of them, so that a listener whose
/// service dropped an option loses it too (accepted sockets inherit the listener's
/// keepalive settings and user timeout).
pub fn set_side_options(fd: BorrowedFd<'_>, options: &SideOptions) -> io::Result<()> {
    let socket = SockRef::from(&fd);
    match options.keepalive {
        Some(k) => {
            let params = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            socket.set_tcp_keepalive(&params)?;
        }
        None => socket.set_keepalive(false)?,
    }
    socket.set_tcp_user_timeout(options.user_timeout)
}

/// Attaches a classic BPF socket filter (SO_ATTACH_FILTER, replacing any before it), or
/// with `None` detaches the one it has. On a listening TCP socket the filter sees the SYNs.
pub fn set_filter(fd: BorrowedFd<'_>, program: Option<&[Instruction]>) -> io::Result<()> {
    let socket = SockRef::from(&fd);
    let Some(program) = program else {
        return match socket.detach_filter() {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        };
    };
    let code: Vec<SockFilter> =
        program.iter().map(|i| SockFilter::new(i.code, i.jt, i.jf, i.k)).collect();
    socket.attach_filter(&code)
}

/// Packets the kernel dropped at this socket (SO_MEMINFO, SK_MEMINFO_DROPS): on a listener,
/// those its socket filter dropped and those that found its accept queue full.
pub fn socket_drops(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SK_MEMINFO_VARS: the kernel fills at most `len` bytes of its nine counters.
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `fd` is borrowed from its owner for the call; `info` and `len` live on this
    // stack for the call and `len` is the size of `info`, beyond which the kernel never
    // writes.
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        ))
    }?;
    Ok(info[libc::SK_MEMINFO_DROPS as usize])
}

/// Sets the accept backlog of a listening socket (listen(2) again: the queue and what it
/// holds stay).
pub fn set_backlog(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    SockRef::from(&fd).listen(backlog.min(i32::MAX as u32) as i32)
}

/// Segments the socket has received so far (TCP_INFO `tcpi_segs_in`, Linux 4.2+): how many
/// packets a stream took, for checking that the relay does not split what could go as one.
pub fn segments_in(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data, all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed from its owner for the call; `info` and `len` live on this
    // stack for the call and `len` is the size of `info`, beyond which the kernel never
    // writes.
    unsafe {
        syscall!(getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        ))
    }?;
    Ok(info.tcpi_segs_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_bound_to_an_interface_says_so_and_others_do_not() {
        use std::os::fd::AsFd;
        let on_lo = bind_listener("127.0.0.1:0".parse().unwrap(), Some("lo")).unwrap();
        assert_eq!(bound_device(on_lo.as_fd()).unwrap().as_deref(), Some("lo"));
        let anywhere = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert_eq!(bound_device(anywhere.as_fd()).unwrap(), None);
        let missing = bind_listener("127.0.0.1:0".parse().unwrap(), Some("nosuchif0"));
        let message = missing.unwrap_err().to_string();
        assert!(message.contains("\"nosuchif0\""), "{message}");
    }

    fn keepalive() -> SideOptions {
        use crate::socket_options::Keepalive;
        let secs = std::time::Duration::from_secs;
        SideOptions {
            keepalive: Some(Keepalive { idle: secs(75), interval: secs(15), count: 4 }),
            user_timeout: Some(std::time::Duration::from_millis(12_500)),
        }
    }

    /// Client options are set on the listener: accepted sockets inherit them, read back
    /// from the accepted socket with getsockopt; setting the defaults again clears them.
    #[test]
    fn accepted_sockets_inherit_the_listeners_keepalive_and_user_timeout() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        set_side_options(listener.as_fd(), &keepalive()).unwrap();
        set_backlog(listener.as_fd(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap().as_secs(), 75);
        assert_eq!(s.tcp_keepalive_interval().unwrap().as_secs(), 15);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(std::time::Duration::from_millis(12_500)));
        set_side_options(listener.as_fd(), &SideOptions::default()).unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!SockRef::from(&accepted).keepalive().unwrap());
        assert_eq!(SockRef::from(&accepted).tcp_user_timeout().unwrap(), None);
    }

    /// A listen backlog set again holds: connections beyond it wait unanswered (the kernel
    /// accepts backlog + 1 into the queue).
    #[test]
    fn a_backlog_set_on_a_listener_bounds_its_queue() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        set_backlog(listener.as_fd(), 2).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        let extra = Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None).unwrap();
        let _ = extra.connect(&addr.into());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(extra.peer_addr().is_err(), "a fourth connection waits beyond a backlog of 2");
        drop(queued);
    }

    #[test]
    fn backend_sockets_carry_their_sides_options_and_local_source() {
        let how = BackendSocket {
            options: keepalive(),
            bind: Some(BackendBind::Local("127.0.0.3".parse().unwrap())),
        };
        let socket = tcp_socket_for("127.0.0.1:9".parse().unwrap(), &how).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap().as_secs(), 75);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(std::time::Duration::from_millis(12_500))
        );
        let no_port = nix::sys::socket::getsockopt(&socket, sockopt::IpBindAddressNoPort).unwrap();
        assert!(no_port, "the port is left to the connect");
        let local = socket.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(local, "127.0.0.3:0".parse().unwrap());
    }

    #[test]
    fn a_transparent_backend_socket_binds_the_clients_address() {
        let client: SocketAddr = "192.0.2.7:40123".parse().unwrap();
        let how =
            BackendSocket { bind: Some(BackendBind::Transparent(client)), ..Default::default() };
        let socket = tcp_socket_for("127.0.0.1:9".parse().unwrap(), &how).unwrap();
        assert!(socket.ip_transparent_v4().unwrap());
        assert_eq!(socket.local_addr().unwrap().as_socket(), Some(client));
    }

    /// A listener whose filter drops a source answers its SYNs with nothing: the connect
    /// stays pending (no SYN-ACK, no RST), the drop is counted, and other sources connect.
    #[test]
    fn a_filtered_source_gets_no_answer_and_is_counted() {
        let mut deny = crate::acl::Rule::new("scan", crate::acl::Action::Deny { reset: false });
        deny.from = vec!["127.0.0.66/32".parse().unwrap()];
        deny.silent = true;
        let program = crate::acl::silent::program(&[deny], false).unwrap().unwrap();
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        set_filter(listener.as_fd(), Some(&program)).unwrap();
        let addr = listener.local_addr().unwrap();
        let from = |ip: &str| {
            let s = Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None).unwrap();
            s.bind(&SocketAddr::new(ip.parse().unwrap(), 0).into()).unwrap();
            let _ = s.connect(&addr.into());
            s
        };
        let denied = from("127.0.0.66");
        let allowed = from("127.0.0.65");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(allowed.peer_addr().is_ok(), "an allowed source is connected");
        assert!(denied.peer_addr().is_err(), "the denied source is still waiting");
        assert_eq!(denied.take_error().unwrap().map(|e| e.kind()), None, "no reset either");
        assert!(socket_drops(listener.as_fd()).unwrap() >= 1, "its SYN was counted");
        set_filter(listener.as_fd(), None).unwrap();
        set_filter(listener.as_fd(), None).unwrap();
        let later = from("127.0.0.66");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(later.peer_addr().is_ok(), "served once the filter is gone");
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// One behaviour on both drivers: a backend socket has TCP_NODELAY from the moment it is
    /// made, before its connect, whichever driver connects it.
    #[test]
    fn backend_sockets_are_made_with_nodelay_before_they_connect() {
        let socket =
            tcp_socket_for("127.0.0.1:9".parse().unwrap(), &BackendSocket::default()).unwrap();
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.nonblocking().unwrap());
        assert!(socket.peer_addr().is_err(), "not connected yet");
    }

    /// Segments the receiver of 64 bytes and an end of stream gets, sent with `then`.
    fn segments_for_64_bytes_and_fin(then: crate::sys::Then) -> u32 {
        use std::io::Read;
        use std::os::fd::AsFd;
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        listener.set_nonblocking(false).unwrap();
        let mut receiver = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (sender, _) = listener.accept().unwrap();
        let before = segments_in(receiver.as_fd()).unwrap();
        assert_eq!(crate::sys::send(sender.as_fd(), &[1; 64], then).unwrap(), 64);
        shutdown_write(sender.as_fd()).unwrap();
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).unwrap();
        assert_eq!(got, [1; 64]);
        segments_in(receiver.as_fd()).unwrap() - before
    }

    #[test]
    fn bytes_sent_before_a_fin_leave_with_it_in_one_segment() {
        use crate::sys::Then;
        assert_eq!(segments_for_64_bytes_and_fin(Then::Wait), 2, "at once, then the FIN");
        assert_eq!(segments_for_64_bytes_and_fin(Then::Fin), 1, "held for the FIN");
    }
}
