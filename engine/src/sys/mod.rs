//! The only home of `unsafe` outside the io_uring driver: thin, typed wrappers over the
//! syscalls the engine needs (pipes, splice, eventfd, socket options, CPU pinning).
//!
//! Invariants: every fd created here is born `O_CLOEXEC | O_NONBLOCK` and owned by an
//! [`OwnedFd`] from the instant the kernel returns it; every call reports failure as
//! [`io::Error`] through [`syscall!`].

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub mod alloc;
pub mod pipe;
pub mod socket;
pub mod udp;

pub use pipe::{splice, tee, write_all_to_pipe, Pipe};
pub use socket::{
    bind_reuseport, peer_addr, segments_in, set_linger_zero, set_nodelay, shutdown_write,
    take_socket_error, tcp_socket_for,
};
pub use udp::{bind_udp_reuseport, connect_udp, send_batch, Datagram, Outgoing, RecvBatch};

/// Calls a libc function and turns `-1` into the thread's `errno` as an [`io::Error`].
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: every caller passes arguments that satisfy the named libc function's
        // contract; the individual call sites document fd and buffer ownership.
        #[allow(unused_unsafe)]
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 { Err(std::io::Error::last_os_error()) } else { Ok(res) }
    }};
}
pub(crate) use syscall;

/// An eventfd used to wake a worker from another thread (control commands, shutdown).
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<Self> {
        let fd = syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
        // SAFETY: eventfd just returned this fd; nothing else owns it.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Adds one to the counter; the worker's driver sees the fd readable.
    pub fn notify(&self) {
        let one: u64 = 1;
        // A full counter (EAGAIN) already means "readable": nothing to do on error.
        let _ = syscall!(write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8));
    }

    /// Resets the counter to zero; returns whether it was non-zero.
    pub fn drain(&self) -> bool {
        let mut value: u64 = 0;
        syscall!(read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8)).is_ok()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Reads from a non-blocking fd into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // The caller owns `fd`; `buf` is exclusively borrowed for the call.
    syscall!(read(fd, buf.as_mut_ptr().cast(), buf.len())).map(|n| n as usize)
}

/// What follows a write to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Nothing known: the bytes go out at once (the sockets run with TCP_NODELAY).
    Wait,
    /// The write side is shut down right after: the last bytes are held (MSG_MORE) so that
    /// the shutdown's FIN leaves in the same segment, one packet where there would be two.
    Fin,
}

/// Sends `buf` on a non-blocking socket without raising SIGPIPE on a reset peer.
pub fn send(fd: RawFd, buf: &[u8], then: Then) -> io::Result<usize> {
    let flags = match then {
        Then::Wait => libc::MSG_NOSIGNAL,
        Then::Fin => libc::MSG_NOSIGNAL | libc::MSG_MORE,
    };
    // The caller owns `fd`; `buf` is borrowed for the call.
    syscall!(send(fd, buf.as_ptr().cast(), buf.len(), flags)).map(|n| n as usize)
}

/// Copies up to `buf.len()` bytes of what a socket has received, without consuming them.
pub fn recv_peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // The caller owns `fd`; `buf` is exclusively borrowed for the call.
    syscall!(recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags)).map(|n| n as usize)
}

/// Sets SO_RCVLOWAT: readiness (poll, epoll) is reported only once `bytes` are queued, or at
/// end of stream or error.
pub fn set_rcvlowat(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // `value` lives on the stack for the duration of the call; the caller owns `fd`.
    syscall!(setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVLOWAT,
        (&value as *const libc::c_int).cast(),
        len
    ))
    .map(drop)
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "cpu index out of range"));
    }
    // SAFETY: `cpu` < CPU_SETSIZE was checked above; `set` is exclusively borrowed.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    syscall!(sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)).map(drop)
}

/// CPUs this process may run on, in order (honours taskset / cgroup cpusets).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: all-zero is a valid empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if syscall!(sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set)).is_err() {
        return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` < CPU_SETSIZE and `set` was filled by the kernel.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Blocks the given signals in the calling thread (and threads it spawns later), so that
/// only the control thread receives them.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    // SAFETY: all-zero is a valid sigset_t before sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is exclusively borrowed for the duration of each call.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in signals {
        // SAFETY: as above; `sig` is a signal number from libc's constants.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Counts this process's open file descriptors (via /proc/self/fd). Reading the directory
/// takes an fd of its own: `None` when none is free.
pub fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count().saturating_sub(1))
}

/// This process's soft RLIMIT_NOFILE (`None` when unlimited or unreadable).
pub fn fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// How many fds this process has open against its limit, for messages: "253 of 256", or
/// "none free to count them, limit 256" when the table is full.
pub fn fd_usage() -> String {
    let limit = fd_limit().map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
    match open_fds() {
        Some(open) => format!("{open} of {limit}"),
        None => format!("none free to count them, limit {limit}"),
    }
}

/// The local address of a socket fd.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: borrowing the fd for the duration of this call only; the caller owns it.
    let sock = std::mem::ManuallyDrop::new(unsafe { socket2::Socket::from_raw_fd(fd) });
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet socket"))
}
