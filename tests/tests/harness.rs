//! The test doubles do what the other tests rely on, checked directly, without sluice: a
//! blackhole drops SYNs, a refused address refuses, a reset backend resets, payloads are
//! deterministic, ports are distinct.

use std::collections::HashSet;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, drain, refused_addr, try_connect, Backend, Blackhole, End, Payload, Verifier,
};

#[test]
fn blackhole_makes_a_connect_time_out() {
    let hole = Blackhole::new();
    let started = Instant::now();
    let err = TcpStream::connect_timeout(&hole.addr(), Duration::from_millis(1500))
        .expect_err("a connect to a blackhole must not complete");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "gave up after {:?}",
        started.elapsed()
    );
}

#[test]
fn refused_address_refuses_at_once() {
    let addr = refused_addr();
    let err =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect_err("nothing listens");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn resetting_backend_ends_a_direct_client_with_econnreset() {
    let (backend, resets) = Backend::resets_after(7, 100_000);
    // The reset may arrive before the connect call returns: that is a reset too.
    let end = match try_connect(backend.addr()) {
        Ok(mut client) => drain(&mut client).end,
        Err(e) => End::of(&e),
    };
    assert!(resets.first(Duration::from_secs(5)).is_some(), "the backend never reset");
    assert_eq!(end, End::Reset);
}

#[test]
fn echo_backend_returns_every_byte_then_eof() {
    let backend = Backend::echo();
    let mut client = connect(backend.addr());
    let data = Payload::bytes(3, 10_000);
    io::Write::write_all(&mut client, &data).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn payload_bytes_do_not_depend_on_chunking() {
    let whole = Payload::bytes(42, 100_003);
    let mut p = Payload::new(42, 100_003);
    let mut pieces = Vec::new();
    for size in [1, 7, 8, 9, 4096, 65_536].iter().cycle() {
        let mut buf = vec![0; *size];
        let n = p.fill(&mut buf);
        if n == 0 {
            break;
        }
        pieces.extend_from_slice(&buf[..n]);
    }
    assert_eq!(pieces, whole);
    let mut v = Verifier::new(42, 100_003);
    v.update(&whole[..5]);
    v.update(&whole[5..]);
    assert_eq!(v.finish(), Ok(()));
    let mut bad = Verifier::new(42, 100_003);
    let mut corrupt = whole.clone();
    corrupt[77_777] ^= 1;
    bad.update(&corrupt);
    assert_eq!(bad.finish(), Err("received stream differs from the payload at byte 77777".into()));
}

#[test]
fn free_ports_are_distinct_across_threads() {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                (0..50)
                    .map(|_| sluice_tests::free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ports: Vec<u16> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let unique: HashSet<_> = ports.iter().collect();
    assert_eq!(unique.len(), ports.len());
}
