//! UDP sockets and batched datagram I/O: SO_REUSEPORT listening sockets, connected
//! upstream sockets, recvmmsg(2) into a reusable [`RecvBatch`] and sendmmsg(2) of many
//! datagrams, each with its own destination, in one call.
//!
//! Invariants: every socket is born non-blocking and close-on-exec; a [`RecvBatch`] owns
//! its buffers, addresses and headers, and rebuilds the kernel-facing pointers before
//! every call, so moving the batch never leaves a dangling pointer.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::syscall;

/// Opens a non-blocking, close-on-exec UDP socket bound to `addr` with SO_REUSEADDR and
/// SO_REUSEPORT, so that each worker holds its own socket on the same address and the
/// kernel spreads clients between them (by a hash of the 4-tuple: one client stays with
/// one worker). IPv6 sockets are IPv6-only.
pub fn bind_udp_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = udp_socket_for(addr)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A non-blocking, close-on-exec UDP socket connected to `backend` (on an ephemeral local
/// port): the kernel delivers it only the backend's datagrams, and reports ICMP errors
/// (port unreachable) as ECONNREFUSED on its next call.
pub fn connect_udp(backend: SocketAddr) -> io::Result<UdpSocket> {
    let socket = udp_socket_for(backend)?;
    socket.connect(&backend.into())?;
    Ok(socket.into())
}

fn udp_socket_for(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking().cloexec(), Some(Protocol::UDP))
}

/// One received datagram of a [`RecvBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub payload: &'a [u8],
    /// The sender (for unconnected sockets; `None` if the kernel gave no inet address).
    pub from: Option<SocketAddr>,
    /// The datagram did not fit the buffer (MSG_TRUNC): `payload` holds only its start.
    pub truncated: bool,
}

/// Buffers, addresses and headers for receiving up to `count` datagrams of up to `size`
/// bytes each with one recvmmsg(2).
pub struct RecvBatch {
    size: usize,
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("size", &self.size)
            .field("count", &self.headers.len())
            .finish()
    }
}

impl RecvBatch {
    /// Room for `count` datagrams (at least one) of `size` bytes each.
    pub fn new(count: usize, size: usize) -> Self {
        let count = count.max(1);
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero
        // bytes are valid values (null pointers, zero lengths).
        let (addr, iov, hdr) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed(), std::mem::zeroed()) };
        Self {
            size,
            bufs: vec![0; count * size],
            addrs: vec![addr; count],
            iovecs: vec![iov; count],
            headers: vec![hdr; count],
            received: 0,
        }
    }

    /// Receives as many datagrams as are queued on `fd`, up to the batch's count, without
    /// blocking; returns how many (an empty socket is `WouldBlock`).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.received = 0;
        let size = self.size;
        for (i, ((iov, hdr), addr)) in
            self.iovecs.iter_mut().zip(&mut self.headers).zip(&mut self.addrs).enumerate()
        {
            iov.iov_base = self.bufs[i * size..].as_mut_ptr().cast();
            iov.iov_len = size;
            hdr.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let n = self.headers.len() as libc::c_uint;
        // SAFETY: the caller owns `fd`. Each header points at this batch's own iovec,
        // address and buffer slice (`size` bytes inside `bufs`), all exclusively borrowed by
        // `&mut self` until the call returns; the kernel writes only within those lengths.
        let got = syscall!(recvmmsg(
            fd,
            self.headers.as_mut_ptr(),
            n,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut()
        ))?;
        self.received = got as usize;
        Ok(self.received)
    }

    /// How many datagrams the last [`recv`](Self::recv) returned.
    pub fn len(&self) -> usize {
        self.received
    }

    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    /// The `i`-th datagram of the last receive.
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let hdr = &self.headers[i];
        let len = (hdr.msg_len as usize).min(self.size);
        let payload = &self.bufs[i * self.size..i * self.size + len];
        let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        Datagram { payload, from: self.sender(i), truncated }
    }

    fn sender(&self, i: usize) -> Option<SocketAddr> {
        let len = self.headers[i].msg_hdr.msg_namelen as usize;
        let storage = &self.addrs[i];
        match storage.ss_family as libc::c_int {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, length checked)
                // into this storage, which is aligned and large enough for any address.
                let a = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a sockaddr_in6 (family AF_INET6, length checked).
                let a = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                let port = u16::from_be(a.sin6_port);
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip,
                    port,
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// One datagram to send: its payload and, on an unconnected socket, its destination.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub payload: &'a [u8],
    pub to: Option<&'a SockAddr>,
}

/// Most datagrams passed to one sendmmsg(2).
pub const SEND_BATCH: usize = 64;

/// Sends datagrams on a non-blocking socket with as few sendmmsg(2) calls as possible;
/// returns how many left. Stops at the first error (a full socket buffer is `WouldBlock`):
/// an error after some datagrams left is reported as the count that did.
pub fn send_batch(fd: RawFd, datagrams: &[Outgoing<'_>]) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in datagrams.chunks(SEND_BATCH) {
        match send_chunk(fd, chunk) {
            Ok(n) => {
                sent += n;
                if n < chunk.len() {
                    return Ok(sent);
                }
            }
            Err(e) if sent == 0 => return Err(e),
            Err(_) => return Ok(sent),
        }
    }
    Ok(sent)
}

fn send_chunk(fd: RawFd, chunk: &[Outgoing<'_>]) -> io::Result<usize> {
    // SAFETY: iovec and mmsghdr are plain C structs; all-zero is valid (null, zero lengths).
    let (iov, hdr): (libc::iovec, libc::mmsghdr) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut iovecs = [iov; SEND_BATCH];
    let mut headers = [hdr; SEND_BATCH];
    for (i, d) in chunk.iter().enumerate() {
        iovecs[i].iov_base = d.payload.as_ptr() as *mut libc::c_void;
        iovecs[i].iov_len = d.payload.len();
    }
    for (i, d) in chunk.iter().enumerate() {
        let h = &mut headers[i].msg_hdr;
        if let Some(to) = d.to {
            h.msg_name = to.as_ptr() as *mut libc::c_void;
            h.msg_namelen = to.len();
        }
        h.msg_iov = &mut iovecs[i];
        h.msg_iovlen = 1;
    }
    let n = chunk.len() as libc::c_uint;
    // SAFETY: the caller owns `fd`. Every header points at an iovec on this stack frame and
    // at a payload and address borrowed from `chunk` for the duration of the call; the
    // kernel only reads them (sendmmsg writes nothing but `msg_len`).
    let sent =
        syscall!(sendmmsg(fd, headers.as_mut_ptr(), n, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL))?;
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_receives_many_senders_and_flags_truncation() {
        let server = bind_udp_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let clients: Vec<UdpSocket> =
            (0..5).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&vec![i as u8; 10 + i * 30], addr).unwrap();
        }
        let mut batch = RecvBatch::new(8, 64);
        let mut got = Vec::new();
        for _ in 0..100 {
            match batch.recv(server.as_raw_fd()) {
                Ok(n) => (0..n).for_each(|i| {
                    let d = batch.get(i);
                    got.push((d.from.unwrap(), d.payload.to_vec(), d.truncated));
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got.len() < 5 => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), 5);
        for (i, c) in clients.iter().enumerate() {
            let (_, payload, truncated) =
                got.iter().find(|g| g.0 == c.local_addr().unwrap()).unwrap();
            assert_eq!(*truncated, 10 + i * 30 > 64, "client {i}");
            assert_eq!(payload.len(), (10 + i * 30).min(64));
            assert!(payload.iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn ipv6_senders_are_reported() {
        let Ok(server) = bind_udp_reuseport("[::1]:0".parse().unwrap()) else {
            println!("skipped: no IPv6 loopback");
            return;
        };
        let client = UdpSocket::bind("[::1]:0").unwrap();
        client.send_to(b"six", server.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(4, 16);
        for _ in 0..200 {
            if let Ok(1) = batch.recv(server.as_raw_fd()) {
                let d = batch.get(0);
                assert_eq!((d.payload, d.from), (&b"six"[..], Some(client.local_addr().unwrap())));
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("nothing received");
    }

    #[test]
    fn send_batch_reaches_each_destination() {
        let sender = bind_udp_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let receivers: Vec<UdpSocket> =
            (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SockAddr> =
            receivers.iter().map(|r| SockAddr::from(r.local_addr().unwrap())).collect();
        let payloads: Vec<Vec<u8>> = (0..3).map(|i| vec![b'a' + i as u8; 100]).collect();
        let out: Vec<Outgoing<'_>> =
            (0..3).map(|i| Outgoing { payload: &payloads[i], to: Some(&addrs[i]) }).collect();
        assert_eq!(send_batch(sender.as_raw_fd(), &out).unwrap(), 3);
        for (i, r) in receivers.iter().enumerate() {
            r.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 200];
            let (n, from) = r.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &payloads[i][..]);
            assert_eq!(from, sender.local_addr().unwrap());
        }
    }
}
