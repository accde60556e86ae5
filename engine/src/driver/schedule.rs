//! What both drivers schedule: session deadlines (a heap with one live entry per session,
//! moved lazily), listeners paused after the process ran out of fds or memory (with one
//! rate-limited warning per process), and listeners paused on a full session cap
//! (re-checked on a short timer, since another worker may free the place).
//!
//! Invariant: a paused listener is never accepted on (epoll: `accept` is not called; io_uring:
//! its multishot accept is cancelled and not re-armed), so a paused listener costs no CPU
//! and accepts no connection it would have to close.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::slots::SlotId;
use crate::sys;

/// How long a listener pauses after the process ran out of fds or memory: long enough that
/// a saturated process costs almost no CPU (5 tries a second per listener), short enough
/// that service resumes promptly once fds free up.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// At most one "accept paused" warning per process per this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How often a listener paused on a full session cap checks again for room. Places freed
/// by this worker's own sessions are noticed at once; this bounds how late one freed by
/// another worker is noticed.
pub const CAP_RECHECK: Duration = Duration::from_millis(20);

/// When the last "accept paused" warning was logged, in ms since [`epoch`] plus one (0:
/// never), shared by every worker.
static LAST_WARN: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether a warning may be logged at `now` (at most one per [`WARN_INTERVAL`] per
/// process); claims the slot when it may.
fn may_warn(now: Instant) -> bool {
    let at = now.saturating_duration_since(epoch()).as_millis() as u64 + 1;
    let interval = WARN_INTERVAL.as_millis() as u64;
    LAST_WARN
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            (last == 0 || at >= last + interval).then_some(at)
        })
        .is_ok()
}

/// Session deadlines. A session records the deadline of its live entry (`armed`); an entry
/// whose time no longer matches is stale and skipped, so deadlines that move later cost
/// nothing until they are reached.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, SlotId)>>,
}

impl Deadlines {
    /// Makes sure an entry at or before `deadline` exists for `id`.
    pub fn arm(&mut self, id: SlotId, armed: &mut Option<Instant>, deadline: Instant) {
        if armed.is_none_or(|a| deadline < a) {
            self.set(id, armed, deadline);
        }
    }

    /// Schedules `id` at `deadline` (after its entry was taken).
    pub fn set(&mut self, id: SlotId, armed: &mut Option<Instant>, deadline: Instant) {
        *armed = Some(deadline);
        self.heap.push(Reverse((deadline, id)));
    }

    /// The earliest entry's time.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Takes the next entry due at `now`; the caller checks it against the session's
    /// `armed` time to skip stale ones.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, SlotId)> {
        let &Reverse((at, id)) = self.heap.peek()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        Some((at, id))
    }
}

/// Listeners whose accepting is paused, by index, until a time.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    paused: Vec<(Instant, usize)>,
}

impl AcceptBackoff {
    /// Pauses listener `index` for [`ACCEPT_BACKOFF`] and warns, at most once per interval
    /// across the process; false when it was paused already.
    pub fn pause(
        &mut self,
        worker: usize,
        index: usize,
        addr: SocketAddr,
        error: &io::Error,
        now: Instant,
    ) -> bool {
        if self.is_paused(index) {
            return false;
        }
        self.paused.push((now + ACCEPT_BACKOFF, index));
        if may_warn(now) {
            log::warn!(
                "worker {worker}: accept paused for {ACCEPT_BACKOFF:?} on {addr}: {error} (open fds: {}; further pauses for {WARN_INTERVAL:?} are only counted)",
                sys::open_fds()
            );
        }
        true
    }

    /// Whether listener `index` is paused.
    pub fn is_paused(&self, index: usize) -> bool {
        self.paused.iter().any(|&(_, i)| i == index)
    }

    /// Listeners whose pause is over at `now`, removed from the list.
    pub fn due(&mut self, now: Instant) -> Vec<usize> {
        let due = self.paused.iter().filter(|(t, _)| *t <= now).map(|&(_, i)| i).collect();
        self.paused.retain(|(t, _)| *t > now);
        due
    }

    /// When the next pause ends.
    pub fn next(&self) -> Option<Instant> {
        self.paused.iter().map(|(t, _)| *t).min()
    }

    /// Forgets listener `index` (it was closed).
    pub fn forget(&mut self, index: usize) {
        self.paused.retain(|&(_, i)| i != index);
    }

    /// Forgets every listener (the worker is draining).
    pub fn clear(&mut self) {
        self.paused.clear();
    }
}

/// Listeners paused because a session cap is full, re-checked every [`CAP_RECHECK`] (or at
/// once after [`poke`](Self::poke)).
#[derive(Debug, Default)]
pub(crate) struct FullPause {
    paused: Vec<usize>,
    next: Option<Instant>,
}

impl FullPause {
    /// Pauses listener `index`; false when it already was.
    pub fn pause(&mut self, index: usize, now: Instant) -> bool {
        if self.paused.contains(&index) {
            return false;
        }
        self.paused.push(index);
        self.next.get_or_insert(now + CAP_RECHECK);
        true
    }

    pub fn is_paused(&self, index: usize) -> bool {
        self.paused.contains(&index)
    }

    /// A session of this worker ended: re-check at the next turn.
    pub fn poke(&mut self, now: Instant) {
        if !self.paused.is_empty() {
            self.next = Some(now);
        }
    }

    /// When the paused listeners are next re-checked.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    /// The paused listeners when their re-check is due at `now`, taken off the list: the
    /// caller resumes those with room and pauses the others again.
    pub fn due(&mut self, now: Instant) -> Vec<usize> {
        if self.next.is_none_or(|t| t > now) {
            return Vec::new();
        }
        self.next = None;
        std::mem::take(&mut self.paused)
    }

    /// Forgets listener `index` (it was closed).
    pub fn forget(&mut self, index: usize) {
        self.paused.retain(|&i| i != index);
        if self.paused.is_empty() {
            self.next = None;
        }
    }

    /// Forgets every listener (the worker is draining).
    pub fn clear(&mut self) {
        self.paused.clear();
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u32) -> SlotId {
        SlotId { index, gen: 0 }
    }

    #[test]
    fn an_earlier_deadline_adds_an_entry_and_a_later_one_waits_for_the_old() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        let mut armed = None;
        d.arm(id(1), &mut armed, t0 + Duration::from_secs(10));
        d.arm(id(1), &mut armed, t0 + Duration::from_secs(20));
        assert_eq!(armed, Some(t0 + Duration::from_secs(10)), "a later deadline moves lazily");
        d.arm(id(1), &mut armed, t0 + Duration::from_secs(5));
        assert_eq!(d.next(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(d.pop_due(t0), None);
        assert_eq!(
            d.pop_due(t0 + Duration::from_secs(5)),
            Some((t0 + Duration::from_secs(5), id(1)))
        );
        assert_eq!(d.pop_due(t0 + Duration::from_secs(9)), None);
    }

    #[test]
    fn paused_listeners_come_back_when_their_pause_ends() {
        let t0 = Instant::now();
        let mut b = AcceptBackoff::default();
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        b.pause(0, 3, "127.0.0.1:1".parse().unwrap(), &error, t0);
        assert_eq!(b.next(), Some(t0 + ACCEPT_BACKOFF));
        assert!(b.due(t0).is_empty());
        assert_eq!(b.due(t0 + ACCEPT_BACKOFF), vec![3]);
        assert_eq!(b.next(), None);
    }

    #[test]
    fn full_listeners_are_rechecked_on_a_short_timer_or_at_once_when_poked() {
        let t0 = Instant::now();
        let mut f = FullPause::default();
        assert!(f.pause(1, t0));
        assert!(!f.pause(1, t0), "pausing twice is one pause");
        assert!(f.pause(4, t0 + Duration::from_millis(5)));
        assert_eq!(f.next(), Some(t0 + CAP_RECHECK));
        assert!(f.due(t0 + CAP_RECHECK / 2).is_empty());
        assert_eq!(f.due(t0 + CAP_RECHECK), vec![1, 4]);
        assert!(!f.is_paused(1) && f.next().is_none());
        let t1 = t0 + Duration::from_millis(100);
        f.pause(2, t1);
        f.poke(t1);
        assert_eq!(f.due(t1), vec![2]);
        f.poke(t1);
        assert_eq!(f.next(), None, "nothing paused, nothing to re-check");
    }

    #[test]
    fn the_exhaustion_warning_is_rate_limited_across_the_process() {
        let t = Instant::now() + Duration::from_secs(3600);
        let first = may_warn(t);
        assert!(!may_warn(t + Duration::from_secs(1)));
        assert!(!may_warn(t + WARN_INTERVAL / 2));
        assert!(first || may_warn(t + WARN_INTERVAL));
        assert!(may_warn(t + WARN_INTERVAL * 3));
    }
}
