//! `relay = "auto"`: a direction moves by copy until it carries a bulk stream, by splice from
//! then on. Observable from outside as the pipes a worker pools: sessions of small messages
//! never take one; a bulk stream does, and gives it back to the pool when it ends
//! (`/stats` `workers[].spare_pipes`). And the relay × driver pairs the per-driver matrix
//! leaves out (it runs epoll with copy, io_uring with auto and with splice) move a bulk
//! stream both ways byte-exact: io_uring with copy, epoll with auto.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, echo_round_trip, hex, Backend, Config, Driver, End, Payload, Service, SessionKey,
    Sluice,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The pipes every worker keeps spare, from `/stats`.
fn spare_pipes(sluice: &Sluice) -> u64 {
    let stats = sluice.admin().stats();
    let workers = stats["workers"].as_array().expect("workers");
    workers.iter().map(|w| w["spare_pipes"].as_u64().expect("spare_pipes")).sum()
}

/// Waits (bounded) until no session of the service is active, so that every lane has given
/// back what it held.
fn settle(sluice: &Sluice) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = sluice.admin().stats();
        let services = stats["services"].as_array().expect("services");
        if services.iter().all(|s| s["active"].as_u64() == Some(0)) {
            return;
        }
        assert!(Instant::now() < until, "sessions still active after 5 s: {stats:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Forty echo sessions of 1 KiB take no pipe; one 8 MiB echo session does (both ways are
/// bulk), and its pipes are back in the pool once it ends. Every byte comes back exact.
fn auto_splices_bulk_streams_only(driver: Driver) {
    let echo = Backend::echo();
    let config =
        Config::new(driver).relay("auto").admin_tcp().service(Service::new("e", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let addr = sluice.addr("e");
    for i in 0..40 {
        echo_round_trip(addr, i, KIB);
    }
    settle(&sluice);
    assert_eq!(spare_pipes(&sluice), 0, "small messages took a pipe");
    let bulk = echo_round_trip(addr, 99, 8 * MIB);
    let record = sluice.wait_for_session(bulk, Duration::from_secs(5)).expect("no session line");
    assert_eq!((record.bytes_up, record.bytes_down), (8 * MIB, 8 * MIB));
    settle(&sluice);
    assert!(spare_pipes(&sluice) >= 1, "a bulk stream under auto never spliced");
}

/// A 64 MiB upload through `relay` on `driver` reaches the sink with the same SHA-256, and
/// an 8 MiB echo comes back exact.
fn bulk_is_byte_exact(driver: Driver, relay: &'static str) {
    let (sink, received) = Backend::sink();
    let echo = Backend::echo();
    let config = Config::new(driver)
        .relay(relay)
        .service(Service::new("sink", &[sink.addr()]))
        .service(Service::new("echo", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };
    let mut client = connect(sluice.addr("sink"));
    let key = SessionKey::of(&client);
    let sent = Payload::new(7, 64 * MIB).write_to(&mut client, |_| {}).expect("send 64 MiB");
    client.shutdown(Shutdown::Write).unwrap();
    let got = received.first(Duration::from_secs(30)).expect("the sink did not report");
    assert_eq!((got.bytes, got.end), (64 * MIB, End::Eof));
    assert_eq!(hex(&got.sha256), hex(&sent), "the stream arrived altered");
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.bytes_up, 64 * MIB);
    echo_round_trip(sluice.addr("echo"), 8, 8 * MIB);
}

#[test]
fn io_uring_with_copy_moves_bulk_byte_exact() {
    bulk_is_byte_exact(Driver::Uring, "copy");
}

#[test]
fn epoll_with_auto_moves_bulk_byte_exact() {
    bulk_is_byte_exact(Driver::Epoll, "auto");
}

sluice_tests::for_each_driver!(auto_splices_bulk_streams_only);
