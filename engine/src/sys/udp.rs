//! UDP sockets and batched datagram I/O: SO_REUSEPORT listening sockets, connected and
//! shared upstream sockets, recvmmsg(2) into a reusable [`RecvBatch`], and an [`Outbox`] that
//! sends datagrams held in a batch with sendmmsg(2), each message with its own destination,
//! source and, for runs of equal-sized datagrams of one flow, one UDP_SEGMENT (GSO) send.
//!
//! A socket on a wildcard address (a wildcard listener, a shared upstream socket) asks for
//! each datagram's destination (IP_PKTINFO, IPV6_RECVPKTINFO): [`Datagram::local`] is the
//! address it was sent to, and a message pushed with a `from` address leaves from it
//! (IP_PKTINFO / IPV6_PKTINFO on sendmmsg). A socket with UDP_GRO on may receive several
//! datagrams of one sender as one buffer ([`Datagram::segment`] is their size); the outbox
//! sends such a buffer on as one segmented message, or cut into datagrams without GSO.
//!
//! Invariants: every socket is born non-blocking and close-on-exec; a [`RecvBatch`] owns
//! its buffers, addresses, control buffers and headers, and an [`Outbox`] its headers,
//! iovecs, addresses and control buffers; both rebuild the kernel-facing pointers right
//! before each call, so moving them never leaves a dangling pointer, and an outbox's
//! iovecs point only into the batch borrowed for that call; control messages are read and
//! written as bytes, bounds-checked, in safe code.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::syscall;

/// `SOL_UDP` options of linux/udp.h, which the libc crate does not define for glibc.
const UDP_SEGMENT: i32 = 103;
const UDP_GRO: i32 = 104;
/// Most datagrams one segmented (UDP_SEGMENT) send carries: UDP_MAX_SEGMENTS of the
/// kernels that allow the fewest.
pub const MAX_SEGMENTS: usize = 64;
/// Most payload bytes of one segmented send (the largest IPv4 UDP payload).
const MAX_SEGMENTED_BYTES: usize = 65_507;
/// Receive buffer of a socket on which GRO may join datagrams: room for any aggregate.
pub const GRO_BUFFER: usize = 65_535;

/// Opens a non-blocking, close-on-exec UDP socket bound to `addr` with SO_REUSEADDR and
/// SO_REUSEPORT, so that each worker holds its own socket on the same address and the
/// kernel spreads clients between them (by a hash of the 4-tuple: one client stays with
/// one worker). IPv6 sockets are IPv6-only.
///
/// When an interface is named, the socket is bound to it (SO_BINDTODEVICE: datagrams that
/// arrive on other interfaces never reach it).
pub fn bind_udp_listener(addr: SocketAddr, interface: Option<&str>) -> io::Result<UdpSocket> {
    let socket = udp_socket_for(addr)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    super::socket::bind_device(&socket, interface)?;
    if addr.ip().is_unspecified() {
        set_pktinfo(&socket, addr)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn set_pktinfo(socket: &Socket, family: SocketAddr) -> io::Result<()> {
    let (level, option) = match family {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    };
    set_int_option(socket.as_fd(), level, option, 1)
}

/// Sets an integer socket option on `fd`.
fn set_int_option(fd: BorrowedFd<'_>, level: i32, option: i32, value: i32) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed, so open for the call; `value` lives on this stack frame for
    // the duration of the call, which only reads `len` bytes of it.
    unsafe {
        syscall!(setsockopt(fd.as_raw_fd(), level, option, (&value as *const i32).cast(), len))
    }
    .map(drop)
}

/// A non-blocking, close-on-exec UDP socket connected to `backend` (on an ephemeral local
/// port): the kernel delivers it only the backend's datagrams, and reports ICMP errors
/// (port unreachable) as ECONNREFUSED on its next call.
pub fn connect_udp(backend: SocketAddr) -> io::Result<UdpSocket> {
    let socket = udp_socket_for(backend)?;
    socket.connect(&backend.into())?;
    Ok(socket.into())
}

/// A non-blocking, close-on-exec UDP socket of `family`'s address family, bound to the
/// wildcard address on an ephemeral port and unconnected: shared by every flow of a worker
/// to one backend, each flow sending from its own local address ([`Outbox::push`] with a
/// `from`) and its replies told apart by the address they reach ([`Datagram::local`]).
/// ICMP errors queue on its error queue ([`recv_refusals`]); IP_FREEBIND lets an IPv6
/// flow leave from an address that is routed to this host but not configured on it.
pub fn bind_udp_shared(family: SocketAddr) -> io::Result<UdpSocket> {
    let any = match family {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = udp_socket_for(any)?;
    if any.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    set_pktinfo(&socket, any)?;
    let fd = socket.as_fd();
    let (level, recverr) = match any {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_RECVERR),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
    };
    set_int_option(fd, level, recverr, 1)?;
    set_int_option(fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 1)?;
    socket.bind(&any.into())?;
    Ok(socket.into())
}

/// Asks the kernel to join datagrams of one sender into one receive (UDP_GRO); false
/// where the kernel has no UDP GRO (before Linux 5.0).
pub fn enable_gro(socket: &UdpSocket) -> bool {
    set_int_option(socket.as_fd(), libc::SOL_UDP, UDP_GRO, 1).is_ok()
}

/// Whether this kernel takes segmented sends (UDP_SEGMENT, Linux 4.18 and later).
pub fn gso_supported() -> bool {
    let Ok(socket) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) else { return false };
    set_int_option(socket.as_fd(), libc::SOL_UDP, UDP_SEGMENT, 1200).is_ok()
}

/// Asks for a larger kernel receive buffer (capped by net.core.rmem_max), so a burst
/// queues instead of being dropped while the loop is busy elsewhere.
pub fn set_receive_buffer(socket: &UdpSocket, bytes: usize) -> io::Result<()> {
    socket2::SockRef::from(socket).set_recv_buffer_size(bytes)
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
    /// The local address it was sent to, on a wildcard socket (`None` elsewhere).
    pub local: Option<IpAddr>,
    /// Several datagrams joined by GRO: each this long but the last, which may be shorter.
    pub segment: Option<usize>,
}

impl Datagram<'_> {
    /// How many datagrams this buffer holds (more than one only when joined by GRO).
    pub fn count(&self) -> usize {
        match self.segment {
            Some(s) if s > 0 => self.payload.len().div_ceil(s).max(1),
            _ => 1,
        }
    }

    /// The size of its largest datagram.
    pub fn largest(&self) -> usize {
        self.segment.map_or(self.payload.len(), |s| s.min(self.payload.len()))
    }
}

/// Room for the control messages of one datagram: a packet info (IPv6's, the larger) and
/// a segment size, aligned as the kernel's `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// Bytes of a `cmsghdr` before its data (`CMSG_LEN(0)`).
// SAFETY: CMSG_LEN is arithmetic on its argument; it touches no memory.
const CMSG_HEADER: usize = unsafe { libc::CMSG_LEN(0) } as usize;
// SAFETY: as above, for CMSG_SPACE.
const PKTINFO_SPACE: usize =
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) } as usize;
// SAFETY: as above.
const INT_SPACE: usize = unsafe { libc::CMSG_SPACE(4) } as usize;
/// Bytes of control room per datagram: a packet info and an int (the GRO or GSO size).
const CONTROL_LEN: usize = PKTINFO_SPACE + INT_SPACE;
const WORD: usize = std::mem::size_of::<usize>();

/// The control messages in `bytes`, as (level, type, data).
fn control_messages(bytes: &[u8]) -> impl Iterator<Item = (i32, i32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + CMSG_HEADER > bytes.len() {
            return None;
        }
        let field = |o: usize, n: usize| bytes.get(at + o..at + o + n);
        let len = usize::from_ne_bytes(field(0, WORD)?.try_into().ok()?);
        let int = |o: usize| Some(i32::from_ne_bytes(field(o, 4)?.try_into().ok()?));
        let (level, kind) = (int(WORD)?, int(WORD + 4)?);
        let data = bytes.get(at + CMSG_HEADER..at + len.max(CMSG_HEADER))?;
        at += len.max(CMSG_HEADER).next_multiple_of(WORD);
        Some((level, kind, data))
    })
}

/// The destination address in a packet info message's data: the local address to answer
/// from, or with `header` the destination in the packet's header (the only one the kernel
/// fills in for an ICMP error; the two differ only for broadcasts).
fn pktinfo_destination(level: i32, kind: i32, data: &[u8], header: bool) -> Option<IpAddr> {
    match (level, kind) {
        // in_pktinfo: ipi_ifindex (4), ipi_spec_dst (4): the local address, ipi_addr (4):
        // the header's destination.
        (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
            let at = if header { 8 } else { 4 };
            let octets: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        // in6_pktinfo: ipi6_addr (16), ipi6_ifindex (4).
        (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
            let octets: [u8; 16] = data.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// Appends one control message at `at` in `buf`; returns where the next one goes.
fn put_control(buf: &mut [u8], at: usize, level: i32, kind: i32, data: &[u8]) -> usize {
    let len = CMSG_HEADER + data.len();
    buf[at..at + WORD].copy_from_slice(&len.to_ne_bytes());
    buf[at + WORD..at + WORD + 4].copy_from_slice(&level.to_ne_bytes());
    buf[at + WORD + 4..at + WORD + 8].copy_from_slice(&kind.to_ne_bytes());
    buf[at + CMSG_HEADER..at + len].copy_from_slice(data);
    at + len.next_multiple_of(WORD)
}

/// The control messages that make a message leave from `from` and, with `segment`, be cut
/// into datagrams of that size; their length in `buf`.
fn send_controls(buf: &mut Control, from: Option<IpAddr>, segment: Option<u16>) -> usize {
    buf.0 = [0; CONTROL_LEN];
    let mut at = 0;
    match from {
        // in_pktinfo with ipi_spec_dst = from (ifindex 0: the route decides).
        Some(IpAddr::V4(v4)) => {
            let mut d = [0u8; std::mem::size_of::<libc::in_pktinfo>()];
            d[4..8].copy_from_slice(&v4.octets());
            at = put_control(&mut buf.0, at, libc::IPPROTO_IP, libc::IP_PKTINFO, &d);
        }
        Some(IpAddr::V6(v6)) => {
            let mut d = [0u8; std::mem::size_of::<libc::in6_pktinfo>()];
            d[..16].copy_from_slice(&v6.octets());
            at = put_control(&mut buf.0, at, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &d);
        }
        None => {}
    }
    if let Some(size) = segment {
        at = put_control(&mut buf.0, at, libc::SOL_UDP, UDP_SEGMENT, &size.to_ne_bytes());
    }
    at
}

/// An inet address from a `sockaddr_storage` the kernel filled with `len` bytes.
fn inet_address(storage: &libc::sockaddr_storage, len: usize) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, length checked) into
            // this storage, which is aligned and large enough for any address.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6 (family AF_INET6, length checked).
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Buffers, addresses and headers for receiving up to `count` datagrams of up to `size`
/// bytes each. Receives fill it from the front; [`clear`](RecvBatch::clear) empties it.
pub struct RecvBatch {
    size: usize,
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    filled: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("size", &self.size)
            .field("count", &self.headers.len())
            .field("filled", &self.filled)
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
            controls: vec![Control([0; CONTROL_LEN]); count],
            iovecs: vec![iov; count],
            headers: vec![hdr; count],
            filled: 0,
        }
    }

    /// Receives as many datagrams as are queued on `fd` into the free slots, without
    /// blocking; returns how many (an empty socket is `WouldBlock`, a full batch `Ok(0)`).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let free = self.headers.len() - self.filled;
        if free == 0 {
            return Ok(0);
        }
        let size = self.size;
        let from = self.filled;
        let slots = self.iovecs[from..].iter_mut().zip(&mut self.headers[from..]);
        let slots = slots.zip(&mut self.addrs[from..]).zip(&mut self.controls[from..]);
        for (i, (((iov, hdr), addr), control)) in slots.enumerate() {
            iov.iov_base = self.bufs[(from + i) * size..].as_mut_ptr().cast();
            iov.iov_len = size;
            hdr.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = CONTROL_LEN as _;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let headers = self.headers[from..].as_mut_ptr();
        // SAFETY: `fd` is borrowed, so open for the call. Each of the `free` headers points at this batch's own
        // iovec, address, control buffer and buffer slice (`size` bytes inside `bufs`), all
        // exclusively borrowed by `&mut self` until the call returns; the kernel writes only
        // within those lengths.
        let got = unsafe {
            syscall!(recvmmsg(
                fd.as_raw_fd(),
                headers,
                free as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut()
            ))
        }?;
        self.filled += got as usize;
        Ok(got as usize)
    }

    /// How many datagrams the batch holds.
    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Whether every slot holds a datagram.
    pub fn is_full(&self) -> bool {
        self.filled == self.headers.len()
    }

    /// How many datagrams the batch holds when full.
    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// Forgets every datagram held.
    pub fn clear(&mut self) {
        self.filled = 0;
    }

    /// The `i`-th datagram held.
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let hdr = &self.headers[i];
        let len = (hdr.msg_len as usize).min(self.size);
        let payload = &self.bufs[i * self.size..i * self.size + len];
        let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        // msg_controllen is a size_t with glibc and a socklen_t with musl.
        #[allow(clippy::unnecessary_cast)]
        let control_len = (hdr.msg_hdr.msg_controllen as usize).min(CONTROL_LEN);
        let (mut local, mut segment) = (None, None);
        for (level, kind, data) in control_messages(&self.controls[i].0[..control_len]) {
            if let Some(addr) = pktinfo_destination(level, kind, data, false) {
                local = Some(addr);
            } else if (level, kind) == (libc::SOL_UDP, UDP_GRO) {
                let size = data.get(..4).and_then(|b| b.try_into().ok()).map(i32::from_ne_bytes);
                segment = size.and_then(|s| usize::try_from(s).ok()).filter(|&s| s > 0 && s < len);
            }
        }
        let namelen = hdr.msg_hdr.msg_namelen as usize;
        let from = inet_address(&self.addrs[i], namelen);
        Datagram { payload, from, truncated, local, segment }
    }

    /// `len` bytes at `offset` of slot `slot`'s payload.
    fn part(&self, slot: usize, offset: usize, len: usize) -> &[u8] {
        let start = slot * self.size + offset;
        &self.bufs[start..start + len]
    }
}

/// What became of one message an [`Outbox`] held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The tag it was pushed with (the flow it belongs to).
    pub tag: u64,
    /// Datagrams and payload bytes in it.
    pub datagrams: usize,
    pub bytes: usize,
    /// Whether the kernel took it.
    pub sent: bool,
}

/// One message of an outbox: one datagram, or several of one flow sent as one segmented
/// (GSO) send.
#[derive(Debug, Clone, Copy)]
struct Message {
    tag: u64,
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
    /// Size of each datagram but the last; 0 for a message of one empty datagram.
    segment: usize,
    /// Its parts: a list through `parts` from `first` to `last`, `count` long.
    first: usize,
    last: usize,
    count: usize,
    bytes: usize,
    datagrams: usize,
    /// More datagrams of the same flow may join (its last part has the full segment size).
    open: bool,
    sent: bool,
}

/// A slice of one slot of a [`RecvBatch`], and the next part of its message.
#[derive(Debug, Clone, Copy)]
struct Part {
    slot: usize,
    offset: usize,
    len: usize,
    next: usize,
}

/// No next part.
const END: usize = usize::MAX;

impl Part {
    fn new(slot: usize, offset: usize, len: usize) -> Self {
        Self { slot, offset, len, next: END }
    }
}

/// How many of the latest messages a push looks through for an open one of its flow.
const MERGE_LOOKBACK: usize = 16;

/// Datagrams held in a [`RecvBatch`] waiting to leave on one socket. With GSO on, the
/// datagrams of one flow pushed while its latest message is open join that message (same
/// destination and source, each as long as the first but the last, at most
/// [`MAX_SEGMENTS`]); the order of each flow's datagrams is kept.
pub struct Outbox {
    gso: bool,
    messages: Vec<Message>,
    parts: Vec<Part>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    controls: Vec<Control>,
    names: Vec<SockAddr>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("gso", &self.gso)
            .field("messages", &self.messages.len())
            .finish()
    }
}

/// What one [`Outbox::send`] met.
#[derive(Debug, Default)]
pub struct SendOutcome {
    /// The error that stopped it, if any (a full socket buffer is `WouldBlock`).
    pub error: Option<io::Error>,
    /// The kernel refused a segmented send (no GSO on the way out): the outbox turned GSO
    /// off and sent those datagrams one by one.
    pub gso_refused: bool,
}

impl Outbox {
    /// An empty outbox; with `gso`, runs of a flow's datagrams leave as segmented sends.
    pub fn new(gso: bool) -> Self {
        Self {
            gso,
            messages: Vec::new(),
            parts: Vec::new(),
            iovecs: Vec::new(),
            headers: Vec::new(),
            controls: Vec::new(),
            names: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn set_gso(&mut self, on: bool) {
        self.gso = on;
    }

    /// Forgets every message.
    pub fn clear(&mut self) {
        self.messages.clear();
        self.parts.clear();
    }

    /// Queues datagram `slot` of `batch` to leave for `to` (unconnected sockets) from
    /// `from` (a local address), tagged `tag` (its flow: datagrams of one tag share `to`
    /// and `from`).
    pub fn push(
        &mut self,
        batch: &RecvBatch,
        slot: usize,
        tag: u64,
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
    ) {
        let d = batch.get(slot);
        let len = d.payload.len();
        if let Some(segment) = d.segment {
            self.push_joined(slot, len, segment, tag, to, from);
            return;
        }
        if self.gso && len > 0 && self.join(slot, len, tag, to, from) {
            return;
        }
        self.start(tag, to, from, len, Part::new(slot, 0, len), 1, self.gso && len > 0);
    }

    /// A buffer GRO joined: one segmented message with GSO, else one message a datagram.
    fn push_joined(
        &mut self,
        slot: usize,
        len: usize,
        segment: usize,
        tag: u64,
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
    ) {
        if self.gso {
            let datagrams = len.div_ceil(segment);
            self.start(tag, to, from, segment, Part::new(slot, 0, len), datagrams, false);
            return;
        }
        for offset in (0..len).step_by(segment) {
            let part = Part::new(slot, offset, segment.min(len - offset));
            self.start(tag, to, from, part.len, part, 1, false);
        }
    }

    /// Appends to the flow's latest message if it is open and the datagram fits it.
    fn join(
        &mut self,
        slot: usize,
        len: usize,
        tag: u64,
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
    ) -> bool {
        let lookback = self.messages.len().saturating_sub(MERGE_LOOKBACK);
        let Some(i) = self.messages[lookback..].iter().rposition(|m| m.tag == tag) else {
            return false;
        };
        let m = &self.messages[lookback + i];
        let fits = m.open
            && m.to == to
            && m.from == from
            && len <= m.segment
            && m.datagrams < MAX_SEGMENTS
            && m.bytes + len <= MAX_SEGMENTED_BYTES;
        if !fits {
            return false;
        }
        let (at, last) = (self.parts.len(), m.last);
        self.parts.push(Part::new(slot, 0, len));
        self.parts[last].next = at;
        let m = &mut self.messages[lookback + i];
        m.last = at;
        m.count += 1;
        m.datagrams += 1;
        m.bytes += len;
        m.open = len == m.segment;
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        tag: u64,
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
        segment: usize,
        part: Part,
        datagrams: usize,
        open: bool,
    ) {
        let first = self.parts.len();
        self.parts.push(part);
        self.messages.push(Message {
            tag,
            to,
            from,
            segment,
            first,
            last: first,
            count: 1,
            bytes: part.len,
            datagrams,
            open,
            sent: false,
        });
    }

    /// Sends every message on `fd` (which the caller owns) with as few sendmmsg(2) calls as
    /// possible, stopping at the first error; then [`deliveries`](Self::deliveries) says
    /// what left. A segmented send the kernel refuses turns GSO off and is sent again as
    /// single datagrams.
    pub fn send(&mut self, fd: BorrowedFd<'_>, batch: &RecvBatch) -> SendOutcome {
        let mut outcome = SendOutcome { error: None, gso_refused: false };
        let mut done = 0;
        while done < self.messages.len() {
            match self.send_from(fd, batch, done) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if self.is_gso_refusal(&e, done) => {
                    outcome.gso_refused = true;
                    self.gso = false;
                    self.split_from(done);
                }
                Err(e) => {
                    outcome.error = Some(e);
                    break;
                }
            }
        }
        for m in &mut self.messages[..done] {
            m.sent = true;
        }
        outcome
    }

    /// What became of each message since the last [`clear`](Self::clear), in push order
    /// (meaningful after [`send`](Self::send)).
    pub fn deliveries(&self) -> impl Iterator<Item = Delivery> + '_ {
        self.messages.iter().map(|m| Delivery {
            tag: m.tag,
            datagrams: m.datagrams,
            bytes: m.bytes,
            sent: m.sent,
        })
    }

    fn is_gso_refusal(&self, e: &io::Error, at: usize) -> bool {
        let segmented = self.messages.get(at).is_some_and(|m| m.datagrams > 1);
        let refusal = matches!(
            e.raw_os_error(),
            Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT | libc::EMSGSIZE)
        );
        segmented && refusal
    }

    /// Turns messages `at..` into one message per datagram.
    fn split_from(&mut self, at: usize) {
        let rest: Vec<Message> = self.messages.drain(at..).collect();
        let parts = self.parts.clone();
        for m in rest {
            for part in chain(&parts, m.first) {
                let step = if m.segment > 0 { m.segment } else { part.len.max(1) };
                for offset in (0..part.len.max(1)).step_by(step) {
                    let len = step.min(part.len - offset.min(part.len));
                    let piece = Part::new(part.slot, part.offset + offset, len);
                    self.start(m.tag, m.to, m.from, len, piece, 1, false);
                }
            }
        }
    }

    /// One sendmmsg(2) of messages `from..`; how many the kernel took.
    fn send_from(
        &mut self,
        fd: BorrowedFd<'_>,
        batch: &RecvBatch,
        from: usize,
    ) -> io::Result<usize> {
        let messages = &self.messages[from..];
        let count = messages.len().min(1024);
        let messages = &messages[..count];
        // SAFETY: mmsghdr is a plain C struct; all-zero is valid (null pointers, zero lengths).
        let hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        self.iovecs.clear();
        self.iovecs.extend(messages.iter().flat_map(|m| {
            chain(&self.parts, m.first).map(|p| libc::iovec {
                iov_base: batch.part(p.slot, p.offset, p.len).as_ptr() as *mut libc::c_void,
                iov_len: p.len,
            })
        }));
        self.headers.clear();
        self.headers.resize(count, hdr);
        self.controls.resize(count, Control([0; CONTROL_LEN]));
        self.names.clear();
        let unspecified = SockAddr::from(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        self.names
            .extend(messages.iter().map(|m| m.to.map_or(unspecified.clone(), SockAddr::from)));
        let mut iov_at = 0;
        for (i, m) in messages.iter().enumerate() {
            let h = &mut self.headers[i].msg_hdr;
            if m.to.is_some() {
                h.msg_name = self.names[i].as_ptr() as *mut libc::c_void;
                h.msg_namelen = self.names[i].len();
            }
            h.msg_iov = &mut self.iovecs[iov_at];
            h.msg_iovlen = m.count as _;
            iov_at += m.count;
            let segment = (m.datagrams > 1).then_some(m.segment as u16);
            let len = send_controls(&mut self.controls[i], m.from, segment);
            if len > 0 {
                h.msg_control = self.controls[i].0.as_mut_ptr().cast();
                h.msg_controllen = len as _;
            }
        }
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: `fd` is borrowed, so open for the call. Every header points at an iovec, address and control
        // buffer of this outbox, and every iovec at a payload inside `batch`, which is
        // borrowed for the duration of the call; the kernel only reads them (sendmmsg writes
        // nothing but `msg_len` into the headers, which this outbox owns).
        let sent = unsafe {
            syscall!(sendmmsg(
                fd.as_raw_fd(),
                self.headers.as_mut_ptr(),
                count as libc::c_uint,
                flags
            ))
        }?;
        Ok(sent as usize)
    }
}

/// The parts of a message, from its first.
fn chain(parts: &[Part], first: usize) -> impl Iterator<Item = &Part> {
    let mut at = first;
    std::iter::from_fn(move || {
        let part = parts.get(at)?;
        at = part.next;
        Some(part)
    })
}

/// One ICMP error a shared socket's error queue held: the datagram it answers was sent to
/// `to` from the local address `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub to: SocketAddr,
    pub from: Option<IpAddr>,
    /// The error the ICMP message means (ECONNREFUSED for port unreachable).
    pub errno: i32,
}

/// Most errors read from an error queue in one call.
const ERRORS_PER_CALL: usize = 64;

/// Empties the error queue of `fd` (a socket with IP_RECVERR / IPV6_RECVERR and packet
/// info on, which the caller owns): the ICMP errors it held, at most [`ERRORS_PER_CALL`].
pub fn recv_refusals(fd: BorrowedFd<'_>) -> Vec<Refusal> {
    let mut out = Vec::new();
    for _ in 0..ERRORS_PER_CALL {
        match recv_refusal(fd) {
            Ok(Some(r)) => out.push(r),
            Ok(None) => continue,
            Err(_) => break,
        }
    }
    out
}

/// `Ok(None)`: an error that is not an ICMP error.
fn recv_refusal(fd: BorrowedFd<'_>) -> io::Result<Option<Refusal>> {
    let mut payload = [0u8; 64];
    let mut control = [0u8; 256];
    // SAFETY: sockaddr_storage and msghdr are plain C structs; all-zero is valid.
    let (mut name, mut hdr): (libc::sockaddr_storage, libc::msghdr) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    hdr.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = control.len() as _;
    // SAFETY: `fd` is borrowed, so open for the call; the header points at the name, iovec, payload and
    // control buffers on this stack frame, which outlive the call; the kernel writes only
    // within their lengths.
    unsafe {
        syscall!(recvmsg(fd.as_raw_fd(), &mut hdr, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT))
    }?;
    let Some(to) = inet_address(&name, hdr.msg_namelen as usize) else { return Ok(None) };
    #[allow(clippy::unnecessary_cast)]
    let control_len = (hdr.msg_controllen as usize).min(control.len());
    let (mut from, mut errno) = (None, None);
    for (level, kind, data) in control_messages(&control[..control_len]) {
        if let Some(addr) = pktinfo_destination(level, kind, data, true) {
            from = Some(addr);
        }
        let recverr = matches!(
            (level, kind),
            (libc::IPPROTO_IP, libc::IP_RECVERR) | (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        );
        if recverr {
            // sock_extended_err: ee_errno (u32), ee_origin (u8), ...
            let code = data.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
            let origin = data.get(4).copied();
            let icmp = matches!(origin, Some(libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6));
            errno = code.filter(|_| icmp).map(|c| c as i32);
        }
    }
    Ok(errno.map(|errno| Refusal { to, from, errno }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// Receives into `batch` until it holds `want` datagrams (or 1 s passes).
    fn fill(batch: &mut RecvBatch, fd: BorrowedFd<'_>, want: usize) {
        for _ in 0..200 {
            match batch.recv(fd) {
                Ok(_) if batch.len() >= want => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{} of {want} datagrams received", batch.len());
    }

    fn receiver() -> UdpSocket {
        let r = UdpSocket::bind("127.0.0.1:0").unwrap();
        r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        r
    }

    #[test]
    fn a_batch_receives_many_senders_fills_from_the_front_and_flags_truncation() {
        let server = bind_udp_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = server.local_addr().unwrap();
        let clients: Vec<UdpSocket> =
            (0..5).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let mut batch = RecvBatch::new(8, 64);
        clients[0].send_to(&[0u8; 10], addr).unwrap();
        fill(&mut batch, server.as_fd(), 1);
        for (i, c) in clients.iter().enumerate().skip(1) {
            c.send_to(&vec![i as u8; 10 + i * 30], addr).unwrap();
        }
        fill(&mut batch, server.as_fd(), 5);
        assert_eq!(batch.get(0).from, Some(clients[0].local_addr().unwrap()), "kept in front");
        for (i, c) in clients.iter().enumerate() {
            let d = (0..5).map(|j| batch.get(j)).find(|d| d.from == c.local_addr().ok()).unwrap();
            assert_eq!(d.truncated, 10 + i * 30 > 64, "client {i}");
            assert_eq!(d.payload.len(), (10 + i * 30).min(64));
            assert!(d.payload.iter().all(|&b| b == i as u8));
            assert_eq!((d.count(), d.segment), (1, None));
        }
        batch.clear();
        assert!(batch.is_empty());
    }

    /// Issue 26 item 5: on a wildcard socket each datagram says which local address it was
    /// sent to, and a reply with `from` leaves from that address, IPv4 and IPv6.
    #[test]
    fn a_wildcard_socket_learns_and_answers_from_the_address_the_client_used() {
        for (wildcard, reached) in [("0.0.0.0:0", "127.0.0.2"), ("[::]:0", "::1")] {
            let Ok(server) = bind_udp_listener(wildcard.parse().unwrap(), None) else {
                panic!("cannot bind {wildcard}");
            };
            let reached: IpAddr = reached.parse().unwrap();
            let port = server.local_addr().unwrap().port();
            let client = UdpSocket::bind(SocketAddr::new(reached, 0)).unwrap();
            client.connect(SocketAddr::new(reached, port)).unwrap();
            client.send(b"ask").unwrap();
            let mut batch = RecvBatch::new(4, 16);
            fill(&mut batch, server.as_fd(), 1);
            let d = batch.get(0);
            assert_eq!(d.local, Some(reached), "{wildcard}");
            let mut outbox = Outbox::new(false);
            outbox.push(&batch, 0, 7, d.from, d.local);
            let outcome = outbox.send(server.as_fd(), &batch);
            assert!(outcome.error.is_none(), "{outcome:?}");
            let sent: Vec<Delivery> = outbox.deliveries().collect();
            assert_eq!(sent, [Delivery { tag: 7, datagrams: 1, bytes: 3, sent: true }]);
            client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 16];
            let n = client.recv(&mut buf).expect("a connected client takes the reply");
            assert_eq!(&buf[..n], b"ask");
        }
        let bound = bind_udp_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"x", bound.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(4, 16);
        fill(&mut batch, bound.as_fd(), 1);
        assert_eq!(batch.get(0).local, None, "a bound address needs no packet info");
    }

    #[test]
    fn ipv6_senders_are_reported() {
        let Ok(server) = bind_udp_listener("[::1]:0".parse().unwrap(), None) else {
            sluice_tests::skip("no IPv6 loopback");
            return;
        };
        let client = UdpSocket::bind("[::1]:0").unwrap();
        client.send_to(b"six", server.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(4, 16);
        fill(&mut batch, server.as_fd(), 1);
        let d = batch.get(0);
        assert_eq!((d.payload, d.from), (&b"six"[..], Some(client.local_addr().unwrap())));
    }

    /// Receives `count` datagrams of the given sizes on `source` into a batch.
    fn held(sizes: &[usize]) -> (RecvBatch, UdpSocket) {
        let source = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            sender.send_to(&vec![i as u8; n], source.local_addr().unwrap()).unwrap();
        }
        let mut batch = RecvBatch::new(64, 2048);
        fill(&mut batch, source.as_fd(), sizes.len());
        (batch, source)
    }

    /// Reads datagrams until none comes for 200 ms.
    fn drain(r: &UdpSocket) -> Vec<Vec<u8>> {
        r.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 65_536];
        std::iter::from_fn(|| r.recv(&mut buf).ok().map(|n| buf[..n].to_vec())).collect()
    }

    #[test]
    fn an_outbox_sends_each_datagram_to_its_own_destination() {
        let (batch, _source) = held(&[100, 100, 100]);
        let receivers: Vec<UdpSocket> = (0..3).map(|_| receiver()).collect();
        let sender = bind_udp_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let mut outbox = Outbox::new(true);
        for (i, r) in receivers.iter().enumerate() {
            outbox.push(&batch, i, i as u64, r.local_addr().ok(), None);
        }
        assert!(outbox.send(sender.as_fd(), &batch).error.is_none());
        assert!(outbox.deliveries().all(|d| d.sent && d.datagrams == 1));
        for (i, r) in receivers.iter().enumerate() {
            let mut buf = [0u8; 200];
            let (n, from) = r.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &vec![i as u8; 100][..]);
            assert_eq!(from, sender.local_addr().unwrap());
        }
    }

    /// GSO: a flow's run of equal datagrams (and a shorter last one) leaves as one message
    /// and arrives as the same datagrams, in order; other flows' datagrams between them do
    /// not split the run, a longer datagram starts a new message.
    #[test]
    fn a_flows_run_of_equal_datagrams_leaves_as_one_segmented_send() {
        if !gso_supported() {
            sluice_tests::skip("no UDP_SEGMENT on this kernel");
            return;
        }
        let sizes = [1200, 1200, 300, 1200, 1200, 700, 1300];
        let (batch, _source) = held(&sizes);
        let (a, b) = (receiver(), receiver());
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut outbox = Outbox::new(true);
        let plan: [(usize, &UdpSocket); 7] =
            [(0, &a), (1, &a), (2, &b), (3, &a), (4, &a), (5, &a), (6, &a)];
        for (slot, r) in plan {
            let tag = if std::ptr::eq(r, &a) { 1 } else { 2 };
            outbox.push(&batch, slot, tag, r.local_addr().ok(), None);
        }
        let outcome = outbox.send(sender.as_fd(), &batch);
        assert!(outcome.error.is_none() && !outcome.gso_refused, "{outcome:?}");
        let messages: Vec<(u64, usize, usize)> =
            outbox.deliveries().map(|d| (d.tag, d.datagrams, d.bytes)).collect();
        assert_eq!(messages, [(1, 5, 5500), (2, 1, 300), (1, 1, 1300)]);
        let got: Vec<Vec<u8>> = drain(&a);
        let expected: Vec<Vec<u8>> =
            [0, 1, 3, 4, 5, 6].iter().map(|&i| vec![i as u8; sizes[i]]).collect();
        assert_eq!(got, expected, "flow a: every datagram once, in order, unjoined");
        assert_eq!(drain(&b), [vec![2u8; 300]]);
    }

    /// GRO: datagrams a sender joined (GSO) arrive as one buffer with their size; an outbox
    /// with GSO sends them on as one message, one without cuts them into datagrams.
    #[test]
    fn joined_datagrams_are_received_as_one_and_sent_on_either_way() {
        if !gso_supported() {
            sluice_tests::skip("no UDP_SEGMENT on this kernel");
            return;
        }
        let proxy = UdpSocket::bind("127.0.0.1:0").unwrap();
        if !enable_gro(&proxy) {
            sluice_tests::skip("no UDP_GRO on this kernel");
            return;
        }
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (held, _s) = held(&[1000, 1000, 400]);
        let mut out = Outbox::new(true);
        for slot in 0..3 {
            out.push(&held, slot, 1, proxy.local_addr().ok(), None);
        }
        assert!(out.send(sender.as_fd(), &held).error.is_none());
        let mut batch = RecvBatch::new(4, GRO_BUFFER);
        fill(&mut batch, proxy.as_fd(), 1);
        let d = batch.get(0);
        assert_eq!(
            (d.payload.len(), d.segment, d.count(), d.largest()),
            (2400, Some(1000), 3, 1000)
        );
        for gso in [true, false] {
            let r = receiver();
            let mut again = Outbox::new(gso);
            again.push(&batch, 0, 9, r.local_addr().ok(), None);
            assert!(again.send(sender.as_fd(), &batch).error.is_none());
            let messages: Vec<usize> = again.deliveries().map(|d| d.datagrams).collect();
            assert_eq!(messages, if gso { vec![3] } else { vec![1, 1, 1] });
            let sizes: Vec<usize> = drain(&r).iter().map(Vec::len).collect();
            assert_eq!(sizes, [1000, 1000, 400], "gso {gso}");
        }
    }

    /// Shared mode: one unconnected socket sends from two local addresses; the replies say
    /// which address they reached, and an ICMP port unreachable names the flow's address.
    #[test]
    fn a_shared_socket_sends_from_many_addresses_and_learns_each_refusal() {
        let shared = bind_udp_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let backend = receiver();
        let (batch, _s) = held(&[5, 5]);
        let sources: [IpAddr; 2] = ["127.64.0.1".parse().unwrap(), "127.64.0.2".parse().unwrap()];
        let mut out = Outbox::new(true);
        for (slot, from) in sources.iter().enumerate() {
            out.push(&batch, slot, slot as u64, backend.local_addr().ok(), Some(*from));
        }
        assert!(out.send(shared.as_fd(), &batch).error.is_none());
        let port = shared.local_addr().unwrap().port();
        let mut buf = [0u8; 16];
        for from in sources {
            let (_, seen) = backend.recv_from(&mut buf).unwrap();
            assert_eq!(seen, SocketAddr::new(from, port), "left from the flow's own address");
            backend.send_to(b"re", seen).unwrap();
        }
        let mut replies = RecvBatch::new(4, 64);
        fill(&mut replies, shared.as_fd(), 2);
        let reached: Vec<Option<IpAddr>> = (0..2).map(|i| replies.get(i).local).collect();
        assert_eq!(reached, sources.map(Some));
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut out = Outbox::new(false);
        out.push(&batch, 0, 0, Some(closed), Some(sources[1]));
        assert!(out.send(shared.as_fd(), &batch).error.is_none());
        let mut refusals = Vec::new();
        for _ in 0..100 {
            refusals = recv_refusals(shared.as_fd());
            if !refusals.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let expected = Refusal { to: closed, from: Some(sources[1]), errno: libc::ECONNREFUSED };
        assert_eq!(refusals, [expected]);
    }

    #[test]
    fn control_messages_are_written_and_read_back() {
        let mut c = Control([0; CONTROL_LEN]);
        let len = send_controls(&mut c, Some("10.1.2.3".parse().unwrap()), Some(1200));
        let found: Vec<(i32, i32, Vec<u8>)> =
            control_messages(&c.0[..len]).map(|(l, k, d)| (l, k, d.to_vec())).collect();
        assert_eq!(found.len(), 2);
        assert_eq!(
            pktinfo_destination(found[0].0, found[0].1, &found[0].2, false),
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(
            (found[1].0, found[1].1, &found[1].2[..]),
            (libc::SOL_UDP, UDP_SEGMENT, &1200u16.to_ne_bytes()[..])
        );
        assert_eq!(send_controls(&mut c, None, None), 0);
        assert!(control_messages(&[1, 2, 3]).next().is_none(), "too short for a header");
    }
}
