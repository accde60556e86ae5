//! A stop flag for a test's helper threads. It is set by the test, by its guard when the
//! guard is dropped (also while a failed assertion unwinds, so that no helper thread keeps a
//! scope waiting), and by itself once its deadline passes, so every loop that polls it is
//! bounded in time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A flag that helper threads poll between steps.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    deadline: Instant,
}

impl Stop {
    /// A flag that sets itself `limit` from now at the latest.
    pub fn after(limit: Duration) -> Stop {
        Stop { flag: AtomicBool::new(false), deadline: Instant::now() + limit }
    }

    pub fn set(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    /// Whether the threads should stop: set, or past the deadline.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    /// A guard that sets the flag when dropped.
    pub fn guard(&self) -> StopGuard<'_> {
        StopGuard(self)
    }
}

/// Sets its [`Stop`] when dropped.
#[derive(Debug)]
pub struct StopGuard<'a>(&'a Stop);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.0.set();
    }
}
