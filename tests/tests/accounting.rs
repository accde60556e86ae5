//! Live per-client accounting (issue 22, item 5): clients bound to 127.0.0.2, 127.0.0.3 ...
//! move known byte counts through an echo service; `/stats` and `/metrics` then show
//! exactly those bytes (each way) and sessions per client address and per client network,
//! and never more than `admin.top_clients` of either. On every driver.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{connect_from, echo_exchange, Backend, Config, Driver, Service, Sluice};

/// One client's share of a test: its address, its sessions, and the bytes each session
/// sends (and gets back from the echo backend).
struct Share {
    client: u8,
    sessions: u64,
    bytes: u64,
}

/// Runs every session of `shares` to its end (both directions closed).
fn run(addr: SocketAddr, shares: &[Share]) {
    for (i, share) in shares.iter().enumerate() {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, share.client));
        for n in 0..share.sessions {
            let stream = connect_from(ip, addr);
            let seed = (i as u64) * 100 + n;
            echo_exchange(stream, seed, share.bytes)
                .unwrap_or_else(|e| panic!("echo from {ip}: {e}"));
        }
    }
}

/// `/stats` once every session of `sessions` in all has been accounted as closed.
fn settled_stats(sluice: &Sluice, sessions: u64) -> Value {
    let admin = sluice.admin();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = admin.stats();
        let nets = stats["clients"]["networks"].as_array().cloned().unwrap_or_default();
        let total: u64 = nets.iter().map(|n| n["sessions"].as_u64().unwrap_or(0)).sum();
        let active: u64 = nets.iter().map(|n| n["active"].as_u64().unwrap_or(0)).sum();
        if (total == sessions && active == 0) || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A row of `clients.clients` or `clients.networks`: (name, bytes_up, bytes_down,
/// sessions, active).
fn rows(list: &Value, key: &str) -> Vec<(String, u64, u64, u64, u64)> {
    let list = list.as_array().unwrap_or_else(|| panic!("not a list: {list}"));
    list.iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"));
            let name = r[key].as_str().unwrap_or_else(|| panic!("no {key} in {r}"));
            (name.to_string(), n("bytes_up"), n("bytes_down"), n("sessions"), n("active"))
        })
        .collect()
}

fn row(name: &str, up: u64, down: u64, sessions: u64) -> (String, u64, u64, u64, u64) {
    (name.to_string(), up, down, sessions, 0)
}

/// Six clients in two /30 networks: the totals of each client and network are exact, in
/// `/stats` (heaviest first) and in `/metrics`.
fn clients_and_networks_show_exact_bytes_and_sessions(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver)
        .workers(2)
        .admin_tcp()
        .admin_key("top_clients = 20")
        .admin_key("client_network_v4 = 30")
        .service(Service::new("web", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let shares = [
        Share { client: 2, sessions: 1, bytes: 1000 },
        Share { client: 3, sessions: 2, bytes: 2000 },
        Share { client: 4, sessions: 1, bytes: 3000 },
        Share { client: 5, sessions: 2, bytes: 4000 },
        Share { client: 6, sessions: 1, bytes: 5000 },
        Share { client: 7, sessions: 2, bytes: 6000 },
    ];
    run(sluice.addr("web"), &shares);
    let stats = settled_stats(&sluice, 9);
    let clients = &stats["clients"];
    assert_eq!(clients["top"], 20);
    assert_eq!(clients["network_v4"], 30);
    // Heaviest first, by bytes both ways.
    assert_eq!(
        rows(&clients["clients"], "client"),
        vec![
            row("127.0.0.7", 12000, 12000, 2),
            row("127.0.0.5", 8000, 8000, 2),
            row("127.0.0.6", 5000, 5000, 1),
            row("127.0.0.3", 4000, 4000, 2),
            row("127.0.0.4", 3000, 3000, 1),
            row("127.0.0.2", 1000, 1000, 1),
        ]
    );
    assert_eq!(
        rows(&clients["networks"], "network"),
        vec![row("127.0.0.4/30", 28000, 28000, 6), row("127.0.0.0/30", 5000, 5000, 3)]
    );
    let m = sluice.admin().metrics();
    let up = |c: &str| m.get("sluice_client_bytes_total", &[("client", c), ("direction", "up")]);
    let down =
        |c: &str| m.get("sluice_client_bytes_total", &[("client", c), ("direction", "down")]);
    assert_eq!((up("127.0.0.3"), down("127.0.0.3")), (4000.0, 4000.0));
    assert_eq!((up("127.0.0.6"), down("127.0.0.6")), (5000.0, 5000.0));
    assert_eq!(m.get("sluice_client_sessions_total", &[("client", "127.0.0.7")]), 2.0);
    assert_eq!(m.get("sluice_client_sessions_active", &[("client", "127.0.0.7")]), 0.0);
    let net = [("network", "127.0.0.4/30"), ("direction", "up")];
    assert_eq!(m.get("sluice_network_bytes_total", &net), 28000.0);
    assert_eq!(m.get("sluice_network_sessions_total", &[("network", "127.0.0.0/30")]), 3.0);
    assert_eq!(m.series("sluice_client_sessions_total"), 6);
    assert_eq!(m.series("sluice_network_sessions_total"), 2);
}

/// With more clients than `top_clients`, only the heaviest are listed, in `/stats` and in
/// `/metrics`; the network aggregate (default /24) still counts every client.
fn the_top_n_bound_holds_with_more_clients(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver)
        .workers(2)
        .admin_tcp()
        .admin_key("top_clients = 3")
        .service(Service::new("web", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    // Eight clients, 127.0.0.2 .. 127.0.0.9, the later ones heavier.
    let shares: Vec<Share> =
        (2..=9).map(|c| Share { client: c, sessions: 1, bytes: u64::from(c) * 500 }).collect();
    run(sluice.addr("web"), &shares);
    let stats = settled_stats(&sluice, 8);
    let clients = &stats["clients"];
    assert_eq!(
        rows(&clients["clients"], "client"),
        vec![
            row("127.0.0.9", 4500, 4500, 1),
            row("127.0.0.8", 4000, 4000, 1),
            row("127.0.0.7", 3500, 3500, 1),
        ]
    );
    // 500 * (2 + 3 + ... + 9) = 22000 each way.
    assert_eq!(rows(&clients["networks"], "network"), vec![row("127.0.0.0/24", 22000, 22000, 8)]);
    let m = sluice.admin().metrics();
    assert_eq!(m.series("sluice_client_sessions_total"), 3);
    assert_eq!(m.series("sluice_client_bytes_total"), 6);
    assert_eq!(m.value("sluice_client_sessions_total", &[("client", "127.0.0.6")]), None);
    assert_eq!(m.get("sluice_network_sessions_total", &[("network", "127.0.0.0/24")]), 8.0);
}

/// `top_clients = 0` turns accounting off: `clients` is null and no client series exist.
fn zero_top_clients_turns_accounting_off(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver)
        .admin_tcp()
        .admin_key("top_clients = 0")
        .service(Service::new("web", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    run(sluice.addr("web"), &[Share { client: 2, sessions: 1, bytes: 100 }]);
    assert!(sluice.admin().stats()["clients"].is_null());
    assert_eq!(sluice.admin().metrics().series("sluice_client_sessions_total"), 0);
}

sluice_tests::for_each_driver!(
    clients_and_networks_show_exact_bytes_and_sessions,
    the_top_n_bound_holds_with_more_clients,
    zero_top_clients_turns_accounting_off
);
