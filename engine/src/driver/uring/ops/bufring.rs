//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19+): a fixed set of equal
//! buffers the kernel picks from when a receive completes (`IOSQE_BUFFER_SELECT`), so a
//! session waiting for bytes holds no buffer at all. A buffer the kernel filled belongs to
//! the lane that received it until its bytes are sent on; then it goes back to the ring.
//!
//! Invariants: the ring's entries and the buffers are allocated once and outlive the
//! registration (the ring is unregistered before they are freed); a buffer id is given back
//! exactly once per time the kernel handed it out; entries are published to the kernel
//! with a release store of the tail, after they are written.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// Alignment the kernel requires of the ring's entries.
const PAGE: usize = 4096;

/// One group of provided buffers, registered with a ring.
pub(crate) struct BufRing {
    group: u16,
    count: u16,
    size: u32,
    /// `count` entries, page-aligned, shared with the kernel.
    entries: NonNull<BufRingEntry>,
    /// `count * size` bytes of buffers.
    buffers: NonNull<u8>,
    /// Our copy of the tail (the kernel's is in the first entry's reserved field).
    tail: u16,
    /// Buffers handed out by the kernel and not given back yet.
    out: u32,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("group", &self.group)
            .field("count", &self.count)
            .field("size", &self.size)
            .field("out", &self.out)
            .finish()
    }
}

impl BufRing {
    /// Allocates `count` buffers of `size` bytes (`count` a power of two, at most 32,768),
    /// registers them as group `group` of `ring` and gives them all to the kernel.
    pub fn new(ring: &IoUring, group: u16, count: u16, size: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 1 << 15 || size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad buffer ring shape"));
        }
        let entries_layout = Self::entries_layout(count)?;
        let buffers_layout = Self::buffers_layout(count, size)?;
        // SAFETY: both layouts have a non-zero size (count >= 1, size >= 1).
        let entries = NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) })
            .ok_or(io::ErrorKind::OutOfMemory)?;
        // SAFETY: as above. The buffers are left uninitialised: the kernel writes a buffer
        // before anyone reads it, and only the bytes it wrote are ever read.
        let Some(buffers) = NonNull::new(unsafe { alloc::alloc(buffers_layout) }) else {
            // SAFETY: `entries` was allocated just above with this layout.
            unsafe { alloc::dealloc(entries.as_ptr(), entries_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        let mut buf_ring = BufRing {
            group,
            count,
            size,
            entries: entries.cast(),
            buffers,
            tail: 0,
            out: u32::from(count),
        };
        // SAFETY: the entries are page-aligned, zeroed and `count` long, and stay allocated
        // until this value is dropped, after the ring has forgotten them (`drop` unregisters
        // them first; a ring that is dropped before forgets them too).
        let registered = unsafe {
            ring.submitter().register_buf_ring_with_flags(
                buf_ring.entries.as_ptr() as u64,
                count,
                group,
                0,
            )
        };
        registered?;
        for bid in 0..count {
            buf_ring.give(bid);
        }
        Ok(buf_ring)
    }

    fn entries_layout(count: u16) -> io::Result<Layout> {
        let bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        Layout::from_size_align(bytes.max(PAGE), PAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn buffers_layout(count: u16, size: u32) -> io::Result<Layout> {
        let bytes = usize::from(count) * size as usize;
        Layout::from_size_align(bytes, PAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// The group id receives name to select from this ring.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Bytes in each buffer.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Buffers in all.
    pub fn count(&self) -> u32 {
        u32::from(self.count)
    }

    /// Buffers out of the ring now (held by lanes or being filled).
    pub fn out(&self) -> u32 {
        self.out
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn give(&mut self, bid: u16) {
        debug_assert!(bid < self.count && self.out > 0, "buffer {bid} given back twice");
        let mask = self.count - 1;
        let slot = usize::from(self.tail & mask);
        // SAFETY: `slot` < `count`, so the entry is inside the allocation; the kernel reads
        // entries only up to the published tail, which does not cover this one yet.
        let entry = unsafe { &mut *self.entries.as_ptr().add(slot) };
        // SAFETY: `bid` < `count`, so the buffer lies inside the buffers' allocation.
        let addr = unsafe { self.buffers.as_ptr().add(usize::from(bid) * self.size as usize) };
        entry.set_addr(addr as u64);
        entry.set_len(self.size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the entries start at a page-aligned address and are initialised; the tail
        // field of the first entry is a u16 the kernel reads with acquire semantics, so it is
        // written with a release store after the entry above.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
        self.out -= 1;
    }

    /// The kernel handed buffer `bid` out (a receive's completion says so).
    pub fn taken(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        self.out += 1;
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled.
    pub fn bytes(&self, bid: u16, start: u32, len: u32) -> &[u8] {
        let (start, len) = (start.min(self.size), len.min(self.size - start.min(self.size)));
        let offset = usize::from(bid.min(self.count.saturating_sub(1))) * self.size as usize;
        // SAFETY: the range lies inside buffer `bid` (clamped above), inside the allocation;
        // the kernel wrote those bytes before its completion said so, and does not write the
        // buffer again until it is given back.
        unsafe {
            std::slice::from_raw_parts(
                self.buffers.as_ptr().add(offset + start as usize),
                len as usize,
            )
        }
    }

    /// A pointer to byte `start` of buffer `bid`, for a send of its bytes: valid until the
    /// buffer is given back, which happens only after that send completes.
    pub fn ptr(&self, bid: u16, start: u32) -> *const u8 {
        self.bytes(bid, start, 0).as_ptr()
    }

    /// A pointer to byte `start` of buffer `bid`, for a receive into its rest, by the lane
    /// that holds it (the kernel does not touch a buffer it handed out).
    pub fn ptr_mut(&mut self, bid: u16, start: u32) -> *mut u8 {
        self.ptr(bid, start).cast_mut()
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // The layouts were valid when the ring was made.
        let (Ok(entries), Ok(buffers)) =
            (Self::entries_layout(self.count), Self::buffers_layout(self.count, self.size))
        else {
            return;
        };
        // SAFETY: both allocations were made in `new` with these layouts. Their owner
        // unregisters them, or drops the ring they were registered with, before it drops
        // them, so the kernel refers to neither any more.
        unsafe {
            alloc::dealloc(self.entries.as_ptr().cast(), entries);
            alloc::dealloc(self.buffers.as_ptr(), buffers);
        }
    }
}
