//! The one error type of `sluice-bench`.
//!
//! Every variant names what it concerns: the address that failed to bind or connect, the file
//! that could not be read or written, the process that would not start. Syscall-level
//! `io::Error`s are wrapped here, at the crate boundary, never passed up bare.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A listener for an in-process backend could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    /// A client connection could not be established.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    /// Any other socket or thread operation.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
    /// An address outside 127.0.0.0/8 and ::1 was given.
    #[error("{0} is not a loopback address: sluice-bench only sends traffic to this machine")]
    NotLoopback(SocketAddr),
    /// The command line asked for something inconsistent.
    #[error("{0}")]
    Usage(String),
    /// Fewer connections than asked for reached the backend in time.
    #[error("only {reached} of {wanted} connections reached the backend within {waited:?}")]
    Incomplete { reached: u64, wanted: u64, waited: Duration },
    /// A load thread ended with an error or panicked.
    #[error("load thread {thread}: {detail}")]
    Thread { thread: String, detail: String },
    /// Figures about a process could not be read from /proc.
    #[error("process {pid}: {source}")]
    Process { pid: u32, source: io::Error },
    /// A proxy under comparison did not start or did not forward.
    #[error("{contender} did not start: {detail}")]
    ProxyStart { contender: String, detail: String },
    /// A peer configuration template is malformed or lacks a value.
    #[error("template {template}: {detail}")]
    Template { template: String, detail: String },
    /// A chart could not be drawn.
    #[error("chart {}: {detail}", path.display())]
    Chart { path: PathBuf, detail: String },
    /// A report could not be turned into JSON.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// SIGINT or SIGTERM arrived; children are stopped on the way out.
    #[error("interrupted")]
    Interrupted,
}

/// Result type used throughout the crate.
pub type Result<T> = std::result::Result<T, BenchError>;

/// Builds a closure that wraps an `io::Error` with a context line, for `map_err`.
pub fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}

/// Builds a closure that wraps an `io::Error` with the path it concerns, for `map_err`.
pub fn file_context(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> BenchError {
    let path = path.into();
    move |source| BenchError::File { path, source }
}
