//! Session limits of a service: concurrent sessions per client address and per client
//! network, and new sessions per second per client address. Pure: no I/O, time passed in.
//!
//! State is shared by every worker through [`ClientMap`], a sharded map from address to an
//! entry: a shard's mutex is taken once when a session is admitted, never on the relay path.
//! An admitted session holds a [`Ticket`] whose drop gives its places back, so a count can
//! never leak whatever way the session ends. Entries nobody holds and with nothing left to
//! remember are swept when a shard grows; a shard that is full of live entries refuses new
//! clients (counted as a limit), so a flood of source addresses cannot grow memory unbounded.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::shape::{Bucket, Rate};

/// Shards of a [`ClientMap`].
const SHARDS: usize = 64;
/// Addresses a [`ClientMap`] holds at most, over all shards.
pub const DEFAULT_MAX_CLIENTS: usize = 1 << 20;
/// Prefix that groups IPv4 clients into one network when a limit names none.
pub const DEFAULT_NETWORK_V4: u8 = 24;
/// Prefix that groups IPv6 clients into one network when a limit names none.
pub const DEFAULT_NETWORK_V6: u8 = 64;

/// A map from client address to shared state, sharded to keep admissions on different
/// workers apart.
#[derive(Debug)]
pub struct ClientMap<T> {
    shards: Box<[Mutex<Shard<T>>]>,
    per_shard: usize,
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
        Self { shards, per_shard: max.div_ceil(SHARDS).max(1), hasher: Default::default() }
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<Shard<T>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The entry of `key`, made by `make` if absent. Entries that no session holds and that
    /// `idle` says have nothing to remember at `now` are swept first when the shard has
    /// doubled since its last sweep. `None` when the shard is full of live entries.
    pub fn get_or_insert(
        &self,
        key: IpAddr,
        now: u64,
        make: impl FnOnce() -> T,
        idle: impl Fn(&T, u64) -> bool,
    ) -> Option<Arc<T>> {
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = shard.entries.get(&key) {
            return Some(e.clone());
        }
        if shard.entries.len() >= shard.sweep_at || shard.entries.len() >= self.per_shard {
            shard.entries.retain(|_, e| Arc::strong_count(e) > 1 || !idle(e, now));
            shard.sweep_at = (shard.entries.len() * 2).max(64);
        }
        if shard.entries.len() >= self.per_shard {
            return None;
        }
        let entry = Arc::new(make());
        shard.entries.insert(key, entry.clone());
        Some(entry)
    }

    /// Addresses held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A service's session limits, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSpec {
    /// Concurrent sessions per client address.
    pub per_client: Option<u32>,
    /// Concurrent sessions per client network (addresses grouped by `network_v4/v6`).
    pub per_network: Option<u32>,
    pub network_v4: u8,
    pub network_v6: u8,
    /// New sessions per second per client address, with a burst.
    pub client_rate: Option<Rate>,
    /// Bytes a session may move, both directions together; then it is cut.
    pub max_bytes: Option<u64>,
    /// How long a session may last; then it is cut.
    pub max_duration: Option<Duration>,
    /// Refuse over-limit sessions with a reset rather than a clean close.
    pub reset: bool,
}

impl LimitSpec {
    /// Whether admission must consult any counter.
    pub fn counts_clients(&self) -> bool {
        self.per_client.is_some() || self.per_network.is_some() || self.client_rate.is_some()
    }
}

/// What a client address (or network) has open, and its new-session meter.
#[derive(Debug, Default)]
struct Place {
    active: AtomicU32,
    rate: Option<Bucket>,
}

impl Place {
    fn is_idle(&self, now: u64) -> bool {
        self.active.load(Ordering::Relaxed) == 0
            && self.rate.as_ref().is_none_or(|b| b.is_idle(now))
    }
}

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Client,
    Network,
    Rate,
    /// Too many distinct clients are tracked at once.
    Tracking,
}

impl Exceeded {
    pub fn as_str(self) -> &'static str {
        match self {
            Exceeded::Client => "per_client",
            Exceeded::Network => "per_network",
            Exceeded::Rate => "client_rate",
            Exceeded::Tracking => "tracking",
        }
    }
}

/// The shared state of a service's limits; carried across reloads by service name, so that
/// sessions admitted under old tables still count.
#[derive(Debug, Default)]
pub struct LimitState {
    clients: ClientMap<Place>,
    networks: ClientMap<Place>,
    /// Sessions refused, by [`Exceeded`] in declaration order.
    pub refused: [AtomicU64; 4],
}

/// Places held by one admitted session; dropping it gives them back.
#[derive(Debug, Default)]
pub struct Ticket {
    held: Vec<Arc<Place>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        for p in &self.held {
            p.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl LimitState {
    /// Admits a session of `client` at `now` under `spec`, or says which limit refuses it
    /// (and counts the refusal).
    pub fn admit(&self, spec: &LimitSpec, client: IpAddr, now: u64) -> Result<Ticket, Exceeded> {
        let outcome = self.try_admit(spec, client, now);
        if let Err(e) = outcome {
            self.refused[e as usize].fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    fn try_admit(&self, spec: &LimitSpec, client: IpAddr, now: u64) -> Result<Ticket, Exceeded> {
        let mut ticket = Ticket::default();
        if !spec.counts_clients() {
            return Ok(ticket);
        }
        if spec.per_client.is_some() || spec.client_rate.is_some() {
            let make =
                || Place { active: AtomicU32::new(0), rate: spec.client_rate.map(Bucket::new) };
            let place = self
                .clients
                .get_or_insert(client, now, make, Place::is_idle)
                .ok_or(Exceeded::Tracking)?;
            if let Some(max) = spec.per_client {
                take_place(&place, max).ok_or(Exceeded::Client)?;
                ticket.held.push(place.clone());
            }
            if let Some(rate) = &place.rate {
                if !rate.try_take(now, 1) {
                    return Err(Exceeded::Rate);
                }
            }
        }
        if let Some(max) = spec.per_network {
            let net = network_of(client, spec.network_v4, spec.network_v6);
            let place = self
                .networks
                .get_or_insert(net, now, Place::default, Place::is_idle)
                .ok_or(Exceeded::Tracking)?;
            take_place(&place, max).ok_or(Exceeded::Network)?;
            ticket.held.push(place);
        }
        Ok(ticket)
    }

    /// Refusals so far, per limit.
    pub fn refusals(&self) -> [(Exceeded, u64); 4] {
        [Exceeded::Client, Exceeded::Network, Exceeded::Rate, Exceeded::Tracking]
            .map(|e| (e, self.refused[e as usize].load(Ordering::Relaxed)))
    }

    /// Client addresses and networks tracked now.
    pub fn tracked(&self) -> (usize, usize) {
        (self.clients.len(), self.networks.len())
    }
}

/// Takes one of `max` places, or none if all are taken.
fn take_place(place: &Place, max: u32) -> Option<()> {
    place
        .active
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
        .ok()
        .map(|_| ())
}

/// The network of `addr`: its address with the host bits cleared.
pub fn network_of(addr: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = if v4 == 0 { 0 } else { u32::MAX << (32 - u32::from(v4.min(32))) };
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = if v6 == 0 { 0 } else { u128::MAX << (128 - u32::from(v6.min(128))) };
            IpAddr::V6((bits & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn spec() -> LimitSpec {
        LimitSpec { network_v4: 24, network_v6: 64, ..LimitSpec::default() }
    }

    #[test]
    fn per_client_sessions_are_capped_and_given_back_on_drop() {
        let state = LimitState::default();
        let spec = LimitSpec { per_client: Some(2), ..spec() };
        let a = state.admit(&spec, ip("127.0.0.2"), 0).unwrap();
        let _b = state.admit(&spec, ip("127.0.0.2"), 0).unwrap();
        assert_eq!(state.admit(&spec, ip("127.0.0.2"), 0).unwrap_err(), Exceeded::Client);
        // Another client is counted apart.
        let _c = state.admit(&spec, ip("127.0.0.3"), 0).unwrap();
        drop(a);
        assert!(state.admit(&spec, ip("127.0.0.2"), 0).is_ok());
        assert_eq!(state.refusals()[0], (Exceeded::Client, 1));
    }

    #[test]
    fn per_network_sessions_group_addresses_by_prefix() {
        let state = LimitState::default();
        let spec = LimitSpec { per_network: Some(2), ..spec() };
        let _a = state.admit(&spec, ip("10.1.2.3"), 0).unwrap();
        let _b = state.admit(&spec, ip("10.1.2.4"), 0).unwrap();
        assert_eq!(state.admit(&spec, ip("10.1.2.200"), 0).unwrap_err(), Exceeded::Network);
        assert!(state.admit(&spec, ip("10.1.3.1"), 0).is_ok());
        let _c = state.admit(&spec, ip("2001:db8::1"), 0).unwrap();
        let _d = state.admit(&spec, ip("2001:db8::ffff:1"), 0).unwrap();
        assert!(state.admit(&spec, ip("2001:db8::2"), 0).is_err());
        assert!(state.admit(&spec, ip("2001:db8:0:1::2"), 0).is_ok());
    }

    #[test]
    fn new_sessions_per_client_are_throttled_to_the_rate() {
        let state = LimitState::default();
        let spec = LimitSpec { client_rate: Some(Rate { per_sec: 10, burst: 5 }), ..spec() };
        let admitted = |from: u64, to: u64, step: u64| {
            (0..)
                .map(|i| from + i * step)
                .take_while(|&t| t < to)
                .filter(|&t| state.admit(&spec, ip("127.0.0.9"), t).is_ok())
                .count()
        };
        // A burst of 5 at once, then 10 per second whatever the attempt rate.
        let burst = (0..10).filter(|_| state.admit(&spec, ip("127.0.0.9"), SEC).is_ok()).count();
        assert_eq!(burst, 5);
        let n = admitted(2 * SEC, 12 * SEC, SEC / 1000);
        assert!((100..=106).contains(&n), "{n}");
        assert_eq!(state.refusals()[2].0, Exceeded::Rate);
    }

    #[test]
    fn idle_clients_are_forgotten_and_the_map_stays_bounded() {
        let map: ClientMap<Place> = ClientMap::with_capacity(SHARDS * 4);
        let held: Vec<_> = (0..SHARDS as u32 * 2)
            .filter_map(|i| {
                let p =
                    map.get_or_insert(IpAddr::V4(i.into()), 0, Place::default, Place::is_idle)?;
                p.active.fetch_add(1, Ordering::Relaxed);
                Some(p)
            })
            .collect();
        // Idle clients come and go without growing the map past its bound.
        for i in 0..100_000u32 {
            let key = IpAddr::V4((1_000_000 + i).into());
            let _ = map.get_or_insert(key, 0, Place::default, Place::is_idle);
        }
        assert!(map.len() <= SHARDS * 4, "{}", map.len());
        for p in &held {
            p.active.fetch_sub(1, Ordering::Relaxed);
        }
        assert!(!held.is_empty());
    }

    #[test]
    fn a_full_map_refuses_new_clients_but_keeps_known_ones() {
        let map: ClientMap<Place> = ClientMap::with_capacity(SHARDS);
        let mut held = Vec::new();
        let mut refused = 0;
        for i in 0..(SHARDS as u32 * 8) {
            match map.get_or_insert(IpAddr::V4(i.into()), 0, Place::default, Place::is_idle) {
                Some(p) => {
                    p.active.fetch_add(1, Ordering::Relaxed);
                    held.push((i, p));
                }
                None => refused += 1,
            }
        }
        assert!(refused > 0 && map.len() <= SHARDS);
        let (known, _) = &held[0];
        assert!(map
            .get_or_insert(IpAddr::V4((*known).into()), 0, Place::default, Place::is_idle)
            .is_some());
    }

    #[test]
    fn networks_clear_host_bits() {
        assert_eq!(network_of(ip("192.0.2.77"), 24, 64), ip("192.0.2.0"));
        assert_eq!(network_of(ip("192.0.2.77"), 32, 64), ip("192.0.2.77"));
        assert_eq!(network_of(ip("192.0.2.77"), 0, 64), ip("0.0.0.0"));
        assert_eq!(network_of(ip("2001:db8:1:2:3::1"), 24, 48), ip("2001:db8:1::"));
    }
}
