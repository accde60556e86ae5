//! DNS discovery against an in-test DNS server on loopback: a pool follows its A records
//! as they change, keeps its last good set while lookups fail, takes ports, weights and
//! backups from SRV records, and looks up again on reload; a hostile resolver holds
//! neither a reload, the admin API, a stop nor the start for longer than one lookup round.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sluice_tests::{
    free_port, tagged_round_trip, Backend, Config, DnsAnswer, DnsServer, Driver, Reload,
    ScratchDir, Service, Sluice,
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
    let mark = sluice.log_mark();
    assert!(matches!(sluice.reload(WAIT), Reload::Applied(_)));
    // The lookup runs off the control thread: the new set follows the reload shortly.
    let changed = format!("dns: pool web now has backends 127.0.0.1:{}", port(2));
    assert!(sluice.wait_for_log_after(mark, &changed, WAIT).is_some());
    assert_eq!(tally(sluice.addr("web"), 5, 3), vec![0, 0, 5]);
}

/// An SRV answer naming 64 targets whose addresses the server never gives (hostile).
fn hostile(dns: &DnsServer, name: &str) {
    dns.set(name, DnsAnswer::SrvNoGlue((0..64).map(|i| (10, 1, 8000 + i)).collect()));
    for i in 0..64 {
        dns.set(&format!("t{i}.{name}"), DnsAnswer::Silent);
    }
}

/// Issue 26 item 7: a resolver that names many SRV targets and never answers for their
/// addresses held a reload in the control thread for 256 s: SIGTERM went unanswered and
/// the admin API answered 503. Now the lookup runs off the control thread under one
/// deadline: the reload is applied at once, the admin API answers, the last good set
/// keeps serving, the failed lookup is logged, and SIGTERM stops sluice at once.
fn a_silent_resolver_holds_neither_reload_nor_admin_nor_stop(driver: Driver) {
    let dns = DnsServer::start();
    let good = Backend::tagged_echo(1);
    let name = "_web._tcp.test";
    dns.set(name, DnsAnswer::Srv(vec![(10, 1, good.addr().port(), LOCAL)]));
    let config = Config::new(driver)
        .admin_tcp()
        .service(Service::with_pool("web", "web"))
        .section(&pool(&format!("srv = {name:?}"), dns.addr(), "1h", "round_robin"));
    let Some(mut sluice) = Sluice::start(config) else { return };
    assert_eq!(tally(sluice.addr("web"), 3, 1), vec![3]);

    hostile(&dns, name);
    let admin = sluice.admin();
    let asked = Instant::now();
    let reload = admin.post("/reload");
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert!(asked.elapsed() < Duration::from_secs(1), "reload took {:?}", asked.elapsed());
    for _ in 0..3 {
        let asked = Instant::now();
        assert_eq!(admin.get("/connections").status, 200);
        assert!(asked.elapsed() < Duration::from_secs(1), "took {:?}", asked.elapsed());
        assert_eq!(tally(sluice.addr("web"), 2, 1), vec![2], "the last good set serves");
        std::thread::sleep(Duration::from_millis(500));
    }
    let failed = "dns: lookup of _web._tcp.test for pool web failed";
    assert!(sluice.wait_for_log(failed, WAIT).is_some(), "the failed lookup is logged");
    assert_eq!(tally(sluice.addr("web"), 2, 1), vec![2]);

    assert_eq!(admin.post("/reload").status, 200);
    let sent = Instant::now();
    let status = sluice.terminate(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(sent.elapsed() < Duration::from_secs(1), "stopped after {:?}", sent.elapsed());
}

/// The start-up lookup too: sluice waits for it at most the round's deadline (5 s), and a
/// stop signal meanwhile stops it at once.
fn a_silent_resolver_at_start_holds_no_stop_and_no_start(driver: Driver) {
    let dns = DnsServer::start();
    let name = "_web._tcp.test";
    hostile(&dns, name);
    let config = Config::new(driver).service(Service::with_pool("web", "web")).section(&pool(
        &format!("srv = {name:?}"),
        dns.addr(),
        "1h",
        "round_robin",
    ));
    let scratch = ScratchDir::new();
    let path = scratch.join("sluice.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let args = ["run", "--config", path.to_str().unwrap(), "--log-level", "info"];

    let mut stopped = Sluice::spawn(&args);
    // Well inside the start-up round (its deadline is 5 s).
    std::thread::sleep(Duration::from_secs(1));
    let sent = Instant::now();
    let status = stopped.terminate(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(sent.elapsed() < Duration::from_secs(1), "stopped after {:?}", sent.elapsed());
    let looked = stopped.logs().iter().any(|l| l.contains("dns: looking up the discovered pools"));
    assert!(looked, "{:?}", stopped.logs());

    let mut started = Sluice::spawn(&args);
    let since = Instant::now();
    let ready = started.wait_for_log("service web backends=pool:web", Duration::from_secs(10));
    if started.logs().iter().any(|l| l.contains("driver uring unavailable")) {
        sluice_tests::uring_unavailable("io_uring unavailable");
        return;
    }
    assert!(ready.is_some(), "{:?}", started.logs());
    let took = since.elapsed();
    assert!(took < Duration::from_secs(7), "started after {took:?}");
    assert!(started
        .logs()
        .iter()
        .any(|l| l.contains("dns: lookup of _web._tcp.test for pool web failed")));
    assert!(started.terminate(Duration::from_secs(5)).success());
}

// Discovery runs in the control process, whatever the relay driver: once is enough.
sluice_tests::driver_independent!(
    a_records_are_followed_and_a_failed_lookup_keeps_the_last_set,
    srv_records_give_ports_weights_and_backups,
    a_silent_resolver_holds_neither_reload_nor_admin_nor_stop,
    a_silent_resolver_at_start_holds_no_stop_and_no_start,
);
