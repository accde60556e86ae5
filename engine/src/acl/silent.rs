//! Silent drop: the classic BPF socket filter that makes a listener drop, before any
//! handshake, the packets of clients that a `drop = "silent"` rule denies. Pure: it turns
//! rules into instructions; `sys` attaches them (SO_ATTACH_FILTER) to each listening socket.
//!
//! The program keeps the firewall's first-match order. It walks the rules in order up to the
//! last silent one: a silent rule's networks return 0 (drop); any other rule that may match
//! a source (its `from` networks; every source when it has no `from`) returns "keep", since
//! only the session core can judge its other criteria. So a packet is dropped only when the
//! first rule that could match it is a silent one, exactly as the rules would decide it.
//! A rule without `from` ahead of every silent rule leaves nothing to filter: no program.
//!
//! On a listening TCP socket the filter runs on every segment the listener receives, SYNs
//! included (and on the handshake's last ACK): a dropped SYN gets no SYN-ACK and no RST.
//! Accepted sockets inherit the filter; their clients passed it, so it keeps their packets.
//!
//! The source address is read relative to the network header (SKF_NET_OFF): IPv4 at offset
//! 12, IPv6 at offsets 8..24, as 32-bit words in network order compared after masking.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Rule;

/// Most instructions the kernel takes in one classic BPF program (BPF_MAXINSNS).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// The kernel's offset of the network header for negative loads (SKF_NET_OFF).
const SKF_NET_OFF: i32 = -0x100000;
/// Classic BPF opcodes used here.
const LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
const AND_K: u16 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
const JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
/// What a filter returns to keep a packet whole, and to drop it.
pub const KEEP: u32 = u32::MAX;
pub const DROP: u32 = 0;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instruction {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Instruction {
    const fn new(code: u16, jt: u8, jf: u8, k: u32) -> Self {
        Self { code, jt, jf, k }
    }
}

/// Why rules cannot be made into a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "the silent-drop filter would take {0} instructions, more than the kernel's {MAX_INSTRUCTIONS}: fewer networks"
    )]
    TooLong(usize),
}

/// Whether `rule` can be a silent drop: a deny whose only criterion is `from`.
pub fn is_source_only(rule: &Rule) -> bool {
    !rule.from.is_empty()
        && rule.not_from.is_empty()
        && rule.from_port.is_empty()
        && rule.not_from_port.is_empty()
        && rule.to.is_empty()
        && rule.not_to.is_empty()
        && rule.time.is_empty()
        && rule.not_time.is_empty()
        && rule.sni.is_empty()
        && rule.not_sni.is_empty()
}

/// The filter of a listener of family `ipv6` judged by `rules` (in order: the global rules,
/// then the service's), or `None` when no silent rule can drop anything on it.
pub fn program<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    ipv6: bool,
) -> Result<Option<Vec<Instruction>>, FilterError> {
    // (network, verdict) checks in order, then KEEP.
    let mut checks: Vec<(IpNet, u32)> = Vec::new();
    let mut last_drop = None;
    for rule in rules {
        let nets = rule.from.iter().map(|n| canonical(*n)).filter(|n| n.addr().is_ipv6() == ipv6);
        if rule.silent {
            let before = checks.len();
            checks.extend(nets.map(|n| (n, DROP)));
            if checks.len() > before {
                last_drop = Some(checks.len());
            }
            continue;
        }
        if rule.from.is_empty() {
            // May match any source: nothing after it can be dropped unseen.
            break;
        }
        checks.extend(nets.map(|n| (n, KEEP)));
    }
    let Some(end) = last_drop else { return Ok(None) };
    checks.truncate(end);
    let mut code = Vec::new();
    for (net, verdict) in checks {
        emit(&mut code, net, verdict);
    }
    code.push(Instruction::new(RET_K, 0, 0, KEEP));
    if code.len() > MAX_INSTRUCTIONS {
        return Err(FilterError::TooLong(code.len()));
    }
    Ok(Some(code))
}

/// An IPv6 network inside ::ffff:0:0/96 is the IPv4 network it maps (as the rules see it).
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net).trunc(),
            None => net,
        },
        _ => net.trunc(),
    }
}

/// Checks of the source against `net`: on a match, return `verdict`; else fall through.
fn emit(code: &mut Vec<Instruction>, net: IpNet, verdict: u32) {
    let (base, words): (i32, Vec<u32>) = match net.addr() {
        IpAddr::V4(a) => (12, vec![u32::from(a)]),
        IpAddr::V6(a) => {
            let o = a.octets();
            (8, o.chunks(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
    };
    let prefix = u32::from(net.prefix_len());
    // (offset, mask, value) of each word the prefix covers.
    let parts: Vec<(i32, u32, u32)> = words
        .iter()
        .enumerate()
        .filter_map(|(i, &w)| {
            let bits = prefix.saturating_sub(32 * i as u32).min(32);
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            (mask != 0).then_some((base + 4 * i as i32, mask, w & mask))
        })
        .collect();
    // Each part is a load, an AND unless the mask is whole, and a compare whose false
    // branch jumps past the rest of this network's checks and its return.
    let len = |p: &(i32, u32, u32)| if p.1 == u32::MAX { 2 } else { 3 };
    let mut rest: usize = parts.iter().map(len).sum();
    for part in &parts {
        let (offset, mask, value) = *part;
        rest -= len(part);
        code.push(Instruction::new(LD_W_ABS, 0, 0, (SKF_NET_OFF + offset) as u32));
        if mask != u32::MAX {
            code.push(Instruction::new(AND_K, 0, 0, mask));
        }
        // At most 3 parts of 3 instructions follow, and the return: within a u8 jump.
        code.push(Instruction::new(JEQ_K, 0, (rest + 1) as u8, value));
    }
    code.push(Instruction::new(RET_K, 0, 0, verdict));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{Action, Query, RuleSet};

    /// Runs `code` as the kernel would on a packet from `source` (only the instructions
    /// this module emits; a load outside the header fails the test).
    fn run(code: &[Instruction], source: IpAddr) -> u32 {
        let mut header = [0u8; 40];
        match source {
            IpAddr::V4(a) => {
                header[0] = 0x45;
                header[12..16].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                header[0] = 0x60;
                header[8..24].copy_from_slice(&a.octets());
            }
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = code[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    let at = (i.k as i32 - SKF_NET_OFF) as usize;
                    acc = u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
                }
                AND_K => acc &= i.k,
                JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn rule(name: &str, action: Action, from: &[&str], silent: bool) -> Rule {
        let mut r = Rule::new(name, action);
        r.from = from.iter().map(|n| n.parse().unwrap()).collect();
        r.silent = silent;
        r
    }

    const DENY: Action = Action::Deny { reset: false };
    const ALLOW: Action = Action::Allow { pool: None };

    #[test]
    fn sources_of_a_silent_rule_are_dropped_and_others_kept() {
        let rules = [rule("scanners", DENY, &["127.0.0.64/26", "10.1.2.3/32"], true)];
        let code = program(&rules, false).unwrap().unwrap();
        assert_eq!(run(&code, "127.0.0.70".parse().unwrap()), DROP);
        assert_eq!(run(&code, "10.1.2.3".parse().unwrap()), DROP);
        assert_eq!(run(&code, "127.0.0.2".parse().unwrap()), KEEP);
        assert_eq!(run(&code, "10.1.2.4".parse().unwrap()), KEEP);
        assert_eq!(program(&rules, true).unwrap(), None, "no IPv6 network: no filter");
    }

    #[test]
    fn the_first_rule_that_may_match_wins_as_in_the_firewall() {
        let rules = [
            rule("office", ALLOW, &["10.0.1.0/24"], false),
            rule("net", DENY, &["10.0.0.0/8"], true),
        ];
        let code = program(&rules, false).unwrap().unwrap();
        assert_eq!(run(&code, "10.0.1.9".parse().unwrap()), KEEP, "allowed first");
        assert_eq!(run(&code, "10.9.9.9".parse().unwrap()), DROP);
        let mut by_port = rule("by_port", ALLOW, &[], false);
        by_port.from_port = vec![1..=1024];
        let behind = [by_port, rules[1].clone()];
        assert_eq!(program(&behind, false).unwrap(), None, "a rule for every source comes first");
        let after = [rules[1].clone(), rule("rest", DENY, &[], false)];
        assert!(program(&after, false).unwrap().is_some(), "rules after the last silent one");
        assert_eq!(program(&[rule("plain", DENY, &["10.0.0.0/8"], false)], false).unwrap(), None);
    }

    #[test]
    fn ipv6_prefixes_of_any_length_and_mapped_ipv4_networks() {
        let rules = [
            rule("a", DENY, &["2001:db8:1::/48", "2001:db8:ffff::1/128", "::/0"], true),
            rule("mapped", DENY, &["::ffff:192.0.2.0/120"], true),
        ];
        let v6 = program(&rules[..1], true).unwrap().unwrap();
        assert_eq!(run(&v6, "2001:db8:1:ff::1".parse().unwrap()), DROP);
        assert_eq!(run(&v6, "2001:db9::1".parse().unwrap()), DROP, "::/0 holds every address");
        let v6 =
            program(&[rule("b", DENY, &["2001:db8:1::/48", "2001:db8:ffff::1/128"], true)], true);
        let v6 = v6.unwrap().unwrap();
        assert_eq!(run(&v6, "2001:db8:ffff::1".parse().unwrap()), DROP);
        assert_eq!(run(&v6, "2001:db8:ffff::2".parse().unwrap()), KEEP);
        assert_eq!(run(&v6, "2001:db8:2::1".parse().unwrap()), KEEP);
        let v6 = program(&rules[1..], true).unwrap();
        assert_eq!(v6, None, "a mapped network is an IPv4 one");
        let v4 = program(&rules[1..], false).unwrap().unwrap();
        assert_eq!(run(&v4, "192.0.2.77".parse().unwrap()), DROP);
        assert_eq!(run(&v4, "192.0.3.77".parse().unwrap()), KEEP);
    }

    #[test]
    fn too_many_networks_do_not_fit_a_program() {
        let nets: Vec<String> =
            (0..1100).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
        let nets: Vec<&str> = nets.iter().map(String::as_str).collect();
        let r = [rule("many", DENY, &nets, true)];
        assert!(matches!(program(&r, false), Err(FilterError::TooLong(_))));
    }

    /// A small deterministic generator (xorshift64*), enough to draw rules and addresses.
    struct Draw(u64);

    impl Draw {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }

        fn one_in(&mut self, n: u64) -> bool {
            self.below(n) == 0
        }

        fn net(&mut self, ipv6: bool) -> IpNet {
            if ipv6 {
                let a = 0x2001_0db8_u128 << 96
                    | u128::from(self.below(4)) << 80
                    | u128::from(self.below(4));
                IpNet::new(IpAddr::V6(a.into()), 30 + self.below(99) as u8).unwrap().trunc()
            } else {
                let a = 10 << 24 | (self.below(4) as u32) << 16 | self.below(8) as u32;
                IpNet::new(IpAddr::V4(a.into()), 6 + self.below(27) as u8).unwrap().trunc()
            }
        }

        fn addr(&mut self, ipv6: bool) -> IpAddr {
            match self.net(ipv6).addr() {
                IpAddr::V4(a) => IpAddr::V4((u32::from(a) | self.below(4) as u32).into()),
                IpAddr::V6(a) => IpAddr::V6((u128::from(a) | u128::from(self.below(4))).into()),
            }
        }
    }

    /// On random rule lists, a packet is dropped exactly when the first rule whose `from`
    /// holds its source is a silent one; and then the rule set decides it by that rule.
    #[test]
    fn the_filter_agrees_with_the_rule_set_on_random_rules() {
        let mut draw = Draw(22);
        for _ in 0..500 {
            let ipv6 = draw.one_in(2);
            let mut rules = Vec::new();
            for i in 0..1 + draw.below(5) {
                let silent = draw.one_in(2);
                let action = if silent || draw.one_in(2) { DENY } else { ALLOW };
                let mut r = Rule::new(&format!("r{i}"), action);
                r.from = (0..1 + draw.below(2)).map(|_| draw.net(ipv6)).collect();
                r.silent = silent;
                if !silent && draw.one_in(5) {
                    r.from_port = vec![1..=10];
                }
                rules.push(r);
            }
            let code = program(&rules, ipv6).unwrap();
            let set = RuleSet::compile(rules.clone());
            for _ in 0..50 {
                let ip = draw.addr(ipv6);
                let dropped = code.as_ref().is_some_and(|c| run(c, ip) == DROP);
                let first = rules.iter().find(|r| r.from.iter().any(|n| n.contains(&ip)));
                assert_eq!(dropped, first.is_some_and(|r| r.silent), "{rules:?} on {ip}");
                if dropped {
                    let client = std::net::SocketAddr::new(ip, 1 + draw.below(20) as u16);
                    let listener = "127.0.0.1:80".parse().unwrap();
                    let q = Query { client, listener, now: 0, sni: None };
                    let decided = set.decide(&q).map(|i| &rules[i]);
                    assert!(decided.is_some_and(|r| r.silent), "{rules:?} dropped {ip}");
                }
            }
        }
    }
}
