//! Load balancing and backend health, end to end with several loopback backends: how each
//! algorithm spreads sessions, consistent hashing across two instances, failover when a
//! backend dies mid-run (no failed client connection), recovery after the rise checks,
//! backups, and `no_backend` when nothing can take a session.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, connect_from, drain, read_exactly, tagged_exchange, tagged_round_trip, Backend,
    Config, Driver, End, Service, SessionKey, Sluice,
};

const WAIT: Duration = Duration::from_secs(10);

/// A `[[pool]]` section: `backends` are TOML values (strings or inline tables).
fn pool(name: &str, algorithm: &str, backends: &[String], extra: &str) -> String {
    format!(
        "[[pool]]\nname = {name:?}\nalgorithm = {algorithm:?}\nbackends = [{}]\n{extra}",
        backends.join(", ")
    )
}

fn plain(addr: SocketAddr) -> String {
    format!("\"{addr}\"")
}

/// Health checks every 100 ms: down after one failed check, up after `rise` passed ones.
fn fast_checks(rise: u32) -> String {
    format!("[pool.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = {rise}\nfall = 1\n")
}

/// How many of `n` sequential sessions each tag (1-based, `tags` of them) served.
fn tally(addr: SocketAddr, n: usize, tags: usize) -> Vec<usize> {
    let mut counts = vec![0; tags];
    for _ in 0..n {
        let (tag, _) = tagged_round_trip(addr, b"ping");
        counts[usize::from(tag) - 1] += 1;
    }
    counts
}

/// Opens a session and reads its backend's tag, leaving the session open.
fn hold(addr: SocketAddr) -> (u8, TcpStream) {
    let mut stream = connect(addr);
    let tag = read_exactly(&mut stream, 1)[0];
    (tag, stream)
}

/// Polls `/metrics` until `name{service,backend}` equals `want`.
fn wait_for_metric(sluice: &Sluice, name: &str, service: &str, backend: SocketAddr, want: f64) {
    let addr = backend.to_string();
    let labels = [("service", service), ("backend", addr.as_str())];
    let deadline = Instant::now() + WAIT;
    loop {
        let value = sluice.admin().metrics().value(name, &labels);
        if value == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} stayed {value:?}, want {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Round-robin gives each backend its turn, smooth weighted round-robin follows the
/// weights, least-sessions balances open sessions by weight, and two random choices keep
/// open sessions close to even.
fn each_algorithm_spreads_sessions_as_it_promises(driver: Driver) {
    let backends: Vec<Backend> = (1..=3).map(Backend::tagged_echo).collect();
    let b = |i: usize| backends[i].addr();
    let weighted = |i: usize, w: u32| format!("{{ addr = \"{}\", weight = {w} }}", b(i));
    let config = Config::new(driver)
        .service(Service::with_pool("rr", "rr"))
        .service(Service::with_pool("wrr", "wrr"))
        .service(Service::with_pool("least", "least"))
        .service(Service::with_pool("p2c", "p2c"))
        .section(&pool("rr", "round_robin", &[plain(b(0)), plain(b(1)), plain(b(2))], ""))
        .section(&pool("wrr", "weighted", &[weighted(0, 3), weighted(1, 1)], ""))
        .section(&pool("least", "least_sessions", &[weighted(0, 1), weighted(1, 2)], ""))
        .section(&pool("p2c", "two_choices", &[plain(b(0)), plain(b(1)), plain(b(2))], ""));
    let Some(sluice) = Sluice::start(config) else { return };

    assert_eq!(tally(sluice.addr("rr"), 30, 3), vec![10, 10, 10]);
    assert_eq!(tally(sluice.addr("wrr"), 40, 3), vec![30, 10, 0]);

    let mut open = Vec::new();
    let mut counts = [0; 3];
    for _ in 0..6 {
        let (tag, stream) = hold(sluice.addr("least"));
        counts[usize::from(tag) - 1] += 1;
        open.push(stream);
    }
    assert_eq!(counts, [2, 4, 0], "least-sessions with weights 1 and 2");

    // 60 sessions held on three backends: the less loaded of two random draws keeps every
    // backend within 3 of the others (a load-blind random choice strays by about 9).
    let mut counts = [0i32; 3];
    for _ in 0..60 {
        let (tag, stream) = hold(sluice.addr("p2c"));
        counts[usize::from(tag) - 1] += 1;
        open.push(stream);
    }
    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
    assert!(spread <= 3, "two choices: {counts:?}");
}

/// Two instances with the same pool map every client address to the same backend, and a
/// client keeps its backend from one connection to the next.
fn source_hash_maps_a_client_alike_on_every_instance(driver: Driver) {
    let backends: Vec<Backend> = (1..=4).map(Backend::tagged_echo).collect();
    let list: Vec<String> = backends.iter().map(|b| plain(b.addr())).collect();
    let config = || {
        Config::new(driver).service(Service::with_pool("hash", "hash")).section(&pool(
            "hash",
            "source_hash",
            &list,
            "",
        ))
    };
    let Some(first) = Sluice::start(config()) else { return };
    let Some(second) = Sluice::start(config()) else { return };
    let mut used = [false; 4];
    for last in 2..=31u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        let tag_via = |sluice: &Sluice| {
            let stream = connect_from(ip, sluice.addr("hash"));
            tagged_exchange(stream, b"hello").expect("tagged exchange")
        };
        let tag = tag_via(&first);
        assert_eq!(tag_via(&second), tag, "client {ip}: the instances disagree");
        assert_eq!(tag_via(&first), tag, "client {ip} moved on its next connection");
        used[usize::from(tag) - 1] = true;
    }
    assert!(used.iter().filter(|&&u| u).count() >= 3, "30 clients used only {used:?}");
}

/// A backend dies in the middle of a run of sessions: not one client connection fails
/// (the session retries the next backend), and the dead one is reported down.
fn a_backend_dying_mid_run_fails_no_client(driver: Driver) {
    let b1 = Backend::tagged_echo(1);
    let b3 = Backend::tagged_echo(3);
    let mut b2 = Some(Backend::tagged_echo(2));
    let dead = b2.as_ref().map(Backend::addr).expect("backend 2");
    let list = [plain(b1.addr()), plain(dead), plain(b3.addr())];
    let config = Config::new(driver)
        .admin_tcp()
        .service(Service::with_pool("web", "web"))
        .section(&pool("web", "round_robin", &list, &fast_checks(2)));
    let Some(sluice) = Sluice::start(config) else { return };
    let mut after = [0; 3];
    for i in 0..150 {
        if i == 50 {
            b2 = None;
        }
        let stream = connect(sluice.addr("web"));
        let tag = tagged_exchange(stream, b"payload")
            .unwrap_or_else(|e| panic!("session {i} failed: {e}"));
        if i >= 50 {
            after[usize::from(tag) - 1] += 1;
        }
    }
    assert!(b2.is_none());
    assert_eq!(after[1], 0, "the dead backend served a session");
    assert!(after[0] >= 40 && after[2] >= 40, "survivors share the load: {after:?}");
    wait_for_metric(&sluice, "sluice_backend_healthy", "web", dead, 0.0);
    assert!(sluice.wait_for_log(&format!("backend {dead} of"), WAIT).is_some());
}

/// A backend that fails its checks gets no session (no connect is even tried); once it is
/// back, it serves again after `rise` passed checks, and both changes are logged once.
fn a_recovered_backend_returns_after_its_rise_checks(driver: Driver) {
    let mut first = Some(Backend::tagged_echo(1));
    let addr = first.as_ref().map(Backend::addr).expect("backend 1");
    let second = Backend::tagged_echo(2);
    let config = Config::new(driver).admin_tcp().service(Service::with_pool("web", "web")).section(
        &pool("web", "round_robin", &[plain(addr), plain(second.addr())], &fast_checks(3)),
    );
    let Some(sluice) = Sluice::start(config) else { return };
    assert_eq!(tally(sluice.addr("web"), 10, 2), vec![5, 5]);

    first = None;
    wait_for_metric(&sluice, "sluice_backend_healthy", "web", addr, 0.0);
    let errors = |s: &Sluice| {
        let addr = addr.to_string();
        s.admin()
            .metrics()
            .get("sluice_backend_connect_errors_total", &[("service", "web"), ("backend", &addr)])
    };
    let before = errors(&sluice);
    assert_eq!(tally(sluice.addr("web"), 10, 2), vec![0, 10]);
    assert_eq!(errors(&sluice), before, "a down backend was still tried");
    assert_eq!(
        sluice
            .admin()
            .metrics()
            .get("sluice_backend_up", &[("service", "web"), ("backend", &addr.to_string())]),
        0.0
    );

    assert!(first.is_none());
    let _revived = Backend::tagged_echo_on(addr, 1);
    let came_back = Instant::now();
    wait_for_metric(&sluice, "sluice_backend_healthy", "web", addr, 1.0);
    // Three passed checks 100 ms apart cannot take less than 200 ms.
    assert!(came_back.elapsed() >= Duration::from_millis(200), "up before its rise checks");
    assert_eq!(tally(sluice.addr("web"), 10, 2), vec![5, 5]);
    let logs = sluice.logs();
    let down = format!("health: backend {addr} of pool web is down");
    let up = format!("health: backend {addr} of pool web is up");
    assert_eq!(logs.iter().filter(|l| l.contains(&down)).count(), 1, "{logs:#?}");
    assert_eq!(logs.iter().filter(|l| l.contains(&up)).count(), 1, "{logs:#?}");
}

/// A backup gets sessions only while no primary can take them: not while the primary is
/// up, at once (no failed client) when the primary dies, and no longer once it is back.
fn a_backup_serves_only_while_the_primaries_are_down(driver: Driver) {
    let mut primary = Some(Backend::tagged_echo(1));
    let addr = primary.as_ref().map(Backend::addr).expect("primary");
    let backup = Backend::tagged_echo(2);
    let list = [plain(addr), format!("{{ addr = \"{}\", backup = true }}", backup.addr())];
    let config = Config::new(driver)
        .admin_tcp()
        .service(Service::with_pool("web", "web"))
        .section(&pool("web", "round_robin", &list, &fast_checks(1)));
    let Some(sluice) = Sluice::start(config) else { return };
    assert_eq!(tally(sluice.addr("web"), 10, 2), vec![10, 0]);
    primary = None;
    assert_eq!(tally(sluice.addr("web"), 10, 2), vec![0, 10], "the backup takes over at once");
    wait_for_metric(&sluice, "sluice_backend_healthy", "web", addr, 0.0);
    assert!(primary.is_none());
    let _revived = Backend::tagged_echo_on(addr, 1);
    wait_for_metric(&sluice, "sluice_backend_healthy", "web", addr, 1.0);
    assert_eq!(tally(sluice.addr("web"), 10, 2), vec![10, 0]);
}

/// With every backend disabled through the admin API, a session is refused cleanly (EOF,
/// no byte), logged `no_backend` and counted; enabling one brings service back.
fn no_backend_up_refuses_sessions_cleanly(driver: Driver) {
    let (one, two) = (Backend::tagged_echo(1), Backend::tagged_echo(2));
    let service = Service::new("web", &[one.addr(), two.addr()]);
    let Some(sluice) = Sluice::start(Config::new(driver).admin_tcp().service(service)) else {
        return;
    };
    for b in [one.addr(), two.addr()] {
        assert_eq!(sluice.admin().post(&format!("/backends/web/{b}/disable")).status, 200);
    }
    let mut client = connect(sluice.addr("web"));
    let key = SessionKey::of(&client);
    let outcome = drain(&mut client);
    assert_eq!((outcome.end, outcome.bytes), (End::Eof, 0));
    let record = sluice.wait_for_session(key, WAIT).expect("no session line");
    assert_eq!((record.reason.as_str(), record.backend), ("no_backend", None));
    let metrics = sluice.admin().metrics();
    assert_eq!(metrics.get("sluice_no_backend_sessions_total", &[("service", "web")]), 1.0);
    assert_eq!(sluice.admin().post(&format!("/backends/web/{}/enable", two.addr())).status, 200);
    assert_eq!(tally(sluice.addr("web"), 4, 2), vec![0, 4]);
}

sluice_tests::for_each_driver!(
    each_algorithm_spreads_sessions_as_it_promises,
    source_hash_maps_a_client_alike_on_every_instance,
    a_backend_dying_mid_run_fails_no_client,
    a_recovered_backend_returns_after_its_rise_checks,
    a_backup_serves_only_while_the_primaries_are_down,
    no_backend_up_refuses_sessions_cleanly,
);
