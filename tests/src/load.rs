//! Tests with timing bounds kept apart from load-heavy tests. A test whose verdict depends
//! on how fast something happens (a timeout within 100 ms, a rate within 5%, p99 within 2x)
//! holds [`timing_bound`] for its whole run: an exclusive lock; a test that loads the
//! machine (thousands of connections, GiB streams, a soak) holds [`load_heavy`]: a shared
//! one. So no timing-bound test runs while a heavy one does, in this process (the three
//! driver variants of a test run side by side) or in another test binary on the machine.
//!
//! Invariant: the lock is flock(2) on [`LOCK_FILE`], one open file per guard, released when
//! the guard drops (or the process dies); never taken twice by one test.

use std::fs::{File, OpenOptions};

use nix::fcntl::{Flock, FlockArg};

/// The file both kinds of test lock.
pub const LOCK_FILE: &str = "/tmp/sluice-tests-load.lock";

/// Held for the run of one test; releases its lock when dropped.
#[derive(Debug)]
pub struct LoadGuard {
    _lock: Flock<File>,
}

/// For a test with timing bounds: waits until no load-heavy or other timing-bound test
/// runs, and keeps them out until the guard drops.
pub fn timing_bound() -> LoadGuard {
    lock(FlockArg::LockExclusive)
}

/// For a load-heavy test: waits while a timing-bound test runs; heavy tests share it.
pub fn load_heavy() -> LoadGuard {
    lock(FlockArg::LockShared)
}

fn lock(kind: FlockArg) -> LoadGuard {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .unwrap_or_else(|e| panic!("open {LOCK_FILE}: {e}"));
    match Flock::lock(file, kind) {
        Ok(lock) => LoadGuard { _lock: lock },
        Err((_, e)) => panic!("flock {LOCK_FILE}: {e}"),
    }
}
