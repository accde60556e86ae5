//! The executors of the session core: a driver runs one worker's loop, accepts on the
//! worker's listeners and carries out what each session's core asks, with the system calls
//! of its kind. What both drivers share is written once: [`host`] (the session table, the
//! action loop, timers, admission and pauses) and [`inline`] (the I/O actions, inline and
//! non-blocking); each driver adds its [`Reactor`](host::Reactor) only:
//!
//! - `uring`: one io_uring per worker: multishot accept, connect, readiness polls, cancels
//!   and timed waits are ring operations;
//! - `epoll`: mio (edge-triggered epoll) readiness and a non-blocking `connect`.
//!
//! Payload moves with `relay = "splice"` (the default) through a per-direction pipe
//! (splice(2) in and out: payload never enters user space), or with `relay = "copy"`
//! through a per-direction user-space buffer (ring receives into provided buffers and ring
//! sends on io_uring; read(2), send(2) on epoll). Imports go
//! downward only: drivers -> session core -> pure modules. [`select`] probes once at start
//! and says what it chose and why.

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::worker::WorkerContext;
use crate::EngineError;

mod buffers;
mod conn;
mod epoll;
mod host;
mod inline;
mod pipes;
mod schedule;
mod slots;
mod uring;

pub use uring::DEFAULT_RING_BUFFERS;

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

/// Runs one worker's loop on the chosen driver until it is drained.
pub(crate) fn run(kind: DriverKind, ctx: WorkerContext) -> io::Result<()> {
    match kind {
        DriverKind::Uring => {
            host::run(ctx, uring::Uring::new, "ring", host::Host::<uring::Uring>::run_loop)
        }
        DriverKind::Epoll => {
            host::run(ctx, epoll::Epoll::new, "poll", host::Host::<epoll::Epoll>::run_loop)
        }
    }
}
