//! What both drivers schedule: session deadlines (a heap with one entry per session, moved
//! lazily and removed with the session), listeners paused after the process ran out of fds
//! or memory (with one rate-limited warning per process), and listeners paused on a full
//! session cap (re-checked on a short timer, since another worker may free the place).
//!
//! Invariant: a paused listener is never accepted on (epoll: `accept` is not called; io_uring:
//! its multishot accept is cancelled and not re-armed), so a paused listener costs no CPU
//! and accepts no connection it would have to close.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::slots::SlotId;
use crate::sys;

/// How long a listener first pauses after the process ran out of fds or memory: short
/// enough that service resumes promptly once fds free up.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause: each failure soon after the previous pause ended ([`BACKOFF_STREAK`])
/// doubles the pause up to this, so a process that stays saturated tries 2 times a second
/// per listener and costs almost no CPU.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A failure this soon after a listener's last pause ended continues its streak.
const BACKOFF_STREAK: Duration = Duration::from_secs(1);
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

/// Session deadlines: a binary min-heap with at most one entry per session slot, indexed by
/// slot so that a session's entry is moved in place and removed when the session is freed.
/// Memory and work follow the sessions alive, not the connection rate: an entry left behind
/// by every closed session would stay until its time (a connect timeout, seconds later),
/// and at thousands of connections a second that is a heap of tens of thousands of stale
/// entries, each costing a pop.
///
/// A session also records its entry's time (`armed`). Deadlines move lazily: a later one
/// leaves the entry where it is (nothing to do on every byte relayed), and the expired
/// entry is re-set to the real deadline when it is reached; an earlier one moves it at once.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    heap: Vec<(Instant, SlotId)>,
    /// Where each slot index's entry sits in `heap`, or [`NO_ENTRY`].
    at: Vec<u32>,
}

/// A slot with no entry in the heap.
const NO_ENTRY: u32 = u32::MAX;

impl Deadlines {
    /// Makes sure an entry at or before `deadline` exists for `id`.
    pub fn arm(&mut self, id: SlotId, armed: &mut Option<Instant>, deadline: Instant) {
        if armed.is_none_or(|a| deadline < a) {
            self.set(id, armed, deadline);
        }
    }

    /// Schedules `id` at `deadline`, in place of any entry its slot has.
    pub fn set(&mut self, id: SlotId, armed: &mut Option<Instant>, deadline: Instant) {
        *armed = Some(deadline);
        let slot = id.index as usize;
        if slot >= self.at.len() {
            self.at.resize(slot + 1, NO_ENTRY);
        }
        let pos = self.at[slot];
        if pos == NO_ENTRY {
            self.heap.push((deadline, id));
            let last = self.heap.len() - 1;
            self.at[slot] = last as u32;
            self.sift_up(last);
        } else {
            let pos = pos as usize;
            let earlier = deadline < self.heap[pos].0;
            self.heap[pos] = (deadline, id);
            if earlier {
                self.sift_up(pos);
            } else {
                self.sift_down(pos);
            }
        }
    }

    /// Drops the entry of `id`'s slot, if it has one (the session is being freed).
    pub fn remove(&mut self, id: SlotId) {
        let Some(&pos) = self.at.get(id.index as usize) else { return };
        if pos != NO_ENTRY {
            self.take(pos as usize);
        }
    }

    /// The earliest entry's time.
    pub fn next(&self) -> Option<Instant> {
        self.heap.first().map(|&(t, _)| t)
    }

    /// Takes the next entry due at `now`; the caller checks it against the session's
    /// `armed` time.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, SlotId)> {
        let &(at, _) = self.heap.first()?;
        if at > now {
            return None;
        }
        Some(self.take(0))
    }

    /// Entries in the heap.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
    }

    /// Removes the entry at `pos`, moving the last entry into its place.
    fn take(&mut self, pos: usize) -> (Instant, SlotId) {
        let entry = self.heap.swap_remove(pos);
        self.at[entry.1.index as usize] = NO_ENTRY;
        if pos < self.heap.len() {
            self.at[self.heap[pos].1.index as usize] = pos as u32;
            self.sift_up(pos);
            self.sift_down(pos);
        }
        entry
    }

    fn sift_up(&mut self, mut pos: usize) {
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if self.heap[parent].0 <= self.heap[pos].0 {
                break;
            }
            self.swap(pos, parent);
            pos = parent;
        }
    }

    fn sift_down(&mut self, mut pos: usize) {
        loop {
            let left = 2 * pos + 1;
            if left >= self.heap.len() {
                break;
            }
            let right = left + 1;
            let child = if right < self.heap.len() && self.heap[right].0 < self.heap[left].0 {
                right
            } else {
                left
            };
            if self.heap[pos].0 <= self.heap[child].0 {
                break;
            }
            self.swap(pos, child);
            pos = child;
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.at[self.heap[a].1.index as usize] = a as u32;
        self.at[self.heap[b].1.index as usize] = b as u32;
    }
}

/// Listeners whose accepting is paused, by index, until a time.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    paused: Vec<(Instant, usize)>,
    /// The last pause of each listener that had one: its index, length and end.
    last: Vec<(usize, Duration, Instant)>,
}

impl AcceptBackoff {
    /// Pauses listener `index` ([`ACCEPT_BACKOFF`], doubled up to [`ACCEPT_BACKOFF_MAX`] for
    /// each failure within [`BACKOFF_STREAK`] of the last pause's end) and warns, at most
    /// once per interval across the process; false when it was paused already.
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
        let length = match self.last.iter().find(|l| l.0 == index) {
            Some(&(_, length, end)) if now.saturating_duration_since(end) < BACKOFF_STREAK => {
                (length * 2).min(ACCEPT_BACKOFF_MAX)
            }
            _ => ACCEPT_BACKOFF,
        };
        self.last.retain(|l| l.0 != index);
        self.last.push((index, length, now + length));
        self.paused.push((now + length, index));
        if may_warn(now) {
            log::warn!(
                "worker {worker}: accept paused for {length:?} on {addr}: {error} (open fds: {}; further pauses for {WARN_INTERVAL:?} are only counted)",
                sys::fd_usage()
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
        self.last.retain(|l| l.0 != index);
    }

    /// Forgets every listener (the worker is draining).
    pub fn clear(&mut self) {
        self.paused.clear();
        self.last.clear();
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
        assert_eq!(d.len(), 0, "one entry per session: moving it earlier left nothing behind");
    }

    #[test]
    fn a_freed_session_leaves_no_entry_behind() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        let mut armed = [None; 3];
        for (i, armed) in armed.iter_mut().enumerate() {
            d.arm(id(i as u32), armed, t0 + Duration::from_secs(5 + i as u64));
        }
        d.remove(id(0));
        d.remove(id(0));
        assert_eq!((d.len(), d.next()), (2, Some(t0 + Duration::from_secs(6))));
        d.remove(id(2));
        d.remove(id(7));
        assert_eq!(
            d.pop_due(t0 + Duration::from_secs(60)),
            Some((t0 + Duration::from_secs(6), id(1)))
        );
        assert_eq!((d.len(), d.next()), (0, None));
    }

    #[test]
    fn a_reused_slot_replaces_the_entry_of_its_last_session() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        let (mut old, mut new) = (None, None);
        d.arm(id(4), &mut old, t0 + Duration::from_secs(5));
        let reused = SlotId { index: 4, gen: 1 };
        d.set(reused, &mut new, t0 + Duration::from_secs(9));
        assert_eq!(d.len(), 1);
        assert_eq!(
            d.pop_due(t0 + Duration::from_secs(9)),
            Some((t0 + Duration::from_secs(9), reused))
        );
    }

    /// Random arms, sets, removals and pops against a plain list of (slot, time): the heap
    /// always yields the earliest entry and holds exactly one entry per scheduled slot.
    #[test]
    fn the_heap_agrees_with_a_plain_model_over_random_operations() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        let mut armed: Vec<Option<Instant>> = vec![None; 64];
        let mut model: Vec<Option<Instant>> = vec![None; 64];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let mut now = t0;
        for _ in 0..20_000 {
            let slot = next(64) as usize;
            let at = now + Duration::from_millis(next(1_000));
            match next(4) {
                0 => {
                    d.arm(id(slot as u32), &mut armed[slot], at);
                    if model[slot].is_none_or(|m| at < m) {
                        model[slot] = Some(at);
                    }
                }
                1 => {
                    d.set(id(slot as u32), &mut armed[slot], at);
                    model[slot] = Some(at);
                }
                2 => {
                    d.remove(id(slot as u32));
                    armed[slot] = None;
                    model[slot] = None;
                }
                _ => {
                    now += Duration::from_millis(next(50));
                    while let Some((at, got)) = d.pop_due(now) {
                        let slot = got.index as usize;
                        assert_eq!(model[slot], Some(at), "popped what the model holds");
                        let earliest = model.iter().flatten().min().copied();
                        assert_eq!(earliest, Some(at), "popped the earliest entry");
                        model[slot] = None;
                        armed[slot] = None;
                    }
                }
            }
            assert_eq!(d.len(), model.iter().flatten().count());
            assert_eq!(d.next(), model.iter().flatten().min().copied());
        }
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
    fn pauses_double_while_failures_continue_and_start_over_after_a_quiet_second() {
        let mut b = AcceptBackoff::default();
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        let addr = "127.0.0.1:1".parse().unwrap();
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..6 {
            assert!(b.pause(0, 2, addr, &error, now));
            assert!(!b.pause(0, 2, addr, &error, now), "pausing twice is one pause");
            let end = b.next().unwrap();
            lengths.push((end - now).as_millis());
            assert_eq!(b.due(end), vec![2]);
            // The accept fails again as soon as the pause is over.
            now = end;
        }
        assert_eq!(lengths, [100, 200, 400, 500, 500, 500]);
        // A failure well after the last pause ended starts from the first length again.
        now += BACKOFF_STREAK;
        b.pause(0, 2, addr, &error, now);
        assert_eq!(b.next(), Some(now + ACCEPT_BACKOFF));
        // Another listener has a streak of its own.
        b.pause(0, 5, addr, &error, now);
        assert_eq!(b.due(now + ACCEPT_BACKOFF), vec![2, 5]);
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
