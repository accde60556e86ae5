//! Issue 22 item 4, TCP options per side: a service's client keepalive is on the sockets
//! sluice accepts, its backend keepalive on the sockets it connects, and its backlog on its
//! listeners, as `ss` reports them from the kernel (getsockopt of each option is checked at
//! unit level, engine/src/sys/socket.rs).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;

use sluice_tests::{connect, Backend, Config, Driver, Service, Sluice};

/// `ss` lines (no header) with these options.
fn ss(args: &str) -> Vec<String> {
    let out = Command::new("ss").args(args.split(' ')).output().expect("run ss");
    assert!(out.status.success(), "ss {args}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// The keepalive timer of the established socket from `local` to `peer`, in seconds left,
/// or `None` when it has no keepalive timer.
fn keepalive_left(local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    let lines = ss("-tnoH");
    let line = lines
        .iter()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(3) == Some(&local.to_string().as_str())
                && f.get(4) == Some(&peer.to_string().as_str())
        })
        .unwrap_or_else(|| panic!("no socket {local} -> {peer} in:\n{}", lines.join("\n")));
    // ss writes "39sec", "4min59sec" or "1min".
    let timer = line.split("timer:(keepalive,").nth(1)?.split(',').next()?;
    let (mins, rest) = match timer.split_once("min") {
        Some((m, rest)) => (m.parse::<u64>().ok()?, rest),
        None => (0, timer),
    };
    let secs = match rest.strip_suffix("sec") {
        Some(s) => s.parse::<f64>().ok()?.ceil() as u64,
        None => 0,
    };
    Some(mins * 60 + secs)
}

fn keepalive_of_each_side_and_the_backlog_reach_the_kernel(driver: Driver) {
    let backend = Backend::echo();
    let service = Service::new("kept", &[backend.addr()])
        .key("client_keepalive = { idle = \"40s\", interval = \"7s\", count = 3 }")
        .key("backend_keepalive = { idle = \"300s\" }")
        .key("client_user_timeout = \"9s\"")
        .key("backlog = 77");
    let plain = Service::new("plain", &[backend.addr()]);
    let config = Config::new(driver).service(service).service(plain);
    let Some(sluice) = Sluice::start(config) else { return };

    let listen = sluice.addr("kept");
    let listening = ss("-tlnH");
    let row = listening
        .iter()
        .find(|l| l.split_whitespace().nth(3) == Some(&listen.to_string()))
        .unwrap_or_else(|| panic!("no listener {listen} in:\n{}", listening.join("\n")));
    assert_eq!(row.split_whitespace().nth(2), Some("77"), "Send-Q of a listener: its backlog");

    let mut client = connect(listen);
    client.write_all(b"ping").unwrap();
    let mut echo = [0; 4];
    client.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    let me = client.local_addr().unwrap();
    let left = keepalive_left(listen, me).expect("the accepted socket has a keepalive timer");
    assert!((30..=40).contains(&left), "client keepalive idle 40s, {left}s left");
    let to_backend = ss("-tnoH")
        .into_iter()
        .filter_map(|l| {
            let f: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            let (local, peer) = (f.get(3)?.parse().ok()?, f.get(4)?.parse::<SocketAddr>().ok()?);
            (peer == backend.addr()).then_some(local)
        })
        .collect::<Vec<SocketAddr>>();
    assert_eq!(to_backend.len(), 1, "one backend connection: {to_backend:?}");
    let left = keepalive_left(to_backend[0], backend.addr()).expect("a backend keepalive timer");
    assert!((290..=300).contains(&left), "backend keepalive idle 300s, {left}s left");
    drop(client);

    let plain = sluice.addr("plain");
    let mut client = connect(plain);
    client.write_all(b"ping").unwrap();
    client.read_exact(&mut echo).unwrap();
    let me = client.local_addr().unwrap();
    assert_eq!(keepalive_left(plain, me), None, "no keepalive unless configured");
}

sluice_tests::for_each_driver!(keepalive_of_each_side_and_the_backlog_reach_the_kernel);
