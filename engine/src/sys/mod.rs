//! The only home of `unsafe` outside the io_uring driver's operations: thin, typed wrappers
//! over the syscalls the engine needs (pipes, splice, eventfd, socket options, CPU pinning).
//! Private to the engine ([`crate::testing`] shows tests the few parts they need).
//!
//! Invariants: every fd created here is born `O_CLOEXEC | O_NONBLOCK` and owned by an
//! [`OwnedFd`] from the instant the kernel returns it; functions take the fds they use as
//! [`BorrowedFd`], so an fd cannot be closed while a call uses it; every call reports
//! failure as [`io::Error`] through [`syscall!`], whose every use sits in an `unsafe` block
//! of its own that says what the fd and buffers belong to.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub mod alloc;
pub mod fdpass;
pub mod pipe;
pub mod socket;
pub mod udp;

pub use pipe::{splice, tee, Pipe};
pub use socket::{
    bind_listener, bound_device, local_addr, peer_addr, segments_in, set_backlog, set_linger_zero,
    set_side_options, shutdown_write, take_socket_error, tcp_socket_for,
};
pub use socket::{set_filter, socket_drops};
pub use udp::{
    bind_udp_listener, bind_udp_shared, connect_udp, enable_gro, gso_supported, recv_refusals,
    set_receive_buffer, Datagram, Outbox, RecvBatch, SendOutcome, GRO_BUFFER,
};

/// Calls a libc function and turns `-1` into the thread's `errno` as an [`io::Error`]. It
/// is unsafe to expand: each use sits in an `unsafe` block whose `// SAFETY:` line names
/// what the fds and buffers it passes belong to, and for how long.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        let res = libc::$fn($($arg),*);
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
        // SAFETY: eventfd takes no pointer; the fd it returns is owned below.
        let fd = unsafe { syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)) }?;
        // SAFETY: eventfd just returned this fd; nothing else owns it.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Adds one to the counter; the worker's driver sees the fd readable.
    pub fn notify(&self) {
        let one: u64 = 1;
        // A full counter (EAGAIN) already means "readable": nothing to do on error.
        // SAFETY: the eventfd is owned by `self`; `one` is 8 readable bytes on this stack.
        let _ = unsafe { syscall!(write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8)) };
    }

    /// Resets the counter to zero; returns whether it was non-zero.
    pub fn drain(&self) -> bool {
        let mut value: u64 = 0;
        // SAFETY: the eventfd is owned by `self`; `value` is 8 writable bytes on this stack.
        unsafe { syscall!(read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8)) }.is_ok()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Reads from a non-blocking fd into `buf`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `fd` is borrowed from its owner for the call; the kernel writes at most
    // `buf.len()` bytes into `buf`, exclusively borrowed for the call.
    unsafe { syscall!(read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())) }
        .map(|n| n as usize)
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
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], then: Then) -> io::Result<usize> {
    let flags = match then {
        Then::Wait => libc::MSG_NOSIGNAL,
        Then::Fin => libc::MSG_NOSIGNAL | libc::MSG_MORE,
    };
    // SAFETY: `fd` is borrowed from its owner for the call; the kernel reads at most
    // `buf.len()` bytes of `buf`, borrowed for the call.
    unsafe { syscall!(send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags)) }
        .map(|n| n as usize)
}

/// Copies up to `buf.len()` bytes of what a socket has received, without consuming them.
pub fn recv_peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: `fd` is borrowed from its owner for the call; the kernel writes at most
    // `buf.len()` bytes into `buf`, exclusively borrowed for the call.
    unsafe { syscall!(recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags)) }
        .map(|n| n as usize)
}

/// Sets SO_RCVLOWAT: readiness (poll, epoll) is reported only once `bytes` are queued, or at
/// end of stream or error.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed from its owner for the call; `value` lives on this stack for
    // the call and `len` is its size.
    unsafe {
        syscall!(setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            len
        ))
    }
    .map(drop)
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// CPUs this process may run on, in order (honours taskset / cgroup cpusets).
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => {
            (0..nix::sched::CpuSet::count()).filter(|&i| set.is_set(i).unwrap_or(false)).collect()
        }
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// Blocks the given signals in the calling thread (and threads it spawns later), so that
/// only the control thread receives them.
pub fn block_signals(signals: &[nix::sys::signal::Signal]) -> io::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    for &signal in signals {
        set.add(signal);
    }
    nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(io::Error::from)
}

/// Counts this process's open file descriptors (via /proc/self/fd). Reading the directory
/// takes an fd of its own: `None` when none is free.
pub fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count().saturating_sub(1))
}

/// This process's soft RLIMIT_NOFILE (`None` when unlimited or unreadable).
pub fn fd_limit() -> Option<u64> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    (soft != nix::sys::resource::RLIM_INFINITY).then_some(soft)
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
