//! One driver interface, two drivers. A driver runs one worker's loop: accept on the
//! worker's listeners, decide each connection with the current tables, connect to a
//! backend, relay both directions, enforce timeouts, report a record per session, and obey
//! [`Command`](crate::worker::Command)s.
//!
//! - `uring`: io_uring with multishot accept, async connect and splice through a per-worker
//!   pipe pool: payload never enters user space.
//! - `epoll`: mio readiness with a bounded user-space buffer per direction.
//!
//! Both pass the same end-to-end suite. [`select`] probes once at start and says why.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;

use crate::sys;
use crate::worker::WorkerContext;
use crate::EngineError;

mod buffers;
pub mod epoll;
mod peek;
mod schedule;
mod slots;
pub mod uring;

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriverChoice {
    /// io_uring where the kernel supports it, epoll otherwise.
    #[default]
    Auto,
    Uring,
    Epoll,
}

impl FromStr for DriverChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DriverChoice::Auto),
            "uring" => Ok(DriverChoice::Uring),
            "epoll" => Ok(DriverChoice::Epoll),
            other => {
                Err(format!("unknown driver {other:?}; expected \"auto\", \"uring\" or \"epoll\""))
            }
        }
    }
}

/// The driver actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    Uring,
    Epoll,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Uring => "uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// The outcome of the probe: which driver, with which features, or why not io_uring.
#[derive(Debug, Clone)]
pub struct Selection {
    pub kind: DriverKind,
    /// `features=...` for uring, `reason=...` for epoll.
    pub detail: String,
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "driver={} {}", self.kind.as_str(), self.detail)
    }
}

/// Probes io_uring (once) and picks the driver for `choice`. Asking for `uring` on a kernel
/// that cannot run it is an error that says what is missing.
pub fn select(choice: DriverChoice) -> Result<Selection, EngineError> {
    match choice {
        DriverChoice::Epoll => {
            Ok(Selection { kind: DriverKind::Epoll, detail: "reason=configured".into() })
        }
        DriverChoice::Uring => match uring::probe() {
            Ok(features) => {
                Ok(Selection { kind: DriverKind::Uring, detail: format!("features={features}") })
            }
            Err(reason) => Err(EngineError::DriverUnavailable { driver: "uring", reason }),
        },
        DriverChoice::Auto => Ok(match uring::probe() {
            Ok(features) => {
                Selection { kind: DriverKind::Uring, detail: format!("features={features}") }
            }
            Err(reason) => Selection {
                kind: DriverKind::Epoll,
                detail: format!("reason=\"io_uring unavailable: {reason}\""),
            },
        }),
    }
}

/// Whether an error ending a connect attempt means the backend could not be reached (try
/// the next one), as opposed to a connection that was made and then reset (a backend
/// reset, which the client must see as one).
pub(crate) fn is_connect_failure(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED
            | libc::ETIMEDOUT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::ENETDOWN
            | libc::EADDRNOTAVAIL
            | libc::ECANCELED
    )
}

/// Reads what socket `src` holds into `buf`: `(bytes, reached the end of stream)`. With
/// `read_on`, a short read is followed by another until the socket would block or its end is
/// read, so that an end of stream right behind the bytes is known before they are sent on
/// (and its FIN can leave with them, see [`sys::Then`]). A reset found that way loses the
/// bytes read before it, as a reset does anyway.
pub(crate) fn read_burst(src: RawFd, buf: &mut [u8], read_on: bool) -> io::Result<(usize, bool)> {
    let mut got = 0;
    loop {
        match sys::read(src, &mut buf[got..]) {
            Ok(0) => return Ok((got, true)),
            Ok(n) => {
                got += n;
                if !read_on || got == buf.len() {
                    return Ok((got, false));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok((got, false)),
            Err(e) => return Err(e),
        }
    }
}

/// Runs one worker's loop on the chosen driver until it is drained.
pub(crate) fn run(kind: DriverKind, ctx: WorkerContext) -> io::Result<()> {
    match kind {
        DriverKind::Uring => uring::run(ctx),
        DriverKind::Epoll => epoll::run(ctx),
    }
}
