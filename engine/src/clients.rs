//! A map from client address to state shared by every worker, sharded so that admissions
//! on different workers rarely meet: session limits count places in it and shaping keeps
//! per-client buckets in it. A shard's mutex is taken once when a session is admitted, never
//! on the relay path. Bounded: entries nobody holds and with nothing left to remember are
//! swept when a shard grows, and a shard full of live entries refuses new addresses.
//! Entries nobody holds that still remember something worth keeping (the byte and session
//! totals of per-client accounting) carry a weight: they stay while the shard holds fewer
//! than its share of [`DEFAULT_KEPT_CLIENTS`], beyond which the lightest go first, so the
//! heaviest clients' totals stay exact.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Shards of a [`ClientMap`].
pub(crate) const SHARDS: usize = 64;
/// Addresses a [`ClientMap`] holds at most, over all shards.
pub const DEFAULT_MAX_CLIENTS: usize = 1 << 20;
/// Idle entries with a weight (accounted clients no session holds) a [`ClientMap`] keeps at
/// most, over all shards; beyond this the lightest are forgotten at the next sweep.
pub const DEFAULT_KEPT_CLIENTS: usize = 1 << 14;

/// What a sweep may do with an entry no session holds: `None` when it still has live
/// state (forgetting it would change a limit's decision); `Some(0)` when it remembers
/// nothing; `Some(w)` when it remembers something of weight `w` worth keeping while there
/// is room.
pub type Idle = Option<u64>;
/// A map from client address to shared state, sharded to keep admissions on different
/// workers apart.
#[derive(Debug)]
pub struct ClientMap<T> {
    shards: Box<[Mutex<Shard<T>>]>,
    per_shard: usize,
    /// Weighted idle entries a shard keeps at most.
    keep_per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Debug)]
struct Shard<T> {
    entries: HashMap<IpAddr, Arc<T>>,
    /// The size at which the next sweep runs.
    sweep_at: usize,
}

impl<T> Default for ClientMap<T> {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_MAX_CLIENTS)
    }
}

impl<T> ClientMap<T> {
    /// A map that holds at most about `max` addresses.
    pub fn with_capacity(max: usize) -> Self {
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(Shard { entries: HashMap::new(), sweep_at: 64 }))
            .collect();
        let per_shard = max.div_ceil(SHARDS).max(1);
        let keep_per_shard = DEFAULT_KEPT_CLIENTS.div_ceil(SHARDS).min(per_shard / 2);
        Self { shards, per_shard, keep_per_shard, hasher: Default::default() }
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<Shard<T>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The entry of `key`, made by `make` if absent. Entries that no session holds and that
    /// `idle` says have nothing to remember at `now` are swept first when the shard has
    /// doubled since its last sweep, and so are the lightest of the weighted ones beyond the
    /// shard's share of [`DEFAULT_KEPT_CLIENTS`]. `None` when the shard is full of live
    /// entries.
    pub fn get_or_insert(
        &self,
        key: IpAddr,
        now: u64,
        make: impl FnOnce() -> T,
        idle: impl Fn(&T, u64) -> Idle,
    ) -> Option<Arc<T>> {
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = shard.entries.get(&key) {
            return Some(e.clone());
        }
        if shard.entries.len() >= shard.sweep_at || shard.entries.len() >= self.per_shard {
            shard.entries.retain(|_, e| Arc::strong_count(e) > 1 || idle(e, now) != Some(0));
            if shard.entries.len() > self.keep_per_shard {
                self.trim(&mut shard, now, &idle);
            }
            shard.sweep_at = (shard.entries.len() * 2).max(64);
        }
        if shard.entries.len() >= self.per_shard {
            return None;
        }
        let entry = Arc::new(make());
        shard.entries.insert(key, entry.clone());
        Some(entry)
    }

    /// Forgets the lightest weighted entries nobody holds until the shard is back to its
    /// share of kept entries (or none of them is left).
    fn trim(&self, shard: &mut Shard<T>, now: u64, idle: &impl Fn(&T, u64) -> Idle) {
        let mut spare: Vec<(u64, IpAddr)> = shard
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(e) == 1)
            .filter_map(|(k, e)| Some((idle(e, now)?, *k)))
            .collect();
        let excess = shard.entries.len() - self.keep_per_shard;
        if spare.len() > excess {
            spare.select_nth_unstable(excess);
            spare.truncate(excess);
        }
        for (_, key) in spare {
            shard.entries.remove(&key);
        }
    }

    /// Every entry held now, with its address (each shard locked in turn, briefly).
    pub fn entries(&self) -> Vec<(IpAddr, Arc<T>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.entries.iter().map(|(k, e)| (*k, e.clone())));
        }
        out
    }

    /// Forgets every entry (sessions holding one keep it, apart from the map).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().unwrap_or_else(|e| e.into_inner()).entries.clear();
        }
    }

    /// Addresses held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
