//! sluice-engine: the data plane of sluice, a thread-per-core Layer-4 forwarding engine.
//!
//! It knows nothing of files or signals: the control crate compiles configuration into
//! [`tables::Tables`], publishes them through an `ArcSwap`, and starts an [`Engine`]. Each
//! pinned worker accepts on its own SO_REUSEPORT listeners and runs its driver (io_uring,
//! or epoll where io_uring is unavailable) over the same sans-IO [`session`] core. Payload
//! moves, by default, with splice(2) through pipes (`relay = "splice"`: it never enters
//! user space) or through a per-direction user-space buffer (`relay = "copy"`: ring
//! receives into provided buffers and ring sends on io_uring, read(2)/send(2) on epoll).
//!
//! Layers, each importing only from those below it:
//! - [`engine`]: start, publish (reload), stop;
//! - `driver` (io_uring, epoll) and [`udp`]: the loops, which carry out what the session
//!   core asks; [`worker`]: what a loop is given; [`events`]: how records leave a worker;
//!   [`capture`]: the capture thread and taps;
//! - [`session`]: one TCP session's life, sans-IO; [`admission`]: session caps;
//! - the pure modules: [`tables`], [`acl`], [`balance`], [`limits`], [`shape`],
//!   [`clients`], [`proxy`], [`sni`], [`record`], [`counters`], [`side`],
//!   [`socket_options`].
//!
//! `unsafe` is denied everywhere but in `sys` (system calls) and the io_uring driver's
//! operations; see STYLE.md.
#![deny(unsafe_code)]

use std::io;
use std::net::SocketAddr;

pub mod accounting;
pub mod acl;
pub mod admission;
pub mod balance;
pub mod capture;
pub mod clients;
pub mod counters;
mod driver;
pub mod engine;
pub mod events;
pub mod handover;
pub mod limits;
pub mod proxy;
pub mod record;
pub mod session;
pub mod shape;
pub mod side;
pub mod sni;
pub mod socket_options;
#[allow(unsafe_code)]
mod sys;
pub mod tables;
pub mod testing;
pub mod udp;
pub mod worker;

pub use driver::{
    select as select_driver, DriverChoice, DriverKind, Selection, DEFAULT_RING_BUFFERS,
};
pub use engine::{Engine, EngineConfig};
pub use handover::Inherited;
pub use worker::Relay;

/// Why the engine could not start or a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("driver {driver} unavailable: {reason}")]
    DriverUnavailable { driver: &'static str, reason: String },
    #[error("cannot start worker {worker}: {source}")]
    Spawn { worker: usize, source: io::Error },
    #[error("worker {worker} failed: {source}")]
    Worker { worker: usize, source: io::Error },
    #[error("worker {worker} panicked")]
    Panicked { worker: usize },
    #[error("cannot set listener options: {0}")]
    Listeners(io::Error),
}
