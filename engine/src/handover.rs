//! Listening sockets that an engine starts with instead of binding its own: those a
//! predecessor process handed over in a binary upgrade, or those bound before the process
//! gave up its privileges.
//!
//! Invariants:
//! - every socket given to [`Inherited`] is used or returned, never closed while it may hold
//!   queued connections: with SO_REUSEPORT, closing a listener resets the connections waiting
//!   in its accept queue, so an engine with fewer workers than its predecessor adopts several
//!   sockets per worker, and one with more shares sockets between workers;
//! - one socket (one kernel object, told by its inode) is held once, however many fds of it
//!   arrive;
//! - a socket's kind, address and interface are read from the socket itself, never trusted
//!   from a label; a socket bound to another interface than a listener asks for is not that
//!   listener's.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use crate::sys;

use crate::record::Protocol;
/// Passing fds to another process over a Unix socket (SCM_RIGHTS), for a binary upgrade.
pub use crate::sys::fdpass::{recv_with_fds, send_with_fds, MAX_FDS_PER_MESSAGE};
use crate::tables::Listen;
use crate::EngineError;

/// Listening sockets by protocol and listener (address and interface), each list in the
/// order the sockets came.
#[derive(Debug, Default)]
pub struct Inherited {
    tcp: BTreeMap<Listen, Vec<TcpListener>>,
    udp: BTreeMap<Listen, Vec<UdpSocket>>,
    /// Inodes of the sockets held, to drop a second fd of one.
    seen: HashSet<u64>,
}

impl Inherited {
    /// Binds one socket per worker on every address, as the engine would at start. Used to
    /// bind before privileges are dropped.
    pub fn bind(tcp: &[Listen], udp: &[Listen], workers: usize) -> Result<Self, EngineError> {
        let mut this = Inherited::default();
        for _ in 0..workers.max(1) {
            for listen in tcp {
                this.tcp.entry(listen.clone()).or_default().push(bind_tcp(listen)?);
            }
            for listen in udp {
                this.udp.entry(listen.clone()).or_default().push(bind_udp(listen)?);
            }
        }
        Ok(this)
    }

    /// Takes a socket received from a predecessor. Returns its protocol and address, or
    /// `None` when it is a second fd of a socket already held (that fd is closed; the
    /// socket stays open). A listening TCP socket or a bound UDP socket is accepted;
    /// anything else is an error and the fd is closed.
    pub fn adopt(&mut self, fd: OwnedFd) -> io::Result<Option<(Protocol, SocketAddr)>> {
        let file = std::fs::File::from(fd);
        let inode = file.metadata()?.ino();
        if !self.seen.insert(inode) {
            return Ok(None);
        }
        let socket = socket2::Socket::from(OwnedFd::from(file));
        let addr = socket.local_addr()?.as_socket().ok_or_else(|| invalid("not an inet socket"))?;
        let listen = Listen { addr, interface: sys::bound_device(socket.as_fd())?.map(Into::into) };
        match socket.r#type()? {
            socket2::Type::STREAM if socket.is_listener()? => {
                socket.set_nonblocking(true)?;
                self.tcp.entry(listen).or_default().push(socket.into());
                Ok(Some((Protocol::Tcp, addr)))
            }
            socket2::Type::DGRAM => {
                socket.set_nonblocking(true)?;
                self.udp.entry(listen).or_default().push(socket.into());
                Ok(Some((Protocol::Udp, addr)))
            }
            _ => Err(invalid("neither a listening TCP socket nor a UDP socket")),
        }
    }

    /// Sockets held.
    pub fn len(&self) -> usize {
        self.tcp.values().map(Vec::len).sum::<usize>()
            + self.udp.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Listeners held, with their protocol and socket count.
    pub fn addrs(&self) -> Vec<(Protocol, Listen, usize)> {
        let tcp = self.tcp.iter().map(|(l, v)| (Protocol::Tcp, l.clone(), v.len()));
        tcp.chain(self.udp.iter().map(|(l, v)| (Protocol::Udp, l.clone(), v.len()))).collect()
    }

    /// Drops the sockets of every listener not in `keep_tcp` / `keep_udp` (a socket bound
    /// to another interface than the kept listener of its address included), returning
    /// those listeners. Safe only while another process still holds those sockets (it
    /// serves what their queues hold before closing them).
    pub fn release_except(
        &mut self,
        keep_tcp: &[Listen],
        keep_udp: &[Listen],
    ) -> Vec<(Protocol, Listen)> {
        let tcp: Vec<Listen> = self.tcp.keys().filter(|l| !keep_tcp.contains(l)).cloned().collect();
        let udp: Vec<Listen> = self.udp.keys().filter(|l| !keep_udp.contains(l)).cloned().collect();
        tcp.iter().for_each(|l| drop(self.tcp.remove(l)));
        udp.iter().for_each(|l| drop(self.udp.remove(l)));
        let tcp = tcp.into_iter().map(|l| (Protocol::Tcp, l));
        tcp.chain(udp.into_iter().map(|l| (Protocol::Udp, l))).collect()
    }

    /// The TCP listeners of `addrs` for `workers` workers, by worker: an inherited
    /// address's sockets are dealt out in turn (a worker may get several), and shared by
    /// duplicating when there are fewer sockets than workers; an address with none is bound
    /// afresh, one socket per worker.
    pub(crate) fn tcp_for_workers(
        &mut self,
        listeners: &[Listen],
        workers: usize,
    ) -> Result<Vec<Vec<TcpListener>>, EngineError> {
        deal(&mut self.tcp, listeners, workers, bind_tcp, TcpListener::try_clone)
    }

    /// The UDP sockets of `addrs` for `workers` workers, dealt as [`Self::tcp_for_workers`].
    pub(crate) fn udp_for_workers(
        &mut self,
        listeners: &[Listen],
        workers: usize,
    ) -> Result<Vec<Vec<UdpSocket>>, EngineError> {
        deal(&mut self.udp, listeners, workers, bind_udp, UdpSocket::try_clone)
    }
}

/// A fresh TCP listener for `listen` (one worker's).
pub(crate) fn bind_tcp(listen: &Listen) -> Result<TcpListener, EngineError> {
    sys::bind_listener(listen.addr, listen.interface.as_deref())
        .map_err(|source| EngineError::Bind { addr: listen.addr, source })
}

/// A fresh UDP socket for `listen` (one worker's).
pub(crate) fn bind_udp(listen: &Listen) -> Result<UdpSocket, EngineError> {
    sys::bind_udp_listener(listen.addr, listen.interface.as_deref())
        .map_err(|source| EngineError::Bind { addr: listen.addr, source })
}

/// An fd of every listening socket the engine's workers hold, by protocol and address,
/// for handing over to a successor ([`crate::Engine::listening_sockets`]).
///
/// Invariant: an entry is removed before the workers close their own fds of that socket
/// (reload, drain, stop accepting), so the ledger never keeps a socket listening that no
/// worker accepts on.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    entries: Mutex<Vec<(Protocol, SocketAddr, OwnedFd)>>,
}

impl Ledger {
    /// Records a copy of each socket (workers get the originals).
    pub(crate) fn record<T: AsFd>(&self, protocol: Protocol, sockets: &[T]) -> io::Result<()> {
        let mut copies = Vec::with_capacity(sockets.len());
        for s in sockets {
            let fd = s.as_fd().try_clone_to_owned()?;
            let addr = sys::local_addr(fd.as_fd())?;
            copies.push((protocol, addr, fd));
        }
        self.lock().extend(copies);
        Ok(())
    }

    /// Forgets the sockets of `addrs` (their workers are about to close them).
    pub(crate) fn forget(&self, protocol: Protocol, addrs: &[SocketAddr]) {
        self.lock().retain(|(p, a, _)| *p != protocol || !addrs.contains(a));
    }

    /// Calls `f` with the address and an fd of every socket of `protocol` recorded.
    pub(crate) fn each(&self, protocol: Protocol, mut f: impl FnMut(SocketAddr, BorrowedFd<'_>)) {
        for (p, addr, fd) in self.lock().iter() {
            if *p == protocol {
                f(*addr, fd.as_fd());
            }
        }
    }

    /// Forgets every socket.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// A fresh fd of every socket recorded, with its protocol and address.
    pub(crate) fn duplicates(&self) -> io::Result<Vec<(Protocol, SocketAddr, OwnedFd)>> {
        let entries = self.lock();
        entries.iter().map(|(p, a, fd)| Ok((*p, *a, fd.try_clone()?))).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Protocol, SocketAddr, OwnedFd)>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

/// Deals the sockets of each address in `addrs` out to `workers` workers (see
/// [`Inherited::tcp_for_workers`]).
fn deal<T>(
    held: &mut BTreeMap<Listen, Vec<T>>,
    listeners: &[Listen],
    workers: usize,
    bind: fn(&Listen) -> Result<T, EngineError>,
    share: fn(&T) -> io::Result<T>,
) -> Result<Vec<Vec<T>>, EngineError> {
    let workers = workers.max(1);
    let mut out: Vec<Vec<T>> = (0..workers).map(|_| Vec::new()).collect();
    for listen in listeners {
        let addr = listen.addr;
        let sockets = held.remove(listen).unwrap_or_default();
        if sockets.is_empty() {
            for list in &mut out {
                list.push(bind(listen)?);
            }
            continue;
        }
        let count = sockets.len();
        let mut shared = Vec::new();
        for i in count..workers {
            let copy =
                share(&sockets[i % count]).map_err(|source| EngineError::Bind { addr, source })?;
            shared.push((i, copy));
        }
        for (j, socket) in sockets.into_iter().enumerate() {
            out[j % workers].push(socket);
        }
        for (i, copy) in shared {
            out[i].push(copy);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn inode(l: &impl AsRawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap().ino()
    }

    fn bound(workers: usize) -> (Inherited, SocketAddr) {
        let first = sys::bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = first.local_addr().unwrap();
        let mut held = Inherited::default();
        held.adopt(first.into()).unwrap();
        for _ in 1..workers {
            held.adopt(sys::bind_listener(addr, None).unwrap().into()).unwrap();
        }
        (held, addr)
    }

    #[test]
    fn fewer_workers_adopt_every_socket() {
        let (mut held, addr) = bound(3);
        let dealt = held.tcp_for_workers(&[addr.into()], 2).unwrap();
        assert_eq!(dealt.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        let inodes: HashSet<u64> = dealt.iter().flatten().map(inode).collect();
        assert_eq!(inodes.len(), 3, "three distinct sockets, none closed");
        assert!(held.is_empty());
    }

    #[test]
    fn more_workers_share_the_inherited_sockets_and_bind_none() {
        let (mut held, addr) = bound(2);
        let dealt = held.tcp_for_workers(&[addr.into()], 5).unwrap();
        assert!(dealt.iter().all(|w| w.len() == 1));
        let inodes: HashSet<u64> = dealt.iter().flatten().map(inode).collect();
        assert_eq!(inodes.len(), 2, "no new socket joined the group");
    }

    #[test]
    fn an_address_not_inherited_is_bound_per_worker() {
        let (mut held, addr) = bound(1);
        let other = sys::bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let fresh = other.local_addr().unwrap();
        drop(other);
        let dealt = held.tcp_for_workers(&[addr.into(), fresh.into()], 2).unwrap();
        assert!(dealt.iter().all(|w| w.len() == 2));
        let fresh_inodes: HashSet<u64> = dealt
            .iter()
            .flatten()
            .filter(|l| l.local_addr().unwrap() == fresh)
            .map(inode)
            .collect();
        assert_eq!(fresh_inodes.len(), 2);
    }

    #[test]
    fn a_second_fd_of_one_socket_is_held_once() {
        let (mut held, addr) = bound(1);
        let again = held.tcp[&Listen::new(addr)][0].try_clone().unwrap();
        assert_eq!(held.adopt(again.into()).unwrap(), None);
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn kinds_are_read_from_the_socket() {
        let mut held = Inherited::default();
        let udp = sys::bind_udp_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = udp.local_addr().unwrap();
        assert_eq!(held.adopt(udp.into()).unwrap(), Some((Protocol::Udp, addr)));
        let unlistened = std::net::TcpStream::connect(
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(),
        )
        .unwrap();
        assert!(held.adopt(unlistened.into()).is_err());
        let released = held.release_except(&[], &[]);
        assert_eq!(released, [(Protocol::Udp, Listen::new(addr))]);
        assert!(held.is_empty());
    }

    /// A listener whose interface changed across an upgrade is a new listener: the old
    /// process's socket, bound elsewhere, is released and a fresh one is bound.
    #[test]
    fn a_socket_on_another_interface_is_not_the_listener_asked_for() {
        let first = sys::bind_listener("127.0.0.1:0".parse().unwrap(), Some("lo")).unwrap();
        let addr = first.local_addr().unwrap();
        let mut held = Inherited::default();
        assert_eq!(held.adopt(first.into()).unwrap(), Some((Protocol::Tcp, addr)));
        assert_eq!(held.addrs(), [(Protocol::Tcp, Listen::on(addr, "lo"), 1)]);
        let released = held.release_except(&[Listen::new(addr)], &[]);
        assert_eq!(released, [(Protocol::Tcp, Listen::on(addr, "lo"))]);
        let dealt = held.tcp_for_workers(&[Listen::new(addr)], 1).unwrap();
        assert_eq!(sys::bound_device(dealt[0][0].as_fd()).unwrap(), None, "bound afresh");
    }
}
