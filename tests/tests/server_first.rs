//! RELIABILITY 2, server speaks first: a backend that writes before the client has sent
//! anything gets its bytes to the client, and a later client write still reaches it.

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use sluice_tests::{
    connect, drain, read_exactly, Backend, Config, Driver, End, Payload, Service, SessionKey,
    Sluice,
};

/// Larger than one relay buffer, so the greeting needs several turns of the relay loop.
const GREETING: usize = 200_000;
const REQUEST: usize = 150_000;

/// The client reads the whole greeting without writing; then its request reaches the
/// backend byte for byte, and the session log counts both.
fn greeting_reaches_silent_client_and_later_request_reaches_backend(driver: Driver) {
    let greeting = Payload::bytes(1, GREETING);
    let (backend, received) = Backend::speaks_first(greeting.clone());
    let config = Config::new(driver).service(Service::new("first", &[backend.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };

    let mut client = connect(sluice.addr("first"));
    let key = SessionKey::of(&client);
    let got = read_exactly(&mut client, GREETING);
    assert!(got == greeting, "the greeting arrived altered");

    client.write_all(&Payload::bytes(2, REQUEST)).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let rest = drain(&mut client);
    assert_eq!((rest.bytes, rest.end), (0, End::Eof), "after the greeting the backend only closes");

    let request = received.first(Duration::from_secs(10)).expect("the backend got no request");
    assert_eq!(request.end, End::Eof);
    assert_eq!(request.bytes, REQUEST as u64);
    assert_eq!(request.sha256, Payload::sha256(2, REQUEST as u64), "the request arrived altered");

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!((record.bytes_up, record.bytes_down), (REQUEST as u64, GREETING as u64));
    assert_eq!(record.reason, "client_fin");
    assert_eq!(record.backend, Some(backend.addr()));
}

sluice_tests::for_each_driver!(greeting_reaches_silent_client_and_later_request_reaches_backend);
