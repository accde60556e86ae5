//! The heap: a counting allocator for tests that hold a path to allocating nothing, and the
//! allocator settings a long-running process wants.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Allocations by every thread, through [`CountingAlloc`].
static ALL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting the allocations each thread makes. A test binary installs
/// it with `#[global_allocator] static A: CountingAlloc = CountingAlloc;` and compares
/// [`allocations`] before and after the code it holds to allocating nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

/// Allocations the calling thread has made through [`CountingAlloc`] so far (always 0 when
/// it is not the global allocator).
pub fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Allocations every thread has made through [`CountingAlloc`] so far.
pub fn all_allocations() -> u64 {
    ALL.load(Ordering::Relaxed)
}

fn count() {
    ALL.fetch_add(1, Ordering::Relaxed);
    // `try_with`: a thread being torn down has no counter left, and must still allocate.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is passed on unchanged to the system allocator, which upholds the
// trait's contract; counting touches only an atomic and a thread-local cell, neither of which allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` was allocated by `System` (through this type) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this type) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}
