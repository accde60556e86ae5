//! RELIABILITY 4, stuck half-close: after one side has half-closed, if the other goes silent
//! the session is cut at the FIN timeout (within 10%), abortively, logged as `fin_timeout`,
//! and sluice's fd count returns to its baseline.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use sluice_tests::{
    connect, drain, Backend, Config, Drained, Driver, End, Reports, Service, SessionKey, Sluice,
};

const FIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The cut may come this much before or after the FIN timeout.
const TOLERANCE: Duration = Duration::from_millis(100);
/// Longest a silent peer waits for the cut before giving up on it.
const SILENCE: Duration = Duration::from_secs(5);

fn config(driver: Driver, backend: &Backend, echo: &Backend) -> Config {
    Config::new(driver)
        .workers(1)
        .service(Service::new("stuck", &[backend.addr()]).fin_timeout("1s"))
        .service(Service::new("warmup", &[echo.addr()]))
}

fn assert_near_fin_timeout(elapsed: Duration, who: &str) {
    println!("{who} saw the close {elapsed:?} after the half-close");
    assert!(
        elapsed + TOLERANCE >= FIN_TIMEOUT && elapsed <= FIN_TIMEOUT + TOLERANCE,
        "{who} saw the close {elapsed:?} after the half-close; \
         expected {FIN_TIMEOUT:?} ± {TOLERANCE:?}"
    );
}

/// Waits, silent, for the peer's reset: the socket's pending error (SO_ERROR), polled every
/// 2 ms for up to [`SILENCE`]. For a socket that has already read EOF, whose `read` keeps
/// returning 0 even after an RST.
fn wait_for_socket_error(stream: &TcpStream) -> Option<(Instant, std::io::Error)> {
    let deadline = Instant::now() + SILENCE;
    while Instant::now() < deadline {
        if let Ok(Some(e)) = stream.take_error() {
            return Some((Instant::now(), e));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Whether a socket error is what an RST leaves: ECONNRESET, or EPIPE for a socket that had
/// already received the peer's FIN (CLOSE_WAIT).
fn is_reset(kind: Option<std::io::ErrorKind>) -> bool {
    matches!(kind, Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe))
}

/// The client sends bytes then SHUT_WR; the backend reads to EOF and stays silent. The
/// client is reset one FIN timeout after its half-close, and so is the backend.
fn silent_backend_after_client_half_close_is_cut_at_fin_timeout(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let reports: Reports<(Drained, Option<std::io::ErrorKind>)> = Reports::default();
    let tx = reports.clone();
    let backend = Backend::spawn(move |mut stream| {
        let request = drain(&mut stream);
        let cut = wait_for_socket_error(&stream).map(|(_, e)| e.kind());
        tx.push((request, cut));
    });
    let echo = Backend::echo();
    let Some(sluice) = Sluice::start(config(driver, &backend, &echo)) else { return };
    let baseline = sluice.fd_baseline("warmup");

    let mut client = connect(sluice.addr("stuck"));
    let key = SessionKey::of(&client);
    sluice_tests::set_timeouts(&client, SILENCE);
    client.write_all(b"request then silence").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let half_closed = Instant::now();
    let outcome = drain(&mut client);
    assert_eq!(outcome.end, End::Reset, "the client's read ended with {:?}", outcome.end);
    assert_eq!(outcome.bytes, 0);
    assert_near_fin_timeout(outcome.at - half_closed, "the client");

    let (request, cut) = reports.first(SILENCE).expect("the backend did not report");
    assert_eq!((request.bytes, request.end), (20, End::Eof));
    assert!(is_reset(cut), "the silent backend's socket error is {cut:?}, not a reset");

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "fin_timeout");
    drop(client);
    let fds = sluice.wait_for_session_fds(baseline, Duration::from_secs(2));
    assert!(fds <= baseline, "sluice holds {fds} fds, baseline {baseline}");
}

/// The mirror: the backend sends bytes then SHUT_WR; the client reads to EOF and stays
/// silent. The client is reset one FIN timeout after it saw the EOF, and so is the
/// backend.
fn silent_client_after_backend_half_close_is_cut_at_fin_timeout(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    let reports: Reports<Drained> = Reports::default();
    let tx = reports.clone();
    let backend = Backend::spawn(move |mut stream| {
        if stream.write_all(b"greeting then silence").is_err()
            || stream.shutdown(Shutdown::Write).is_err()
        {
            return;
        }
        sluice_tests::set_timeouts(&stream, SILENCE);
        tx.push(drain(&mut stream));
    });
    let echo = Backend::echo();
    let Some(sluice) = Sluice::start(config(driver, &backend, &echo)) else { return };
    let baseline = sluice.fd_baseline("warmup");

    let mut client = connect(sluice.addr("stuck"));
    let key = SessionKey::of(&client);
    let greeting = drain(&mut client);
    assert_eq!((greeting.bytes, greeting.end), (21, End::Eof));
    let (closed_at, error) =
        wait_for_socket_error(&client).expect("the silent client was never reset");
    assert_near_fin_timeout(closed_at - greeting.at, "the client");
    assert!(is_reset(Some(error.kind())), "the client's socket error is {error}, not a reset");

    let backend_side = reports.first(SILENCE).expect("the backend did not report");
    assert_eq!(backend_side.end, End::Reset, "the backend was not reset");

    let record = sluice.wait_for_session(key, Duration::from_secs(5)).expect("no session line");
    assert_eq!(record.reason, "fin_timeout");
    drop(client);
    let fds = sluice.wait_for_session_fds(baseline, Duration::from_secs(2));
    assert!(fds <= baseline, "sluice holds {fds} fds, baseline {baseline}");
}

sluice_tests::for_each_driver!(
    silent_backend_after_client_half_close_is_cut_at_fin_timeout,
    silent_client_after_backend_half_close_is_cut_at_fin_timeout
);
