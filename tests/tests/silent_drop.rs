//! RELIABILITY 21, silent drop (issue 22 item 3): a `drop = "silent"` rule's clients get no
//! answer at all to their SYNs (a connect timeout, not a reset or a close, and no record),
//! allowed clients of the same listener are served, and a reload that lifts the rule lets
//! the dropped client in, on the same listener.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use sluice_tests::{connect_from, echo_exchange, Backend, Config, Driver, Reload, Service, Sluice};

const DENIED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 66));
const ALLOWED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 70));
/// How long a dropped client waits without any answer before the test calls it a timeout
/// (the kernel retransmits its SYN after 1 s; that one is dropped too).
const UNANSWERED: Duration = Duration::from_millis(1500);

const SILENT: &str = "[[firewall]]\nname = \"scanners\"\naction = \"deny\"\ndrop = \"silent\"\nfrom = [\"127.0.0.64/30\", \"192.0.2.0/24\"]\n";

/// Starts a non-blocking connect from `ip` to `addr`; the socket says later what came of it.
fn start_connect(ip: IpAddr, addr: SocketAddr) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None).unwrap();
    socket.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    match socket.connect(&addr.into()) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        other => panic!("a connect from {ip} did not wait for an answer: {other:?}"),
    }
    socket
}

fn served(ip: IpAddr, addr: SocketAddr, seed: u64) {
    echo_exchange(connect_from(ip, addr), seed, 4096)
        .unwrap_or_else(|e| panic!("{ip} was not served: {e}"));
}

fn a_silent_rule_leaves_syns_unanswered_until_a_reload_lifts_it(driver: Driver) {
    let backend = Backend::echo();
    let config = Config::new(driver).service(Service::new("edge", &[backend.addr()]));
    let Some(sluice) = Sluice::start(config.clone().section(SILENT)) else { return };
    let addr = sluice.addr("edge");

    let dropped = start_connect(DENIED, addr);
    served(ALLOWED, addr, 1);
    std::thread::sleep(UNANSWERED);
    assert_eq!(dropped.take_error().unwrap().map(|e| e.to_string()), None, "no reset, no error");
    assert!(dropped.peer_addr().is_err(), "a dropped client must not be connected");
    assert_eq!(backend.accepted(), 1, "only the allowed client reached the backend");
    let logs = sluice.logs().join("\n");
    assert!(!logs.contains("client=127.0.0.66:"), "a silent drop leaves no record:\n{logs}");
    drop(dropped);

    sluice.write_config(&config);
    assert!(matches!(sluice.reload(Duration::from_secs(10)), Reload::Applied(_)));
    assert_eq!(sluice.addr("edge"), addr, "the same listener");
    served(DENIED, addr, 2);
    served(ALLOWED, addr, 3);
    let line = sluice.wait_for_log("listening sockets dropped", Duration::from_secs(5));
    let line = line.expect("the reload logs the listeners' drops");
    let count: u64 = line
        .split("dropped ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    assert!(count >= 2, "the SYN and its retransmission were counted: {line}");
}

sluice_tests::for_each_driver!(a_silent_rule_leaves_syns_unanswered_until_a_reload_lifts_it);
