//! Source addresses for shared upstream sockets: sans-IO, no syscalls.
//!
//! In `udp_upstream = "shared"` mode every flow to one backend leaves from the same socket
//! (one port), so the flow is told apart by the local address it sends from, taken from a
//! configured prefix (`udp_source`). A [`SourcePool`] hands out the addresses of one prefix.
//! Invariants:
//! - an address is out at most once until it is given back;
//! - the prefix's network and broadcast addresses are never handed out (IPv4 prefixes
//!   shorter than /31; on IPv6 the subnet-router anycast address, offset 0, likewise);
//! - fresh addresses come first, in order, then given-back ones oldest first, so an address
//!   is reused as late as possible (a late reply to a closed flow must not reach the flow
//!   that inherits its address);
//! - memory is one `u32` per address given back, never one per address of the prefix.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Hands out the usable addresses of one prefix, each at most once at a time.
#[derive(Debug, Clone)]
pub struct SourcePool {
    net: IpNet,
    /// First usable offset from the network address.
    first: u64,
    /// Number of usable offsets (capped at `u32::MAX`).
    usable: u64,
    /// Offsets (from `first`) never handed out are `fresh..usable`.
    fresh: u64,
    /// Offsets given back, oldest first.
    returned: VecDeque<u32>,
}

impl SourcePool {
    /// The usable addresses of `net`.
    pub fn new(net: IpNet) -> Self {
        let net = net.trunc();
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        let total: u128 = if host_bits >= 127 { u128::MAX } else { 1u128 << host_bits };
        // Network and broadcast (IPv4) or the subnet-router anycast (IPv6) stay out.
        let (first, reserved) = match net {
            IpNet::V4(_) if host_bits >= 2 => (1, 2),
            IpNet::V6(_) if host_bits >= 1 => (1, 1),
            _ => (0, 0),
        };
        let usable = total.saturating_sub(reserved).min(u128::from(u32::MAX)) as u64;
        Self { net, first, usable, fresh: 0, returned: VecDeque::new() }
    }

    /// How many addresses the pool can have out at once.
    pub fn capacity(net: IpNet) -> u64 {
        Self::new(net).usable
    }

    /// An address not out now, or `None` when every usable address is out.
    pub fn take(&mut self) -> Option<IpAddr> {
        let offset = if self.fresh < self.usable {
            self.fresh += 1;
            self.fresh - 1
        } else {
            u64::from(self.returned.pop_front()?)
        };
        Some(self.address(offset))
    }

    /// Gives back an address [`take`](Self::take) handed out.
    pub fn give_back(&mut self, addr: IpAddr) {
        if let Some(offset) = self.offset(addr) {
            self.returned.push_back(offset as u32);
        }
    }

    /// Whether `addr` is one this pool hands out.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.offset(addr).is_some()
    }

    fn address(&self, offset: u64) -> IpAddr {
        let at = u128::from(self.first + offset);
        match self.net.network() {
            IpAddr::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n).wrapping_add(at as u32))),
            IpAddr::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n).wrapping_add(at))),
        }
    }

    fn offset(&self, addr: IpAddr) -> Option<u64> {
        if !self.net.contains(&addr) {
            return None;
        }
        let from_network = match (addr, self.net.network()) {
            (IpAddr::V4(a), IpAddr::V4(n)) => u128::from(u32::from(a) - u32::from(n)),
            (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a) - u128::from(n),
            _ => return None,
        };
        let offset = from_network.checked_sub(u128::from(self.first))?;
        (offset < u128::from(self.usable)).then_some(offset as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn an_ipv4_prefix_lends_every_host_address_once_and_never_its_ends() {
        let mut pool = SourcePool::new(net("127.64.0.0/29"));
        let taken: Vec<IpAddr> = std::iter::from_fn(|| pool.take()).collect();
        let expected: Vec<IpAddr> =
            (1..=6).map(|i| IpAddr::V4(Ipv4Addr::new(127, 64, 0, i))).collect();
        assert_eq!(taken, expected, "network .0 and broadcast .7 stay out");
        assert!(pool.take().is_none(), "six out: none left");
        assert_eq!(SourcePool::capacity(net("10.0.0.0/16")), 65_534);
    }

    #[test]
    fn given_back_addresses_return_oldest_first_after_the_fresh_ones() {
        let mut pool = SourcePool::new(net("10.1.0.0/28"));
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        pool.give_back(b);
        pool.give_back(a);
        let next = pool.take().unwrap();
        assert!(next != a && next != b, "a fresh address comes before any given back");
        let rest: Vec<IpAddr> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(rest.len(), 14 - 1, "all 14 usable, one already out");
        assert_eq!(&rest[rest.len() - 2..], &[b, a], "given back ones last, oldest first");
    }

    #[test]
    fn foreign_addresses_are_ignored_and_small_prefixes_lend_all() {
        let mut pool = SourcePool::new(net("192.0.2.8/31"));
        let all: HashSet<IpAddr> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(all.len(), 2, "a /31 has no network or broadcast address");
        pool.give_back("198.51.100.1".parse().unwrap());
        assert!(pool.take().is_none(), "a foreign address is not taken back");
        assert!(!pool.contains("198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn an_ipv6_prefix_skips_its_anycast_address_and_caps_its_count() {
        let mut pool = SourcePool::new(net("fd00:5::/64"));
        assert_eq!(pool.take(), Some("fd00:5::1".parse().unwrap()));
        assert_eq!(pool.take(), Some("fd00:5::2".parse().unwrap()));
        assert_eq!(SourcePool::capacity(net("fd00:5::/64")), u64::from(u32::MAX));
        assert!(pool.contains("fd00:5::2".parse().unwrap()));
    }

    #[test]
    fn a_million_flows_cost_no_memory_until_they_end() {
        let mut pool = SourcePool::new(net("127.0.0.0/8"));
        let mut seen = HashSet::new();
        for _ in 0..1_000_000 {
            assert!(seen.insert(pool.take().unwrap()), "an address was lent twice");
        }
        assert_eq!(pool.returned.capacity(), 0);
    }
}
