//! What both drivers schedule: session deadlines (a heap with one live entry per session,
//! moved lazily) and listeners paused after the process ran out of fds or memory (with one
//! rate-limited warning).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::slots::SlotId;
use crate::sys;

/// How long a listener pauses after the process ran out of fds or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// At most one "accept paused" warning per worker per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

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
    last_warn: Option<Instant>,
}

impl AcceptBackoff {
    /// Pauses listener `index` for [`ACCEPT_BACKOFF`] and warns, at most once per interval.
    pub fn pause(
        &mut self,
        worker: usize,
        index: usize,
        addr: SocketAddr,
        error: &io::Error,
        now: Instant,
    ) {
        self.paused.push((now + ACCEPT_BACKOFF, index));
        if self.last_warn.is_none_or(|t| now >= t + WARN_INTERVAL) {
            self.last_warn = Some(now);
            log::warn!(
                "worker {worker}: accept paused for {ACCEPT_BACKOFF:?} on {addr}: {error} (open fds: {})",
                sys::open_fds()
            );
        }
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
}
