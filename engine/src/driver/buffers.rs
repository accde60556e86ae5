//! User-space relay buffers, for the copy relays (the epoll driver, and the io_uring driver
//! with `relay = "copy"`). A direction holds a buffer only while it has bytes in flight;
//! idle directions give theirs back to the worker's pool.
//!
//! Buffers come in two sizes. A direction starts with a small one; once a read fills it
//! (a bulk stream), the direction takes large ones from then on, so bulk transfers move in
//! few large system calls while request/response traffic and stalled peers hold at most a
//! small buffer each.

/// The size every direction starts with (capped by the configured buffer size).
pub const SMALL_BUFFER: usize = 64 * 1024;
/// Bytes of spare buffers a worker keeps per size class.
const SPARE_BYTES: usize = 16 << 20;

/// A per-worker pool of relay buffers of two sizes.
#[derive(Debug)]
pub(crate) struct BufferPool {
    small: Class,
    large: Class,
}

#[derive(Debug)]
struct Class {
    size: usize,
    spare: Vec<Box<[u8]>>,
}

impl Class {
    fn take(&mut self) -> Box<[u8]> {
        self.spare.pop().unwrap_or_else(|| vec![0; self.size].into_boxed_slice())
    }

    fn give(&mut self, buf: Box<[u8]>) {
        if (self.spare.len() + 1) * self.size <= SPARE_BYTES {
            self.spare.push(buf);
        }
    }
}

impl BufferPool {
    /// A pool whose large buffers are `max` bytes (at most 1 GiB).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(4096, 1 << 30);
        let small = SMALL_BUFFER.min(max);
        Self {
            small: Class { size: small, spare: Vec::new() },
            large: Class { size: max, spare: Vec::new() },
        }
    }

    fn class(&mut self, len: usize) -> &mut Class {
        if len == self.large.size {
            &mut self.large
        } else {
            &mut self.small
        }
    }
}

/// Bytes read from a source and not yet written to the destination.
#[derive(Debug, Default)]
pub(crate) struct Buffer {
    data: Option<Box<[u8]>>,
    /// Offsets into `data` (a buffer is far smaller than 4 GiB).
    start: u32,
    end: u32,
    /// A read once filled a whole buffer: take large ones from now on.
    bulk: bool,
}

impl Buffer {
    /// The bytes still to write.
    pub fn pending(&self) -> &[u8] {
        self.data.as_deref().map_or(&[], |d| &d[self.start as usize..self.end as usize])
    }

    /// `n` pending bytes were written.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start as usize + n).min(self.end as usize) as u32;
    }

    /// A whole empty buffer to read into (taken from the pool if none is held).
    pub fn space(&mut self, pool: &mut BufferPool) -> &mut [u8] {
        self.start = 0;
        self.end = 0;
        let class = if self.bulk { &mut pool.large } else { &mut pool.small };
        self.data.get_or_insert_with(|| class.take())
    }

    /// Whether a read once filled a whole buffer (a bulk stream).
    pub fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// Reads into small buffers from now on, however full they come back.
    pub fn stay_small(&mut self) {
        self.bulk = false;
    }

    /// `n` bytes were read into the space.
    pub fn filled(&mut self, n: usize) {
        self.start = 0;
        self.end = n as u32;
        if self.data.as_ref().is_some_and(|d| n == d.len()) {
            self.bulk = true;
        }
    }

    /// Gives the buffer back to the pool (its contents are discarded).
    pub fn release(&mut self, pool: &mut BufferPool) {
        if let Some(data) = self.data.take() {
            pool.class(data.len()).give(data);
        }
        self.start = 0;
        self.end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_held_only_while_bytes_are_pending() {
        let mut pool = BufferPool::new(1 << 20);
        let mut buf = Buffer::default();
        assert!(buf.pending().is_empty());
        buf.space(&mut pool)[..3].copy_from_slice(b"abc");
        buf.filled(3);
        buf.consume(1);
        assert_eq!(buf.pending(), b"bc");
        buf.release(&mut pool);
        assert!(buf.pending().is_empty());
        assert_eq!(pool.small.spare.len(), 1);
        assert_eq!(buf.space(&mut pool).len(), SMALL_BUFFER);
        assert!(pool.small.spare.is_empty(), "the spare buffer was reused");
    }

    #[test]
    fn a_direction_that_fills_its_buffer_moves_to_large_buffers() {
        let mut pool = BufferPool::new(1 << 20);
        let mut buf = Buffer::default();
        let n = buf.space(&mut pool).len();
        buf.filled(n - 1);
        buf.release(&mut pool);
        assert_eq!(buf.space(&mut pool).len(), SMALL_BUFFER, "a short read stays small");
        buf.filled(SMALL_BUFFER);
        buf.release(&mut pool);
        assert_eq!(buf.space(&mut pool).len(), 1 << 20);
        buf.release(&mut pool);
        assert_eq!((pool.small.spare.len(), pool.large.spare.len()), (1, 1));
    }

    #[test]
    fn spare_buffers_are_bounded_in_bytes() {
        let mut pool = BufferPool::new(4 << 20);
        let mut held: Vec<Buffer> =
            (0..10).map(|_| Buffer { bulk: true, ..Buffer::default() }).collect();
        for b in &mut held {
            b.space(&mut pool);
        }
        for b in &mut held {
            b.release(&mut pool);
        }
        assert_eq!(pool.large.spare.len(), 4);
    }
}
