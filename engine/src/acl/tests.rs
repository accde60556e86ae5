//! The firewall matcher against plain linear evaluation, and its parsers.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use proptest::test_runner::Config;

use super::window::{MINUTES_PER_DAY, SECONDS_PER_DAY};
use super::*;

/// A zone of the machine's tz database (the control crate reads it for real configs).
fn named_zone(name: &str) -> Result<Zone, String> {
    let bytes = std::fs::read(format!("/usr/share/zoneinfo/{name}"))
        .map_err(|e| format!("time zone {name:?} not installed: {e}"))?;
    Zone::from_tzif(name, &bytes)
}

/// 2024-01-01 00:00:00 UTC, a Monday.
const MONDAY: i64 = 1_704_067_200;

/// Unix seconds at `day` days after [`MONDAY`] (0 = Monday), `h:m` UTC.
fn at(day: i64, h: i64, m: i64) -> i64 {
    MONDAY + day * SECONDS_PER_DAY + h * 3600 + m * 60
}

fn query(client: &str) -> Query<'static> {
    Query {
        client: client.parse().unwrap(),
        listener: "127.0.0.1:443".parse().unwrap(),
        now: at(0, 12, 0),
        sni: None,
    }
}

fn allow(name: &str) -> Rule {
    Rule::new(name, Action::Allow { pool: None })
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn window(text: &str) -> TimeWindow {
    TimeWindow::parse(text, &Zone::utc()).unwrap()
}

/// Both evaluations, which must agree.
fn decide(rules: &[Rule], q: &Query) -> Option<usize> {
    let compiled = RuleSet::compile(rules.to_vec()).decide(q);
    assert_eq!(compiled, decide_linear(rules, q), "compiled and linear disagree on {q:?}");
    compiled
}

fn hits(rule: &Rule, q: &Query) -> bool {
    decide(std::slice::from_ref(rule), q) == Some(0)
}

#[test]
fn no_rules_no_verdict_and_empty_rule_matches_all() {
    assert_eq!(decide(&[], &query("10.0.0.1:1000")), None);
    assert!(RuleSet::compile(Vec::new()).is_empty());
    assert!(hits(&allow("all"), &query("10.0.0.1:1000")));
    assert!(hits(&allow("all"), &query("[2001:db8::1]:1000")));
}

#[test]
fn compiled_set_keeps_its_rules_in_order() {
    let set =
        RuleSet::compile(vec![allow("a"), Rule { from: nets(&["10.0.0.0/8"]), ..allow("b") }]);
    assert!(!set.is_empty());
    let names: Vec<&str> = set.rules().iter().map(|r| &*r.name).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn from_and_not_from() {
    let rule = Rule { from: nets(&["10.0.0.0/8", "2001:db8::/32"]), ..allow("r") };
    assert!(hits(&rule, &query("10.1.2.3:1000")));
    assert!(hits(&rule, &query("[2001:db8::5]:1000")));
    assert!(!hits(&rule, &query("11.0.0.1:1000")));
    assert!(!hits(&rule, &query("[2001:db9::5]:1000")));
    let rule = Rule { not_from: nets(&["10.0.0.0/8", "192.0.2.7/32"]), ..allow("r") };
    assert!(!hits(&rule, &query("10.1.2.3:1000")));
    assert!(!hits(&rule, &query("192.0.2.7:1000")));
    assert!(hits(&rule, &query("192.0.2.8:1000")));
    let both = Rule { from: nets(&["10.0.0.0/8"]), not_from: nets(&["10.9.0.0/16"]), ..rule };
    assert!(hits(&both, &query("10.8.0.1:1000")));
    assert!(!hits(&both, &query("10.9.0.1:1000")));
}

#[test]
fn mapped_v6_client_matches_v4_networks() {
    let rule = Rule { from: nets(&["192.0.2.0/24"]), ..allow("r") };
    assert!(hits(&rule, &query("[::ffff:192.0.2.9]:1000")));
    assert!(!hits(&rule, &query("[::ffff:192.0.3.9]:1000")));
    let not = Rule { not_from: nets(&["192.0.2.0/24"]), ..allow("r") };
    assert!(!hits(&not, &query("[::ffff:192.0.2.9]:1000")));
    // A v6 network written in the mapped range is the IPv4 network it maps.
    let mapped = Rule { from: nets(&["::ffff:192.0.2.0/120"]), ..allow("r") };
    assert!(hits(&mapped, &query("192.0.2.200:1000")));
    assert!(hits(&mapped, &query("[::ffff:192.0.2.200]:1000")));
    assert!(!hits(&mapped, &query("192.0.3.1:1000")));
}

#[test]
fn client_ports() {
    let rule = Rule { from_port: vec![1024..=2047, 4000..=4000], ..allow("r") };
    assert!(hits(&rule, &query("10.0.0.1:1024")));
    assert!(hits(&rule, &query("10.0.0.1:4000")));
    assert!(!hits(&rule, &query("10.0.0.1:2048")));
    let rule = Rule { not_from_port: vec![parse_port_range("0-1023").unwrap()], ..allow("r") };
    assert!(!hits(&rule, &query("10.0.0.1:22")));
    assert!(!hits(&rule, &query("10.0.0.1:1023")));
    assert!(hits(&rule, &query("10.0.0.1:1024")));
}

#[test]
fn listener_address_and_port() {
    let to = |t: &str| ListenerMatch::parse(t).unwrap();
    let mut q = query("10.0.0.1:1000");
    q.listener = "127.0.0.1:8080".parse().unwrap();
    for yes in ["127.0.0.1:8080", ":8080", "127.0.0.1", "::ffff:127.0.0.1"] {
        assert!(hits(&Rule { to: vec![to(yes)], ..allow("r") }, &q), "{yes}");
        assert!(!hits(&Rule { not_to: vec![to(yes)], ..allow("r") }, &q), "{yes}");
    }
    for no in ["127.0.0.2:8080", ":8081", "127.0.0.1:80", "::1", "[::1]:8080"] {
        assert!(!hits(&Rule { to: vec![to(no)], ..allow("r") }, &q), "{no}");
        assert!(hits(&Rule { not_to: vec![to(no)], ..allow("r") }, &q), "{no}");
    }
    q.listener = "[::ffff:127.0.0.1]:8080".parse().unwrap();
    assert!(hits(&Rule { to: vec![to("127.0.0.1:8080")], ..allow("r") }, &q));
    q.listener = "[::1]:8080".parse().unwrap();
    assert!(hits(&Rule { to: vec![to("[::1]:8080")], ..allow("r") }, &q));
    assert!(hits(&Rule { to: vec![to("::1")], ..allow("r") }, &q));
}

#[test]
fn listener_parse() {
    let p = ListenerMatch::parse;
    let v4: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(p("127.0.0.1:8080"), Ok(ListenerMatch { ip: Some(v4), port: Some(8080) }));
    assert_eq!(p(":8080"), Ok(ListenerMatch { ip: None, port: Some(8080) }));
    assert_eq!(p("127.0.0.1"), Ok(ListenerMatch { ip: Some(v4), port: None }));
    let v6: IpAddr = "::1".parse().unwrap();
    assert_eq!(p("::1"), Ok(ListenerMatch { ip: Some(v6), port: None }));
    assert_eq!(p("[::1]"), Ok(ListenerMatch { ip: Some(v6), port: None }));
    assert_eq!(p("[::1]:8080"), Ok(ListenerMatch { ip: Some(v6), port: Some(8080) }));
    for bad in ["", ":", ":0", "127.0.0.1:0", ":70000", "host:80", "1.2.3:4", "[::1]:"] {
        let err = p(bad).unwrap_err();
        assert!(err.contains("invalid listener"), "{bad}: {err}");
    }
}

#[test]
fn port_range_parse() {
    assert_eq!(parse_port_range("22"), Ok(22..=22));
    assert_eq!(parse_port_range("1024-65535"), Ok(1024..=65535));
    assert_eq!(parse_port_range(" 80 - 81 "), Ok(80..=81));
    for bad in ["", "-", "1-", "a", "65536", "10-9", "1-2-3"] {
        assert!(parse_port_range(bad).unwrap_err().contains("invalid port range"), "{bad}");
    }
}

#[test]
fn window_crossing_midnight() {
    let w = window("22:00-06:00");
    assert!(w.contains(at(2, 23, 30)));
    assert!(w.contains(at(2, 5, 59)));
    assert!(!w.contains(at(2, 6, 0)));
    assert!(w.contains(at(2, 22, 0)));
    assert!(!w.contains(at(2, 21, 59)));
    // After midnight belongs to the day the window opened.
    let fri = window("Fri 22:00-06:00");
    assert!(fri.contains(at(4, 23, 0)));
    assert!(fri.contains(at(5, 5, 59)), "Saturday early morning is Friday's night");
    assert!(!fri.contains(at(4, 5, 0)), "Friday early morning is Thursday's night");
    assert!(!fri.contains(at(5, 23, 0)));
    // Sunday night runs into Monday morning across the week boundary.
    let sun = window("Sun 23:00-01:00");
    assert!(sun.contains(at(7, 0, 30)));
    assert!(sun.contains(at(0, 0, 30)));
    assert!(!sun.contains(at(1, 0, 30)));
}

#[test]
fn window_days() {
    let work = window("Mon-Fri 08:00-18:00");
    assert_eq!(work.days(), 0b001_1111);
    assert!(work.contains(at(0, 8, 0)));
    assert!(work.contains(at(4, 17, 59)));
    assert!(!work.contains(at(4, 18, 0)));
    assert!(!work.contains(at(5, 12, 0)));
    let weekend = window("Sat,Sun 10:00-14:00");
    assert_eq!(weekend.days(), 0b110_0000);
    assert!(weekend.contains(at(6, 10, 0)));
    assert!(!weekend.contains(at(6, 14, 0)));
    assert!(!weekend.contains(at(3, 11, 0)));
    assert_eq!(window("fri-MON 00:00-01:00").days(), 0b111_0001);
    assert_eq!(window("Mon, Wed-Thu 00:00-01:00").days(), 0b000_1101);
    assert_eq!(window("sunday 00:00-01:00").days(), 0b100_0000);
    let monday = window("Mon 00:00-24:00");
    assert!(monday.contains(at(0, 0, 0)) && monday.contains(at(0, 23, 59)));
    assert!(!monday.contains(at(1, 0, 0)) && !monday.contains(at(6, 23, 59)));
    let every = window("08:00-08:00");
    assert!(every.contains(at(3, 7, 59)) && every.contains(at(3, 8, 0)));
}

#[test]
fn window_parse_errors() {
    for bad in [
        "",
        "08:00",
        "Mon",
        "Mon-Fri",
        "Mox 08:00-09:00",
        "Mon-Fri 8-18",
        "24:00-06:00",
        "08:00-24:01",
        "08:60-09:00",
        "8:0-9:00",
        "-1:00-02:00",
        "Mon,,Tue 08:00-09:00",
    ] {
        let err = TimeWindow::parse(bad, &Zone::utc()).unwrap_err();
        assert!(err.contains("invalid time window"), "{bad}: {err}");
    }
    assert!(TimeWindow::new(0, 0, 10, Zone::utc()).is_err());
    assert!(TimeWindow::new(1, 1440, 10, Zone::utc()).is_err());
}

#[test]
fn window_opens_and_closes_at_the_minutes_written() {
    let work = window("Mon-Fri 08:30-17:45");
    assert_eq!((work.start(), work.end()), (8 * 60 + 30, 17 * 60 + 45));
    assert!(!work.contains(at(0, 8, 29)) && work.contains(at(0, 8, 30)));
    assert!(work.contains(at(0, 17, 44)) && !work.contains(at(0, 17, 45)));
    let night = window("22:00-06:00");
    assert_eq!((night.start(), night.end()), (22 * 60, 6 * 60));
    let monday = window("Mon 00:00-24:00");
    assert_eq!((monday.start(), monday.end()), (0, MINUTES_PER_DAY));
}

#[test]
fn time_and_not_time() {
    let mut q = query("10.0.0.1:1000");
    let rule = Rule { time: vec![window("Sat,Sun 00:00-24:00")], ..allow("r") };
    q.now = at(5, 12, 0);
    assert!(hits(&rule, &q));
    q.now = at(4, 12, 0);
    assert!(!hits(&rule, &q));
    let rule = Rule { not_time: vec![window("Mon-Fri 08:00-18:00")], ..allow("r") };
    assert!(!hits(&rule, &q));
    q.now = at(4, 20, 0);
    assert!(hits(&rule, &q));
}

#[test]
fn zone_utc_and_errors() {
    assert_eq!(Zone::utc().local_time(MONDAY), (0, 0));
    assert_eq!(Zone::utc().local_time(at(6, 23, 59)), (6, 23 * 60 + 59));
    assert_eq!(Zone::utc().local_time(0), (3, 0), "1970-01-01 was a Thursday");
    assert_eq!(Zone::utc().local_time(-60), (2, 1439));
    assert!(Zone::from_tzif("junk", b"not a tzif file").is_err());
}

#[test]
fn zone_name_and_debug() {
    assert_eq!(Zone::utc().name(), "UTC");
    assert_eq!(format!("{:?}", Zone::utc()), "Zone(UTC)");
    assert!(format!("{:?}", window("10:00-11:00")).contains("zone: Zone(UTC)"));
}

/// Europe/Paris from tzdata, or `None` (the skip recorded, a failure under `CI=true`) where
/// it is not installed.
fn paris() -> Option<Zone> {
    match named_zone("Europe/Paris") {
        Ok(zone) => Some(zone),
        Err(e) => {
            sluice_tests::skip(&format!("{e} (Debian package tzdata)"));
            None
        }
    }
}

#[test]
fn zone_named_follows_daylight_saving() {
    let Some(paris) = paris() else { return };
    assert_eq!(paris.offset(MONDAY), 3600);
    // 2024-07-01 10:00 UTC, a Monday: 12:00 in Paris.
    let july = 1_719_828_000;
    assert_eq!(paris.offset(july), 7200);
    assert_eq!(paris.local_time(july), (0, 12 * 60));
    // 2024-01-07 23:30 UTC is Monday 00:30 in Paris.
    assert_eq!(paris.local_time(at(6, 23, 30)), (0, 30));
    let w = TimeWindow::parse("Mon 00:00-01:00", &paris).unwrap();
    assert!(w.contains(at(6, 23, 30)));
    assert!(!w.contains(at(0, 0, 30)));
}

#[test]
fn sni_and_not_sni() {
    let p = |t: &str| NamePattern::parse(t).unwrap();
    let rule = Rule { sni: vec![p("api.example.com"), p("*.example.org")], ..allow("r") };
    let mut q = query("10.0.0.1:1000");
    assert!(!hits(&rule, &q), "no SNI: sni does not match");
    for yes in ["api.example.com", "API.Example.COM.", "a.example.org", "a.b.example.org"] {
        q.sni = Some(yes);
        assert!(hits(&rule, &q), "{yes}");
    }
    for no in ["example.org", "xapi.example.com", "aexample.org", "example.org.evil", ""] {
        q.sni = Some(no);
        assert!(!hits(&rule, &q), "{no}");
    }
    let not = Rule { not_sni: vec![p("*.example.org")], ..allow("r") };
    q.sni = None;
    assert!(hits(&not, &q), "no SNI: not_sni holds");
    q.sni = Some("x.example.org");
    assert!(!hits(&not, &q));
    q.sni = Some("example.org");
    assert!(hits(&not, &q));
    assert!(RuleSet::compile(vec![allow("a"), not]).needs_sni());
    assert!(!RuleSet::compile(vec![allow("a")]).needs_sni());
}

#[test]
fn name_pattern_parse() {
    let p = NamePattern::parse;
    assert_eq!(p("Example.COM."), Ok(NamePattern::Exact("example.com".into())));
    assert_eq!(p("*.Example.com"), Ok(NamePattern::Wildcard("example.com".into())));
    assert_eq!(p("*.local"), Ok(NamePattern::Wildcard("local".into())));
    for bad in ["", "*", "*.", "a.*.com", "*example.com", "a..b", "a b.com", ".a.com"] {
        assert!(p(bad).unwrap_err().contains("invalid server name"), "{bad}");
    }
    assert!(p(&"a".repeat(64)).is_err());
}

/// The host name bounds: a label of 63 bytes and a name of 253 bytes pass, one byte more
/// fails; `-` and `_` are allowed in labels.
#[test]
fn name_pattern_length_bounds_and_punctuation() {
    let p = NamePattern::parse;
    let label = "a".repeat(63);
    assert_eq!(p(&format!("{label}.com")), Ok(NamePattern::Exact(format!("{label}.com"))));
    let longest = format!("{label}.{label}.{label}.{}", "b".repeat(61));
    assert_eq!(longest.len(), 253);
    assert_eq!(p(&longest), Ok(NamePattern::Exact(longest.clone())));
    assert_eq!(p(&format!("*.{longest}.")), Ok(NamePattern::Wildcard(longest.clone())));
    let too_long = format!("b{longest}");
    assert_eq!(too_long.len(), 254);
    assert!(p(&too_long).unwrap_err().contains("1 to 253 characters"));
    for name in ["my-host.example.com", "_acme-challenge.example.com", "a_b.c-d"] {
        assert_eq!(p(name), Ok(NamePattern::Exact(name.into())), "{name}");
    }
}

/// A wildcard needs a label before its parent: a name that is the parent behind a bare dot
/// does not match.
#[test]
fn wildcard_needs_a_label_before_the_parent() {
    let wild = NamePattern::parse("*.example.com").unwrap();
    assert!(wild.matches("a.example.com"));
    assert!(!wild.matches(".example.com"));
    assert!(!wild.matches(".example.com."));
}

#[test]
fn first_match_wins() {
    let deny = |name: &str| Rule::new(name, Action::Deny { reset: true });
    let rules = vec![
        Rule { from: nets(&["10.1.0.0/16"]), from_port: vec![1..=10], ..deny("ports") },
        Rule { from: nets(&["10.0.0.0/8"]), ..allow("ten") },
        Rule { from: nets(&["10.1.2.3/32"]), ..deny("host, shadowed") },
        Rule { from: nets(&["10.1.2.0/24", "10.1.2.3/32"]), ..allow("twice") },
        deny("default"),
    ];
    assert_eq!(decide(&rules, &query("10.1.2.3:5")), Some(0));
    assert_eq!(decide(&rules, &query("10.1.2.3:5000")), Some(1));
    assert_eq!(decide(&rules, &query("11.1.2.3:5")), Some(4));
    assert_eq!(decide(&rules[2..], &query("10.1.2.3:5")), Some(0));
    assert_eq!(decide(&rules[3..], &query("10.1.2.3:5")), Some(0));
    assert_eq!(decide(&rules[3..], &query("10.1.3.3:5")), Some(1));
    let set = RuleSet::compile(rules);
    assert_eq!(set.len(), 5);
    assert_eq!(&*set.rule(4).name, "default");
    assert_eq!(set.rule(0).action, Action::Deny { reset: true });
}

/// A rule whose only criterion is `from` matches as soon as the trie reaches it: the compiled
/// set marks it as having nothing more to check, and a rule with any other criterion as not.
#[test]
fn only_from_rules_have_nothing_more_to_check() {
    let from = Rule { from: nets(&["10.0.0.0/8"]), ..allow("from") };
    let ports = Rule { from_port: vec![1..=10], ..from.clone() };
    let set = RuleSet::compile(vec![from, allow("all"), ports]);
    assert_eq!(set.checks, [false, false, true]);
}

#[test]
fn nested_and_split_prefixes() {
    // Inserted long-first so the trie must split existing edges.
    let list = ["10.1.2.3/32", "10.1.2.0/24", "10.1.3.0/24", "10.0.0.0/8", "0.0.0.0/0"];
    let rules: Vec<Rule> = list.iter().map(|n| Rule { from: nets(&[n]), ..allow(n) }).collect();
    assert_eq!(decide(&rules, &query("10.1.2.3:1")), Some(0));
    assert_eq!(decide(&rules, &query("10.1.2.4:1")), Some(1));
    assert_eq!(decide(&rules, &query("10.1.3.4:1")), Some(2));
    assert_eq!(decide(&rules, &query("10.2.3.4:1")), Some(3));
    assert_eq!(decide(&rules, &query("11.2.3.4:1")), Some(4));
    assert_eq!(decide(&rules, &query("[::1]:1")), None);
    let v6 = ["2001:db8::1/128", "2001:db8::/64", "2001:db8:0:1::/64", "::/0"];
    let rules: Vec<Rule> = v6.iter().map(|n| Rule { from: nets(&[n]), ..allow(n) }).collect();
    assert_eq!(decide(&rules, &query("[2001:db8::1]:1")), Some(0));
    assert_eq!(decide(&rules, &query("[2001:db8::2]:1")), Some(1));
    assert_eq!(decide(&rules, &query("[2001:db8:0:1::2]:1")), Some(2));
    assert_eq!(decide(&rules, &query("[fe80::1]:1")), Some(3));
    assert_eq!(decide(&rules, &query("10.0.0.1:1")), None);
}

/// The trie hands over the rules of each prefix that holds the client, shortest prefix first;
/// nodes without rules (the roots, the forks it adds) are not visited.
#[test]
fn trie_walk_visits_the_prefixes_holding_the_client_shortest_first() {
    let list = ["10.1.2.0/24", "10.1.3.0/24", "10.0.0.0/8", "10.1.2.3/32"];
    let rules: Vec<Rule> = list.iter().map(|n| Rule { from: nets(&[n]), ..allow(n) }).collect();
    let set = RuleSet::compile(rules);
    let walk = |client: &str| {
        let mut lists = Vec::new();
        set.trie.walk(client.parse().unwrap(), |rules| lists.push(rules.to_vec()));
        lists
    };
    assert_eq!(walk("10.1.2.3"), [vec![2], vec![0], vec![3]]);
    assert_eq!(walk("10.1.3.9"), [vec![2], vec![1]]);
    assert_eq!(walk("10.2.0.1"), [vec![2]]);
    assert!(walk("11.0.0.1").is_empty());
    assert!(walk("2001:db8::1").is_empty());
}

#[test]
fn trie_has_at_most_two_nodes_per_prefix() {
    // Every insertion adds at most a leaf and a fork: memory is linear in the prefixes.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let rules: Vec<Rule> = (0..20_000)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let net = match i % 5 {
                0 => IpNet::V6(
                    ipnet::Ipv6Net::new(Ipv6Addr::from(u128::from(x) << 64), 16 + (x % 49) as u8)
                        .unwrap(),
                ),
                _ => IpNet::V4(Ipv4Net::new(Ipv4Addr::from(x as u32), 8 + (x % 25) as u8).unwrap()),
            };
            Rule { from: vec![net], ..allow("r") }
        })
        .collect();
    let set = RuleSet::compile(rules);
    let (nodes, rules, node_size) = set.trie.footprint();
    assert!(nodes <= 2 * 20_000 + 2, "{nodes} nodes");
    assert_eq!(rules, 20_000);
    assert!(node_size <= 40);
}

// Property: the compiled matcher agrees with the linear reference.

fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    let last = prop::sample::select(vec![0u8, 1, 2, 3, 64, 127, 128, 255]);
    (0u8..2, 0u8..4, last).prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d))
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    let last = prop::sample::select(vec![0u16, 1, 2, 0x80, 0xffff]);
    (0u16..2, 0u16..3, last).prop_map(|(a, b, h)| Ipv6Addr::new(0x2001, 0xdb8, a, b, 0, 0, 0, h))
}

fn network() -> impl Strategy<Value = IpNet> {
    let v4_len = prop::sample::select(vec![0u8, 8, 15, 16, 22, 23, 24, 25, 30, 31, 32]);
    let v6_len = prop::sample::select(vec![0u8, 32, 47, 48, 63, 64, 96, 120, 127, 128]);
    prop_oneof![
        4 => (v4_addr(), v4_len.clone())
            .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a, l).unwrap())),
        3 => (v6_addr(), v6_len).prop_map(|(a, l)| IpNet::V6(ipnet::Ipv6Net::new(a, l).unwrap())),
        1 => (v4_addr(), v4_len).prop_map(|(a, l)| {
            IpNet::V6(ipnet::Ipv6Net::new(a.to_ipv6_mapped(), 96 + l).unwrap())
        }),
    ]
}

fn client() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        4 => v4_addr().prop_map(IpAddr::V4),
        1 => v4_addr().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
        3 => v6_addr().prop_map(IpAddr::V6),
    ];
    (ip, 1000u16..1008).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

const LISTENERS: [&str; 6] =
    ["127.0.0.1:80", "127.0.0.1:443", "127.0.0.2:80", "[::1]:443", "[::1]:80", "[::2]:443"];
const NAMES: [&str; 6] = [
    "example.com",
    "a.example.com",
    "A.Example.COM.",
    "x.b.example.com",
    "other.org",
    "b.example.com",
];

fn listener_match() -> impl Strategy<Value = ListenerMatch> {
    let ip = prop::option::of(prop::sample::select(vec!["127.0.0.1", "127.0.0.2", "::1"]));
    let port = prop::option::of(prop::sample::select(vec![80u16, 443]));
    (ip, port).prop_map(|(ip, port)| ListenerMatch { ip: ip.map(|i| i.parse().unwrap()), port })
}

fn name_pattern() -> impl Strategy<Value = NamePattern> {
    let text = ["example.com", "*.example.com", "a.example.com", "*.b.example.com", "other.org"];
    prop::sample::select(text.to_vec()).prop_map(|t| NamePattern::parse(t).unwrap())
}

fn time_window(zones: Vec<Zone>) -> impl Strategy<Value = TimeWindow> {
    let start = prop_oneof![0u16..1440, Just(0), Just(22 * 60)];
    let end = prop_oneof![0u16..=1440, Just(1440), Just(6 * 60)];
    (1u8..=0x7f, start, end, prop::sample::select(zones))
        .prop_map(|(days, start, end, zone)| TimeWindow::new(days, start, end, zone).unwrap())
}

/// Mostly empty, sometimes one to three entries.
fn some<T: Clone + std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(s, 1..4)]
}

fn ports() -> impl Strategy<Value = RangeInclusive<u16>> {
    (1000u16..1008, 0u16..4).prop_map(|(low, span)| low..=low + span)
}

fn rule(zones: Vec<Zone>) -> impl Strategy<Value = Rule> {
    let from = prop_oneof![1 => Just(Vec::new()), 3 => prop::collection::vec(network(), 1..4)];
    let ips = (from, some(network()), some(ports()), some(ports()));
    let to = (some(listener_match()), some(listener_match()));
    let time = (some(time_window(zones.clone())), some(time_window(zones)));
    let sni = (some(name_pattern()), some(name_pattern()));
    (ips, to, time, sni).prop_map(|((from, not_from, fp, nfp), (to, nto), (t, nt), (s, ns))| Rule {
        from,
        not_from,
        from_port: fp,
        not_from_port: nfp,
        to,
        not_to: nto,
        time: t,
        not_time: nt,
        sni: s,
        not_sni: ns,
        ..allow("random")
    })
}

fn random_query() -> impl Strategy<Value = Query<'static>> {
    let listener = prop::sample::select(LISTENERS.to_vec());
    let sni = prop::option::of(prop::sample::select(NAMES.to_vec()));
    (client(), listener, 0i64..8 * SECONDS_PER_DAY, sni).prop_map(|(client, l, t, sni)| Query {
        client,
        listener: l.parse().unwrap(),
        now: MONDAY + t,
        sni,
    })
}

fn zones() -> Vec<Zone> {
    // Two distinct UTC zones exercise the per-query zone cache.
    let mut zones = vec![Zone::utc(), Zone::utc()];
    zones.extend(named_zone("Europe/Paris").ok());
    zones
}

proptest! {
    #![proptest_config(Config { cases: 4000, failure_persistence: None, ..Config::default() })]

    #[test]
    fn compiled_agrees_with_linear(
        rules in prop::collection::vec(rule(zones()), 0..40),
        queries in prop::collection::vec(random_query(), 1..8),
    ) {
        let set = RuleSet::compile(rules.clone());
        for q in &queries {
            prop_assert_eq!(set.decide(q), decide_linear(&rules, q), "query {:?}", q);
        }
    }
}
