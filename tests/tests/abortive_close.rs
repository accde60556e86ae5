//! RELIABILITY 5, abortive close: a peer that resets mid-stream (SO_LINGER 0) is seen by the
//! other peer as a reset (ECONNRESET) within 100 ms, never as a clean EOF that would hide the
//! truncation; in both directions, and sluice's fd count returns to its baseline.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use sluice_tests::{
    abort, connect, drain, read_exactly, try_connect, Backend, Config, Drained, Driver, End,
    Payload, Reports, Service, SessionKey, Sluice, Verifier,
};

/// Bytes sent before the reset: several relay buffers, so the reset lands mid-stream.
const BEFORE_RESET: u64 = 512 * 1024;
const SEED: u64 = 55;
/// Longest a reset may take to reach the other peer.
const REACH: Duration = Duration::from_millis(100);
/// Sessions tried in the race against an immediate reset.
const SESSIONS: usize = 200;

fn config(driver: Driver, backend: &Backend, echo: &Backend) -> Config {
    Config::new(driver)
        .workers(1)
        .service(Service::new("abort", &[backend.addr()]))
        .service(Service::new("warmup", &[echo.addr()]))
}

/// Once the session relays (a first byte went client -> backend), the backend writes
/// 512 KiB then resets: the client reads a correct prefix of the stream, then
/// ECONNRESET, no EOF, within 100 ms of the reset; logged `backend_rst`.
fn backend_reset_midstream_reaches_client_as_reset(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let resets = Reports::default();
    let tx = resets.clone();
    let backend = Backend::spawn(move |mut stream| {
        if stream.read_exact(&mut [0; 1]).is_err() {
            return;
        }
        if Payload::new(SEED, BEFORE_RESET).write_to(&mut stream, |_| {}).is_ok() {
            tx.push(Instant::now());
            abort(stream);
        }
    });
    let echo = Backend::echo();
    let Some(sluice) = Sluice::start(config(driver, &backend, &echo)) else { return };
    let baseline = sluice.fd_baseline("warmup");

    let mut client = connect(sluice.addr("abort"));
    let key = SessionKey::of(&client);
    client.write_all(b"g").unwrap();
    let mut verifier = Verifier::new(SEED, BEFORE_RESET);
    let mut buf = vec![0; 64 * 1024];
    let (end, seen_at) = loop {
        match client.read(&mut buf) {
            Ok(0) => break (End::Eof, Instant::now()),
            Ok(n) => verifier.update(&buf[..n]),
            Err(e) => break (End::of(&e), Instant::now()),
        }
    };
    let reset_at: Instant = resets.first(Duration::from_secs(5)).expect("the backend never reset");
    assert_eq!(
        end,
        End::Reset,
        "the client saw {end:?} after {} bytes, not a reset",
        verifier.received()
    );
    assert!(verifier.is_prefix(), "the bytes before the reset arrived altered");
    assert!(verifier.received() <= BEFORE_RESET);
    let delay = seen_at.saturating_duration_since(reset_at);
    println!("reset reached the client after {delay:?}, {} bytes", verifier.received());
    assert!(delay < REACH, "the reset reached the client after {delay:?}");

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "backend_rst");
    drop(client);
    let fds = sluice.wait_for_session_fds(baseline, Duration::from_secs(2));
    assert!(fds <= baseline, "sluice holds {fds} fds, baseline {baseline}");
}

/// The mirror: once the session relays (a first byte went backend -> client), the
/// client writes 512 KiB then resets: the backend reads a correct prefix of those bytes,
/// then ECONNRESET, no EOF, within 100 ms of the reset; logged `client_rst`.
fn client_reset_midstream_reaches_backend_as_reset(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let reports: Reports<Drained> = Reports::default();
    let tx = reports.clone();
    let backend = Backend::spawn(move |mut stream| {
        if stream.write_all(b"g").is_ok() {
            tx.push(drain(&mut stream));
        }
    });
    let echo = Backend::echo();
    let Some(sluice) = Sluice::start(config(driver, &backend, &echo)) else { return };
    let baseline = sluice.fd_baseline("warmup");

    let mut client = connect(sluice.addr("abort"));
    let key = SessionKey::of(&client);
    assert_eq!(read_exactly(&mut client, 1), b"g");
    client.write_all(&Payload::bytes(SEED, BEFORE_RESET as usize)).unwrap();
    let reset_at = Instant::now();
    abort(client);

    let seen = reports.first(Duration::from_secs(5)).expect("the backend did not report");
    assert_eq!(
        seen.end,
        End::Reset,
        "the backend saw {:?} after {} bytes, not a reset",
        seen.end,
        seen.bytes
    );
    assert!(seen.bytes <= BEFORE_RESET);
    assert!(
        Payload::bytes(SEED, seen.head.len()) == seen.head,
        "the bytes before the reset arrived altered"
    );
    let delay = seen.at.saturating_duration_since(reset_at);
    println!("reset reached the backend after {delay:?}, {} bytes", seen.bytes);
    assert!(delay < REACH, "the reset reached the backend after {delay:?}");

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "client_rst");
    let fds = sluice.wait_for_session_fds(baseline, Duration::from_secs(2));
    assert!(fds <= baseline, "sluice holds {fds} fds, baseline {baseline}");
}

/// A backend that resets right after it accepted and wrote 64 KiB, before sluice may
/// have handled its connect completion: the connect succeeded, so over 200 sessions every
/// client sees a reset, never a clean EOF, every session is logged, and none as a connect
/// failure.
/// Guards against a bug seen on the epoll driver: it took the pending ECONNRESET (SO_ERROR)
/// of such a backend socket for a refused connect, logged `connect_refused` and closed the
/// client with a clean EOF and no byte.
fn backend_reset_right_after_accept_reaches_client_as_reset(driver: Driver) {
    let (backend, _resets) = Backend::resets_after(SEED, 64 * 1024);
    let echo = Backend::echo();
    let Some(sluice) = Sluice::start(config(driver, &backend, &echo)) else { return };

    let mut clean_eofs = Vec::new();
    for _ in 0..SESSIONS {
        // The reset may beat the client's own connect call: that is a reset too.
        let mut client = match try_connect(sluice.addr("abort")) {
            Ok(client) => client,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => continue,
            Err(e) => panic!("cannot connect to sluice: {e}"),
        };
        let Ok(client_addr) = client.local_addr() else { continue };
        let seen = drain(&mut client);
        if seen.end != End::Reset {
            clean_eofs.push((client_addr, seen.end, seen.bytes));
        }
    }
    let records = sluice.wait_for_sessions(SESSIONS, Duration::from_secs(5));
    // Every connection was accepted (a reset that beat the client's connect came from an
    // accepted one too), so every one is a session with its record.
    assert_eq!(records.len(), SESSIONS, "session records of {SESSIONS} connections");
    let failures: Vec<_> = records.iter().filter(|r| r.reason.starts_with("connect_")).collect();
    assert!(
        clean_eofs.is_empty() && failures.is_empty(),
        "{} of {SESSIONS} clients did not see a reset, e.g. (client, end, bytes) {:?}; \
         {} sessions logged as connect failures, e.g. {:?}",
        clean_eofs.len(),
        clean_eofs.first(),
        failures.len(),
        failures.first()
    );
}

sluice_tests::for_each_driver!(
    backend_reset_midstream_reaches_client_as_reset,
    client_reset_midstream_reaches_backend_as_reset,
    backend_reset_right_after_accept_reaches_client_as_reset
);
