//! Verdict cost of the compiled firewall matcher with 10,000 network rules.
//!
//! Rules: 10,000 distinct client networks (v4 /16 to /32 in 1.0.0.0 to 191.255.255.255, one in
//! seven v6 /48 to /128 in 2001:db8::/32), with SNI wildcard rules (no `from`, so every
//! verdict checks them) at the start, the quarters and the end. Queries hit an early rule, a
//! late rule, or none; `linear` is the plain evaluation for comparison.
//!
//! Run: `cargo bench -p sluice-engine --bench acl -- --warm-up-time 1 --measurement-time 3`

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sluice_engine::acl::{decide_linear, Action, NamePattern, Query, Rule, RuleSet};

const NETWORK_RULES: usize = 10_000;
/// Network rule numbers a wildcard rule precedes; one more closes the list.
const WILDCARD_BEFORE: [usize; 4] = [0, 2_500, 5_000, 7_500];

/// A small deterministic generator (xorshift64), so every run builds the same rules.
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_network(numbers: &mut Numbers) -> IpNet {
    if numbers.below(7) == 0 {
        let low = u128::from(numbers.next()) << 32 | u128::from(numbers.next() as u32);
        let addr = Ipv6Addr::from(0x2001_0db8_u128 << 96 | low);
        let len = 48 + numbers.below(81) as u8;
        return IpNet::V6(Ipv6Net::new(addr, len).unwrap().trunc());
    }
    // Anywhere in 1.0.0.0 to 191.255.255.255, so 192.0.2.1 stays unmatched.
    let addr = Ipv4Addr::from(0x0100_0000 + numbers.below(0xbf00_0000) as u32);
    let len = 16 + numbers.below(17) as u8;
    IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc())
}

fn wildcard_rule(i: usize) -> Rule {
    let pattern = NamePattern::parse(&format!("*.blocked{i}.example")).unwrap();
    Rule { sni: vec![pattern], ..Rule::new("wildcard", Action::Deny { reset: false }) }
}

fn rules() -> Vec<Rule> {
    let mut numbers = Numbers(0x9e37_79b9_7f4a_7c15);
    let mut seen = HashSet::new();
    let mut rules = Vec::new();
    while seen.len() < NETWORK_RULES {
        let net = random_network(&mut numbers);
        if !seen.insert(net) {
            continue;
        }
        if WILDCARD_BEFORE.contains(&(seen.len() - 1)) {
            rules.push(wildcard_rule(rules.len()));
        }
        let rule = Rule::new(&format!("net{}", seen.len()), Action::Allow { pool: None });
        rules.push(Rule { from: vec![net], ..rule });
    }
    rules.push(wildcard_rule(rules.len()));
    rules
}

fn query(client: IpAddr) -> Query<'static> {
    Query {
        client: SocketAddr::new(client, 40_000),
        listener: "10.255.0.1:443".parse().unwrap(),
        now: 1_704_067_200,
        sni: Some("www.example.com"),
    }
}

/// A client inside the network of the first network rule at or after `from` (walking forward,
/// or backward with `backward`) that is the first match for that client.
fn client_hitting(rules: &[Rule], from: usize, backward: bool, v6: bool) -> (IpAddr, usize) {
    let mut order: Vec<usize> = (0..rules.len()).collect();
    if backward {
        order.reverse();
    }
    for i in order.into_iter().filter(|&i| i >= from || backward) {
        let Some(net) = rules[i].from.first() else { continue };
        if net.addr().is_ipv6() != v6 {
            continue;
        }
        let client = net.network();
        if decide_linear(rules, &query(client)) == Some(i) {
            return (client, i);
        }
    }
    panic!("no client found");
}

fn verdicts(c: &mut Criterion) {
    let rules = rules();
    let set = RuleSet::compile(rules.clone());
    let late = rules.len() - 2;
    let cases = [
        ("early_v4", client_hitting(&rules, 3, false, false)),
        ("early_v6", client_hitting(&rules, 3, false, true)),
        ("late_v4", client_hitting(&rules, late, true, false)),
        ("late_v6", client_hitting(&rules, late, true, true)),
        ("none_v4", ("192.0.2.1".parse().unwrap(), usize::MAX)),
        ("none_v6", ("2001:db9::1".parse().unwrap(), usize::MAX)),
    ];
    eprintln!("{} rules, {} with SNI wildcards", rules.len(), WILDCARD_BEFORE.len() + 1);
    let mut group = c.benchmark_group("acl_decide");
    for (name, (client, want)) in cases {
        let q = query(client);
        let got = set.decide(&q);
        assert_eq!(got, (want != usize::MAX).then_some(want), "{name}");
        eprintln!("{name}: client {client} -> rule {got:?}");
        group.bench_function(name, |b| b.iter(|| set.decide(black_box(&q))));
    }
    group.finish();

    let mut group = c.benchmark_group("acl_linear");
    for (name, (client, _)) in [cases[2], cases[4]] {
        let q = query(client);
        group.bench_function(name, |b| b.iter(|| decide_linear(black_box(&rules), black_box(&q))));
    }
    group.finish();

    c.bench_function("acl_compile_10k", |b| b.iter(|| RuleSet::compile(black_box(rules.clone()))));
}

criterion_group!(benches, verdicts);
criterion_main!(benches);
