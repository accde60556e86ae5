//! RELIABILITY 14, graceful stop: on SIGTERM sluice stops accepting, lets open sessions run
//! until the shutdown timeout, cuts what is left with a reset logged `shutdown`, and exits 0.

use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, drain, read_exactly, try_connect, Backend, Config, Driver, End, Service, SessionKey,
    Signal, Sluice,
};

/// With no session open, SIGTERM makes sluice exit 0 within a second and log `stopped`.
fn idle_sluice_exits_zero_on_sigterm(driver: Driver) {
    let echo = Backend::echo();
    let config = Config::new(driver).service(Service::new("echo", &[echo.addr()]));
    let Some(mut sluice) = Sluice::start(config) else { return };
    let sent = Instant::now();
    let status = sluice.terminate(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(sent.elapsed() < Duration::from_secs(1), "took {:?} to exit", sent.elapsed());
    assert!(sluice.logs().iter().any(|l| l.ends_with(" stopped")), "no `stopped` line");
}

/// With shutdown_timeout = "1s" and one open session: after SIGTERM new connections are
/// refused, the open session still relays, and about 1 s later it is reset, logged
/// `shutdown`, and sluice exits 0.
fn open_session_relays_until_shutdown_timeout_then_is_reset(driver: Driver) {
    let echo = Backend::echo();
    let config =
        Config::new(driver).shutdown_timeout("1s").service(Service::new("echo", &[echo.addr()]));
    let Some(mut sluice) = Sluice::start(config) else { return };
    let mut client = connect(sluice.addr("echo"));
    let key = SessionKey::of(&client);
    client.write_all(b"before").unwrap();
    assert_eq!(read_exactly(&mut client, 6), b"before");

    let sent = Instant::now();
    sluice.signal(Signal::SIGTERM);
    let mut refused = false;
    while !refused && sent.elapsed() < Duration::from_millis(500) {
        match try_connect(sluice.addr("echo")) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused = true,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(refused, "new connections were still accepted 500 ms after SIGTERM");
    client.write_all(b"during").unwrap();
    assert_eq!(read_exactly(&mut client, 6), b"during");

    let cut = drain(&mut client);
    let after = cut.at - sent;
    assert_eq!(cut.end, End::Reset, "the open session ended with {:?}", cut.end);
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_millis(1500),
        "cut after {after:?}"
    );
    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "shutdown");
    let status = sluice.terminate(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
}

/// Issue 26 item 3: a `shutdown_timeout` beyond what the clock can hold passed `check`, and
/// SIGTERM then made sluice exit 101 (a panic computing the drain deadline). Now it is
/// refused at start (exit 2, naming the key and line), and the longest accepted one
/// (365 days) stops cleanly: with no session open, at once and with exit 0.
fn shutdown_timeout_is_bounded_and_the_longest_one_stops_cleanly(driver: Driver) {
    let echo = Backend::echo();
    let huge = Config::new(driver)
        .shutdown_timeout("100000000000000d")
        .service(Service::new("echo", &[echo.addr()]));
    match Sluice::try_start(huge) {
        Err(sluice_tests::StartError::Exited { status, logs }) => {
            assert_eq!(status.code(), Some(2), "{logs:?}");
            let named = logs.iter().any(|l| {
                l.contains("sluice.toml:")
                    && l.contains(": engine.shutdown_timeout: must be at most 365 days")
            });
            assert!(named, "no error naming the line and key: {logs:?}");
        }
        Err(e) => panic!("unexpected: {e}"),
        Ok(mut sluice) => {
            let status = sluice.terminate(Duration::from_secs(5));
            panic!("a shutdown_timeout of 10^14 days was accepted; SIGTERM gave {status}");
        }
    }
    let longest =
        Config::new(driver).shutdown_timeout("365d").service(Service::new("echo", &[echo.addr()]));
    let Some(mut sluice) = Sluice::start(longest) else { return };
    let sent = Instant::now();
    let status = sluice.terminate(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(sent.elapsed() < Duration::from_secs(1), "took {:?} to exit", sent.elapsed());
}

sluice_tests::for_each_driver!(
    idle_sluice_exits_zero_on_sigterm,
    open_session_relays_until_shutdown_timeout_then_is_reset,
    shutdown_timeout_is_bounded_and_the_longest_one_stops_cleanly
);
