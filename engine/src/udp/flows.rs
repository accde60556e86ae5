//! The UDP flow table of one worker: sans-IO, time passed in as `now`.
//!
//! A flow is keyed by (listener, client address:port) and carries a value (the driver's
//! upstream socket and accounting). Invariants:
//! - the table never holds more than its capacity: inserting into a full table evicts the
//!   least recently used flow and hands it back to the caller, who counts it;
//! - a flow expires once `idle` has passed since it was last used ([`FlowTable::touch`]);
//!   [`FlowTable::pop_expired`] returns it at the first call at or after that instant;
//! - every operation is O(1) except expiry (O(log n) per expired or rescheduled flow):
//!   recency is an intrusive doubly-linked list over a slab, deadlines a lazy min-heap
//!   with at most one live entry per flow, re-armed only when its flow was used meanwhile;
//! - deadlines saturate ([`deadline_after`]): an idle timeout longer than the clock can
//!   hold never expires and never panics.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Where a flow lives in the table: stable for the flow's life, reused after it.
pub type FlowId = usize;

const NONE: usize = usize::MAX;

#[derive(Debug)]
struct Entry<K, V> {
    key: K,
    value: V,
    last_used: Instant,
    idle: Duration,
    /// Distinguishes this flow from earlier occupants of the same slot in the heap.
    generation: u64,
    /// Towards the most recently used end.
    newer: usize,
    /// Towards the least recently used end.
    older: usize,
}

/// A bounded map of flows with LRU eviction and idle expiry.
#[derive(Debug)]
pub struct FlowTable<K, V> {
    index: HashMap<K, FlowId>,
    slots: Vec<Option<Entry<K, V>>>,
    free: Vec<FlowId>,
    /// Most recently used flow.
    newest: usize,
    /// Least recently used flow (evicted first).
    oldest: usize,
    timers: BinaryHeap<Reverse<(Instant, u64, FlowId)>>,
    capacity: usize,
    next_generation: u64,
}

impl<K: Hash + Eq + Clone, V> FlowTable<K, V> {
    /// An empty table that holds at most `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            newest: NONE,
            oldest: NONE,
            timers: BinaryHeap::new(),
            capacity: capacity.max(1),
            next_generation: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The flow of `key`, if there is one (its recency is unchanged).
    pub fn find(&self, key: &K) -> Option<FlowId> {
        self.index.get(key).copied()
    }

    /// The key and value of a live flow.
    pub fn get(&self, id: FlowId) -> Option<(&K, &V)> {
        self.slots.get(id)?.as_ref().map(|e| (&e.key, &e.value))
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut V> {
        self.slots.get_mut(id)?.as_mut().map(|e| &mut e.value)
    }

    /// The low 32 bits of a live flow's generation: what tells it from earlier and later
    /// occupants of its slot in an id that outlives it.
    pub fn generation(&self, id: FlowId) -> Option<u32> {
        self.slots.get(id)?.as_ref().map(|e| e.generation as u32)
    }

    /// Marks a flow used at `now`: it becomes the most recent and its idle time restarts.
    pub fn touch(&mut self, id: FlowId, now: Instant) {
        let Some(e) = self.slots.get_mut(id).and_then(Option::as_mut) else { return };
        e.last_used = e.last_used.max(now);
        self.unlink(id);
        self.link_newest(id);
    }

    /// Adds a flow used at `now` that expires after `idle` without use. When the table is
    /// full the least recently used flow is removed to make room and returned; a flow
    /// already under `key` is replaced and returned.
    pub fn insert(
        &mut self,
        key: K,
        value: V,
        idle: Duration,
        now: Instant,
    ) -> (FlowId, Option<(K, V)>) {
        let displaced = match self.find(&key) {
            Some(old) => self.remove(old),
            None if self.len() >= self.capacity => self.remove(self.oldest),
            None => None,
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let entry = Entry {
            key: key.clone(),
            value,
            last_used: now,
            idle,
            generation,
            newer: NONE,
            older: NONE,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some(entry);
                id
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        };
        self.index.insert(key, id);
        self.link_newest(id);
        self.timers.push(Reverse((deadline_after(now, idle), generation, id)));
        (id, displaced)
    }

    /// Removes a flow and returns its key and value.
    pub fn remove(&mut self, id: FlowId) -> Option<(K, V)> {
        self.slots.get(id)?.as_ref()?;
        self.unlink(id);
        let e = self.slots[id].take()?;
        self.index.remove(&e.key);
        self.free.push(id);
        Some((e.key, e.value))
    }

    /// The earliest instant at which a flow may expire (possibly early: a flow used since
    /// is re-armed by [`pop_expired`](Self::pop_expired) without expiring).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Removes and returns one flow idle for its whole timeout at `now`, if any.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(K, V)> {
        while let Some(&Reverse((at, generation, id))) = self.timers.peek() {
            if at > now {
                return None;
            }
            self.timers.pop();
            let Some(e) = self.slots.get(id).and_then(Option::as_ref) else { continue };
            if e.generation != generation {
                continue;
            }
            let deadline = deadline_after(e.last_used, e.idle);
            if deadline > now {
                self.timers.push(Reverse((deadline, generation, id)));
                continue;
            }
            return self.remove(id);
        }
        None
    }

    /// Removes every flow, least recently used first.
    pub fn drain(&mut self) -> Vec<(K, V)> {
        let mut out = Vec::with_capacity(self.len());
        while self.oldest != NONE {
            if let Some(flow) = self.remove(self.oldest) {
                out.push(flow);
            }
        }
        self.timers.clear();
        out
    }

    /// Every live flow id, most recently used first.
    pub fn ids(&self) -> Vec<FlowId> {
        let mut out = Vec::with_capacity(self.len());
        let mut at = self.newest;
        while at != NONE {
            out.push(at);
            at = self.slots[at].as_ref().map_or(NONE, |e| e.older);
        }
        out
    }

    fn link_newest(&mut self, id: FlowId) {
        let old_newest = self.newest;
        if let Some(e) = self.slots[id].as_mut() {
            e.newer = NONE;
            e.older = old_newest;
        }
        if old_newest != NONE {
            if let Some(n) = self.slots[old_newest].as_mut() {
                n.newer = id;
            }
        } else {
            self.oldest = id;
        }
        self.newest = id;
    }

    fn unlink(&mut self, id: FlowId) {
        let Some(e) = self.slots[id].as_mut() else { return };
        let (newer, older) = (e.newer, e.older);
        e.newer = NONE;
        e.older = NONE;
        if newer != NONE {
            if let Some(n) = self.slots[newer].as_mut() {
                n.older = older;
            }
        } else if self.newest == id {
            self.newest = older;
        }
        if older != NONE {
            if let Some(o) = self.slots[older].as_mut() {
                o.newer = newer;
            }
        } else if self.oldest == id {
            self.oldest = newer;
        }
    }
}

/// `now + d`, saturating: a duration too long for the clock gives a deadline a century
/// away (never reached) instead of a panic.
pub fn deadline_after(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    now.checked_add(d).or_else(|| now.checked_add(FAR)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IDLE: Duration = Duration::from_secs(30);

    /// The plain model: a vector of (key, value, last_used, idle), most recent last.
    #[derive(Default)]
    struct Model {
        flows: Vec<(u16, u32, Instant, Duration)>,
    }

    impl Model {
        fn insert(
            &mut self,
            cap: usize,
            k: u16,
            v: u32,
            idle: Duration,
            now: Instant,
        ) -> Option<(u16, u32)> {
            let displaced = if let Some(i) = self.flows.iter().position(|f| f.0 == k) {
                let f = self.flows.remove(i);
                Some((f.0, f.1))
            } else if self.flows.len() >= cap {
                let f = self.flows.remove(0);
                Some((f.0, f.1))
            } else {
                None
            };
            self.flows.push((k, v, now, idle));
            displaced
        }

        fn touch(&mut self, k: u16, now: Instant) -> bool {
            let Some(i) = self.flows.iter().position(|f| f.0 == k) else { return false };
            let mut f = self.flows.remove(i);
            f.2 = f.2.max(now);
            self.flows.push(f);
            true
        }

        fn expire(&mut self, now: Instant) -> Vec<(u16, u32)> {
            let (gone, kept): (Vec<_>, Vec<_>) =
                self.flows.drain(..).partition(|f| f.2 + f.3 <= now);
            self.flows = kept;
            gone.into_iter().map(|f| (f.0, f.1)).collect()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u8),
        Touch(u16),
        Remove(u16),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..64, 0u8..4).prop_map(|(k, i)| Op::Insert(k, i)),
            4 => (0u16..64).prop_map(Op::Touch),
            1 => (0u16..64).prop_map(Op::Remove),
            2 => (0u16..40_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Thousands of random sequences: the table agrees with the plain model on every
        /// eviction, expiry and lookup, and never exceeds its capacity.
        #[test]
        fn table_matches_the_plain_model(cap in 1usize..24, ops in prop::collection::vec(op(), 1..200)) {
            let start = Instant::now();
            let mut now = start;
            let mut table = FlowTable::new(cap);
            let mut model = Model::default();
            let idles = [Duration::from_millis(500), Duration::from_secs(1), Duration::from_secs(5), IDLE];
            let mut value = 0u32;
            for op in ops {
                match op {
                    Op::Insert(k, i) => {
                        value += 1;
                        let (_, displaced) = table.insert(k, value, idles[i as usize], now);
                        let expected = model.insert(cap, k, value, idles[i as usize], now);
                        prop_assert_eq!(displaced, expected);
                    }
                    Op::Touch(k) => {
                        let id = table.find(&k);
                        prop_assert_eq!(id.is_some(), model.touch(k, now));
                        if let Some(id) = id {
                            table.touch(id, now);
                        }
                    }
                    Op::Remove(k) => {
                        let got = table.find(&k).and_then(|id| table.remove(id));
                        let i = model.flows.iter().position(|f| f.0 == k);
                        let expected = i.map(|i| { let f = model.flows.remove(i); (f.0, f.1) });
                        prop_assert_eq!(got, expected);
                    }
                    Op::Advance(ms) => {
                        now += Duration::from_millis(ms as u64);
                        let mut got = Vec::new();
                        while let Some(f) = table.pop_expired(now) {
                            got.push(f);
                        }
                        let mut expected = model.expire(now);
                        got.sort();
                        expected.sort();
                        prop_assert_eq!(got, expected);
                    }
                }
                prop_assert!(table.len() <= cap);
                prop_assert_eq!(table.len(), model.flows.len());
                let order: Vec<u16> = table.ids().iter().map(|&id| *table.get(id).unwrap().0).collect();
                let expected: Vec<u16> = model.flows.iter().rev().map(|f| f.0).collect();
                prop_assert_eq!(order, expected);
                if let Some(d) = table.next_deadline() {
                    let earliest = model.flows.iter().map(|f| f.2 + f.3).min();
                    prop_assert!(earliest.is_none_or(|e| d <= e), "a deadline is never late");
                }
            }
        }
    }

    /// Issue 26 item 3: an idle timeout too long for the clock panicked the UDP loop on the
    /// flow's first datagram (`overflow when adding duration to instant`).
    #[test]
    fn an_idle_timeout_beyond_the_clock_never_expires_and_never_panics() {
        let now = Instant::now();
        let mut t = FlowTable::new(2);
        let (id, _) = t.insert("a", 1, Duration::MAX, now);
        t.touch(id, now + IDLE);
        assert!(t.pop_expired(now + IDLE * 1000).is_none());
        assert!(t.next_deadline().is_some_and(|d| d > now + IDLE * 1000));
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used() {
        let now = Instant::now();
        let mut t = FlowTable::new(3);
        let a = t.insert("a", 1, IDLE, now).0;
        t.insert("b", 2, IDLE, now);
        t.insert("c", 3, IDLE, now);
        t.touch(a, now);
        let (_, evicted) = t.insert("d", 4, IDLE, now);
        assert_eq!(evicted, Some(("b", 2)));
        assert_eq!(t.len(), 3);
        assert!(t.find(&"b").is_none());
    }

    #[test]
    fn a_used_flow_lives_until_idle_after_its_last_use() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(8);
        let id = t.insert(1u8, (), IDLE, t0).0;
        t.touch(id, t0 + Duration::from_secs(20));
        assert!(t.pop_expired(t0 + IDLE).is_none(), "used 20 s in: not idle yet at 30 s");
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(50)));
        assert!(t.pop_expired(t0 + Duration::from_millis(49_999)).is_none());
        assert_eq!(t.pop_expired(t0 + Duration::from_secs(50)), Some((1, ())));
        assert!(t.is_empty());
    }

    #[test]
    fn drain_empties_the_table_oldest_first_and_slots_are_reused() {
        let now = Instant::now();
        let mut t = FlowTable::new(100);
        for k in 0..10u32 {
            t.insert(k, k, IDLE, now);
        }
        let drained: Vec<u32> = t.drain().into_iter().map(|(k, _)| k).collect();
        assert_eq!(drained, (0..10).collect::<Vec<_>>());
        assert!(t.is_empty() && t.next_deadline().is_none());
        let id = t.insert(99, 99, IDLE, now).0;
        assert!(id < 10, "a freed slot is reused");
        assert!(t.pop_expired(now + IDLE * 2).is_some());
    }
}
