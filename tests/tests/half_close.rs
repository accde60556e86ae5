//! RELIABILITY 3, half-close in both directions: the side that shuts down for writing first
//! has all its bytes delivered before the end of stream, and can still receive everything
//! the other side sends afterwards, then a clean EOF.

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use sluice_tests::{
    connect, drain, Backend, Config, Driver, End, Payload, Reports, Service, SessionKey, Sluice,
};

/// Client to backend: more than a few relay buffers, and not a multiple of their size.
const N: u64 = 300_007;
/// Backend to client.
const M: u64 = 200_003;
const UP_SEED: u64 = 31;
const DOWN_SEED: u64 = 32;

/// Client sends N bytes then SHUT_WR: the backend reads exactly N bytes before its EOF,
/// then sends M bytes, and the client gets all M bytes, then EOF.
fn client_half_close_then_backend_replies(driver: Driver) {
    let reports = Reports::default();
    let tx = reports.clone();
    let backend = Backend::spawn(move |mut stream| {
        let before_eof = drain(&mut stream);
        let sent = Payload::new(DOWN_SEED, M).write_to(&mut stream, |_| {});
        tx.push((before_eof, sent.is_ok()));
    });
    let config = Config::new(driver).service(Service::new("half", &[backend.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };

    let mut client = connect(sluice.addr("half"));
    let key = SessionKey::of(&client);
    Payload::new(UP_SEED, N).write_to(&mut client, |_| {}).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let reply = drain(&mut client);

    let (before_eof, sent) =
        reports.first(Duration::from_secs(10)).expect("backend did not report");
    assert_eq!(before_eof.end, End::Eof, "the backend saw no clean EOF");
    assert_eq!(
        before_eof.bytes, N,
        "the backend's EOF came after {} bytes, not {N}",
        before_eof.bytes
    );
    assert_eq!(before_eof.sha256, Payload::sha256(UP_SEED, N));
    assert!(sent, "the backend could not write after the client's half-close");
    assert_eq!((reply.bytes, reply.end), (M, End::Eof));
    assert_eq!(reply.sha256, Payload::sha256(DOWN_SEED, M));

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!((record.bytes_up, record.bytes_down, record.reason.as_str()), (N, M, "client_fin"));
}

/// The mirror: the backend sends M bytes then SHUT_WR; the client gets all M, then EOF,
/// then sends N bytes, and the backend gets all N, then EOF.
fn backend_half_close_then_client_replies(driver: Driver) {
    let reports = Reports::default();
    let tx = reports.clone();
    let backend = Backend::spawn(move |mut stream| {
        if Payload::new(DOWN_SEED, M).write_to(&mut stream, |_| {}).is_err() {
            return;
        }
        if stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        tx.push(drain(&mut stream));
    });
    let config = Config::new(driver).service(Service::new("half", &[backend.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };

    let mut client = connect(sluice.addr("half"));
    let key = SessionKey::of(&client);
    let first = drain(&mut client);
    assert_eq!((first.bytes, first.end), (M, End::Eof));
    assert_eq!(first.sha256, Payload::sha256(DOWN_SEED, M));
    client.write_all(&Payload::bytes(UP_SEED, N as usize)).unwrap();
    client.shutdown(Shutdown::Write).unwrap();

    let after = reports.first(Duration::from_secs(10)).expect("backend did not report");
    assert_eq!(
        (after.bytes, after.end),
        (N, End::Eof),
        "the backend's EOF came after {} bytes",
        after.bytes
    );
    assert_eq!(after.sha256, Payload::sha256(UP_SEED, N));
    let last = drain(&mut client);
    assert_eq!((last.bytes, last.end), (0, End::Eof));

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!((record.bytes_up, record.bytes_down, record.reason.as_str()), (N, M, "backend_fin"));
}

sluice_tests::for_each_driver!(
    client_half_close_then_backend_replies,
    backend_half_close_then_client_replies
);
