//! Session limits of a service: concurrent sessions per client address and per client
//! network, and new sessions per second per client address. Pure: no I/O, time passed in.
//!
//! State is shared by every worker through [`ClientMap`], a sharded map from address to an
//! entry: a shard's mutex is taken once when a session is admitted, never on the relay path.
//! An admitted session holds a [`Ticket`] whose drop gives its places back, so a count can
//! never leak whatever way the session ends. Entries nobody holds and with nothing left to
//! remember are swept when a shard grows; a shard that is full of live entries refuses new
//! clients (counted as a limit), so a flood of source addresses cannot grow memory unbounded.
//!
//! The same entries carry per-client accounting ([`crate::accounting`]) when the tables ask
//! for it: every admitted session then holds its client's entry and its network's (grouped
//! by the accounting prefixes, in a map of their own), and adds its bytes to both. A map
//! full of live entries never refuses a session for accounting's sake: it goes unaccounted.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::accounting::{AccountSpec, Tally, Usage};
use crate::clients::{ClientMap, Idle};
use crate::shape::{Bucket, Rate};

/// Prefix that groups IPv4 clients into one network when a limit names none.
pub const DEFAULT_NETWORK_V4: u8 = 24;
/// Prefix that groups IPv6 clients into one network when a limit names none.
pub const DEFAULT_NETWORK_V6: u8 = 64;

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

/// What a client address (or network) has open, its new-session meter (made by the first
/// session that a rate applies to) and its accounting totals.
#[derive(Debug, Default)]
struct Place {
    active: AtomicU32,
    rate: OnceLock<Bucket>,
    tally: Tally,
}

impl Place {
    /// Whether a sweep may forget this entry: not while a session holds a place or its
    /// meter still remembers recent sessions; at once when it has no accounting totals;
    /// otherwise with the weight of its totals.
    fn idle(&self, now: u64) -> Idle {
        let live = self.active.load(Ordering::Relaxed) != 0
            || self.rate.get().is_some_and(|b| !b.is_idle(now));
        if live {
            return None;
        }
        Some(if self.tally.is_empty() { 0 } else { self.tally.weight() })
    }

    fn usage(&self) -> Usage {
        self.tally.usage(u64::from(self.active.load(Ordering::Relaxed)))
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
    /// Client networks as accounting groups them, which may differ from the limits'.
    /// Made by the first accounted session: tables without accounting (and the many
    /// built by reloads) pay nothing for it.
    accounted_networks: OnceLock<ClientMap<Place>>,
    /// The prefixes `accounted_networks` is keyed by, once set.
    account_prefixes: Mutex<Option<(u8, u8)>>,
    /// Sessions refused, by [`Exceeded`] in declaration order.
    pub refused: [AtomicU64; 4],
}

/// Places held by one admitted session (its client's, its network's under the limits and
/// its network's under accounting, kept inline: no allocation per session); dropping it
/// gives them back. Each place held was counted once in its `active`.
#[derive(Debug, Default)]
pub struct Ticket {
    client: Option<Arc<Place>>,
    network: Option<Arc<Place>>,
    accounted_network: Option<Arc<Place>>,
    /// The session is accounted: its bytes go to its client's and network's totals.
    accounting: bool,
}

impl Ticket {
    /// Adds bytes the session moved since its last report (`up` from the client, `down`
    /// to it) to its client's and network's totals, if it is accounted.
    pub fn account(&self, up: u64, down: u64) {
        if !self.accounting {
            return;
        }
        for p in [&self.client, &self.accounted_network].into_iter().flatten() {
            p.tally.add(up, down);
        }
    }

    fn opened(&mut self) {
        self.accounting = true;
        for p in [&self.client, &self.accounted_network].into_iter().flatten() {
            p.tally.opened();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        for p in [&self.client, &self.network, &self.accounted_network].into_iter().flatten() {
            p.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl LimitState {
    /// Admits a session of `client` at `now` under `spec`, or says which limit refuses it
    /// (and counts the refusal). With `account`, an admitted session is counted in its
    /// client's and network's totals and its ticket takes its bytes ([`Ticket::account`]).
    pub fn admit(
        &self,
        spec: &LimitSpec,
        account: Option<&AccountSpec>,
        client: IpAddr,
        now: u64,
    ) -> Result<Ticket, Exceeded> {
        let outcome = self.try_admit(spec, account, client, now);
        if let Err(e) = outcome {
            self.refused[e as usize].fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    fn try_admit(
        &self,
        spec: &LimitSpec,
        account: Option<&AccountSpec>,
        client: IpAddr,
        now: u64,
    ) -> Result<Ticket, Exceeded> {
        let mut ticket = Ticket::default();
        if !spec.counts_clients() && account.is_none() {
            return Ok(ticket);
        }
        let limits_client = spec.per_client.is_some() || spec.client_rate.is_some();
        if limits_client || account.is_some() {
            match self.clients.get_or_insert(client, now, Place::default, Place::idle) {
                Some(place) => {
                    if let Some(max) = spec.per_client {
                        take_place(&place, max).ok_or(Exceeded::Client)?;
                    } else {
                        place.active.fetch_add(1, Ordering::Relaxed);
                    }
                    ticket.client = Some(place.clone());
                    if let Some(rate) = spec.client_rate {
                        if !place.rate.get_or_init(|| Bucket::new(rate)).try_take(now, 1) {
                            return Err(Exceeded::Rate);
                        }
                    }
                }
                None if limits_client => return Err(Exceeded::Tracking),
                None => {}
            }
        }
        if let Some(max) = spec.per_network {
            let net = network_of(client, spec.network_v4, spec.network_v6);
            let place = self
                .networks
                .get_or_insert(net, now, Place::default, Place::idle)
                .ok_or(Exceeded::Tracking)?;
            take_place(&place, max).ok_or(Exceeded::Network)?;
            ticket.network = Some(place);
        }
        if let Some(account) = account {
            let net = network_of(client, account.network_v4, account.network_v6);
            let map = self.accounted_networks.get_or_init(ClientMap::default);
            if let Some(place) = map.get_or_insert(net, now, Place::default, Place::idle) {
                place.active.fetch_add(1, Ordering::Relaxed);
                ticket.accounted_network = Some(place);
            }
            ticket.opened();
        }
        Ok(ticket)
    }

    /// Keys accounting's network map by these prefixes from now on; a change forgets the
    /// networks grouped by the former ones (sessions holding them keep adding to them,
    /// unseen). Called when tables are compiled.
    pub fn set_account_prefixes(&self, v4: u8, v6: u8) {
        let mut set = self.account_prefixes.lock().unwrap_or_else(|e| e.into_inner());
        if set.is_some_and(|p| p != (v4, v6)) {
            if let Some(map) = self.accounted_networks.get() {
                map.clear();
            }
        }
        *set = Some((v4, v6));
    }

    /// The accounting totals of every client address kept now (clients of sessions that
    /// were not accounted show none).
    pub fn accounted_clients(&self) -> Vec<(IpAddr, Usage)> {
        self.clients.entries().into_iter().map(|(a, p)| (a, p.usage())).collect()
    }

    /// The accounting totals of every client network kept now.
    pub fn accounted_networks(&self) -> Vec<(IpAddr, Usage)> {
        let Some(map) = self.accounted_networks.get() else { return Vec::new() };
        map.entries().into_iter().map(|(a, p)| (a, p.usage())).collect()
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
    use crate::accounting;
    use crate::clients::SHARDS;

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
        let a = state.admit(&spec, None, ip("127.0.0.2"), 0).unwrap();
        let _b = state.admit(&spec, None, ip("127.0.0.2"), 0).unwrap();
        assert_eq!(state.admit(&spec, None, ip("127.0.0.2"), 0).unwrap_err(), Exceeded::Client);
        // Another client is counted apart.
        let _c = state.admit(&spec, None, ip("127.0.0.3"), 0).unwrap();
        drop(a);
        assert!(state.admit(&spec, None, ip("127.0.0.2"), 0).is_ok());
        assert_eq!(state.refusals()[0], (Exceeded::Client, 1));
    }

    #[test]
    fn per_network_sessions_group_addresses_by_prefix() {
        let state = LimitState::default();
        let spec = LimitSpec { per_network: Some(2), ..spec() };
        let _a = state.admit(&spec, None, ip("10.1.2.3"), 0).unwrap();
        let _b = state.admit(&spec, None, ip("10.1.2.4"), 0).unwrap();
        assert_eq!(state.admit(&spec, None, ip("10.1.2.200"), 0).unwrap_err(), Exceeded::Network);
        assert!(state.admit(&spec, None, ip("10.1.3.1"), 0).is_ok());
        let _c = state.admit(&spec, None, ip("2001:db8::1"), 0).unwrap();
        let _d = state.admit(&spec, None, ip("2001:db8::ffff:1"), 0).unwrap();
        assert!(state.admit(&spec, None, ip("2001:db8::2"), 0).is_err());
        assert!(state.admit(&spec, None, ip("2001:db8:0:1::2"), 0).is_ok());
    }

    #[test]
    fn new_sessions_per_client_are_throttled_to_the_rate() {
        let state = LimitState::default();
        let spec = LimitSpec { client_rate: Some(Rate::per_second(10, 5)), ..spec() };
        let admitted = |from: u64, to: u64, step: u64| {
            (0..)
                .map(|i| from + i * step)
                .take_while(|&t| t < to)
                .filter(|&t| state.admit(&spec, None, ip("127.0.0.9"), t).is_ok())
                .count()
        };
        // A burst of 5 at once, then 10 per second whatever the attempt rate.
        let burst =
            (0..10).filter(|_| state.admit(&spec, None, ip("127.0.0.9"), SEC).is_ok()).count();
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
                let p = map.get_or_insert(IpAddr::V4(i.into()), 0, Place::default, Place::idle)?;
                p.active.fetch_add(1, Ordering::Relaxed);
                Some(p)
            })
            .collect();
        // Idle clients come and go without growing the map past its bound.
        for i in 0..100_000u32 {
            let key = IpAddr::V4((1_000_000 + i).into());
            let _ = map.get_or_insert(key, 0, Place::default, Place::idle);
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
            match map.get_or_insert(IpAddr::V4(i.into()), 0, Place::default, Place::idle) {
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
            .get_or_insert(IpAddr::V4((*known).into()), 0, Place::default, Place::idle)
            .is_some());
    }

    /// When the client map is full, a service that limits clients refuses the session
    /// (`Tracking`) rather than admit it unlimited; one that only accounts admits it,
    /// unaccounted by client.
    #[test]
    fn a_full_client_map_refuses_limited_sessions_only() {
        let state = LimitState { clients: ClientMap::with_capacity(SHARDS), ..Default::default() };
        let limited = LimitSpec { per_client: Some(10), ..spec() };
        let (mut held, mut tracking) = (Vec::new(), 0);
        for i in 0..(SHARDS as u32 * 8) {
            match state.admit(&limited, None, IpAddr::V4((0x0a00_0000 + i).into()), 0) {
                Ok(ticket) => held.push(ticket),
                Err(Exceeded::Tracking) => tracking += 1,
                Err(other) => panic!("refused as {other:?}"),
            }
        }
        assert!(tracking > 0, "a full map admitted every new client unlimited");
        assert!(held.iter().all(|t| t.client.is_some()), "admitted without a client place");
        let accounted_only = spec();
        for i in 0..(SHARDS as u32 * 8) {
            let client = IpAddr::V4((0x0b00_0000 + i).into());
            assert!(state.admit(&accounted_only, Some(&account()), client, 0).is_ok());
        }
    }

    fn account() -> AccountSpec {
        AccountSpec { top: 10, network_v4: 30, network_v6: 64 }
    }

    fn usage_of(list: Vec<(IpAddr, Usage)>, addr: &str) -> Usage {
        list.into_iter().find(|(a, _)| *a == ip(addr)).map(|(_, u)| u).unwrap_or_default()
    }

    #[test]
    fn accounted_sessions_add_their_bytes_to_client_and_network() {
        let state = LimitState::default();
        let acct = account();
        let a = state.admit(&spec(), Some(&acct), ip("127.0.0.2"), 0).unwrap();
        let b = state.admit(&spec(), Some(&acct), ip("127.0.0.3"), 0).unwrap();
        let c = state.admit(&spec(), Some(&acct), ip("127.0.0.5"), 0).unwrap();
        a.account(100, 7);
        a.account(1, 0);
        b.account(20, 30);
        c.account(5, 5);
        let open = usage_of(state.accounted_clients(), "127.0.0.2");
        assert_eq!(open, Usage { bytes_up: 101, bytes_down: 7, sessions: 1, active: 1 });
        drop((a, b, c));
        let clients = state.accounted_clients();
        let net = state.accounted_networks();
        assert_eq!(usage_of(clients.clone(), "127.0.0.2").active, 0);
        assert_eq!(
            usage_of(clients, "127.0.0.3"),
            Usage { bytes_up: 20, bytes_down: 30, sessions: 1, active: 0 }
        );
        // 127.0.0.2 and .3 share 127.0.0.0/30; .5 is in 127.0.0.4/30.
        assert_eq!(
            usage_of(net.clone(), "127.0.0.0"),
            Usage { bytes_up: 121, bytes_down: 37, sessions: 2, active: 0 }
        );
        assert_eq!(
            usage_of(net, "127.0.0.4"),
            Usage { bytes_up: 5, bytes_down: 5, sessions: 1, active: 0 }
        );
    }

    #[test]
    fn unaccounted_sessions_and_refusals_count_nothing() {
        let state = LimitState::default();
        let limited = LimitSpec { per_client: Some(1), ..spec() };
        let t = state.admit(&limited, None, ip("10.0.0.1"), 0).unwrap();
        t.account(10, 10);
        assert!(accounting::top(state.accounted_clients(), 10).is_empty());
        // Over the limit: refused, and not counted as a session of the client.
        let acct = account();
        assert!(state.admit(&limited, Some(&acct), ip("10.0.0.1"), 0).is_err());
        drop(t);
        assert_eq!(usage_of(state.accounted_clients(), "10.0.0.1").sessions, 0);
        // The per-client place of an accounted session still counts against the limit.
        let held = state.admit(&limited, Some(&acct), ip("10.0.0.1"), 0).unwrap();
        assert_eq!(
            state.admit(&limited, Some(&acct), ip("10.0.0.1"), 0).unwrap_err(),
            Exceeded::Client
        );
        drop(held);
        assert!(state.admit(&limited, Some(&acct), ip("10.0.0.1"), 0).is_ok());
    }

    #[test]
    fn a_rate_added_later_applies_to_clients_already_accounted() {
        let state = LimitState::default();
        let acct = account();
        drop(state.admit(&spec(), Some(&acct), ip("10.0.0.1"), 0).unwrap());
        let rated = LimitSpec { client_rate: Some(Rate::per_second(1, 1)), ..spec() };
        assert!(state.admit(&rated, Some(&acct), ip("10.0.0.1"), SEC).is_ok());
        assert_eq!(
            state.admit(&rated, Some(&acct), ip("10.0.0.1"), SEC).unwrap_err(),
            Exceeded::Rate
        );
    }

    #[test]
    fn changing_the_account_prefixes_starts_networks_afresh() {
        let state = LimitState::default();
        state.set_account_prefixes(30, 64);
        let acct = account();
        drop(state.admit(&spec(), Some(&acct), ip("127.0.0.2"), 0).unwrap());
        state.set_account_prefixes(30, 64);
        assert_eq!(state.accounted_networks().len(), 1);
        state.set_account_prefixes(24, 64);
        assert!(state.accounted_networks().is_empty());
        assert_eq!(state.accounted_clients().len(), 1);
    }

    #[test]
    fn full_maps_forget_the_lightest_idle_clients_first() {
        let state = LimitState::default();
        let acct = account();
        // Far more accounted clients than are kept: each moves as many bytes as its number.
        let n = (crate::clients::DEFAULT_KEPT_CLIENTS * 4) as u32;
        for i in 1..=n {
            let t = state.admit(&spec(), Some(&acct), IpAddr::V4(i.into()), 0).unwrap();
            t.account(u64::from(i), 0);
        }
        let kept = state.accounted_clients();
        assert!(
            kept.len() <= crate::clients::DEFAULT_KEPT_CLIENTS * 2 + SHARDS * 64,
            "{}",
            kept.len()
        );
        let top = accounting::top(kept, 20);
        let expected: Vec<IpAddr> = (n - 19..=n).rev().map(|i| IpAddr::V4(i.into())).collect();
        assert_eq!(top.iter().map(|(a, _)| *a).collect::<Vec<_>>(), expected);
        assert_eq!(top[0].1.bytes_up, u64::from(n));
    }

    #[test]
    fn networks_clear_host_bits() {
        assert_eq!(network_of(ip("192.0.2.77"), 24, 64), ip("192.0.2.0"));
        assert_eq!(network_of(ip("192.0.2.77"), 32, 64), ip("192.0.2.77"));
        assert_eq!(network_of(ip("192.0.2.77"), 0, 64), ip("0.0.0.0"));
        assert_eq!(network_of(ip("2001:db8:1:2:3::1"), 24, 48), ip("2001:db8:1::"));
    }

    /// The names records and `sluice_limited_sessions_total{limit}` carry, as the README's
    /// "Shaping and limits" section documents them.
    #[test]
    fn refusals_are_named_as_documented() {
        let names = [Exceeded::Client, Exceeded::Network, Exceeded::Rate, Exceeded::Tracking]
            .map(Exceeded::as_str);
        assert_eq!(names, ["per_client", "per_network", "client_rate", "tracking"]);
    }

    /// Clients and networks with places held are tracked, each once.
    #[test]
    fn tracked_counts_clients_and_networks() {
        let state = LimitState::default();
        let spec = LimitSpec { per_client: Some(5), per_network: Some(5), ..spec() };
        let _held: Vec<Ticket> = ["10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.1.1"]
            .iter()
            .map(|a| state.admit(&spec, None, ip(a), 0).unwrap())
            .collect();
        assert_eq!(state.tracked(), (3, 2));
    }

    /// A client whose rate meter still remembers recent sessions is not forgotten by the
    /// sweeps that thousands of other clients cause: it stays throttled (forgetting it would
    /// hand it a fresh burst).
    #[test]
    fn a_throttled_client_stays_throttled_through_sweeps() {
        let state = LimitState::default();
        let throttled = LimitSpec { client_rate: Some(Rate::per_second(1, 1)), ..spec() };
        let counted = LimitSpec { per_client: Some(10), ..spec() };
        assert!(state.admit(&throttled, None, ip("192.0.2.1"), SEC).is_ok());
        assert_eq!(
            state.admit(&throttled, None, ip("192.0.2.1"), SEC).unwrap_err(),
            Exceeded::Rate
        );
        let others = 64 * SHARDS * 3;
        for i in 0..others {
            let addr = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            drop(state.admit(&counted, None, addr, SEC).unwrap());
        }
        assert!(
            state.tracked().0 < others,
            "the sweeps forgot idle clients: {:?}",
            state.tracked()
        );
        assert_eq!(
            state.admit(&throttled, None, ip("192.0.2.1"), SEC).unwrap_err(),
            Exceeded::Rate,
            "the throttled client was forgotten and got a fresh burst"
        );
    }
}
