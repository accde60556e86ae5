//! Pipes and splice(2): the zero-copy path. A [`Pipe`] is a pair of owned fds created
//! non-blocking and close-on-exec; [`splice`] moves bytes between a socket and a pipe
//! without copying them into user space.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{syscall, Then};

/// One kernel pipe: bytes written to `write` end are read from `read` end.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// Creates a pipe with `O_NONBLOCK | O_CLOEXEC` and, if `size` is non-zero, asks the
    /// kernel for that capacity (F_SETPIPE_SZ; the kernel may round it up, or refuse above
    /// /proc/sys/fs/pipe-max-size, in which case the default capacity is kept).
    pub fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))?;
        // SAFETY: pipe2 succeeded and returned two fresh fds that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if size > 0 {
            let _ = syscall!(fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int));
        }
        Ok(Self { read, write })
    }

    /// The pipe's capacity in bytes.
    pub fn capacity(&self) -> io::Result<usize> {
        syscall!(fcntl(self.write.as_raw_fd(), libc::F_GETPIPE_SZ)).map(|n| n as usize)
    }

    /// Bytes currently buffered in the pipe (FIONREAD).
    pub fn buffered(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        syscall!(ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n))?;
        Ok(n as usize)
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }
}

/// Moves up to `len` bytes from `from` to `to` (one of them must be a pipe) without a copy
/// through user space. Returns the bytes moved; `Ok(0)` from a socket means end of stream.
/// Non-blocking: `WouldBlock` when nothing can move now. `then` says what follows a splice
/// into a socket (see [`Then`]).
pub fn splice(from: RawFd, to: RawFd, len: usize, then: Then) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    if then == Then::Fin {
        flags |= libc::SPLICE_F_MORE;
    }
    // Null offsets: both fds are streams (socket or pipe), read at their current position.
    syscall!(splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags))
        .map(|n| n as usize)
}

/// Duplicates up to `len` bytes at the head of pipe `from` into pipe `to` without consuming
/// them (tee(2)): the bytes stay in `from` for the relay and are read from `to` by capture.
/// Non-blocking: `WouldBlock` when `to` is full or `from` empty; fewer bytes than asked when
/// `to` has less room.
pub fn tee(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // Both fds are pipes owned by the caller for the duration of the call; tee touches no
    // user memory.
    syscall!(tee(from, to, len, libc::SPLICE_F_NONBLOCK)).map(|n| n as usize)
}

/// Writes as much of `data` into a pipe as it takes now (non-blocking); returns how much.
pub fn write_all_to_pipe(pipe: &Pipe, data: &[u8]) -> usize {
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        // The pipe is borrowed for the call; `rest` is a live slice.
        match syscall!(write(pipe.write_fd(), rest.as_ptr().cast(), rest.len())) {
            Ok(n) => done += n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_reports_capacity_and_buffered_bytes() {
        let pipe = Pipe::new(1 << 16).unwrap();
        assert!(pipe.capacity().unwrap() >= 1 << 16);
        assert_eq!(pipe.buffered().unwrap(), 0);
        let data = [7u8; 100];
        let n = syscall!(write(pipe.write_fd(), data.as_ptr().cast(), data.len())).unwrap();
        assert_eq!(n, 100);
        assert_eq!(pipe.buffered().unwrap(), 100);
    }

    #[test]
    fn tee_copies_without_consuming_and_stops_at_a_full_pipe() {
        let relay = Pipe::new(1 << 16).unwrap();
        let capture = Pipe::new(4096).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let n = syscall!(write(relay.write_fd(), data.as_ptr().cast(), data.len())).unwrap();
        assert_eq!(n as usize, data.len());
        let teed = tee(relay.read_fd(), capture.write_fd(), data.len()).unwrap();
        assert!(teed > 0 && teed < data.len(), "a 4 KiB pipe takes part of 10,000 bytes");
        assert_eq!(relay.buffered().unwrap(), data.len(), "tee consumed nothing");
        let mut out = vec![0u8; teed];
        let r = syscall!(read(capture.read_fd(), out.as_mut_ptr().cast(), teed)).unwrap();
        assert_eq!(&out[..r as usize], &data[..r as usize]);
        let full = Pipe::new(4096).unwrap();
        let _ = tee(relay.read_fd(), full.write_fd(), data.len()).unwrap();
        let again = tee(relay.read_fd(), full.write_fd(), data.len());
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }
}
