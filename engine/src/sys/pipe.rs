//! Pipes and splice(2): the zero-copy path. A [`Pipe`] is a pair of owned fds created
//! non-blocking and close-on-exec; [`splice`] moves bytes between a socket and a pipe
//! without copying them into user space.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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
        // SAFETY: `fds` is room for the two fds the kernel writes, on this stack.
        unsafe { syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC)) }?;
        // SAFETY: pipe2 succeeded and returned two fresh fds that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if size > 0 {
            let size = size.min(i32::MAX as usize) as libc::c_int;
            // SAFETY: the pipe's write end is owned just above; F_SETPIPE_SZ takes an int.
            let _ = unsafe { syscall!(fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size)) };
        }
        Ok(Self { read, write })
    }

    /// The pipe's capacity in bytes.
    pub fn capacity(&self) -> io::Result<usize> {
        // SAFETY: the write end is owned by `self`; F_GETPIPE_SZ takes no argument.
        unsafe { syscall!(fcntl(self.write.as_raw_fd(), libc::F_GETPIPE_SZ)) }.map(|n| n as usize)
    }

    /// Bytes currently buffered in the pipe (FIONREAD).
    pub fn buffered(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: the read end is owned by `self`; FIONREAD writes one int into `n`, on
        // this stack.
        unsafe { syscall!(ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n)) }?;
        Ok(n as usize)
    }

    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }
}

/// Moves up to `len` bytes from `from` to `to` (one of them must be a pipe) without a copy
/// through user space. Returns the bytes moved; `Ok(0)` from a socket means end of stream.
/// Non-blocking: `WouldBlock` when nothing can move now. `then` says what follows a splice
/// into a socket (see [`Then`]).
pub fn splice(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: usize,
    then: Then,
) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    if then == Then::Fin {
        flags |= libc::SPLICE_F_MORE;
    }
    let (from, to) = (from.as_raw_fd(), to.as_raw_fd());
    // SAFETY: both fds are borrowed from their owners for the call; the offsets are null
    // (both are streams, read at their current position) and no user memory is touched.
    unsafe { syscall!(splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags)) }
        .map(|n| n as usize)
}

/// Duplicates up to `len` bytes at the head of pipe `from` into pipe `to` without consuming
/// them (tee(2)): the bytes stay in `from` for the relay and are read from `to` by capture.
/// Non-blocking: `WouldBlock` when `to` is full or `from` empty; fewer bytes than asked when
/// `to` has less room.
pub fn tee(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let (from, to) = (from.as_raw_fd(), to.as_raw_fd());
    // SAFETY: both pipes are borrowed from their owners for the call; tee touches no user
    // memory.
    unsafe { syscall!(tee(from, to, len, libc::SPLICE_F_NONBLOCK)) }.map(|n| n as usize)
}

/// Writes as much of `data` into a pipe as it takes now (non-blocking); returns how much.
#[cfg(test)]
pub fn write_all_to_pipe(pipe: &Pipe, data: &[u8]) -> usize {
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        let fd = pipe.write.as_raw_fd();
        // SAFETY: the pipe is borrowed for the call; the kernel reads at most `rest.len()`
        // bytes of `rest`, a live slice.
        match unsafe { syscall!(write(fd, rest.as_ptr().cast(), rest.len())) } {
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
        let n = write_all_to_pipe(&pipe, &data);
        assert_eq!(n, 100);
        assert_eq!(pipe.buffered().unwrap(), 100);
    }

    #[test]
    fn tee_copies_without_consuming_and_stops_at_a_full_pipe() {
        let relay = Pipe::new(1 << 16).unwrap();
        let capture = Pipe::new(4096).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(write_all_to_pipe(&relay, &data), data.len());
        let teed = tee(relay.read_end(), capture.write_end(), data.len()).unwrap();
        assert!(teed > 0 && teed < data.len(), "a 4 KiB pipe takes part of 10,000 bytes");
        assert_eq!(relay.buffered().unwrap(), data.len(), "tee consumed nothing");
        let mut out = vec![0u8; teed];
        let r = crate::sys::read(capture.read_end(), &mut out).unwrap();
        assert_eq!(&out[..r], &data[..r]);
        let full = Pipe::new(4096).unwrap();
        let _ = tee(relay.read_end(), full.write_end(), data.len()).unwrap();
        let again = tee(relay.read_end(), full.write_end(), data.len());
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }
}
