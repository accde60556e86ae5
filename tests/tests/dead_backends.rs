//! RELIABILITY 8, dead backends: a blackholed backend (no SYN-ACK) gets the client closed at
//! the connect timeout, gracefully and logged `connect_timeout`; a refused backend is
//! skipped for the next one; while a connect is pending, other sessions on the same worker
//! keep flowing.

use std::io::Read;
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, drain, echo_round_trip, refused_addr, Backend, Blackhole, Config, Driver, End,
    Service, SessionKey, Sluice,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Asserts that `elapsed` is the connect timeout `expected`, give or take scheduling:
/// from 10% early to 20% late.
fn assert_near(elapsed: Duration, expected: Duration) {
    let (low, high) = (expected.mul_f64(0.9), expected.mul_f64(1.2));
    assert!(
        elapsed >= low && elapsed <= high,
        "the client was closed after {elapsed:?}; expected {expected:?} (within {low:?}..{high:?})"
    );
}

/// The only backend never answers the SYN: after connect_timeout = 1s the client gets a
/// clean EOF with no byte, and the session is logged `connect_timeout` with 0 bytes.
fn blackholed_backend_closes_client_at_connect_timeout(driver: Driver) {
    let hole = Blackhole::new();
    let service = Service::new("dead", &[hole.addr()]).connect_timeout("1s");
    let Some(sluice) = Sluice::start(Config::new(driver).service(service)) else { return };

    let mut client = connect(sluice.addr("dead"));
    let key = SessionKey::of(&client);
    let connected = Instant::now();
    let outcome = drain(&mut client);
    assert_eq!((outcome.end, outcome.bytes), (End::Eof, 0), "expected a clean close with no byte");
    println!("closed after {:?}", outcome.at - connected);
    assert_near(outcome.at - connected, CONNECT_TIMEOUT);

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "connect_timeout");
    assert_eq!((record.bytes_up, record.bytes_down), (0, 0));
}

/// The first backend refuses: every session is served by the second, and logged with
/// it as the backend. Round-robin makes every other session try the refused one first.
fn refused_backend_is_skipped_for_the_next(driver: Driver) {
    let refused = refused_addr();
    let echo = Backend::echo();
    let service = Service::new("pool", &[refused, echo.addr()]);
    let Some(sluice) = Sluice::start(Config::new(driver).service(service)) else { return };

    for i in 0..4 {
        let client = echo_round_trip(sluice.addr("pool"), 100 + i, 10_000);
        let record =
            sluice.wait_for_session(client, Duration::from_secs(5)).expect("no session line");
        assert_eq!(record.backend, Some(echo.addr()), "session {i} logged the wrong backend");
        assert_eq!(record.reason, "client_fin");
    }
    assert_eq!(echo.accepted(), 4);
}

/// Every backend refuses: the client gets a clean EOF with no byte, logged
/// `connect_refused`.
fn all_backends_refused_closes_client_gracefully(driver: Driver) {
    let service = Service::new("none", &[refused_addr(), refused_addr()]);
    let Some(sluice) = Sluice::start(Config::new(driver).service(service)) else { return };

    let mut client = connect(sluice.addr("none"));
    let key = SessionKey::of(&client);
    let outcome = drain(&mut client);
    assert_eq!((outcome.end, outcome.bytes), (End::Eof, 0), "expected a clean close with no byte");
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "connect_refused");
}

/// With one worker, a session stuck connecting to a blackhole (connect_timeout = 3s)
/// does not hold up others: 20 echo sessions on another service complete, each within
/// 500 ms, while it is pending; then it is closed at its timeout.
fn pending_connect_does_not_delay_other_sessions(driver: Driver) {
    let hole = Blackhole::new();
    let echo = Backend::echo();
    let config = Config::new(driver)
        .workers(1)
        .service(Service::new("dead", &[hole.addr()]).connect_timeout("3s"))
        .service(Service::new("live", &[echo.addr()]));
    let Some(sluice) = Sluice::start(config) else { return };

    let mut pending = connect(sluice.addr("dead"));
    let key = SessionKey::of(&pending);
    let pending_since = Instant::now();
    for i in 0..20 {
        let started = Instant::now();
        echo_round_trip(sluice.addr("live"), 200 + i, 64 * 1024);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "live session {i} took {took:?}");
    }
    let live_done = pending_since.elapsed();
    assert!(live_done < Duration::from_millis(2500), "the live sessions took {live_done:?}");
    assert!(
        sluice.wait_for_session(key, Duration::ZERO).is_none(),
        "the pending session ended before its connect timeout"
    );

    let mut byte = [0u8; 1];
    let read = pending.read(&mut byte);
    assert!(matches!(read, Ok(0)), "the pending client got {read:?}, not a clean EOF");
    assert_near(pending_since.elapsed(), Duration::from_secs(3));
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "connect_timeout");
}

sluice_tests::for_each_driver!(
    blackholed_backend_closes_client_at_connect_timeout,
    refused_backend_is_skipped_for_the_next,
    all_backends_refused_closes_client_gracefully,
    pending_connect_does_not_delay_other_sessions
);
