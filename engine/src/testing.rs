//! What tests and benchmarks of the engine need from its system layer, without opening it:
//! a counting allocator (to hold a path to allocating nothing), a send whose last bytes wait
//! for the FIN, and the number of segments a socket received.

use std::io;
use std::os::fd::AsFd;

pub use crate::sys::alloc::{all_allocations, allocations, CountingAlloc};

/// Sends `bytes` on a socket that is shut down right after, holding them (MSG_MORE) so
/// that they and the FIN leave in one segment.
pub fn send_before_fin(socket: &impl AsFd, bytes: &[u8]) -> io::Result<usize> {
    crate::sys::send(socket.as_fd(), bytes, crate::sys::Then::Fin)
}

/// Shuts a socket down for writing (its FIN).
pub fn shutdown_write(socket: &impl AsFd) -> io::Result<()> {
    crate::sys::shutdown_write(socket.as_fd())
}

/// Segments a TCP socket has received so far (TCP_INFO `tcpi_segs_in`).
pub fn segments_in(socket: &impl AsFd) -> io::Result<u32> {
    crate::sys::segments_in(socket.as_fd())
}
