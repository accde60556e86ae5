//! Passing file descriptors between processes over a Unix socket (SCM_RIGHTS), for the
//! binary upgrade: the running process sends its listening sockets to its successor.
//!
//! Invariants: at most [`MAX_FDS_PER_MESSAGE`] fds travel in one message; every received fd
//! is close-on-exec (MSG_CMSG_CLOEXEC) and owned by an [`OwnedFd`] from the moment
//! `recvmsg` returns, so none can leak into another program or be closed twice.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds sent in one message (the kernel's own cap, SCM_MAX_FD, is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 64;

/// Sends `bytes` with `fds` attached as one message on a connected Unix socket.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        let message = format!("{} fds in one message; at most {MAX_FDS_PER_MESSAGE}", fds.len());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let control = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &control };
    let iov = [IoSlice::new(bytes)];
    let sent = sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "message sent in part"));
    }
    Ok(())
}

/// Receives one message into `buf`: its length and the fds attached to it (0 bytes and no
/// fds: the peer closed the socket). A message whose fds did not all fit is an error.
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        let flags = MsgFlags::MSG_CMSG_CLOEXEC;
        match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    let cmsgs = msg.cmsgs().map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidData, "more fds than one message may carry")
    })?;
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel has just installed these fds in this process for this
            // message; nothing else knows their numbers, so each gets exactly one owner.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message larger than the buffer"));
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    #[test]
    fn a_listener_sent_is_the_same_socket_on_arrival() {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        send_with_fds(a.as_fd(), b"sockets", &[listener.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"sockets");
        assert_eq!(fds.len(), 1);
        let received = TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        // A connection queued before the sender closes its copy waits on the received one.
        let client = std::net::TcpStream::connect(addr).unwrap();
        drop(listener);
        let (accepted, peer) = received.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        drop(accepted);
    }

    #[test]
    fn too_many_fds_for_one_message_is_refused_before_sending() {
        let (a, _b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..=MAX_FDS_PER_MESSAGE).map(|_| a.as_fd()).collect();
        let e = send_with_fds(a.as_fd(), b"x", &fds).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_closed_peer_reads_as_an_empty_message() {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .unwrap();
        drop(a);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
    }
}
