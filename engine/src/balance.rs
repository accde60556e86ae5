//! Backend choice: a [`Pool`] of backends and the order in which a session tries them.
//! Pure: no I/O. Shared by all workers, so the cursor is an atomic.
//!
//! Round-robin: each new session starts at the next backend; a refused or timed-out
//! connect moves on to the following one, at most [`Pool::attempts`] times. Backends that
//! are draining or disabled (admin API) are skipped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::events::BackendState;

/// At most this many backends are tried for one session before the client is closed.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;

/// One backend server: its address and its shared state (admin state, counters).
#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
}

impl Backend {
    /// A backend with fresh state.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, state: Arc::new(BackendState::new(addr)) }
    }
}

/// A set of interchangeable backends with a round-robin cursor.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Backend>,
    cursor: AtomicUsize,
    attempts: usize,
}

impl Pool {
    pub fn new(backends: Vec<Backend>) -> Self {
        let attempts = backends.len().min(DEFAULT_CONNECT_ATTEMPTS);
        Self { backends, cursor: AtomicUsize::new(0), attempts }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// How many connects a session may try before giving up.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// Starts a new session's walk over the pool: the index of its first backend.
    pub fn start(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// The backend for the `attempt`-th connect (0-based) of a walk that began at `start`:
    /// the `attempt`-th backend that accepts sessions, in pool order from `start`. `None`
    /// when the attempts are used up or no backend accepts sessions.
    pub fn pick(&self, start: usize, attempt: usize) -> Option<&Backend> {
        if attempt >= self.attempts || self.backends.is_empty() {
            return None;
        }
        let n = self.backends.len();
        (0..n)
            .map(|i| &self.backends[start.wrapping_add(i) % n])
            .filter(|b| b.state.accepts_sessions())
            .nth(attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::AdminState;

    fn pool(n: u16) -> Pool {
        Pool::new((0..n).map(|i| Backend::new(([127, 0, 0, 1], 9000 + i).into())).collect())
    }

    #[test]
    fn round_robin_spreads_sessions_evenly() {
        let pool = pool(3);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let first = pool.pick(pool.start(), 0).unwrap();
            counts[(first.addr.port() - 9000) as usize] += 1;
        }
        assert_eq!(counts, [1000, 1000, 1000]);
    }

    #[test]
    fn retries_walk_to_the_next_backends_and_stop() {
        let pool = pool(5);
        let start = pool.start();
        let ports: Vec<u16> =
            (0..10).map_while(|a| pool.pick(start, a)).map(|b| b.addr.port()).collect();
        assert_eq!(ports, vec![9000, 9001, 9002]);
    }

    #[test]
    fn small_pool_tries_each_backend_once() {
        let pool = pool(2);
        let start = pool.start();
        assert!(pool.pick(start, 1).is_some());
        assert!(pool.pick(start, 2).is_none());
        assert!(Pool::new(Vec::new()).pick(0, 0).is_none());
    }

    #[test]
    fn drained_and_disabled_backends_get_no_new_sessions() {
        let pool = pool(3);
        pool.backends()[0].state.set_admin(AdminState::Draining);
        pool.backends()[2].state.set_admin(AdminState::Disabled);
        for _ in 0..10 {
            let start = pool.start();
            assert_eq!(pool.pick(start, 0).unwrap().addr.port(), 9001);
            assert!(pool.pick(start, 1).is_none());
        }
        pool.backends()[1].state.set_admin(AdminState::Disabled);
        assert!(pool.pick(pool.start(), 0).is_none());
    }
}
