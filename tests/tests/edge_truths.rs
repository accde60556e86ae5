//! What sluice decides and records at the edges of a session, where issue 26 found it
//! wrong; each test failed on the build before the session core:
//! - item 4: on a wildcard listener, `to` / `not_to` compared the bound address
//!   (0.0.0.0), not the one the client reached, so a deny rule for one address let it
//!   through; the record's `listener` named 0.0.0.0.
//! - item 9: clients that connect and reset at once were recorded on io_uring as allowed,
//!   from 0.0.0.0:0, on a `default = "deny"` service, and counted as sessions.
//! - item 14: a session that moved exactly `max_bytes` was cut with a reset instead of
//!   ending as its peers ended it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use sluice_tests::{
    connect, drain, free_port, tagged_exchange, Backend, Config, Driver, End, Service, Sluice,
};
use socket2::{Domain, Socket, Type};

const RECORD: Duration = Duration::from_secs(10);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// The record line of the session whose client is `client`.
fn record_of(sluice: &Sluice, client: SocketAddr) -> String {
    sluice
        .wait_for_log(&format!("client={client} "), RECORD)
        .unwrap_or_else(|| panic!("no record of {client}"))
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    let found = line.split_whitespace().find_map(|kv| kv.strip_prefix(prefix.as_str()));
    found.unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Item 4: rules on the address reached, on a 0.0.0.0 listener.
fn to_rules_see_the_address_the_client_reached(driver: Driver) {
    let backend = Backend::tagged_echo(b'A');
    let port = free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut service = Service::new("any", &[backend.addr()]).key(
        "[[service.rule]]\nname = \"no-three\"\naction = \"deny\"\nto = [\"127.0.0.3\"]\n\n\
         [[service.rule]]\nname = \"only-two-and-four\"\naction = \"deny\"\nnot_to = [\"127.0.0.2\", \"127.0.0.4\"]",
    );
    service.listen = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))];
    let Some(sluice) = Sluice::start(Config::new(driver).service(service)) else { return };
    for (last, verdict) in
        [(2, None), (3, Some("no-three")), (4, None), (5, Some("only-two-and-four"))]
    {
        let reached = SocketAddr::from((ip(last), port));
        let stream = connect(reached);
        let client = stream.local_addr().unwrap();
        let mut probe = stream.try_clone().unwrap();
        let answered = tagged_exchange(stream, b"which address?");
        let line = record_of(&sluice, client);
        assert_eq!(field(&line, "listener"), reached.to_string(), "{line}");
        match verdict {
            None => {
                assert_eq!(answered.ok(), Some(b'A'), "{reached} is allowed: {line}");
                assert_eq!(field(&line, "verdict"), "allow", "{line}");
            }
            Some(rule) => {
                assert!(answered.is_err(), "{reached} reached the backend: {line}");
                let _ = drain(&mut probe);
                assert_eq!((field(&line, "verdict"), field(&line, "rule")), ("deny", rule));
            }
        }
    }
}

/// Item 9: connections reset before sluice looks at them are no allowed sessions.
fn clients_that_reset_at_once_are_neither_allowed_nor_sessions(driver: Driver) {
    const CLIENTS: usize = 500;
    let backend = Backend::echo();
    let service = Service::new("closed", &[backend.addr()]).key("default = \"deny\"");
    let config = Config::new(driver).admin_tcp().service(service);
    let Some(sluice) = Sluice::start(config) else { return };
    let target = sluice.addr("closed");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.connect(&target.into()).expect("connect");
        s.set_linger(Some(Duration::ZERO)).unwrap();
        clients.push(s.local_addr().unwrap().as_socket().unwrap());
        drop(s); // an RST at once
    }
    // A last, ordinary client marks the end: its record comes after the others'.
    let mut last = connect(target);
    let _ = drain(&mut last);
    record_of(&sluice, last.local_addr().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let records: Vec<String> =
        sluice.logs().into_iter().filter(|l| l.contains(" session service=closed ")).collect();
    for line in &records {
        assert_eq!(field(line, "verdict"), "deny", "{line}");
        assert!(!line.contains("client=0.0.0.0:0"), "{line}");
        let client: SocketAddr = field(line, "client").parse().unwrap();
        assert!(client == last.local_addr().unwrap() || clients.contains(&client), "{line}");
    }
    assert_eq!(backend.accepted(), 0, "a denied client reached the backend");
    let m = sluice.admin().metrics();
    let sessions = m.get("sluice_sessions_total", &[("service", "closed")]);
    let reset: f64 = (0..2)
        .map(|w| m.get("sluice_worker_accepted_reset_total", &[("worker", &w.to_string())]))
        .sum();
    // Every connection is one thing exactly: a denied session with its record, or a reset
    // caught before admission.
    assert_eq!(sessions as usize, records.len(), "sessions counted = records");
    assert_eq!(
        records.len() + reset as usize,
        CLIENTS + 1,
        "{} records, {reset} resets",
        records.len()
    );
}

/// Item 14: moving exactly the cap is no reason to cut.
fn a_session_that_moves_exactly_max_bytes_ends_as_its_peers_end_it(driver: Driver) {
    const CAP: usize = 100_000;
    let backend = Backend::spawn(|mut s| {
        let data = vec![0x42u8; CAP];
        if s.write_all(&data).is_ok() {
            let _ = s.shutdown(Shutdown::Write);
            let _ = s.read(&mut [0u8; 16]);
        }
    });
    let service =
        Service::new("exact", &[backend.addr()]).key("limits = { max_bytes = \"100 KB\" }");
    let Some(sluice) = Sluice::start(Config::new(driver).service(service)) else { return };
    let mut stream = connect(sluice.addr("exact"));
    let got = drain(&mut stream);
    assert_eq!((got.bytes, got.end), (CAP as u64, End::Eof), "all of it, then a FIN");
    let _ = stream.shutdown(Shutdown::Write);
    let line = record_of(&sluice, stream.local_addr().unwrap());
    assert_eq!(field(&line, "reason"), "backend_fin", "{line}");
    assert_eq!(field(&line, "bytes_down"), CAP.to_string(), "{line}");
    drop::<TcpStream>(stream);
}

sluice_tests::for_each_driver!(
    to_rules_see_the_address_the_client_reached,
    clients_that_reset_at_once_are_neither_allowed_nor_sessions,
    a_session_that_moves_exactly_max_bytes_ends_as_its_peers_end_it,
);
