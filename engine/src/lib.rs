//! sluice-engine: the data plane of sluice, a thread-per-core Layer-4 forwarding engine.
//!
//! It knows nothing of files or signals: the control crate compiles configuration into
//! [`tables::Tables`], publishes them through an `ArcSwap`, and starts an [`Engine`]. Each
//! pinned worker accepts on its own SO_REUSEPORT listeners and relays with its driver:
//! io_uring with splice (zero-copy), or epoll (mio) where io_uring is unavailable.

use std::io;
use std::net::SocketAddr;

pub mod acl;
pub mod balance;
pub mod capture;
pub mod driver;
pub mod events;
pub mod limits;
pub mod proxy;
pub mod session;
pub mod shape;
pub mod sni;
pub mod sys;
pub mod tables;
pub mod udp;
pub mod worker;

pub use driver::{DriverChoice, DriverKind, Selection};
pub use worker::{Engine, EngineConfig};

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
}
