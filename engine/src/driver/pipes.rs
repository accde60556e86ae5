//! The per-worker pipe pool. A direction borrows a pipe when it has bytes to move and gives
//! it back when the pipe is empty again, so an idle session holds no pipe (two fds saved per
//! direction). A pipe that still holds bytes is never returned: it is closed with its
//! session instead.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::counters::WorkerStats;
use crate::sys::Pipe;

/// Spare pipes kept per worker (each holds two fds).
pub const SPARE_PIPES: usize = 64;

#[derive(Debug)]
pub(crate) struct PipePool {
    size: usize,
    spare: Vec<Pipe>,
    /// Where the number of spare pipes is published (`spare_pipes`).
    stats: Arc<WorkerStats>,
}

impl PipePool {
    pub fn new(size: usize, stats: Arc<WorkerStats>) -> Self {
        Self { size, spare: Vec::new(), stats }
    }

    pub fn take(&mut self) -> io::Result<Pipe> {
        if let Some(p) = self.spare.pop() {
            self.publish();
            return Ok(p);
        }
        Pipe::new(self.size)
    }

    /// Returns an empty pipe to the pool. `buffered` is what the borrower knows is still
    /// inside; a non-empty pipe is closed rather than reused.
    pub fn give(&mut self, pipe: Pipe, buffered: usize) {
        if buffered == 0 && self.spare.len() < SPARE_PIPES {
            debug_assert_eq!(
                pipe.buffered().unwrap_or(0),
                0,
                "a pipe with bytes went back to the pool"
            );
            self.spare.push(pipe);
            self.publish();
        }
    }

    fn publish(&self) {
        self.stats.spare_pipes.store(self.spare.len() as u64, Ordering::Relaxed);
    }

    /// Bytes each pipe is asked to hold (the kernel may round up).
    pub fn size(&self) -> usize {
        self.size
    }
}
