//! Session caps: the engine-wide `max_sessions` and each service's, shared by every worker.
//! A connection is *admitted* when it takes a place under both; the place is held by an
//! [`Admitted`] until the session gives it back. Pure: atomics only, no I/O.
//!
//! Invariants: the check and the increment of a cap are one atomic step ([`reserve`]), so
//! workers admitting at the same moment never overshoot a cap together; a place is given
//! back exactly once, whatever way the session ends (explicitly at close, or on drop).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::counters::WorkerStats;
use crate::tables::{Service, Tables};

/// No engine-wide session cap unless configured: each session holds two fds (four more
/// while a splice relay moves bytes), so the process's fd limit is the natural bound, and
/// running out of fds pauses accepting instead of failing.
pub const DEFAULT_MAX_SESSIONS: Option<u64> = None;

/// Takes one place on `active` under `limit` (`None`: no limit); false when it is full.
pub fn reserve(active: &AtomicU64, limit: Option<u64>) -> bool {
    match limit {
        None => {
            active.fetch_add(1, Ordering::Relaxed);
            true
        }
        Some(limit) => active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .is_ok(),
    }
}

/// Whether `active` is below `limit` (`None`: no limit).
fn below(active: &AtomicU64, limit: Option<u64>) -> bool {
    limit.is_none_or(|limit| active.load(Ordering::Relaxed) < limit)
}

/// The engine-wide session cap, shared by every worker: a place is taken when a session
/// is admitted and given back when it finishes.
#[derive(Debug, Default)]
pub struct SessionCap {
    limit: Option<u64>,
    active: AtomicU64,
}

impl SessionCap {
    pub fn new(limit: Option<u64>) -> Self {
        Self { limit, active: AtomicU64::new(0) }
    }

    /// The cap; `None`: no cap.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Sessions holding a place now, across workers.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    fn release(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a new session on `listener` fits under the engine-wide cap and its service's
/// cap right now. Drivers ask before accepting; [`admit`] then takes the places atomically.
/// A listener no service owns has room (its connections are admitted and dropped by
/// `admit`).
pub fn has_room(tables: &Tables, cap: &SessionCap, listener: SocketAddr) -> bool {
    if !below(&cap.active, cap.limit) {
        return false;
    }
    let Some(service) = tables.service_for(listener) else { return true };
    let s = &tables.services()[service];
    below(&s.counters.active, s.max_sessions)
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No service owns the listener any more (removed by a reload): drop the connection.
    NoService,
    /// The engine-wide or the service's session cap is reached: keep the connection
    /// waiting and stop accepting until a place frees up.
    Full,
}

/// A connection admitted under the caps, with the tables that decide it for its whole life
/// (loaded once, `ArcSwap::load_full`): a reload changes new sessions only. It holds its
/// places until [`release`](Self::release) or drop.
#[derive(Debug)]
pub struct Admitted {
    pub tables: Arc<Tables>,
    /// The service's index in `tables`.
    pub service: usize,
    cap: Arc<SessionCap>,
    held: bool,
}

impl Admitted {
    pub fn service(&self) -> &Service {
        &self.tables.services()[self.service]
    }

    /// Gives the places back (once; later calls and the drop do nothing).
    pub fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.service().counters.active.fetch_sub(1, Ordering::Relaxed);
            self.cap.release();
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.release();
    }
}

/// Admits a freshly accepted connection on `listener` under the current tables, taking a
/// place under the engine-wide cap and its service's cap, and counting the session.
pub fn admit(
    tables: &ArcSwap<Tables>,
    cap: &Arc<SessionCap>,
    listener: SocketAddr,
) -> Result<Admitted, Refusal> {
    let tables = tables.load_full();
    let service = tables.service_for(listener).ok_or(Refusal::NoService)?;
    let s = &tables.services()[service];
    if !reserve(&cap.active, cap.limit) {
        return Err(Refusal::Full);
    }
    if !reserve(&s.counters.active, s.max_sessions) {
        cap.release();
        return Err(Refusal::Full);
    }
    WorkerStats::add(&s.counters.sessions, 1);
    Ok(Admitted { tables, service, cap: cap.clone(), held: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{Backend, Pool};
    use crate::tables::Timeouts;

    fn tables(max_sessions: Option<u64>) -> (Tables, SocketAddr) {
        let listen: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let pool = Pool::new(vec![Backend::new("127.0.0.1:1".parse().unwrap())]);
        let mut web = Service::new("web", vec![listen], pool, Timeouts::default());
        web.max_sessions = max_sessions;
        (Tables::new(1, vec![web]), listen)
    }

    #[test]
    fn reserve_takes_places_up_to_the_limit_and_no_further() {
        let active = AtomicU64::new(0);
        assert!((0..3).all(|_| reserve(&active, Some(3))));
        assert!(!reserve(&active, Some(3)));
        assert_eq!(active.load(Ordering::Relaxed), 3, "a refusal takes nothing");
        assert!(reserve(&active, None), "no limit, always room");
    }

    #[test]
    fn workers_reserving_at_once_never_overshoot_the_cap() {
        let active = Arc::new(AtomicU64::new(0));
        let taken: u64 = (0..4)
            .map(|_| {
                let active = active.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| reserve(&active, Some(100))).count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap() as u64)
            .sum();
        assert_eq!(taken, 100);
        assert_eq!(active.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn an_admitted_connection_holds_its_places_until_released() {
        let (t, listen) = tables(Some(1));
        let swap = ArcSwap::from_pointee(t);
        let cap = Arc::new(SessionCap::new(Some(5)));
        let mut first = admit(&swap, &cap, listen).unwrap();
        assert_eq!(cap.active(), 1);
        assert!(!has_room(&swap.load(), &cap, listen), "the service's cap of 1 is full");
        assert_eq!(admit(&swap, &cap, listen).unwrap_err(), Refusal::Full);
        assert_eq!(cap.active(), 1, "a refusal gives back the engine-wide place");
        first.release();
        first.release();
        assert_eq!(cap.active(), 0, "released once, however often asked");
        assert!(has_room(&swap.load(), &cap, listen));
        drop(first);
        assert_eq!(cap.active(), 0, "the drop of a released place gives nothing back twice");
        let dropped = admit(&swap, &cap, listen).unwrap();
        drop(dropped);
        assert_eq!(
            (cap.active(), swap.load().services()[0].counters.active.load(Ordering::Relaxed)),
            (0, 0)
        );
        let other: SocketAddr = "127.0.0.1:81".parse().unwrap();
        assert_eq!(admit(&swap, &cap, other).unwrap_err(), Refusal::NoService);
    }

    #[test]
    fn the_engine_wide_cap_counts_every_service() {
        let (t, listen) = tables(None);
        let swap = ArcSwap::from_pointee(t);
        let cap = Arc::new(SessionCap::new(Some(2)));
        let _a = admit(&swap, &cap, listen).unwrap();
        let _b = admit(&swap, &cap, listen).unwrap();
        assert!(!has_room(&swap.load(), &cap, listen));
        assert_eq!(admit(&swap, &cap, listen).unwrap_err(), Refusal::Full);
        assert_eq!(swap.load().services()[0].counters.active.load(Ordering::Relaxed), 2);
    }
}
