//! The compiled matcher's index over `from` prefixes: one path-compressed binary trie per
//! address family, in a `Vec` arena with `u32` links. Each node lists, in rule order, the
//! rules whose `from` holds exactly its prefix.

use std::net::IpAddr;

use ipnet::IpNet;

const NO_NODE: u32 = u32::MAX;
const V4_ROOT: u32 = 0;
const V6_ROOT: u32 = 1;

/// A trie node: a prefix (left-aligned in 128 bits; IPv4 uses the top 32), its two children
/// and its range in [`PrefixTrie::rules`].
#[derive(Debug, Clone, Copy)]
struct Node {
    key: [u64; 2],
    children: [u32; 2],
    first_rule: u32,
    rule_count: u32,
    len: u8,
}

impl Node {
    fn new(key: u128, len: u8) -> Node {
        let key = [(key >> 64) as u64, key as u64];
        Node { key, children: [NO_NODE; 2], first_rule: 0, rule_count: 0, len }
    }

    fn key(&self) -> u128 {
        (u128::from(self.key[0]) << 64) | u128::from(self.key[1])
    }
}

/// Path-compressed binary tries over `from` prefixes, one root per family, in one arena.
#[derive(Debug, Clone)]
pub(super) struct PrefixTrie {
    nodes: Vec<Node>,
    /// Rule indices, grouped by node, each group in rule order.
    rules: Vec<u32>,
}

impl PrefixTrie {
    /// Calls `visit` with the rule list of every node whose prefix contains `client`, from the
    /// shortest prefix to the longest.
    pub(super) fn walk(&self, client: IpAddr, mut visit: impl FnMut(&[u32])) {
        let (mut at, key, max) = match client {
            IpAddr::V4(a) => (V4_ROOT, u128::from(u32::from(a)) << 96, 32),
            IpAddr::V6(a) => (V6_ROOT, u128::from(a), 128),
        };
        loop {
            let node = &self.nodes[at as usize];
            if node.rule_count > 0 {
                let first = node.first_rule as usize;
                visit(&self.rules[first..first + node.rule_count as usize]);
            }
            if node.len >= max {
                return;
            }
            let child = node.children[bit(key, node.len)];
            if child == NO_NODE {
                return;
            }
            let next = &self.nodes[child as usize];
            if mask(key, next.len) != next.key() {
                return;
            }
            at = child;
        }
    }
}

/// Builds a [`PrefixTrie`]: nodes first, then the (node, rule) pairs grouped by node.
pub(super) struct TrieBuilder {
    nodes: Vec<Node>,
    pairs: Vec<(u32, u32)>,
}

impl TrieBuilder {
    pub(super) fn new() -> TrieBuilder {
        TrieBuilder { nodes: vec![Node::new(0, 0), Node::new(0, 0)], pairs: Vec::new() }
    }

    pub(super) fn insert(&mut self, net: IpNet, rule: u32) {
        let node = match net {
            IpNet::V4(n) => {
                let key = u128::from(u32::from(n.network())) << 96;
                self.node_for(V4_ROOT, key, n.prefix_len())
            }
            IpNet::V6(n) => self.node_for(V6_ROOT, u128::from(n.network()), n.prefix_len()),
        };
        self.pairs.push((node, rule));
    }

    /// The node holding exactly the prefix (`key`, `len`), created if needed.
    fn node_for(&mut self, root: u32, key: u128, len: u8) -> u32 {
        let key = mask(key, len);
        let mut at = root;
        loop {
            let here = self.nodes[at as usize];
            if here.len == len {
                return at;
            }
            let side = bit(key, here.len);
            let child = here.children[side];
            if child == NO_NODE {
                return self.attach(at, side, key, len);
            }
            let next = self.nodes[child as usize];
            let common = ((key ^ next.key()).leading_zeros() as u8).min(next.len).min(len);
            if common == next.len {
                at = child;
                continue;
            }
            // `key` leaves `next`'s path at `common`: a fork node takes `next`'s place.
            let fork = self.attach(at, side, mask(key, common), common);
            self.nodes[fork as usize].children[bit(next.key(), common)] = child;
            if common == len {
                return fork;
            }
            return self.attach(fork, bit(key, common), key, len);
        }
    }

    /// A new node for (`key`, `len`) as child `side` of `parent`.
    fn attach(&mut self, parent: u32, side: usize, key: u128, len: u8) -> u32 {
        let id = u32::try_from(self.nodes.len()).expect("trie arena exceeds u32 indices");
        self.nodes.push(Node::new(key, len));
        self.nodes[parent as usize].children[side] = id;
        id
    }

    pub(super) fn finish(mut self) -> PrefixTrie {
        self.pairs.sort_unstable();
        self.pairs.dedup();
        let mut rules = Vec::with_capacity(self.pairs.len());
        for &(node, rule) in &self.pairs {
            let node = &mut self.nodes[node as usize];
            if node.rule_count == 0 {
                node.first_rule = rules.len() as u32;
            }
            node.rule_count += 1;
            rules.push(rule);
        }
        self.nodes.shrink_to_fit();
        PrefixTrie { nodes: self.nodes, rules }
    }
}

/// Bit `i` of `key`, counting from the most significant.
fn bit(key: u128, i: u8) -> usize {
    ((key >> (127 - u32::from(i))) & 1) as usize
}

/// The first `len` bits of `key`, the rest zero.
fn mask(key: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        _ => key & (u128::MAX << (128 - u32::from(len))),
    }
}

#[cfg(test)]
impl PrefixTrie {
    /// Nodes and rule entries held, and the size of one node.
    pub(super) fn footprint(&self) -> (usize, usize, usize) {
        (self.nodes.len(), self.rules.len(), std::mem::size_of::<Node>())
    }
}
