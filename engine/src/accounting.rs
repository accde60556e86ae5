//! Per-client accounting: the bytes (each way) and sessions (in all, open now) of every
//! client address and client network, kept in the entries of the sharded client map the
//! session limits use (see [`crate::limits`]), so an admitted session pays one map look-up
//! for both. The data path adds to a [`Tally`] when a session closes and every
//! [`ACCOUNTING_INTERVAL`] while it lasts: a few relaxed atomic adds, no lock.
//!
//! What is shown is bounded: the admin API lists the [`top`] N clients and networks by
//! bytes, never every address seen. The maps themselves keep about
//! [`crate::clients::DEFAULT_KEPT_CLIENTS`] idle accounted entries per service (trimmed
//! when a shard is swept), forgetting the lightest first, so the totals of the heaviest
//! clients stay exact.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::limits::{DEFAULT_NETWORK_V4, DEFAULT_NETWORK_V6};

/// Clients (and networks) the admin API lists when `admin.top_clients` is not set.
pub const DEFAULT_TOP_CLIENTS: usize = 20;
/// Most clients `admin.top_clients` may ask for.
pub const MAX_TOP_CLIENTS: usize = 1000;
/// How often a long session adds its bytes so far to its client's and network's totals.
pub const ACCOUNTING_INTERVAL: Duration = Duration::from_secs(10);

/// Per-client accounting as configured: how many clients to show and how addresses group
/// into networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountSpec {
    /// Clients (and networks) listed, heaviest first.
    pub top: usize,
    /// Prefix length grouping IPv4 clients into a network.
    pub network_v4: u8,
    /// Prefix length grouping IPv6 clients into a network.
    pub network_v6: u8,
}

impl Default for AccountSpec {
    fn default() -> Self {
        Self {
            top: DEFAULT_TOP_CLIENTS,
            network_v4: DEFAULT_NETWORK_V4,
            network_v6: DEFAULT_NETWORK_V6,
        }
    }
}

/// The running totals of one client address or network, added to by every worker.
#[derive(Debug, Default)]
pub struct Tally {
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    sessions: AtomicU64,
}

impl Tally {
    /// A session was admitted.
    pub fn opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A session moved `up` more bytes from the client and `down` more to it.
    pub fn add(&self, up: u64, down: u64) {
        if up > 0 {
            self.bytes_up.fetch_add(up, Ordering::Relaxed);
        }
        if down > 0 {
            self.bytes_down.fetch_add(down, Ordering::Relaxed);
        }
    }

    /// Whether nothing was ever counted here.
    pub fn is_empty(&self) -> bool {
        self.sessions.load(Ordering::Relaxed) == 0
    }

    /// How much this entry is worth keeping: its bytes, plus one so that a client with
    /// sessions but no byte is still worth something.
    pub fn weight(&self) -> u64 {
        let u = self.usage(0);
        u.bytes().saturating_add(1)
    }

    /// The totals now, with `active` sessions open.
    pub fn usage(&self, active: u64) -> Usage {
        Usage {
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            active,
        }
    }
}

/// A client's (or network's) totals at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes from the client to the backend.
    pub bytes_up: u64,
    /// Bytes from the backend to the client.
    pub bytes_down: u64,
    /// Sessions admitted (past the firewall and the limits).
    pub sessions: u64,
    /// Sessions open now.
    pub active: u64,
}

impl Usage {
    /// Bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.bytes_up.saturating_add(self.bytes_down)
    }

    fn merge(&mut self, other: &Usage) {
        self.bytes_up = self.bytes_up.saturating_add(other.bytes_up);
        self.bytes_down = self.bytes_down.saturating_add(other.bytes_down);
        self.sessions = self.sessions.saturating_add(other.sessions);
        self.active = self.active.saturating_add(other.active);
    }
}

/// The `n` heaviest of `entries` by bytes (then sessions, then address, so the order is
/// stable), after summing the entries of one address (a client of several services).
/// Entries that never had an accounted session (held only by the limits) are left out.
pub fn top(entries: impl IntoIterator<Item = (IpAddr, Usage)>, n: usize) -> Vec<(IpAddr, Usage)> {
    let mut merged: HashMap<IpAddr, Usage> = HashMap::new();
    for (addr, usage) in entries {
        if usage.sessions == 0 {
            continue;
        }
        merged.entry(addr).or_default().merge(&usage);
    }
    let mut list: Vec<(IpAddr, Usage)> = merged.into_iter().collect();
    list.sort_unstable_by_key(|(addr, u)| (Reverse(u.bytes()), Reverse(u.sessions), *addr));
    list.truncate(n);
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn usage(up: u64, down: u64, sessions: u64) -> Usage {
        Usage { bytes_up: up, bytes_down: down, sessions, active: 0 }
    }

    #[test]
    fn top_orders_by_bytes_both_ways_and_keeps_n() {
        let entries = vec![
            (ip("10.0.0.1"), usage(100, 0, 1)),
            (ip("10.0.0.2"), usage(10, 500, 1)),
            (ip("10.0.0.3"), usage(300, 300, 2)),
            (ip("10.0.0.4"), usage(1, 1, 9)),
        ];
        let got = top(entries, 2);
        assert_eq!(
            got,
            vec![(ip("10.0.0.3"), usage(300, 300, 2)), (ip("10.0.0.2"), usage(10, 500, 1))]
        );
    }

    #[test]
    fn top_sums_one_address_over_services() {
        let mut a = usage(5, 7, 1);
        a.active = 1;
        let entries = vec![
            (ip("2001:db8::1"), a),
            (ip("2001:db8::1"), usage(10, 20, 2)),
            (ip("2001:db8::2"), usage(1, 1, 1)),
        ];
        let got = top(entries, 10);
        assert_eq!(
            got[0],
            (ip("2001:db8::1"), Usage { bytes_up: 15, bytes_down: 27, sessions: 3, active: 1 })
        );
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn ties_break_by_sessions_then_address_and_empty_entries_are_left_out() {
        let entries = vec![
            (ip("10.0.0.9"), usage(10, 0, 1)),
            (ip("10.0.0.8"), usage(10, 0, 1)),
            (ip("10.0.0.7"), usage(10, 0, 3)),
            (ip("10.0.0.6"), usage(0, 0, 0)),
        ];
        let order: Vec<IpAddr> = top(entries, 10).into_iter().map(|(a, _)| a).collect();
        assert_eq!(order, vec![ip("10.0.0.7"), ip("10.0.0.8"), ip("10.0.0.9")]);
        assert!(top(Vec::new(), 3).is_empty());
        assert!(top(vec![(ip("10.0.0.1"), usage(1, 1, 1))], 0).is_empty());
    }

    #[test]
    fn tallies_add_each_way_and_weigh_by_bytes() {
        let t = Tally::default();
        assert!(t.is_empty());
        t.opened();
        assert_eq!(t.weight(), 1);
        t.add(3, 0);
        t.add(0, 4);
        assert_eq!(t.usage(2), Usage { bytes_up: 3, bytes_down: 4, sessions: 1, active: 2 });
        assert_eq!(t.weight(), 8);
    }
}
