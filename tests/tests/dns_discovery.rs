//! DNS discovery against an in-test DNS server on loopback: a pool follows its A records
//! as they change, keeps its last good set while lookups fail, takes ports, weights and
//! backups from SRV records, and looks up again on reload.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sluice_tests::{
    free_port, tagged_round_trip, Backend, Config, DnsAnswer, DnsServer, Driver, Reload, Service,
    Sluice,
};

const WAIT: Duration = Duration::from_secs(10);
const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn pool(lookup: &str, resolver: SocketAddr, interval: &str, algorithm: &str) -> String {
    format!(
        "[[pool]]\nname = \"web\"\n{lookup}\nresolver = \"{resolver}\"\ndns_interval = {interval:?}\nalgorithm = {algorithm:?}\n"
    )
}

/// Tags of `n` sequential sessions, counted per tag (1-based, `tags` of them).
fn tally(addr: SocketAddr, n: usize, tags: usize) -> Vec<usize> {
    let mut counts = vec![0; tags];
    for _ in 0..n {
        counts[usize::from(tagged_round_trip(addr, b"x").0) - 1] += 1;
    }
    counts
}

/// Runs sessions until one is served by `tag`; panics after the wait.
fn wait_for_tag(addr: SocketAddr, tag: u8) {
    let deadline = Instant::now() + WAIT;
    while tagged_round_trip(addr, b"x").0 != tag {
        assert!(Instant::now() < deadline, "no session reached backend {tag}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pool follows its A records: a new address replaces the old one within the
/// interval, a failing server changes nothing, and two addresses share the sessions.
fn a_records_are_followed_and_a_failed_lookup_keeps_the_last_set(driver: Driver) {
    let dns = DnsServer::start();
    let port = free_port(IpAddr::V4(LOCAL));
    let _one = Backend::tagged_echo_on((LOCAL, port).into(), 1);
    let _two = Backend::tagged_echo_on((Ipv4Addr::new(127, 0, 0, 2), port).into(), 2);
    dns.set("web.test", DnsAnswer::A(vec![LOCAL]));
    let lookup = format!("dns = \"web.test:{port}\"");
    let config = Config::new(driver).service(Service::with_pool("web", "web")).section(&pool(
        &lookup,
        dns.addr(),
        "200ms",
        "round_robin",
    ));
    let Some(sluice) = Sluice::start(config) else { return };
    let addr = sluice.addr("web");
    assert_eq!(tally(addr, 5, 2), vec![5, 0]);

    dns.set("web.test", DnsAnswer::A(vec![Ipv4Addr::new(127, 0, 0, 2)]));
    wait_for_tag(addr, 2);
    assert_eq!(tally(addr, 5, 2), vec![0, 5]);
    let changed = format!("dns: pool web now has backends 127.0.0.2:{port}");
    assert!(sluice.wait_for_log(&changed, WAIT).is_some());

    dns.set("web.test", DnsAnswer::Fail);
    let asked = dns.queries();
    let failed = "dns: lookup of web.test for pool web failed";
    assert!(sluice.wait_for_log(failed, WAIT).is_some(), "the failed lookup is logged");
    assert!(dns.queries() > asked);
    assert_eq!(tally(addr, 5, 2), vec![0, 5], "the last good set stays");

    dns.set("web.test", DnsAnswer::A(vec![LOCAL, Ipv4Addr::new(127, 0, 0, 2)]));
    wait_for_tag(addr, 1);
    assert_eq!(tally(addr, 10, 2), vec![5, 5]);
}

/// SRV records give each backend its port and weight, and a lower priority makes a backup;
/// a reload looks the name up again at once, whatever the interval.
fn srv_records_give_ports_weights_and_backups(driver: Driver) {
    let dns = DnsServer::start();
    let backends: Vec<Backend> = (1..=3).map(Backend::tagged_echo).collect();
    let port = |i: usize| backends[i].addr().port();
    let name = "_web._tcp.test";
    dns.set(
        name,
        DnsAnswer::Srv(vec![
            (10, 3, port(0), LOCAL),
            (10, 1, port(1), LOCAL),
            (20, 1, port(2), LOCAL),
        ]),
    );
    let config = Config::new(driver).service(Service::with_pool("web", "web")).section(&pool(
        &format!("srv = {name:?}"),
        dns.addr(),
        "1h",
        "weighted",
    ));
    let Some(sluice) = Sluice::start(config) else { return };
    assert_eq!(tally(sluice.addr("web"), 40, 3), vec![30, 10, 0]);

    dns.set(name, DnsAnswer::Srv(vec![(10, 1, port(2), LOCAL)]));
    assert!(matches!(sluice.reload(WAIT), Reload::Applied(_)));
    assert_eq!(tally(sluice.addr("web"), 5, 3), vec![0, 0, 5]);
}

sluice_tests::for_each_driver!(
    a_records_are_followed_and_a_failed_lookup_keeps_the_last_set,
    srv_records_give_ports_weights_and_backups,
);
